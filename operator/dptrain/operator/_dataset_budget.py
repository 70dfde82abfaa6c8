"""A dataset's privacy budget across its jobs: composition and admission, pure functions.

Every job charged to a DPDataset ran (or will run) a Poisson-subsampled Gaussian mechanism T_j
times on the same data. Their privacy costs compose; the dataset's ε is the ε of the
*composition* of all those DP events at the dataset's δ, computed with dp-accounting, never the
sum of the jobs' ε (which is looser, often by far).

Which bound: RDP (orders added, then converted) and PLD (pessimistic discretisation, convolved)
are both rigorous upper bounds on the true ε of the same composition. A dataset that accounts
with ``rdp`` uses the RDP bound; one that accounts with ``pld`` uses ``min(RDP, PLD)`` — the
minimum of two upper bounds is an upper bound, and in the regimes DP-SGD runs in it is the PLD
value (RDP is looser: 2.20 vs 2.05 for the 51 jobs of ``bench/dataset_admission.py``).

Tiered admission. Composing a PLD costs an FFT convolution per job and building each job's
one-step PLD tens of milliseconds (pure Python in dp-accounting): seconds for 50 jobs when
nothing is cached, as after an operator restart. :func:`admit` therefore asks the cheaper upper
bounds first, each admitting only when it fits:

1. a *quick* RDP bound over the orders :data:`QUICK_ORDERS`, a subset of dp-accounting's (RDP's
   ε is a minimum over orders, so over fewer of them it is ≥ the full RDP bound ≥
   :func:`composed_epsilon`): milliseconds, no PLD;
2. (``pld``) the PLD that :func:`composed_epsilon` composes, before the 156-order RDP bound:
   :func:`composed_epsilon` is the minimum of the two, so if the PLD fits, it fits;
3. otherwise :func:`composed_epsilon` itself decides (the full RDP may fit where PLD does not).

Not used, on purpose: a pessimistic PLD on a coarser grid as a cheaper tier. It is an upper
bound on the true ε, and in exact arithmetic connect-the-dots on a grid whose nodes are fine
nodes lies above the fine one; but dp-accounting's curves carry numerical errors that the
composition amplifies (q = 0.01, σ = 1: one step's δ(−2) is 1e-9 lower on the 1e-3 grid than on
the 1e-4 one, 3.5e-7 lower after 300 steps; at ε ≥ 0 the coarse δ falls below the fine one
where δ is near the truncated mass), so no bound proves it never admits what the fine grid
refuses.

Truncated Poisson sampling is accounted as for one job (``dptrain.privacy._mechanism``, Chua et
al. 2024): the composition is computed at δ₀ = (1 − ρ)·δ and certified only if
e^ε·Σ_j η_j ≤ ρ·δ, where η_j is the probability that any of job j's batches overflowed (a union
bound over all batches of all jobs).

Formal guarantees (checked in ``tests/test_operator_dataset_budget.py``):
    1. :func:`composed_epsilon` is an upper bound on the ε of the composition of its events at δ
       (RDP conversion; for ``pld`` the minimum of that and the PLD pessimistic bound), equal to
       the single-job ε for one event (whenever PLD is the tighter bound, for ``pld``), and never
       larger than the sum of the jobs' ε bounds it would replace (up to PLD rounding).
    2. :func:`admit` admits a job only if the composition of every committed charge (actual
       steps of ended jobs; max(reserved, charged) of the others) plus the new job's reservation
       is ≤ the budget: its decision is :func:`composed_epsilon`'s, or more conservative only
       where that would refuse — never more permissive. Each tier admits only when an upper
       bound never below :func:`composed_epsilon` fits (quick RDP; the PLD, of which
       :func:`composed_epsilon` is the minimum with RDP), and what neither admits is decided
       on :func:`composed_epsilon` itself. Called with the charges
       read under one lock, two admissions can never both use the same remaining budget.
    3. A charge that ran (``steps_charged`` > 0) is never removed: :func:`release` only turns a
       reservation into its actual steps (``Charged``), and drops a charge that never ran.
    4. With :func:`persist_under` (the operator's ``--cache-dir``), a job's PLD read back from disk
       is the array dp-accounting built for the same key (mechanism, steps, δ, grid,
       dp-accounting version; checked on load, written atomically, no pickle), so admissions
       after a restart take the same decisions with the same ε; an unreadable or foreign file is
       rebuilt.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import tempfile
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dptrain.api import DatasetCharge, DPDatasetSpec, DPTrainingJobSpec, PlanStatus
from dptrain.privacy import TRUNCATION_DELTA_SHARE, DpSgdMechanism
from dptrain.privacy._mechanism import (
    DEFAULT_VALUE_DISCRETIZATION,
    PLD_EPSILON_CEILING,
    _rdp_one_step,
    base_pld,
)

Group = tuple[float, float, int | None, int | None]  # (q, σ, N, physical batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Admission:
    """The answer to "may this job start on the dataset?".

    Attributes:
        fits: the composition stays within the budget.
        composed: ε of every committed charge plus the candidate's reservation.
        remaining: the budget minus the composition of the committed charges (before it).
        budget: the dataset's ε budget.
    """

    fits: bool
    composed: float
    remaining: float
    budget: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """A dataset's ε: spent (actual steps), reserved (admitted, not yet run), remaining."""

    spent: float
    reserved: float
    remaining: float
    committed: float


def _mechanism(group: Group, delta: float, accountant: str,
               interval: float = DEFAULT_VALUE_DISCRETIZATION) -> DpSgdMechanism:
    q, sigma, n, batch = group
    return DpSgdMechanism(sampling_rate=q, noise_multiplier=sigma, delta=delta,
                          accountant=accountant,  # type: ignore[arg-type]
                          dataset_size=n, physical_batch_size=batch,
                          value_discretization_interval=interval)


Events = tuple[tuple[Group, int], ...]


def _events(events: Iterable[tuple[Group, int]]) -> Events:
    return tuple(sorted((g, n) for g, n in events if n > 0))


def _rdp_epsilon(events: Events, delta: float) -> float:
    orders: tuple[float, ...] = ()
    total: list[float] | None = None
    for group, steps in events:
        orders, rdp = _rdp_one_step(_mechanism(group, delta, "rdp"))
        scaled = [steps * r for r in rdp]
        total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
    assert total is not None
    eps, _ = rdp_lib.compute_epsilon(orders, total, delta)
    return float(eps)


# Composed PLDs by their (sorted) events. An admission composes the cached PLD of the charges
# already committed (computed when the dataset's status was last summarised) with the new job's:
# one convolution instead of one per job.
# Keyed by (events, δ, value discretisation interval).
PldKey = tuple[Events, float, float]
_PLDS: collections.OrderedDict[PldKey, pld_lib.PrivacyLossDistribution] = (
    collections.OrderedDict())
_PLD_CACHE_SIZE = 64
_PLD_LOCK = threading.Lock()
# Single flight: a composition being built by one thread (say the dataset's status summary right
# after an operator restart) is awaited by another that needs the same one (the first admission),
# instead of being built twice on the same cores.
_BUILDING: dict[PldKey, threading.Event] = {}


def _pld(events: Events, delta: float,
         interval: float = DEFAULT_VALUE_DISCRETIZATION) -> pld_lib.PrivacyLossDistribution:
    key = (events, delta, interval)
    while True:
        with _PLD_LOCK:
            if key in _PLDS:
                _PLDS.move_to_end(key)
                return _PLDS[key]
            building = _BUILDING.get(key)
            if building is None:
                _BUILDING[key] = threading.Event()
                break
        building.wait()  # then read the cache (or build it, if that thread failed)
    try:
        pld: pld_lib.PrivacyLossDistribution | None = None
        for group, steps in events:
            one = _job_pld(group, steps, delta, interval)
            pld = one if pld is None else pld.compose(one)
        assert pld is not None
        _remember(key, pld)
        return pld
    finally:
        with _PLD_LOCK:
            _BUILDING.pop(key).set()


_DISK: pathlib.Path | None = None


def persist_under(cache_dir: str | os.PathLike[str] | None) -> None:
    """Keep each job's T-step PLD under ``<cache_dir>/dataset-pld/`` (None: memory only).

    Building a job's one-step PLD and self-composing it is most of a cold admission's cost; a
    charged job's PLD was built when it was admitted, so after an operator restart it is read
    back (exactly the arrays dp-accounting produced: the same ε, the same decisions) instead of
    rebuilt. Files hold no private data: only a mechanism's public parameters and their PLD.
    """
    global _DISK
    _DISK = pathlib.Path(cache_dir) / "dataset-pld" if cache_dir is not None else None


def _disk_key(group: Group, steps: int, delta: float, interval: float) -> str:
    return repr((group, steps, delta, interval, importlib.metadata.version("dp-accounting"),
                 "pessimistic", "add-or-remove"))


def _job_pld(group: Group, steps: int, delta: float,
             interval: float) -> pld_lib.PrivacyLossDistribution:
    """``steps`` steps of one job's mechanism: from the disk cache, else built (and stored)."""
    folder = _DISK
    key = _disk_key(group, steps, delta, interval)
    path = None
    if folder is not None:
        path = folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")
        loaded = _load(path, key)
        if loaded is not None:
            return loaded
    pld = base_pld(_mechanism(group, delta, "pld", interval)).self_compose(steps)
    if path is not None:
        _store(path, key, pld)
    return pld


_PMF_FIELDS = ("discretization", "lower_loss", "probs", "infinity_mass")


def _load(path: pathlib.Path, key: str) -> pld_lib.PrivacyLossDistribution | None:
    """The stored PLD, or None (absent, unreadable, or another key's): then it is rebuilt."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            pmfs = [pld_pmf.DensePLDPmf(float(stored[f"{side}_discretization"]),
                                        int(stored[f"{side}_lower_loss"]),
                                        np.array(stored[f"{side}_probs"]),
                                        float(stored[f"{side}_infinity_mass"]), True)
                    for side in ("remove", "add") if f"{side}_probs" in stored]
    except (OSError, ValueError, KeyError):
        return None
    return pld_lib.PrivacyLossDistribution(pmfs[0], pmfs[1] if len(pmfs) > 1 else None)


def _store(path: pathlib.Path, key: str, pld: pld_lib.PrivacyLossDistribution) -> None:
    """Write atomically (a reader never sees half a file); only dense PMFs (stored exactly)."""
    sides = {"remove": pld._pmf_remove}
    if not pld._symmetric:
        sides["add"] = pld._pmf_add
    arrays: dict[str, object] = {"key": np.array(key)}
    for side, pmf in sides.items():
        if not isinstance(pmf, pld_pmf.DensePLDPmf):
            return  # small (sparse) PLDs are cheap to rebuild
        arrays.update({f"{side}_discretization": pmf._discretization,
                       f"{side}_lower_loss": pmf._lower_loss, f"{side}_probs": pmf._probs,
                       f"{side}_infinity_mass": pmf._infinity_mass})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp.name, path)
    except OSError:
        return  # a cache: failing to write only costs the next restart a rebuild


def _remember(key: PldKey, pld: pld_lib.PrivacyLossDistribution) -> None:
    with _PLD_LOCK:
        _PLDS[key] = pld
        while len(_PLDS) > _PLD_CACHE_SIZE:
            _PLDS.popitem(last=False)


def _certify(eps: float, events: Events, delta: float) -> float:
    """ε if the truncation term fits the δ share reserved for it, else +inf."""
    eta = sum(_mechanism(g, delta, "rdp").overflow_probability(n) for g, n in events)
    if eta > 0.0 and (eps > 700 or math.exp(eps) * eta > TRUNCATION_DELTA_SHARE * delta):
        return math.inf
    return eps


def _delta0(events: Events, delta: float) -> float:
    truncating = any(_mechanism(g, delta, "rdp").can_truncate for g, _ in events)
    return delta * (1.0 - TRUNCATION_DELTA_SHARE) if truncating else delta


# The orders of the quick check: a subset of dp-accounting's default orders (the ones the full
# RDP bound minimises over). RDP's ε is a minimum over orders, so over fewer of them it is at
# least as large: an upper bound never below :func:`composed_epsilon`, at a fraction of the cost
# (the 156 default orders, integer ones up to 1024, cost ~15-60 ms per mechanism). These cover
# the optimal order of budgets from about ε 0.3 to 100 at δ down to 1e-12; outside that the quick
# check merely declines and the full composition decides.
_WANTED_ORDERS = (1.2, 1.5, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0,
                  9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 16.0, 18.0, 20.0, 24.0, 28.0, 32.0, 40.0,
                  48.0, 63.0, 128.0)
DEFAULT_ORDERS: tuple[float, ...] = tuple(float(o) for o in rdp_lib.RdpAccountant()._orders)
QUICK_ORDERS: tuple[float, ...] = tuple(
    o for o in DEFAULT_ORDERS if any(math.isclose(o, w) for w in _WANTED_ORDERS))


@functools.lru_cache(maxsize=1024)
def _quick_rdp_one_step(group: Group) -> tuple[float, ...]:
    accountant = rdp_lib.RdpAccountant(orders=QUICK_ORDERS)
    accountant.compose(_mechanism(group, 1e-6, "rdp").step_event)  # RDP does not depend on δ
    return tuple(float(r) for r in accountant._rdp)


def _quick_rdp_raw(events: Events, delta: float) -> float:
    """RDP ε of ``events`` over :data:`QUICK_ORDERS` at δ₀ (≥ the full RDP ε), uncertified."""
    total = [0.0] * len(QUICK_ORDERS)
    for group, steps in events:
        total = [t + steps * r for t, r in zip(total, _quick_rdp_one_step(group), strict=True)]
    eps, _ = rdp_lib.compute_epsilon(QUICK_ORDERS, total, _delta0(events, delta))
    return float(eps)


def _rdp_bound(events: Events, delta: float) -> float:
    """A certified RDP bound of ``events`` over :data:`QUICK_ORDERS` (≥ the full RDP bound)."""
    if not events:
        return 0.0
    return _certify(_quick_rdp_raw(events, delta), events, delta)


def _composed_pld(events: Events, delta: float, base: Events | None = None,
                  interval: float = DEFAULT_VALUE_DISCRETIZATION,
                  ) -> pld_lib.PrivacyLossDistribution:
    """The PLD of ``events`` on the grid ``interval``.

    With ``base`` (a subset whose PLD may be cached), the cached PLD of ``base`` composed with
    the PLD of the remaining events.
    """
    if not base:
        return _pld(events, delta, interval)
    rest = list(events)
    for item in base:
        rest.remove(item)
    pld = _pld(base, delta, interval)
    if rest:
        pld = pld.compose(_pld(tuple(rest), delta, interval))
        _remember((events, delta, interval), pld)
    return pld


def _pld_bound(events: Events, delta: float, base: Events | None = None,
               interval: float = DEFAULT_VALUE_DISCRETIZATION) -> float:
    """The certified PLD ε of ``events`` on the grid ``interval``, at δ₀."""
    if not events:
        return 0.0
    pld = _composed_pld(events, delta, base, interval)
    at = _delta0(events, delta)
    return _certify(float(pld.get_epsilon_for_delta(at)), events, delta)


def _composed(events: Events, delta: float, accountant: str,
              base: Events | None = None) -> float:
    """ε of ``events``: the RDP bound, and for ``pld`` the minimum of it and the PLD bound.

    With ``base`` (a subset whose PLD may be cached), PLD composes the cached PLD of ``base``
    with the PLD of the remaining events.
    """
    if not events:
        return 0.0
    rdp_raw = _rdp_epsilon(events, _delta0(events, delta))
    rdp_bound = _certify(rdp_raw, events, delta)
    if accountant == "rdp" or rdp_raw > PLD_EPSILON_CEILING:
        return rdp_bound  # RDP asked for, or no budget is met anyway
    # Both are upper bounds on the true ε, so is their minimum (PLD, but for odd regimes).
    return min(rdp_bound, _pld_bound(events, delta, base))


def _group_of(charge: DatasetCharge) -> Group:
    return (charge.sampling_rate, charge.noise_multiplier, charge.dataset_size,
            charge.physical_batch_size)


def composed_epsilon(events: Iterable[tuple[Group, int]], delta: float,
                     accountant: str) -> float:
    """ε of the composition of ``(mechanism, steps)`` events at ``delta`` (see the guarantees).

    PLD compositions are cached by their events, so summarising a dataset and then admitting a
    job on it costs one convolution for the admission.
    """
    return _composed(_events(events), delta, accountant)


def committed_steps(charge: DatasetCharge) -> int:
    """Steps a charge holds: actual steps once final, else its reservation (or more, if run)."""
    if charge.state == "Charged":
        return charge.steps_charged
    return max(charge.reserved_steps, charge.steps_charged)


def summarize(spec: DPDatasetSpec, charges: Sequence[DatasetCharge]) -> Summary:
    """ε spent, reserved and remaining of a dataset with these charges."""
    privacy = spec.privacy
    spent = composed_epsilon(((_group_of(c), c.steps_charged) for c in charges),
                             privacy.delta, privacy.accountant)
    committed = composed_epsilon(((_group_of(c), committed_steps(c)) for c in charges),
                                 privacy.delta, privacy.accountant)
    return Summary(spent=spent, reserved=max(0.0, committed - spent),
                   remaining=privacy.epsilon - committed, committed=committed)


def charge_for(job: str, uid: str, plan: PlanStatus) -> DatasetCharge:
    """A new reservation of ``plan.max_steps`` steps of the plan's mechanism."""
    return DatasetCharge(job=job, uid=uid, sampling_rate=plan.sampling_rate,
                         noise_multiplier=plan.noise_multiplier,
                         physical_batch_size=plan.physical_batch_size,
                         dataset_size=plan.dataset_size, reserved_steps=plan.max_steps)


def admit(spec: DPDatasetSpec, charges: Sequence[DatasetCharge],
          candidate: DatasetCharge) -> Admission:
    """Whether ``candidate`` fits next to every other committed charge (see the guarantees).

    Tiered, cheapest first; each tier admits only when its upper bound fits, and the last one
    is :func:`composed_epsilon`'s own decision:

    1. the quick RDP bound (no PLD, milliseconds);
    2. for ``pld`` datasets, the PLD (what :func:`composed_epsilon` composes) — it fits, so
       their minimum fits — before the 156-order RDP is computed;
    3. otherwise :func:`composed_epsilon` itself (the full RDP may still fit, in odd regimes).

    ``composed`` and ``remaining`` are reported with the tier that decided (upper bounds on ε,
    so ``remaining`` is never overstated).
    """
    privacy = spec.privacy
    others = _events((_group_of(c), committed_steps(c)) for c in charges
                     if c.uid != candidate.uid)
    own = next((c for c in charges if c.uid == candidate.uid), None)
    steps = max(committed_steps(candidate), own.steps_charged if own is not None else 0)
    events = _events([*others, (_group_of(candidate), steps)])

    def answer(fits: bool, composed: float, before: float) -> Admission:
        return Admission(fits=fits, composed=composed, remaining=privacy.epsilon - before,
                         budget=privacy.epsilon)

    quick_raw = _quick_rdp_raw(events, privacy.delta)
    quick = _certify(quick_raw, events, privacy.delta)  # no PLD, no 156-order RDP: milliseconds
    if quick <= privacy.epsilon:
        return answer(True, quick, _rdp_bound(others, privacy.delta))
    # The full RDP is ≤ the quick one ≤ the ceiling: composed_epsilon would compose the PLD too.
    if privacy.accountant == "pld" and quick_raw <= PLD_EPSILON_CEILING:
        composed = _pld_bound(events, privacy.delta, others)
        if composed <= privacy.epsilon:
            return answer(True, composed, _pld_bound(others, privacy.delta))
    before = _composed(others, privacy.delta, privacy.accountant)
    composed = _composed(events, privacy.delta, privacy.accountant, base=others)
    return answer(composed <= privacy.epsilon, composed, before)


def needs_admission(charges: Sequence[DatasetCharge], uid: str, plan: PlanStatus) -> bool:
    """True unless the job already holds a reservation covering its plan's maximum."""
    own = next((c for c in charges if c.uid == uid), None)
    return (own is None or own.state == "Charged" or own.reserved_steps < plan.max_steps
            or _group_of(own) != _group_of(charge_for("", uid, plan)))


def with_charge(charges: Sequence[DatasetCharge], charge: DatasetCharge) -> list[DatasetCharge]:
    """The charges with ``charge`` added, or replacing the job's entry (steps never lowered)."""
    out: list[DatasetCharge] = []
    for c in charges:
        if c.uid == charge.uid:
            charge = charge.model_copy(update={
                "steps_charged": max(charge.steps_charged, c.steps_charged)})
        else:
            out.append(c)
    return [*out, charge]


def update_steps(charges: Sequence[DatasetCharge], uid: str, steps_charged: int,
                 final: bool) -> list[DatasetCharge]:
    """Record a job's ledger count (never lowered); ``final``: the job ended (release the rest)."""
    out: list[DatasetCharge] = []
    for c in charges:
        if c.uid == uid:
            steps = max(c.steps_charged, steps_charged)
            state = "Charged" if final or c.state == "Charged" else (
                "Running" if steps > 0 else c.state)
            c = c.model_copy(update={"steps_charged": steps, "state": state})
        out.append(c)
    return out


def release(charges: Sequence[DatasetCharge], uid: str) -> list[DatasetCharge]:
    """A job is gone: a charge that ran becomes final at its actual steps.

    A charge that ran is never removed; a reservation that never ran is dropped (its budget is
    free again).
    """
    out: list[DatasetCharge] = []
    for c in charges:
        if c.uid == uid:
            if c.steps_charged == 0:
                continue
            c = c.model_copy(update={"state": "Charged"})
        out.append(c)
    return out


def data_mismatch(job: DPTrainingJobSpec, dataset: DPDatasetSpec,
                  checksum: str | None) -> str | None:
    """Why a job's data is not its dataset's (None: it is)."""
    if dataset.data is not None:
        mine = job.data.model_dump(mode="json", by_alias=True, exclude_none=True)
        theirs = dataset.data.model_dump(mode="json", by_alias=True, exclude_none=True)
        mine.pop("datasetRef", None)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differing:
            return ", ".join(f"spec.data.{k}" for k in differing) + " differ from the dataset's"
    elif checksum is not None and checksum != dataset.checksum:
        return (f"the data's checksum {checksum} is not the dataset's "
                f"({dataset.checksum})")
    return None

"""The paper's published results, for budgets that no measured table reaches (McKenna et al. 2025).

Table 2 of the paper lists, per dataset size N and ε (δ = 1e-8, S = 512), the compute C_sat beyond
which more compute no longer lowers the predicted loss, and the optimal model size M, batch B and
iterations T there. :func:`paper_optimum` turns those rows into an anchor for any (N, ε, C, S):

* **Across (N, ε)**: inverse-distance weighting (power 4) of log M, log B, log T and log C_sat over
  the rows, in coordinates (log10 N, log2 ε / 2); at a row's own (N, ε) it returns that row.
* **Compute above C_sat**: the saturating configuration (more compute buys nothing, says the
  paper); the plan then uses less than the budget and says so.
* **Compute below C_sat**: M, B and T each shrink by (C / C_sat)^(1/3) (an assumption: the paper
  gives the optimum only at saturation; its finding that DP optima shift to *smaller models with
  larger batches* is kept by never shrinking B below M's share). Tokens per parameter stay
  within the paper's 1e2–1e5 band.
* **Sequence length**: M, B (sequences) and T are kept; C_sat scales with S / 512.
* **δ**: ignored (the rows are at δ = 1e-8; the paper's optima barely move with δ).

The paper's models are BERT on its own data: its CE values are not predictions for this project's
models, so a paper-anchored plan carries no predicted loss of its own (see ``paper_ce``).

:func:`noise_regime` classifies a noise-batch ratio σ̄ against the paper's findings (every Table 2
optimum has σ̄ in [2^-23, 2^-6]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# (N, ε, C_sat, CE, M, T, B) — the reference's transcription of Table 2 (δ = 1e-8, S = 512).
TABLE2: tuple[tuple[float, float, float, float, float, float, float], ...] = (
    (1e5, 1, 1.3e16, 7.28, 4.6e6, 1.8e3, 5.1e2),
    (1e5, 4, 1.1e17, 6.65, 4.6e6, 1.8e3, 4.1e3),
    (1e5, 64, 7.5e18, 4.63, 2.0e7, 6.3e3, 1.9e4),
    (1e6, 1, 2.8e17, 5.89, 4.6e6, 2.5e3, 8.2e3),
    (1e6, 16, 3.3e19, 3.61, 1.7e7, 1.4e4, 4.6e4),
    (1e6, 64, 3.2e20, 2.82, 4.9e7, 1.2e4, 1.9e5),
    (1e7, 1, 3.8e19, 3.73, 1.7e7, 9.6e3, 7.8e4),
    (1e7, 64, 4.4e22, 1.66, 3.3e8, 4.9e4, 8.8e5),
    (1e8, 4, 4.4e22, 1.66, 3.3e8, 4.9e4, 8.8e5),
    (1e8, 16, 1.0e23, 1.32, 3.3e8, 9.3e4, 1.0e6),
    (1e8, 64, 1.0e23, 1.23, 3.3e8, 1.1e5, 8.8e5),
    (1e9, 1, 8.5e22, 1.36, 3.3e8, 9.4e4, 8.8e5),
    (1e9, 16, 1.0e23, 1.22, 3.3e8, 1.1e5, 8.8e5),
    (1e9, 64, 1.2e23, 1.20, 3.3e8, 1.1e5, 1.1e6),
)
PAPER_SEQ_LEN = 512
PAPER_DELTA = 1e-8
IDW_POWER = 4.0
COMPUTE_EXPONENT = 1.0 / 3.0
"""Below saturation, M, B and T each scale as (C / C_sat)^(1/3) (an assumption, see above)."""
N_RANGE = (1e5 / 3, 1e9 * 3)
EPSILON_RANGE = (0.5, 128.0)
MIN_COMPUTE_FRACTION = 1e-3
"""The anchor is trusted down to this fraction of C_sat (three decades of the 1/3 scaling)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperAnchor:
    """The configuration the paper's results imply for one budget.

    Attributes:
        model_params: M.
        batch_size: B (sequences).
        iterations: T.
        saturating_compute: C_sat at this (N, ε, S) in FLOPs.
        compute: the compute the anchor uses (≤ the budget; C_sat if the budget is larger).
        paper_ce: the paper's cross-entropy at the nearest row (BERT on its data: a trend only).
        in_domain: (N, ε, C) lie where the rows support an anchor (see the module constants).
        note: how the anchor was obtained, for plan output.
    """

    model_params: float
    batch_size: float
    iterations: float
    saturating_compute: float
    compute: float
    paper_ce: float
    in_domain: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def _coords(n: float, eps: float) -> tuple[float, float]:
    return math.log10(n), math.log2(eps) / 2.0


def paper_optimum(dataset_size: float, epsilon: float, compute: float | None,
                  seq_len: int = PAPER_SEQ_LEN) -> PaperAnchor:
    """The paper-implied optimum for (N, ε, C, S); see the module docstring."""
    x, y = _coords(dataset_size, epsilon)
    weights, values = [], []
    exact = None
    for n, eps, c_sat, ce, m, t, b in TABLE2:
        rx, ry = _coords(n, eps)
        d = math.hypot(x - rx, y - ry)
        logs = (math.log(m), math.log(b), math.log(t), math.log(c_sat), ce)
        if d < 1e-9:
            exact = logs
            break
        weights.append(d ** -IDW_POWER)
        values.append(logs)
    if exact is None:
        total = sum(weights)
        exact = tuple(sum(w * v[i] for w, v in zip(weights, values, strict=True)) / total
                      for i in range(5))
    log_m, log_b, log_t, log_c, ce = exact
    c_sat = math.exp(log_c) * seq_len / PAPER_SEQ_LEN
    m, b, t = math.exp(log_m), math.exp(log_b), math.exp(log_t)
    used = c_sat if compute is None else min(compute, c_sat)
    scale = (used / c_sat) ** COMPUTE_EXPONENT
    m, b, t = m * scale, min(b * scale, float(dataset_size)), t * scale
    in_domain = (N_RANGE[0] <= dataset_size <= N_RANGE[1]
                 and EPSILON_RANGE[0] <= epsilon <= EPSILON_RANGE[1]
                 and used >= MIN_COMPUTE_FRACTION * c_sat)
    how = ("saturating compute" if used >= c_sat * (1 - 1e-9)
           else f"{used / c_sat:.2g} of the saturating compute, M, B, T × {scale:.2g}")
    note = (f"McKenna et al. 2025, Table 2 interpolated at N = {dataset_size:.3g}, ε = {epsilon:g} "
            f"(C_sat = {c_sat:.3g} FLOPs at S = {seq_len}; {how})")
    return PaperAnchor(model_params=m, batch_size=b, iterations=t, saturating_compute=c_sat,
                       compute=used, paper_ce=float(ce), in_domain=in_domain, note=note)


REGIMES = (
    (2.0**-4, "noise-dominated",
     "σ̄ ≥ 2^-4: far noisier than any optimum in the paper (all lie in [2^-23, 2^-6]); the noise "
     "swamps the gradient. Raise the batch (the noise on the mean falls as 1/B), raise ε, or "
     "train a smaller model for fewer steps."),
    (2.0**-6, "high-noise",
     "2^-6 ≤ σ̄ < 2^-4: noisier than the paper's optima; a larger batch with fewer steps usually "
     "helps more than more steps."),
    (2.0**-23, "compute-efficient",
     "2^-23 ≤ σ̄ < 2^-6: the paper's optimal region. With DP, train a much smaller model with a "
     "much larger batch than without (tokens per parameter 1e3–1e5 for ε in [1, 10])."),
    (0.0, "near-non-private",
     "σ̄ < 2^-23: the noise barely matters; the budget behaves like a non-private one, so a "
     "larger model or more steps helps more than a larger batch."),
)


def noise_regime(noise_batch_ratio: float) -> tuple[str, str]:
    """(regime name, the paper's guidance) for a noise-batch ratio σ̄."""
    for lower, name, guidance in REGIMES:
        if noise_batch_ratio >= lower:
            return name, guidance
    return REGIMES[-1][1], REGIMES[-1][2]

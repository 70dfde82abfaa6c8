"""Pod sizing: from a plan's model and batch to chips, hosts, microbatches and pod resources.

The trainer is data-parallel: every chip holds the parameters, the optimiser state and the sum
of clipped gradients (or a 1/chips shard of them, ZeRO-3 style, when a replica does not fit),
and computes per-example gradients of one microbatch at a time (``vmap(grad)``), accumulating
``accumulation_steps`` microbatches into the physical batch. Memory per chip is therefore

    state (params 4·M + optimiser 8·M for AdamW + gradient sum 4·M bytes, fp32)
    + per-example gradients 4·M·microbatch
    + activations of one microbatch (Korthikanti et al. 2022, s·b·h·(34 + 5·a·s/h) bytes per
      layer in 16-bit, doubled for fp32) + logits 2·4·b·s·V.

Wall time is T·B_phys·S·(train FLOPs per token) / (chips·peak·utilisation): padded rows cost
compute too, and the per-example clipping overhead is absorbed into the utilisation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dptrain.planner._accelerators import GIB, AcceleratorSpec, Slice
from dptrain.planner._errors import InfeasibleBudgetError
from dptrain.planner._presets import ModelShape
from dptrain.planner._step_time import StepTimeModel, step_time_model

MEMORY_HEADROOM = 0.85
"""Share of a chip's memory the estimate may fill (XLA workspace, fragmentation)."""

DEFAULT_TARGET_WALL_SECONDS = 24 * 3600.0
"""Without a deadline, the smallest slice that finishes within a day is chosen."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes one chip needs.

    Attributes:
        state: parameters, optimiser state and gradient sum (after sharding).
        per_example_grads: per-example gradients of one microbatch.
        activations: activations and logits of one microbatch.
        sharded_state: whether the state is sharded over the chips.
    """

    state: int
    per_example_grads: int
    activations: int
    sharded_state: bool = False

    @property
    def total(self) -> int:
        """All bytes per chip."""
        return self.state + self.per_example_grads + self.activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodPlan:
    """Hardware for one job: the slice, the batch layout, pod resources and a time estimate.

    Attributes:
        accelerator: the ``spec.compute.accelerator`` name.
        hosts: pods (JAX processes).
        chips_per_host: accelerators per pod (0 on CPU, where ``cpu`` requests cores).
        topology: TPU topology, if any.
        microbatch_size: examples per chip per accumulation step.
        accumulation_steps: microbatches per step on each chip.
        physical_batch_size: rows per step over all chips (≥ the plan's truncation-safe batch).
        memory: the per-chip estimate.
        resources: the container's ``resources`` (requests and limits).
        node_selector: the pod's nodeSelector.
        tolerations: the pod's tolerations.
        utilization: the model-FLOP utilisation the step-time model predicts at this batch
            (per-step overhead included).
        est_wall_seconds: estimated training time.
        accelerator_hours: chips × estimated hours.
        host_memory_required: host memory (bytes) the pod cannot do with less of (state copies
            for checkpoints and transfers; on CPU the whole estimate); ``resources`` may ask
            more, and the operator may lower the request to this to fit a node.
    """

    accelerator: str
    hosts: int
    chips_per_host: int
    topology: str | None
    microbatch_size: int
    accumulation_steps: int
    physical_batch_size: int
    memory: MemoryEstimate
    resources: dict[str, dict[str, str]]
    node_selector: dict[str, str]
    tolerations: tuple[dict[str, str], ...]
    utilization: float
    est_wall_seconds: float
    accelerator_hours: float
    host_memory_required: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out["tolerations"] = [dict(t) for t in self.tolerations]
        out["memory"]["total"] = self.memory.total
        return out


def state_bytes(shape: ModelShape, optimizer: str) -> int:
    """Parameters, optimiser moments and the gradient sum, fp32."""
    moments = 8 if optimizer == "adamw" else 0
    return (4 + moments + 4) * shape.param_count


def activation_bytes(shape: ModelShape, seq_len: int, microbatch: int) -> int:
    """Activations and logits of one microbatch kept for the backward pass (fp32)."""
    h, a, s = shape.d_model, shape.n_heads, seq_len
    per_layer = s * microbatch * h * (34 + 5 * a * s / h) * 2  # ×2: fp32, not 16-bit
    logits = 2 * 4 * microbatch * s * shape.vocab_size
    return int(shape.n_layers * per_layer + logits)


def memory_estimate(shape: ModelShape, *, seq_len: int, microbatch: int, optimizer: str,
                    chips: int = 1, shard_state: bool = False) -> MemoryEstimate:
    """Per-chip memory of one microbatch's step."""
    state = state_bytes(shape, optimizer)
    if shard_state:
        state = math.ceil(state / chips)
    return MemoryEstimate(state=state, per_example_grads=4 * shape.param_count * microbatch,
                          activations=activation_bytes(shape, seq_len, microbatch),
                          sharded_state=shard_state)


def step_flops(shape: ModelShape, *, seq_len: int, physical_batch: int) -> float:
    """FLOPs of one training step over the physical batch (padding included)."""
    return shape.train_flops_per_token(seq_len) * seq_len * physical_batch


def _fit_microbatch(shape: ModelShape, accelerator: AcceleratorSpec, *, seq_len: int,
                    per_chip: int, optimizer: str, chips: int,
                    pinned: int | None) -> tuple[int, MemoryEstimate] | None:
    usable = MEMORY_HEADROOM * accelerator.memory_bytes
    for shard in (False, True) if chips > 1 else (False,):
        if pinned is not None:
            est = memory_estimate(shape, seq_len=seq_len, microbatch=pinned, optimizer=optimizer,
                                  chips=chips, shard_state=shard)
            if est.total <= usable:
                return pinned, est
            continue
        mb = 1 << max(0, per_chip.bit_length() - 1)  # largest power of two ≤ per_chip
        while mb >= 1:
            est = memory_estimate(shape, seq_len=seq_len, microbatch=mb, optimizer=optimizer,
                                  chips=chips, shard_state=shard)
            if est.total <= usable:
                return mb, est
            mb //= 2
    return None


def size_pod(shape: ModelShape, accelerator: AcceleratorSpec, slices: list[Slice], *,
             seq_len: int, iterations: int, physical_batch: int, optimizer: str = "adamw",
             microbatch_size: int | None = None, physical_pinned: bool = False,
             utilization: float | None = None,
             target_wall_seconds: float | None = None,
             step_time: StepTimeModel | None = None) -> PodPlan:
    """Choose the smallest slice that fits memory and finishes within the target time.

    Args:
        shape: the model.
        accelerator: the accelerator kind.
        slices: the allowed slices, smallest first (from ``candidate_slices``).
        seq_len: tokens per sequence.
        iterations: training steps.
        physical_batch: the truncation-safe physical batch; rounded up to fill every chip's
            microbatches evenly unless ``physical_pinned``.
        optimizer: ``adamw`` or ``sgd`` (optimiser state size).
        microbatch_size: pinned microbatch per chip, if any.
        physical_pinned: keep ``physical_batch`` exactly (the user pinned it).
        utilization: peak model-FLOP utilisation (default: the step-time model's, else the
            accelerator's).
        target_wall_seconds: wall-time goal (a deadline); default one day. When no slice meets
            a default goal, the fastest is used; a deadline that cannot be met is an error.
        step_time: per-step overhead and utilisation by batch (default: the accelerator
            kind's :class:`StepTimeModel`); wall time is ``iterations`` × its step time.

    Raises:
        InfeasibleBudgetError: ``memory`` if no slice fits one example, ``deadline`` if a
            deadline cannot be met.
    """
    timing = step_time or step_time_model(accelerator.kind)
    util = (utilization if utilization is not None else timing.peak_utilization
            if timing.peak_utilization is not None else accelerator.default_utilization)
    deadline = target_wall_seconds is not None
    target = (target_wall_seconds if target_wall_seconds is not None
              else DEFAULT_TARGET_WALL_SECONDS)
    best: PodPlan | None = None
    for sl in slices:
        # JAX sees one CPU device per process: on CPU the data-parallel width is the host count
        # (cores only make each host faster).
        devices = sl.hosts if accelerator.kind == "cpu" else sl.chips
        chips = devices
        if chips > physical_batch and best is not None:
            break  # more chips than rows: idle chips
        per_chip = max(1, math.ceil(physical_batch / chips))
        fit = _fit_microbatch(shape, accelerator, seq_len=seq_len, per_chip=per_chip,
                              optimizer=optimizer, chips=chips, pinned=microbatch_size)
        if fit is None:
            continue
        mb, est = fit
        accumulation = math.ceil(per_chip / mb)
        if microbatch_size is None:
            # Spread the rows evenly over the accumulation steps: the fewest padding rows.
            mb = math.ceil(per_chip / accumulation)
            est = memory_estimate(shape, seq_len=seq_len, microbatch=mb, optimizer=optimizer,
                                  chips=chips, shard_state=est.sharded_state)
        physical = physical_batch if physical_pinned else chips * mb * accumulation
        per_step = step_flops(shape, seq_len=seq_len, physical_batch=physical)
        tokens = physical / chips * seq_len
        wall = iterations * float(timing.step_seconds(
            per_step, tokens, devices=sl.chips, peak_flops_per_device=accelerator.peak_flops,
            peak_utilization=util))
        achieved = per_step * iterations / (wall * sl.chips * accelerator.peak_flops)
        best = _pod(accelerator, sl, mb, accumulation, physical, est, achieved, wall)
        if wall <= target:
            return best
    if best is None:
        need = memory_estimate(shape, seq_len=seq_len, microbatch=microbatch_size or 1,
                               optimizer=optimizer, chips=slices[-1].chips if slices else 1,
                               shard_state=True).total
        raise InfeasibleBudgetError(
            "memory", f"{shape.name} ({shape.param_count:.3g} parameters) needs about "
            f"{need / GIB:.1f} GiB per {accelerator.name} chip even sharded over the largest "
            f"allowed slice; {MEMORY_HEADROOM * accelerator.memory_bytes / GIB:.1f} GiB usable",
            field="spec.compute.accelerator", required=need,
            available=MEMORY_HEADROOM * accelerator.memory_bytes)
    if deadline:
        raise InfeasibleBudgetError(
            "deadline", f"the fastest allowed slice needs about {best.est_wall_seconds / 3600:.3g} "
            f"h, {(best.est_wall_seconds - target) / 3600:.3g} h more than the deadline allows",
            field="spec.compute.deadline", required=best.est_wall_seconds, available=target)
    return best


def _pod(accelerator: AcceleratorSpec, sl: Slice, microbatch: int, accumulation: int,
         physical: int, est: MemoryEstimate, util: float, wall: float) -> PodPlan:
    required = int(1.25 * est.state) + 2 * GIB
    host_memory = max(accelerator.host_memory_per_chip * max(1, sl.chips_per_host), required)
    if accelerator.kind == "cpu":
        # The whole estimate lives in host memory; request cores, not devices.
        host_memory = required = int(1.25 * est.total) + 2 * GIB
        cpu = str(sl.chips_per_host)
        resources = {"requests": {"cpu": cpu, "memory": _mib(host_memory)},
                     "limits": {"memory": _mib(host_memory)}}
        chips_per_host = 0
    else:
        assert accelerator.resource is not None
        count = str(sl.chips_per_host)
        cpu = str(accelerator.host_cpu_per_chip * sl.chips_per_host)
        resources = {"requests": {"cpu": cpu, "memory": _mib(host_memory),
                                  accelerator.resource: count},
                     "limits": {accelerator.resource: count}}
        chips_per_host = sl.chips_per_host
    node_selector: dict[str, str] = {}
    tolerations: tuple[dict[str, str], ...] = ()
    if accelerator.node_label is not None:
        node_selector[accelerator.node_label[0]] = accelerator.node_label[1]
    if accelerator.kind == "tpu" and sl.topology is not None:
        node_selector["cloud.google.com/gke-tpu-topology"] = sl.topology
    if accelerator.resource is not None:
        # GKE taints accelerator node pools with <resource>=present:NoSchedule.
        tolerations = ({"key": accelerator.resource, "operator": "Exists",
                        "effect": "NoSchedule"},)
    return PodPlan(accelerator=accelerator.name, hosts=sl.hosts, chips_per_host=chips_per_host,
                   topology=sl.topology, microbatch_size=microbatch,
                   accumulation_steps=accumulation, physical_batch_size=physical, memory=est,
                   resources=resources, node_selector=node_selector, tolerations=tolerations,
                   utilization=util, est_wall_seconds=wall,
                   accelerator_hours=wall * sl.chips / 3600.0,
                   host_memory_required=required)


def _mib(n_bytes: int) -> str:
    return f"{math.ceil(n_bytes / 2**20)}Mi"

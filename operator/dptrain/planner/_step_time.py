"""Cost in time: how long one DP-SGD step takes, and which batches waste the hardware.

A step costs a fixed overhead (dispatch, Poisson sampling and data gathering, the noise draw, the
optimiser update) plus its FLOPs at the utilisation the batch achieves. Utilisation grows with the
tokens each device processes per step and saturates::

    util(x) = u_peak · x / (x + x_half),      x = physical rows per device · S
    seconds(step) = overhead + step FLOPs / (devices · peak FLOP/s · util(x))

A batch whose utilisation is below ``COLLAPSE_FRACTION`` of the peak "collapses": most of the time
goes to overhead and idle units, so counting its cost in FLOPs flatters it (the issue-16 pick, B = 2
on CPU, ran at a quarter of the throughput of B = 64). The planner never picks such a batch unless
nothing else fits, and shows every candidate's wall time.

Constants per accelerator kind:

* ``cpu``: **measured** on this project's 2-core CI machine: seconds per step of ``dptrain run``
  on the ``tiny`` preset, S = 64, as the wall-time difference of two run lengths (start-up and
  compilation drop out), at B = 2 / 8 / 32 / 64 / 128 / 512: 22, 37, 60, 96, 152 and 404 ms
  (2026-12-06, after issue 15's speed work; issue 16 had measured 22 ms, 238 ms and 1.34 s at
  B = 2 / 64 / 512). The constants are their least-squares fit on log seconds, within 25 % of
  each (``bench/step_time.py`` re-measures the compiled step and prints such a fit).
  ``u_peak`` is relative to ``AcceleratorSpec.peak_flops`` per core times the cores. Tokens are
  counted at the expected batch, as the planner counts them; the padding rows of the physical
  batch (e.g. 136 at B = 64, 22 at B = 2) are part of what the fitted utilisation absorbs.
* GPUs and TPUs: **assumed** (no accelerator was available to measure): a few milliseconds of
  per-step overhead, and half the peak model-FLOP utilisation at 2K (GPU) / 4K (TPU) tokens per
  chip, typical of transformer training with per-example gradients (the peak is the accelerator's
  ``default_utilization``, or ``spec.compute.utilization``). ``dptrain sweep`` on an accelerator
  records step times to replace them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

COLLAPSE_FRACTION = 0.5
"""Below this fraction of its peak utilisation a batch counts as collapsed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTimeModel:
    """Per-step wall time of the DP-SGD step on one kind of accelerator.

    Attributes:
        accelerator: the kind (``cpu``, ``gpu``, ``tpu``).
        overhead_seconds: fixed cost of a step.
        peak_utilization: model-FLOP utilisation at large batches (None: the accelerator's
            default or the job's ``spec.compute.utilization``).
        half_tokens: tokens per device per step at which utilisation is half its peak.
        source: ``measured …`` or ``assumed …``.
    """

    accelerator: str
    overhead_seconds: float
    peak_utilization: float | None
    half_tokens: float
    source: str

    def utilization(self, tokens_per_device: Any, peak: float) -> Any:
        """Utilisation at ``tokens_per_device`` tokens per step (numpy arrays broadcast)."""
        u = self.peak_utilization if self.peak_utilization is not None else peak
        return u * tokens_per_device / (tokens_per_device + self.half_tokens)

    def relative_utilization(self, tokens_per_device: Any) -> Any:
        """Utilisation as a fraction of the peak (1 at very large batches)."""
        return tokens_per_device / (tokens_per_device + self.half_tokens)

    def collapsed(self, tokens_per_device: Any) -> Any:
        """Whether the batch wastes most of the hardware (see the module docstring)."""
        return self.relative_utilization(tokens_per_device) < COLLAPSE_FRACTION

    def step_seconds(self, flops_per_step: Any, tokens_per_device: Any, *, devices: int,
                     peak_flops_per_device: float, peak_utilization: float) -> Any:
        """Seconds per step (numpy arrays broadcast)."""
        util = self.utilization(tokens_per_device, peak_utilization)
        return self.overhead_seconds + flops_per_step / (devices * peak_flops_per_device * util)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


STEP_TIME_MODELS: dict[str, StepTimeModel] = {
    "cpu": StepTimeModel(
        accelerator="cpu", overhead_seconds=1.8e-3, peak_utilization=0.221, half_tokens=1580.0,
        source="measured: dptrain run, tiny preset, S=64, B=2..512, 2 cores (2026-12-06)"),
    "gpu": StepTimeModel(
        accelerator="gpu", overhead_seconds=3e-3, peak_utilization=None, half_tokens=2048.0,
        source="assumed: 3 ms overhead, half utilisation at 2K tokens per GPU (not measured)"),
    "tpu": StepTimeModel(
        accelerator="tpu", overhead_seconds=2e-3, peak_utilization=None, half_tokens=4096.0,
        source="assumed: 2 ms overhead, half utilisation at 4K tokens per chip (not measured)"),
}


def step_time_model(kind: str) -> StepTimeModel:
    """The model for an accelerator kind (``cpu``, ``gpu``, ``tpu``)."""
    return STEP_TIME_MODELS[kind]

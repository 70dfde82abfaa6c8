"""The accelerators a job can ask for: peak FLOP/s, memory, hosts and GKE scheduling labels.

Figures are vendors' published dense bf16 peaks per chip (no sparsity) and HBM per chip; the
utilisation defaults are typical model-FLOP utilisations of transformer training (documented
assumptions, overridable per job with ``spec.compute.utilization``). On CPU a "chip" is one core
and its peak assumes fp32 FMA vectors (≈ 32 FLOP/cycle at ≈ 3 GHz).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

GIB = 1024**3
GB = 10**9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slice:
    """One way to lay out chips: ``hosts`` pods of ``chips_per_host`` chips each.

    Attributes:
        hosts: pods (one JAX process each).
        chips_per_host: accelerators per pod (cores, on CPU).
        topology: TPU slice topology (``4x4``), or None for GPUs and CPUs.
    """

    hosts: int
    chips_per_host: int
    topology: str | None = None

    @property
    def chips(self) -> int:
        """All accelerators of the slice."""
        return self.hosts * self.chips_per_host


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcceleratorSpec:
    """A kind of accelerator and how GKE schedules it.

    Attributes:
        name: the ``spec.compute.accelerator`` value.
        kind: ``gpu``, ``tpu`` or ``cpu``.
        peak_flops: dense bf16 peak FLOP/s of one chip (fp32 of one core on CPU).
        memory_bytes: accelerator memory of one chip (on CPU: the host memory one pod may ask).
        default_utilization: assumed model-FLOP utilisation for wall-time estimates.
        max_chips_per_host: chips on the largest host of this kind.
        resource: the extended resource name, or None (CPU).
        node_label: GKE node label that selects the accelerator, and its value.
        slices: the slice shapes GKE offers, smallest first (empty: any host count).
        host_cpu_per_chip: CPU cores to request per chip.
        host_memory_per_chip: host memory (bytes) to request per chip, at least.
    """

    name: str
    kind: Literal["gpu", "tpu", "cpu"]
    peak_flops: float
    memory_bytes: int
    default_utilization: float
    max_chips_per_host: int
    resource: str | None
    node_label: tuple[str, str] | None
    slices: tuple[Slice, ...] = ()
    host_cpu_per_chip: int = 1
    host_memory_per_chip: int = 4 * GIB


def _tpu_2d(chips_per_multi_host: int = 4) -> tuple[Slice, ...]:
    # v5e / v6e: single-host slices of 1, 4 and 8 chips; larger slices are 4-chip hosts.
    single = (Slice(hosts=1, chips_per_host=1, topology="1x1"),
              Slice(hosts=1, chips_per_host=4, topology="2x2"),
              Slice(hosts=1, chips_per_host=8, topology="2x4"))
    multi = tuple(
        Slice(hosts=(a * b) // chips_per_multi_host, chips_per_host=chips_per_multi_host,
              topology=f"{a}x{b}")
        for a, b in ((4, 4), (4, 8), (8, 8), (8, 16), (16, 16)))
    return single + multi


def _tpu_3d() -> tuple[Slice, ...]:
    # v5p: 4 chips per host, 3-D torus topologies.
    shapes = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8),
              (8, 8, 8), (8, 8, 16), (8, 16, 16))
    return tuple(Slice(hosts=(a * b * c) // 4, chips_per_host=4, topology=f"{a}x{b}x{c}")
                 for a, b, c in shapes)


ACCELERATORS: dict[str, AcceleratorSpec] = {
    spec.name: spec
    for spec in (
        AcceleratorSpec(name="cpu", kind="cpu", peak_flops=1e11, memory_bytes=64 * GIB,
                        default_utilization=0.1, max_chips_per_host=16, resource=None,
                        node_label=None, host_cpu_per_chip=1, host_memory_per_chip=1 * GIB),
        AcceleratorSpec(name="nvidia-a100-80gb", kind="gpu", peak_flops=312e12,
                        memory_bytes=80 * GB, default_utilization=0.4, max_chips_per_host=8,
                        resource="nvidia.com/gpu",
                        node_label=("cloud.google.com/gke-accelerator", "nvidia-a100-80gb"),
                        host_cpu_per_chip=10, host_memory_per_chip=100 * GIB),
        AcceleratorSpec(name="nvidia-h100-80gb", kind="gpu", peak_flops=989e12,
                        memory_bytes=80 * GB, default_utilization=0.4, max_chips_per_host=8,
                        resource="nvidia.com/gpu",
                        node_label=("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),
                        host_cpu_per_chip=24, host_memory_per_chip=200 * GIB),
        AcceleratorSpec(name="nvidia-h200", kind="gpu", peak_flops=989e12,
                        memory_bytes=141 * GB, default_utilization=0.4, max_chips_per_host=8,
                        resource="nvidia.com/gpu",
                        node_label=("cloud.google.com/gke-accelerator", "nvidia-h200-141gb"),
                        host_cpu_per_chip=24, host_memory_per_chip=200 * GIB),
        AcceleratorSpec(name="tpu-v5e", kind="tpu", peak_flops=197e12, memory_bytes=16 * GB,
                        default_utilization=0.45, max_chips_per_host=8, resource="google.com/tpu",
                        node_label=("cloud.google.com/gke-tpu-accelerator",
                                    "tpu-v5-lite-podslice"),
                        slices=_tpu_2d(), host_cpu_per_chip=24, host_memory_per_chip=48 * GIB),
        AcceleratorSpec(name="tpu-v5p", kind="tpu", peak_flops=459e12, memory_bytes=95 * GB,
                        default_utilization=0.45, max_chips_per_host=4, resource="google.com/tpu",
                        node_label=("cloud.google.com/gke-tpu-accelerator", "tpu-v5p-slice"),
                        slices=_tpu_3d(), host_cpu_per_chip=50, host_memory_per_chip=100 * GIB),
        AcceleratorSpec(name="tpu-v6e", kind="tpu", peak_flops=918e12, memory_bytes=32 * GB,
                        default_utilization=0.45, max_chips_per_host=8, resource="google.com/tpu",
                        node_label=("cloud.google.com/gke-tpu-accelerator", "tpu-v6e-slice"),
                        slices=_tpu_2d(), host_cpu_per_chip=44, host_memory_per_chip=90 * GIB),
    )
}


def get_accelerator(name: str) -> AcceleratorSpec:
    """Look up an accelerator by its ``spec.compute.accelerator`` name.

    Raises:
        KeyError: naming the field and the known accelerators.
    """
    try:
        return ACCELERATORS[name]
    except KeyError:
        known = ", ".join(ACCELERATORS)
        raise KeyError(f"spec.compute.accelerator: unknown accelerator {name!r}; known: "
                       f"{known}") from None


def candidate_slices(accelerator: AcceleratorSpec, *, max_hosts: int,
                     max_chips_per_host: int | None, topology: str | None) -> list[Slice]:
    """The slices a job may use, smallest first.

    Args:
        accelerator: the accelerator kind.
        max_hosts: ``spec.compute.maxHosts``.
        max_chips_per_host: ``spec.compute.maxChipsPerHost`` (None: the accelerator's host).
        topology: ``spec.compute.tpuTopology`` (TPUs only): the one slice allowed.

    Raises:
        ValueError: naming the field, if the topology is not one GKE offers for this TPU.
    """
    per_host_cap = min(accelerator.max_chips_per_host,
                       max_chips_per_host or accelerator.max_chips_per_host)
    if accelerator.kind == "tpu":
        if topology is not None:
            chosen = [s for s in accelerator.slices if s.topology == topology]
            if not chosen:
                known = ", ".join(str(s.topology) for s in accelerator.slices)
                raise ValueError(f"spec.compute.tpuTopology: {topology!r} is not a "
                                 f"{accelerator.name} topology; known: {known}")
            return chosen
        return [s for s in accelerator.slices
                if s.hosts <= max_hosts and s.chips_per_host <= per_host_cap]
    if topology is not None:
        raise ValueError(f"spec.compute.tpuTopology: only TPU accelerators take a topology, "
                         f"not {accelerator.name}")
    if accelerator.kind == "cpu":
        # One pod first (cores 1, 2, 4, … up to the cap), then more pods of the full width.
        widths = sorted({min(2**k, per_host_cap) for k in range(5)})
        single = [Slice(hosts=1, chips_per_host=w) for w in widths]
        return single + [Slice(hosts=h, chips_per_host=per_host_cap)
                         for h in range(2, max_hosts + 1)]
    widths = [w for w in (1, 2, 4, 8) if w <= per_host_cap]
    single = [Slice(hosts=1, chips_per_host=w) for w in widths]
    return single + [Slice(hosts=h, chips_per_host=widths[-1]) for h in range(2, max_hosts + 1)]

"""Sizing trainer pods that fit a node: the planner's pod, placed by the profile, fitted.

The planner asks generous host resources per chip (``dptrain.planner._accelerators``); a node
gives pods only its *allocatable* less what its DaemonSets take (``_machines``). When the
accelerator's profile names the node shapes its pods land on, :func:`size_pods` picks the
smallest shape that holds the pod's minimum (one core per chip, the planner's
``host_memory_required``) and lowers the requests to what that shape gives. A pod that fits no
shape is refused with :class:`PodsDoNotFitError`, naming the shortfall — never a pod that stays
``Pending``. The result is stored once in ``status.plan.pods``; workloads are built from it.
"""

from __future__ import annotations

import copy
from decimal import Decimal

from dptrain.api import PodsStatus
from dptrain.operator._machines import GIB
from dptrain.operator._profiles import TOPOLOGY_LABEL, NodeShape, Placements
from dptrain.planner import ACCELERATORS
from dptrain.planner._pods import PodPlan

__all__ = ["PodsDoNotFitError", "size_pods"]


class PodsDoNotFitError(ValueError):
    """The plan's trainer pods fit no node of the profile (the message names the shortfall)."""

    field = "spec.compute.accelerator"


_SUFFIXES: dict[str, Decimal | int] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "P": 10**15, "E": 10**18}


def _q(quantity: str) -> Decimal:
    """A Kubernetes quantity (``"42"``, ``"500m"``, ``"160Gi"``, ``"1e3"``) as a number.

    (Decisions stay free of the Kubernetes client, whose ``parse_quantity`` this mirrors.)
    """
    text = str(quantity).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix) and text[: -len(suffix)]:
            return Decimal(text[: -len(suffix)]) * Decimal(_SUFFIXES[suffix])
    return Decimal(text)


def _gib(n: Decimal | int) -> str:
    return f"{Decimal(n) / GIB:.4g}Gi"


def _cores(milli: Decimal | int) -> str:
    return f"{Decimal(milli) / 1000:.4g}"


def _shortfall(shapes: list[NodeShape], cpu_milli: Decimal, memory: Decimal,
               profile: str) -> str:
    """What the largest shape lacks for the pod's minimum."""
    largest = max(shapes, key=lambda s: (_q(s.memory), _q(s.cpu)))
    parts = []
    node_memory = _q(largest.memory)
    node_cpu = _q(largest.cpu) * 1000
    if memory > node_memory:
        parts.append(f"requests {_gib(memory)} memory; the largest {largest.name} node "
                     f"allocates {_gib(node_memory)} to a pod")
    if cpu_milli > node_cpu:
        parts.append(f"requests {_cores(cpu_milli)} CPU; the largest {largest.name} node "
                     f"allocates {_cores(node_cpu)} to a pod")
    return (f"spec.compute.accelerator: the trainer pod fits no node of the {profile!r} "
            f"profile: " + "; ".join(parts))


def size_pods(pod: PodPlan, placements: Placements, accelerator: str) -> PodsStatus:
    """The trainer pods of ``pod`` placed by the chosen profile and fitted to its nodes.

    Raises:
        PodsDoNotFitError: the pod's minimum exceeds every node shape of the profile.
    """
    spec = ACCELERATORS[accelerator]
    resources = {k: dict(v) for k, v in copy.deepcopy(pod.resources).items()}
    selector = dict(pod.node_selector)
    tolerations = [dict(t) for t in pod.tolerations]
    placement = placements.for_accelerator(accelerator)
    profile = None
    machine = None
    if placement is not None:
        profile = placements.gpu_name if spec.kind == "gpu" else placements.tpu_name
        selector = dict(placement.node_selector)
        topology = pod.node_selector.get(TOPOLOGY_LABEL)
        if topology is not None:  # the slice shape the planner chose (TPUs)
            selector[TOPOLOGY_LABEL] = topology
        tolerations = [t.manifest() for t in placement.tolerations]
        for name, amount in placement.extra_resources.items():
            resources.setdefault("requests", {})[name] = amount
            resources.setdefault("limits", {})[name] = amount
        if placement.nodes:
            machine = _fit(resources, pod, placement.nodes, profile, tpu=spec.kind == "tpu")
    return PodsStatus.model_validate({
        "hosts": pod.hosts, "chipsPerHost": pod.chips_per_host, "topology": pod.topology,
        "resources": resources, "nodeSelector": selector, "tolerations": tolerations,
        "machineType": machine, "profile": profile})


def _fit(resources: dict[str, dict[str, str]], pod: PodPlan, nodes: tuple[NodeShape, ...],
         profile: str, *, tpu: bool) -> str:
    """Lower ``resources`` (in place) to the smallest node shape that holds the pod's minimum."""
    chips = pod.chips_per_host
    # A TPU VM's chips all go to one pod; a GPU pod may take part of a larger node.
    shapes = [s for s in nodes if (s.accelerators == chips if tpu else s.accelerators >= chips)]
    if not shapes:
        carried = ", ".join(f"{s.name} ({s.accelerators})" for s in nodes)
        raise PodsDoNotFitError(
            f"spec.compute.accelerator: the trainer pod needs {chips} {pod.accelerator} chips "
            f"on one node; the {profile!r} profile's nodes carry: {carried}")
    requests = resources.setdefault("requests", {})
    want_cpu = _q(requests.get("cpu", "0")) * 1000
    want_memory = _q(requests.get("memory", "0"))
    min_cpu = Decimal(1000 * chips) if chips else want_cpu
    min_memory = Decimal(pod.host_memory_required) if pod.host_memory_required else want_memory
    shapes.sort(key=lambda s: (s.accelerators, _q(s.memory), _q(s.cpu)))
    for shape in shapes:
        node_cpu = _q(shape.cpu) * 1000
        node_memory = _q(shape.memory)
        if min_cpu <= node_cpu and min_memory <= node_memory:
            if want_cpu > node_cpu:
                requests["cpu"] = f"{int(node_cpu)}m"
            if want_memory > node_memory:
                requests["memory"] = f"{int(node_memory) // 2**20}Mi"
            limits = resources.get("limits") or {}
            if "memory" in limits and _q(limits["memory"]) > node_memory:
                limits["memory"] = requests["memory"]
            return shape.name
    raise PodsDoNotFitError(_shortfall(shapes, min_cpu, min_memory, profile))

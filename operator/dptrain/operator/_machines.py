"""Node machine types and what their kubelet lets pods request (node allocatable).

A node's *allocatable* is its capacity less what the cloud's node image reserves for the kubelet,
the container runtime and the OS, less the hard-eviction threshold. Pods whose requests exceed
it stay ``Pending`` forever, so the operator sizes trainer pods to fit (``_fit``). This module
is the table: one row per machine type that carries an accelerator dptrain plans for, with its
nominal capacity and the reservation formula of its platform.

Units: Compute Engine's machine tables say "GB" for binary gigabytes (an n1-standard-1's
"3.75 GB" is 3840 MiB, in the 256 MB steps of custom machine types, and its node reports more
than 3.75 × 10^9 bytes of capacity); EC2 lists GiB. Kubernetes quantities here are binary
(``Gi``, ``Mi``). The kernel keeps part of the nominal memory before the kubelet counts it
(firmware, kernel image, crash kernel, page tables); we take :data:`KERNEL_SHARE` of it off the
nominal figure, an assumption on the safe side of what large nodes report as ``capacity``.

Sources (checked 2026-12):

- GKE reservations: https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes
  ("Memory and CPU reservations"): memory 255 MiB below 1 GiB, else 25 % of the first 4 GiB,
  20 % of the next 4 GiB, 10 % of the next 8 GiB, 6 % of the next 112 GiB, 2 % above 128 GiB;
  CPU 6 % of the first core, 1 % of the next, 0.5 % of the next 2, 0.25 % above 4 cores; hard
  eviction at 100 MiB available memory.
- GKE machine types: https://cloud.google.com/compute/docs/accelerator-optimized-machines (A2
  ultra, A3 high, A3 ultra) and the TPU pages https://cloud.google.com/tpu/docs/v5e,
  https://cloud.google.com/tpu/docs/v5p, https://cloud.google.com/tpu/docs/v6e (ct5lp, ct5p,
  ct6e machine types of GKE TPU node pools).
- EKS reservations: the EKS optimised AMI (https://github.com/awslabs/amazon-eks-ami, nodeadm's
  kubelet defaults): kube-reserved memory 11 MiB × maxPods + 255 MiB, CPU by the same
  percentages as GKE, hard eviction at 100 MiB; maxPods from the VPC CNI's ENI table
  (https://github.com/aws/amazon-vpc-cni-k8s/blob/master/misc/eni-max-pods.txt).
- EC2 instance types: https://aws.amazon.com/ec2/instance-types/p4/ and
  https://aws.amazon.com/ec2/instance-types/p5/.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

MIB = 2**20
GIB = 2**30

KERNEL_SHARE = 0.03
"""Share of nominal memory the kernel and firmware keep before the kubelet counts capacity."""

EVICTION_HARD = 100 * MIB
"""The kubelet's ``memory.available`` hard-eviction threshold on GKE and EKS nodes."""

DAEMONSET_CPU_MILLI = 1000
DAEMONSET_MEMORY = 2 * GIB
"""Left free on every node for its DaemonSets (logging, device plugins, kube-proxy, CNI)."""


def _tiered(amount: float, tiers: tuple[tuple[float, float], ...]) -> float:
    """Sum of ``share × portion`` over consecutive tiers of ``(size, share)`` (last: the rest)."""
    reserved, left = 0.0, amount
    for size, share in tiers:
        portion = min(left, size)
        reserved += portion * share
        left -= portion
        if left <= 0:
            break
    return reserved


_CPU_TIERS = ((1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025))
_GKE_MEMORY_TIERS = ((4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02))


def reserved_cpu_milli(vcpus: int) -> int:
    """CPU (millicores) GKE and the EKS AMI reserve for system daemons on ``vcpus`` cores."""
    return round(1000 * _tiered(vcpus, _CPU_TIERS))


def gke_reserved_memory(memory: int) -> int:
    """Bytes GKE reserves on a node of ``memory`` bytes (eviction threshold not included)."""
    if memory < GIB:
        return 255 * MIB
    return int(_tiered(memory / GIB, _GKE_MEMORY_TIERS) * GIB)


def eks_reserved_memory(max_pods: int) -> int:
    """Bytes the EKS AMI reserves (kube-reserved) on a node that runs ``max_pods`` pods."""
    return (11 * max_pods + 255) * MIB


@dataclasses.dataclass(frozen=True, kw_only=True)
class Machine:
    """One machine type and what pods may request on it.

    Attributes:
        name: the cloud's machine (instance) type.
        platform: whose reservation formula applies.
        vcpus: nominal vCPUs.
        memory: nominal memory, bytes.
        accelerators: accelerator chips on the node.
        max_pods: pods the kubelet admits (EKS: the ENI limit; it sizes the reservation).
    """

    name: str
    platform: Literal["gke", "eks"]
    vcpus: int
    memory: int
    accelerators: int
    max_pods: int = 110

    @property
    def allocatable_cpu_milli(self) -> int:
        """Node allocatable CPU, millicores."""
        return self.vcpus * 1000 - reserved_cpu_milli(self.vcpus)

    @property
    def allocatable_memory(self) -> int:
        """Node allocatable memory, bytes."""
        capacity = int(self.memory * (1 - KERNEL_SHARE))
        reserved = (gke_reserved_memory(capacity) if self.platform == "gke"
                    else eks_reserved_memory(self.max_pods))
        return capacity - reserved - EVICTION_HARD

    @property
    def usable_cpu_milli(self) -> int:
        """What one trainer pod may request: allocatable less the DaemonSets' share."""
        return self.allocatable_cpu_milli - DAEMONSET_CPU_MILLI

    @property
    def usable_memory(self) -> int:
        """What one trainer pod may request: allocatable less the DaemonSets' share."""
        return self.allocatable_memory - DAEMONSET_MEMORY


def _gke(name: str, vcpus: int, memory_gib: int, chips: int) -> Machine:
    return Machine(name=name, platform="gke", vcpus=vcpus, memory=memory_gib * GIB,
                   accelerators=chips)


def _eks(name: str, vcpus: int, memory_gib: int, chips: int, max_pods: int) -> Machine:
    return Machine(name=name, platform="eks", vcpus=vcpus, memory=memory_gib * GIB,
                   accelerators=chips, max_pods=max_pods)


MACHINES: dict[str, Machine] = {m.name: m for m in (
    # GKE GPU machines (A2 ultra: A100 80 GB; A3 high: H100 80 GB; A3 ultra: H200 141 GB).
    _gke("a2-ultragpu-1g", 12, 170, 1), _gke("a2-ultragpu-2g", 24, 340, 2),
    _gke("a2-ultragpu-4g", 48, 680, 4), _gke("a2-ultragpu-8g", 96, 1360, 8),
    _gke("a3-highgpu-1g", 26, 234, 1), _gke("a3-highgpu-2g", 52, 468, 2),
    _gke("a3-highgpu-4g", 104, 936, 4), _gke("a3-highgpu-8g", 208, 1872, 8),
    _gke("a3-ultragpu-8g", 224, 2952, 8),
    # GKE TPU VMs (v5e: ct5lp-hightpu; v5p: ct5p-hightpu; v6e: ct6e-standard).
    _gke("ct5lp-hightpu-1t", 24, 48, 1), _gke("ct5lp-hightpu-4t", 112, 192, 4),
    _gke("ct5lp-hightpu-8t", 224, 384, 8),
    _gke("ct5p-hightpu-4t", 208, 448, 4),
    _gke("ct6e-standard-1t", 44, 176, 1), _gke("ct6e-standard-4t", 180, 720, 4),
    _gke("ct6e-standard-8t", 180, 1440, 8),
    # EKS GPU instances (8 GPUs each).
    _eks("p4de.24xlarge", 96, 1152, 8, 737),
    _eks("p5.48xlarge", 192, 2048, 8, 100),
    _eks("p5e.48xlarge", 192, 2048, 8, 100),
)}

GKE_MACHINES: dict[str, tuple[str, ...]] = {
    "nvidia-a100-80gb": ("a2-ultragpu-1g", "a2-ultragpu-2g", "a2-ultragpu-4g",
                         "a2-ultragpu-8g"),
    "nvidia-h100-80gb": ("a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g", "a3-highgpu-8g"),
    "nvidia-h200": ("a3-ultragpu-8g",),
    "tpu-v5e": ("ct5lp-hightpu-1t", "ct5lp-hightpu-4t", "ct5lp-hightpu-8t"),
    "tpu-v5p": ("ct5p-hightpu-4t",),
    "tpu-v6e": ("ct6e-standard-1t", "ct6e-standard-4t", "ct6e-standard-8t"),
}
"""The GKE machine types that carry each accelerator (the node pool's machine type)."""

EKS_MACHINES: dict[str, tuple[str, ...]] = {
    "nvidia-a100-80gb": ("p4de.24xlarge",),
    "nvidia-h100-80gb": ("p5.48xlarge",),
    "nvidia-h200": ("p5e.48xlarge",),
}
"""The EC2 instance types the ``eks`` profile selects for each GPU."""

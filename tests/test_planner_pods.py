"""Pod sizing: memory, slices, microbatches, GKE resources and wall time."""

from __future__ import annotations

import math

import pytest

from dptrain.planner import (
    InfeasibleBudgetError,
    MemoryEstimate,
    candidate_slices,
    get_accelerator,
    get_preset,
    memory_estimate,
    size_pod,
)
from dptrain.planner._pods import MEMORY_HEADROOM
from dptrain.privacy import physical_batch_size_for

VG = get_preset("vaultgemma-1b")


def _size(accel: str, *, batch: int = 4096, topology: str | None = None, max_hosts: int = 16,
          steps: int = 1000) -> object:
    spec = get_accelerator(accel)
    slices = candidate_slices(spec, max_hosts=max_hosts, max_chips_per_host=None,
                              topology=topology)
    return size_pod(VG, spec, slices, seq_len=1024, iterations=steps, physical_batch=batch)


def test_vaultgemma_on_h100_requests_gpus_with_gke_labels() -> None:
    pod = _size("nvidia-h100-80gb")
    assert pod.resources["limits"]["nvidia.com/gpu"] == str(pod.chips_per_host)
    assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod.tolerations
    assert pod.memory.total <= MEMORY_HEADROOM * 80e9
    assert not pod.memory.sharded_state  # 16 bytes/param ≈ 16 GB fits an 80 GB chip
    chips = pod.hosts * pod.chips_per_host
    assert chips * pod.microbatch_size * pod.accumulation_steps == pod.physical_batch_size
    assert pod.physical_batch_size >= 4096


def test_vaultgemma_on_tpu_v6e_uses_tpu_labels_and_smaller_microbatches() -> None:
    gpu = _size("nvidia-h100-80gb")
    tpu = _size("tpu-v6e", topology="4x4")
    assert (tpu.hosts, tpu.chips_per_host, tpu.topology) == (4, 4, "4x4")
    assert tpu.resources["limits"]["google.com/tpu"] == "4"
    assert tpu.node_selector == {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
    assert tpu.memory.total <= MEMORY_HEADROOM * 32e9
    assert tpu.microbatch_size < gpu.microbatch_size  # 32 GB HBM vs 80 GB
    # Same work: wall time scales with chips × peak × utilisation, up to the per-step
    # overhead and the utilisation each chip's share of the batch reaches (step-time model).
    work_gpu = gpu.est_wall_seconds * gpu.hosts * gpu.chips_per_host * 989e12 * 0.4
    work_tpu = tpu.est_wall_seconds * 16 * 918e12 * 0.45
    assert work_tpu / work_gpu == pytest.approx(
        tpu.physical_batch_size / gpu.physical_batch_size, rel=0.05)


def test_memory_estimate_counts_state_grads_and_activations() -> None:
    est = memory_estimate(VG, seq_len=1024, microbatch=2, optimizer="adamw")
    assert isinstance(est, MemoryEstimate)
    assert est.state == 16 * VG.param_count
    assert est.per_example_grads == 4 * VG.param_count * 2
    assert est.activations > 0
    sgd = memory_estimate(VG, seq_len=1024, microbatch=2, optimizer="sgd")
    assert est.state - sgd.state == 8 * VG.param_count


def test_state_is_sharded_when_a_replica_does_not_fit_and_too_small_a_slice_fails() -> None:
    pod = _size("tpu-v5e", topology="4x4", batch=256)  # 16 GB chips < 16 GB of state
    assert pod.memory.sharded_state
    with pytest.raises(InfeasibleBudgetError) as info:
        _size("tpu-v5e", topology="1x1", batch=256)
    assert info.value.budget == "memory"


def test_physical_batch_is_at_least_eight_std_devs_above_the_expected_batch() -> None:
    n, b = 1_000_000, 4096
    physical = physical_batch_size_for(b, dataset_size=n, steps=1000, delta=1e-7)
    std = math.sqrt(n * (b / n) * (1 - b / n))
    assert physical >= b + 8 * std


def test_deadline_that_cannot_be_met_is_a_deadline_error() -> None:
    spec = get_accelerator("nvidia-h100-80gb")
    slices = candidate_slices(spec, max_hosts=1, max_chips_per_host=None, topology=None)
    with pytest.raises(InfeasibleBudgetError) as info:
        size_pod(VG, spec, slices, seq_len=1024, iterations=100_000, physical_batch=4096,
                 target_wall_seconds=3600.0)
    assert info.value.budget == "deadline"


def test_cpu_pods_request_cores_and_memory_not_devices() -> None:
    spec = get_accelerator("cpu")
    slices = candidate_slices(spec, max_hosts=1, max_chips_per_host=2, topology=None)
    pod = size_pod(get_preset("tiny"), spec, slices, seq_len=128, iterations=100,
                   physical_batch=300)
    assert pod.chips_per_host == 0
    assert set(pod.resources["requests"]) == {"cpu", "memory"}
    assert pod.node_selector == {} and pod.tolerations == ()
    assert pod.microbatch_size * pod.accumulation_steps >= 300

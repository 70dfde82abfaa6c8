"""Poisson sampling of each step's batch, padded or truncated to a fixed physical batch.

Compiled step functions need one shape, but a Poisson batch has a random size. The sampler draws
the Poisson batch, then pads it to ``physical_batch_size`` with masked rows (index -1) or, in the
rare event that it is larger, keeps a uniformly random subset of ``physical_batch_size`` of it.
The accountant (``dptrain.privacy.DpSgdMechanism(physical_batch_size=...)``) charges for that
truncation, so the physical batch size used here must be the one given to the accountant.

Sampling runs on the host with numpy: the indices are needed there anyway to read rows from the
memory-mapped dataset, and every process of a multi-host job draws the same batch from the same
``(key, execution)`` and keeps its own slice. The randomness is secret: it comes from the job's
secret key and the execution count (``dptrain.trainer._keys``), never from anything published.

Formal guarantees:
    1. Poisson inclusion: before truncation, every index ``0 ≤ i < N`` is in the batch
       independently with probability ``q = expected_batch_size / N`` (a Binomial(N, q) count,
       then a uniformly random subset of that size — the same distribution).
    2. Truncation only removes: a batch larger than ``physical_batch_size`` keeps a uniformly
       random subset of exactly ``physical_batch_size`` of its members; nothing is ever added.
    3. Padding rows carry index -1 and mask ``False``; real rows carry mask ``True``.
    4. The batch of execution ``e`` depends only on ``(key, e)``: a run resumed at the same
       execution count draws the same batches, and a step re-run after a restart (a later
       execution) draws an independent one. Without the key the batches are unpredictable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dptrain.trainer._keys import sampling_entropy


@dataclasses.dataclass(frozen=True)
class SampledBatch:
    """One step's batch of dataset indices.

    Attributes:
        indices: ``[physical_batch_size]`` int64; -1 marks a padding row.
        mask: ``[physical_batch_size]`` bool; True for real rows.
        poisson_size: size of the Poisson batch before truncation.
    """

    indices: np.ndarray
    mask: np.ndarray
    poisson_size: int

    @property
    def size(self) -> int:
        """Real rows after truncation."""
        return int(self.mask.sum())

    @property
    def truncated(self) -> bool:
        """Whether rows were dropped to fit the physical batch."""
        return self.poisson_size > self.indices.shape[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoissonSampler:
    """Poisson sampling with rate ``expected_batch_size / dataset_size``.

    Attributes:
        dataset_size: N.
        expected_batch_size: the expected (logical) batch size ``q·N``.
        physical_batch_size: fixed number of rows per step (≥ 1).
        key: the job's secret key (≥ 256 bits; see ``dptrain.trainer._keys``).
    """

    dataset_size: int
    expected_batch_size: float
    physical_batch_size: int
    key: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise ValueError(f"dataset_size must be ≥ 1 (got {self.dataset_size})")
        if not 0 < self.expected_batch_size <= self.dataset_size:
            raise ValueError(f"spec.training.batchSize must be in (0, N={self.dataset_size}] "
                             f"(got {self.expected_batch_size})")
        if self.physical_batch_size < 1:
            raise ValueError("spec.training.physicalBatchSize must be ≥ 1 "
                             f"(got {self.physical_batch_size})")

    @property
    def sampling_rate(self) -> float:
        """Q = expected batch / N."""
        return self.expected_batch_size / self.dataset_size

    def sample(self, execution: int) -> SampledBatch:
        """The batch of execution ``execution`` (the ledger's count before the step)."""
        if execution < 0:
            raise ValueError(f"execution must be ≥ 0 (got {execution})")
        rng = np.random.Generator(np.random.Philox(
            np.random.SeedSequence(sampling_entropy(self.key, execution))))
        poisson_size = int(rng.binomial(self.dataset_size, self.sampling_rate))
        # Conditioned on its size, a Poisson sample is a uniform subset; `shuffle=True` puts it
        # in random order, so its first `physical_batch_size` members are a uniform sub-subset.
        members = rng.choice(self.dataset_size, size=poisson_size, replace=False, shuffle=True)
        kept = np.sort(members[: self.physical_batch_size])
        indices = np.full(self.physical_batch_size, -1, dtype=np.int64)
        indices[: kept.shape[0]] = kept
        mask = indices >= 0
        return SampledBatch(indices=indices, mask=mask, poisson_size=poisson_size)

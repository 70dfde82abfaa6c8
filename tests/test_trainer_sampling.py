"""Poisson sampling with a fixed physical batch (dptrain.trainer._sampling guarantees)."""

import math

import numpy as np
import pytest

from dptrain.trainer import PoissonSampler

N, EXPECTED, STEPS = 400, 20.0, 2000


@pytest.fixture(scope="module")
def batches():
    sampler = PoissonSampler(dataset_size=N, expected_batch_size=EXPECTED,
                             physical_batch_size=60, key=bytes([3]) * 32)
    return [sampler.sample(t) for t in range(STEPS)]


def test_every_index_is_included_with_probability_q(batches):
    q = EXPECTED / N
    counts = np.zeros(N)
    for batch in batches:
        counts[batch.indices[batch.mask]] += 1
    # Each count is Binomial(STEPS, q): check the mean and the chi-square dispersion in std units.
    per_index_std = math.sqrt(STEPS * q * (1 - q))
    assert abs(counts.mean() - STEPS * q) < 5 * per_index_std / math.sqrt(N)
    chi2 = np.sum((counts - STEPS * q) ** 2) / (STEPS * q * (1 - q))
    assert abs(chi2 - N) < 5 * math.sqrt(2 * N)
    # A sampler with rate 1.1·q would be caught by the mean check.
    assert 0.1 * STEPS * q > 5 * per_index_std / math.sqrt(N)


def test_batch_sizes_are_binomial(batches):
    sizes = np.array([b.poisson_size for b in batches])
    q = EXPECTED / N
    mean, var = N * q, N * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / STEPS)
    assert abs(sizes.var() / var - 1) < 5 * math.sqrt(2 / STEPS)  # not a fixed-size batch


def test_pairs_are_included_independently(batches):
    q = EXPECTED / N
    both = sum(int(b.mask[np.isin(b.indices, [0, 1])].sum() == 2) for b in batches)
    expected = STEPS * q * q
    assert abs(both - expected) < 5 * math.sqrt(expected) + 1


def test_padding_rows_have_index_minus_one_and_mask_false(batches):
    for batch in batches[:50]:
        assert batch.indices.shape == (60,)
        assert np.all((batch.indices == -1) == ~batch.mask)
        real = batch.indices[batch.mask]
        assert len(set(real.tolist())) == real.size  # no duplicates
        assert batch.size == min(batch.poisson_size, 60)


def test_truncation_keeps_a_uniform_subset_of_exactly_the_physical_batch():
    sampler = PoissonSampler(dataset_size=100, expected_batch_size=50, physical_batch_size=30,
                             key=bytes([0]) * 32)
    counts = np.zeros(100)
    for t in range(400):
        batch = sampler.sample(t)
        assert batch.truncated and batch.size == 30
        counts[batch.indices] += 1
    # Uniform: every index is kept about 400·30/100 = 120 times.
    assert abs(counts.mean() - 120) < 1e-9
    assert np.all(np.abs(counts - 120) < 6 * math.sqrt(120))


def test_the_batch_is_a_function_of_the_secret_key_and_the_execution():
    a = PoissonSampler(dataset_size=N, expected_batch_size=EXPECTED, physical_batch_size=60,
                       key=bytes([1]) * 32)
    b = PoissonSampler(dataset_size=N, expected_batch_size=EXPECTED, physical_batch_size=60,
                       key=bytes([1]) * 32)
    other = PoissonSampler(dataset_size=N, expected_batch_size=EXPECTED, physical_batch_size=60,
                           key=bytes([2]) * 32)
    assert np.array_equal(a.sample(17).indices, b.sample(17).indices)
    assert not np.array_equal(a.sample(17).indices, a.sample(18).indices)
    assert not np.array_equal(a.sample(17).indices, other.sample(17).indices)
    assert "key" not in repr(a).replace("PoissonSampler", "")  # never printed


def test_bad_parameters_name_the_field():
    with pytest.raises(ValueError, match="batchSize"):
        PoissonSampler(dataset_size=10, expected_batch_size=20, physical_batch_size=30,
                       key=bytes(32))

"""Gaussian noise without a cut-off tail, and σ never rounded down (dptrain.trainer._noise)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dptrain.privacy import round_up_to_float32
from dptrain.trainer._dpsgd import noise_std
from dptrain.trainer._noise import gaussian_from_bits, secure_normal, threefry2x32, unit_circle


def _z(hi, lo, angle):
    z1, z2 = gaussian_from_bits(jnp.asarray([hi], jnp.uint32), jnp.asarray([lo], jnp.uint32),
                                jnp.asarray([angle], jnp.uint32))
    return float(z1[0]), float(z2[0])


def test_the_extreme_uniforms_reach_far_beyond_the_float32_erfinv_cut_off():
    # u₁ = ½·2⁻⁶⁴ (the smallest radius uniform), angle ≈ 0: r = √(2·65·ln 2) ≈ 9.49.
    z1, _ = _z(0, 0, 0)
    assert z1 > 8
    assert z1 == pytest.approx(math.sqrt(2 * 65 * math.log(2)), rel=1e-5)
    # A radius uniform of 2⁻⁴⁰ still gives |z| > 7.4: the tail is resolved, not cut off.
    assert _z(0, 2**24, 0)[0] == pytest.approx(math.sqrt(-2 * math.log(2.0**-40)), rel=1e-4)
    # The float32 jax.random.normal cannot exceed ≈ 5.4 (23-bit uniforms through erfinv).
    extreme = jax.scipy.special.erfinv(jnp.float32(1) - jnp.float32(2.0**-24)) * math.sqrt(2)
    assert float(extreme) < 5.5


def test_radius_uniforms_near_one_give_small_radii_accurately():
    # u₁ = 1 − 2⁻⁴⁰: −2 ln u₁ ≈ 2·2⁻⁴⁰, r ≈ 1.35e-6, computed from the complement (no rounding
    # of u₁ to 1 in float32, which would give exactly 0).
    hi, lo = 0xFFFFFFFF, 0xFFFFFFFF - 2**24 + 1
    z1, _ = _z(hi, lo, 0)
    assert z1 == pytest.approx(math.sqrt(2 * 2.0**-40), rel=1e-3)


@pytest.fixture(scope="module")
def draws():
    return np.asarray(secure_normal(jax.random.key(11), 1_000_000), dtype=np.float64)


def _ks_pvalue(ordered: np.ndarray, scale: float) -> float:
    """Kolmogorov–Smirnov p-value of sorted draws against N(0, scale²)."""
    n = ordered.size
    cdf = stats.norm.cdf(ordered / scale)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    return float(stats.kstwo.sf(d, n))


def test_a_million_draws_pass_kolmogorov_smirnov_and_a_wrong_scale_does_not(draws):
    assert draws.shape == (1_000_000,)
    ordered = np.sort(draws)
    assert _ks_pvalue(ordered, 1.0) > 1e-3
    head = draws[:2000]  # the hand-rolled statistic is scipy's (checked on a subset)
    assert _ks_pvalue(np.sort(head), 1.0) == pytest.approx(stats.kstest(head, "norm").pvalue,
                                                           rel=1e-6)
    # Power: the same test rejects a standard deviation only 1% off.
    assert _ks_pvalue(ordered, 1.01) < 1e-6
    assert _ks_pvalue(ordered, 0.99) < 1e-6


def test_tail_frequency_matches_the_gaussian(draws):
    # P(|z| > 4) = 6.33e-5: about 63 of 10⁶, Poisson-distributed.
    expected = 1e6 * 2 * stats.norm.sf(4)
    count = int(np.sum(np.abs(draws) > 4))
    assert abs(count - expected) < 5 * math.sqrt(expected)


def test_odd_sizes_and_distinct_keys_give_independent_draws():
    a = np.asarray(secure_normal(jax.random.key(1), 1001))
    b = np.asarray(secure_normal(jax.random.key(2), 1001))
    assert a.shape == (1001,)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(1001)


@pytest.mark.parametrize("clip", [1.0, 0.1, 0.7, 3.3e-3, 1e9])
def test_float32_noise_std_is_never_below_the_planned_sigma_times_c(clip):
    rng = np.random.default_rng(5)
    sigmas = [0.614, 1 / 3, 9.66, 2.81, *rng.uniform(0.3, 20, 300).tolist()]
    planned = np.asarray(sigmas, np.float64) * clip
    rounded = jnp.asarray([round_up_to_float32(x) for x in sigmas], jnp.float32)
    std = np.asarray(noise_std(rounded, clip), np.float64)
    assert np.all(std >= planned)  # compared in float64
    assert np.all(std <= planned * (1 + 4 * 2.0**-23))  # and only a few ulps above
    nearest = (np.asarray(sigmas, np.float32) * np.float32(clip)).astype(np.float64)
    assert np.sum(nearest < planned) > 10  # round-to-nearest would have lowered σ·C


def test_the_noise_of_every_leaf_is_cut_in_order_from_one_draw():
    """add_noise cuts one draw into the leaves: they get exactly secure_normal's numbers, in
    order, each coordinate its own (guarantee 3), with an odd total size."""
    from dptrain.trainer._dpsgd import add_noise

    leaves = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(4), "c": jnp.zeros((2, 3, 2))}  # 31 numbers
    key = jax.random.key(5)
    noisy = add_noise(leaves, key, 2.0)
    flat = np.concatenate([np.asarray(noisy[k]).ravel() for k in sorted(leaves)])
    expected = 2.0 * np.asarray(secure_normal(key, 31))
    np.testing.assert_array_equal(flat, expected.astype(np.float32))
    assert len(np.unique(flat)) == 31


def test_the_unrolled_threefry_is_jaxs_bit_for_bit():
    """Guarantee 4: the hash is JAX's own ``threefry2x32_p`` (which lowers to a rolled loop)."""
    from jax.extend.random import threefry2x32_p

    rng = np.random.default_rng(3)
    for _ in range(3):
        k1, k2 = (jnp.uint32(v) for v in rng.integers(0, 2**32, 2, dtype=np.uint64))
        x1, x2 = (jnp.asarray(rng.integers(0, 2**32, 4096, dtype=np.uint64), jnp.uint32)
                  for _ in range(2))
        ours = threefry2x32(k1, k2, x1, x2)
        theirs = threefry2x32_p.bind(k1, k2, x1, x2)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_angle_is_exact_and_its_cosine_and_sine_within_float32_rounding():
    """Guarantee 2's angle ``2π(u + ½)/2³²``: random words and every octant's edges."""
    edges = [o * 2**29 + r for o in range(8) for r in (0, 1, 2**28, 2**29 - 2, 2**29 - 1)]
    words = np.concatenate([np.asarray(edges, np.uint64), np.random.default_rng(4).integers(
        0, 2**32, 200_000, dtype=np.uint64)])
    cos, sin = unit_circle(jnp.asarray(words, jnp.uint32))
    theta = 2 * np.pi * (words.astype(np.float64) + 0.5) / 2**32
    # Absolute error in units of the unit circle: ≤ 2 float32 ulps of 1 (2.4e-7).
    assert np.max(np.abs(np.asarray(cos, np.float64) - np.cos(theta))) < 2.4e-7
    assert np.max(np.abs(np.asarray(sin, np.float64) - np.sin(theta))) < 2.4e-7
    # The signs follow the quadrant exactly (no octant mix-up at the edges).
    np.testing.assert_array_equal(np.sign(np.asarray(cos)), np.sign(np.cos(theta)))
    np.testing.assert_array_equal(np.sign(np.asarray(sin)), np.sign(np.sin(theta)))


def test_any_slice_of_the_sequence_is_drawn_alone_and_the_high_counter_word_carries():
    """Guarantee 3: coordinate j is a function of (key, j) alone, including past 2³².

    The hash words are exact; the float32 value of a coordinate may differ by an ulp or two
    with the code it is computed in (XLA contracts multiply-adds per fusion), so values drawn
    in differently cut calls are compared within 3 float32 ulps of their magnitude.
    """
    from dptrain.trainer._noise import CHUNK

    def close(a, b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3 * 2.0**-23, atol=1e-30)

    key = jax.random.key(9)
    whole = np.asarray(secure_normal(key, 3 * CHUNK + 100))  # the loop over chunks
    close(secure_normal(key, 37, offset=41), whole[41:78])
    close(secure_normal(key, CHUNK + 7, offset=CHUNK - 3), whole[CHUNK - 3:2 * CHUNK + 4])
    # Across the 2³² boundary: coordinates 2³²−3 … 2³²+2 use counters (0|1, l) then (2|3, l),
    # in a single call and in the loop (a chunk that wraps around mid-way) alike.
    across = np.asarray(secure_normal(key, 6, offset=2**32 - 3))
    close(across[:3], secure_normal(key, 3, 2**32 - 3))
    close(across[3:], secure_normal(key, 3, 2**32))
    looped = np.asarray(secure_normal(key, 2 * CHUNK, offset=2**32 - CHUNK - 3))
    close(looped[CHUNK:CHUNK + 6], across)
    data = jax.random.key_data(key)
    low = jnp.arange(3, dtype=jnp.uint32)
    hi, lo = threefry2x32(data[0], data[1], jnp.full(3, 2, jnp.uint32), low)
    angle, _ = threefry2x32(data[0], data[1], jnp.full(3, 3, jnp.uint32), low)
    close(across[3:], gaussian_from_bits(hi, lo, angle)[0])
    assert not np.any(np.abs(across[3:] - whole[:3]) < 1e-3)  # not the first coordinates again


def test_a_key_of_another_prng_is_refused():
    with pytest.raises(ValueError, match="threefry2x32 key"):
        secure_normal(jax.random.key(0, impl="rbg"), 10)

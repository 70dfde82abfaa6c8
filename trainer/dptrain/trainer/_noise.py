"""Gaussian noise without a cut-off tail: Box–Muller on 64-bit uniforms.

``jax.random.normal`` in float32 maps 23-bit uniforms through ``erfinv``, so ``|z|`` never
exceeds about 5.4: a coordinate of a noisy gradient beyond that can only be the data's, and
reveals it (Jin et al., S&P 2022, "Are we there yet? Timing and floating-point attacks on
differential privacy systems"). Here every normal comes from a **64-bit** uniform radius draw
``u₁ = (k + ½)·2⁻⁶⁴`` (``k`` from two 32-bit words) and a 32-bit angle ``u₂`` (Box–Muller):
``r = √(−2 ln u₁)``, ``z = r cos 2πu₂`` (``r sin 2πu₂`` is the pair's other, independent normal).
The radius needs the fine resolution (it sets the tail); the angle does not.

float32 all the way, yet with the resolution of the 64-bit integer: ``u₁`` is computed as a
float32 with relative (not absolute) error ≤ 2⁻²³ — float32's exponent reaches 2⁻¹²⁶, far below
2⁻⁶⁴ — and ``ln u₁`` is taken as ``log(u₁)`` for ``u₁ < ½`` and as ``log1p(−(1 − u₁))`` above,
with ``1 − u₁`` computed exactly from the complemented integer. This is the "≥ 53-bit uniforms"
construction in a form that runs at float32 speed on GPUs and TPUs (no float64 needed).

The angle's cosine and sine are evaluated from its integer, not from a float32 ``2πu₂``: the
top three bits pick the octant, the other 29 an offset ``φ ∈ (0, π/4)`` (complemented in the odd
octants, so that the angle is exactly ``2π(u + ½)/2³²`` either way), and ``cos φ``, ``sin φ``
are Taylor polynomials (truncation < 2e-9 on ``[0, π/4]``) — a few float32 roundings, where
``cos``/``sin`` of a float32 angle up to 2π carry its rounding (up to 2.4e-7 rad), and XLA:CPU
calls scalar ``libm`` for them (2.3 ms per 254K angles, 6× a vectorised ``log``).

The words come from Threefry-2x32 (Salmon et al. 2011, JAX's PRNG) under the step's secret key.
Coordinate ``j = h·2³² + l`` of a key's sequence takes its radius integer ``k`` whole from block
``(2h, l)`` (both output words) and its angle from the first word of block ``(2h + 1, l)``, and is
``r cos θ``, the first Box–Muller output (``r sin θ``, independent of it, is not used): each
coordinate is an elementwise function of its index, so any slice of the sequence is drawn
without the rest. The hash is written out here with its 20
rounds unrolled (:func:`threefry2x32`, equal bit for bit to JAX's ``threefry2x32_p``): JAX
lowers it on CPU as a 5-iteration loop that writes every word to memory between groups of
rounds (5× slower at a step's size), and ``jax.random.bits`` (with ``jax_threefry_partitionable``,
JAX's default) XORs a block's two words into one. Measured on the peers' benchmark model
(508,928 parameters, 2 CPU cores): one draw 7.3 → 3.1-3.4 ms (float32 ``jax.random.normal``:
2.8 ms); the step with noise ran 13 ms longer than without it, now 0-6 ms longer (within the
run-to-run spread).

Formal guarantees:
    1. Tail: the largest radius is ``√(2·ln 2⁶⁵) ≈ 9.49``; draws with ``|z| > 8`` occur with their
       Gaussian probability (≈ 1.2e-15 per coordinate) instead of never, and the radius of every
       64-bit ``u₁`` is computed with relative error ≤ a few float32 ulps.
    2. Distribution: up to float32 rounding of the outputs, ``z`` is N(0, 1) with the resolution
       of 64-bit uniforms (checked with a Kolmogorov–Smirnov test on 10⁶ draws); the angle is
       ``2π(u₂ + ½)/2³²`` exactly, its cosine and sine within a few float32 ulps.
    3. Every coordinate uses its own bits: coordinate ``j``'s two Threefry blocks (counters
       ``(2h, l)`` and ``(2h + 1, l)``) feed no other coordinate, and a leaf at offset ``o``
       takes coordinates ``o … o + size − 1`` (no coordinate is reused across leaves).
    4. Secrecy: the bits are Threefry-2x32 of distinct counters under the step's key (secret,
       ``_keys``); the hash is JAX's, bit for bit (tested against ``threefry2x32_p``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_TWO_POW_M32 = 2.0**-32
_TWO_POW_M64 = 2.0**-64
_OFFSET_BITS = 29  # an angle word: 3 octant bits, then the offset within the octant

# Threefry-2x32's rotation constants (two alternating groups of four rounds) and key-schedule
# parity constant, as in Salmon et al. 2011 and JAX.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << jnp.uint32(bits)) | (x >> jnp.uint32(32 - bits))


def threefry2x32(key1: jax.Array, key2: jax.Array, x1: jax.Array,
                 x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds of counters ``(x1, x2)`` under the key ``(key1, key2)``.

    JAX's hash (``jax.extend.random.threefry2x32_p``), written with its rounds unrolled so that
    XLA fuses all of them into one pass over the counters (see the module docstring).
    """
    keys = (key1, key2, key1 ^ key2 ^ jnp.uint32(_PARITY))
    x = [x1 + keys[0], x2 + keys[1]]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ _rotate_left(x[1], rotation)
        x[0] = x[0] + keys[(group + 1) % 3]
        x[1] = x[1] + keys[(group + 2) % 3] + jnp.uint32(group + 1)
    return x[0], x[1]


def _unit_from_words(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """``(hi·2³² + lo + ½)·2⁻⁶⁴`` as float32 with small relative error (see module docstring)."""
    high = hi.astype(jnp.float32) * jnp.float32(_TWO_POW_M32)
    low = (lo.astype(jnp.float32) + jnp.float32(0.5)) * jnp.float32(_TWO_POW_M64)
    return high + low


def _cos_sin_quarter(phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos φ, sin φ)`` for ``φ ∈ [0, π/4]``: Taylor polynomials, truncation < 2e-9."""
    p2 = phi * phi
    cos = 1.0 + p2 * (-1 / 2 + p2 * (1 / 24 + p2 * (-1 / 720 + p2 * (1 / 40320
                                                                     + p2 * (-1 / 3628800)))))
    sin = phi * (1.0 + p2 * (-1 / 6 + p2 * (1 / 120 + p2 * (-1 / 5040 + p2 * (1 / 362880)))))
    return cos.astype(jnp.float32), sin.astype(jnp.float32)


def unit_circle(angle: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos θ, sin θ)`` of ``θ = 2π(angle + ½)/2³²`` from the uint32 ``angle`` (no libm).

    ``angle = o·2²⁹ + r``: in an even octant ``θ = o·π/4 + φ(r)``, in an odd one ``θ = (o+1)·π/4
    − φ(2²⁹−1−r)``, with ``φ(r) = (r + ½)·2⁻²⁹·π/4 ∈ (0, π/4)``; ``θ`` is then a multiple of π/2
    plus or minus ``φ``, whose cosine and sine are ``±cos φ``, ``±sin φ``, swapped.
    """
    octant = angle >> jnp.uint32(_OFFSET_BITS)
    offset = angle & jnp.uint32(2**_OFFSET_BITS - 1)
    odd = (octant & jnp.uint32(1)) == 1
    offset = jnp.where(odd, jnp.uint32(2**_OFFSET_BITS - 1) - offset, offset)
    phi = (offset.astype(jnp.float32) + jnp.float32(0.5)) * jnp.float32(
        math.pi / 4 * 2.0**-_OFFSET_BITS)
    cos_phi, sin_phi = _cos_sin_quarter(phi)
    sin_phi = jnp.where(odd, -sin_phi, sin_phi)  # θ = kπ/2 + s·φ: cos/sin of s·φ
    quadrant = ((octant + jnp.uint32(1)) >> jnp.uint32(1)) & jnp.uint32(3)  # k
    swap = (quadrant & jnp.uint32(1)) == 1
    cos = jnp.where(swap, -sin_phi, cos_phi)  # k = 1: (−sin, cos); k = 3: (sin, −cos)
    sin = jnp.where(swap, cos_phi, sin_phi)
    cos = jnp.where((quadrant == 2) | (quadrant == 3), -cos, cos)  # k = 2, 3: negated
    sin = jnp.where(quadrant >= 2, -sin, sin)
    return cos, sin


def _radius(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """``√(−2 ln u₁)`` of the radius uniform ``u₁ = (k + ½)·2⁻⁶⁴``, ``k = hi·2³² + lo``."""
    upper = hi >= jnp.uint32(2**31)  # u₁ ≥ ½: take 1 − u₁ from the complemented integer
    small = _unit_from_words(jnp.where(upper, ~hi, hi), jnp.where(upper, ~lo, lo))
    log_u = jnp.where(upper, jnp.log1p(-small), jnp.log(small))
    return jnp.sqrt(jnp.float32(-2.0) * log_u)


def gaussian_from_bits(hi: jax.Array, lo: jax.Array, angle: jax.Array) -> tuple[jax.Array,
                                                                                jax.Array]:
    """Two standard normals per ``(hi, lo, angle)`` triple of uint32 words (Box–Muller).

    ``(hi, lo)`` is the 64-bit integer ``k`` of the radius uniform ``u₁ = (k + ½)·2⁻⁶⁴``.
    :func:`secure_normal` keeps the first of the two (see there).
    """
    radius = _radius(hi, lo)
    cos, sin = unit_circle(angle)
    return radius * cos, radius * sin


def _key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 words of a Threefry-2x32 JAX key (typed or raw ``uint32[2]``)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if data.shape != (2,) or data.dtype != jnp.uint32:
        raise ValueError("secure_normal needs a threefry2x32 key (uint32[2] key data); got "
                         f"key data of shape {data.shape} and dtype {data.dtype}")
    return data[0], data[1]


# Coordinates drawn per iteration of the draw's loop (see secure_normal).
CHUNK = 2**16


def _coordinates(key1: jax.Array, key2: jax.Array, high: jax.Array, start: jax.Array,
                 size: int) -> jax.Array:
    """Coordinates ``high·2³² + start … + size − 1`` (traced ``uint32`` words; no 2⁶⁴ wrap)."""
    index = jnp.arange(size, dtype=jnp.uint32)
    low = index + start
    carry = (low < index).astype(jnp.uint32)  # the low word wrapped around
    block = (high + carry) * jnp.uint32(2)
    hi, lo = threefry2x32(key1, key2, block, low)
    angle, _ = threefry2x32(key1, key2, block + jnp.uint32(1), low)
    return gaussian_from_bits(hi, lo, angle)[0]  # r cos θ (the unused r sin θ is not computed)


def secure_normal(key: jax.Array, size: int, offset: int = 0) -> jax.Array:
    """Coordinates ``offset … offset + size − 1`` of the key's i.i.d. N(0, 1) float32 sequence.

    Coordinate ``j`` is ``r cos θ`` (the first Box–Muller output) of its own two Threefry blocks:
    the radius integer is block ``(2h, l)`` and the angle the first word of block ``(2h + 1, l)``,
    ``j = h·2³² + l``. The second output ``r sin θ`` is not used: every coordinate is an
    elementwise function of its index, so any slice of the sequence is had without the rest.

    The draw runs as a loop over :data:`CHUNK` coordinates at a time, whose body (one fusion:
    both hashes, the radius and the angle) XLA compiles once and writes out whole. Measured on
    the peers' benchmark step (``bench/peers``), against a draw fused into each leaf's addition
    (as fast, but a copy of the code to compile per leaf: the DP step compiled in 1.81× the
    non-private step's time, here 1.52×) and one flat draw cut into the leaves (10-15 ms a step
    slower: XLA:CPU then fused the angle's part into every cut).
    """
    if size >= 2**32:
        raise ValueError(f"one secure_normal call draws fewer than 2³² coordinates (got {size})")
    key1, key2 = _key_words(key)
    high, base = jnp.uint32(offset // 2**32), offset % 2**32
    if size <= CHUNK:
        return _coordinates(key1, key2, high, jnp.uint32(base), size)

    def chunk(_: None, i: jax.Array) -> tuple[None, jax.Array]:
        start = jnp.uint32(base) + i.astype(jnp.uint32) * jnp.uint32(CHUNK)
        wrapped = (start < jnp.uint32(base)).astype(jnp.uint32)  # i·CHUNK < 2³²: at most once
        return None, _coordinates(key1, key2, high + wrapped, start, CHUNK)

    _, out = jax.lax.scan(chunk, None, jnp.arange(-(-size // CHUNK)))
    return out.reshape(-1)[:size]

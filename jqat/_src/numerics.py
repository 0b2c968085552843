"""The quantize -> dequantize arithmetic, written once.

Every path that maps floats onto a format's grid calls these functions:
``fake_quant``'s forward, ``quantize`` / ``dequantize``, the QAT dot and the
MSE threshold search. With ``s`` the scale and ``z`` the (integer) zero point:

* grid units: ``u = x / s``, evaluated as ``x * (1 / s)`` (``to_grid_units``);
* integers: ``q = clip(round(u) + z, qmin, qmax)``, rounding half to even
  unless the config's ``rounding`` says otherwise (``round_units``);
* fp8: ``q = fp8_round(clip(u, -max, max))`` (clip first: the cast does not
  saturate), rounded with ``lax.reduce_precision`` (``round_to_float8``);
* dequantize: ``x_hat = (q - z) * s``, with ``s`` rounded to the config's
  ``scale_dtype`` when it has one (``stored_scale``);
* the clipped STE's mask: ``qmin <= round(u) + z <= qmax`` (``in_range``).

A ``Grid`` holds what the arithmetic needs to know about a format: its bounds
and, for fp8, which fp8 format. ``grid(config)`` builds it from a config; the
MSE search builds its narrow symmetric grid directly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jqat._src.config import QatConfig, Rounding
from jqat._src.formats import QuantBits

# Grid units are defined next to the scale they divide by: the scale itself is
# computed with them, so parameters and grid positions agree bit for bit.
from jqat._src.qparams import to_grid_units as to_grid_units


class Grid(NamedTuple):
  """The values a format may hold: ``qmin .. qmax`` (integers) or ``±max`` rounded to an fp8 format.

  Attributes:
    qmin: the smallest value (``-max`` for fp8).
    qmax: the largest value.
    float_bits: the fp8 ``QuantBits``, or None for an integer grid.
    rounding: how an integer grid rounds (``Rounding``).
  """

  qmin: float
  qmax: float
  float_bits: QuantBits | None = None
  rounding: Rounding = Rounding.HALF_EVEN


def grid(config: QatConfig) -> Grid:
  """The ``Grid`` of a config.

  Examples:
    >>> import jqat
    >>> grid(jqat.QatConfig(bits="int4", narrow_range=True))
    Grid(qmin=-7.0, qmax=7.0, float_bits=None, rounding=<Rounding.HALF_EVEN: 'half_even'>)
  """
  bits = config.bits
  return Grid(float(config.qmin), float(config.qmax), bits if bits.is_float else None, config.rounding)


def _as_grid(g: Grid | QatConfig) -> Grid:
  return grid(g) if isinstance(g, QatConfig) else g


def round_to_float8(c: jax.Array, bits: QuantBits) -> jax.Array:
  """Rounds ``c`` (already inside ``±max``) to the nearest fp8 value, ties to even; the result stays in c's dtype.

  The same values as ``c.astype(fp8).astype(c.dtype)``, but that round trip is
  not safe to write: XLA may drop a narrowing convert followed by a widening
  one (``xla_allow_excess_precision``, on by default on GPU), and fake quant
  would then not quantize at all. ``reduce_precision`` is the op XLA keeps.
  Normal values keep the format's mantissa bits; below the smallest normal
  ``2^emin`` the grid is uniform with step ``2^(emin - mantissa)``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> round_to_float8(jnp.float32(1.0625), jqat.QuantBits.FP8_E4M3).item()
    1.0
  """
  return _round_mantissa(c, bits.float_dtype)


def _round_mantissa(c: jax.Array, dtype) -> jax.Array:
  """``c`` rounded to the mantissa and subnormal grid of the float ``dtype`` (ties to even), in c's dtype."""
  info = jnp.finfo(dtype)
  mant, emin = int(info.nmant), int(info.minexp)
  normal = lax.reduce_precision(c, exponent_bits=jnp.finfo(c.dtype).nexp, mantissa_bits=mant)
  # Powers of two: the multiplications are exact. Beyond 2^100 the factor is applied in two steps, each a
  # finite float32 (bfloat16's 2^133 is not).
  if mant - emin <= 100:
    subnormal = jnp.round(c * 2.0 ** (mant - emin)) * 2.0 ** (emin - mant)
  else:
    subnormal = jnp.round(c * 2.0**-emin * 2.0**mant) * 2.0**-mant * 2.0**emin
  return jnp.where(jnp.abs(c) < 2.0**emin, subnormal, normal)


def round_to_dtype(c: jax.Array, dtype) -> jax.Array:
  """``c.astype(dtype).astype(c.dtype)`` for a float ``dtype`` narrower than c's, written so XLA keeps it.

  Ties to even, subnormals of ``dtype`` kept, values beyond its largest finite
  one become ±Inf, as the cast does (see ``round_to_float8`` for why the cast
  itself is not written).

  Examples:
    >>> import jax.numpy as jnp
    >>> round_to_dtype(jnp.array([1 + 2.0**-11, 2.0**-24 * 1.5, 65520.0]), jnp.float16).tolist()
    [1.0, 1.1920928955078125e-07, inf]
  """
  dtype = jnp.dtype(dtype)
  c = jnp.asarray(c)
  if dtype == c.dtype:
    return c
  r = _round_mantissa(c, dtype)
  big = jnp.abs(r) > float(jnp.finfo(dtype).max)
  return jnp.where(big, jnp.copysign(jnp.asarray(jnp.inf, r.dtype), r), r)


def stored_scale(scale, config: QatConfig) -> jax.Array:
  """The scale dequantization multiplies by: ``scale`` rounded to ``config.scale_dtype`` (as a file stores it).

  The result keeps the dtype of ``scale``. Without a ``scale_dtype`` this is ``scale`` itself.
  """
  scale = jnp.asarray(scale)
  if config.scale_dtype is None:
    return scale
  return round_to_dtype(scale, config.scale_dtype)


def round_units(u: jax.Array, rounding: Rounding, qmin: float) -> jax.Array:
  """Grid units rounded to integers (still floats) by ``rounding``; NaN stays NaN, ±Inf stays ±Inf.

  * ``half_even``: ``jnp.round``.
  * ``half_away_from_zero``: ``floor(|u|)``, plus 1 where the fraction
    ``|u| - floor(|u|)`` (exact in floating point) is at least 0.5, with u's
    sign; the ``gguf`` package's ``np_roundf``. Zero comes out as +0.
  * ``half_up_unsigned``: ``floor(u + (0.5 - qmin)) + qmin``, the sum rounded
    in u's dtype exactly as llama.cpp's ``trunc(x * id + 8.5)`` (floor equals
    trunc where that sum is not negative, and below it both clip to ``qmin``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jqat._src.config import Rounding
    >>> u = jnp.array([-2.5, -0.5, 0.5, 1.5])
    >>> [round_units(u, r, -8.0).tolist() for r in Rounding]
    [[-2.0, -0.0, 0.0, 2.0], [-3.0, -1.0, 1.0, 2.0], [-2.0, 0.0, 1.0, 2.0]]
  """
  if rounding is Rounding.HALF_EVEN:
    return jnp.round(u)
  if rounding is Rounding.HALF_AWAY_FROM_ZERO:
    a = jnp.abs(u)
    f = jnp.floor(a)
    b = f + jnp.where(a - f >= 0.5, 1.0, 0.0).astype(u.dtype)  # a - f is NaN for Inf: then b = f = Inf
    signed = jnp.where(u < 0, -b, b)
    return jnp.where(b == 0, jnp.zeros_like(b), signed)
  return jnp.floor(u + jnp.asarray(0.5 - qmin, u.dtype)) + jnp.asarray(qmin, u.dtype)


def effective_zero_point(zero_point, config: QatConfig, dtype) -> jax.Array:
  """The integer zero point the grid uses: 0 when symmetric, else ``clip(round(z), qmin, qmax)``.

  A learned (LSQ) zero point is a float parameter; the grid needs an integer.
  """
  zp = jnp.asarray(zero_point, dtype)
  if config.symmetric:
    return jnp.zeros_like(zp)
  return jnp.clip(jnp.round(zp), config.qmin, config.qmax)


def quantize_grid(x_scaled: jax.Array, zero_point, g: Grid | QatConfig) -> jax.Array:
  """Maps ``x / scale`` onto the grid; returns the quantized values as floats.

  Integers: ``clip(round(x / scale) + zero_point, qmin, qmax)``, rounded by
  the grid's ``rounding`` (half to even by default).
  fp8: ``clip(x / scale, -max, max)`` rounded to the nearest fp8 value (ties to
  even), exactly what the cast to the fp8 dtype gives. The clip comes first
  because the cast does not saturate (465 becomes NaN in e4m3fn). NaN stays NaN.
  """
  g = _as_grid(g)
  if g.float_bits is not None:
    return round_to_float8(jnp.clip(x_scaled, g.qmin, g.qmax), g.float_bits)
  return jnp.clip(round_units(x_scaled, g.rounding, g.qmin) + zero_point, g.qmin, g.qmax)


def grid_position(x_scaled: jax.Array, zero_point, g: Grid | QatConfig) -> jax.Array:
  """Where ``x / scale`` lands on the grid before clipping: ``round(x / s) + z``, or the fp8 rounding."""
  g = _as_grid(g)
  if g.float_bits is not None:
    return round_to_float8(x_scaled, g.float_bits)
  return round_units(x_scaled, g.rounding, g.qmin) + zero_point


def in_range(x_scaled: jax.Array, zero_point, g: Grid | QatConfig) -> jax.Array:
  """The clipped STE's mask: False exactly where ``x`` is clipped to the grid's ends.

  The test is on the rounded position, as in PyTorch's fake quantization
  (``qmin <= round(x / s) + z <= qmax``), not on ``x / s`` itself: the largest
  element of a tensor quantized with its own range sits at ``x / s = qmax``
  up to one float rounding, and must keep its gradient. A NaN is not clipped
  (it stays NaN), so its gradient passes as in float arithmetic instead of
  being silently zeroed.
  """
  g = _as_grid(g)
  pos = grid_position(x_scaled, zero_point, g)
  return ~((pos < g.qmin) | (pos > g.qmax))


def quantize_values(x: jax.Array, scale, zero_point, config: QatConfig, dtype) -> tuple[jax.Array, ...]:
  """Grid values of ``x`` in ``dtype`` (the compute dtype), with the grid units and the integer zero point.

  ``x``, ``scale`` and ``zero_point`` must already broadcast against each
  other (the grouped layout for per-group parameters). Returns
  ``(q, x_scaled, zero_point)``.
  """
  xs = to_grid_units(jnp.asarray(x).astype(dtype), jnp.asarray(scale).astype(dtype))
  zp = effective_zero_point(zero_point, config, dtype)
  return quantize_grid(xs, zp, config), xs, zp


def dequantize_values(q: jax.Array, scale, zero_point, dtype) -> jax.Array:
  """``(q - zero_point) * scale`` in ``q``'s (compute) dtype, cast to ``dtype``.

  ``zero_point`` is the integer one (``effective_zero_point``).
  """
  cd = q.dtype
  return ((q - jnp.asarray(zero_point, cd)) * jnp.asarray(scale).astype(cd)).astype(dtype)


def fake_quant_values(x: jax.Array, scale, zero_point, config: QatConfig, dtype) -> tuple[jax.Array, ...]:
  """``dequantize_values(quantize_values(x))`` in ``x``'s dtype, plus what the gradients need.

  Dequantization multiplies by ``stored_scale(scale, config)``.

  Returns ``(y, q, x_scaled, zero_point, inside)``.
  """
  q, xs, zp = quantize_values(x, scale, zero_point, config, dtype)
  y = dequantize_values(q, stored_scale(scale, config), zp, x.dtype)
  return y, q, xs, zp, in_range(xs, zp, config)

"""The quantize -> dequantize arithmetic, written once.

Every path that maps floats onto a format's grid calls these functions:
``fake_quant``'s forward, ``quantize`` / ``dequantize``, the QAT dot and the
MSE threshold search. With ``s`` the scale and ``z`` the (integer) zero point:

* grid units: ``u = x / s``, evaluated as ``x * (1 / s)`` (``to_grid_units``);
* integers: ``q = clip(round_half_even(u) + z, qmin, qmax)``;
* fp8: ``q = fp8_round(clip(u, -max, max))`` (clip first: the cast does not
  saturate), rounded with ``lax.reduce_precision`` (``round_to_float8``);
* dequantize: ``x_hat = (q - z) * s``;
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

from jqat._src.config import QatConfig
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
  """

  qmin: float
  qmax: float
  float_bits: QuantBits | None = None


def grid(config: QatConfig) -> Grid:
  """The ``Grid`` of a config.

  Examples:
    >>> import jqat
    >>> grid(jqat.QatConfig(bits="int4", narrow_range=True))
    Grid(qmin=-7.0, qmax=7.0, float_bits=None)
  """
  bits = config.bits
  return Grid(float(config.qmin), float(config.qmax), bits if bits.is_float else None)


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
  info = jnp.finfo(bits.float_dtype)
  mant, emin = int(info.nmant), int(info.minexp)
  normal = lax.reduce_precision(c, exponent_bits=jnp.finfo(c.dtype).nexp, mantissa_bits=mant)
  # Powers of two: both multiplications are exact.
  subnormal = jnp.round(c * 2.0 ** (mant - emin)) * 2.0 ** (emin - mant)
  return jnp.where(jnp.abs(c) < 2.0**emin, subnormal, normal)


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

  Integers: ``clip(round_half_even(x / scale) + zero_point, qmin, qmax)``.
  fp8: ``clip(x / scale, -max, max)`` rounded to the nearest fp8 value (ties to
  even), exactly what the cast to the fp8 dtype gives. The clip comes first
  because the cast does not saturate (465 becomes NaN in e4m3fn). NaN stays NaN.
  """
  g = _as_grid(g)
  if g.float_bits is not None:
    return round_to_float8(jnp.clip(x_scaled, g.qmin, g.qmax), g.float_bits)
  return jnp.clip(jnp.round(x_scaled) + zero_point, g.qmin, g.qmax)


def grid_position(x_scaled: jax.Array, zero_point, g: Grid | QatConfig) -> jax.Array:
  """Where ``x / scale`` lands on the grid before clipping: ``round(x / s) + z``, or the fp8 rounding."""
  g = _as_grid(g)
  if g.float_bits is not None:
    return round_to_float8(x_scaled, g.float_bits)
  return jnp.round(x_scaled) + zero_point


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

  Returns ``(y, q, x_scaled, zero_point, inside)``.
  """
  q, xs, zp = quantize_values(x, scale, zero_point, config, dtype)
  y = dequantize_values(q, scale, zp, x.dtype)
  return y, q, xs, zp, in_range(xs, zp, config)

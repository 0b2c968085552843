"""Fake quantization with straight-through (STE) or learned-step-size (LSQ) gradients.

``fake_quant(x) = (clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``
for integer formats, and ``clip(x / scale, -max, max).astype(fp8) * scale`` for
fp8, with ``x / scale`` evaluated as ``x * (1 / scale)`` (see ``to_grid_units``).
The forward is the same arithmetic as ``dequantize(quantize(x))``, so the two
agree bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jqat._src import formats
from jqat._src import qparams as qparams_lib
from jqat._src.config import Estimator, QatConfig
from jqat._src.qparams import QParams
from jqat._src.qparams import to_grid_units as to_grid_units


def _round_to_float8(c: jax.Array, bits) -> jax.Array:
  """Rounds ``c`` (already inside ``±max``) to the nearest fp8 value, ties to even; the result stays in c's dtype.

  The same values as ``c.astype(fp8).astype(c.dtype)``, but that round trip is
  not safe to write: XLA may drop a narrowing convert followed by a widening
  one (``xla_allow_excess_precision``, on by default on GPU), and fake quant
  would then not quantize at all. ``reduce_precision`` is the op XLA keeps.
  Normal values keep the format's mantissa bits; below the smallest normal
  ``2^emin`` the grid is uniform with step ``2^(emin - mantissa)``.
  """
  info = jnp.finfo(bits.float_dtype)
  mant, emin = int(info.nmant), int(info.minexp)
  normal = lax.reduce_precision(c, exponent_bits=jnp.finfo(c.dtype).nexp, mantissa_bits=mant)
  # Powers of two: both multiplications are exact.
  subnormal = jnp.round(c * 2.0 ** (mant - emin)) * 2.0 ** (emin - mant)
  return jnp.where(jnp.abs(c) < 2.0**emin, subnormal, normal)


def quantize_grid(x_scaled: jax.Array, zero_point: jax.Array, config: QatConfig) -> jax.Array:
  """Maps ``x / scale`` onto the format's grid; returns the quantized values as floats.

  Integers: ``clip(round_half_even(x / scale) + zero_point, qmin, qmax)``.
  fp8: ``clip(x / scale, -max, max)`` rounded to the nearest fp8 value (ties to
  even), exactly what the cast to the fp8 dtype gives. The clip comes first
  because the cast does not saturate (465 becomes NaN in e4m3fn).
  """
  if config.bits.is_float:
    m = config.bits.float_max
    return _round_to_float8(jnp.clip(x_scaled, -m, m), config.bits)
  return jnp.clip(jnp.round(x_scaled) + zero_point, config.qmin, config.qmax)


def grid_position(x_scaled: jax.Array, zero_point: jax.Array, config: QatConfig) -> jax.Array:
  """Where ``x / scale`` lands on the format's grid before clipping: ``round(x / s) + z``, or the fp8 rounding."""
  if config.bits.is_float:
    return _round_to_float8(x_scaled, config.bits)
  return jnp.round(x_scaled) + zero_point


def in_range(x_scaled: jax.Array, zero_point: jax.Array, config: QatConfig) -> jax.Array:
  """The clipped STE's mask: True where ``x`` quantizes to a grid value without clipping.

  The test is on the rounded position, as in PyTorch's fake quantization
  (``qmin <= round(x / s) + z <= qmax``), not on ``x / s`` itself: the largest
  element of a tensor quantized with its own range sits at ``x / s = qmax``
  up to one float rounding, and must keep its gradient.
  """
  pos = grid_position(x_scaled, zero_point, config)
  return (pos >= config.qmin) & (pos <= config.qmax)


def _effective_zero_point(zero_point, config: QatConfig, dtype):
  # A learned (LSQ) zero point is a float parameter; the grid needs an integer.
  zp = jnp.asarray(zero_point, dtype)
  if config.symmetric:
    return jnp.zeros_like(zp)
  return jnp.clip(jnp.round(zp), config.qmin, config.qmax)


def _forward(x, scale, zero_point, config: QatConfig):
  """Fake-quant forward on grouped-layout arrays; also returns the in-range mask."""
  cd = formats.compute_dtype(x.dtype)
  xs = to_grid_units(x.astype(cd), scale.astype(cd))
  zp = _effective_zero_point(zero_point, config, cd)
  q = quantize_grid(xs, zp, config)
  y = ((q - zp) * scale.astype(cd)).astype(x.dtype)
  return y, q, xs, zp, in_range(xs, zp, config)


# --- clipped STE (Bengio et al. 2013) --------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant_ste(config, x, scale, zero_point):
  return _forward(x, scale, zero_point, config)[0]


def _fake_quant_ste_fwd(config, x, scale, zero_point):
  y, _, _, _, inside = _forward(x, scale, zero_point, config)
  # Only the mask is needed: one byte per element instead of the whole input.
  return y, (inside, scale, zero_point)


def _fake_quant_ste_bwd(config, res, g):
  inside, scale, zero_point = res
  # Clipped straight-through estimator: d round / du := 1 inside the
  # representable range, 0 outside. Scale and zero point get no gradient.
  dx = jnp.where(inside, g, jnp.zeros_like(g))
  return dx, jnp.zeros_like(scale), jnp.zeros_like(zero_point)


_fake_quant_ste.defvjp(_fake_quant_ste_fwd, _fake_quant_ste_bwd)


# --- LSQ (Esser et al. 2020) ------------------------------------------------------


def _sum_to(t: jax.Array, shape) -> jax.Array:
  """Sums a broadcast result back to ``shape`` (the shape of a parameter)."""
  shape = tuple(shape)
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1
  )
  return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _fake_quant_lsq(config, x, scale, zero_point, grad_scale):
  return _forward(x, scale, zero_point, config)[0]


def _fake_quant_lsq_fwd(config, x, scale, zero_point, grad_scale):
  y, _, _, _, _ = _forward(x, scale, zero_point, config)
  return y, (x, scale, zero_point)


def _fake_quant_lsq_bwd(config, grad_scale, res, g):
  x, scale, zero_point = res
  _, q, xs, zp, inside = _forward(x, scale, zero_point, config)
  cd = xs.dtype
  gc = g.astype(cd)
  below = xs + zp < config.qmin
  # LSQ step-size gradient, zero-point form (Esser et al. 2020, eq. 3):
  #   inside: round(x/s) - x/s  (= (x_hat - x) / s),
  #   below:  qmin - z,  above: qmax - z.
  ds_elem = jnp.where(inside, (q - zp) - xs, jnp.where(below, config.qmin - zp, config.qmax - zp))
  ds = _sum_to(gc * ds_elem, jnp.shape(scale)) * grad_scale
  dx = jnp.where(inside, g, jnp.zeros_like(g))
  if config.symmetric:
    dz = jnp.zeros(jnp.shape(zero_point), jnp.result_type(zero_point))
  else:
    # x_hat = (clip(.) - z) * s: the zero point moves the output only where
    # the input is clipped, by -s per unit (PyTorch's learnable fake quant).
    dz_elem = jnp.where(inside, 0.0, -scale.astype(cd))
    dz = (_sum_to(gc * dz_elem, jnp.shape(zero_point)) * grad_scale).astype(jnp.result_type(zero_point))
  return dx, ds.astype(jnp.result_type(scale)), dz


_fake_quant_lsq.defvjp(_fake_quant_lsq_fwd, _fake_quant_lsq_bwd)


def lsq_grad_scale(num_elements: int, num_scales: int, config: QatConfig) -> float:
  """LSQ's gradient scale ``1 / sqrt(N * Q_P)``, N the elements sharing one scale.

  Examples:
    >>> import jqat
    >>> round(lsq_grad_scale(1000, 1, jqat.QatConfig(bits="int4")), 7)
    0.0119523
  """
  n = max(num_elements // max(num_scales, 1), 1)
  return float(1.0 / (n * config.qmax) ** 0.5)


def fake_quant(
    x: ArrayLike,
    qparams: QParams,
    config: QatConfig,
    *,
    grad_scale: float | None = None,
) -> jax.Array:
  """Quantizes and dequantizes ``x``; differentiable with a straight-through gradient.

  ``y = (clip(round(x / s) + z, qmin, qmax) - z) * s`` for integers (round half
  to even), ``y = fp8(clip(x / s, -max, max)) * s`` for fp8, where ``x / s``
  is evaluated as ``x * (1 / s)`` in every context. The arithmetic runs in
  float32 (float64 for float64 inputs) and ``y`` has the shape and dtype of
  ``x``.

  Gradients, by ``config.estimator``:

  * ``"ste"``: clipped straight-through estimator,
    ``dy/dx = 1`` where ``qmin <= round(x / s) + z <= qmax`` (x quantizes without clipping) and 0 outside; no
    gradient for ``s`` and ``z``.
  * ``"lsq"``: the same ``dy/dx``, plus the LSQ step-size gradient
    ``dy/ds = round(x/s) - x/s`` inside, ``qmin - z`` below, ``qmax - z``
    above, and ``dy/dz = -s`` outside the range (0 inside), both multiplied by
    ``grad_scale`` (default ``1 / sqrt(N * qmax)``, N the elements per scale).

  Args:
    x: float array (float32, bfloat16, float16 or float64).
    qparams: ``QParams`` in the parameter layout of ``x`` (see
      ``qparams_from_range``); scalars broadcast.
    config: the format and mode.
    grad_scale: LSQ only; overrides the default gradient scale.

  Returns:
    The fake-quantized array, same shape and dtype as ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(bits="int8")
    >>> qp = jqat.qparams_from_range(-2.0, 2.0, cfg)
    >>> jqat.fake_quant(jnp.array([1.0, 3.0]), qp, cfg).tolist()
    [1.0078740119934082, 2.0]
    >>> jax.grad(lambda x: jqat.fake_quant(x, qp, cfg).sum())(jnp.array([1.0, 3.0])).tolist()
    [1.0, 0.0]

  References:
    Bengio, Léonard and Courville, "Estimating or propagating gradients through
    stochastic neurons for conditional computation", 2013.
    Esser et al., "Learned Step Size Quantization", ICLR 2020.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fake_quant needs a float array, got dtype {x.dtype}")
  qparams_lib.kept_axes(x.shape, config)  # a channel or group axis that x lacks is an error, not a silent broadcast
  scale = qparams_lib.params_to_groups(qparams.scale, x.ndim, config)
  zero_point = qparams_lib.params_to_groups(qparams.zero_point, x.ndim, config)
  xg = qparams_lib.to_groups(x, config)
  if config.estimator is Estimator.LSQ:
    if grad_scale is None:
      grad_scale = lsq_grad_scale(x.size, int(jnp.size(qparams.scale)), config)
    yg = _fake_quant_lsq(config, xg, scale, zero_point, float(grad_scale))
  else:
    yg = _fake_quant_ste(config, xg, scale, zero_point)
  return qparams_lib.from_groups(yg, x.shape, config)

"""Fake quantization with straight-through (STE) or learned-step-size (LSQ) gradients.

``fake_quant(x) = (clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``
for integer formats, and ``clip(x / scale, -max, max).astype(fp8) * scale`` for
fp8, with ``x / scale`` evaluated as ``x * (1 / scale)``. The arithmetic is
``jqat._src.numerics``, the same as ``dequantize(quantize(x))``, so the two
agree bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jqat._src import formats, numerics
from jqat._src import qparams as qparams_lib
from jqat._src.config import Estimator, QatConfig
from jqat._src.qparams import MIN_SCALE, QParams


def _forward(x, scale, zero_point, config: QatConfig):
  """Fake-quant forward on grouped-layout arrays: ``(y, q, x / s, z, in-range mask)``."""
  return numerics.fake_quant_values(x, scale, zero_point, config, formats.compute_dtype(x.dtype))


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


def _lsq_scale(scale):
  # A learned scale that training drives to 0 or below would leave no grid:
  # the forward uses max(scale, MIN_SCALE). Its gradient passes straight
  # through the clamp, so the scale can be trained back up.
  return jnp.maximum(scale, jnp.asarray(MIN_SCALE, jnp.result_type(scale)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _fake_quant_lsq(config, x, scale, zero_point, grad_scale):
  return _forward(x, _lsq_scale(scale), zero_point, config)[0]


def _fake_quant_lsq_fwd(config, x, scale, zero_point, grad_scale):
  y, _, _, _, _ = _forward(x, _lsq_scale(scale), zero_point, config)
  return y, (x, scale, zero_point)


def _fake_quant_lsq_bwd(config, grad_scale, res, g):
  x, scale, zero_point = res
  _, q, xs, zp, inside = _forward(x, _lsq_scale(scale), zero_point, config)
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
    dz_elem = jnp.where(inside, 0.0, -_lsq_scale(scale).astype(cd))
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
    The forward uses ``max(s, MIN_SCALE)`` (``MIN_SCALE = 2^-126``), so a
    learned scale driven to 0 or below still has a grid; its gradient passes
    the clamp unchanged.

  NaN: a NaN element stays NaN in ``y`` and is not "clipped", so its
  gradient passes as in float arithmetic. ±Inf is clipped to the grid's ends.

  Args:
    x: float array (float32, bfloat16, float16 or float64).
    qparams: ``QParams`` in the parameter layout of ``x``
      (``params_shape(x.shape, config)``; leading size-1 axes may be left out,
      and a per-tensor scale may be a scalar).
    config: the format and mode.
    grad_scale: LSQ only; overrides the default gradient scale.

  Returns:
    The fake-quantized array, same shape and dtype as ``x``.

  Raises:
    TypeError: for a non-float ``x``, ``qparams`` that are not ``QParams`` or
      a config that is not a ``QatConfig``.
    ValueError: for parameters that do not fit ``params_shape`` (both shapes
      are named), a concrete scale that is not positive and finite (STE), or
      a nonzero zero point under a symmetric config. Under ``jit`` a scale
      that is not positive gives NaN (STE) instead.

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
  qparams_lib.check_config(config, "fake_quant")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fake_quant needs a float array, got dtype {x.dtype}")
  qparams_lib.check_qparams(qparams, x.shape, config, "fake_quant", lsq=config.estimator is Estimator.LSQ)
  scale = qparams_lib.params_to_groups(qparams.scale, x.ndim, config)
  zero_point = qparams_lib.params_to_groups(qparams.zero_point, x.ndim, config)
  xg = qparams_lib.to_groups(x, config)
  if config.estimator is Estimator.LSQ:
    if grad_scale is None:
      grad_scale = lsq_grad_scale(x.size, int(jnp.size(qparams.scale)), config)
    yg = _fake_quant_lsq(config, xg, scale, zero_point, float(grad_scale))
  else:
    yg = _fake_quant_ste(config, xg, qparams_lib.visible_scale(scale, config), zero_point)
  return qparams_lib.from_groups(yg, x.shape, config)

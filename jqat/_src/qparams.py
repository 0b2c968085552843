"""Scale and zero point: from a range, or from the range of an array.

Layout of the parameters (``params_shape``). Per-tensor parameters are
scalars, shape ``()``, from every entry point (``qparams_from_array``,
``calibrate_model``, ``finalize_stats``, ``QTensor.scale``). Per-channel and
per-group parameters have ``x.ndim`` dimensions: size 1 on every reduced axis,
the full size on each per-channel axis and ``x.shape[group_axis] // group_size``
on the group axis. Per-tensor and per-channel parameters therefore broadcast
against ``x``; per-group ones broadcast against ``x`` with its group axis split
into ``(num_groups, group_size)`` (see ``to_groups``).

``check_qparams`` is what every function taking ``QParams`` for a tensor
calls: the parameters must have ``params_shape`` (leading size-1 axes may be
left out, and a per-tensor scale may be given as any size-1 array), a concrete
scale must be positive and finite, and a concrete zero point must be 0 under a
symmetric config.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jqat._src.config import QatConfig, ScaleRule

# The scale of a degenerate (all-zero) range: the smallest normal float32,
# 2^-126. It is only a floor: any range with amax >= qmax * 2^-126 (about
# 1.5e-36 for int8, 6.7e-34 for fp8 e5m2) keeps its exact scale amax / qmax and
# so every level of its format, and 1 / MIN_SCALE = 2^126 is finite, so x / scale
# never divides by zero. (Until 0.1 this was float32 eps, 2^-23, an absolute floor
# that cost a small range its resolution.)
MIN_SCALE = float(jnp.finfo(jnp.float32).tiny)


def concrete(x) -> np.ndarray | None:
  """``x`` as a NumPy array when its value is known now, None under a trace (``jit``, ``grad``, ``vmap``)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _shape_text(shape) -> str:
  return str(tuple(shape))


class QParams(NamedTuple):
  """Quantization parameters: ``x ≈ (q - zero_point) * scale``.

  Attributes:
    scale: positive float array.
    zero_point: integer-valued float array (0 when symmetric), same shape as
      ``scale``. Kept as float so that it can be learned (LSQ).
  """

  scale: jax.Array
  zero_point: jax.Array


def _normalize_axis(axis: int, ndim: int, what: str, shape) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what}={axis} is out of range for an array of shape {tuple(shape)}")
  return axis % ndim


def kept_axes(shape, config: QatConfig) -> tuple[int, ...]:
  """Axes that are not reduced when computing a range (channel and group axes)."""
  ndim = len(shape)
  kept = set()
  if config.per_channel:
    kept.update(_normalize_axis(a, ndim, "channel_axis", shape) for a in config.channel_axes)
  if config.group_size is not None:
    g = _normalize_axis(config.group_axis, ndim, "group_axis", shape)
    if g in kept:
      raise ValueError(
          f"group_axis={config.group_axis} and channel_axis={config.channel_axis} name the same "
          f"axis of an array of shape {tuple(shape)}"
      )
    if shape[g] % config.group_size:
      raise ValueError(
          f"group_size={config.group_size} does not divide axis {config.group_axis} "
          f"(length {shape[g]}) of an array of shape {tuple(shape)}"
      )
    kept.add(g)
  return tuple(sorted(kept))


def params_shape(shape, config: QatConfig) -> tuple[int, ...]:
  """Shape of ``scale`` and ``zero_point`` for a tensor of ``shape``: ``()`` per tensor.

  Examples:
    >>> import jqat
    >>> jqat.params_shape((4, 6), jqat.QatConfig()), jqat.params_shape((4, 6), jqat.QatConfig(per_channel=True))
    ((), (1, 6))
  """
  kept = kept_axes(shape, config)
  if not kept:
    return ()
  out = [1] * len(shape)
  for a in kept:
    out[a] = shape[a]
  if config.group_size is not None:
    g = config.group_axis % len(shape)
    out[g] = shape[g] // config.group_size
  return tuple(out)


def to_groups(x: jax.Array, config: QatConfig) -> jax.Array:
  """Splits the group axis of ``x`` into ``(num_groups, group_size)``; no-op without groups."""
  if config.group_size is None:
    return x
  kept_axes(x.shape, config)  # validates
  g = config.group_axis % x.ndim
  return x.reshape(x.shape[:g] + (x.shape[g] // config.group_size, config.group_size) + x.shape[g + 1 :])


def from_groups(xg: jax.Array, shape, config: QatConfig) -> jax.Array:
  """Inverse of ``to_groups``."""
  if config.group_size is None:
    return xg
  return xg.reshape(shape)


def params_to_groups(p: jax.Array, ndim: int, config: QatConfig) -> jax.Array:
  """Puts a parameter of ``params_shape`` layout into the layout of ``to_groups(x)``."""
  p = jnp.asarray(p)
  if config.group_size is None or p.ndim == 0:
    return p
  return jnp.expand_dims(p, config.group_axis % ndim + 1)


def reduce_axes(shape, config: QatConfig) -> tuple[int, ...]:
  """Axes of ``to_groups(x)`` to reduce over to get one value per scale."""
  kept = kept_axes(shape, config)
  if config.group_size is None:
    return tuple(a for a in range(len(shape)) if a not in kept)
  g = config.group_axis % len(shape)
  # In the grouped layout, axis g is the group index and g + 1 the position
  # inside the group; axes after g move one to the right.
  grouped_kept = {a if a <= g else a + 1 for a in kept}
  return tuple(a for a in range(len(shape) + 1) if a not in grouped_kept)


def array_range(x: ArrayLike, config: QatConfig) -> tuple[jax.Array, jax.Array]:
  """(min, max) of the finite values of ``x`` at the granularity of ``config``, in the parameter layout.

  NaN and ±Inf are left out of the range (they have no place on a grid; the
  functions that quantize ``x`` make them visible in their results), and a
  block with no finite value gets ``[0, 0]``.

  Raises:
    ValueError: for an empty ``x``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(per_channel=True)
    >>> lo, hi = jqat.array_range(jnp.array([[1., -2.], [3., jnp.nan]]), cfg)
    >>> lo.tolist(), hi.tolist()
    ([[1.0, -2.0]], [[3.0, -2.0]])
  """
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError(f"array_range: x of shape {x.shape} is empty; a range needs at least one element")
  xg = to_groups(x, config)
  axes = reduce_axes(x.shape, config)
  shape = params_shape(x.shape, config)
  finite = jnp.isfinite(xg)
  lo = jnp.min(jnp.where(finite, xg, jnp.inf), axis=axes, keepdims=True).reshape(shape)
  hi = jnp.max(jnp.where(finite, xg, -jnp.inf), axis=axes, keepdims=True).reshape(shape)
  seen = lo <= hi
  return jnp.where(seen, lo, 0).astype(x.dtype), jnp.where(seen, hi, 0).astype(x.dtype)


def _reduces_minor_axes(ndim: int, axis) -> tuple[int, ...] | None:
  """The reduced axes, sorted, when they are the last axes of an ``ndim``-d array (contiguous), else None."""
  axes = tuple(range(ndim)) if axis is None else tuple(sorted(a % ndim for a in np.atleast_1d(axis).tolist()))
  return axes if axes == tuple(range(ndim - len(axes), ndim)) else None


def min_max(lo: jax.Array, hi: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """``(min of lo, max of hi)`` over ``axes`` in one variadic reduction, which XLA emits itself (NaN propagates)."""
  top = jnp.array(jnp.inf, lo.dtype)
  return lax.reduce((lo, hi), (top, -top), lambda a, b: (lax.min(a[0], b[0]), lax.max(a[1], b[1])), axes)


def _sum_mark(x: jax.Array, axis, keepdims: bool) -> jax.Array:
  """``Σ (x - x)`` over ``axis``: 0, or NaN for a block that holds a NaN or ±Inf (a sum propagates NaN)."""
  f = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sum(f - f, axis=axis, keepdims=keepdims)


def plain_range(x: jax.Array, axis=None, *, keepdims: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(min, max, mark)`` of ``x`` over ``axis`` without masking: ``mark`` is 0, or NaN for a block that is not finite.

  Where the mark is 0 (no NaN or ±Inf in the block), ``min`` and ``max`` are
  the block's exact range. Where it is NaN they may mean nothing: XLA:CPU's
  vectorized (YNNPACK) ``min`` and ``max`` reductions do not propagate NaN
  (one can be dropped, or restart a lane's running value and lose the values
  before it), so the finiteness of a plain ``jnp.max`` proves nothing.

  Two ways, both one pass per result and no masked copy (a select before
  the reduction is written out first on XLA:CPU: three times the time):

  * a contiguous reduction (the reduced axes are the last ones: an
    activation's features, a whole tensor) is one variadic ``(min, max)``
    reduction, which XLA emits itself with NaN-propagating ``min`` / ``max``,
    as fast there as the two library reductions; the mark is
    ``(min - min) + (max - max)``;
  * another (a kernel's contraction axis) is the two plain reductions and
    the mark ``Σ (x - x)`` (a sum propagates NaN, and ``Inf - Inf`` is NaN):
    the variadic reduction runs many times slower across the rows.

  Examples:
    >>> import jax.numpy as jnp
    >>> lo, hi, mark = plain_range(jnp.array([[1.0, -2.0], [jnp.nan, 3.0]]), axis=1)
    >>> lo[0].item(), hi[0].item(), mark.tolist()
    (-2.0, 1.0, [0.0, nan])
  """
  x = jnp.asarray(x)
  axes = _reduces_minor_axes(x.ndim, axis)
  if axes is not None and x.size and jnp.issubdtype(x.dtype, jnp.floating):
    lo, hi = min_max(x, x, axes)
    if keepdims:
      lo, hi = jnp.expand_dims(lo, axes), jnp.expand_dims(hi, axes)
    f = jnp.promote_types(x.dtype, jnp.float32)
    return lo, hi, (lo.astype(f) - lo.astype(f)) + (hi.astype(f) - hi.astype(f))
  mark = _sum_mark(x, axis, keepdims)
  return jnp.min(x, axis=axis, keepdims=keepdims), jnp.max(x, axis=axis, keepdims=keepdims), mark


def plain_amax(x: jax.Array, axis=None, *, keepdims: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(max |x|, mark)`` over ``axis``, as ``plain_range``: the maximum is exact where the mark is 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> amax, mark = plain_amax(jnp.array([[1.0, -2.0], [jnp.nan, 3.0]]), axis=1)
    >>> amax[0].item(), mark.tolist()
    (2.0, [0.0, nan])
  """
  x = jnp.asarray(x)
  if _reduces_minor_axes(x.ndim, axis) is not None:
    lo, hi, mark = plain_range(x, axis, keepdims=keepdims)
    return jnp.maximum(-lo, hi), mark
  return jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims), _sum_mark(x, axis, keepdims)


def to_grid_units(x: jax.Array, scale) -> jax.Array:
  """``x / scale``, computed as ``x * (1 / scale)``.

  XLA turns a division by a broadcast or constant divisor into a
  multiplication by its reciprocal in some graphs and not in others (it depends
  on constants and on how many ops share the broadcast), and on GPU a float32
  division is not correctly rounded; the results differ in the last bit.
  Written as the multiplication, the result is the same eager, under jit and
  fused into any larger computation, so ``qparams_from_range``, ``fake_quant``
  and ``quantize`` always agree.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(to_grid_units(jnp.float32(1.0), 4.0))
    0.25
  """
  return x * (1 / scale)


def divide_exact(a: jax.Array, n: int) -> jax.Array:
  """``a / n`` correctly rounded, for finite ``a >= 0`` and a positive int ``n`` below 2^11.

  Quotients below the smallest normal float (2^-126 in float32) may come out
  as 0; scales are floored at ``MIN_SCALE`` anyway.

  XLA turns a division by a constant into a multiplication by its reciprocal
  (``a * (1 / n)``), which differs from the correctly rounded quotient in the
  last bit for about 1 in 20 values of ``a / 127``. The quotient NumPy and C
  compute is one of the three floats nearest ``c = a * (1 / n)``: the one
  whose residual ``a - c' * n`` is smallest. The residual is exact: ``c'``
  splits into two halves of 12 significant bits, each product with ``n`` is
  exact, and each difference is exactly representable (Sterbenz), so no
  rewriting of the arithmetic (FMA, reordering) can change the result.
  (A quotient of an integer below 2^24 by an odd ``n`` is never a tie.)

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> a = jnp.float32(0.014706626)
    >>> bool(divide_exact(a, 127) == np.float32(a) / np.float32(127)), bool(a * (1 / 127) == np.float32(a) / 127)
    (True, False)
  """
  a = jnp.asarray(a)
  dt = a.dtype
  uint = jnp.uint64 if dt == jnp.float64 else jnp.uint32
  nbits = jnp.finfo(dt).nmant + 1
  keep = ~((1 << (nbits // 2)) - 1) & ((1 << (8 * dt.itemsize)) - 1)
  # Small values are scaled by a power of two first, so no product or residual is subnormal.
  small = a < 2.0 ** (jnp.finfo(dt).minexp + 2 * nbits)
  lift = 2.0 ** (2 * nbits)
  x = jnp.where(small, a * lift, a)
  c = x * (1 / n)
  best, best_r = c, None
  for cand in (jnp.nextafter(c, jnp.zeros_like(c)), c, jnp.nextafter(c, jnp.full_like(c, jnp.inf))):
    hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(cand, uint) & jnp.asarray(keep, uint), dt)
    lo = cand - hi
    r = jnp.abs((x - hi * n) - lo * n)
    if best_r is None:
      best, best_r = cand, r
    else:
      better = r < best_r
      best, best_r = jnp.where(better, cand, best), jnp.where(better, r, best_r)
  best = jnp.where(small, best * (1 / lift), best)
  return jnp.where(a == 0, jnp.zeros_like(best), best)


def _rule_scale(lo: jax.Array, hi: jax.Array, config: QatConfig, m: jax.Array | None = None) -> jax.Array:
  """The symmetric scale of ``config.scale_rule`` from a range widened to include 0 (``m``: a known signed max)."""
  qmax = float(config.qmax)
  if config.scale_rule is ScaleRule.SIGNED_MAX:
    if m is None:
      # From a range alone the first of two equal magnitudes is unknown: the positive end is taken.
      m = jnp.where(hi >= -lo, hi, lo)
    scale = to_grid_units(m, float(config.qmin))  # qmin = -2^(b-1): the quotient is exact
    # 0 / qmin is -0.0 for a block of +0.0 (llama.cpp stores that sign); the floor keeps it.
    return jnp.where(jnp.abs(scale) < MIN_SCALE, jnp.copysign(jnp.asarray(MIN_SCALE, scale.dtype), scale), scale)
  amax = jnp.maximum(-lo, hi)
  if config.scale_rule is ScaleRule.AMAX_EXACT:
    return jnp.maximum(divide_exact(amax, int(qmax)), MIN_SCALE)
  return jnp.maximum(to_grid_units(amax, qmax), MIN_SCALE)


def signed_max(x: ArrayLike, config: QatConfig) -> jax.Array:
  """Each block's finite value of largest magnitude, with its sign, in the parameter layout.

  On a tie the first in the block's order (row-major over the reduced axes)
  wins, as NumPy's ``argmax`` in llama.cpp's Q4_0 quantizer. A block with no
  finite value gives 0.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> signed_max(jnp.array([[3.0, -1.0], [-3.0, 2.0]]), jqat.QatConfig(per_channel=True)).tolist()
    [[3.0, 2.0]]
  """
  x = jnp.asarray(x)
  xg = to_groups(x, config)
  axes = reduce_axes(x.shape, config)
  shape = params_shape(x.shape, config)
  kept = tuple(a for a in range(xg.ndim) if a not in axes)
  flat = jnp.transpose(xg, kept + axes).reshape(tuple(xg.shape[a] for a in kept) + (-1,))
  mag = jnp.where(jnp.isfinite(flat), jnp.abs(flat), -1)
  first = jnp.argmax(mag, axis=-1, keepdims=True)
  m = jnp.take_along_axis(flat, first, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
  return m.reshape(shape)


def qparams_from_range(min_val: ArrayLike, max_val: ArrayLike, config: QatConfig) -> QParams:
  """Scale and zero point that cover ``[min_val, max_val]``.

  The range is first widened to include 0, so 0 is always exactly
  representable. With integer bounds ``qmin``, ``qmax``:

  * symmetric: ``scale = max(|min|, |max|) / qmax``, ``zero_point = 0``;
  * asymmetric: ``scale = (max - min) / (qmax - qmin)``,
    ``zero_point = clip(qmin - round(min / scale), qmin, qmax)``;
  * fp8 (always symmetric): ``scale = amax / fp8_max`` (448 or 57344).

  ``config.scale_rule`` chooses the symmetric scale (see ``ScaleRule``):
  ``"amax_exact"`` divides correctly rounded (``divide_exact``) and
  ``"signed_max"`` gives ``m / qmin`` with ``m`` the end of larger magnitude
  (the positive one on a tie; ``qparams_from_array`` takes the block's
  first value instead, as llama.cpp).

  Each ``a / b`` is evaluated as ``a * (1 / b)`` (see ``to_grid_units``), so
  the parameters are the same bits whether computed eagerly or under jit.

  A degenerate range (all zeros) gives ``scale = MIN_SCALE`` (2^-126), never
  0, NaN or Inf; any other finite range keeps its exact scale down to
  ``amax = qmax * 2^-126``, so a small range keeps every level of the format.
  An asymmetric range wider than the largest float (``max - min`` overflows)
  still gets a finite scale. Rounding is half to even.

  Bad bounds. Known (concrete) bounds that are NaN or ±Inf, or with
  ``min > max``, raise. Under ``jit`` the bounds are not known when this
  runs; there a NaN bound gives a NaN scale, an infinite bound an infinite
  scale and ``min > max`` a NaN scale, each only for the ranges concerned
  (one bad channel does not touch the others), so the result is visibly
  non-finite, never a plausible finite number.

  Args:
    min_val: lower ends of the ranges, any shape (the parameter layout when
      the ranges come from ``array_range``).
    max_val: upper ends, the shape of ``min_val`` (or either one a scalar).
    config: the format and mode.

  Returns:
    ``QParams`` with float32 arrays of the shape of the inputs (float64 if
    they are float64).

  Raises:
    ValueError: for bounds of two different shapes, an empty bound, and for
      concrete non-finite bounds or ``min > max``.
    TypeError: for a config that is not a ``QatConfig``.

  Examples:
    >>> import jqat
    >>> qp = jqat.qparams_from_range(-1.0, 3.0, jqat.QatConfig(symmetric=False))
    >>> round(float(qp.scale), 7), float(qp.zero_point)
    (0.0156863, -64.0)
    >>> float(jqat.qparams_from_range(0.0, 0.0, jqat.QatConfig()).scale) > 0
    True
    >>> jqat.qparams_from_range(1.0, -1.0, jqat.QatConfig())
    Traceback (most recent call last):
    ...
    ValueError: qparams_from_range: min_val > max_val (1.0 > -1.0); a range needs min_val <= max_val
  """
  return _from_range(min_val, max_val, config, None)


def _from_range(min_val: ArrayLike, max_val: ArrayLike, config: QatConfig, m) -> QParams:
  """``qparams_from_range``, with ``m`` the blocks' signed maxima when known (``scale_rule="signed_max"``)."""
  check_config(config, "qparams_from_range")
  lo = jnp.asarray(min_val)
  hi = jnp.asarray(max_val)
  if lo.shape != hi.shape and lo.ndim and hi.ndim:
    raise ValueError(
      f"qparams_from_range: min_val of shape {lo.shape} and max_val of shape {hi.shape} differ; "
      "pass bounds of one shape (either may be a scalar)"
    )
  if lo.size == 0 or hi.size == 0:
    raise ValueError(f"qparams_from_range: empty bounds (shapes {lo.shape} and {hi.shape}); a range needs a value")
  for name, v in (("min_val", lo), ("max_val", hi)):
    if not (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)):
      raise TypeError(f"qparams_from_range: {name} must be real numbers, got dtype {v.dtype}")
  clo, chi = concrete(lo), concrete(hi)
  if clo is not None and chi is not None:
    for name, v in (("min_val", clo), ("max_val", chi)):
      bad = ~np.isfinite(v.astype(np.float64))
      if bad.any():
        raise ValueError(
          f"qparams_from_range: {name} holds {int(bad.sum())} non-finite value(s) (e.g. {v[bad].flat[0]}); "
          "a range needs finite bounds (calibration statistics skip NaN and Inf)"
        )
    inverted = np.broadcast_to(clo, np.broadcast_shapes(clo.shape, chi.shape)) > chi
    if inverted.any():
      idx = np.argwhere(inverted)[0] if inverted.ndim else ()
      a = np.broadcast_to(clo, inverted.shape)[tuple(idx)]
      b = np.broadcast_to(chi, inverted.shape)[tuple(idx)]
      where = f" at index {tuple(int(i) for i in idx)}" if inverted.ndim else ""
      raise ValueError(f"qparams_from_range: min_val > max_val{where} ({a} > {b}); a range needs min_val <= max_val")
  dtype = jnp.result_type(lo.dtype, hi.dtype, jnp.float32)
  inverted = lo.astype(dtype) > hi.astype(dtype)
  lo = jnp.minimum(lo.astype(dtype), 0)
  hi = jnp.maximum(hi.astype(dtype), 0)
  qmin, qmax = config.qmin, config.qmax
  if config.symmetric:
    scale = _rule_scale(lo, hi, config, m)
  else:
    levels = float(qmax - qmin)
    width = hi - lo
    # hi - lo overflows for a range wider than the largest float; the
    # difference of the two quotients does not (and is only used there).
    wide = to_grid_units(hi, levels) - to_grid_units(lo, levels)
    scale = jnp.where(jnp.isinf(width) & jnp.isfinite(hi) & jnp.isfinite(lo), wide, to_grid_units(width, levels))
    scale = jnp.maximum(scale, MIN_SCALE)
  # min > max under a trace: no plausible number, a visible NaN.
  scale = jnp.where(inverted, jnp.nan, scale)
  if config.symmetric:
    zero_point = jnp.zeros_like(scale)
  else:
    zero_point = jnp.clip(qmin - jnp.round(to_grid_units(lo, scale)), qmin, qmax)
  return QParams(scale=scale, zero_point=zero_point)


def qparams_from_array(x: ArrayLike, config: QatConfig) -> QParams:
  """``qparams_from_range`` over the min and max of the finite values of ``x`` (dynamic quantization).

  NaN and ±Inf do not enter the range (see ``array_range``); ``quantize``,
  ``qat_dot_general`` and the integer kernels make them visible in their results.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> qp = jqat.qparams_from_array(jnp.array([-2.0, 1.0]), jqat.QatConfig())
    >>> qp.scale.shape, round(float(qp.scale), 6)
    ((), 0.015748)
  """
  check_config(config, "qparams_from_array")
  lo, hi = array_range(x, config)
  m = signed_max(x, config) if config.scale_rule is ScaleRule.SIGNED_MAX else None
  return _from_range(lo, hi, config, m)


def check_config(config, where: str) -> None:
  """Raises ``TypeError`` unless ``config`` is a ``QatConfig``."""
  if not isinstance(config, QatConfig):
    raise TypeError(
      f"{where}: config must be a jqat.QatConfig, got {type(config).__name__} {config!r}; "
      "e.g. jqat.QatConfig(bits='int8')"
    )


def _fits(shape, expected, ndim: int) -> bool:
  """Whether a parameter of ``shape`` is ``expected`` up to leading size-1 axes (both at most ``ndim`` axes)."""
  if len(shape) > ndim:
    return False
  pad = (1,) * (ndim - len(shape)) + tuple(shape)
  exp = (1,) * (ndim - len(expected)) + tuple(expected)
  return pad == exp


def check_qparams(qparams, shape, config: QatConfig, where: str, *, lsq: bool = False) -> None:
  """Checks ``QParams`` for a tensor of ``shape``; raises in ``where``'s words.

  * ``qparams`` must be a ``QParams``.
  * ``scale`` must have ``params_shape(shape, config)``, up to leading size-1
    axes (``(6,)`` for ``(1, 6)``; a per-tensor scale may be any size-1 array
    of at most ``len(shape)`` axes). A shape that would broadcast onto other
    axes is an error, not a silent broadcast.
  * ``zero_point``: the same shape as ``scale``, or a single value.
  * Concrete values (not under a trace): the scale positive and finite
    (except ``lsq``: a learned scale is clamped instead, see ``fake_quant``;
    and under ``scale_rule="signed_max"`` nonzero and finite, of either sign),
    and under a symmetric config the zero point 0.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(per_channel=True)
    >>> check_qparams(jqat.QParams(jnp.ones((4, 1)), jnp.zeros((4, 1))), (4, 8), cfg, "fake_quant")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fake_quant: scale of shape (4, 1) does not fit a tensor of shape (4, 8) ...: expected shape (1, 8)
  """
  check_config(config, where)
  if not (isinstance(qparams, QParams) or (hasattr(qparams, "scale") and hasattr(qparams, "zero_point"))):
    raise TypeError(
      f"{where}: qparams must be a jqat.QParams (from jqat.qparams_from_range / qparams_from_array, or "
      f"jqat.QParams(scale, zero_point)), got {type(qparams).__name__}"
    )
  check_params_shape(jnp.shape(qparams.scale), jnp.shape(qparams.zero_point), shape, config, where)
  s = concrete(qparams.scale)
  if s is not None and not lsq:
    s = s.astype(np.float64)
    if config.signed_scale:
      bad = ~(np.isfinite(s) & (s != 0))
      want, why = "nonzero and finite", "a zero scale has no grid"
    else:
      bad = ~(np.isfinite(s) & (s > 0))
      want, why = "positive and finite", "a zero or negative scale has no grid"
    if bad.any():
      raise ValueError(
        f"{where}: scale must be {want}, got {s[bad].flat[0]} ({int(bad.sum())} of {s.size} values); {why}"
      )
  if config.symmetric:
    z = concrete(qparams.zero_point)
    if z is not None and np.any(z != 0):
      raise ValueError(
        f"{where}: zero_point holds nonzero values (e.g. {z[z != 0].flat[0]}) but the config is symmetric, "
        "which would drop them; quantize with QatConfig(symmetric=False) for asymmetric parameters"
      )


def check_params_shape(scale_shape, zero_point_shape, shape, config: QatConfig, where: str) -> tuple[int, ...]:
  """The shape checks of ``check_qparams`` alone; returns ``params_shape(shape, config)``."""
  expected = params_shape(tuple(shape), config)
  ndim = len(shape)
  granularity = (
    f"per_channel={config.per_channel}, channel_axis={config.channel_axis!r}, group_size={config.group_size}"
  )
  per_tensor = all(d == 1 for d in expected)
  for name, got in (("scale", tuple(scale_shape)), ("zero_point", tuple(zero_point_shape))):
    ok = _fits(got, expected, ndim) or (per_tensor and math.prod(got) == 1 and len(got) <= ndim)
    if name == "zero_point" and math.prod(got) == 1 and len(got) <= ndim:
      ok = True  # one zero point for every scale is never the wrong axis
    if not ok:
      raise ValueError(
        f"{where}: {name} of shape {_shape_text(got)} does not fit a tensor of shape {_shape_text(shape)} "
        f"under the config ({granularity}): expected shape {_shape_text(expected)}"
      )
  return expected


def to_params_shape(p, expected) -> jax.Array:
  """A parameter that passed ``check_params_shape``, in exactly the ``expected`` shape."""
  p = jnp.asarray(p)
  if math.prod(p.shape) == 1:
    return jnp.broadcast_to(p.reshape(()), expected)
  return p.reshape(expected)


def visible_scale(scale, config: QatConfig | None = None) -> jax.Array:
  """``scale`` with NaN wherever it is not positive: under a trace a zero or negative scale cannot be refused,
  so it makes the result visibly NaN instead of a plausible number (0 for a zero scale, saturation for a
  negative one). Under a config whose scale takes either sign (``scale_rule="signed_max"``), NaN where it is 0."""
  scale = jnp.asarray(scale)
  ok = scale != 0 if config is not None and config.signed_scale else scale > 0
  return jnp.where(ok, scale, jnp.asarray(jnp.nan, scale.dtype))

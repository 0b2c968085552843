"""Scale and zero point: from a range, or from the range of an array.

Layout of the parameters. For a tensor ``x`` and a config, ``scale`` and
``zero_point`` have ``x.ndim`` dimensions: size 1 on every reduced axis, the
full size on each per-channel axis and ``x.shape[group_axis] // group_size``
on the group axis. Per-tensor and per-channel parameters therefore broadcast
against ``x``; per-group ones broadcast against ``x`` with its group axis split
into ``(num_groups, group_size)`` (see ``to_groups``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jqat._src.config import QatConfig

# The smallest scale handed out (float32 epsilon, as torch.ao does): a
# degenerate range (all zeros) still gives a positive, finite scale, and
# x / scale cannot overflow for any finite float32 x of ordinary size.
MIN_SCALE = float(jnp.finfo(jnp.float32).eps)


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
  """Shape of ``scale`` and ``zero_point`` for a tensor of ``shape``."""
  kept = kept_axes(shape, config)
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
  """(min, max) of ``x`` at the granularity of ``config``, in the parameter layout.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(per_channel=True)
    >>> lo, hi = jqat.array_range(jnp.array([[1., -2.], [3., 4.]]), cfg)
    >>> lo.tolist(), hi.tolist()
    ([[1.0, -2.0]], [[3.0, 4.0]])
  """
  x = jnp.asarray(x)
  xg = to_groups(x, config)
  axes = reduce_axes(x.shape, config)
  shape = params_shape(x.shape, config)
  lo = jnp.min(xg, axis=axes, keepdims=True).reshape(shape)
  hi = jnp.max(xg, axis=axes, keepdims=True).reshape(shape)
  return lo, hi


def to_grid_units(x: jax.Array, scale) -> jax.Array:
  """``x / scale``, computed as ``x * (1 / scale)``.

  XLA turns a division by a broadcast or constant divisor into a
  multiplication by its reciprocal in some graphs and not in others (it depends
  on constants and on how many ops share the broadcast), and on GPU a float32
  division is not correctly rounded; the results differ in the last bit.
  Written as the multiplication, the result is the same eager, under jit and
  fused into any larger computation, so ``qparams_from_range``, ``fake_quant``
  and ``quantize`` always agree.
  """
  return x * (1 / scale)


def qparams_from_range(min_val: ArrayLike, max_val: ArrayLike, config: QatConfig) -> QParams:
  """Scale and zero point that cover ``[min_val, max_val]``.

  The range is first widened to include 0, so 0 is always exactly
  representable. With integer bounds ``qmin``, ``qmax``:

  * symmetric: ``scale = max(|min|, |max|) / qmax``, ``zero_point = 0``;
  * asymmetric: ``scale = (max - min) / (qmax - qmin)``,
    ``zero_point = clip(qmin - round(min / scale), qmin, qmax)``;
  * fp8 (always symmetric): ``scale = amax / fp8_max`` (448 or 57344).

  Each ``a / b`` is evaluated as ``a * (1 / b)`` (see ``to_grid_units``), so
  the parameters are the same bits whether computed eagerly or under jit.

  A degenerate range (all zeros) gives ``scale = MIN_SCALE`` (float32 eps),
  never 0, NaN or Inf. Rounding is half to even.

  Args:
    min_val: lower ends of the ranges, any shape (the parameter layout when
      the ranges come from ``array_range``).
    max_val: upper ends, same shape as ``min_val``.
    config: the format and mode.

  Returns:
    ``QParams`` with float32 arrays of the broadcast shape of the inputs
    (float64 if they are float64).

  Examples:
    >>> import jqat
    >>> qp = jqat.qparams_from_range(-1.0, 3.0, jqat.QatConfig(symmetric=False))
    >>> round(float(qp.scale), 7), float(qp.zero_point)
    (0.0156863, -64.0)
    >>> float(jqat.qparams_from_range(0.0, 0.0, jqat.QatConfig()).scale) > 0
    True
  """
  lo = jnp.asarray(min_val)
  hi = jnp.asarray(max_val)
  dtype = jnp.result_type(lo.dtype, hi.dtype, jnp.float32)
  lo = jnp.minimum(lo.astype(dtype), 0)
  hi = jnp.maximum(hi.astype(dtype), 0)
  qmin, qmax = config.qmin, config.qmax
  if config.symmetric:
    amax = jnp.maximum(-lo, hi)
    scale = jnp.maximum(to_grid_units(amax, float(qmax)), MIN_SCALE)
    zero_point = jnp.zeros_like(scale)
  else:
    scale = jnp.maximum(to_grid_units(hi - lo, float(qmax - qmin)), MIN_SCALE)
    zero_point = jnp.clip(qmin - jnp.round(to_grid_units(lo, scale)), qmin, qmax)
  return QParams(scale=scale, zero_point=zero_point)


def qparams_from_array(x: ArrayLike, config: QatConfig) -> QParams:
  """``qparams_from_range`` over the min and max of ``x`` (dynamic quantization).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> qp = jqat.qparams_from_array(jnp.array([-2.0, 1.0]), jqat.QatConfig())
    >>> round(float(qp.scale[0]), 6)
    0.015748
  """
  lo, hi = array_range(x, config)
  return qparams_from_range(lo, hi, config)

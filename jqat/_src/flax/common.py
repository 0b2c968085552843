"""What the linen and NNX layers share: operand configs, activation statistics, the quantized dot.

Everything here is a pure function; the layers only decide where the state lives.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jqat._src import int_ops
from jqat._src import qparams as qparams_lib
from jqat._src.calibration import range_stats
from jqat._src.calibration import stats as calibration
from jqat._src.config import CalibMethod, Estimator, QatConfig
from jqat._src.qat_dot import qat_dot_general
from jqat._src.qparams import QParams
from jqat._src.qtensor import QTensor, dequantize, quantize

# Weights: int8, symmetric, one scale per output channel (the standard for
# weights; asymmetric weights only add work to the integer dot).
DEFAULT_WEIGHT_CONFIG = QatConfig(bits="int8", per_channel=True, symmetric=True)
# Activations: int8, asymmetric, one scale per tensor (ReLU outputs use all
# 256 levels instead of half of them).
DEFAULT_ACTIVATION_CONFIG = QatConfig(bits="int8", per_channel=False, symmetric=False)

MODES = ("float", "qat", "serve")


def check_mode(mode: str, where: str) -> None:
  if mode not in MODES:
    raise ValueError(f"{where}: mode={mode!r} is invalid; allowed: {', '.join(map(repr, MODES))}.")


def free_axes(ndim: int, contracting, batch) -> tuple[int, ...]:
  used = {a % ndim for a in tuple(contracting) + tuple(batch)}
  return tuple(a for a in range(ndim) if a not in used)


def operand_config(config: QatConfig | None, ndim: int, contracting, batch) -> QatConfig | None:
  """The config of one dot operand with its axes taken from the dot.

  Per-channel scales sit on the operand's free (non-contracting, non-batch)
  axes: output features for a kernel, tokens for an activation. Groups split
  the contraction axis. Both follow from the dot's dimension numbers, so one
  config serves ``Dense``, ``DenseGeneral`` and attention projections alike.
  """
  if config is None:
    return None
  changes = {}
  if config.per_channel:
    axes = free_axes(ndim, contracting, batch) + tuple(a % ndim for a in batch)
    if not axes:
      changes["per_channel"] = False
    else:
      changes["channel_axis"] = tuple(sorted(axes)) if len(axes) > 1 else axes[0]
  if config.group_size is not None:
    if len(contracting) != 1:
      raise ValueError(f"group_size={config.group_size} needs exactly one contracting axis, got {tuple(contracting)}")
    changes["group_axis"] = contracting[0] % ndim
  return config.replace(**changes) if changes else config


def conv_kernel_config(config: QatConfig | None, lhs_shape, rhs_shape, dimension_numbers) -> QatConfig | None:
  """The config of a conv kernel with its axes taken from the conv.

  Per-channel scales sit on the kernel's output-feature axis, groups split its
  input-feature axis, whatever the layout (HWIO for Flax).
  """
  if config is None:
    return None
  dn = lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
  changes = {}
  if config.per_channel:
    changes["channel_axis"] = dn.rhs_spec[0]
  if config.group_size is not None:
    changes["group_axis"] = dn.rhs_spec[1]
  return config.replace(**changes) if changes else config


class ActivationStats(NamedTuple):
  """Range statistics of one activation, kept in the ``quant_stats`` collection.

  Attributes:
    ema: moving average of the per-batch min and max, updated during QAT.
    frozen: when True, ``scale`` and ``zero_point`` (set by calibration) are
      used and the moving average is neither used nor updated.
    scale: frozen scale (1 until frozen).
    zero_point: frozen zero point.
  """

  ema: range_stats.MovingAverageState
  frozen: jax.Array
  scale: jax.Array
  zero_point: jax.Array


def init_activation_stats(config: QatConfig, momentum: float) -> ActivationStats:
  ema = calibration.init_stats((), config, CalibMethod.MOVING_AVERAGE, momentum=momentum)
  one = jnp.ones((), jnp.float32)
  return ActivationStats(ema=ema, frozen=jnp.zeros((), bool), scale=one, zero_point=jnp.zeros((), jnp.float32))


def freeze_activation_stats(stats: ActivationStats, qp: QParams) -> ActivationStats:
  return stats._replace(
    frozen=jnp.ones((), bool),
    scale=jnp.asarray(qp.scale, jnp.float32).reshape(()),
    zero_point=jnp.asarray(qp.zero_point, jnp.float32).reshape(()),
  )


def activation_qparams(
  x: jax.Array, stats: ActivationStats | None, config: QatConfig, *, update: bool
) -> tuple[QParams, ActivationStats | None]:
  """QParams for an activation, and the statistics after seeing ``x``.

  Frozen ranges win; else the moving average (including this batch when
  ``update``); before any statistics exist, the batch's own range, so a fresh
  model gives its float output plus quantization noise.
  Per-token (per-channel) activation configs are always dynamic.
  """
  x = lax.stop_gradient(x)
  batch_qp = qparams_lib.qparams_from_array(x, config)
  if stats is None or config.per_channel or config.group_size is not None:
    return batch_qp, stats
  ema = stats.ema
  if update:
    new_ema = calibration.update_stats(ema, x)
    ema = jax.tree.map(lambda new, old: jnp.where(stats.frozen, old, new), new_ema, ema)
    stats = stats._replace(ema=ema)
  ema_qp = calibration.finalize_stats(ema, config, CalibMethod.MOVING_AVERAGE)
  seen = ema.count > 0
  scale = jnp.where(stats.frozen, stats.scale, jnp.where(seen, ema_qp.scale.reshape(()), batch_qp.scale.reshape(())))
  zp = jnp.where(
    stats.frozen, stats.zero_point, jnp.where(seen, ema_qp.zero_point.reshape(()), batch_qp.zero_point.reshape(()))
  )
  shape = batch_qp.scale.shape
  return QParams(scale.reshape(shape), zp.reshape(shape)), stats


def quantized_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers,
  lhs_qp: QParams | None,
  rhs_qp: QParams | None,
  lhs_config: QatConfig | None,
  rhs_config: QatConfig | None,
  *,
  precision=None,
  preferred_element_type=None,
  out_sharding=None,
) -> jax.Array:
  """The QAT forward: the integer dot of the quantized operands, straight-through backward.

  The same numbers as ``lax.dot_general(fake_quant(lhs), fake_quant(rhs))``
  up to float rounding of the rescale, computed as serving computes them. The
  kernel is quantized with its own range (so it never clips), and so is a
  per-token activation; their all-ones STE masks are skipped.
  """
  del out_sharding  # the output follows the operands' shardings
  lhs_own_range = lhs_config is not None and (lhs_config.per_channel or lhs_config.group_size is not None)
  return qat_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    lhs_qp,
    rhs_qp,
    lhs_config=lhs_config,
    rhs_config=rhs_config,
    precision=precision,
    preferred_element_type=preferred_element_type,
    lhs_may_clip=not lhs_own_range,
    rhs_may_clip=False,
  )


def uses_lsq(config: QatConfig | None) -> bool:
  return config is not None and config.estimator is Estimator.LSQ


def dot_shape_error(where: str, lhs_shape, rhs_shape, dimension_numbers) -> ValueError | None:
  (lc, rc), (lb, rb) = dimension_numbers
  for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
    if lhs_shape[a] != rhs_shape[b]:
      return ValueError(
        f"{where}: the operands do not fit: lhs (input) shape {tuple(lhs_shape)} axis {a} has "
        f"{lhs_shape[a]} elements but rhs (kernel) shape {tuple(rhs_shape)} axis {b} has {rhs_shape[b]}."
      )
  return None


# --- serving -------------------------------------------------------------------


def serving_weight(wq: QTensor, contracting, lhs_config: QatConfig | None) -> dict:
  """The serving variables of a quantized kernel: values, scale, zero point and, when needed, sums.

  The column sums of the integer kernel are what the zero point of an
  asymmetric activation multiplies; they depend on the kernel alone, so they
  are computed once here instead of at every call.
  """
  entry = {"values": wq.values, "scale": wq.scale, "zero_point": wq.zero_point}
  if lhs_config is not None and not lhs_config.symmetric and not wq.config.bits.is_float:
    entry["sums"] = int_ops.weight_sums(wq, tuple(contracting))
  return entry


def weight_from_serving(entry, config: QatConfig, shape) -> QTensor:
  return QTensor(entry["values"], entry["scale"], entry["zero_point"], config, tuple(shape), jnp.dtype(jnp.float32))


def serving_activation_qparams(stats: ActivationStats, config: QatConfig, where: str) -> QParams:
  """The frozen range, or else the moving average, of an activation, for serving.

  Raises when neither exists: serving from the first batch's range would
  silently differ from what the model was trained with.
  """
  seen = jnp.logical_or(stats.frozen, stats.ema.count > 0)
  try:
    ok = bool(seen)
  except jax.errors.ConcretizationTypeError:
    ok = True  # traced: checked when convert runs eagerly
  if not ok:
    raise ValueError(
      f"{where}: no activation range to serve with; calibrate the model or train it with 'quant_stats' "
      "mutable before converting."
    )
  ema_qp = calibration.finalize_stats(stats.ema, config, CalibMethod.MOVING_AVERAGE)
  scale = jnp.where(stats.frozen, stats.scale, ema_qp.scale.reshape(()))
  zero_point = jnp.where(stats.frozen, stats.zero_point, ema_qp.zero_point.reshape(()))
  return QParams(scale, zero_point)


def serve_dot_general(
  lhs: jax.Array,
  wq: QTensor,
  dimension_numbers,
  lhs_qp: QParams | None,
  lhs_config: QatConfig | None,
  *,
  rhs_sums=None,
  preferred_element_type=None,
) -> jax.Array:
  """Serving forward: int8 (or fp8) activations times the quantized kernel, or weight-only.

  * ``lhs_config`` set: the activation is quantized with ``lhs_qp`` (frozen),
    or per token from its own range when ``lhs_qp`` is None, and multiplied
    with ``int_dot_general`` (int32 accumulation, one rescale).
  * ``lhs_config`` None: weight-only; float activations times the integer
    kernel converted next to the dot, the scale applied to the result.
  """
  out_dtype = preferred_element_type or lhs.dtype
  (lc, rc), (lb, rb) = dimension_numbers
  if lhs_config is None:
    plain = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and wq.ndim == 2
    if plain and not wq.config.bits.is_float:
      return int_ops.weight_only_matmul(lhs, wq).astype(out_dtype)
    w = dequantize(wq).astype(lhs.dtype)
    return lax.dot_general(lhs, w, dimension_numbers, preferred_element_type=preferred_element_type)
  if lhs_qp is None:
    lhs_qp = qparams_lib.qparams_from_array(lhs, lhs_config)
  xq = quantize(lhs, lhs_qp, lhs_config)
  return int_ops.int_dot_general(xq, wq, dimension_numbers, rhs_sums=rhs_sums, out_dtype=out_dtype)


def serve_conv(
  lhs: jax.Array, wq: QTensor, lhs_qp: QParams | None, lhs_config: QatConfig | None, conv, dimension_numbers
):
  """Serving forward of a convolution: an integer convolution with int32 accumulation, one rescale.

  The activation is quantized with its frozen range and centred on its zero
  point (``q - z`` fits int16), so zero padding stays exact; the kernel's
  values (centred likewise when asymmetric) enter as int16 and
  ``lax.conv_general_dilated(..., preferred_element_type=int32)`` sums them.
  The per-output-feature scale is applied once to the result. fp8 or
  per-group kernels, and float activations (weight-only), run a float
  convolution of the dequantized operands.

  Args:
    lhs: float input.
    wq: the quantized kernel.
    lhs_qp: the activation's frozen QParams (None with ``lhs_config`` None).
    lhs_config: the activation config, or None for weight-only.
    conv: ``lax.conv_general_dilated`` with the layer's strides, padding and
      dimension numbers bound.
    dimension_numbers: the layer's conv dimension numbers (None for lax's default).

  Returns:
    The convolution, in ``lhs``'s dtype.
  """
  out_dtype = lhs.dtype
  integer = (
    lhs_config is not None
    and not lhs_config.bits.is_float
    and not wq.config.bits.is_float
    and wq.config.group_size is None
  )
  if not integer:
    x = lhs if lhs_config is None else dequantize(quantize(lhs, lhs_qp, lhs_config))
    return conv(x, dequantize(wq).astype(x.dtype)).astype(out_dtype)
  xq = quantize(lhs, lhs_qp, lhs_config)
  xi = xq.int_values().astype(jnp.int16) - xq.zero_point.astype(jnp.int16)
  wi = wq.int_values().astype(jnp.int16)
  if not wq.config.symmetric:
    wi = wi - wq.zero_point.astype(jnp.int16)
  acc = conv(xi, wi, preferred_element_type=jnp.int32)
  dn = lax.conv_dimension_numbers(lhs.shape, wq.shape, dimension_numbers)
  out_feature, kernel_out = dn.out_spec[1], dn.rhs_spec[0]
  w_scale = jnp.asarray(wq.scale, jnp.float32)
  shape = [1] * acc.ndim
  if w_scale.size > 1:
    shape[out_feature] = wq.shape[kernel_out]
    w_scale = jnp.moveaxis(w_scale, kernel_out, 0).reshape(shape)
  else:
    w_scale = w_scale.reshape(())
  scale = jnp.asarray(lhs_qp.scale, jnp.float32).reshape(()) * w_scale
  return (acc.astype(jnp.float32) * scale).astype(out_dtype)

"""What the linen and NNX layers share: operand configs, activation statistics, the quantized dot.

Everything here is a pure function; the layers only decide where the state lives.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqat._src import int_kernels, int_ops
from jqat._src import qparams as qparams_lib
from jqat._src.calibration import range_stats
from jqat._src.calibration import stats as calibration
from jqat._src.config import CalibMethod, Estimator, QatConfig
from jqat._src.formats import QuantBits
from jqat._src.qat_dot import dot_general_with_mark
from jqat._src.qparams import QParams
from jqat._src.qtensor import PACK_AXIS, QTensor, dequantize, quantize, quantize_finite

# Weights: int8, symmetric, one scale per output channel (the standard for
# weights; asymmetric weights only add work to the integer dot).
DEFAULT_WEIGHT_CONFIG = QatConfig(bits="int8", per_channel=True, symmetric=True)
# Activations: int8, asymmetric, one scale per tensor (ReLU outputs use all
# 256 levels instead of half of them).
DEFAULT_ACTIVATION_CONFIG = QatConfig(bits="int8", per_channel=False, symmetric=False)

# One vocabulary for linen and NNX. Serving is not a mode: a layer serves when
# it holds serving variables (after ``convert``).
MODES = ("float", "calibrate", "qat")


def check_mode(mode: str, where: str) -> str:
  """Validates a layer's ``mode`` and returns it; ``"serve"`` is a deprecated alias of ``"qat"``."""
  if mode == "serve":
    warnings.warn(
      f"{where}: mode='serve' is deprecated and behaves as 'qat'; a layer serves when it holds serving "
      "variables (from convert), whatever its mode.",
      DeprecationWarning,
      stacklevel=3,
    )
    return "qat"
  if mode not in MODES:
    raise ValueError(f"{where}: mode={mode!r} is invalid; allowed: {', '.join(map(repr, MODES))}.")
  return mode


def as_config(value, default: QatConfig, field: str, where: str) -> QatConfig | None:
  """A layer's ``weight_config`` / ``activation_config``: a ``QatConfig``, None, or a format name.

  A format name (``"int4"``, ``"fp8_e4m3"``) is shorthand for the layer's
  default config with those bits (symmetric for fp8, which has no zero point).
  """
  if value is None or isinstance(value, QatConfig):
    return value
  if isinstance(value, (str, QuantBits)):
    try:
      bits = QuantBits(value)
    except ValueError:
      allowed = ", ".join(repr(b.value) for b in QuantBits)
      raise ValueError(
        f"{where}: {field}={value!r} is not a format name; allowed: {allowed}, a QatConfig, or None."
      ) from None
    return default.replace(bits=bits, **({"symmetric": True, "narrow_range": False} if bits.is_float else {}))
  raise TypeError(
    f"{where}: {field} must be a jqat.QatConfig, a format name such as 'int4', or None; "
    f"got {type(value).__name__} {value!r}."
  )


def is_dynamic(config: QatConfig | None) -> bool:
  """Whether an activation config takes its range from each batch (per token or per group), never from statistics."""
  return config is not None and (config.per_channel or config.group_size is not None)


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
  x: jax.Array, stats: ActivationStats | None, config: QatConfig, *, update: bool, contracting=None
) -> tuple[QParams, ActivationStats | None, jax.Array | None]:
  """QParams for an activation, the statistics after seeing ``x``, and its rows' non-finite mark (or None).

  Frozen ranges win; else the moving average (including this batch when
  ``update``); before any statistics exist, the batch's own range, so a fresh
  model gives its float output plus quantization noise.
  Per-token (per-channel) activation configs are always dynamic.

  ``contracting``: the axes a dot contracts ``x`` over. When the moving
  average sees the batch, the third result is then 0 or NaN per row (NaN:
  the row holds a NaN or ±Inf), the mark the QAT dot puts on those rows'
  outputs; the range reads its finiteness from it, and the batch costs one
  pass (``qparams.plain_range`` per row). None otherwise.
  """
  x = lax.stop_gradient(x)
  if stats is None or config.per_channel or config.group_size is not None:
    return qparams_lib.qparams_from_array(x, config), stats, None
  shape = qparams_lib.params_shape(x.shape, config)
  ema = stats.ema

  def from_stats(ema):
    ema_qp = calibration.finalize_stats(ema, config, CalibMethod.MOVING_AVERAGE)
    scale = jnp.where(stats.frozen, stats.scale, ema_qp.scale.reshape(()))
    zp = jnp.where(stats.frozen, stats.zero_point, ema_qp.zero_point.reshape(()))
    return scale.reshape(shape), zp.reshape(shape)

  if update:
    mark = plain = None
    if contracting is not None and x.size:
      # Per row first (one pass: see plain_range): the rows' mark (0, or NaN
      # for a row that holds a NaN or ±Inf) both tells the range whether the
      # batch is finite and goes to the dot for those rows' outputs.
      row_lo, row_hi, mark = qparams_lib.plain_range(x, axis=tuple(contracting), keepdims=True)
      # Over the rows: used only where the mark says the batch is finite.
      plain = *qparams_lib.min_max(row_lo, row_hi, tuple(range(x.ndim))), mark
    new_ema = range_stats.moving_average_step(ema, x, plain)
    ema = jax.tree.map(lambda new, old: jnp.where(stats.frozen, old, new), new_ema, ema)
    # The average has seen this batch: before any statistics its range is
    # exactly the batch's own (finite) range, so the batch's parameters need
    # no second reduction of x.
    return QParams(*from_stats(ema)), stats._replace(ema=ema), mark

  def from_batch(_):
    qp = qparams_lib.qparams_from_array(x, config)
    return qp.scale.reshape(shape).astype(jnp.float32), qp.zero_point.reshape(shape).astype(jnp.float32)

  # Only a model that has seen no batch yet reads the batch's range.
  seen = stats.frozen | (ema.count > 0)
  return QParams(*lax.cond(seen, from_stats, from_batch, ema)), stats, None


def dynamic_activation_qparams(
  x: jax.Array, config: QatConfig, contracting=None
) -> tuple[QParams, jax.Array | None]:
  """A dynamic (per-token or per-group) activation's QParams from its own range, and its rows' mark, or None.

  When the blocks of ``config`` are the rows of a dot that contracts ``x``
  over ``contracting`` (per-token ranges), ``own_range_qparams`` takes the
  range with one plain reduction and its mark is the dot's row mark, so the
  dot makes a non-finite row's outputs NaN without a pass of its own (such a
  row gets scale 1). Otherwise (or ``contracting`` None: no dot)
  ``qparams_from_array`` and None.
  """
  x = lax.stop_gradient(x)
  rows = (
    contracting is not None
    and config.group_size is None
    and set(qparams_lib.reduce_axes(x.shape, config)) == {a % x.ndim for a in contracting}
  )
  if not rows:
    return qparams_lib.qparams_from_array(x, config), None
  return own_range_qparams(x, config, marked_blocks=True)


def own_range_qparams(
  x: jax.Array, config: QatConfig, *, marked_blocks: bool = False
) -> tuple[QParams, jax.Array | None]:
  """``qparams_from_array(x, config)`` from one plain reduction, and 0 or NaN per block (NaN: the block is not finite).

  Plain reductions (``max |x|`` for a symmetric format, min and max
  otherwise, and the mark ``Σ (x - x)``: ``qparams.plain_amax`` /
  ``plain_range``) instead of the masked reductions of ``array_range``: a
  finite mark proves a block finite, and every finite block gets the same
  parameters, bit for bit. The
  returned mark (parameter layout) is NaN for the blocks that are not.

  Those blocks: with ``marked_blocks`` (the caller makes every output of such
  a block NaN, as the QAT dot does for a per-channel kernel's columns) they
  get scale 1 and zero point 0, a finite grid that nothing reads as a
  result, with no second pass. Otherwise, as ``qparams_from_array``, their
  finite values' range, taken again under ``lax.cond`` only when some block
  is not finite. Per-group configs take ``qparams_from_array`` as it is
  (mark None).

  A ``lax.cond`` per layer costs compile time (it was two thirds of the
  compile-time excess of a 12-block transformer's QAT step), hence
  ``marked_blocks``.
  """
  x = lax.stop_gradient(jnp.asarray(x))
  if config.group_size is not None or x.size == 0:
    return qparams_lib.qparams_from_array(x, config), None
  axes = qparams_lib.reduce_axes(x.shape, config)
  shape = qparams_lib.params_shape(x.shape, config)
  if config.symmetric:
    amax, mark = qparams_lib.plain_amax(x, axis=axes, keepdims=True)
    lo, hi = -amax.reshape(shape), amax.reshape(shape)
  else:
    lo, hi, mark = qparams_lib.plain_range(x, axis=axes, keepdims=True)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
  finite = jnp.isfinite(mark.reshape(shape))
  mark = jnp.where(finite, jnp.zeros((), jnp.float32), jnp.float32(jnp.nan))
  if marked_blocks:
    qp = qparams_lib.qparams_from_range(jnp.where(finite, lo, 0), jnp.where(finite, hi, 0), config)
    one = jnp.ones((), qp.scale.dtype)
    return QParams(jnp.where(finite, qp.scale, one), jnp.where(finite, qp.zero_point, 0)), mark
  lo, hi = lax.cond(jnp.all(finite), lambda: (lo, hi), lambda: qparams_lib.array_range(x, config))
  return qparams_lib.qparams_from_range(lo, hi, config), mark


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
  lhs_mark=None,
) -> jax.Array:
  """The QAT forward: the integer dot of the quantized operands, straight-through backward.

  The same numbers as ``lax.dot_general(fake_quant(lhs), fake_quant(rhs))``
  up to float rounding of the rescale, computed as serving computes them. The
  kernel is quantized with its own range (so it never clips), and so is a
  per-token activation; their all-ones STE masks are skipped. ``rhs_qp``
  None: the kernel's own range is taken here (``own_range_qparams``), whose
  reduction also gives the kernel's non-finite mark when its blocks are its
  columns (a per-channel kernel); a column holding NaN or ±Inf then gets
  scale 1 (its outputs are NaN through the mark, its gradient for the
  input is that of the float dot at a finite stand-in). ``lhs_mark``: the
  same for the activation's rows, from ``dynamic_activation_qparams``, or
  None.
  """
  lhs_own_range = lhs_config is not None and (lhs_config.per_channel or lhs_config.group_size is not None)

  def dot(lhs, rhs, lhs_qp, rhs_qp, lhs_mark):
    rhs_mark = None
    if rhs_qp is None and rhs_config is not None:
      (_, rc), _ = dimension_numbers
      # Blocks that are the kernel's columns: the dot marks a non-finite one's outputs from this mark.
      columns = set(qparams_lib.reduce_axes(rhs.shape, rhs_config)) == {a % rhs.ndim for a in rc}
      rhs_qp, rhs_mark = own_range_qparams(rhs, rhs_config, marked_blocks=columns)
      if not columns:
        rhs_mark = None  # one mark per tensor, not per column: the dot marks the columns itself
    return dot_general_with_mark(
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
      rhs_mark=rhs_mark,
      lhs_mark=lhs_mark,
    )

  return with_out_sharding(dot, out_sharding)(lhs, rhs, lhs_qp, rhs_qp, lhs_mark)


def with_out_sharding(fn, out_sharding):
  """``fn`` with its result placed as ``out_sharding``, as ``lax.dot_general(..., out_sharding=)`` does.

  On a mesh with Explicit axes a dot whose contracting axis is sharded needs
  an output sharding (a row-parallel layer). The quantized dot is several
  operations, so it runs with the mesh's axes made automatic
  (``jax.sharding.auto_axes``) and its result takes ``out_sharding``: the same
  placement, and the same collectives, as the float dot. None: ``fn`` itself.
  """
  if out_sharding is None:
    return fn
  return jax.sharding.auto_axes(fn, out_sharding=out_sharding)


def uses_lsq(config: QatConfig | None) -> bool:
  return config is not None and config.estimator is Estimator.LSQ


def _dimension_numbers_error(where: str, lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> ValueError | None:
  allowed = "((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), tuples of axis indices"
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    groups = [tuple(g) for g in (lc, rc, lb, rb)]
  except (TypeError, ValueError):
    return ValueError(f"{where}: dimension_numbers={dimension_numbers!r} is invalid; allowed: {allowed}.")
  for group, ndim, side in zip(groups, (lhs_ndim, rhs_ndim, lhs_ndim, rhs_ndim), ("lhs", "rhs", "lhs", "rhs")):
    if any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim for a in group):
      return ValueError(
        f"{where}: dimension_numbers={dimension_numbers!r} names an axis the {ndim}-d {side} does not have; "
        f"allowed: {allowed}."
      )
  if len(groups[0]) != len(groups[1]) or len(groups[2]) != len(groups[3]):
    return ValueError(f"{where}: dimension_numbers={dimension_numbers!r} pairs axes unevenly; allowed: {allowed}.")
  return None


def dot_shape_error(where: str, lhs_shape, rhs_shape, dimension_numbers) -> ValueError | None:
  """An error naming ``where`` and both shapes when the operands do not fit ``dimension_numbers``, else None."""
  err = _dimension_numbers_error(where, len(lhs_shape), len(rhs_shape), dimension_numbers)
  if err is not None:
    return err
  (lc, rc), (lb, rb) = dimension_numbers
  for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
    if lhs_shape[a] != rhs_shape[b]:
      return ValueError(
        f"{where}: the operands do not fit: lhs (input) shape {tuple(lhs_shape)} axis {a} has "
        f"{lhs_shape[a]} elements but rhs (kernel) shape {tuple(rhs_shape)} axis {b} has {rhs_shape[b]}."
      )
  return None


# --- serving -------------------------------------------------------------------


_BITS = tuple(QuantBits)


def weight_layout(config: QatConfig, shape) -> np.ndarray:
  """The format and layout of a quantized kernel as a small int32 array, kept beside its values.

  ``[bits, symmetric, narrow_range, per_channel, group_size (0: none),
  packing axis (-1: not packed), ndim, *shape]``. Variables stay plain
  arrays (``flax.serialization``, Orbax), yet say what they hold, so that
  variables applied to, or restored into, a layer of another format or width
  fail loudly instead of serving wrong numbers.
  """
  shape = tuple(int(d) for d in shape)
  return np.array(
    [
      _BITS.index(config.bits),
      config.symmetric,
      config.narrow_range,
      config.per_channel,
      config.group_size or 0,
      PACK_AXIS if config.bits.is_packed else -1,
      len(shape),
      *shape,
    ],
    np.int32,
  )


def describe_layout(code) -> str:
  """``weight_layout`` in words: ``"int4 symmetric per-channel kernel of shape (64, 10)"``."""
  code = [int(c) for c in np.asarray(code).reshape(-1)]
  if len(code) < 7 or not 0 <= code[0] < len(_BITS) or len(code) != 7 + code[6]:
    return f"an unreadable layout {code}"
  bits, symmetric, narrow, per_channel, group, _, _ = code[:7]
  words = [_BITS[bits].value, "symmetric" if symmetric else "asymmetric"]
  if narrow:
    words.append("narrow-range")
  words.append(f"per-group ({group})" if group else "per-channel" if per_channel else "per-tensor")
  return " ".join(words) + f" kernel of shape {tuple(code[7:])}"


def _describe_entry(entry) -> str:
  layout = entry.get("layout") if isinstance(entry, dict) else None
  try:
    if layout is not None:
      return describe_layout(np.asarray(layout))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    pass
  values = entry.get("values") if hasattr(entry, "get") else None
  if values is None:
    return f"no quantized kernel (keys {sorted(entry) if hasattr(entry, 'keys') else type(entry).__name__})"
  return f"values of dtype {jnp.dtype(values.dtype).name} and shape {tuple(values.shape)}"


def _stored_shape(config: QatConfig, shape: tuple) -> tuple:
  if config.bits.is_packed and shape:
    return ((shape[PACK_AXIS] + 1) // 2,) + shape[PACK_AXIS + 1 :]
  return shape


def serving_weight(wq: QTensor, contracting, lhs_config: QatConfig | None) -> dict:
  """The serving variables of a quantized kernel: values, scale, zero point, layout and, when needed, sums.

  The column sums of the integer kernel are what the zero point of an
  asymmetric activation multiplies; they depend on the kernel alone, so they
  are computed once here instead of at every call. ``layout`` is
  ``weight_layout`` of the kernel; ``contracting`` (when known) its axes
  that the dot contracts, so that an exporter can tell an ``(in, out)``
  kernel from an ``(out, in)`` one even under a per-tensor scale.
  """
  entry = {
    "values": wq.values,
    "scale": wq.scale,
    "zero_point": wq.zero_point,
    "layout": jnp.asarray(weight_layout(wq.config, wq.shape)),
  }
  if contracting:
    ndim = len(wq.shape)
    entry["contracting"] = jnp.asarray(sorted(int(a) % ndim for a in contracting), jnp.int32)
  if lhs_config is not None and not lhs_config.symmetric and not wq.config.bits.is_float:
    entry["sums"] = int_ops.weight_sums(wq, tuple(contracting))
  return entry


def weight_from_serving(entry, config: QatConfig, shape, where: str = "serving variables") -> QTensor:
  """The ``QTensor`` of a kernel's serving variables, checked against what the layer expects.

  Dtypes and shapes are checked always (they are static under ``jit``). The
  recorded ``layout`` is compared when it is concrete; under ``jit`` a
  mismatch that shapes cannot show (e.g. symmetric against asymmetric) makes
  the scale, and so the output, NaN.

  Raises:
    ValueError: naming ``where``, what the variables hold and what the layer
      expects, when they disagree.
  """
  shape = tuple(int(d) for d in shape)
  expected = weight_layout(config, shape)

  def mismatch():
    return ValueError(
      f"{where}: the serving variables hold {_describe_entry(entry)}, but the layer expects "
      f"{describe_layout(expected)} (values {config.bits.storage_dtype.name} of shape {_stored_shape(config, shape)}). "
      "Convert the model again with this configuration, or build the layer with the one the variables were "
      "converted with."
    )

  if not hasattr(entry, "get") or any(k not in entry for k in ("values", "scale", "zero_point")):
    raise mismatch()
  values, scale = entry["values"], entry["scale"]
  pshape = qparams_lib.params_shape(shape, config)
  if (
    jnp.dtype(values.dtype) != config.bits.storage_dtype
    or tuple(values.shape) != _stored_shape(config, shape)
    or tuple(jnp.shape(scale)) != pshape
    or tuple(jnp.shape(entry["zero_point"])) != pshape
  ):
    raise mismatch()
  layout = entry.get("layout")
  if layout is not None:
    if tuple(jnp.shape(layout)) != expected.shape:
      raise mismatch()
    try:
      same = bool(np.array_equal(np.asarray(layout), expected))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      scale = jnp.where(jnp.all(layout == expected), scale, jnp.nan)
    else:
      if not same:
        raise mismatch()
  return QTensor(values=values, scale=scale, zero_point=entry["zero_point"], config=config, shape=shape)


def activation_layout(config: QatConfig) -> np.ndarray:
  """The format of a frozen activation range: ``[bits, symmetric, narrow_range]``."""
  return np.array([_BITS.index(config.bits), config.symmetric, config.narrow_range], np.int32)


def serving_activation(qp: QParams, config: QatConfig) -> dict:
  """The serving variables of a frozen activation range: scale, zero point and format."""
  return {"scale": qp.scale, "zero_point": qp.zero_point, "layout": jnp.asarray(activation_layout(config))}


def activation_from_serving(entry, config: QatConfig | None, where: str) -> QParams | None:
  """The frozen activation QParams of serving variables, checked against the layer's activation config.

  ``entry`` is None for a weight-only or per-token layer. Raises (naming
  ``where``) when the variables hold a frozen range and the layer expects
  none, or the other way round, or the formats differ.
  """
  static = config is not None and not is_dynamic(config)
  expects = "no frozen activation range" if not static else f"a frozen {config.bits.value} activation range"
  if entry is None and not static:
    return None
  holds = "no frozen activation range" if entry is None else "a frozen activation range"
  if entry is None or not static:
    raise ValueError(
      f"{where}: the serving variables hold {holds}, but the layer expects {expects} (activation_config="
      f"{config}). Convert the model again with this configuration."
    )
  layout = entry.get("layout")
  if layout is not None:
    expected = activation_layout(config)
    try:
      held = np.asarray(layout)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      held = None
    if held is not None and not np.array_equal(held, expected):
      desc = f"{_BITS[int(held[0])].value} {'symmetric' if held[1] else 'asymmetric'}" if held.size == 3 else held
      raise ValueError(
        f"{where}: the serving variables hold a frozen {desc} activation range, but the layer expects "
        f"{config.bits.value} {'symmetric' if config.symmetric else 'asymmetric'}. Convert the model again."
      )
  return QParams(entry["scale"], entry["zero_point"])


def _no_range_error(where: str) -> ValueError:
  return ValueError(
    f"{where}: no activation range to serve with; calibrate the model (jqat.linen.calibrate) or train it with "
    "'quant_stats' mutable before converting."
  )


def _check_seen(where: str, seen):
  if not bool(seen):
    raise _no_range_error(where)
  return np.asarray(True)


def serving_activation_qparams(stats: ActivationStats | None, config: QatConfig, where: str) -> QParams:
  """The frozen range, or else the moving average, of an activation, for serving.

  Raises when neither exists: serving from the first batch's range would
  silently differ from what the model was trained with. Under ``jax.jit``
  (e.g. ``jit(convert)``) the check runs with the computation, which then
  fails with the same message (wrapped in a ``JaxRuntimeError``), and the
  scale it would have returned is NaN, never a plausible number.
  """
  if stats is None:
    raise _no_range_error(where)
  seen = jnp.logical_or(stats.frozen, stats.ema.count > 0)
  try:
    ok = bool(seen)
  except jax.errors.ConcretizationTypeError:
    seen = jax.pure_callback(functools.partial(_check_seen, where), jax.ShapeDtypeStruct((), jnp.bool_), seen)
  else:
    if not ok:
      raise _no_range_error(where)
  ema_qp = calibration.finalize_stats(stats.ema, config, CalibMethod.MOVING_AVERAGE)
  scale = jnp.where(stats.frozen, stats.scale, ema_qp.scale.reshape(()))
  zero_point = jnp.where(stats.frozen, stats.zero_point, ema_qp.zero_point.reshape(()))
  return QParams(jnp.where(seen, scale, jnp.nan), zero_point)


def serve_dot_general(
  lhs: jax.Array,
  wq: QTensor,
  dimension_numbers,
  lhs_qp: QParams | None,
  lhs_config: QatConfig | None,
  *,
  rhs_sums=None,
  preferred_element_type=None,
  out_sharding=None,
) -> jax.Array:
  """Serving forward: int8 (or fp8) activations times the quantized kernel, or weight-only.

  * ``lhs_config`` set: the activation is quantized with ``lhs_qp`` (frozen),
    or per token from its own range when ``lhs_qp`` is None, and multiplied
    with ``int_dot_general`` (int32 accumulation, one rescale).
  * ``lhs_config`` None: weight-only; float activations times the integer
    kernel converted next to the dot, the scale applied to the result.

  ``out_sharding`` places the result as ``lax.dot_general``'s does (see
  ``with_out_sharding``).
  """
  if out_sharding is not None:

    def serve(lhs, wq, lhs_qp, rhs_sums):
      return serve_dot_general(
        lhs, wq, dimension_numbers, lhs_qp, lhs_config, rhs_sums=rhs_sums, preferred_element_type=preferred_element_type
      )

    return with_out_sharding(serve, out_sharding)(lhs, wq, lhs_qp, rhs_sums)
  out_dtype = preferred_element_type or lhs.dtype
  (lc, rc), (lb, rb) = dimension_numbers
  if lhs_config is None:
    plain = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and wq.ndim == 2
    if plain and not wq.config.bits.is_float:
      return int_ops.weight_only_matmul(lhs, wq).astype(out_dtype)
    w = dequantize(wq).astype(lhs.dtype)
    return lax.dot_general(lhs, w, dimension_numbers, preferred_element_type=preferred_element_type)
  if lhs_qp is None:
    lhs_qp = qparams_lib.qparams_from_array(lhs, lhs_config)  # NaN and Inf are left out of the range
  # A NaN or Inf has no integer value, and ``quantize`` would poison the scale of its whole block (with a
  # per-tensor range: every row). Serving quantizes the finite part instead and marks, as the QAT dot does,
  # exactly the output rows whose inputs were non-finite: ``Σ (x - x)`` is NaN there and 0 elsewhere.
  finite = jnp.where(jnp.isfinite(lhs), lhs, jnp.zeros_like(lhs))
  xq = quantize_finite(finite, lhs_qp, lhs_config)  # finite by construction: no second check
  if rhs_sums is not None:  # the stored column sums travel with the kernel they were computed from
    wq = wq.replace(sums=rhs_sums, sums_axes=tuple(rc))
  y = int_ops.int_dot_general(xq, wq, dimension_numbers, out_dtype=jnp.float32)
  mark = int_kernels.nonfinite_out(lhs, jax.ShapeDtypeStruct(wq.shape, jnp.float32), dimension_numbers, check_rhs=False)
  return (y + mark).astype(out_dtype)


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
  # The integer convolution with the dots' overflow planner (int_kernels).
  return int_kernels.convolve(xq, wq, conv, dimension_numbers).astype(out_dtype)

"""``QTensor``: quantized values with their scale and zero point, as a PyTree.

Values are real low-precision arrays: int8 for 5 to 8 bits, float8 for fp8,
and for 4 bits or fewer two values per byte in a uint8 array (``jnp.int4``
takes a whole byte per value on CPU and GPU).

A ``QTensor`` describes itself. Its children are ``values``, ``scale``,
``zero_point`` and optional precomputed ``sums``; its static metadata is only
what defines the values: the format and layout (the config, with the
estimator, which only matters for training, normalised away), the logical
shape, and the float dtype ``dequantize`` returns. It checks at construction
that the values have the format's storage dtype and the (packed) shape, and
that scale and zero point fit ``params_shape``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jqat._src import formats, numerics
from jqat._src import qparams as qparams_lib
from jqat._src.config import Estimator, QatConfig
from jqat._src.formats import QuantBits
from jqat._src.qparams import QParams

# Sub-byte integers are packed along this axis: adjacent pairs of rows share a
# byte, so a shard of whole bytes along it is a contiguous block of rows.
PACK_AXIS = 0


def pack_int4(q: jax.Array, axis: int = PACK_AXIS) -> jax.Array:
  """Packs signed 4-bit integers (held in int8) two per byte along ``axis``.

  Element ``2i`` goes to the low nibble of byte ``i`` and ``2i + 1`` to the
  high nibble; an odd length is padded with one zero.

  Out of range values: a concrete ``q`` outside ``[-8, 7]`` raises; under a
  trace (``jit``) values are saturated to ``[-8, 7]``, never wrapped.

  Raises:
    TypeError: for a non-integer ``q``.
    ValueError: for concrete values outside ``[-8, 7]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> pack_int4(jnp.array([1, -1, -8, 7], jnp.int8)).tolist()
    [241, 120]
    >>> pack_int4(jnp.array([9]))
    Traceback (most recent call last):
    ...
    ValueError: pack_int4: values must lie in [-8, 7] (signed 4-bit), got 1 outside, e.g. 9
  """
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise TypeError(f"pack_int4 needs integer values, got dtype {q.dtype}; quantize floats with jqat.quantize")
  c = qparams_lib.concrete(q)
  if c is not None:
    bad = (c < -8) | (c > 7)
    if bad.any():
      raise ValueError(
        f"pack_int4: values must lie in [-8, 7] (signed 4-bit), got {int(bad.sum())} outside, e.g. {c[bad].flat[0]}"
      )
  q = jnp.clip(q, -8, 7).astype(jnp.int8)
  if q.ndim == 0:
    q = q.reshape(1)
  axis = axis % q.ndim
  n = q.shape[axis]
  if n % 2:
    pad = [(0, 0)] * q.ndim
    pad[axis] = (0, 1)
    q = jnp.pad(q, pad)
  u = q.astype(jnp.uint8) & 0xF
  lo = jax.lax.slice_in_dim(u, 0, None, 2, axis)
  hi = jax.lax.slice_in_dim(u, 1, None, 2, axis)
  return lo | (hi << 4)


def unpack_int4(packed: jax.Array, length: int, axis: int = PACK_AXIS) -> jax.Array:
  """Inverse of ``pack_int4``: int8 values, ``length`` of them along ``axis``.

  Raises:
    TypeError: for ``packed`` that is not uint8.
    ValueError: for a ``length`` the bytes do not hold: ``n`` bytes along
      ``axis`` hold ``2n`` or ``2n - 1`` values.

  Examples:
    >>> import jax.numpy as jnp
    >>> unpack_int4(jnp.array([241, 120], jnp.uint8), 4).tolist()
    [1, -1, -8, 7]
  """
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise TypeError(f"unpack_int4 needs uint8 bytes (from pack_int4), got dtype {packed.dtype}")
  if packed.ndim == 0:
    raise ValueError("unpack_int4 needs an array of bytes, got a scalar")
  if not -packed.ndim <= axis < packed.ndim:
    raise ValueError(f"unpack_int4: axis={axis} is out of range for bytes of shape {packed.shape}")
  axis = axis % packed.ndim
  n = packed.shape[axis]
  if not isinstance(length, (int, np.integer)) or not 2 * n - 1 <= length <= 2 * n:
    raise ValueError(
      f"unpack_int4: length={length!r} does not fit {n} bytes along axis {axis} of shape {packed.shape}; "
      f"they hold {max(2 * n - 1, 0)} or {2 * n} values"
    )
  lo = (packed & 0xF).astype(jnp.int8)
  hi = (packed >> 4).astype(jnp.int8)
  # Sign-extend a nibble: (n ^ 8) - 8 maps 0..7 to 0..7 and 8..15 to -8..-1.
  lo = (lo ^ 8) - 8
  hi = (hi ^ 8) - 8
  both = jnp.stack([lo, hi], axis=axis + 1)
  shape = list(packed.shape)
  shape[axis] *= 2
  out = both.reshape(shape)
  return jax.lax.slice_in_dim(out, 0, length, 1, axis)


def _is_array(v) -> bool:
  """Whether ``v`` has a shape and dtype to check (arrays, tracers, ShapeDtypeStructs); PyTree sentinels do not."""
  return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (str, bytes))


def stored_shape(shape, config: QatConfig) -> tuple[int, ...]:
  """Shape of ``QTensor.values`` for a tensor of logical ``shape``: packed formats halve axis 0 (rounded up).

  Examples:
    >>> import jqat
    >>> stored_shape((5, 3), jqat.QatConfig(bits="int4")), stored_shape((), jqat.QatConfig(bits="int4"))
    ((3, 3), (1,))
  """
  shape = tuple(shape)
  if not config.bits.is_packed:
    return shape
  if not shape:
    return (1,)
  return ((shape[PACK_AXIS] + 1) // 2,) + shape[PACK_AXIS + 1 :]


def sums_shape(shape, config: QatConfig, contracting) -> tuple[int, ...]:
  """Shape of the column sums over ``contracting`` (``int_ops.weight_sums``): size 1 there, groups kept."""
  ndim = len(shape)
  contract = {a % ndim for a in contracting}
  out = [1 if a in contract else d for a, d in enumerate(shape)]
  if config.group_size is not None and config.group_axis % ndim in contract:
    g = config.group_axis % ndim
    out[g] = shape[g] // config.group_size
  return tuple(out)


def _normalise(config: QatConfig) -> QatConfig:
  # The estimator decides gradients, not values: two QTensors of one format
  # and layout have one treedef whatever they were trained with.
  return config if config.estimator is Estimator.STE else config.replace(estimator=Estimator.STE)


@jax.tree_util.register_pytree_with_keys_class
class QTensor:
  """A quantized tensor: ``dequantize(q) = (values - zero_point) * scale``.

  A PyTree whose children are ``values``, ``scale``, ``zero_point`` and
  ``sums`` (None unless prepared, see ``int_ops.with_weight_sums``); the
  format and layout (``config``), the logical ``shape``, the float
  ``dequant_dtype`` and the axes the sums were taken over are static.

  Attributes:
    values: int8, float8, or uint8 holding two sub-byte integers per byte
      (packed along axis 0); ``format.storage_dtype``.
    scale: float32 array in the parameter layout (``params_shape``: ``()``
      per tensor).
    zero_point: float32 array of integers, the shape of ``scale``.
    config: the ``QatConfig`` the values were quantized with (estimator
      normalised to ``"ste"``).
    shape: the logical shape of the tensor.
    dequant_dtype: the float dtype ``dequantize`` returns.
    sums: int32 sums of the integer values over ``sums_axes``, or None.
    sums_axes: the axes ``sums`` were taken over, or None.

  Raises:
    TypeError: for a config that is not a ``QatConfig``.
    ValueError: when the values' dtype is not the format's storage dtype,
      their shape is not the (packed) logical shape, scale, zero point or
      sums do not fit (each names both), or a known zero point is nonzero
      under a symmetric config.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(bits="int4")
    >>> q = jqat.QTensor(jnp.zeros((2,), jnp.uint8), jnp.float32(0.5), jnp.float32(0), cfg, (4,))
    >>> q.format, q.dequant_dtype
    (<QuantBits.INT4: 'int4'>, dtype('float32'))
    >>> jqat.QTensor(jnp.zeros((4,), jnp.int8), jnp.float32(0.5), jnp.float32(0), cfg, (4,))
    Traceback (most recent call last):
    ...
    ValueError: QTensor: values of dtype int8 do not hold the format int4, stored as uint8
  """

  __slots__ = ("values", "scale", "zero_point", "sums", "config", "shape", "dequant_dtype", "sums_axes")

  def __init__(
    self,
    values,
    scale,
    zero_point,
    config: QatConfig,
    shape,
    dequant_dtype=jnp.float32,
    *,
    sums=None,
    sums_axes=None,
    dtype=None,
  ):
    if dtype is not None:
      warnings.warn(
        "QTensor(dtype=...) is deprecated: the float type dequantize returns is now 'dequant_dtype'",
        DeprecationWarning,
        stacklevel=2,
      )
      dequant_dtype = dtype
    if not isinstance(config, QatConfig):
      raise TypeError(f"QTensor: config must be a jqat.QatConfig, got {type(config).__name__}")
    try:
      shape = tuple(int(d) for d in shape)
    except TypeError:
      raise TypeError(f"QTensor: shape must be a tuple of ints, got {shape!r}") from None
    config = _normalise(config)
    dequant_dtype = jnp.dtype(dequant_dtype)
    if not jnp.issubdtype(dequant_dtype, jnp.floating):
      raise ValueError(f"QTensor: dequant_dtype must be a float dtype, got {dequant_dtype}")
    if (sums is None) != (sums_axes is None):
      raise ValueError("QTensor: sums and sums_axes go together (use int_ops.with_weight_sums)")
    if sums_axes is not None:
      sums_axes = tuple(int(a) % max(len(shape), 1) for a in sums_axes)
    _validate(values, scale, zero_point, sums, config, shape, sums_axes)
    for name, v in (
      ("values", values), ("scale", scale), ("zero_point", zero_point), ("sums", sums), ("config", config),
      ("shape", shape), ("dequant_dtype", dequant_dtype), ("sums_axes", sums_axes),
    ):
      object.__setattr__(self, name, v)

  def __setattr__(self, name, value):
    raise AttributeError(f"QTensor is immutable; use QTensor.replace({name}=...)")

  # --- PyTree ----------------------------------------------------------------------------------------------------

  def tree_flatten_with_keys(self):
    children = tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in ("values", "scale", "zero_point", "sums"))
    return children, (self.config, self.shape, self.dequant_dtype, self.sums_axes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # No checks here: JAX rebuilds PyTrees with tracers, None or sentinel
    # objects as leaves (vmap, tree transforms), and these were checked once.
    obj = object.__new__(cls)
    for k, v in zip(("values", "scale", "zero_point", "sums"), children):
      object.__setattr__(obj, k, v)
    for k, v in zip(("config", "shape", "dequant_dtype", "sums_axes"), aux):
      object.__setattr__(obj, k, v)
    return obj

  def _fields(self) -> tuple:
    return (self.values, self.scale, self.zero_point, self.sums, self.config, self.shape, self.dequant_dtype,
            self.sums_axes)

  def __eq__(self, other):
    # Field by field, as a frozen dataclass compares (useful for trees of PartitionSpecs).
    if type(other) is not QTensor:
      return NotImplemented
    return self._fields() == other._fields()

  def __hash__(self):
    return hash(self._fields())

  def __reduce__(self):
    # copy, deepcopy and pickle rebuild through the PyTree (the fields are read-only).
    children, aux = self.tree_flatten_with_keys()
    return _rebuild, (aux, tuple(v for _, v in children))

  # --- description ---------------------------------------------------------------------------------------------

  @property
  def format(self) -> QuantBits:
    """The number format of the values (``QuantBits``)."""
    return self.config.bits

  @property
  def dtype(self):
    """Deprecated alias of ``dequant_dtype`` (the float type ``dequantize`` returns, not the values' dtype)."""
    warnings.warn(
      "QTensor.dtype is deprecated: it is the float type dequantize returns, now 'dequant_dtype'; the values are "
      "stored as 'values.dtype' in the format 'format'",
      DeprecationWarning,
      stacklevel=2,
    )
    return self.dequant_dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def qparams(self) -> QParams:
    return QParams(self.scale, self.zero_point)

  @property
  def nbytes(self) -> int:
    """Bytes held by values, scale, zero point and sums."""
    arrays = [a for a in (self.values, self.scale, self.zero_point, self.sums) if a is not None]
    return sum(int(a.size) * a.dtype.itemsize for a in arrays)

  def replace(self, **changes) -> QTensor:
    """A copy with some fields changed (checked again); new ``values`` or ``config`` drop the prepared ``sums``."""
    fields = {k: getattr(self, k) for k in ("values", "scale", "zero_point", "config", "shape", "dequant_dtype")}
    if "values" not in changes and "config" not in changes:
      # Sums belong to the values they were computed from: new values drop them.
      fields.update(sums=self.sums, sums_axes=self.sums_axes)
    fields.update(changes)
    return QTensor(**fields)

  def __repr__(self) -> str:
    vshape = tuple(getattr(self.values, "shape", ()))
    sums = "" if self.sums is None else f", sums over {self.sums_axes}"
    return (
      f"QTensor({self.config.bits.value}, shape={self.shape}, values {vshape}, "
      f"scale {tuple(jnp.shape(self.scale)) if _is_array(self.scale) else self.scale}{sums}, "
      f"symmetric={self.config.symmetric}, dequant_dtype={self.dequant_dtype.name})"
    )

  def int_values(self) -> jax.Array:
    """The quantized values, unpacked: int8 for integer formats, float8 for fp8."""
    if self.config.bits.is_packed:
      return unpack_int4(self.values, self.shape[PACK_AXIS] if self.shape else 1).reshape(self.shape)
    return self.values


def _rebuild(aux, children) -> QTensor:
  return QTensor.tree_unflatten(aux, children)


def _validate(values, scale, zero_point, sums, config: QatConfig, shape, sums_axes) -> None:
  if _is_array(values):
    want = config.bits.storage_dtype
    if jnp.dtype(values.dtype) != want:
      raise ValueError(
        f"QTensor: values of dtype {jnp.dtype(values.dtype).name} do not hold the format {config.bits.value}, "
        f"stored as {want.name}"
      )
    expected = stored_shape(shape, config)
    if tuple(values.shape) != expected:
      packed = " (two values per byte along axis 0)" if config.bits.is_packed else ""
      raise ValueError(
        f"QTensor: values of shape {tuple(values.shape)} do not hold a tensor of shape {shape} in "
        f"{config.bits.value}: expected {expected}{packed}"
      )
  if _is_array(scale) and _is_array(zero_point):
    qparams_lib.check_params_shape(scale.shape, zero_point.shape, shape, config, "QTensor")
    z = qparams_lib.concrete(zero_point) if config.symmetric else None
    if z is not None and np.any(z != 0):
      raise ValueError(
        f"QTensor: zero_point holds nonzero values (e.g. {z[z != 0].flat[0]}) but the config is symmetric; "
        "a symmetric format's values are read with zero point 0"
      )
  if sums is not None and _is_array(sums):
    if config.bits.is_float:
      raise ValueError(f"QTensor: {config.bits.value} values need no sums (fp8 operands are symmetric)")
    expected = sums_shape(shape, config, sums_axes)
    if jnp.dtype(sums.dtype) != jnp.int32 or tuple(sums.shape) != expected:
      raise ValueError(
        f"QTensor: sums of dtype {jnp.dtype(sums.dtype).name} and shape {tuple(sums.shape)} do not fit a tensor "
        f"of shape {shape} summed over axes {sums_axes}: expected int32 of shape {expected}"
      )


def check_qtensor(q, where: str, name: str = "operand") -> QTensor:
  """Raises ``TypeError`` in ``where``'s words unless ``q`` is a ``QTensor``."""
  if not isinstance(q, QTensor):
    raise TypeError(
      f"{where}: {name} must be a jqat.QTensor (from jqat.quantize), got {type(q).__name__}"
      + (f" of shape {tuple(q.shape)}" if _is_array(q) else "")
    )
  return q


def quantize(x: ArrayLike, qparams: QParams, config: QatConfig) -> QTensor:
  """Quantizes ``x`` to real low-precision values.

  The same arithmetic as ``fake_quant``'s forward (``jqat._src.numerics``),
  stopped before the dequantization, so ``dequantize(quantize(x, qp, cfg)) ==
  fake_quant(x, qp, cfg)`` bit for bit for finite ``x``.

  NaN and ±Inf have no place on an integer grid (a NaN would become 0 and
  look like data). A block of elements sharing one scale that holds any of
  them gets a NaN scale instead, so everything computed from it (``dequantize``,
  ``int_dot_general``, the integer convolution) is visibly non-finite: per
  token for per-token activations, the whole tensor for a per-tensor one.

  Args:
    x: float array.
    qparams: ``QParams`` in the parameter layout of ``x`` (see ``fake_quant``).
    config: the format and mode.

  Returns:
    A ``QTensor`` whose scale and zero point have ``params_shape(x.shape, config)``.

  Raises:
    TypeError: for a non-float ``x``, ``qparams`` that are not ``QParams`` or
      a config that is not a ``QatConfig``.
    ValueError: for parameters that do not fit ``params_shape`` (both shapes
      named), a concrete scale that is not positive and finite, or a nonzero
      zero point under a symmetric config. Under ``jit`` a scale that is not
      positive is stored as NaN instead, so everything computed from it is NaN.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(bits="int4")
    >>> qp = jqat.qparams_from_range(-7.0, 7.0, cfg)
    >>> q = jqat.quantize(jnp.array([1.0, -2.0, 3.0]), qp, cfg)
    >>> q.values.dtype, q.values.shape, q.int_values().tolist()
    (dtype('uint8'), (2,), [1, -2, 3])
    >>> jqat.dequantize(q).tolist()
    [1.0, -2.0, 3.0]
  """
  return _quantize(x, qparams, config, check_finite=True)


def quantize_finite(x: ArrayLike, qparams: QParams, config: QatConfig) -> QTensor:
  """``quantize`` for data known to be finite (e.g. ``where(isfinite(x), x, 0)``): no NaN / Inf check.

  Bit for bit ``quantize`` on finite data, one reduction over ``x`` fewer; a
  caller that passes a NaN or Inf gets a silently wrong value (0 or the grid's
  end), so the caller marks non-finite inputs itself, as serving does with
  ``int_kernels.nonfinite_out``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from jqat._src import qtensor
    >>> cfg = jqat.QatConfig()
    >>> x = jnp.array([0.5, -1.0, 2.0])
    >>> qp = jqat.qparams_from_array(x, cfg)
    >>> bool((qtensor.quantize_finite(x, qp, cfg).values == jqat.quantize(x, qp, cfg).values).all())
    True
  """
  return _quantize(x, qparams, config, check_finite=False)


def _quantize(x: ArrayLike, qparams: QParams, config: QatConfig, *, check_finite: bool) -> QTensor:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize needs a float array, got dtype {x.dtype}")
  qparams_lib.check_qparams(qparams, x.shape, config, "quantize")
  cd = formats.compute_dtype(x.dtype)
  full = qparams_lib.params_shape(x.shape, config)
  scale_b = qparams_lib.visible_scale(qparams_lib.to_params_shape(qparams.scale, full), config)
  zp_b = qparams_lib.to_params_shape(numerics.effective_zero_point(qparams.zero_point, config, scale_b.dtype), full)
  xg = qparams_lib.to_groups(x, config)
  s = qparams_lib.params_to_groups(scale_b, x.ndim, config)
  z = qparams_lib.params_to_groups(zp_b, x.ndim, config)
  q, _, _ = numerics.quantize_values(xg, s, z, config, cd)
  # The scale as it is stored (config.scale_dtype): what dequantize and every reader of the values use.
  if check_finite:
    scale_b = _nonfinite_scale(scale_b, xg, x.shape, config)
  scale_b = numerics.stored_scale(scale_b, config)
  q = qparams_lib.from_groups(q, x.shape, config)
  if config.bits.is_float:
    values = q.astype(config.bits.float_dtype)
  else:
    # Clipped to the grid already; NaN (poisoned through the scale) stores as 0.
    values = jnp.where(jnp.isnan(q), 0, q).astype(jnp.int8)
    if config.bits.is_packed:
      values = _pack(values)
  return QTensor(values, scale_b, zp_b, config, tuple(x.shape), jnp.dtype(x.dtype))


def _nonfinite_scale(scale: jax.Array, xg: jax.Array, shape, config: QatConfig) -> jax.Array:
  """``scale`` with NaN for every block of ``xg`` (grouped layout) that holds a NaN or ±Inf.

  One float sum over the data ``quantize`` reads anyway.
  """
  # Σ (x - x) is NaN exactly where a block holds NaN or ±Inf (Inf - Inf is NaN), else 0. Not Σ x · 0: XLA
  # shares that product's broadcast zeros with quantize's where(isnan(q), 0, q) and writes them out as a whole
  # tensor first. Not a max either: XLA:CPU's max reductions may drop a NaN.
  xf = xg.astype(scale.dtype)
  mark = jnp.sum(xf - xf, axis=qparams_lib.reduce_axes(shape, config), keepdims=True)
  return scale + mark.reshape(scale.shape)


def _pack(values: jax.Array) -> jax.Array:
  """``pack_int4`` of values already on a grid of at most 4 bits (no range check needed)."""
  q = values.reshape(1) if values.ndim == 0 else values
  n = q.shape[PACK_AXIS]
  if n % 2:
    pad = [(0, 0)] * q.ndim
    pad[PACK_AXIS] = (0, 1)
    q = jnp.pad(q, pad)
  u = q.astype(jnp.uint8) & 0xF
  lo = jax.lax.slice_in_dim(u, 0, None, 2, PACK_AXIS)
  hi = jax.lax.slice_in_dim(u, 1, None, 2, PACK_AXIS)
  return lo | (hi << 4)


def dequantize(q: QTensor) -> jax.Array:
  """``(values - zero_point) * scale`` in ``q.dequant_dtype``.

  Raises:
    TypeError: when ``q`` is not a ``QTensor``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(symmetric=False)
    >>> x = jnp.array([-1.0, 0.0, 3.0])
    >>> qp = jqat.qparams_from_array(x, cfg)
    >>> bool((jqat.dequantize(jqat.quantize(x, qp, cfg)) == jqat.fake_quant(x, qp, cfg)).all())
    True
  """
  check_qtensor(q, "dequantize", "q")
  cfg = q.config
  cd = formats.compute_dtype(q.dequant_dtype)
  v = qparams_lib.to_groups(q.int_values().astype(cd), cfg)
  s = qparams_lib.params_to_groups(q.scale, q.ndim, cfg).astype(cd)
  z = qparams_lib.params_to_groups(q.zero_point, q.ndim, cfg).astype(cd)
  y = numerics.dequantize_values(v, s, z, q.dequant_dtype)
  return qparams_lib.from_groups(y, q.shape, cfg)

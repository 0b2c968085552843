"""``QTensor``: quantized values with their scale and zero point, as a PyTree.

Values are real low-precision arrays: int8 for 5 to 8 bits, float8 for fp8,
and for 4 bits or fewer two values per byte in a uint8 array (``jnp.int4``
takes a whole byte per value on CPU and GPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jqat._src import formats
from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.fake_quant import _effective_zero_point, quantize_grid, to_grid_units
from jqat._src.qparams import QParams

# Sub-byte integers are packed along this axis: adjacent pairs of rows share a
# byte, so a shard of whole bytes along it is a contiguous block of rows.
PACK_AXIS = 0


def pack_int4(q: jax.Array, axis: int = PACK_AXIS) -> jax.Array:
  """Packs signed 4-bit integers (held in int8) two per byte along ``axis``.

  Element ``2i`` goes to the low nibble of byte ``i`` and ``2i + 1`` to the
  high nibble; an odd length is padded with one zero.

  Examples:
    >>> import jax.numpy as jnp
    >>> pack_int4(jnp.array([1, -1, -8, 7], jnp.int8)).tolist()
    [241, 120]
  """
  q = jnp.asarray(q, jnp.int8)
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
  """Inverse of ``pack_int4``: int8 values, ``length`` of them along ``axis``."""
  axis = axis % packed.ndim
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


@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized tensor: ``dequantize(q) = (values - zero_point) * scale``.

  A PyTree whose children are ``values``, ``scale`` and ``zero_point``; the
  format (``config``), the logical ``shape`` and the original float ``dtype``
  are static.

  Attributes:
    values: int8, float8, or uint8 holding two sub-byte integers per byte
      (packed along axis 0).
    scale: float32 array in the parameter layout (see ``qparams_from_range``).
    zero_point: float32 array of integers, same shape as ``scale``.
    config: the ``QatConfig`` the values were quantized with.
    shape: the logical shape of the tensor.
    dtype: the float dtype ``dequantize`` returns.
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  config: QatConfig = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def qparams(self) -> QParams:
    return QParams(self.scale, self.zero_point)

  @property
  def nbytes(self) -> int:
    """Bytes held by values, scale and zero point."""
    return sum(int(a.size) * a.dtype.itemsize for a in (self.values, self.scale, self.zero_point))

  def int_values(self) -> jax.Array:
    """The quantized values, unpacked: int8 for integer formats, float8 for fp8."""
    if self.config.bits.is_packed:
      return unpack_int4(self.values, self.shape[PACK_AXIS] if self.shape else 1).reshape(self.shape)
    return self.values


jax.tree_util.register_dataclass(
    QTensor, data_fields=["values", "scale", "zero_point"], meta_fields=["config", "shape", "dtype"]
)


def quantize(x: ArrayLike, qparams: QParams, config: QatConfig) -> QTensor:
  """Quantizes ``x`` to real low-precision values.

  The same arithmetic as ``fake_quant``'s forward, stopped before the
  dequantization, so ``dequantize(quantize(x, qp, cfg)) == fake_quant(x, qp, cfg)``
  bit for bit. NaN inputs have no integer value; they become 0 in integer
  formats and NaN in fp8.

  Args:
    x: float array.
    qparams: ``QParams`` in the parameter layout of ``x``.
    config: the format and mode.

  Returns:
    A ``QTensor``.

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
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize needs a float array, got dtype {x.dtype}")
  cd = formats.compute_dtype(x.dtype)
  scale = jnp.asarray(qparams.scale)
  zp = _effective_zero_point(qparams.zero_point, config, scale.dtype)
  full = qparams_lib.params_shape(x.shape, config)
  scale_b = jnp.broadcast_to(scale, full) if scale.ndim <= len(full) else scale
  zp_b = jnp.broadcast_to(zp, scale_b.shape)
  xg = qparams_lib.to_groups(x, config)
  xs = to_grid_units(xg.astype(cd), qparams_lib.params_to_groups(scale_b, x.ndim, config).astype(cd))
  q = quantize_grid(xs, qparams_lib.params_to_groups(zp_b, x.ndim, config).astype(cd), config)
  q = qparams_lib.from_groups(q, x.shape, config)
  if config.bits.is_float:
    values = q.astype(config.bits.float_dtype)
  else:
    values = q.astype(jnp.int8)
    if config.bits.is_packed:
      values = pack_int4(values)
  return QTensor(values, scale_b, zp_b, config, tuple(x.shape), jnp.dtype(x.dtype))


def dequantize(q: QTensor) -> jax.Array:
  """``(values - zero_point) * scale`` in the original float dtype.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(symmetric=False)
    >>> x = jnp.array([-1.0, 0.0, 3.0])
    >>> qp = jqat.qparams_from_array(x, cfg)
    >>> bool((jqat.dequantize(jqat.quantize(x, qp, cfg)) == jqat.fake_quant(x, qp, cfg)).all())
    True
  """
  cfg = q.config
  cd = formats.compute_dtype(q.dtype)
  v = qparams_lib.to_groups(q.int_values().astype(cd), cfg)
  s = qparams_lib.params_to_groups(q.scale, q.ndim, cfg).astype(cd)
  z = qparams_lib.params_to_groups(q.zero_point, q.ndim, cfg).astype(cd)
  y = ((v - z) * s).astype(q.dtype)
  return qparams_lib.from_groups(y, q.shape, cfg)

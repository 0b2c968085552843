"""A quantized key / value cache: quantize-on-write, one scale per token and head.

An autoregressive decoder keeps the keys and values of every token it has seen. Stored in float32 they
cost ``2 · heads · head_dim · 4`` bytes per token and layer, and reading them bounds decoding on
accelerators once the context is long. Here each token's key (and value) vector of each head is
quantized once, when the token is written, with its own symmetric scale

``scale[b, t, h] = max_d |x[b, t, h, d]| / qmax``,  ``q = clip(round(x / scale), qmin, qmax)``

and stored as int8, packed int4 (two values per byte along ``head_dim``) or fp8 e4m3, beside the scale
(float32 by default, or bfloat16 to halve its cost). A token written at position ``t`` is never read
back into float and never requantized: later writes only fill later positions, so its bytes stay as
they were written. The attention products read the stored integers directly (``jqat.linen.QatAttention``).

The layout follows Flax's decode cache: ``(batch..., max_length, heads, head_dim)``, the position axis
third from the end, written with ``lax.dynamic_update_slice`` at a traced index, so one compiled step
serves every position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jqat._src.config import QatConfig
from jqat._src.formats import QuantBits
from jqat._src.qparams import MIN_SCALE, plain_amax
from jqat._src.qtensor import pack_int4, unpack_int4

_BITS = {"int8": QuantBits.INT8, "int4": QuantBits.INT4, "fp8_e4m3": QuantBits.FP8_E4M3, "fp8": QuantBits.FP8_E4M3}
_SCALE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheConfig:
  """How a key / value cache stores its entries.

  Attributes:
    bits: ``"int8"`` (default), ``"int4"`` (two values per byte along ``head_dim``) or ``"fp8_e4m3"``
      (alias ``"fp8"``). Symmetric, full range (int8: ``[-128, 127]``, the scale maps the largest
      magnitude to 127).
    scale_dtype: ``"float32"`` (default) or ``"bfloat16"``: how the scale of each token and head is stored.
      The scale is rounded to this dtype before the values are quantized with it, so stored values and
      stored scale always agree. With ``head_dim = 32`` a float32 scale adds 4 / 32 = 12.5% to an int8
      entry, a bfloat16 one 6.25%.

  Raises:
    ValueError: at construction, naming the field, the value and what is allowed.

  Examples:
    >>> import jqat
    >>> cfg = jqat.KVCacheConfig(bits="int8")
    >>> cfg.bytes_per_token(num_heads=4, head_dim=32)  # keys and values, scales included
    288
    >>> jqat.KVCacheConfig(bits="int2")
    Traceback (most recent call last):
    ...
    ValueError: KVCacheConfig.bits='int2' is invalid; allowed: 'int8', 'int4', 'fp8_e4m3' (or 'fp8').
  """

  bits: QuantBits | str = "int8"
  scale_dtype: str | DTypeLike = "float32"

  def __post_init__(self):
    key = self.bits.value if isinstance(self.bits, QuantBits) else self.bits
    if not isinstance(key, str) or key not in _BITS:
      raise ValueError(f"KVCacheConfig.bits={self.bits!r} is invalid; allowed: 'int8', 'int4', 'fp8_e4m3' (or 'fp8').")
    object.__setattr__(self, "bits", _BITS[key])
    try:
      name = jnp.dtype(self.scale_dtype).name
    except TypeError:
      name = None
    if name not in _SCALE_DTYPES:
      raise ValueError(
        f"KVCacheConfig.scale_dtype={self.scale_dtype!r} is invalid; allowed: 'float32', 'bfloat16' "
        "(float16 cannot hold the smallest scales)."
      )
    object.__setattr__(self, "scale_dtype", name)

  @property
  def quant_config(self) -> QatConfig:
    """The per-tensor ``QatConfig`` of the format (the cache's own layout sets the granularity)."""
    return QatConfig(bits=self.bits, symmetric=True)

  @property
  def storage_dtype(self) -> jnp.dtype:
    """dtype of the stored values: int8, uint8 (packed int4) or float8_e4m3fn."""
    return jnp.dtype(self.bits.storage_dtype)

  def stored_dim(self, head_dim: int) -> int:
    """Length of the stored last axis for ``head_dim`` values (half, rounded up, for int4)."""
    return (head_dim + 1) // 2 if self.bits.is_packed else head_dim

  def bytes_per_token(self, *, num_heads: int, head_dim: int) -> int:
    """Bytes one token takes in one layer's cache: keys and values, their scales included."""
    per_head = self.stored_dim(head_dim) * self.storage_dtype.itemsize + jnp.dtype(self.scale_dtype).itemsize
    return 2 * num_heads * per_head


def kv_quantize(x: ArrayLike, config: KVCacheConfig) -> tuple[jax.Array, jax.Array]:
  """Quantizes keys or values ``(..., heads, head_dim)`` with one scale per leading index (token and head).

  Args:
    x: float array; the last axis is ``head_dim``.
    config: the cache's format.

  Returns:
    ``(values, scale)``: values in ``config.storage_dtype`` of shape ``x.shape[:-1] + (stored_dim,)``, and
    the scale in ``config.scale_dtype`` of shape ``x.shape[:-1] + (1,)``. An all-zero vector gets the
    smallest positive scale (``jqat.MIN_SCALE``), never 0; a vector holding NaN or ±Inf gets a NaN scale,
    so everything read from it is visibly non-finite.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> values, scale = jqat.kv_quantize(jnp.array([[1.0, -0.5, 0.25, 0.0]]), jqat.KVCacheConfig())
    >>> values.tolist(), scale.tolist()
    ([[127, -64, 32, 0]], [[0.007874015718698502]])
  """
  x = jnp.asarray(x)
  if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"kv_quantize: x must be a float array (..., head_dim), got dtype {x.dtype} shape {x.shape}")
  x = x.astype(jnp.float32)
  qmax = float(config.quant_config.qmax)
  # The arithmetic of qparams_from_array + quantize for a symmetric per-vector scale, written for the one
  # reduction it needs: each decoding step runs it twice per layer, and a step is bound by its op count.
  amax, mark = plain_amax(x, axis=-1, keepdims=True)  # mark: NaN for a vector that holds a NaN or ±Inf
  scale = jnp.maximum(amax * (1 / qmax), MIN_SCALE)
  # Rounded to its storage dtype first: the values are quantized with exactly the stored scale.
  scale = jnp.where(jnp.isfinite(mark), scale, jnp.nan).astype(config.scale_dtype)
  u = x * (1 / scale.astype(jnp.float32))
  if config.bits.is_float:
    return jnp.clip(u, -qmax, qmax).astype(config.storage_dtype), scale  # clip first: the cast does not saturate
  q = jnp.clip(jnp.round(u), config.quant_config.qmin, qmax)
  values = jnp.where(jnp.isnan(q), 0, q).astype(jnp.int8)  # a NaN scale marks the vector; its values store as 0
  if config.bits.is_packed:
    values = pack_int4(values, axis=-1)
  return values, scale


def kv_values(values: jax.Array, config: KVCacheConfig, head_dim: int) -> jax.Array:
  """The stored values as int8 (integer formats, int4 unpacked) or float8, shape ``(..., head_dim)``."""
  if config.bits.is_packed:
    return unpack_int4(values, head_dim, axis=-1)
  return values


def kv_dequantize(values: jax.Array, scale: jax.Array, config: KVCacheConfig, head_dim: int) -> jax.Array:
  """``values · scale`` in float32: the keys or values the cache stands for.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.KVCacheConfig(bits="int4")
    >>> v, s = jqat.kv_quantize(jnp.array([[0.7, -0.1, 0.3]]), cfg)
    >>> v.shape, jqat.kv_values(v, cfg, 3).tolist()  # two int4 values per byte; scale 0.7 / 7
    ((1, 2), [[7, -1, 3]])
    >>> bool(jnp.allclose(jqat.kv_dequantize(v, s, cfg, 3), jnp.array([[0.7, -0.1, 0.3]])))
    True
  """
  return kv_values(values, config, head_dim).astype(jnp.float32) * scale.astype(jnp.float32)


def kv_write(cache: jax.Array, update: jax.Array, index: ArrayLike) -> jax.Array:
  """Writes ``update`` (one position, ``(batch..., 1, heads, d)``) into ``cache`` at position ``index``.

  The position axis is third from the end, as in Flax's decode cache. Only that slice changes; every
  other position keeps its bytes. ``index`` may be traced. Like ``lax.dynamic_update_slice`` it is
  clamped to the last position: callers that may pass ``index >= max_length`` check it first
  (``QatAttention`` drops such writes).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cache = jnp.zeros((1, 3, 1, 2), jnp.int8)
    >>> jqat.kv_write(cache, jnp.ones((1, 1, 1, 2), jnp.int8), 1)[0, :, 0].tolist()
    [[0, 0], [1, 1], [0, 0]]
  """
  index = jnp.asarray(index, jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  starts = (zero,) * (cache.ndim - 3) + (index, zero, zero)
  bits = lax.dynamic_update_slice(storage_bits(cache), storage_bits(update.astype(cache.dtype)), starts)
  return lax.bitcast_convert_type(bits, cache.dtype)


def storage_bits(x: jax.Array) -> jax.Array:
  """``x``'s bytes as unsigned integers of its width (a bitcast), for float formats narrower than 32 bits.

  XLA:CPU computes in bfloat16 and fp8 through float32, so a write of one position of a bfloat16 or fp8
  cache would convert the whole cache to float32 and back; on its bits nothing is converted (the bytes
  written are exactly the update's). Other dtypes are returned as they are.
  """
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
  return x

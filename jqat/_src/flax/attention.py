"""Quantized attention products and a quantized KV cache for Flax linen.

Two activation-by-activation products live inside attention, ``q·k`` and ``p·v`` (``p`` the softmax
probabilities). ``dot_product_attention`` is a drop-in for ``flax.linen.dot_product_attention`` (pass it
as ``nn.MultiHeadDotProductAttention(attention_fn=...)``, configured with ``quantized_attention``) that
runs both as integer dots, ``int8 x int8 -> int32`` and one rescale, with ranges taken from the operands
themselves each call (dynamic quantization: no state, nothing to calibrate):

* ``q·k``: the (already ``1/sqrt(d)``-scaled) query and the key, each symmetric, with one scale per tensor,
  per head or per token and head (``AttentionQuantConfig.granularity``).
* ``p·v``: the value with the same granularity. Its scale may vary along the tokens, which ``p·v`` sums
  over, so it is folded into the probabilities first: ``p·v = Σ_k (p_k s_k) v_int,k``, and ``p' = p · s``
  is quantized instead of ``p``. ``p'`` lies in ``[0, max_k p'_k]``: each row (one query, one head) gets
  its own unsigned grid on that interval, 256 levels held in int8 with zero point -128 (``scale =
  max / 255``). A row's own maximum rather than the fixed grid ``[0, 1]`` (scale 1/255): when attention
  spreads over a long context its probabilities are all small (about 1 / 128 at context 128, two levels
  of a fixed grid), and the row maximum keeps the full 256 levels for them; it costs one max per row,
  next to the softmax's own.

The softmax stays float32. Both products go through ``jqat.qat_dot_general``: its forward is the integer
kernel serving runs, its backward the clipped straight-through estimator, so training with this function
(QAT) and serving with it compute the same numbers. Quantized products are off by default (a config of
None keeps the float product): quantizing ``q·k`` during training has convergence problems reported
(MaxText dropped it; paxml#71).

``QatAttention`` is ``nn.MultiHeadDotProductAttention`` (a subclass, with the same fields and the same
parameter tree, so float checkpoints load) plus these products and a decode cache that can be quantized
(``jqat.KVCacheConfig``): keys and values written once per token as int8 / int4 / fp8 e4m3 with a scale per
token and head, read by the integer dots directly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.attention import combine_masks
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import DenseGeneral
from flax.linen.normalization import LayerNorm
from jax import lax

from jqat._src.config import QatConfig
from jqat._src.formats import QuantBits
from jqat._src.int_ops import INT32_MAX, int_dot_general
from jqat._src.kv_cache import KVCacheConfig, kv_quantize, kv_values, kv_write, storage_bits
from jqat._src.qat_dot import qat_dot_general
from jqat._src.qparams import MIN_SCALE, QParams, qparams_from_array
from jqat._src.qtensor import QTensor

_GRANULARITIES = ("tensor", "head", "token")
_INT_BITS = ("int4", "int5", "int6", "int7", "int8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionQuantConfig:
  """How one attention product (``q·k`` or ``p·v``) is quantized.

  Attributes:
    bits: an integer format, ``"int4"`` .. ``"int8"`` (default). The probabilities of ``p·v`` use the same
      number of bits on an unsigned grid.
    granularity: where the operands' scales change: ``"tensor"`` (one scale), ``"head"`` (one per head) or
      ``"token"`` (default: one per batch element, token and head). A quantized KV cache stores one scale
      per token and head, so it needs ``"token"``.

  Raises:
    ValueError: at construction, naming the field, the value and what is allowed.

  Examples:
    >>> import jqat.linen
    >>> jqat.linen.AttentionQuantConfig(granularity="head").granularity
    'head'
    >>> jqat.linen.AttentionQuantConfig(bits="fp8")
    Traceback (most recent call last):
    ...
    ValueError: AttentionQuantConfig.bits='fp8' is invalid; allowed: 'int4', 'int5', 'int6', 'int7', 'int8'.
  """

  bits: QuantBits | str = "int8"
  granularity: str = "token"

  def __post_init__(self):
    key = self.bits.value if isinstance(self.bits, QuantBits) else self.bits
    if key not in _INT_BITS:
      allowed = ", ".join(repr(b) for b in _INT_BITS)
      raise ValueError(f"AttentionQuantConfig.bits={self.bits!r} is invalid; allowed: {allowed}.")
    object.__setattr__(self, "bits", QuantBits(key))
    if self.granularity not in _GRANULARITIES:
      allowed = ", ".join(repr(g) for g in _GRANULARITIES)
      raise ValueError(f"AttentionQuantConfig.granularity={self.granularity!r} is invalid; allowed: {allowed}.")

  def operand_config(self, ndim: int) -> QatConfig:
    """The symmetric ``QatConfig`` of a ``(batch..., length, heads, depth)`` operand."""
    if self.granularity == "tensor":
      return QatConfig(bits=self.bits, symmetric=True)
    axes = (ndim - 2,) if self.granularity == "head" else tuple(range(ndim - 1))
    return QatConfig(bits=self.bits, symmetric=True, per_channel=True, channel_axis=axes)

  def probability_config(self, ndim: int) -> QatConfig:
    """The asymmetric per-row ``QatConfig`` of ``(batch..., heads, q_length, kv_length)`` probabilities."""
    return QatConfig(bits=self.bits, symmetric=False, per_channel=True, channel_axis=tuple(range(ndim - 1)))


# The default of quantized_attention: int8, one scale per token and head.
INT8_PER_TOKEN = AttentionQuantConfig()


def _check_config(value, name: str, where: str):
  if value is not None and not isinstance(value, AttentionQuantConfig):
    raise TypeError(f"{where}: {name} must be a jqat.linen.AttentionQuantConfig or None, got {type(value).__name__}")


def _dims_qk(ndim: int):
  batch = tuple(range(ndim - 3)) + (ndim - 2,)
  return ((ndim - 1,), (ndim - 1,)), (batch, batch)


def _dims_pv(ndim: int):
  # p: (batch..., h, q, k), v: (batch..., k, h, d) -> (batch..., h, q, d)
  nb = ndim - 3
  return ((ndim - 1,), (ndim - 3,)), (tuple(range(nb)) + (nb,), tuple(range(nb)) + (ndim - 2,))


def _token_scales_on_rows(scale: jax.Array, shape) -> jax.Array:
  """A value scale in the layout of ``(batch..., length, heads, 1)`` as ``(batch..., heads, 1, length)``."""
  s = jnp.broadcast_to(scale, tuple(shape[:-1]) + (1,))[..., 0]
  return jnp.swapaxes(s, -1, -2)[..., None, :].astype(jnp.float32)


def _unit() -> QParams:
  one = jnp.ones((), jnp.float32)
  return QParams(one, jnp.zeros((), jnp.float32))


def quantized_qk(query: jax.Array, key: jax.Array, config: AttentionQuantConfig) -> jax.Array:
  """``einsum('...qhd,...khd->...hqk', query, key)`` as an integer dot with dynamic ranges."""
  cfg = config.operand_config(query.ndim)
  qp_q = qparams_from_array(lax.stop_gradient(query), cfg)
  qp_k = qparams_from_array(lax.stop_gradient(key), cfg)
  return qat_dot_general(
    query,
    key,
    _dims_qk(query.ndim),
    qp_q,
    qp_k,
    lhs_config=cfg,
    rhs_config=cfg,
    preferred_element_type=jnp.float32,
    lhs_may_clip=False,
    rhs_may_clip=False,
  )


def _pv_from_grid(
  probs: jax.Array, grid_values: jax.Array, value_scale: jax.Array, config: AttentionQuantConfig, value_bits: QuantBits
):
  """``Σ_k p_k s_k v_k``: the value's scale folded into the probabilities, ``v`` given in grid units."""
  folded = probs.astype(jnp.float32) * _token_scales_on_rows(value_scale, grid_values.shape)
  pcfg = config.probability_config(folded.ndim)
  qp_p = qparams_from_array(lax.stop_gradient(folded), pcfg)
  vcfg = QatConfig(bits=value_bits, symmetric=True)
  out = qat_dot_general(
    folded,
    grid_values,
    _dims_pv(folded.ndim),
    qp_p,
    _unit(),
    lhs_config=pcfg,
    rhs_config=vcfg,
    preferred_element_type=jnp.float32,
    lhs_may_clip=False,
    rhs_may_clip=False,
  )
  return jnp.swapaxes(out, -2, -3)  # (batch..., h, q, d) -> (batch..., q, h, d)


def quantized_pv(probs: jax.Array, value: jax.Array, config: AttentionQuantConfig) -> jax.Array:
  """``einsum('...hqk,...khd->...qhd', probs, value)`` as an integer dot with dynamic ranges."""
  cfg = config.operand_config(value.ndim)
  qp_v = qparams_from_array(lax.stop_gradient(value), cfg)
  scale = lax.stop_gradient(jnp.asarray(qp_v.scale, jnp.float32))
  # Grid units computed as quantize does (x * (1 / s)), so they round to the very integers it stores.
  grid_values = value.astype(jnp.float32) * (1 / scale)
  return _pv_from_grid(probs, grid_values, scale, config, config.bits)


def _softmax_scores(scores, bias, mask, dtype):
  if bias is not None:
    scores = scores + bias
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return jax.nn.softmax(scores.astype(jnp.float32))


def _dropout(weights, *, dropout_rng, dropout_rate, broadcast_dropout, deterministic, key_ndim):
  if deterministic or dropout_rate <= 0.0:
    return weights
  keep_prob = 1.0 - dropout_rate
  if broadcast_dropout:
    shape = tuple([1] * (key_ndim - 2)) + weights.shape[-2:]
  else:
    shape = weights.shape
  keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
  return weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))


def dot_product_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  broadcast_dropout: bool = True,
  dropout_rng=None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  force_fp32_for_softmax: bool = False,
  einsum_dot_general=None,
  qk_attn_weights_einsum=None,
  attn_weights_value_einsum=None,
  *,
  qk_config: AttentionQuantConfig | None = None,
  pv_config: AttentionQuantConfig | None = None,
):
  """``flax.linen.dot_product_attention`` with quantized ``q·k`` and ``p·v``.

  The same arguments and result as Flax's function, plus ``qk_config`` and ``pv_config``; with both None
  it *is* Flax's function. A product with a config runs as ``int8 x int8 -> int32`` and one rescale on
  operands quantized with ranges from themselves (see the module docstring); the softmax is float32 and
  the result is cast to ``dtype``. Bind the configs with ``quantized_attention`` to pass the function as
  ``nn.MultiHeadDotProductAttention(attention_fn=...)``.

  Accuracy: the integer dots equal the float dots of the fake-quantized operands (``jqat.fake_quant``
  with the same ranges) to within float32 rounding of the rescale; what differs from float attention is
  the quantization itself, about ``scale / 2`` per operand element.

  Args:
    query: ``(batch..., q_length, heads, depth)``.
    key: ``(batch..., kv_length, heads, depth)``.
    value: ``(batch..., kv_length, heads, v_depth)``.
    bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype, precision, module,
      force_fp32_for_softmax, einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: as in
      ``flax.linen.dot_product_attention`` (the last three only for float products).
    qk_config: how ``q·k`` is quantized, or None for float.
    pv_config: how ``p·v`` is quantized, or None for float.

  Returns:
    ``(batch..., q_length, heads, v_depth)``.

  Raises:
    TypeError: for a config that is not an ``AttentionQuantConfig``.
    ValueError: when a quantized product is combined with a custom einsum or dot_general, or when query,
      key and value do not fit (all three shapes named).

  Examples:
    >>> import jax, jax.numpy as jnp, jqat.linen
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 4, 2, 8))
    >>> cfg = jqat.linen.AttentionQuantConfig()
    >>> out = jqat.linen.dot_product_attention(q, k, v, qk_config=cfg, pv_config=cfg)
    >>> ref = jqat.linen.dot_product_attention(q, k, v)
    >>> out.shape, bool(jnp.abs(out - ref).max() < 0.05)
    ((1, 4, 2, 8), True)
  """
  where = "jqat.linen.dot_product_attention"
  _check_config(qk_config, "qk_config", where)
  _check_config(pv_config, "pv_config", where)
  if qk_config is None and pv_config is None:
    return nn.dot_product_attention(
      query,
      key,
      value,
      bias,
      mask,
      broadcast_dropout,
      dropout_rng,
      dropout_rate,
      deterministic,
      dtype,
      precision,
      module,
      force_fp32_for_softmax,
      einsum_dot_general=einsum_dot_general,
      qk_attn_weights_einsum=qk_attn_weights_einsum,
      attn_weights_value_einsum=attn_weights_value_einsum,
    )
  if einsum_dot_general is not None or qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
    raise ValueError(
      f"{where}: qk_config / pv_config quantize the products themselves; they cannot be combined with "
      "einsum_dot_general, qk_attn_weights_einsum or attn_weights_value_einsum"
    )
  query, key, value = promote_dtype(query, key, value, dtype=dtype)
  sow = None if module is None else lambda w: module.sow("intermediates", "attention_weights", w)
  return quantized_products_attention(
    query,
    key,
    value,
    bias,
    mask,
    dropout_rng=dropout_rng,
    dropout_rate=dropout_rate,
    broadcast_dropout=broadcast_dropout,
    deterministic=deterministic,
    precision=precision,
    sow=sow,
    qk_config=qk_config,
    pv_config=pv_config,
    where=where,
  )


def quantized_products_attention(
  query,
  key,
  value,
  bias,
  mask,
  *,
  dropout_rng,
  dropout_rate,
  broadcast_dropout,
  deterministic,
  precision,
  sow,
  qk_config,
  pv_config,
  where,
):
  """The attention of ``dot_product_attention`` on promoted operands; ``sow(weights)`` records the weights."""
  dtype = query.dtype
  _check_shapes(query, key, value, where)
  depth = query.shape[-1]
  query = query / jnp.sqrt(depth).astype(dtype)
  if qk_config is None:
    scores = jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)
  else:
    scores = quantized_qk(query, key, qk_config)
  weights = _softmax_scores(scores, bias, mask, dtype)
  if sow is not None:
    sow(weights.astype(dtype))
  weights = _dropout(
    weights,
    dropout_rng=dropout_rng,
    dropout_rate=dropout_rate,
    broadcast_dropout=broadcast_dropout,
    deterministic=deterministic,
    key_ndim=key.ndim,
  )
  if pv_config is None:
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(dtype), value, precision=precision)
  else:
    out = quantized_pv(weights, value, pv_config)
  return out.astype(dtype)


def _check_shapes(query, key, value, where):
  ok = (
    query.ndim == key.ndim == value.ndim >= 3
    and query.shape[:-3] == key.shape[:-3] == value.shape[:-3]
    and query.shape[-2] == key.shape[-2] == value.shape[-2]
    and query.shape[-1] == key.shape[-1]
    and key.shape[-3] == value.shape[-3]
  )
  if not ok:
    raise ValueError(
      f"{where}: query {query.shape}, key {key.shape} and value {value.shape} do not fit: expected "
      "(batch..., q_length, heads, depth), (batch..., kv_length, heads, depth), (batch..., kv_length, heads, v_depth)"
    )


def quantized_attention(
  *,
  qk_config: AttentionQuantConfig | None = INT8_PER_TOKEN,
  pv_config: AttentionQuantConfig | None = INT8_PER_TOKEN,
):
  """``dot_product_attention`` with its configs bound, for ``nn.MultiHeadDotProductAttention(attention_fn=...)``.

  Both products default to int8 with per-token ranges. Flax passes ``attention_fn`` only the keywords
  in its signature; the bound function keeps Flax's.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jqat.linen
    >>> layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=jqat.linen.quantized_attention())
    >>> x = jnp.ones((1, 3, 8))
    >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
    (1, 3, 8)
  """
  _check_config(qk_config, "qk_config", "jqat.linen.quantized_attention")
  _check_config(pv_config, "pv_config", "jqat.linen.quantized_attention")
  return functools.partial(dot_product_attention, qk_config=qk_config, pv_config=pv_config)


# --- one decoding step: attention of one query token over a cache -------------------------------------------
#
# A decoding step is bound by its kernel count and by copies of the cache, not by arithmetic, on CPU at
# least; three choices keep both down.
#
# * The cache keeps its stored layout ``(batch..., length, heads, depth)`` in both products: one matrix
#   ``(length, heads · depth)`` per batch element. With the heads as a batch dimension of the dots (as in
#   the full forward), XLA:CPU first copies the whole cache into a heads-major layout, twice per layer and
#   step. Instead ``q·k`` contracts the cache over ``(heads, depth)`` with a block-diagonal query, whose row
#   ``g`` holds head ``g``'s query in block ``g`` and zeros elsewhere, so row ``g`` of the result is head
#   ``g``'s scores (the zeros drop every other head exactly); ``p·v`` contracts the probabilities
#   ``(heads, length)`` with the cache over the positions, and the diagonal blocks (row ``g``, head ``g``)
#   are the heads' outputs. Each costs ``heads`` times the multiply-adds of the per-head product: a few ten
#   thousand at one query token.
# * The products read the cache as it was before the step, and the step's own key and value enter beside
#   it: at position ``index`` the score is the query times the new key, and the new value's term is added to
#   ``p·v`` with that position's probability zeroed in the dot. The numbers are those of reading the cache
#   after the write (the same products; for the integer products the same int32 sums, exactly). The write
#   then comes after the reads, tied to the output (``_always``), so XLA updates the cache in place;
#   otherwise each write would copy the whole cache, since the reads could not be ordered before it.
# * Reductions over the positions are split into chunks of 32 (``_reduce``): XLA:CPU otherwise rewrites a
#   reduction over a longer axis into two kernels.

_CHUNK = 32  # XLA:CPU splits a reduction over an axis longer than this into two kernels (tree reduction)


def _reduce(op, x: jax.Array) -> jax.Array:
  """``x`` reduced over its last axis by ``op`` (``jnp.maximum`` or ``jnp.add``), keeping that axis as 1.

  Over up to 8 chunks of 32 the chunks' results are combined elementwise, which XLA fuses into the
  consumer: one kernel where the plain reduction takes two.
  """
  n = x.shape[-1]
  chunks = n // _CHUNK
  if n <= _CHUNK or n % _CHUNK or chunks > 8:
    return (jnp.max if op is jnp.maximum else jnp.sum)(x, axis=-1, keepdims=True)
  part = (jnp.max if op is jnp.maximum else jnp.sum)(x.reshape(x.shape[:-1] + (chunks, _CHUNK)), axis=-1)
  return functools.reduce(op, [part[..., i : i + 1] for i in range(chunks)])


def _softmax_rows(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``_softmax_scores(scores, None, mask)``: the masked float32 softmax over the last axis."""
  scores = scores.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  e = jnp.exp(scores - lax.stop_gradient(_reduce(jnp.maximum, scores)))
  return e / _reduce(jnp.add, e)


def _eye(heads: int) -> np.ndarray:
  return np.eye(heads, dtype=bool)[:, :, None]


def _block_diagonal(x: jax.Array) -> jax.Array:
  """``(..., heads, depth) -> (..., heads, heads, depth)``: row ``g`` holds ``x[..., g, :]`` in block ``g``."""
  return jnp.where(_eye(x.shape[-2]), x[..., None, :, :], jnp.zeros((), x.dtype))


def _diagonal(y: jax.Array) -> jax.Array:
  """``(..., heads, heads, depth) -> (..., heads, depth)``: the blocks ``y[..., g, g, :]``."""
  return jnp.sum(jnp.where(_eye(y.shape[-2]), y, jnp.zeros((), y.dtype)), axis=-3)


def _heads_first(scale: jax.Array) -> jax.Array:
  """Scales ``(batch..., length, heads, 1)`` as float32 ``(batch..., heads, length)``."""
  return jnp.swapaxes(scale[..., 0], -1, -2).astype(jnp.float32)


def _scores(keys: jax.Array, rows: jax.Array, **kwargs) -> jax.Array:
  """``(batch..., length, heads, depth) x (batch..., rows, heads, depth) -> (batch..., rows, length)``."""
  nb = keys.ndim - 3
  b = tuple(range(nb))
  dims = ((nb + 1, nb + 2), (nb + 1, nb + 2)), (b, b)
  return jnp.swapaxes(lax.dot_general(keys, rows, dims, **kwargs), -1, -2)


def _weighted(probs: jax.Array, values: jax.Array, **kwargs) -> jax.Array:
  """``(batch..., rows, length) x (batch..., length, heads, depth) -> (batch..., rows, heads, depth)``."""
  nb = values.ndim - 3
  b = tuple(range(nb))
  return lax.dot_general(probs, values, (((nb + 1,), (nb,)), (b, b)), **kwargs)


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[..., index:index + 1]`` (the last axis; clamped to its end, as ``lax.dynamic_slice``)."""
  return lax.dynamic_slice_in_dim(x, index, 1, axis=x.ndim - 1)


def _always(x: jax.Array) -> jax.Array:
  """True, computed from an element of ``x``: a condition that makes whatever it guards wait for ``x``."""
  x0 = jnp.ravel(x)[0].astype(jnp.float32)
  return (x0 <= jnp.inf) | (x0 != x0)  # NaN compares false, so the second term covers it


def write_position(cache: jax.Array, new: jax.Array, index: jax.Array, after: jax.Array | None = None) -> jax.Array:
  """``kv_write(cache, new, index)``, dropped (the cache unchanged) when ``index`` is past the end.

  The write goes to the clamped position, and past the end it writes back what that position holds: the
  same index for the read and the write lets XLA update the cache in place, in one kernel (bfloat16 and fp8
  caches are written on their bits, ``storage_bits``). With ``after`` the write also waits for that array
  (the step's output), so that it comes after every read of the cache.
  """
  last = cache.shape[-3] - 1
  at = jnp.minimum(index, last)
  bits, new_bits = storage_bits(cache), storage_bits(new.astype(cache.dtype))
  kept = lax.dynamic_slice_in_dim(bits, at, 1, axis=bits.ndim - 3)
  write = index <= last
  if after is not None:
    write = write & _always(after)
  return lax.bitcast_convert_type(kv_write(bits, jnp.where(write, new_bits, kept), at), cache.dtype)


def _quantize_rows(x: jax.Array, config: QatConfig) -> QTensor:
  """``quantize(x, qparams_from_array(x, config), config)`` for one scale per row (the last axis reduced).

  The same numbers, with the one reduction a row needs: symmetric from ``max |x|``; asymmetric only for
  rows known to be non-negative (the folded probabilities), whose range is ``[0, max x]``, so the zero
  point is ``qmin``.
  """
  x = x.astype(jnp.float32)
  qmin, qmax = float(config.qmin), float(config.qmax)
  if config.symmetric:
    top, levels, zero = _reduce(jnp.maximum, jnp.abs(x)), qmax, 0.0
  else:
    top, levels, zero = _reduce(jnp.maximum, x), qmax - qmin, qmin
  scale = jnp.maximum(top * (1 / levels), MIN_SCALE)
  scale = jnp.where(jnp.isfinite(top), scale, jnp.nan)
  q = jnp.clip(jnp.round(x * (1 / scale)) + zero, qmin, qmax)
  values = jnp.where(jnp.isnan(q), 0, q).astype(jnp.int8)
  return QTensor(values, scale, jnp.full_like(scale, zero), config, x.shape)


def _float_step(query, key, value, keys, values, index, mask, precision):
  """Flax's float attention of the query token over the cache and its own ``key`` / ``value``."""
  depth = query.shape[-1]
  here = jnp.arange(keys.shape[-3]) == index
  q = query[..., 0, :, :] / jnp.sqrt(depth).astype(query.dtype)  # (batch..., heads, depth)
  scores = _scores(keys, _block_diagonal(q), precision=precision)
  scores = jnp.where(here, jnp.sum(q * key[..., 0, :, :], axis=-1, keepdims=True), scores)
  if mask is not None:
    scores = jnp.where(mask[..., 0, :], scores, jnp.finfo(jnp.float32).min)
  # The softmax's normalization after p·v, Σ_t e_t v_t / Σ_t e_t: one division, in the last kernel.
  e = jnp.exp(scores - lax.stop_gradient(_reduce(jnp.maximum, scores)))  # (batch..., heads, length)
  out = _diagonal(_weighted(jnp.where(here, 0.0, e), values, precision=precision))
  return (out + _at(e, index) * value[..., 0, :, :]) / _reduce(jnp.add, e)


def _quantized_step(query, new: dict, cache: dict, index, mask, cfg: KVCacheConfig, qk_config, pv_config):
  """``_float_step`` over a quantized cache: the stored integers read directly (see ``decode_step``)."""
  depth = query.shape[-1]
  here = jnp.arange(cache["cached_key"].shape[-3]) == index
  is_fp8 = cfg.bits.is_float
  keys = kv_values(cache["cached_key"], cfg, depth)  # (batch..., length, heads, depth)
  values = kv_values(cache["cached_value"], cfg, depth)
  key_new = kv_values(new["cached_key"], cfg, depth)[..., 0, :, :]  # (batch..., heads, depth)
  value_new = kv_values(new["cached_value"], cfg, depth)[..., 0, :, :]
  ks, ks_new = _heads_first(cache["cached_key_scale"]), _heads_first(new["cached_key_scale"])
  vs = jnp.where(here, _heads_first(new["cached_value_scale"]), _heads_first(cache["cached_value_scale"]))
  q = query[..., 0, :, :].astype(jnp.float32) / jnp.sqrt(depth).astype(jnp.float32)
  if qk_config is None:
    scores = _scores(keys.astype(jnp.float32), _block_diagonal(q)) * ks
    score_new = jnp.sum(q * key_new.astype(jnp.float32), axis=-1, keepdims=True) * ks_new
  else:
    qq = _quantize_rows(q, qk_config.operand_config(q.ndim))
    if is_fp8:  # fp8 keys: float32 products, exact for int8 x e4m3
      acc = _scores(keys.astype(jnp.float32), _block_diagonal(qq.values).astype(jnp.float32))
      acc_new = jnp.sum(qq.values.astype(jnp.float32) * key_new.astype(jnp.float32), axis=-1, keepdims=True)
    else:
      acc = _scores(keys, _block_diagonal(qq.values), preferred_element_type=jnp.int32)
      acc_new = jnp.sum(qq.values.astype(jnp.int32) * key_new.astype(jnp.int32), axis=-1, keepdims=True)
    scores = acc.astype(jnp.float32) * (qq.scale * ks)
    score_new = acc_new.astype(jnp.float32) * (qq.scale * ks_new)
  weights = _softmax_rows(jnp.where(here, score_new, scores)[..., None, :], mask)[..., 0, :]
  folded = weights * vs  # the value scales folded into the probabilities (module docstring)
  if pv_config is None:
    out = _diagonal(_weighted(jnp.where(here, 0.0, folded), values.astype(jnp.float32)))
    return out + _at(folded, index) * value_new.astype(jnp.float32)
  pcfg = pv_config.probability_config(folded.ndim)
  pq = _quantize_rows(folded, pcfg)
  zero = int(pcfg.qmin)  # the grid's zero point: the stored integers are p / scale + zero
  rows = jnp.where(here, jnp.int8(zero), pq.values)  # (q - zero) = 0 at the new token's position
  centred_new = _at(pq.values, index).astype(jnp.int32) - zero
  if is_fp8:
    acc = _diagonal(_weighted((rows.astype(jnp.float32) - zero), values.astype(jnp.float32)))
    acc = acc + centred_new.astype(jnp.float32) * value_new.astype(jnp.float32)
  else:
    # Σ_t (q_t - zero) v_t = Σ_t q_t v_t + (-zero / 2) · 2 Σ_t v_t: the second sum is one more row of the
    # dot, the constant -zero / 2 (64 for int8), which int8 holds where -zero does not.
    half = jnp.full(rows.shape[:-2] + (1, rows.shape[-1]), -zero // 2, jnp.int8)
    acc = _weighted(jnp.concatenate([rows, half], axis=-2), values, preferred_element_type=jnp.int32)
    acc = _diagonal(acc[..., :-1, :, :]) + 2 * acc[..., -1, :, :] + centred_new * value_new.astype(jnp.int32)
  return acc.astype(jnp.float32) * pq.scale


# Bound of |Σ_t (q_t - zero) v_t| in one p·v sum: the probabilities' centred values lie in [0, 255], int8
# values in [-128, 127]. Longer caches take the general path, whose planner splits the sum.
_MAX_STEP_LENGTH = INT32_MAX // (255 * 128)


def decode_step(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  cache: dict,
  index: jax.Array,
  mask: jax.Array | None,
  *,
  cache_config: KVCacheConfig | None,
  qk_config: AttentionQuantConfig | None = None,
  pv_config: AttentionQuantConfig | None = None,
  precision=None,
) -> tuple[jax.Array, dict]:
  """One decoding step: the query token's attention over the cache and its own key and value, and the
  cache with them written at ``index``.

  With ``cache_config`` None (a float cache) it computes ``flax.linen.dot_product_attention`` over the
  written cache (float32 sums in another order). With a quantized cache, each of the token's key and value
  vectors is quantized once (``kv_quantize``) and stored; ``q·k`` is an ``int8 x int8 -> int32`` dot of the
  query (quantized per head) with the stored keys, rescaled once by both scales; ``p·v`` folds the stored
  value scales into the probabilities, quantizes each probability row on its unsigned grid and multiplies
  its integers with the stored values (the grid's zero point enters as one more row of the same dot). A
  product whose config is None runs in float on the stored values, their scales applied after the dot;
  fp8 entries are multiplied in float32. These are the numbers of ``int_dot_general`` on the same operands
  read from the written cache: equal int32 sums, the same float32 rescale. See the comment above for how
  the step keeps the cache in place.

  Args:
    query, key, value: the token's, ``(batch..., 1, heads, depth)``.
    cache: ``cached_key`` / ``cached_value`` ``(batch..., length, heads, stored_dim)``, and with a quantized
      cache ``cached_key_scale`` / ``cached_value_scale`` ``(batch..., length, heads, 1)``.
    index: the token's position (traced int32 scalar).
    mask: broadcastable to ``(batch..., heads, 1, length)``, or None: which positions the token may attend
      to (the caller masks the positions after ``index``).
    cache_config: the cache's format, or None.
    qk_config, pv_config: the products' configs (granularity ``"token"``) or None; only with a quantized
      cache.
    precision: of the float products.

  Returns:
    ``(out, cache)``: the attention ``(batch..., 1, heads, depth)`` in float32 (NaN when ``index`` is past
    the cache's end) and the updated cache (unchanged past the end).
  """
  length = cache["cached_key"].shape[-3]
  if cache_config is None:
    new = {"cached_key": key, "cached_value": value}
  else:
    kv, ks = kv_quantize(key, cache_config)
    vv, vs = kv_quantize(value, cache_config)
    new = {"cached_key": kv, "cached_key_scale": ks, "cached_value": vv, "cached_value_scale": vs}
  if length > _MAX_STEP_LENGTH and cache_config is not None:
    cache = {name: write_position(cache[name], new[name], index) for name in cache}
    out = _cached_attention_general(query, cache, mask, cache_config, qk_config, pv_config)
  else:
    if cache_config is None:
      out = _float_step(query, key, value, cache["cached_key"], cache["cached_value"], index, mask, precision)
    else:
      out = _quantized_step(query, new, cache, index, mask, cache_config, qk_config, pv_config)
    out = out[..., None, :, :].astype(jnp.float32)
    cache = {name: write_position(cache[name], new[name], index, after=out) for name in cache}
  return jnp.where(index < length, out, jnp.nan), cache


def _cached_attention_general(query, cache, mask, cache_config, qk_config, pv_config):
  """``decode_step``'s attention over the written cache through ``int_dot_general``, the heads as batch
  dimensions: any length (its planner keeps the int32 sums exact)."""
  key_values, key_scale = cache["cached_key"], cache["cached_key_scale"]
  value_values, value_scale = cache["cached_value"], cache["cached_value_scale"]
  depth = query.shape[-1]
  store = cache_config.quant_config
  keys = kv_values(key_values, cache_config, depth)
  values = kv_values(value_values, cache_config, depth)
  ks = key_scale.astype(jnp.float32)
  vs = value_scale.astype(jnp.float32)
  query = query.astype(jnp.float32) / jnp.sqrt(depth).astype(jnp.float32)
  if qk_config is None:
    scores = jnp.einsum("...qhd,...khd->...hqk", query, keys.astype(jnp.float32) * ks)
  else:
    qcfg = qk_config.operand_config(query.ndim)
    qq = _quantize_rows(query, qcfg)
    kcfg = QatConfig(
      bits=store.bits if store.bits.is_float else QuantBits.INT8,
      symmetric=True,
      per_channel=True,
      channel_axis=tuple(range(keys.ndim - 1)),
    )
    kq = QTensor(keys, ks, jnp.zeros_like(ks), kcfg, keys.shape)
    scores = int_dot_general(qq, kq, _dims_qk(query.ndim))
  weights = _softmax_scores(scores, None, mask, jnp.float32)
  if pv_config is None:
    out = jnp.einsum("...hqk,...khd->...qhd", weights, values.astype(jnp.float32) * vs)
  else:
    folded = weights * _token_scales_on_rows(vs, values.shape)
    pcfg = pv_config.probability_config(folded.ndim)
    pq = _quantize_rows(folded, pcfg)
    vcfg = QatConfig(bits=store.bits if store.bits.is_float else QuantBits.INT8, symmetric=True)
    one = jnp.ones((), jnp.float32)
    vq = QTensor(values, one, jnp.zeros((), jnp.float32), vcfg, values.shape)
    out = jnp.swapaxes(int_dot_general(pq, vq, _dims_pv(folded.ndim)), -2, -3)
  return out


class QatAttention(nn.MultiHeadDotProductAttention):
  """``nn.MultiHeadDotProductAttention`` with quantized attention products and a quantized decode cache.

  Every field of Flax's module means what it means there, and the parameter tree is the same (``query``,
  ``key``, ``value``, ``out``, and ``query_ln`` / ``key_ln`` with ``normalize_qk``): a float checkpoint
  loads unchanged, and ``qkv_dot_general_cls`` / ``out_dot_general_cls`` quantize the projections as
  with Flax's module (e.g. ``jqat.linen.QatDotGeneral``).

  Decoding follows Flax's convention: ``decode=True``, the ``cache`` collection, ``cache_index``, one
  token per call. ``model.init`` with a full-length input creates the cache (its length is that input's);
  each later call writes the token's key and value at ``cache_index`` and attends to positions
  ``<= cache_index``. With ``cache_config`` set, ``cached_key`` / ``cached_value`` hold int8 (or packed
  int4, or fp8) values and ``cached_key_scale`` / ``cached_value_scale`` one scale per token and head;
  each token is quantized once, when it is written, and never again.

  Attributes:
    qk_config: how ``q·k`` is quantized (``AttentionQuantConfig``), or None (float, the default).
    pv_config: how ``p·v`` is quantized, or None (float, the default).
    cache_config: the decode cache's format (``jqat.KVCacheConfig``), or None for Flax's float cache.
      A quantized cache with quantized products needs their granularity ``"token"``.

  Bad input: a config of the wrong type or a non-token product config beside a quantized cache fails at
  construction. Decoding with a query batch other than the cache's, more than one token, or a cache made
  under another ``cache_config`` (values dtype or shape) raises ``ValueError`` naming the layer and both
  shapes. Decoding past the cache's length raises ``ValueError`` when ``cache_index`` is concrete (an
  un-jitted apply); under ``jit`` it cannot raise, so the write is dropped (the cache keeps every earlier
  token unchanged) and the layer's output is NaN, which makes the model's logits NaN.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat, jqat.linen
    >>> layer = jqat.linen.QatAttention(num_heads=2, decode=True, cache_config=jqat.KVCacheConfig(),
    ...                                 qk_config=jqat.linen.AttentionQuantConfig(),
    ...                                 pv_config=jqat.linen.AttentionQuantConfig())
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4, 8)))  # a cache of 4 positions
    >>> out, state = layer.apply(variables, jnp.ones((1, 1, 8)), mutable=["cache"])
    >>> state["cache"]["cached_key"].dtype, int(state["cache"]["cache_index"]), out.shape
    (dtype('int8'), 1, (1, 1, 8))
  """

  qk_config: AttentionQuantConfig | None = None
  pv_config: AttentionQuantConfig | None = None
  cache_config: KVCacheConfig | None = None

  def __post_init__(self):
    where = f"{type(self).__name__}"
    _check_config(self.qk_config, "qk_config", where)
    _check_config(self.pv_config, "pv_config", where)
    if self.cache_config is not None and not isinstance(self.cache_config, KVCacheConfig):
      raise TypeError(
        f"{where}: cache_config must be a jqat.KVCacheConfig or None, got {type(self.cache_config).__name__}"
      )
    if self.cache_config is not None:
      for name in ("qk_config", "pv_config"):
        cfg = getattr(self, name)
        if cfg is not None and cfg.granularity != "token":
          raise ValueError(
            f"{where}: {name}.granularity={cfg.granularity!r} does not fit a quantized cache, which stores one "
            "scale per token and head; use granularity='token'"
          )
    super().__post_init__()

  def _where(self) -> str:
    path = "/".join(str(p) for p in self.scope.path) if self.scope is not None else ""
    return f"{type(self).__name__} {path or self.name!r}"

  def _attend(self, query, key, value, mask, dropout_rng, deterministic, sow_weights):
    fn = self.attention_fn
    if self.qk_config is not None or self.pv_config is not None:
      if fn is not nn.dot_product_attention:
        raise ValueError(f"{self._where()}: qk_config / pv_config replace attention_fn; set one or the other")
      fn = functools.partial(dot_product_attention, qk_config=self.qk_config, pv_config=self.pv_config)
    kwargs = dict(
      mask=mask,
      dropout_rng=dropout_rng,
      dropout_rate=self.dropout_rate,
      broadcast_dropout=self.broadcast_dropout,
      deterministic=deterministic,
      dtype=self.dtype,
      precision=self.precision,
      force_fp32_for_softmax=self.force_fp32_for_softmax,
    )
    # Flax's einsum hooks (AQT's entry point) apply to float products, as in Flax's module.
    if self.qk_attn_weights_einsum_cls is not None:
      kwargs["qk_attn_weights_einsum"] = self.qk_attn_weights_einsum_cls()
    if self.attn_weights_value_einsum_cls is not None:
      kwargs["attn_weights_value_einsum"] = self.attn_weights_value_einsum_cls()
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    if sow_weights:
      return fn(query, key, value, **kwargs, module=self)
    return fn(query, key, value, **kwargs)

  @nn.compact
  def __call__(
    self,
    inputs_q,
    inputs_k=None,
    inputs_v=None,
    *,
    inputs_kv=None,
    mask=None,
    deterministic: bool | None = None,
    dropout_rng=None,
    sow_weights: bool = False,
  ):
    """Applies attention as ``nn.MultiHeadDotProductAttention`` does (the same arguments)."""
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError(f"{self._where()}: pass inputs_k / inputs_v or inputs_kv, not both")
      inputs_k = inputs_v = inputs_kv
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError(f"{self._where()}: inputs_k cannot be None when inputs_v is given")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"{self._where()}: qkv_features={qkv_features} is not divisible by num_heads={self.num_heads}")
    head_dim = qkv_features // self.num_heads
    dense = functools.partial(
      DenseGeneral,
      axis=-1,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      features=(self.num_heads, head_dim),
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      use_bias=self.use_bias,
      precision=self.precision,
      dot_general=self.qkv_dot_general,
      dot_general_cls=self.qkv_dot_general_cls,
    )
    if self._fused_projections_apply(inputs_q, inputs_k, inputs_v):
      query, key, value = self._fused_projections(inputs_q)
    else:
      query, key, value = dense(name="query")(inputs_q), dense(name="key")(inputs_k), dense(name="value")(inputs_v)
    if self.normalize_qk:
      query = LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)(query)
      key = LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)(key)

    if self.dropout_rate > 0.0:
      m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not m_deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      m_deterministic = True

    x = None
    if self.decode:
      x = self._decode(query, key, value, mask, dropout_rng, m_deterministic, sow_weights)
    if x is None:
      x = self._attend(query, key, value, mask, dropout_rng, m_deterministic, sow_weights)
    return DenseGeneral(
      features=features,
      axis=(-2, -1),
      kernel_init=self.out_kernel_init or self.kernel_init,
      bias_init=self.out_bias_init or self.bias_init,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      dot_general=self.out_dot_general,
      dot_general_cls=self.out_dot_general_cls,
      name="out",
    )(x)

  def _decode(self, query, key, value, mask, dropout_rng, deterministic, sow_weights):
    """One decoding step through the cache; None while the cache is being created (``init``)."""
    cfg = self.cache_config
    is_initialized = self.has_variable("cache", "cached_key")
    head_dim = key.shape[-1]
    if cfg is None:
      shapes = {"cached_key": (key.shape, key.dtype), "cached_value": (value.shape, value.dtype)}
    else:
      stored = key.shape[:-1] + (cfg.stored_dim(head_dim),)
      scale = key.shape[:-1] + (1,)
      shapes = {
        "cached_key": (stored, cfg.storage_dtype),
        "cached_key_scale": (scale, jnp.dtype(cfg.scale_dtype)),
        "cached_value": (stored, cfg.storage_dtype),
        "cached_value_scale": (scale, jnp.dtype(cfg.scale_dtype)),
      }
    if is_initialized:
      self._check_cache(shapes, query)
    # Scales start at 1: the empty positions hold zeros and are masked; a positive scale keeps them finite.
    init = {n: (jnp.ones if n.endswith("_scale") else jnp.zeros) for n in shapes}
    cache = {n: self.variable("cache", n, init[n], s, d) for n, (s, d) in shapes.items()}
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if not is_initialized:
      return None
    *batch_dims, max_length, _, _ = cache["cached_key"].value.shape
    index = cache_index.value
    if not isinstance(index, jax.core.Tracer) and int(index) >= max_length:
      raise ValueError(
        f"{self._where()}: decoding position {int(index)} is past the cache's length {max_length} "
        f"(cache_index counts from 0; the cache was created by init with an input of length {max_length})"
      )
    mask = combine_masks(
      mask, jnp.broadcast_to(jnp.arange(max_length) <= index, tuple(batch_dims) + (1, 1, max_length))
    )
    cache_index.value = index + 1
    if cfg is None and not self._plain_float_products(query, deterministic, sow_weights):
      # Another attention function, einsum hooks, dropout or sown weights: Flax's path over the written cache.
      for name, new in (("cached_key", key), ("cached_value", value)):
        cache[name].value = write_position(cache[name].value, new, index)
      x = self._attend(
        query, cache["cached_key"].value, cache["cached_value"].value, mask, dropout_rng, deterministic, sow_weights
      )
      return jnp.where(index < max_length, x, jnp.asarray(jnp.nan, x.dtype))
    x, written = decode_step(
      query,
      key,
      value,
      {name: var.value for name, var in cache.items()},
      index,
      mask,
      cache_config=cfg,
      qk_config=self.qk_config,
      pv_config=self.pv_config,
      precision=self.precision,
    )
    for name, var in cache.items():
      var.value = written[name]
    return x.astype(self.dtype or query.dtype)

  def _fused_projections_apply(self, inputs_q, inputs_k, inputs_v) -> bool:
    """Whether a decoding step may compute the float query, key and value projections as one dot."""
    params = self.variables.get("params", {})
    return (
      self.decode
      and self.has_variable("cache", "cached_key")  # a step, not the cache's creation
      and inputs_k is inputs_q
      and inputs_v is inputs_q
      and self.qkv_dot_general is None
      and self.qkv_dot_general_cls is None
      and all(name in params for name in ("query", "key", "value"))
    )

  def _fused_projections(self, inputs):
    """``DenseGeneral`` query / key / value of one input as one dot with the three kernels side by side.

    The same parameters and the same products (each output element the same sum over the features); one
    kernel launch where a decoding step would take three. The stacked kernel does not change between
    steps, so XLA computes it once, outside a decoding loop.
    """
    params = self.variables["params"]
    names = ("query", "key", "value")
    kernel = jnp.stack([nn.meta.unbox(params[n]["kernel"]) for n in names], axis=1)  # (features, 3, heads, dim)
    bias = jnp.stack([nn.meta.unbox(params[n]["bias"]) for n in names]) if self.use_bias else None
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    if bias is not None:
      y = y + bias
    return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]

  def _plain_float_products(self, query, deterministic, sow_weights) -> bool:
    """Whether the step's attention is Flax's own float function, which ``decode_step`` computes."""
    return (
      self.attention_fn is nn.dot_product_attention
      and self.qk_config is None
      and self.pv_config is None
      and self.qk_attn_weights_einsum_cls is None
      and self.attn_weights_value_einsum_cls is None
      and (deterministic or self.dropout_rate <= 0.0)
      and not sow_weights
      and query.dtype == jnp.float32
    )

  def _check_cache(self, shapes, query):
    names = sorted(shapes)
    held = sorted(k for k in self.variables.get("cache", {}) if k != "cache_index")
    got = {k: self.get_variable("cache", k) for k in held}
    describe = lambda d: ", ".join(f"{k} {jnp.dtype(v[1]).name}{tuple(v[0])}" for k, v in d.items())  # noqa: E731
    if (
      held != names
      or any(jnp.dtype(got[k].dtype) != jnp.dtype(shapes[k][1]) for k in names)
      or any(got[k].shape[-2:] != tuple(shapes[k][0][-2:]) for k in names)
    ):
      have = {k: (v.shape, v.dtype) for k, v in got.items()}
      raise ValueError(
        f"{self._where()}: the cache does not match the layer's cache_config={self.cache_config!r}: it holds "
        f"{describe(have)}; the layer expects per token {describe(shapes)} "
        "(re-create the cache with model.init under this config)"
      )
    cached = got["cached_key"].shape
    batch = tuple(cached[:-3])
    if tuple(query.shape[:-3]) != batch or query.shape[-3] != 1:
      raise ValueError(
        f"{self._where()}: decoding takes one token per call for the cache's batch {batch} (cache of "
        f"{cached[-3]} positions, {cached[-2]} heads): expected a query of shape "
        f"{batch + (1,) + tuple(query.shape[-2:])}, got {tuple(query.shape)}"
      )

"""Quantized attention products for Flax NNX: an ``attention_fn`` for ``nnx.MultiHeadAttention``.

The same arithmetic as ``jqat.linen.dot_product_attention`` (see ``jqat._src.flax.attention``): ``q·k`` and
``p·v`` as ``int8 x int8 -> int32`` dots with ranges from the operands, the value scales folded into the
probabilities, each probability row on its own unsigned 8-bit grid, the softmax in float32. NNX's own decode
cache (``decode=True``, ``init_cache``) feeds this function the float cache, so quantized products work
while decoding too. ``QatMultiHeadAttention`` adds the quantized (int8 / int4 / fp8) cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype as _nnx_promote_dtype

from jqat._src.flax.attention import (
  INT8_PER_TOKEN,
  AttentionQuantConfig,
  _check_config,
  decode_step,
  quantized_products_attention,
)
from jqat._src.kv_cache import KVCacheConfig


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
  promote_dtype=_nnx_promote_dtype,
  is_causal: bool = False,
  *,
  qk_config: AttentionQuantConfig | None = None,
  pv_config: AttentionQuantConfig | None = None,
):
  """``flax.nnx.dot_product_attention`` with quantized ``q·k`` and ``p·v``.

  The same arguments and result as NNX's function, plus ``qk_config`` and ``pv_config``; with both None it
  *is* NNX's function. ``is_causal`` lets query ``i`` attend to keys ``<= i``; ``module`` sows the weights
  into ``nnx.Intermediate`` ``attention_weights``. Grouped-query attention (fewer key heads than query
  heads) is left to the float function.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat.nnx
    >>> from flax import nnx
    >>> layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
    ...                                attention_fn=jqat.nnx.quantized_attention())
    >>> layer(jnp.ones((1, 3, 8))).shape
    (1, 3, 8)
  """
  where = "jqat.nnx.dot_product_attention"
  _check_config(qk_config, "qk_config", where)
  _check_config(pv_config, "pv_config", where)
  if qk_config is None and pv_config is None:
    return nnx.dot_product_attention(
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
      promote_dtype,
      is_causal,
    )
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  if is_causal:
    causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), jnp.bool_))
    mask = causal if mask is None else jnp.logical_and(mask.astype(jnp.bool_), causal)
  sow = None if module is None else lambda w: module.sow(nnx.Intermediate, "attention_weights", w)
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


def quantized_attention(
  *,
  qk_config: AttentionQuantConfig | None = INT8_PER_TOKEN,
  pv_config: AttentionQuantConfig | None = INT8_PER_TOKEN,
):
  """``dot_product_attention`` with its configs bound, for ``nnx.MultiHeadAttention(attention_fn=...)``.

  Both products default to int8 with per-token ranges.
  """
  _check_config(qk_config, "qk_config", "jqat.nnx.quantized_attention")
  _check_config(pv_config, "pv_config", "jqat.nnx.quantized_attention")
  return functools.partial(dot_product_attention, qk_config=qk_config, pv_config=pv_config)


class QatMultiHeadAttention(nnx.MultiHeadAttention):
  """``nnx.MultiHeadAttention`` with quantized products and a quantized decode cache.

  The same constructor (plus ``qk_config``, ``pv_config``, ``cache_config``), the same parameters and the
  same decode convention (``init_cache``, then one token per call with ``decode=True``). With
  ``cache_config`` (``jqat.KVCacheConfig``), ``init_cache`` creates ``cached_key`` / ``cached_value`` in its
  storage format and ``cached_key_scale`` / ``cached_value_scale`` (one scale per token and head); each
  token is quantized once, when written, and the products read the stored integers
  (``jqat._src.flax.attention.decode_step``). Without it the float cache of NNX is used, with the
  products of ``qk_config`` / ``pv_config``. Bad input as for ``jqat.linen.QatAttention``: another batch
  or more than one token raises ``ValueError`` naming the sizes; a concrete position past the cache raises,
  a traced one drops the write and gives NaN. Grouped-query attention (``num_kv_heads < num_heads``) keeps
  NNX's float path.

  Examples:
    >>> import jax.numpy as jnp, jqat, jqat.nnx
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatMultiHeadAttention(num_heads=2, in_features=8, decode=True, rngs=nnx.Rngs(0),
    ...                                        cache_config=jqat.KVCacheConfig())
    >>> layer.init_cache((1, 4, 8))
    >>> layer(jnp.ones((1, 1, 8))).shape, layer.cached_key.dtype, int(layer.cache_index[...])
    ((1, 1, 8), dtype('int8'), 1)
  """

  def __init__(self, *args, qk_config=None, pv_config=None, cache_config: KVCacheConfig | None = None, **kwargs):
    where = type(self).__name__
    _check_config(qk_config, "qk_config", where)
    _check_config(pv_config, "pv_config", where)
    if cache_config is not None and not isinstance(cache_config, KVCacheConfig):
      raise TypeError(f"{where}: cache_config must be a jqat.KVCacheConfig or None, got {type(cache_config).__name__}")
    if cache_config is not None:
      qk_config = INT8_PER_TOKEN if qk_config is None else qk_config
      pv_config = INT8_PER_TOKEN if pv_config is None else pv_config
      for name, cfg in (("qk_config", qk_config), ("pv_config", pv_config)):
        if cfg.granularity != "token":
          raise ValueError(
            f"{where}: {name}.granularity={cfg.granularity!r} does not fit a quantized cache, which stores one "
            "scale per token and head; use granularity='token'"
          )
    if (qk_config is not None or pv_config is not None) and "attention_fn" not in kwargs:
      kwargs["attention_fn"] = quantized_attention(qk_config=qk_config, pv_config=pv_config)
    super().__init__(*args, **kwargs)
    self.qk_config, self.pv_config, self.cache_config = qk_config, pv_config, cache_config
    self.cached_key_scale = nnx.data(None)
    self.cached_value_scale = nnx.data(None)

  def init_cache(self, input_shape, dtype=jnp.float32):
    """Creates the decode cache for inputs of ``input_shape`` (``(batch..., max_length, features)``)."""
    cfg = self.cache_config
    if cfg is None:
      return super().init_cache(input_shape, dtype)
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    stored = shape[:-1] + (cfg.stored_dim(self.head_dim),)
    self.cached_key = nnx.Cache(jnp.zeros(stored, cfg.storage_dtype))
    self.cached_value = nnx.Cache(jnp.zeros(stored, cfg.storage_dtype))
    # Scales start at 1: the empty positions hold zeros and are masked; a positive scale keeps them finite.
    self.cached_key_scale = nnx.Cache(jnp.ones(shape[:-1] + (1,), cfg.scale_dtype))
    self.cached_value_scale = nnx.Cache(jnp.ones(shape[:-1] + (1,), cfg.scale_dtype))
    self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, decode=None, **kwargs):
    decode = self.decode if decode is None else decode
    if not decode or self.cache_config is None or self.num_kv_heads != self.num_heads:
      return super().__call__(inputs_q, inputs_k, inputs_v, mask=mask, decode=decode, **kwargs)
    where = f"{type(self).__name__}"
    if self.cached_key is None or self.cached_key_scale is None:
      raise ValueError(f"{where}: decoding with cache_config={self.cache_config!r} needs init_cache first")
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    query, key, value = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)
    cfg = self.cache_config
    *batch, max_length, heads, stored = self.cached_key.shape
    if self.cached_key.dtype != cfg.storage_dtype or stored != cfg.stored_dim(self.head_dim):
      raise ValueError(
        f"{where}: the cache holds cached_key {self.cached_key.dtype}{tuple(self.cached_key.shape)}, which does not "
        f"match cache_config={cfg!r} (re-create it with init_cache)"
      )
    if tuple(query.shape[:-3]) != tuple(batch) or query.shape[-3] != 1:
      raise ValueError(
        f"{where}: decoding takes one token per call for the cache's batch {tuple(batch)} (cache of {max_length} "
        f"positions, {heads} heads): expected a query of shape {tuple(batch) + (1,) + tuple(query.shape[-2:])}, "
        f"got {tuple(query.shape)}"
      )
    index = self.cache_index[...]
    if not isinstance(index, jax.core.Tracer) and int(index) >= max_length:
      raise ValueError(f"{where}: decoding position {int(index)} is past the cache's length {max_length}")
    causal = jnp.broadcast_to(jnp.arange(max_length) <= index, tuple(batch) + (1, 1, max_length))
    mask = causal if mask is None else jnp.logical_and(mask.astype(jnp.bool_), causal)
    names = ("cached_key", "cached_key_scale", "cached_value", "cached_value_scale")
    x, written = decode_step(
      query,
      key,
      value,
      {name: getattr(self, name)[...] for name in names},
      index,
      mask,
      cache_config=cfg,
      qk_config=self.qk_config,
      pv_config=self.pv_config,
    )
    for name in names:
      getattr(self, name)[...] = written[name]
    self.cache_index[...] = index + 1
    x = x.astype(self.dtype or query.dtype)
    return self.out(x)

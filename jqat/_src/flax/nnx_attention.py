"""Quantized attention products for Flax NNX: an ``attention_fn`` for ``nnx.MultiHeadAttention``.

The same arithmetic as ``jqat.linen.dot_product_attention`` (see ``jqat._src.flax.attention``): ``q·k`` and
``p·v`` as ``int8 x int8 -> int32`` dots with ranges from the operands, the value scales folded into the
probabilities, each probability row on its own unsigned 8-bit grid, the softmax in float32. NNX's own decode
cache (``decode=True``, ``init_cache``) feeds this function the float cache, so quantized products work
while decoding too; the quantized (int8) cache itself is the linen ``QatAttention``'s.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype as _nnx_promote_dtype

from jqat._src.flax.attention import INT8_PER_TOKEN, AttentionQuantConfig, _check_config, quantized_products_attention


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

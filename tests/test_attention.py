"""Quantized attention products and the quantized KV cache of jqat.linen.QatAttention."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jqat
import jqat.linen as qnn

B, L, D, H, V = 2, 8, 16, 2, 11
TOKEN = qnn.AttentionQuantConfig()
# Tiny graphs compiled once each: XLA's backend optimizations would cost more time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class TinyLM(nn.Module):
  """Embedding, two attention layers, a head: enough to compare logits of cached and full decoding."""

  decode: bool = False
  cache_config: jqat.KVCacheConfig | None = None
  products: qnn.AttentionQuantConfig | None = None
  stock: bool = False

  @nn.compact
  def __call__(self, tokens, position=None):
    x = nn.Embed(V, D)(tokens)
    if position is None:
      x = x + nn.Embed(L, D)(jnp.arange(tokens.shape[-1]))
      mask = nn.make_causal_mask(tokens)
    else:
      x = x + nn.Embed(L, D)(jnp.reshape(position, (1,)))
      mask = None
    for i in range(2):
      if self.stock:
        layer = nn.MultiHeadDotProductAttention(num_heads=H, name=f"attn{i}")
      else:
        layer = qnn.QatAttention(
          num_heads=H,
          decode=self.decode,
          cache_config=self.cache_config,
          qk_config=self.products,
          pv_config=self.products,
          name=f"attn{i}",
        )
      x = x + layer(nn.LayerNorm()(x), mask=mask)
    return nn.Dense(V)(x)


def _tokens():
  return jax.random.randint(jax.random.key(3), (B, L), 0, V)


@functools.cache
def _params():
  return jit(TinyLM(stock=True).init)(jax.random.key(0), _tokens())["params"]


@pytest.fixture(scope="module")
def params():
  return _params()


@functools.cache
def _full(**fields):
  # Jitted, once per model: an eager apply compiles each small op on its own.
  return jit(TinyLM(**fields).apply)({"params": _params()}, _tokens())


def _apply(model, params, tokens):
  return jit(model.apply)({"params": params}, tokens)


@functools.cache
def _decode(cache_config=None, products=None):
  return _decode_all(TinyLM(decode=True, cache_config=cache_config, products=products), _params(), _tokens())


def _decode_all(model, params, tokens):
  """Teacher-forced decoding, one token per jitted step; returns the logits of every position and the caches."""
  # The cache model.init creates (zeros, and ones for the scales), built from its shapes without compiling init.
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["cache"]
  cache = jax.tree_util.tree_map_with_path(
    lambda p, x: (jnp.ones if jax.tree_util.keystr(p).endswith("_scale']") else jnp.zeros)(x.shape, x.dtype), shapes
  )

  @jit
  def step(cache, tok, t):
    logits, state = model.apply({"params": params, "cache": cache}, tok[:, None], t, mutable=["cache"])
    return logits[:, 0], state["cache"]

  out, caches = [], []
  for t in range(tokens.shape[1]):
    logits, cache = step(cache, tokens[:, t], t)
    out.append(logits)
    caches.append(cache)
  return jnp.stack(out, 1), caches


def test_parameter_tree_and_float_forward_are_flax_own(params):
  tokens = _tokens()
  ours = jax.eval_shape(TinyLM().init, jax.random.key(0), tokens)["params"]
  assert jax.tree.structure(ours) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(_apply(TinyLM(), params, tokens), _full(stock=True))


def test_float_cache_decoding_equals_full_forward():
  full = _full(stock=True)
  cached, caches = _decode()
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)  # float32 rounding of shorter sums only
  assert int(caches[-1]["attn0"]["cache_index"]) == L


def test_int8_cache_decoding_equals_full_quantized_forward():
  full_q = _full(products=TOKEN)
  full_f = _full(stock=True)
  cached, caches = _decode(jqat.KVCacheConfig(), TOKEN)
  # The cache stores each token's keys and values quantized exactly as the full forward's per-token
  # products quantize them, so the two differ only where a projection's float rounding (a one-row matmul
  # against a full one) moves a value across a rounding boundary: one int8 step of one element, far below
  # the quantization error itself (compared next).
  np.testing.assert_allclose(cached, full_q, atol=2e-3, rtol=0)
  # Against float attention: the int8 error, about 1% of the logits' range here.
  err = float(jnp.abs(cached - full_f).max())
  assert 0 < err < 0.02 * float(jnp.abs(full_f).max()), err
  np.testing.assert_array_equal(jnp.argmax(cached, -1), jnp.argmax(full_q, -1))
  cache = caches[-1]["attn0"]
  assert cache["cached_key"].dtype == jnp.int8 and cache["cached_value"].dtype == jnp.int8
  assert cache["cached_key_scale"].dtype == jnp.float32 and cache["cache_index"].dtype == jnp.int32
  assert cache["cached_key"].shape == (B, L, H, D // H) and cache["cached_key_scale"].shape == (B, L, H, 1)


@pytest.mark.parametrize("bits, tol", [("int4", 0.25), ("fp8_e4m3", 0.1)])
def test_int4_and_fp8_caches_decode_close_to_float(bits, tol):
  full_f = _full(stock=True)
  cfg = jqat.KVCacheConfig(bits=bits)
  cached, caches = _decode(cfg, TOKEN)
  # int4 keeps 16 levels per (token, head) vector, fp8 e4m3 three mantissa bits: errors of a few percent
  # of the logits' range (tol, relative to max |logit|).
  assert float(jnp.abs(cached - full_f).max()) < tol * float(jnp.abs(full_f).max())
  assert caches[-1]["attn0"]["cached_key"].dtype == cfg.storage_dtype
  assert caches[-1]["attn0"]["cached_key"].shape[-1] == (D // H) // (2 if bits == "int4" else 1)


def test_writes_never_requantize_earlier_tokens():
  _, caches = _decode(jqat.KVCacheConfig(), TOKEN)
  for t in range(1, L):
    for name in ("cached_key", "cached_key_scale", "cached_value", "cached_value_scale"):
      before, after = np.asarray(caches[t - 1]["attn1"][name]), np.asarray(caches[t]["attn1"][name])
      np.testing.assert_array_equal(after[:, :t], before[:, :t])  # bytes of positions < t unchanged
      assert not np.array_equal(after[:, t], before[:, t]) or name.endswith("_scale")


def _int_dots(hlo: str) -> list[str]:
  return re.findall(r"dot_general[^\n]*xi8>, tensor<[^>]*xi8>\) -> tensor<[^>]*xi32>", hlo)


def test_decode_step_reads_int8_cache_in_integer_dots(params):
  model = TinyLM(decode=True, cache_config=jqat.KVCacheConfig(), products=TOKEN)
  cache = jax.eval_shape(model.init, jax.random.key(0), _tokens())["cache"]
  step = jit(lambda c, tok, t: model.apply({"params": params, "cache": c}, tok, t, mutable=["cache"]))
  hlo = step.lower(cache, jnp.zeros((B, 1), jnp.int32), 0).as_text()
  dots = _int_dots(hlo)
  # Two layers, q·k and p·v each: the key and value operands are the (B, L, H, d) int8 cache itself.
  assert len(dots) == 4, dots
  assert sum(f"tensor<{B}x{L}x{H}x{D // H}xi8>" in d for d in dots) == 4, dots


def _ste(x, qp, cfg):
  # The clipped straight-through estimator's value and gradient, for operands that never clip.
  return x + lax.stop_gradient(jqat.fake_quant(x, qp, cfg) - x)


def _reference_attention(q, k, v, mask, config):
  """Fake-quant float attention written from the module docstring, with straight-through gradients."""
  sg = lax.stop_gradient
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  cfg = config.operand_config(q.ndim)
  qf = _ste(q, jqat.qparams_from_array(sg(q), cfg), cfg)
  kf = _ste(k, jqat.qparams_from_array(sg(k), cfg), cfg)
  scores = jnp.einsum("...qhd,...khd->...hqk", qf, kf)
  p = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min))
  vs = sg(jqat.qparams_from_array(sg(v), cfg).scale)
  vs_rows = jnp.swapaxes(jnp.broadcast_to(vs, v.shape[:-1] + (1,))[..., 0], -1, -2)[..., None, :]
  folded = p * vs_rows
  pcfg = config.probability_config(folded.ndim)
  pf = _ste(folded, jqat.qparams_from_array(sg(folded), pcfg), pcfg)
  u = v * (1 / vs)
  return jnp.einsum("...hqk,...khd->...qhd", pf, u + sg(jnp.round(u) - u))


@pytest.mark.parametrize("granularity", ["tensor", "head", "token"])
def test_quantized_products_equal_fake_quant_forward_and_ste_gradient(granularity):
  cfg = qnn.AttentionQuantConfig(granularity=granularity)
  q, k, v = jax.random.normal(jax.random.key(1), (3, B, L, H, 4))
  mask = nn.make_causal_mask(jnp.ones((B, L)))
  ours = lambda q, k, v: qnn.dot_product_attention(q, k, v, mask=mask, qk_config=cfg, pv_config=cfg)  # noqa: E731
  ref = lambda q, k, v: _reference_attention(q, k, v, mask, cfg)  # noqa: E731
  # The integer dots equal the float dots of the fake-quantized operands up to float32 rounding.
  np.testing.assert_allclose(jit(ours)(q, k, v), jit(ref)(q, k, v), atol=2e-5, rtol=0)
  g = jax.random.normal(jax.random.key(2), q.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * g)  # noqa: E731
  grads = [jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v) for f in (ours, ref)]
  for ga, gb in zip(*grads):
    np.testing.assert_allclose(ga, gb, atol=1e-4, rtol=1e-4)  # float32 sums in another order
  hlo = jit(ours).lower(q, k, v).as_text()
  assert len(_int_dots(hlo)) == 2  # q·k and p·v: int8 x int8 -> int32


def test_quantized_attention_is_a_drop_in_attention_fn():
  x = jax.random.normal(jax.random.key(4), (B, L, D))
  stock = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=qnn.quantized_attention())
  ours = qnn.QatAttention(num_heads=H, qk_config=TOKEN, pv_config=TOKEN)
  variables = jit(stock.init)(jax.random.key(0), x)
  out = jit(stock.apply)(variables, x)
  np.testing.assert_array_equal(out, jit(ours.apply)(variables, x))
  plain = jit(nn.MultiHeadDotProductAttention(num_heads=H).apply)(variables, x)
  assert 0 < float(jnp.abs(out - plain).max()) < 0.05


def test_none_configs_are_flax_dot_product_attention():
  q, k, v = jax.random.normal(jax.random.key(5), (3, B, L, H, 4))
  np.testing.assert_array_equal(qnn.dot_product_attention(q, k, v), nn.dot_product_attention(q, k, v))


# --- bad input ----------------------------------------------------------------------------------------------


def _one_layer_cache(cache_config=None, length=4, batch=2):
  layer = qnn.QatAttention(num_heads=H, decode=True, cache_config=cache_config, qk_config=TOKEN, pv_config=TOKEN)
  variables = jit(layer.init)(jax.random.key(0), jnp.ones((batch, length, D)))
  return layer, variables


def test_decoding_past_the_cache_length():
  layer, variables = _one_layer_cache(jqat.KVCacheConfig(), length=2)
  x = jnp.ones((2, 1, D))
  cache = variables["cache"]
  step = jit(lambda c: layer.apply({**variables, "cache": c}, x, mutable=["cache"]))
  for _ in range(2):
    _, state = step(cache)
    cache = state["cache"]
  # Concrete cache_index (no jit): an error naming the layer, the position and the length.
  with pytest.raises(ValueError, match=r"QatAttention .*decoding position 2 is past the cache's length 2"):
    layer.apply({**variables, "cache": cache}, x, mutable=["cache"])
  # Under jit the index is traced: the write is dropped and the output is NaN (documented).
  out, state = step(cache)
  assert bool(jnp.isnan(out).all())
  for name in ("cached_key", "cached_key_scale", "cached_value", "cached_value_scale"):
    np.testing.assert_array_equal(state["cache"][name], cache[name])


def test_batch_size_other_than_the_cache_s():
  layer, variables = _one_layer_cache(jqat.KVCacheConfig(), batch=2)
  msg = r"QatAttention .*cache's batch \(2,\) .*expected a query of shape \(2, 1, 2, 8\), got \(3, 1, 2, 8\)"
  with pytest.raises(ValueError, match=msg):
    layer.apply(variables, jnp.ones((3, 1, D)), mutable=["cache"])
  with pytest.raises(ValueError, match=msg):  # a static check: the same under jit
    jit(lambda v: layer.apply(v, jnp.ones((3, 1, D)), mutable=["cache"]))(variables)


@pytest.mark.parametrize(
  "made, used",
  [(jqat.KVCacheConfig(), None), (None, jqat.KVCacheConfig()), (jqat.KVCacheConfig(), jqat.KVCacheConfig(bits="int4"))],
)
def test_cache_made_for_another_config(made, used):
  _, variables = _one_layer_cache(made)
  layer = qnn.QatAttention(num_heads=H, decode=True, cache_config=used, qk_config=TOKEN, pv_config=TOKEN)
  with pytest.raises(
    ValueError,
    match=r"QatAttention .*the cache does not match the layer's cache_config=.*holds "
    r"cached_key \S+\(2, 4, 2, \d\)",
  ):
    layer.apply(variables, jnp.ones((2, 1, D)), mutable=["cache"])


def test_invalid_configs_fail_at_construction():
  with pytest.raises(ValueError, match=r"qk_config.granularity='head' does not fit a quantized cache"):
    head = qnn.AttentionQuantConfig(granularity="head")
    qnn.QatAttention(num_heads=H, cache_config=jqat.KVCacheConfig(), qk_config=head)
  with pytest.raises(TypeError, match="cache_config must be a jqat.KVCacheConfig"):
    qnn.QatAttention(num_heads=H, cache_config=jqat.QatConfig())
  with pytest.raises(TypeError, match="qk_config must be a jqat.linen.AttentionQuantConfig"):
    qnn.QatAttention(num_heads=H, qk_config=jqat.QatConfig())
  with pytest.raises(ValueError, match="AttentionQuantConfig.granularity='channel' is invalid"):
    qnn.AttentionQuantConfig(granularity="channel")
  with pytest.raises(ValueError, match="cannot be combined with einsum_dot_general"):
    q = jnp.ones((1, 2, 1, 4))
    qnn.dot_product_attention(q, q, q, qk_config=TOKEN, einsum_dot_general=lax.dot_general)
  with pytest.raises(ValueError, match=r"query \(1, 2, 1, 4\), key \(1, 3, 2, 4\) and value .* do not fit"):
    qnn.dot_product_attention(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4)), qk_config=TOKEN)


# --- NNX ------------------------------------------------------------------------------------------------------


def test_nnx_function_equals_linen_and_is_causal_is_the_causal_mask():
  import jqat.nnx as qnnx

  q, k, v = jax.random.normal(jax.random.key(6), (3, B, L, H, 4))
  mask = nn.make_causal_mask(jnp.ones((B, L)))
  ours = jit(lambda q, k, v: qnnx.dot_product_attention(q, k, v, is_causal=True, qk_config=TOKEN, pv_config=TOKEN))
  linen = jit(lambda q, k, v: qnn.dot_product_attention(q, k, v, mask=mask, qk_config=TOKEN, pv_config=TOKEN))
  np.testing.assert_array_equal(ours(q, k, v), linen(q, k, v))
  from flax import nnx

  np.testing.assert_array_equal(
    qnnx.dot_product_attention(q, k, v, mask=mask), nnx.dot_product_attention(q, k, v, mask=mask)
  )


def test_nnx_decoding_with_quantized_products_equals_full_forward():
  from flax import nnx

  import jqat.nnx as qnnx

  layer = nnx.MultiHeadAttention(
    num_heads=H, in_features=D, decode=False, rngs=nnx.Rngs(0), attention_fn=qnnx.quantized_attention()
  )
  x = jax.random.normal(jax.random.key(7), (B, L, D))
  full = nnx.jit(lambda m, x: m(x, mask=nn.make_causal_mask(jnp.ones((B, L)))))(layer, x)
  layer.init_cache((B, L, D))
  step = nnx.jit(lambda m, xt: m(xt, decode=True))
  cached = jnp.concatenate([step(layer, x[:, t : t + 1]) for t in range(L)], axis=1)
  # NNX's float cache feeds the same per-token quantized products: equal up to the float rounding of a
  # one-row projection moving a value across a rounding boundary (as for linen above).
  np.testing.assert_allclose(cached, full, atol=2e-3, rtol=0)


def test_nnx_int8_cache_decoding_equals_full_quantized_forward():
  from flax import nnx

  import jqat.nnx as qnnx

  layer = qnnx.QatMultiHeadAttention(
    num_heads=H, in_features=D, decode=False, rngs=nnx.Rngs(0), cache_config=jqat.KVCacheConfig()
  )
  x = jax.random.normal(jax.random.key(8), (B, L, D))
  full = nnx.jit(lambda m, x: m(x, mask=nn.make_causal_mask(jnp.ones((B, L)))))(layer, x)
  layer.init_cache((B, L, D))
  step = nnx.jit(lambda m, xt: m(xt, decode=True))
  outs, keys = [], []
  for t in range(L):
    outs.append(step(layer, x[:, t : t + 1]))
    keys.append(np.asarray(layer.cached_key[...]))
  # The same per-token products as the full forward (the int8 cache quantizes as they do): as for linen.
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-3, rtol=0)
  assert layer.cached_key.dtype == jnp.int8 and layer.cached_value_scale.shape == (B, L, H, 1)
  for t in range(1, L):
    np.testing.assert_array_equal(keys[t][:, :t], keys[t - 1][:, :t])  # earlier tokens keep their bytes
  with pytest.raises(ValueError, match=r"QatMultiHeadAttention: decoding position 8 is past the cache's length 8"):
    layer(x[:, :1], decode=True)
  with pytest.raises(ValueError, match=r"cache's batch \(2,\) .*got \(3, 1, 2, 8\)"):
    layer(jnp.ones((3, 1, D)), decode=True)

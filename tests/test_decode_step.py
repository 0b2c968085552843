"""One decoding step (``decode_step``): the same numbers as reading the written cache, and a cache kept in place."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
import jqat.linen as qnn
from jqat._src.flax.attention import _cached_attention_general, decode_step, write_position

B, L, H, D = 2, 8, 3, 4
TOKEN = qnn.AttentionQuantConfig()
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _filled_cache(cfg, index):
  """A cache whose positions < index hold quantized random keys and values, the rest zeros (scales 1)."""
  kx = jax.random.normal(jax.random.key(1), (B, L, H, D))
  vx = jax.random.normal(jax.random.key(2), (B, L, H, D))
  written = jnp.arange(L)[None, :, None, None] < index
  if cfg is None:
    return {"cached_key": jnp.where(written, kx, 0.0), "cached_value": jnp.where(written, vx, 0.0)}
  kv, ks = jqat.kv_quantize(kx, cfg)
  vv, vs = jqat.kv_quantize(vx, cfg)
  keep = lambda x, empty: jnp.where(written, x, empty).astype(x.dtype)  # noqa: E731
  return {
    "cached_key": keep(kv, 0),
    "cached_key_scale": keep(ks, 1),
    "cached_value": keep(vv, 0),
    "cached_value_scale": keep(vs, 1),
  }


def _token():
  q, k, v = jax.random.normal(jax.random.key(3), (3, B, 1, H, D)) * 2.0
  return q, k, v


def _causal(index):
  return jnp.broadcast_to(jnp.arange(L) <= index, (B, 1, 1, L))


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("products", [TOKEN, None])
def test_quantized_step_equals_attention_over_the_written_cache(bits, products):
  cfg = jqat.KVCacheConfig(bits=bits, scale_dtype="bfloat16" if bits == "int8" else "float32")
  q, k, v = _token()
  index = jnp.int32(5)
  cache = _filled_cache(cfg, index)
  kwargs = dict(cache_config=cfg, qk_config=products, pv_config=products)
  out, written = jit(lambda c, i: decode_step(q, k, v, c, i, _causal(i), **kwargs))(cache, index)
  # The oracle: write first (the plain order), then attend over the written cache with int_dot_general.
  ref_cache = {n: jqat.kv_write(cache[n], x, index) for n, x in _new_entries(k, v, cfg).items()}
  ref = jit(lambda c: _cached_attention_general(q, c, _causal(index), cfg, products, products))(ref_cache)
  for name in cache:
    np.testing.assert_array_equal(written[name], ref_cache[name])
  # Equal integer sums, the same rescale: float32 rounding of the softmax's sums in another order only.
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def _new_entries(k, v, cfg):
  kv, ks = jqat.kv_quantize(k, cfg)
  vv, vs = jqat.kv_quantize(v, cfg)
  return {"cached_key": kv, "cached_key_scale": ks, "cached_value": vv, "cached_value_scale": vs}


def test_float_step_equals_flax_attention_over_the_written_cache():
  import flax.linen as nn

  q, k, v = _token()
  index = jnp.int32(3)
  cache = _filled_cache(None, index)
  out, written = jit(lambda c, i: decode_step(q, k, v, c, i, _causal(i), cache_config=None))(cache, index)
  keys = jqat.kv_write(cache["cached_key"], k, index)
  values = jqat.kv_write(cache["cached_value"], v, index)
  np.testing.assert_array_equal(written["cached_key"], keys)
  np.testing.assert_allclose(out, nn.dot_product_attention(q, keys, values, mask=_causal(index)), atol=1e-6)


def test_step_past_the_end_is_nan_and_leaves_the_cache():
  cfg = jqat.KVCacheConfig(scale_dtype="bfloat16")
  q, k, v = _token()
  cache = _filled_cache(cfg, L)
  out, written = jit(lambda c, i: decode_step(q, k, v, c, i, None, cache_config=cfg, qk_config=TOKEN, pv_config=TOKEN))(
    cache, jnp.int32(L)
  )
  assert bool(jnp.isnan(out).all())
  for name in cache:
    np.testing.assert_array_equal(written[name], cache[name])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn, jnp.int8])
def test_write_position_changes_one_position_only(dtype):
  cache = (jax.random.normal(jax.random.key(4), (B, L, H, 1)) * 3).astype(dtype)
  new = jnp.full((B, 1, H, 1), 2.5).astype(dtype)
  out = jax.jit(write_position)(cache, new, jnp.int32(2))
  assert out.dtype == cache.dtype
  expected = np.asarray(cache).copy()
  expected[:, 2] = np.asarray(new)[:, 0]
  np.testing.assert_array_equal(np.asarray(out).view(np.uint8), expected.view(np.uint8))  # bytes, NaNs included
  np.testing.assert_array_equal(jax.jit(write_position)(cache, new, jnp.int32(L)), cache)  # past the end: dropped


def _loop_body(hlo: str) -> str:
  body = re.findall(r"body=%?([\w.\-]+)", hlo)[-1]
  comps = re.split(r"\n(?=\S)", hlo)
  return next(c for c in comps if c.split(" ")[0].lstrip("%") == body)


def cache_sized_kernels(hlo: str, dtype: str) -> tuple[list[str], list[str]]:
  """The loop body's kernels that produce an array of a cache's size (``L·H·D`` elements of ``dtype``):
  ``(writes, others)``, the dynamic-update-slice fusions and everything else (copies, transposes, ...)."""
  writes, others = [], []
  for line in _loop_body(hlo).splitlines():
    m = re.match(rf"\s*(?:ROOT )?%(\S+) = {dtype}\[([\d,]*)\]\S* (\S+)\(", line)
    if not m or m.group(3) in ("get-tuple-element", "bitcast", "parameter", "tuple"):
      continue
    if int(np.prod([int(d) for d in m.group(2).split(",") if d])) != L * H * D or m.group(2) == f"{L},1,1,{H * D}":
      continue  # other sizes, and the scan's stacked outputs
    (writes if "dynamic-update-slice" in m.group(1) else others).append(line.strip()[:160])
  return writes, others


@pytest.mark.parametrize("cfg", [None, jqat.KVCacheConfig()])
def test_decoding_loop_updates_the_cache_in_place(cfg):
  """No copy and no transpose of the cache in the compiled decoding loop (default optimizations)."""
  products = None if cfg is None else TOKEN
  layer = qnn.QatAttention(num_heads=H, decode=True, cache_config=cfg, qk_config=products, pv_config=products)
  x = jax.random.normal(jax.random.key(5), (1, L, H * D))
  variables = jax.jit(layer.init)(jax.random.key(0), x)

  def generate(variables, xs):
    def one(cache, xt):
      out, state = layer.apply({**variables, "cache": cache}, xt[:, None], mutable=["cache"])
      return state["cache"], out

    return jax.lax.scan(one, variables["cache"], jnp.swapaxes(xs, 0, 1))[1]

  hlo = jax.jit(generate).lower(variables, x).compile().as_text()
  writes, others = cache_sized_kernels(hlo, "f32" if cfg is None else "s8")
  assert len(writes) == 2, writes  # the key and the value cache, each one write in place
  assert not others, others
  if cfg is not None:  # nor a widened copy of the int8 cache (int32 column sums, float32 dequantized values)
    for wide in ("s32", "f32"):
      assert cache_sized_kernels(hlo, wide) == ([], []), wide

"""The quantized KV cache's core: quantize-on-write per token and head, int4 packing, writes in place."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jqat


def _ref_quantize(x: np.ndarray, bits: str, scale_dtype: str):
  """Independent NumPy reference: scale = amax / qmax per (token, head), rounded to its storage dtype."""
  qmax = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}[bits]
  amax = np.abs(x).max(-1, keepdims=True)
  # a / b as a * (1 / b), as DESIGN.md specifies for every scale
  scale = np.maximum(amax * (np.float32(1) / np.float32(qmax)), np.float32(jqat.MIN_SCALE)).astype(np.float32)
  scale = scale.astype(ml_dtypes.bfloat16 if scale_dtype == "bfloat16" else np.float32).astype(np.float32)
  u = x * (np.float32(1) / scale)
  if bits == "fp8_e4m3":
    q = np.clip(u, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  else:
    q = np.clip(np.round(u), -qmax - 1, qmax)
  return q, scale


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_kv_quantize_matches_numpy_reference(bits, scale_dtype):
  x = np.array(jax.random.normal(jax.random.key(0), (2, 5, 3, 8)), np.float32)
  x[0, 1, 2] = 0.0  # an all-zero vector: the smallest scale, never 0
  cfg = jqat.KVCacheConfig(bits=bits, scale_dtype=scale_dtype)
  values, scale = jax.jit(jqat.kv_quantize, static_argnums=1)(x, cfg)
  assert values.dtype == cfg.storage_dtype and scale.dtype == jnp.dtype(scale_dtype)
  assert values.shape == (2, 5, 3, 4 if bits == "int4" else 8) and scale.shape == (2, 5, 3, 1)
  q_ref, s_ref = _ref_quantize(x, bits, scale_dtype)
  np.testing.assert_array_equal(np.asarray(jqat.kv_values(values, cfg, 8), np.float32), q_ref)
  np.testing.assert_array_equal(np.asarray(scale, np.float32), s_ref)
  assert float(scale[0, 1, 2, 0]) > 0
  # Dequantized: within half a step of the input (int), or fp8's relative rounding.
  err = np.abs(np.asarray(jqat.kv_dequantize(values, scale, cfg, 8)) - x)
  if bits == "fp8_e4m3":
    assert (err <= np.abs(x) * 2.0**-4 + s_ref * 2.0**-9).all()
  else:
    assert (err <= s_ref / 2 * (1 + 1e-6)).all()


def test_kv_quantize_nan_poisons_its_own_token_only():
  x = jnp.ones((1, 3, 2, 4)).at[0, 1, 0, 2].set(jnp.nan)
  values, scale = jqat.kv_quantize(x, jqat.KVCacheConfig())
  s = np.asarray(scale)[0, :, :, 0]
  assert np.isnan(s[1, 0]) and np.isfinite(np.delete(s.ravel(), 2)).all()


def test_kv_write_changes_only_its_position():
  cfg = jqat.KVCacheConfig()
  cache = jnp.zeros((2, 4, 3, 8), jnp.int8)
  history = []
  for t in range(4):
    v, _ = jqat.kv_quantize(jax.random.normal(jax.random.key(t), (2, 1, 3, 8)), cfg)
    cache = jax.jit(jqat.kv_write)(cache, v, t)
    history.append(np.asarray(cache))
  for t in range(1, 4):  # every earlier position keeps its bytes
    np.testing.assert_array_equal(history[t][:, :t], history[t - 1][:, :t])


def test_bytes_per_token():
  # head_dim 32: int8 values + float32 scale = 36 bytes per head and tensor, bfloat16 34, int4 16 + 4.
  assert jqat.KVCacheConfig().bytes_per_token(num_heads=4, head_dim=32) == 2 * 4 * 36
  assert jqat.KVCacheConfig(scale_dtype="bfloat16").bytes_per_token(num_heads=4, head_dim=32) == 2 * 4 * 34
  assert jqat.KVCacheConfig(bits="int4").bytes_per_token(num_heads=4, head_dim=32) == 2 * 4 * 20


@pytest.mark.parametrize(
  "kwargs, field",
  [
    ({"bits": "int3"}, "bits"),
    ({"bits": 8}, "bits"),
    ({"scale_dtype": "float16"}, "scale_dtype"),
    ({"scale_dtype": "int8"}, "scale_dtype"),
  ],
)
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"KVCacheConfig.{field}="):
    jqat.KVCacheConfig(**kwargs)


def test_kv_quantize_rejects_integers():
  with pytest.raises(ValueError, match="kv_quantize: x must be a float array"):
    jqat.kv_quantize(jnp.ones((2, 4), jnp.int32), jqat.KVCacheConfig())

"""Folding AWQ / SmoothQuant scales into a preceding Flax LayerNorm, RMSNorm or Dense leaves the model unchanged."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat

K, N = 32, 8


def _data(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(16, K)).astype(np.float32)
  s = np.exp(rng.normal(size=K)).astype(np.float32)
  return jnp.asarray(h), jnp.asarray(s)


@pytest.mark.parametrize("norm", [nn.LayerNorm(), nn.RMSNorm()])
def test_norm_output_divided_by_s(norm):
  h, s = _data()
  params = jax.jit(norm.init)(jax.random.key(0), h)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype), params)  # not the identity
  scale, bias = jqat.fold_into_layernorm(params["scale"], s, params.get("bias"))
  folded = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}
  apply = jax.jit(norm.apply)  # one compiled call instead of op-by-op dispatch
  np.testing.assert_allclose(apply({"params": folded}, h), apply({"params": params}, h) / s, rtol=1e-5, atol=1e-6)


def test_dense_relu_dense_chain():
  h, s = _data(1)
  first, second = nn.Dense(K), nn.Dense(N)
  p1 = jax.jit(first.init)(jax.random.key(1), h)["params"]
  p1 = {**p1, "bias": p1["bias"] + 0.1}
  p2 = jax.jit(second.init)(jax.random.key(2), h)["params"]

  @jax.jit
  def hidden(p1, h):
    return nn.relu(first.apply({"params": p1}, h))

  @jax.jit
  def model(p1, p2, h):
    return second.apply({"params": p2}, hidden(p1, h))

  kernel, bias = jqat.fold_into_dense(p1["kernel"], p1["bias"], s)
  folded = {"kernel": kernel, "bias": bias}
  # ReLU commutes with a positive per-channel scale.
  np.testing.assert_allclose(hidden(folded, h), hidden(p1, h) / s, rtol=1e-5, atol=1e-6)
  # The next layer with diag(s) W computes what it did before.
  scaled = {**p2, "kernel": p2["kernel"] * s[:, None]}
  np.testing.assert_allclose(model(folded, scaled, h), model(p1, p2, h), rtol=1e-4, atol=1e-5)


def test_awq_served_through_a_folded_layernorm():
  h, _ = _data(2)
  norm = nn.LayerNorm()
  apply = jax.jit(norm.apply)
  params = jax.jit(norm.init)(jax.random.key(0), h)["params"]
  x = apply({"params": params}, h)
  w = jax.random.normal(jax.random.key(3), (K, N))
  q, s = jqat.awq(w, x, jqat.QatConfig(bits="int4", per_channel=True, group_size=16), grid=5)
  scale, bias = jqat.fold_into_layernorm(params["scale"], s, params["bias"])
  w_hat = jax.jit(jqat.dequantize)(q)
  served = apply({"params": {"scale": scale, "bias": bias}}, h) @ w_hat
  np.testing.assert_allclose(served, (x / s) @ w_hat, rtol=1e-4, atol=1e-5)


def test_rms_norm_without_bias_and_dtypes():
  _, s = _data()
  scale, bias = jqat.fold_into_layernorm(jnp.ones(K, jnp.bfloat16), s)
  assert bias is None and scale.dtype == jnp.bfloat16
  kernel, bias = jqat.fold_into_dense(jnp.ones((4, K), jnp.bfloat16), None, s)
  assert bias is None and kernel.dtype == jnp.bfloat16


def test_errors():
  _, s = _data()
  with pytest.raises(ValueError, match=r"s has shape \(32,\), but the scale of shape \(16,\) needs \(16,\)"):
    jqat.fold_into_layernorm(jnp.ones(16), s)
  with pytest.raises(ValueError, match=r"s has shape \(32,\), but the kernel of shape \(4, 16\) needs \(16,\)"):
    jqat.fold_into_dense(jnp.ones((4, 16)), None, s)
  with pytest.raises(ValueError, match="s must be finite and > 0"):
    jqat.fold_into_layernorm(jnp.ones(K), s.at[3].set(0.0))
  with pytest.raises(ValueError, match="s must be finite and > 0"):
    jqat.fold_into_dense(jnp.ones((4, K)), None, s.at[3].set(jnp.nan))
  with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
    jqat.fold_into_layernorm(jnp.ones(K), s, jnp.ones(3))


def test_under_jit():
  h, s = _data(3)
  k = jnp.ones((4, K))
  got = jax.jit(jqat.fold_into_dense)(k, jnp.ones(K), s)
  want = jqat.fold_into_dense(k, jnp.ones(K), s)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  g = jax.jit(jqat.fold_into_layernorm)(jnp.ones(K), s)[0]
  np.testing.assert_array_equal(g, jqat.fold_into_layernorm(jnp.ones(K), s)[0])

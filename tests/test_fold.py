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
  params = norm.init(jax.random.key(0), h)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype), params)  # not the identity
  scale, bias = jqat.fold_into_layernorm(params["scale"], s, params.get("bias"))
  folded = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}
  np.testing.assert_allclose(
    norm.apply({"params": folded}, h), norm.apply({"params": params}, h) / s, rtol=1e-5, atol=1e-6
  )


def test_dense_relu_dense_chain():
  h, s = _data(1)
  first, second = nn.Dense(K), nn.Dense(N)
  p1 = first.init(jax.random.key(1), h)["params"]
  x = nn.relu(first.apply({"params": p1}, h))
  p2 = second.init(jax.random.key(2), x)["params"]
  kernel, bias = jqat.fold_into_dense(p1["kernel"], p1["bias"] + 0.1, s)
  x_div = nn.relu(first.apply({"params": {"kernel": kernel, "bias": bias}}, h))  # ReLU commutes with s > 0
  np.testing.assert_allclose(x_div, nn.relu(first.apply({"params": {**p1, "bias": p1["bias"] + 0.1}}, h)) / s,
                             rtol=1e-5, atol=1e-6)  # fmt: skip
  # The next layer with diag(s) W computes what it did before.
  y = second.apply({"params": p2}, nn.relu(first.apply({"params": {**p1, "bias": p1["bias"] + 0.1}}, h)))
  y_fold = second.apply({"params": {**p2, "kernel": p2["kernel"] * s[:, None]}}, x_div)
  np.testing.assert_allclose(y_fold, y, rtol=1e-4, atol=1e-5)


def test_awq_served_through_a_folded_layernorm():
  h, _ = _data(2)
  norm = nn.LayerNorm()
  params = norm.init(jax.random.key(0), h)["params"]
  x = norm.apply({"params": params}, h)
  w = jax.random.normal(jax.random.key(3), (K, N))
  cfg = jqat.QatConfig(bits="int4", per_channel=True, group_size=16)
  q, s = jqat.awq(w, x, cfg, grid=5)
  scale, bias = jqat.fold_into_layernorm(params["scale"], s, params["bias"])
  served = norm.apply({"params": {"scale": scale, "bias": bias}}, h) @ jqat.dequantize(q)
  np.testing.assert_allclose(served, (x / s) @ jqat.dequantize(q), rtol=1e-4, atol=1e-5)


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

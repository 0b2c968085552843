"""AWQ: the grid search against a NumPy loop over the same grid, and error below round-to-nearest."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat._src.ptq import awq as awq_lib

K, N = 64, 32
OUTLIERS = [2, 17, 30, 51]
CFG = jqat.QatConfig(bits="int3", per_channel=True, group_size=16)


def _layer(seed=0, n=256):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, K)) * np.exp(0.3 * rng.normal(size=K))
  x[:, OUTLIERS] *= 15.0  # salient input channels, as in LLM activations
  w = rng.normal(size=(K, N)) / np.sqrt(K)
  return x.astype(np.float32), w.astype(np.float32)


# --- NumPy reference: Lin et al. 2023, the scale search of Section 3.2, in float64 ------------------------


def _np_rtn(w, bits, group):
  """Symmetric round to nearest, one scale per (group of input rows, output column), DESIGN.md numerics."""
  qmax = 2 ** (bits - 1) - 1
  wg = w.reshape(-1, group, w.shape[1])
  s = np.maximum(np.abs(wg).max(axis=1, keepdims=True) / qmax, np.finfo(np.float32).eps)
  return (np.clip(np.round(wg / s), -qmax - 1, qmax) * s).reshape(w.shape)


def _np_search(x, w, grid, bits=3, group=16):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  a = np.abs(x).mean(axis=0)
  losses, scales = [], []
  for i in range(grid):
    s = np.maximum(a ** (i / grid), 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    y_hat = (x / s) @ _np_rtn(w * s[:, None], bits, group)
    losses.append(np.mean((x @ w - y_hat) ** 2))
    scales.append(s)
  return np.array(losses), scales


def _err(x, w, y_hat):
  return float(np.linalg.norm(np.asarray(x, np.float64) @ w - np.asarray(y_hat, np.float64)))


@functools.partial(jax.jit, static_argnums=1)
def _rtn(w, cfg):
  return jqat.dequantize(jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg))


_deq = jax.jit(jqat.dequantize)
_losses = jax.jit(awq_lib.awq_losses, static_argnums=(3, 4))


def test_search_picks_the_grid_minimum():
  x, w = _layer()
  q, s = jqat.awq(w, x, CFG, grid=10)
  losses, scales = _np_search(x, w, 10)
  best = int(np.argmin(losses))
  assert sorted(losses)[1] > losses[best] * 1.01  # a clear minimum, not a float32 coin toss
  assert 0 < best < 9  # an interior point: the search does something
  np.testing.assert_allclose(s, scales[best], rtol=1e-5)
  got = _losses(jnp.asarray(w), jnp.asarray(x), jnp.abs(jnp.asarray(x)).mean(axis=0), CFG, 10)
  np.testing.assert_allclose(got, losses, rtol=1e-3)  # float32 against float64, up to a few rounding flips
  # The returned tensor is the round-to-nearest of diag(s) W.
  np.testing.assert_array_equal(_deq(q), _rtn(w * np.asarray(s)[:, None], CFG))
  assert q.shape == (K, N) and q.config == CFG and s.shape == (K,)


@pytest.mark.parametrize("cfg", [CFG, jqat.QatConfig(bits="int4", per_channel=True)])
def test_error_below_round_to_nearest_on_outlier_channels(cfg):
  x, w = _layer(1)
  q, s = jqat.awq(w, x, cfg, grid=10)
  awq_err = _err(x, w, (x / s) @ _deq(q))
  rtn_err = _err(x, w, x @ _rtn(w, cfg))
  assert awq_err < 0.9 * rtn_err  # 20-40% less here


def test_moments_give_the_scales_and_x_the_sample():
  x, w = _layer(2)
  more, _ = _layer(3, n=1024)
  m = jqat.moments_update(jqat.moments_init(K, hessian=False), more)
  q, s = jqat.awq(w, x, CFG, grid=10, moments=m)
  losses = np.array(_losses(jnp.asarray(w), jnp.asarray(x), jqat.moments_mean_abs(m), CFG, 10))
  expected = awq_lib.awq_scales(jqat.moments_mean_abs(m), np.argmin(losses) / 10)
  np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_nonfinite_rows_are_left_out():
  x, w = _layer(3)
  bad = x.copy()
  bad[[5, 9]] = np.nan
  bad[11, 3] = np.inf
  losses, scales = _np_search(np.delete(x, [5, 9, 11], axis=0), w, 10)  # the search on the finite rows alone
  q, s = jqat.awq(w, bad, CFG, grid=10)
  np.testing.assert_allclose(s, scales[int(np.argmin(losses))], rtol=1e-5)
  np.testing.assert_array_equal(_deq(q), _rtn(w * np.asarray(s)[:, None], CFG))


def test_bf16_kernel_keeps_dtype():
  x, w = _layer(4)
  q, _ = jqat.awq(jnp.asarray(w, jnp.bfloat16), x, CFG, grid=10)
  assert q.dequant_dtype == jnp.bfloat16


def test_errors():
  x, w = _layer()
  with pytest.raises(ValueError, match=r"x has shape \(256, 64\), but the kernel of shape \(32, 32\) needs rows of 32"):
    jqat.awq(w[:32], x, CFG.replace(group_size=None))
  with pytest.raises(ValueError, match="grid=0 is invalid"):
    jqat.awq(w, x, CFG, grid=0)
  with pytest.raises(ValueError, match="no row without NaN or Inf"):
    jqat.awq(w, np.full_like(x, np.nan), CFG, grid=10)
  with pytest.raises(ValueError, match="group_size=24 does not divide K=64"):
    jqat.awq(w, x, CFG.replace(group_size=24))
  with pytest.raises(ValueError, match="the kernel holds NaN or Inf"):
    jqat.awq(np.full_like(w, np.inf), x, CFG)
  with pytest.raises(ValueError, match="the MomentsState has 8 features, but the kernel needs 64"):
    jqat.awq(w, x, CFG, moments=jqat.moments_init(8))


def test_under_jit():
  x, w = _layer(5)
  q, s = jax.jit(lambda w, x: jqat.awq(w, x, CFG, grid=10))(w, x)
  q2, s2 = jqat.awq(w, x, CFG, grid=10)
  np.testing.assert_array_equal(s, s2)
  np.testing.assert_array_equal(q.values, q2.values)

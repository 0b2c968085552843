"""SmoothQuant scales: the formula against NumPy, its guards, and w8a8 error on activations with outlier channels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat

OUTLIERS = [5, 20, 41]


def _layer(seed=0, n=512, k=64, m=32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, k))
  x[:, OUTLIERS] *= 40.0  # a few channels far larger than the rest, as in LLM activations
  w = rng.normal(size=(k, m)) / np.sqrt(k)
  return x.astype(np.float32), w.astype(np.float32)


def _np_scales(amax, w, alpha):
  wmax = np.maximum(np.abs(np.asarray(w, np.float64)).max(axis=1), 1e-5)
  return np.maximum(np.asarray(amax, np.float64) ** alpha / wmax ** (1 - alpha), 1e-5)


def _np_fq(v, axis):
  """Symmetric int8 [-128, 127] fake quant, one scale per tensor (axis None) or per slice along ``axis``."""
  amax = np.abs(v).max(axis=axis, keepdims=axis is not None)
  s = np.maximum(amax / 127.0, np.finfo(np.float32).eps)
  return np.clip(np.round(v / s), -128, 127) * s


def _np_w8a8_error(x, w, s=None):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  xs, ws = (x, w) if s is None else (x / s, w * s[:, None])
  y_hat = _np_fq(xs, None) @ _np_fq(ws, 0)  # static per-tensor activations, weights per output channel
  return float(np.linalg.norm(x @ w - y_hat))


ACT = jqat.QatConfig(bits="int8")
WGT = jqat.QatConfig(bits="int8", per_channel=True)


@jax.jit
def _w8a8(x, w):
  """jqat's w8a8: the activation range calibrated on ``x`` itself (static, per tensor)."""
  xq = jqat.fake_quant(x, jqat.qparams_from_array(x, ACT), ACT)
  wq = jqat.fake_quant(w, jqat.qparams_from_array(w, WGT), WGT)
  return xq @ wq


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_scales_match_numpy(alpha):
  x, w = _layer()
  amax = np.abs(x).max(axis=0)
  s = jqat.smooth_quant_scales(amax, w, alpha=alpha)
  assert s.shape == (64,) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, _np_scales(amax, w, alpha), rtol=2e-6)  # float32 powers


def test_w8a8_error_below_plain_on_outlier_channels():
  x, w = _layer()
  s = jqat.smooth_quant_scales(jnp.abs(x).max(axis=0), w)
  exact = x.astype(np.float64) @ w
  plain = float(np.linalg.norm(exact - np.asarray(_w8a8(x, w), np.float64)))
  smooth = float(np.linalg.norm(exact - np.asarray(_w8a8(x / s, w * s[:, None]), np.float64)))
  # jqat's numbers are the NumPy computation's (float32 against float64: rounding of a few grid points).
  np.testing.assert_allclose(plain, _np_w8a8_error(x, w), rtol=1e-2)
  np.testing.assert_allclose(smooth, _np_w8a8_error(x, w, np.asarray(s, np.float64)), rtol=1e-2)
  assert smooth < 0.5 * plain  # ~0.25x here: the outliers no longer set the activation scale alone


def test_the_layer_is_unchanged_in_float():
  x, w = _layer(1)
  s = jqat.smooth_quant_scales(np.abs(x).max(axis=0), w)
  np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-4)


def test_zero_channels_and_rows_give_finite_positive_scales():
  x, w = _layer(2)
  amax = np.abs(x).max(axis=0)
  amax[[0, 1]] = 0.0  # inputs that never fire
  w[[1, 2]] = 0.0  # weight rows of zeros
  for alpha in (0.0, 0.5, 1.0):
    s = np.asarray(jqat.smooth_quant_scales(amax, w, alpha=alpha))
    assert np.isfinite(s).all() and (s > 0).all()
    np.testing.assert_allclose(s, _np_scales(amax, w, alpha), rtol=2e-6)


def test_moments_state():
  x, w = _layer(3)
  m = jqat.moments_update(jqat.moments_init(64, hessian=False), x)
  np.testing.assert_array_equal(jqat.smooth_quant_scales(m, w), jqat.smooth_quant_scales(np.abs(x).max(axis=0), w))


def test_errors():
  _, w = _layer()
  amax = np.ones(64, np.float32)
  for bad in (-0.1, 1.5, float("nan"), "0.5", True):
    with pytest.raises(ValueError, match=r"alpha=.* is invalid; allowed: a number in \[0, 1\]"):
      jqat.smooth_quant_scales(amax, w, alpha=bad)
  with pytest.raises(
    ValueError, match=r"act_absmax has shape \(63,\), but the kernel of shape \(64, 32\) needs \(64,\)"
  ):
    jqat.smooth_quant_scales(amax[:63], w)
  with pytest.raises(ValueError, match="finite and >= 0"):
    jqat.smooth_quant_scales(-amax, w)
  with pytest.raises(ValueError, match="finite and >= 0"):
    jqat.smooth_quant_scales(np.full(64, np.nan), w)
  with pytest.raises(ValueError, match=r"needs an \(in, out\) kernel"):
    jqat.smooth_quant_scales(amax, w[None])


def test_under_jit():
  x, w = _layer(4)
  amax = np.abs(x).max(axis=0)
  np.testing.assert_array_equal(jax.jit(jqat.smooth_quant_scales)(amax, w), jqat.smooth_quant_scales(amax, w))

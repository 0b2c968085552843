"""Tests of jqat._src.numerics, the one quantize -> dequantize arithmetic, and of the scales it is given."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jqat
from jqat._src import int_ops, numerics, qat_dot, qtensor
from jqat._src.calibration import search
from jqat._src.config import QatConfig
from jqat._src.qparams import MIN_SCALE, QParams, qparams_from_range

F32 = np.float32
INT_BITS = ["int2", "int3", "int4", "int5", "int6", "int7", "int8"]
ALL_BITS = INT_BITS + ["fp8_e4m3", "fp8_e5m2"]
AMAXES = [1e-6, 1e-10, 1e-15, 1e-20, 1e-25, 1e-30]


def _grid_values(cfg: QatConfig) -> np.ndarray:
  """Every value of a symmetric config's grid, as float32."""
  if cfg.bits.is_float:
    v = np.unique(np.arange(256, dtype=np.uint8).view(cfg.bits.float_dtype).astype(F32))
    return v[np.isfinite(v)]
  return np.arange(cfg.qmin, cfg.qmax + 1, dtype=F32)


@functools.cache
def _roundtrip(cfg: QatConfig):
  """One compiled function per config: the scale, fake_quant(0), and the grid values of ``v * scale``."""

  @jax.jit
  def f(lo, hi, v):
    qp = qparams_from_range(lo, hi, cfg)
    x = v * qp.scale if cfg.symmetric else (v - qp.zero_point) * qp.scale
    return qp.scale, qp.zero_point, jqat.fake_quant(jnp.zeros(()), qp, cfg), x, jqat.quantize(x, qp, cfg).int_values()

  return f


def _assert_keeps_levels(cfg: QatConfig, lo: float, hi: float):
  v = _grid_values(cfg) if cfg.symmetric else np.arange(cfg.qmin, cfg.qmax + 1, dtype=F32)
  s, z, zero, x, got = _roundtrip(cfg)(F32(lo), F32(hi), v)
  assert np.isfinite(s) and s > 0
  assert float(zero) == 0.0  # zero is exact
  # fp8 values whose product with the scale is below the smallest normal float32 cannot be written as
  # float32 inputs at all, whatever the scale; every other value is a level.
  keep = (np.abs(np.asarray(x)) >= np.finfo(F32).tiny) | (v == 0) | (not cfg.bits.is_float)
  np.testing.assert_array_equal(np.asarray(got, F32)[keep], v[keep])
  if not cfg.symmetric:
    assert float(z) == round(float(z)) and cfg.qmin <= float(z) <= cfg.qmax


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("amax", AMAXES)
def test_small_range_keeps_every_level(bits, amax):
  # With the old absolute floor (float32 eps), int8 at amax 1e-6 kept about 8 levels and fp8 e5m2 departed
  # from amax / 57344 below amax ~ 6.8e-3.
  cfg = QatConfig(bits=bits)
  qp = qparams_from_range(-amax, amax, cfg)
  assert float(qp.scale) == F32(amax) * F32(1 / cfg.qmax)
  _assert_keeps_levels(cfg, -amax, amax)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_all_zero_range_gives_a_positive_finite_scale(bits):
  for sym in (True, False) if bits in INT_BITS else (True,):
    cfg = QatConfig(bits=bits, symmetric=sym)
    s, _, zero, _, _ = _roundtrip(cfg)(F32(0), F32(0), _grid_values(cfg)[:1])
    assert float(s) == MIN_SCALE and np.isfinite(1 / np.float32(s))
    assert float(zero) == 0.0


@settings(max_examples=40, deadline=None)
@given(
  log_amax=st.floats(-30, 30),
  frac=st.floats(0.0, 1.0),
  bits=st.sampled_from(ALL_BITS),
  sym=st.booleans(),
)
def test_any_finite_range_keeps_levels_positive_scale_and_exact_zero(log_amax, frac, bits, sym):
  cfg = QatConfig(bits=bits, symmetric=sym or bits.startswith("fp8"))
  amax = 10.0**log_amax
  lo, hi = -amax * frac, amax
  _assert_keeps_levels(cfg, lo, hi)


def test_mse_search_uses_the_shared_arithmetic():
  # The MSE candidates are fake_quant on the narrow symmetric grid with the scale qparams_from_range gives.
  x = jnp.linspace(0.0, 3.0, 4097, dtype=jnp.float32)
  for bits, qmax, fp8 in (("int8", 127, None), ("fp8_e4m3", 448.0, jnp.float8_e4m3fn)):
    cfg = QatConfig(bits=bits, narrow_range=fp8 is None)

    @jax.jit
    def both(amax, cfg=cfg, qmax=qmax, fp8=fp8):
      qp = qparams_from_range(-amax, amax, cfg)
      return search._fake_quant_grid(x, amax, qmax, fp8), jqat.fake_quant(x, qp, cfg)

    for amax in (0.7, 1.3, 2.9):
      got, want = both(jnp.float32(amax))
      np.testing.assert_array_equal(got, want)


def test_qat_dot_quantize_is_the_shared_arithmetic():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32)
  for cfg in (QatConfig(symmetric=False), QatConfig(bits="int4", per_channel=True), QatConfig(bits="fp8_e5m2")):

    @jax.jit
    def three(x, cfg=cfg):
      qp = jqat.qparams_from_array(x, cfg)
      q, _ = qat_dot._quantize(x, qp.scale, qp.zero_point, cfg)
      y = qat_dot._dequantize(q, qp.scale, qp.zero_point, cfg, x.dtype)
      return y, jqat.fake_quant(x, qp, cfg), jqat.dequantize(jqat.quantize(x, qp, cfg))

    y, fq, dq = three(x)
    np.testing.assert_array_equal(y, fq)
    np.testing.assert_array_equal(y, dq)


def test_fp8_rounding_survives_jit():
  # XLA may drop a narrowing-then-widening convert pair; reduce_precision is kept.
  c = jnp.array([1.0625, 1.1875, 3.0e-3, -447.0], jnp.float32)
  for bits in (jqat.QuantBits.FP8_E4M3, jqat.QuantBits.FP8_E5M2):
    want = np.asarray(c).astype(bits.float_dtype).astype(F32)
    np.testing.assert_array_equal(jax.jit(numerics.round_to_float8, static_argnums=1)(c, bits), want)


def test_nan_is_not_clipped_by_the_ste_mask():
  cfg = QatConfig()
  xs = jnp.array([jnp.nan, 1.0, 500.0, -500.0], jnp.float32)
  assert numerics.in_range(xs, 0.0, cfg).tolist() == [True, True, False, False]


def test_qtensor_and_int_ops_use_no_fake_quant_privates():
  for module in (qtensor, int_ops, qat_dot, search):
    assert "fake_quant import" not in inspect.getsource(module)


def test_lsq_scale_at_or_below_zero_is_clamped_in_the_forward():
  cfg = QatConfig(estimator="lsq")
  x = jnp.array([0.0, 1e-39, 1.0, -2.0], jnp.float32)

  @jax.jit
  def value_and_ds(s):
    return jax.value_and_grad(lambda s: jnp.sum(jqat.fake_quant(x, QParams(s, jnp.float32(0.0)), cfg)))(s)

  floor, _ = value_and_ds(jnp.float32(MIN_SCALE))
  for s in (0.0, -0.5):
    y, ds = value_and_ds(jnp.float32(s))
    assert np.isfinite(y) and y == floor
    # The gradient passes the clamp, so training can move the scale back up.
    assert np.isfinite(ds) and ds != 0
  # Eager too: a learned scale is clamped, not refused.
  assert np.all(np.isfinite(jqat.fake_quant(x, QParams(jnp.float32(0.0), jnp.float32(0.0)), cfg)))


def _ties_and_randoms(seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  ties = np.arange(-40, 40, dtype=np.float32) / 2  # every k + 0.5 and integer in [-20, 20)
  near = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))
  special = np.float32([0.0, -0.0, np.inf, -np.inf])
  return np.concatenate([ties, *near, rng.uniform(-9, 9, 2000).astype(np.float32), special])


def test_round_half_away_from_zero_is_the_gguf_reference():
  from gguf.quants import np_roundf

  from jqat._src.config import Rounding

  u = _ties_and_randoms()
  finite = np.isfinite(u)
  got = np.asarray(jax.jit(lambda u: numerics.round_units(u, Rounding.HALF_AWAY_FROM_ZERO, -128.0))(u))
  np.testing.assert_array_equal(got[finite], np_roundf(u[finite]) + 0.0)  # + 0.0: the reference's codes are ints
  assert (got[finite].view(np.uint32) != np.float32(-0.0).view(np.uint32)).all()  # never -0.0
  np.testing.assert_array_equal(got[~finite], u[~finite])


def test_round_half_up_unsigned_is_llama_cpp_q4_0():
  from jqat._src.config import Rounding

  u = _ties_and_randoms(1)
  assert u.dtype == np.float32
  finite = np.isfinite(u)
  got = np.asarray(jax.jit(lambda u: numerics.round_units(u, Rounding.HALF_UP_UNSIGNED, -8.0))(u))
  # llama.cpp: trunc(u + 8.5) in float32, clipped to the code range 0..15, minus 8.
  ref = np.clip(np.trunc(u + np.float32(8.5)), 0, 15) - 8
  np.testing.assert_array_equal(np.clip(got, -8, 7)[finite], ref[finite])


def test_round_to_dtype_is_the_float16_cast():
  rng = np.random.default_rng(2)
  c = np.concatenate(
    [
      rng.standard_normal(3000).astype(np.float32) * np.float32(1e-5),  # float16 subnormals
      rng.standard_normal(3000).astype(np.float32) * np.float32(100),
      np.float32([65504, 65519.99, 65520, 7e4, -7e4, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 0.0, -0.0, np.inf]),
    ]
  )
  with np.errstate(over="ignore"):  # beyond 65504 the cast gives inf, as it should
    want = c.astype(np.float16).astype(np.float32)
  jitted = jax.jit(numerics.round_to_dtype, static_argnums=1)
  for got in (numerics.round_to_dtype(jnp.asarray(c), jnp.float16), jitted(c, "float16")):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))
  bf = np.asarray(numerics.round_to_dtype(jnp.asarray(c[3000:6000]), jnp.bfloat16))
  np.testing.assert_array_equal(bf, c[3000:6000].astype(jnp.bfloat16).astype(np.float32))


def test_scale_dtype_rounds_only_the_dequantization_scale():
  """Grid units use the computed scale, the output the scale rounded to scale_dtype (a file's fp16 d)."""
  cfg = QatConfig(bits="int8", scale_dtype="float16")
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, 257), jnp.float32)
  qp = jqat.qparams_from_array(x, cfg)
  s16 = np.float32(np.float16(qp.scale))
  assert s16 != np.float32(qp.scale)  # the test needs a scale float16 does not hold
  codes = np.clip(np.round(np.asarray(x) * (np.float32(1) / np.asarray(qp.scale))), -128, 127)
  np.testing.assert_array_equal(jqat.fake_quant(x, qp, cfg), codes * s16)
  q = jqat.quantize(x, qp, cfg)
  assert float(q.scale) == s16
  np.testing.assert_array_equal(jqat.dequantize(q), codes * s16)

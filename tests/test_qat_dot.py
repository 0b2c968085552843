"""Tests of jqat._src.qat_dot: the QAT dot with an integer forward and a clipped-STE backward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat._src import qat_dot as qat_dot_lib
from jqat._src.qparams import QParams

EPS32 = 2.0**-24
MATMUL = (((1,), (0,)), ((), ()))

XCFG = jqat.QatConfig(symmetric=False)  # activations: int8 asymmetric per tensor
WCFG = jqat.QatConfig(per_channel=True)  # weights: int8 symmetric per channel


def _data(m=6, k=32, n=5, seed=0, dtype=jnp.float32):
  # NumPy data: no eager JAX ops, whose compilation would dominate the test time.
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((m, k)) + 0.3).astype(dtype)
  w = (rng.standard_normal((k, n)) * 0.1).astype(dtype)
  return x, w


def _narrow_qparams(a, cfg, shrink=0.6):
  """QParams covering only part of the range of ``a``, so some elements are clipped."""
  lo, hi = jqat.array_range(a, cfg)
  return jqat.qparams_from_range(lo * shrink, hi * shrink, cfg)


def _fq(a, qp, cfg):
  return a if cfg is None else jqat.fake_quant(a, qp, cfg)


def _mask(a, qp, cfg):
  """In-range mask of the clipped STE, written from its definition: qmin <= round(a / s) + z <= qmax."""
  if cfg is None:
    return np.ones(a.shape, bool)
  a = np.asarray(a, np.float32)
  s = np.asarray(qp.scale, np.float32)
  z = np.zeros_like(s) if cfg.symmetric else np.round(np.asarray(qp.zero_point, np.float32))
  if cfg.group_size is not None:  # parameters hold one entry per group: repeat them over the group
    s = np.repeat(s, cfg.group_size, axis=cfg.group_axis)
    z = np.repeat(z, cfg.group_size, axis=cfg.group_axis)
  v = a * (np.float32(1) / s)
  if cfg.bits.is_float:
    with np.errstate(invalid="ignore", over="ignore"):
      pos = v.astype(cfg.bits.float_dtype).astype(np.float32)
  else:
    pos = np.round(v) + z
  return (pos >= cfg.qmin) & (pos <= cfg.qmax)


CASES = {
  "w8a8": (XCFG, WCFG),
  "sym_tensor": (jqat.QatConfig(), jqat.QatConfig()),
  "asym_both_token": (
    jqat.QatConfig(symmetric=False, per_channel=True, channel_axis=0),
    jqat.QatConfig(symmetric=False),
  ),
  "int4": (jqat.QatConfig(bits="int4", symmetric=False), jqat.QatConfig(bits="int4", per_channel=True)),
  "group": (XCFG, jqat.QatConfig(bits="int4", group_size=8, group_axis=0)),
  "fp8": (jqat.QatConfig(bits="fp8_e4m3"), jqat.QatConfig(bits="fp8_e4m3", per_channel=True)),
  "weight_only": (None, WCFG),
  "act_only": (XCFG, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_fake_quant_float_dot_and_gradients_match_masks(case):
  lcfg, rcfg = CASES[case]
  x, w = _data(seed=1)
  xqp = None if lcfg is None else jax.jit(_narrow_qparams, static_argnums=1)(x, lcfg)
  wqp = None if rcfg is None else jax.jit(_narrow_qparams, static_argnums=1)(w, rcfg)
  g = np.random.default_rng(2).standard_normal((x.shape[0], w.shape[1])).astype(np.float32)

  def f(x, w, xqp, wqp):
    return jqat.qat_dot_general(x, w, MATMUL, xqp, wqp, lhs_config=lcfg, rhs_config=rcfg)

  @jax.jit
  def run(x, w, xqp, wqp):
    y, vjp = jax.vjp(f, x, w, xqp, wqp)
    return y, vjp(g), _fq(x, xqp, lcfg), _fq(w, wqp, rcfg)

  y, (dx, dw, dxqp, dwqp), xf, wf = run(x, w, xqp, wqp)
  xf, wf = np.asarray(xf, np.float64), np.asarray(wf, np.float64)
  ref = xf @ wf
  integer = qat_dot_lib._integer_path_applies(x, w, MATMUL, lcfg, rcfg, *_flat(xqp), *_flat(wqp))
  assert integer == (case in ("w8a8", "sym_tensor", "asym_both_token", "int4"))
  # The integer sum is exact; float32 rounds the rescale (3 roundings) and, on
  # the float side, the dot of fake-quantized operands (K + 1 roundings).
  tol = (x.shape[1] + 5) * EPS32 * (np.abs(xf) @ np.abs(wf))
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol + 1e-30)
  # Clipped STE: the float dot's gradient at the fake-quantized operands, times the in-range masks.
  mx, mw = _mask(x, xqp, lcfg), _mask(w, wqp, rcfg)
  if lcfg is not None:
    assert not mx.all()  # the narrow qparams clip something: the masks matter
  if rcfg is not None:
    assert not mw.all()
  gn = np.asarray(g, np.float64)
  np.testing.assert_allclose(dx, (gn @ wf.T) * mx, rtol=1e-6, atol=1e-6)  # float32 dot of K=5 terms
  np.testing.assert_allclose(dw, (xf.T @ gn) * mw, rtol=1e-6, atol=1e-6)  # float32 dot of M=6 terms
  for t in jax.tree.leaves((dxqp, dwqp)):
    assert not np.any(t)


def _flat(qp):
  if qp is None:
    z = np.zeros((), np.float32)
    return z, z
  return qp.scale, qp.zero_point


def test_integer_forward_lowers_to_an_s32_dot():
  x, w = _data()
  xqp, wqp = jqat.qparams_from_array(x, XCFG), jqat.qparams_from_array(w, WCFG)

  def loss(x, w):
    return jqat.qat_dot_general(x, w, MATMUL, xqp, wqp, lhs_config=XCFG, rhs_config=WCFG).sum()

  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  assert re.search(r"dot_general.*\(tensor<6x32xi8>, tensor<32x5xi8>\) -> tensor<6x5xi32>", text), text
  # The backward saves int8 values and masks, not float copies, and its dots are float.
  assert re.search(r"dot_general.*-> tensor<6x32xf32>", text)
  assert re.search(r"dot_general.*-> tensor<(32x5|5x32)xf32>", text)


def test_general_dimension_numbers_under_vmap_and_jit():
  # lhs (B, K, M) and rhs (N, B, K): contract K, batch B; then vmap over a leading axis.
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((2, 3, 16, 4)) + 0.2).astype(np.float32)
  w = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  dims = (((1,), (2,)), ((0,), (1,)))
  lcfg = jqat.QatConfig(symmetric=False, per_channel=True, channel_axis=(0, 2))  # per (batch, token)
  rcfg = jqat.QatConfig(per_channel=True, channel_axis=(0, 1))  # per (channel, batch)
  g = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)

  def one(x, w, g):
    xqp, wqp = _narrow_qparams(x, lcfg), _narrow_qparams(w, rcfg)
    f = lambda x, w: jqat.qat_dot_general(x, w, dims, xqp, wqp, lhs_config=lcfg, rhs_config=rcfg)
    y, vjp = jax.vjp(f, x, w)
    xf, wf = jqat.fake_quant(x, xqp, lcfg), jqat.fake_quant(w, wqp, rcfg)
    return y, vjp(g), xf, wf, xqp, wqp

  y, (dx, dw), xf, wf, xqp, wqp = jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(x, w, g))
  assert qat_dot_lib._integer_path_applies(
    x[0], w[0], dims, lcfg, rcfg, xqp.scale[0], xqp.zero_point[0], wqp.scale[0], wqp.zero_point[0]
  )
  xf, wf, gn = (np.asarray(t, np.float64) for t in (xf, wf, g))
  ref = np.einsum("vbkm,vnbk->vbmn", xf, wf)
  tol = 21 * EPS32 * np.einsum("vbkm,vnbk->vbmn", np.abs(xf), np.abs(wf))  # K + 5 roundings
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol + 1e-30)
  mx = np.stack([_mask(x[i], QParams(xqp.scale[i], xqp.zero_point[i]), lcfg) for i in range(2)])
  mw = np.stack([_mask(w[i], QParams(wqp.scale[i], wqp.zero_point[i]), rcfg) for i in range(2)])
  np.testing.assert_allclose(dx, np.einsum("vbmn,vnbk->vbkm", gn, wf) * mx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("vbkm,vbmn->vnbk", xf, gn) * mw, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs():
  x, w = _data(seed=4, dtype=jnp.bfloat16)
  xqp, wqp = jqat.qparams_from_array(x, XCFG), jqat.qparams_from_array(w, WCFG)

  @jax.jit
  def run(x, w):
    f = lambda x, w: jqat.qat_dot_general(x, w, MATMUL, xqp, wqp, lhs_config=XCFG, rhs_config=WCFG)
    y, vjp = jax.vjp(f, x, w)
    ref = jax.lax.dot_general(
      jqat.fake_quant(x, xqp, XCFG), jqat.fake_quant(w, wqp, WCFG), MATMUL, preferred_element_type=jnp.float32
    )
    y32 = jqat.qat_dot_general(
      x, w, MATMUL, xqp, wqp, lhs_config=XCFG, rhs_config=WCFG, preferred_element_type=jnp.float32
    )
    return y, vjp(jnp.ones_like(y)), ref, y32

  y, (dx, dw), ref, y32 = run(x, w)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  assert y32.dtype == jnp.float32
  # fake_quant of a bfloat16 array rounds each x̂ = (q - z) s to bfloat16 (relative
  # 2^-9), which the integer path does not: the two differ by at most two such
  # roundings per product, plus float32 rounding.
  xf = np.abs(np.asarray(jqat.fake_quant(x, xqp, XCFG), np.float64))
  wf = np.abs(np.asarray(jqat.fake_quant(w, wqp, WCFG), np.float64))
  tol = (2 * 2.0**-9 + 40 * EPS32) * (xf @ wf)
  np.testing.assert_array_less(np.abs(np.asarray(y32, np.float64) - np.asarray(ref, np.float64)), tol)
  # y is y32 rounded once to bfloat16.
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y32).astype(jnp.bfloat16).astype(np.float32))


def test_unquantized_operands_are_a_plain_dot():
  x, w = _data()
  # A float32 dot of K=32 terms of size ~0.1: absolute error well below K * 2^-24 * 0.3 * 32 ~ 2e-5.
  np.testing.assert_allclose(jqat.qat_dot_general(x, w, MATMUL), x @ w, rtol=0, atol=2e-5)
  with pytest.raises(ValueError, match="rhs_qparams is None"):
    jqat.qat_dot_general(x, w, MATMUL, rhs_config=WCFG)


def test_operands_with_their_own_range_skip_the_all_ones_mask():
  # Quantized with its own range, an operand never clips: dropping its mask
  # (may_clip=False) must leave the output and the gradients unchanged.
  x = jax.random.normal(jax.random.key(0), (6, 16))
  w = jax.random.normal(jax.random.key(1), (16, 5))
  xcfg, wcfg = jqat.QatConfig(per_channel=True, symmetric=False), jqat.QatConfig(per_channel=True)
  dims = (((1,), (0,)), ((), ()))

  def f(x, w, may_clip):
    xqp, wqp = jqat.qparams_from_array(x, xcfg), jqat.qparams_from_array(w, wcfg)
    y = jqat.qat_dot_general(
      x, w, dims, xqp, wqp, lhs_config=xcfg, rhs_config=wcfg, lhs_may_clip=may_clip, rhs_may_clip=may_clip
    )
    return jnp.sum(y * jnp.arange(5.0))

  ref = jax.value_and_grad(f, argnums=(0, 1))(x, w, True)
  got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(x, w, False)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("symmetric", [True, False])
def test_own_range_qparams_equal_qparams_from_array(symmetric):
  from jqat._src.flax import common

  rng = np.random.default_rng(6)
  w = rng.standard_normal((16, 5)).astype(np.float32)
  cfg = jqat.QatConfig(symmetric=symmetric, per_channel=True, channel_axis=1)
  bad = w.copy()
  bad[3, 2], bad[5, 4] = np.nan, -np.inf

  @jax.jit
  def run(w, bad):
    return common.own_range_qparams(w, cfg), common.own_range_qparams(bad, cfg), jqat.qparams_from_array(bad, cfg)

  (qp, mark), (qp_bad, mark_bad), ref_bad = run(w, bad)
  ref = jqat.qparams_from_array(w, cfg)
  np.testing.assert_array_equal(qp.scale, ref.scale)
  np.testing.assert_array_equal(qp.zero_point, ref.zero_point)
  np.testing.assert_array_equal(mark, np.zeros((1, 5)))
  # Without marked_blocks a block that is not finite gets its finite values' range, as qparams_from_array gives.
  np.testing.assert_array_equal(qp_bad.scale, ref_bad.scale)
  np.testing.assert_array_equal(qp_bad.zero_point, ref_bad.zero_point)
  np.testing.assert_array_equal(np.isnan(mark_bad), [[False, False, True, False, True]])


def test_layer_dot_marks_the_columns_of_a_non_finite_kernel():
  # The layers' dot takes the kernel's range itself (rhs_qp None): its finite columns are the bits of
  # qat_dot_general with qparams_from_array, its non-finite columns NaN (the float dot's non-finite cells).
  from jqat._src.flax import common

  x, w = _data(seed=7)
  w[3, 2], w[5, 4] = np.nan, np.inf
  wcfg = jqat.QatConfig(per_channel=True, channel_axis=1)

  @jax.jit
  def run(x, w):
    xqp = jqat.qparams_from_array(x, XCFG)
    own = common.quantized_dot_general(x, w, MATMUL, xqp, None, XCFG, wcfg)
    ref = jqat.qat_dot_general(x, w, MATMUL, xqp, jqat.qparams_from_array(w, wcfg), lhs_config=XCFG, rhs_config=wcfg)
    return own, ref

  own, ref = (np.asarray(a) for a in run(x, w))
  with np.errstate(invalid="ignore"):
    expected = np.isfinite(x @ w)
  np.testing.assert_array_equal(np.isfinite(own), expected)
  assert np.isnan(own[:, [2, 4]]).all()
  np.testing.assert_array_equal(own[:, [0, 1, 3]], ref[:, [0, 1, 3]])

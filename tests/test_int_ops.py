"""Tests of jqat._src.int_ops: integer dot with int32 accumulation and rescale."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat._src import int_kernels, int_ops

EPS32 = 2.0**-24  # unit roundoff of float32
MATMUL = (((1,), (0,)), ((), ()))

# lhs (M, K) granularities and rhs (K, N) granularities, as QatConfig fields.
LHS_MODES = {
  "tensor": {},
  "token": dict(per_channel=True, channel_axis=0),
  "group": dict(group_size=8, group_axis=1),
}
RHS_MODES = {
  "tensor": {},
  "channel": dict(per_channel=True),
  "group": dict(group_size=16, group_axis=0),
  "channel_group": dict(per_channel=True, group_size=8, group_axis=0),
}


def _quantize(x, **cfg_fields):
  cfg = jqat.QatConfig(**cfg_fields)
  return jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)


def _data(m=6, k=32, n=5, seed=0):
  # NumPy data: no eager JAX ops, whose compilation would dominate the test time.
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((m, k)) + 0.3).astype(np.float32)  # off-centre: asymmetric zero points are not 0
  w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
  return x, w


def _int64_reference(xq, wq):
  """Σ (q_x - z_x)(q_w - z_w) in int64, from the unpacked values (no groups)."""
  qx = np.asarray(xq.int_values(), np.int64) - np.asarray(xq.zero_point, np.int64)
  qw = np.asarray(wq.int_values(), np.int64) - np.asarray(wq.zero_point, np.int64)
  return qx @ qw


def _assert_close_to_dequantized(y, xq, wq, num_groups, bias=0.0):
  xd = np.asarray(jqat.dequantize(xq), np.float64)
  wd = np.asarray(jqat.dequantize(wq), np.float64)
  ref = xd @ wd + bias
  # The dequantized operands are each within one float32 rounding of
  # (q - z) * s (two per product); the integer path rounds the sum, the scale
  # product and the final product, plus one addition per group: a relative
  # error of at most (num_groups + 5) units of roundoff on Σ|x̂ ŵ|.
  tol = (num_groups + 5) * EPS32 * (np.abs(xd) @ np.abs(wd)) + EPS32 * np.abs(ref) + 1e-30
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol + 1e-12 * 0)


def test_lowered_and_compiled_hlo_has_an_s32_integer_dot():
  x, w = _data()
  xq = _quantize(x, symmetric=False)
  wq = _quantize(w, per_channel=True)
  lowered = jax.jit(jqat.int_matmul).lower(xq, wq)
  text = lowered.as_text()
  assert re.search(r"dot_general.*\(tensor<6x32xi8>, tensor<32x5xi8>\) -> tensor<6x5xi32>", text), text
  compiled = lowered.compile().as_text()
  # The compiled dot may sit inside a fusion whose parameters are the s8 operands.
  assert re.search(r"= s32\[6,5\]\S* dot\(", compiled), compiled
  assert "s8[6,32]" in compiled and "s8[32,5]" in compiled


SYM_PAIRS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.parametrize("bits", ["int8", "int4", "int5"])
def test_accumulator_is_exact_against_int64(bits):
  x, w = _data(seed=1)

  @jax.jit
  def case(x, w):
    out = []
    for lsym, rsym in SYM_PAIRS:
      xq = _quantize(x, bits=bits, symmetric=lsym, per_channel=True, channel_axis=0)
      wq = _quantize(w, bits=bits, symmetric=rsym, per_channel=True)
      acc = jqat.int_dot_accumulator(xq, wq, MATMUL)
      # Prepared weight sums must give the same bits.
      acc2 = jqat.int_dot_accumulator(xq, jqat.with_weight_sums(wq), MATMUL)
      out.append((xq, wq, acc, acc2))
    return out

  for xq, wq, acc, acc2 in case(x, w):
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc, np.int64), _int64_reference(xq, wq))
    np.testing.assert_array_equal(acc2, acc)


@pytest.mark.parametrize(
  "bits,lmode,rmode",
  [
    (bits, lm, rm)
    for bits in ("int8", "int4")
    for lm, rm in [("tensor", "channel"), ("tensor", "group"), ("group", "channel_group"), ("token", "channel")]
  ]
  + [(bits, lm, rm) for bits in ("int2", "fp8_e4m3") for lm, rm in [("token", "channel"), ("group", "channel_group")]],
)
def test_int_matmul_matches_dequantized_dot(bits, lmode, rmode):
  x, w = _data(seed=2)
  bias = np.linspace(-1.0, 1.0, w.shape[1], dtype=np.float32)
  pairs = [(True, True)] if bits.startswith("fp8") else SYM_PAIRS  # fp8 is always symmetric

  @jax.jit
  def case(x, w):
    out = []
    for lsym, rsym in pairs:
      xq = _quantize(x, bits=bits, symmetric=lsym, **LHS_MODES[lmode])
      wq = _quantize(w, bits=bits, symmetric=rsym, **RHS_MODES[rmode])
      wp = wq if bits.startswith("fp8") else jqat.with_weight_sums(wq)
      out.append((xq, wq, jqat.int_matmul(xq, wp, bias=bias)))
    return out

  groups = x.shape[1] // 8 if "group" in lmode + rmode else 1
  for xq, wq, y in case(x, w):
    assert y.shape == (x.shape[0], w.shape[1]) and y.dtype == jnp.float32
    _assert_close_to_dequantized(y, xq, wq, groups, bias=np.asarray(bias, np.float64))


def test_mixed_fp8_and_asymmetric_int8():
  x, w = _data(seed=3)

  @jax.jit
  def case(x, w):
    xq = _quantize(x, bits="int8", symmetric=False)
    wq = _quantize(w, bits="fp8_e4m3", per_channel=True)
    return xq, wq, jqat.int_matmul(xq, wq)

  xq, wq, y = case(x, w)
  _assert_close_to_dequantized(y, xq, wq, 1)


def test_general_dimension_numbers_with_batch_and_transposed_axes():
  rng = np.random.default_rng(4)
  # lhs (K, B, M), rhs (B, N, K): contract lhs 0 with rhs 2, batch lhs 1 with rhs 0.
  x = (rng.standard_normal((24, 3, 4)) + 0.5).astype(np.float32)
  w = rng.standard_normal((3, 5, 24)).astype(np.float32)
  dims = (((0,), (2,)), ((1,), (0,)))

  @jax.jit
  def case(x, w):
    xq = _quantize(x, symmetric=False, per_channel=True, channel_axis=(1, 2))  # per (batch, token)
    wq = _quantize(w, symmetric=False, per_channel=True, channel_axis=(0, 1))  # per (batch, channel)
    xg = _quantize(x, group_size=8, group_axis=0)  # grouped along the contraction
    y = jqat.int_dot_general(xq, wq, dims)
    yg = jqat.int_dot_general(xg, jqat.with_weight_sums(wq, (2,)), dims)
    return [jqat.dequantize(t) for t in (xq, wq, xg)], y, yg

  (xd, wd, xgd), y, yg = case(x, w)
  xd, wd, xgd = (np.asarray(t, np.float64) for t in (xd, wd, xgd))
  for lhs, out, groups in ((xd, y, 1), (xgd, yg, 3)):
    ref = np.einsum("kbm,bnk->bmn", lhs, wd)
    assert out.shape == ref.shape == (3, 4, 5)
    # As in _assert_close_to_dequantized: (groups + 5) roundings relative to Σ|x̂ ŵ|.
    tol = (groups + 5) * EPS32 * np.einsum("kbm,bnk->bmn", np.abs(lhs), np.abs(wd))
    np.testing.assert_array_less(np.abs(np.asarray(out) - ref), tol)


def test_grouped_weight_sums_are_used_and_exact():
  x, w = _data(k=64, seed=5)

  @jax.jit
  def case(x, w):
    xq = _quantize(x, symmetric=False)
    wq = _quantize(w, bits="int4", per_channel=True, group_size=16, group_axis=0)
    wp = jqat.with_weight_sums(wq)
    return wp.sums, jqat.int_matmul(xq, wp), jqat.int_matmul(xq, wq)

  sums, y1, y2 = case(x, w)
  assert sums.shape == (4, w.shape[1]) and sums.dtype == jnp.int32
  np.testing.assert_array_equal(y1, y2)


def test_overflow_guard_splits_and_stays_exact():
  k = 600
  x, w = _data(m=3, k=k, n=4, seed=6)
  cx, cw = jqat.QatConfig(symmetric=False), jqat.QatConfig(symmetric=False, per_channel=True)
  assert jqat.accumulator_bound(cx, cw, k) == k * 255 * 255 > 2**20
  plans = []

  def trace(max_accumulator):
    def f(xv, wv, xs, ws):
      ops = int_kernels.Operand(xv, xs, xs, cx), int_kernels.Operand(wv, ws, ws, cw)
      acc, _, plan = int_kernels.accumulate(*ops, MATMUL, max_accumulator=max_accumulator)
      plans.append(plan)
      return acc

    # Tracing alone fixes the plan; nothing is compiled.
    jax.make_jaxpr(f)(np.zeros((3, k), np.int8), np.zeros((k, 4), np.int8), np.ones((1, 1)), np.ones((1, 4)))
    return plans[-1]

  plan = trace(2**20)
  assert plan.num_pieces > 1 and plan.piece * 255 * 255 <= 2**20 and plan.int32_sum
  assert trace(int_kernels.INT32_MAX).num_pieces == 1

  def case(x, w):
    xq = _quantize(x, symmetric=False)
    wq = _quantize(w, symmetric=False, per_channel=True)
    acc = jqat.int_dot_accumulator(xq, wq, MATMUL, max_accumulator=2**20)
    # Prepared sums do not fit the pieces: they are recomputed, still exact.
    acc2 = jqat.int_dot_accumulator(xq, jqat.with_weight_sums(wq), MATMUL, max_accumulator=2**20)
    return xq, wq, acc, acc2

  text = jax.jit(case).lower(x, w).as_text()
  # The pieces are a batch axis of the integer dot: (3, 38, 16) x (38, 16, 4) -> (38, 3, 4).
  assert re.search(r"dot_general .*batching_dims = \[1\] x \[0\].*-> tensor<38x3x4xi32>", text), text
  xq, wq, acc, acc2 = jax.jit(case)(x, w)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(acc, np.int64), _int64_reference(xq, wq))
  np.testing.assert_array_equal(acc2, acc)


def test_overflow_guard_at_the_real_int32_limit():
  # (q_x - z_x) = 255 and (q_w - z_w) = -255 almost everywhere: K = 33100
  # products sum to -2.15e9, past the int32 range a single sum would wrap in.
  k = 33100
  x = np.ones((1, k), np.float32)
  x[0, 0] = 0.0
  w = -np.ones((k, 1), np.float32)
  w[0, 0] = 0.0

  @jax.jit
  def case(x, w):
    xq = _quantize(x, symmetric=False)
    wq = _quantize(w, symmetric=False)
    return xq, wq, jqat.int_dot_accumulator(xq, wq, MATMUL), jqat.int_matmul(xq, wq)

  xq, wq, acc, y = case(x, w)
  ref = _int64_reference(xq, wq)
  assert ref[0, 0] == -(k - 1) * 255 * 255 < -(2**31)
  assert jqat.accumulator_bound(xq.config, wq.config, k) > int_ops.INT32_MAX
  assert acc.dtype == jnp.float32  # pieces are summed in float32 past the int32 range
  # Each piece is exact; adding the pieces in float32 rounds relatively by 2^-24 per addition.
  np.testing.assert_allclose(np.asarray(acc, np.float64), ref, rtol=4 * EPS32)
  _assert_close_to_dequantized(y, xq, wq, 4)


def test_overflow_guard_with_symmetric_int8_random_data():
  k = 70000
  x, w = _data(m=2, k=k, n=3, seed=7)

  @jax.jit
  def case(x, w):
    xq, wq = _quantize(x), _quantize(w, per_channel=True)
    return xq, wq, jqat.int_dot_accumulator(xq, wq, MATMUL)  # bound 70000 * 128^2 > 2^31

  xq, wq, acc = case(x, w)
  # Random signs keep the true sum far below 2^24, so even the float32 sum of pieces is exact.
  np.testing.assert_array_equal(np.asarray(acc, np.int64), _int64_reference(xq, wq))


def test_bfloat16_output_and_bias():
  x, w = _data(seed=8)
  xq = _quantize(x.astype(jnp.bfloat16), symmetric=False)
  wq = _quantize(w.astype(jnp.bfloat16), per_channel=True)
  y = jqat.int_matmul(xq, wq, bias=jnp.ones(w.shape[1]), out_dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  ref = jqat.int_matmul(xq, wq) + 1.0
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-8, atol=2**-8)  # one bf16 rounding


def test_does_not_recompile():
  x, w = _data(seed=9)
  xq = _quantize(x, symmetric=False)
  wq = _quantize(w, per_channel=True)
  f = jax.jit(jqat.int_matmul)
  f(xq, wq)
  n = f._cache_size()
  xq2 = _quantize(x * 2, symmetric=False)
  f(xq2, wq)
  assert f._cache_size() == n


def test_errors():
  x, w = _data()

  def trace(f):  # errors are raised while tracing; nothing needs compiling
    return jax.eval_shape(lambda x, w: f(_quantize(x), _quantize(w)), x, w)

  with pytest.raises(ValueError, match="contracting axes differ"):
    trace(lambda xq, wq: jqat.int_dot_general(xq, wq, (((0,), (0,)), ((), ()))))
  with pytest.raises(ValueError, match="float format"):
    jqat.accumulator_bound(jqat.QatConfig(bits="fp8"), jqat.QatConfig(), 4)
  with pytest.raises(ValueError, match="per-group"):
    jax.eval_shape(
      lambda x, w: jqat.int_dot_accumulator(_quantize(x), _quantize(w, group_size=8, group_axis=0), MATMUL), x, w
    )
  with pytest.raises(ValueError, match="max_accumulator"):
    trace(lambda xq, wq: jqat.int_matmul(xq, wq, max_accumulator=100))


@pytest.mark.parametrize("wmode", ["channel_sym", "channel_asym", "group"])
def test_weight_only_matmul_matches_dequantized_weight(wmode):
  fields = {
    "channel_sym": dict(per_channel=True),
    "channel_asym": dict(per_channel=True, symmetric=False),
    "group": dict(bits="int4", group_size=16, group_axis=0),
  }[wmode]
  x, w = _data(k=64, seed=10)

  @jax.jit
  def case(x, w):
    wq = _quantize(w, **fields)
    blocked = jqat.weight_only_matmul(x, wq, k_block=16, bias=jnp.ones(w.shape[1]))
    whole = jqat.weight_only_matmul(x, wq, k_block=None)
    bf16 = jqat.weight_only_matmul(x.astype(jnp.bfloat16), wq)
    return jqat.dequantize(wq), blocked, whole, bf16

  wd, blocked, whole, bf16 = case(x, w)
  xd, wd = np.asarray(x, np.float64), np.asarray(wd, np.float64)
  ref = xd @ wd
  # Float32 sums in another order plus the scale product: (K + 3) roundings on Σ|x ŵ|.
  tol = (x.shape[1] + 3) * EPS32 * (np.abs(xd) @ np.abs(wd))
  np.testing.assert_array_less(np.abs(np.asarray(whole, np.float64) - ref), tol)
  np.testing.assert_array_less(np.abs(np.asarray(blocked, np.float64) - 1.0 - ref), tol + EPS32 * 4)
  assert bf16.dtype == jnp.bfloat16
  # bfloat16 activations: x rounded to bf16 (2^-9 relative), the output once more.
  np.testing.assert_array_less(np.abs(np.asarray(bf16, np.float64) - ref), 2**-7 * (np.abs(xd) @ np.abs(wd)))


# --- integer convolution -----------------------------------------------------------------------------------------


def _conv_reference(xq, wq, strides, pad, groups):
  """Σ (q_x - z_x)(q_w - z_w) of an NHWC x HWIO convolution, in int64, written out offset by offset."""
  qx = np.asarray(xq.int_values(), np.int64) - np.asarray(xq.zero_point, np.int64)
  qw = np.asarray(wq.int_values(), np.int64) - np.asarray(wq.zero_point, np.int64)
  qx = np.pad(qx, ((0, 0), pad[0], pad[1], (0, 0)))  # zero in real value is q = z: 0 once centred
  kh, kw, cin, cout = qw.shape
  n, h, w, _ = qx.shape
  oh, ow = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
  out = np.zeros((n, oh, ow, cout), np.int64)
  per = cout // groups
  for g in range(groups):
    xs = qx[..., g * cin : (g + 1) * cin]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, i : i + strides[0] * oh : strides[0], j : j + strides[1] * ow : strides[1], :]
        out[..., g * per : (g + 1) * per] += patch @ qw[i, j, :, g * per : (g + 1) * per]
  return out


DN = ("NHWC", "HWIO", "NHWC")


def test_int_conv_past_2_31_matches_int64_reference():
  # Asymmetric int8 both sides, 3x3x4096: K max|q - z|^2 = 36864 * 255^2 = 2.4e9 > 2^31 - 1. The unguarded int32
  # convolution returned -29187 where the true value is 36864 (in units of the scales).
  rng = np.random.default_rng(0)
  x = np.ones((1, 3, 3, 4096), np.float32)
  x[0, 0, 0, :64] = rng.uniform(0.0, 1.0, 64)  # not all equal; the range is still [0, 1]
  w = np.ones((3, 3, 4096, 2), np.float32)
  w[..., 1] = rng.uniform(0.5, 1.0, (3, 3, 4096))
  w[0, 0, 0, 1] = 0.0
  cfg = jqat.QatConfig(symmetric=False)
  wcfg = jqat.QatConfig(symmetric=False, per_channel=True)
  xq, wq = jax.jit(lambda x, w: (_quantize(x, symmetric=False), _quantize(w, symmetric=False, per_channel=True)))(x, w)
  assert int_kernels.plan_conv(cfg, wcfg, 4096, 9, int_kernels.INT32_MAX) == (2, 2048)
  ref = _conv_reference(xq, wq, (1, 1), ((0, 0), (0, 0)), 1)
  assert ref.max() > 2**31 - 1
  conv = jax.jit(lambda a, b: jqat.int_conv_general_dilated(a, b, (1, 1), "VALID", dimension_numbers=DN))
  y = np.asarray(conv(xq, wq), np.float64)
  scale = np.float64(xq.scale) * np.asarray(wq.scale, np.float64).reshape(-1)
  # Two exact int32 pieces added in float32 (one rounding), then two float32 products: 4 units of roundoff.
  np.testing.assert_allclose(y, ref * scale, rtol=4 * EPS32)


@pytest.mark.parametrize("lsym,rsym", [(True, False), (False, False)])  # both zero-point terms, and neither on lhs
def test_int_conv_matches_int64_reference_with_strides_padding_groups_and_a_split(lsym, rsym):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((2, 7, 6, 8)) + 0.4).astype(np.float32)
  w = (rng.standard_normal((3, 3, 4, 6)) * 0.2).astype(np.float32)  # two feature groups of 4 inputs
  xcfg = jqat.QatConfig(symmetric=lsym)
  wcfg = jqat.QatConfig(symmetric=rsym, per_channel=True)
  xq = jqat.quantize(x, jqat.qparams_from_array(x, xcfg), xcfg)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
  pad = ((1, 1), (0, 1))
  ref = _conv_reference(xq, wq, (2, 1), pad, 2)

  @jax.jit
  def acc(xq, wq):
    conv = lambda a, b, **kw: jax.lax.conv_general_dilated(a, b, (2, 1), pad, dimension_numbers=DN,
                                                           feature_group_count=2, **kw)
    whole, _ = int_kernels.accumulate_conv(xq, wq, conv, DN)
    # A bound low enough to split the 4 input features into pieces of one.
    split, _ = int_kernels.accumulate_conv(xq, wq, conv, DN, max_accumulator=9 * 255 * 255)
    y = jqat.int_conv_general_dilated(xq, wq, (2, 1), pad, dimension_numbers=DN, feature_group_count=2,
                                      bias=jnp.arange(6.0))
    return whole, split, y

  whole, split, y = acc(xq, wq)
  assert whole.dtype == jnp.int32 and whole.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(whole, np.int64), ref)
  np.testing.assert_array_equal(np.asarray(split, np.int64), ref)
  scale = np.float64(xq.scale) * np.asarray(wq.scale, np.float64).reshape(-1)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref * scale + np.arange(6.0), rtol=4 * EPS32, atol=1e-6)


def test_int_conv_refuses_what_it_cannot_do():
  x = np.arange(64, dtype=np.float32).reshape(2, 4, 4, 2)
  xq = _quantize(x)
  with pytest.raises(ValueError, match=r"int_conv_general_dilated: rhs is fp8_e4m3"):
    jqat.int_conv_general_dilated(xq, _quantize(np.ones((3, 3, 2, 2), np.float32), bits="fp8"), (1, 1), "SAME",
                                  dimension_numbers=DN)
  with pytest.raises(ValueError, match=r"the input needs one scale \(per-tensor\)"):
    jqat.int_conv_general_dilated(_quantize(x, per_channel=True, channel_axis=0), _quantize(np.ones((3, 3, 2, 2),
                                  np.float32)), (1, 1), "SAME", dimension_numbers=DN)
  with pytest.raises(TypeError, match=r"int_conv_general_dilated: rhs must be a jqat.QTensor"):
    jqat.int_conv_general_dilated(xq, np.ones((3, 3, 2, 2)), (1, 1), "SAME", dimension_numbers=DN)

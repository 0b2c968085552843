"""Tests for jqat._src.fake_quant: forward values, properties, STE and LSQ gradients, dtypes, compilation."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jqat._src.config import QatConfig
from jqat._src.fake_quant import fake_quant, lsq_grad_scale
from jqat._src.numerics import to_grid_units
from jqat._src.qparams import QParams, qparams_from_array, qparams_from_range

F32 = np.float32
INT_BITS = ["int2", "int3", "int4", "int5", "int6", "int7", "int8"]
FP8_BITS = ["fp8_e4m3", "fp8_e5m2"]

# Granularities for a tensor of shape (8, 6, 4).
GRANULARITIES = {
  "tensor": dict(),
  "channel": dict(per_channel=True),
  "channel_axis0": dict(per_channel=True, channel_axis=0),
  "channel_axes": dict(per_channel=True, channel_axis=(0, 2)),
  "group": dict(group_size=4, group_axis=0),
  "group_axis1": dict(group_size=3, group_axis=1),
  "channel_group": dict(per_channel=True, group_size=2, group_axis=0),
}

MODES = [
  (bits, sym, narrow)
  for bits, sym, narrow in itertools.product(INT_BITS + FP8_BITS, (True, False), (False, True))
  if bits in INT_BITS or (sym and not narrow)
]


def qp_of(scale, zero_point=0.0):
  return QParams(jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.float32))


def fq_list(x, qp, cfg):
  return np.asarray(jax.jit(fake_quant, static_argnums=2)(jnp.asarray(x, jnp.float32), qp, cfg)).tolist()


# --- hand-computed values ------------------------------------------------------------------------------------------


def test_symmetric_int8_oracle():
  # ALGORITHMS.md §3: x = 1, amax = 2: x * 127 / 2 = 63.5 rounds (half to even) to 64, so x_hat = 64 * 2 / 127.
  cfg = QatConfig()
  qp = qparams_from_range(-2.0, 2.0, cfg)
  out = fq_list([1.0, 3.0, -3.0, 0.0], qp, cfg)
  s = F32(2) / F32(127)
  assert out == [F32(64) * s, F32(127) * s, F32(-128) * s, 0.0]
  assert out[0] == pytest.approx(1.0078740, abs=1e-7)


def test_asymmetric_int8_oracle():
  # min = -1, max = 3: scale 4/255, zero point -64. x = -1 -> q = -128, x_hat = -64 s = -1.0039216 (the TF nudged
  # minimum); x = 3 -> 191.25 - 64 -> 127, x_hat = 191 s = 2.9960784; x = 1 -> 63.75 -> 64, x_hat = 64 s.
  cfg = QatConfig(symmetric=False)
  qp = qparams_from_range(-1.0, 3.0, cfg)
  s = F32(4) / F32(255)
  out = fq_list([-1.0, 3.0, 1.0, 0.0, 10.0, -10.0], qp, cfg)
  assert out == [F32(-64) * s, F32(191) * s, F32(64) * s, 0.0, F32(191) * s, F32(-64) * s]
  assert out[0] == pytest.approx(-1.0039216, abs=1e-7)
  assert out[1] == pytest.approx(2.9960784, abs=1e-7)


@pytest.mark.parametrize(
  ("bits", "narrow", "xs", "expected"),
  [
    ("int4", False, [0.5, 1.5, 2.5, -2.5, -8.4, 7.6, -9.0, 6.6], [0, 2, 2, -2, -8, 7, -8, 7]),
    ("int4", True, [-8.4, -7.6, 7.6], [-7, -7, 7]),
    ("int2", False, [-1.6, -0.5, 0.5, 1.5, 3.0], [-2, -0, 0, 1, 1]),
    ("int2", True, [-1.6, 1.6], [-1, 1]),
    ("int3", False, [-4.6, 3.5, 2.5], [-4, 3, 2]),
    ("int8", True, [-130.0, -127.5, 126.5], [-127, -127, 126]),
  ],
)
def test_integer_formats_with_unit_scale(bits, narrow, xs, expected):
  cfg = QatConfig(bits=bits, narrow_range=narrow)
  assert fq_list(xs, qp_of(1.0), cfg) == expected


def test_integer_scale_applied():
  # Scale 0.5 (exact): x / 0.5 = [2.5, 3.5, 20] -> [2, 4, 7] (int4) -> [1.0, 2.0, 3.5].
  assert fq_list([1.25, 1.75, 10.0], qp_of(0.5), QatConfig(bits="int4")) == [1.0, 2.0, 3.5]


def test_fp8_e4m3_oracles():
  cfg = QatConfig(bits="fp8_e4m3")
  xs = [464.0, 465.0, 1e4, -465.0, 4.25, 4.75, 1.97, -1.97, 2.0**-10, 1.5 * 2.0**-9]
  # 465 would be NaN on a plain cast; it is clipped to 448 first. 1.97 carries into the exponent: 2.0, not 1.875.
  assert fq_list(xs, qp_of(1.0), cfg) == [448.0, 448.0, 448.0, -448.0, 4.0, 5.0, 2.0, -2.0, 0.0, 2.0**-8]


def test_fp8_e4m3_with_scale():
  cfg = QatConfig(bits="fp8_e4m3")
  qp = qparams_from_range(-896.0, 1.0, cfg)  # amax 896 -> scale 2
  assert float(qp.scale) == 2.0
  assert fq_list([930.0, 8.5, 9.5, 1000.0], qp, cfg) == [896.0, 8.0, 10.0, 896.0]


def test_fp8_e5m2_oracles():
  cfg = QatConfig(bits="fp8_e5m2")
  xs = [61439.0, 61440.0, 1e6, -1e6, 7.0, 9.0, 11.0]
  # e5m2 keeps 2 mantissa bits: 7 is representable; in [8, 16) the step is 2, so the ties 9 and 11 go to the even
  # mantissas 8 and 12. 61440 would be inf on a plain cast; it is clipped to 57344 first.
  assert fq_list(xs, qp_of(1.0), cfg) == [57344.0, 57344.0, 57344.0, -57344.0, 7.0, 8.0, 12.0]


def test_nan_and_zero():
  cfg = QatConfig(symmetric=False)
  qp = qparams_from_range(-1.0, 3.0, cfg)
  out = fq_list([0.0, -0.0], qp, cfg)
  assert out == [0.0, 0.0]
  assert np.isnan(fq_list([np.nan], qp_of(1.0), QatConfig(bits="fp8"))[0])


def test_int_input_rejected():
  with pytest.raises(TypeError, match="int32"):
    fake_quant(jnp.arange(3), qp_of(1.0), QatConfig())


def test_scalar_input():
  y = fake_quant(jnp.float32(1.0), qparams_from_range(-2.0, 2.0, QatConfig()), QatConfig())
  assert y.shape == ()
  assert float(y) == F32(64) * (F32(2) / F32(127))


def test_to_grid_units_is_multiplication_by_reciprocal():
  # The same bits whatever XLA does with a division by a broadcast scale.
  x = np.random.default_rng(0).uniform(-3, 3, 4096).astype(F32)
  s = F32(2.9) / F32(127)
  expected = x * (F32(1) / s)
  np.testing.assert_array_equal(to_grid_units(jnp.asarray(x), jnp.float32(s)), expected)
  np.testing.assert_array_equal(jax.jit(to_grid_units)(x, s), expected)
  np.testing.assert_array_equal(jax.jit(lambda x: to_grid_units(x, jnp.float32(s)))(x), expected)


@pytest.mark.parametrize("kwargs", [dict(), dict(symmetric=False), dict(bits="int4", narrow_range=True)])
def test_same_result_eager_jit_and_closed_over(ref, kwargs):
  # Inputs near rounding ties, where a true division and a multiplication by the reciprocal disagree: every way of
  # running fake_quant must give the reference's bits.
  cfg = QatConfig(**kwargs)
  qp = qparams_from_range(-2.9, 3.0, cfg)
  x = ref.near_ties(qp.scale, k_range=(cfg.qmin - 2, cfg.qmax + 2))
  s, z = np.asarray(qp.scale).reshape(1), np.asarray(qp.zero_point).reshape(1)
  expected = ref.fake_quant(x, s, z, cfg.bits.value, cfg.narrow_range)
  assert np.any(np.round(x / s[0]) != np.round(x * (F32(1) / s[0])))  # the inputs do tell the two apart
  np.testing.assert_array_equal(fake_quant(x, qp, cfg), expected)
  np.testing.assert_array_equal(jax.jit(fake_quant, static_argnums=2)(x, qp, cfg), expected)
  np.testing.assert_array_equal(jax.jit(lambda x: fake_quant(x, qp, cfg))(x), expected)
  # Inside a gradient computation: d/dx fq(x)^2 / 2 = fq(x) * mask.
  value, grad = jax.jit(jax.value_and_grad(lambda x, qp: jnp.sum(fake_quant(x, qp, cfg) ** 2) / 2))(x, qp)
  np.testing.assert_array_equal(grad, expected * _ste_mask(x, s[0], z[0], cfg))


# --- the NumPy reference on random data ----------------------------------------------------------------------------


def _random_x(key: str, shape=(8, 6, 4)):
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  return (rng.normal(size=shape) * rng.uniform(0.1, 5.0) + rng.uniform(-1.0, 1.0)).astype(F32)


def _random_case(bits, sym, narrow, gran, shape=(8, 6, 4)):
  """x, a config and qparams calibrated on half the range x covers (so that clipping is exercised)."""
  x = _random_x(f"{bits}{sym}{narrow}{gran}", shape)
  cfg = QatConfig(bits=bits, symmetric=sym, narrow_range=narrow, **GRANULARITIES[gran])
  qp = qparams_from_array(x * F32(0.5), cfg)
  return x, cfg, qp


# Modes that also run under jit; the others run eagerly, which reuses compiled primitives across configs and keeps
# the whole matrix fast (one jit compilation per config and granularity is what would cost the time).
JIT_MODES = {("int8", False, False), ("int4", True, True), ("int3", False, True), ("fp8_e4m3", True, False)}


def _fake_quant_all_granularities(x, bits, sym, narrow):
  out = {}
  for gran, kw in GRANULARITIES.items():
    cfg = QatConfig(bits=bits, symmetric=sym, narrow_range=narrow, **kw)
    qp = qparams_from_array(x * F32(0.8), cfg)
    out[gran] = (fake_quant(x, qp, cfg), qp)
  return out


@pytest.mark.parametrize(("bits", "sym", "narrow"), MODES)
def test_matches_reference(ref, bits, sym, narrow):
  x = _random_x(f"{bits}{sym}{narrow}")
  fn = _fake_quant_all_granularities
  if (bits, sym, narrow) in JIT_MODES:
    fn = jax.jit(fn, static_argnums=(1, 2, 3))
  results = fn(x, bits, sym, narrow)
  qmin, qmax = ref.qrange(bits, narrow)
  for gran, kw in GRANULARITIES.items():
    y, qp = results[gran]
    lo, hi = ref.array_range(x * F32(0.8), **kw)
    scale, zp = ref.qparams(lo, hi, bits, sym, narrow)
    np.testing.assert_array_equal(qp.scale, scale, err_msg=gran)
    np.testing.assert_array_equal(qp.zero_point, zp, err_msg=gran)
    # The same float32 operations: bit exact.
    np.testing.assert_array_equal(y, ref.fake_quant(x, scale, zp, bits, narrow, **kw), err_msg=gran)
    # Both branches of the clip were compared: some values saturate, some do not.
    q = ref.int_values(x, scale, zp, bits, narrow, **kw)
    assert np.any((q == qmin) | (q == qmax)) and np.any((q > qmin) & (q < qmax)), gran


# --- properties ----------------------------------------------------------------------------------------------------

_jfq = jax.jit(fake_quant, static_argnums=2)
_values = hnp.arrays(np.float32, (16,), elements=st.floats(-100.0, 100.0, width=32))
_int_cfgs = st.builds(QatConfig, bits=st.sampled_from(INT_BITS), symmetric=st.booleans(), narrow_range=st.booleans())
_all_cfgs = st.one_of(_int_cfgs, st.builds(QatConfig, bits=st.sampled_from(FP8_BITS)))
# Fewer configs where each example compiles several functions for a new config.
_few_cfgs = st.sampled_from(
  [
    QatConfig(),
    QatConfig(bits="int4", symmetric=False, narrow_range=True),
    QatConfig(bits="int2", symmetric=False),
    QatConfig(bits="int3", narrow_range=True),
    QatConfig(bits="fp8_e4m3"),
    QatConfig(bits="fp8_e5m2"),
  ]
)


@given(x=_values, cfg=_int_cfgs)
def test_error_at_most_half_step_inside_range(x, cfg):
  qp = qparams_from_array(x, cfg)  # every x is inside the range
  y = np.asarray(_jfq(x, qp, cfg))
  s = float(qp.scale.reshape(()))
  # Exactly s/2 in real arithmetic; x / s and (q - z) * s each round once in float32, hence a few ulps of x.
  tol = s / 2 + 4 * np.spacing(np.abs(x)) + 4 * np.spacing(F32(s))
  assert np.all(np.abs(y - x) <= tol)


@given(x=_values, bits=st.sampled_from(FP8_BITS))
def test_fp8_relative_error_inside_range(x, bits):
  cfg = QatConfig(bits=bits)
  qp = qparams_from_array(x, cfg)
  y = np.asarray(_jfq(x, qp, cfg), np.float64)
  s = float(qp.scale.reshape(()))
  # Half a step of a format with m mantissa bits: |x| * 2^-(m+1) for normals, half the subnormal spacing near 0,
  # plus the float32 rounding of x / s and of q * s.
  mant, sub = (3, 2.0**-9) if bits == "fp8_e4m3" else (2, 2.0**-16)
  tol = np.maximum(np.abs(x) * 2.0 ** -(mant + 1), sub * s / 2) * (1 + 1e-6) + 4 * np.spacing(np.abs(x))
  assert np.all(np.abs(y - x) <= tol)


@given(x=_values, cfg=_few_cfgs, shrink=st.floats(0.05, 2.0))
def test_idempotent(x, cfg, shrink):
  qp = qparams_from_array(x * F32(shrink), cfg)  # also with values clipped
  y = _jfq(x, qp, cfg)
  np.testing.assert_array_equal(_jfq(y, qp, cfg), y)


@given(x=_values, cfg=_few_cfgs, shrink=st.floats(0.05, 2.0))
def test_monotone(x, cfg, shrink):
  qp = qparams_from_array(x * F32(shrink), cfg)
  xs = np.sort(x)
  y = np.asarray(_jfq(xs, qp, cfg))
  assert np.all(np.diff(y) >= 0)


@given(
  lo=st.floats(-1e3, 0.0, width=32),
  hi=st.floats(0.0, 1e3, width=32),
  cfg=_all_cfgs,
)
def test_zero_is_exact(lo, hi, cfg):
  qp = qparams_from_range(lo, hi, cfg)
  assert float(_jfq(jnp.zeros((3,)), qp, cfg)[0]) == 0.0


@given(x=hnp.arrays(np.float32, (6, 4), elements=st.floats(-50.0, 50.0, width=32)), cfg=_few_cfgs)
def test_per_channel_is_per_tensor_channel_by_channel(x, cfg):
  pc = cfg.replace(per_channel=True, channel_axis=-1)
  qp = qparams_from_array(x, pc)
  assert qp.scale.shape == (1, 4)
  y = np.asarray(_jfq(x, qp, pc))
  for c in range(4):
    qc = qparams_from_array(x[:, c], cfg)
    np.testing.assert_array_equal(qc.scale.reshape(()), qp.scale[0, c])
    np.testing.assert_array_equal(qc.zero_point.reshape(()), qp.zero_point[0, c])
    np.testing.assert_array_equal(y[:, c], _jfq(x[:, c], qc, cfg))


@given(x=hnp.arrays(np.float32, (8, 3), elements=st.floats(-50.0, 50.0, width=32)), cfg=_few_cfgs)
def test_per_group_is_per_tensor_block_by_block(x, cfg):
  pg = cfg.replace(group_size=2, group_axis=0)
  qp = qparams_from_array(x, pg)
  assert qp.scale.shape == (4, 1)
  y = np.asarray(_jfq(x, qp, pg))
  for g in range(4):
    block = x[2 * g : 2 * g + 2]
    qb = qparams_from_array(block, cfg)
    np.testing.assert_array_equal(qb.scale.reshape(()), qp.scale[g, 0])
    np.testing.assert_array_equal(y[2 * g : 2 * g + 2], _jfq(block, qb, cfg))


# --- clipped STE gradients -----------------------------------------------------------------------------------------


def _grid_position(v, z, cfg):
  """Where v = x/s lands before clipping: round_half_even(v) + z, or v rounded to fp8 (NaN past the format)."""
  if cfg.bits.is_float:
    with np.errstate(invalid="ignore", over="ignore"):
      return np.asarray(v, F32).astype(cfg.bits.float_dtype).astype(F32)
  return np.round(v) + z


def _ste_mask(x, scale, zp, cfg):
  """The in-range mask of the clipped STE, from the definition: qmin <= round(x/s) + z <= qmax."""
  v = np.asarray(x, F32) * (F32(1) / np.asarray(scale, F32))
  pos = _grid_position(v, np.asarray(zp, F32), cfg)
  return ((pos >= cfg.qmin) & (pos <= cfg.qmax)).astype(F32)


def test_ste_boundaries_hand_values():
  # Scale 1/16 (exact). int8: the gradient passes where round_half_even(x/s) lies in [-128, 127]:
  # 127.4 and 127 in, 127.5 (rounds to 128) out; -128.5 (rounds to -128) in, -128.6 out.
  cfg = QatConfig()
  x = jnp.array([127, 127.4, 127.5, -128, -128.5, -128.6, 0, 3.3], jnp.float32) / 16
  g = jax.grad(lambda x: fake_quant(x, qp_of(1 / 16), cfg).sum())(x)
  assert g.tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
  # Asymmetric, zero point -64: round(x/s) - 64 in [-128, 127] <=> round(x/s) in [-64, 191].
  cfg = QatConfig(symmetric=False)
  x = jnp.array([191, 191.5, -64, -64.5, -64.6], jnp.float32) / 16
  g = jax.grad(lambda x: fake_quant(x, qp_of(1 / 16, -64.0), cfg).sum())(x)
  assert g.tolist() == [1, 0, 1, 1, 0]
  # Narrow range drops -128.
  cfg = QatConfig(narrow_range=True)
  x = jnp.array([-127, -127.5, -128], jnp.float32) / 16
  assert jax.grad(lambda x: fake_quant(x, qp_of(1 / 16), cfg).sum())(x).tolist() == [1, 0, 0]
  # fp8 e4m3 (scale 1): 464 rounds to 448 (in), 465 would round past it (out).
  cfg = QatConfig(bits="fp8_e4m3")
  x = jnp.array([448.0, 464.0, 465.0, -464.0, -470.0])
  assert jax.grad(lambda x: fake_quant(x, qp_of(1.0), cfg).sum())(x).tolist() == [1, 1, 0, 1, 0]


def test_ste_keeps_the_gradient_of_the_largest_element():
  # With a tensor's own range, its largest element sits at x/s = qmax up to one
  # float rounding (here above it); it must not lose its gradient.
  cfg = QatConfig(per_channel=True)
  w = jax.random.normal(jax.random.key(3), (64, 32))
  g = jax.grad(lambda w: fake_quant(w, qparams_from_array(w, cfg), cfg).sum())(w)
  np.testing.assert_array_equal(g, np.ones_like(g))


@pytest.mark.parametrize("gran", ["tensor", "channel", "channel_group"])
@pytest.mark.parametrize(("bits", "sym"), [("int8", True), ("int4", False), ("int2", True), ("fp8_e4m3", True)])
def test_ste_gradient_matches_mask_under_jit(ref, bits, sym, gran):
  x, cfg, qp = _random_case(bits, sym, False, gran)
  w = np.random.default_rng(2).normal(size=x.shape).astype(F32)
  gx, gs, gz = jax.jit(jax.grad(lambda x, s, z: jnp.sum(w * fake_quant(x, QParams(s, z), cfg)), argnums=(0, 1, 2)))(
    x, qp.scale, qp.zero_point
  )
  _, index = ref.param_index(x.shape, **GRANULARITIES[gran])
  mask = _ste_mask(x, ref.full_rank(qp.scale, x.ndim)[index], ref.full_rank(qp.zero_point, x.ndim)[index], cfg)
  assert 0 < mask.mean() < 1
  np.testing.assert_array_equal(gx, w * mask)
  # The STE gives scale and zero point no gradient.
  np.testing.assert_array_equal(gs, np.zeros_like(qp.scale))
  np.testing.assert_array_equal(gz, np.zeros_like(qp.zero_point))


def test_ste_gradient_under_vmap():
  cfg = QatConfig(bits="int4")
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 7)) * 4, jnp.float32)
  scales = jnp.array([0.3, 0.5, 0.7, 1.0, 2.0], jnp.float32)  # a different scale per row

  def row_grad(xr, s):
    return jax.grad(lambda xr: fake_quant(xr, qp_of(s), cfg).sum())(xr)

  g = jax.jit(jax.vmap(row_grad))(x, scales)
  expected = np.stack([_ste_mask(x[i], scales[i], 0.0, cfg) for i in range(5)])
  assert 0 < expected.mean() < 1
  np.testing.assert_array_equal(g, expected)


def test_ste_gradient_under_scan():
  cfg = QatConfig(symmetric=False)
  xs = jnp.asarray(np.random.default_rng(4).normal(size=(6, 10)) * 2, jnp.float32)
  qp = qparams_from_range(-1.0, 3.0, cfg)

  def loss(xs):
    def body(carry, x):
      return carry + jnp.sum(fake_quant(x, qp, cfg) * x), None

    return jax.lax.scan(body, jnp.float32(0), xs)[0]

  g = jax.jit(jax.grad(loss))(xs)
  # d/dx sum(fq(x) * x) = fq'(x) * x + fq(x), fq' the STE mask.
  mask = _ste_mask(xs, qp.scale, qp.zero_point, cfg)
  expected = mask * np.asarray(xs) + np.asarray(fake_quant(xs, qp, cfg))
  assert 0 < mask.mean() < 1
  np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-7)  # float32 sums in a different order


def test_ste_gradient_dtype_follows_input():
  cfg = QatConfig()
  for dt in (jnp.bfloat16, jnp.float16):
    x = jnp.array([0.5, 100.0], dt)
    g = jax.grad(lambda x: fake_quant(x, qp_of(0.01), cfg).astype(jnp.float32).sum())(x)
    assert g.dtype == dt
    assert g.tolist() == [1.0, 0.0]


# --- LSQ gradients -------------------------------------------------------------------------------------------------


def _lsq_reference(x, g, scale, zp, cfg, index, pshape, grad_scale):
  """LSQ (Esser et al. 2020, eq. 3) in the zero-point form of PyTorch's learnable fake quant, written in NumPy.

  With u = x/s + z: dx = g where qmin <= round(x/s) + z <= qmax; ds = sum g * (round(x/s) - x/s) inside,
  (qmin - z) below, (qmax - z) above; dz = sum g * (-s) outside, 0 inside. ds and dz are scaled by grad_scale.
  """
  full = tuple(int(i.max()) + 1 for i in index)  # pshape with the per-tensor () as (1, ..., 1)
  s = np.asarray(scale, F32).reshape(full)[index]
  z = np.round(np.asarray(zp, F32).reshape(full)[index]) if not cfg.symmetric else np.zeros_like(s)
  v = x * (F32(1) / s)
  u = v + z
  pos = _grid_position(v, z, cfg)
  inside = (pos >= cfg.qmin) & (pos <= cfg.qmax)
  below = u < cfg.qmin
  if cfg.bits.is_float:
    r = np.clip(v, -cfg.qmax, cfg.qmax).astype(cfg.bits.float_dtype).astype(F32)
  else:
    r = np.round(v)
  ds_el = np.where(inside, r - v, np.where(below, cfg.qmin - z, cfg.qmax - z))
  dz_el = np.where(inside, 0.0, -s)
  ds = np.zeros(full, np.float64)
  dz = np.zeros(full, np.float64)
  np.add.at(ds, index, g * ds_el)
  np.add.at(dz, index, g * dz_el)
  dx = np.where(inside, g, 0)
  ds, dz = ds.reshape(pshape), dz.reshape(pshape)
  return dx, ds * grad_scale, (np.zeros(pshape) if cfg.symmetric else dz * grad_scale)


def _lsq_grads(x, qp, cfg, w, grad_scale=None):
  def loss(x, s, z):
    return jnp.sum(w * fake_quant(x, QParams(s, z), cfg, grad_scale=grad_scale))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, qp.scale, qp.zero_point)


def test_lsq_oracles():
  # v/s = 2.3 -> round(2.3) - 2.3 = -0.3; v/s = 200 with Q_P = 127 -> 127; v/s = -200 with Q_N = 128 -> -128.
  cfg = QatConfig(estimator="lsq")
  for v, ds in [(2.3, -0.3), (200.0, 127.0), (-200.0, -128.0), (2.5, -0.5), (3.5, 0.5)]:
    g = jax.grad(lambda s, v=v: fake_quant(jnp.float32(v), QParams(s, jnp.float32(0)), cfg, grad_scale=1.0))(
      jnp.float32(1.0)
    )
    assert float(g) == pytest.approx(ds, abs=1e-6)


def test_lsq_oracles_asymmetric():
  # z = -64, s = 1: u = v - 64. Above (v = 300): ds = qmax - z = 191, dz = -s = -1. Below (v = -70): ds = qmin - z
  # = -64, dz = -1. Inside (v = 10.25): ds = round(10.25) - 10.25 = -0.25, dz = 0.
  cfg = QatConfig(estimator="lsq", symmetric=False)
  for v, ds, dz in [(300.0, 191.0, -1.0), (-70.0, -64.0, -1.0), (10.25, -0.25, 0.0)]:
    g = jax.grad(lambda s, z, v=v: fake_quant(jnp.float32(v), QParams(s, z), cfg, grad_scale=1.0), argnums=(0, 1))(
      jnp.float32(1.0), jnp.float32(-64.0)
    )
    assert (float(g[0]), float(g[1])) == (ds, dz)


def test_lsq_grad_scale_oracle():
  assert lsq_grad_scale(1000, 1, QatConfig(bits="int4")) == pytest.approx(0.0119523, abs=5e-8)
  assert lsq_grad_scale(1000, 1, QatConfig(bits="int4")) == pytest.approx(1 / np.sqrt(7000), rel=1e-12)
  # Elements per scale: 1000 elements and 10 scales share like 100 elements and 1 scale.
  assert lsq_grad_scale(1000, 10, QatConfig()) == pytest.approx(1 / np.sqrt(100 * 127), rel=1e-12)


@pytest.mark.parametrize("gran", ["tensor", "channel_axis0", "channel_group"])
@pytest.mark.parametrize(("bits", "sym"), [("int8", True), ("int4", False), ("fp8_e4m3", True)])
def test_lsq_gradients_match_reference(ref, bits, sym, gran):
  x, cfg, qp = _random_case(bits, sym, False, gran)
  cfg = cfg.replace(estimator="lsq")
  # A zero point that is not an integer: the forward and the backward use round(z).
  qp = QParams(qp.scale, qp.zero_point + (0.3 if not sym else 0.0))
  w = np.random.default_rng(5).normal(size=x.shape).astype(F32)
  pshape, index = ref.param_index(x.shape, **GRANULARITIES[gran])
  gx, gs, gz = _lsq_grads(x, qp, cfg, w)
  # The default grad scale: 1 / sqrt(N * Q_P), N the elements per scale.
  n_per_scale = x.size // int(np.prod(pshape))
  gscale = 1 / np.sqrt(n_per_scale * cfg.qmax)
  dx, ds, dz = _lsq_reference(x, w, qp.scale, qp.zero_point, cfg, index, pshape, gscale)
  assert gs.shape == gz.shape == pshape
  np.testing.assert_array_equal(gx, dx)
  # Per-scale sums of float32 products, reduced in a different order than NumPy's float64: relative 1e-5.
  np.testing.assert_allclose(gs, ds, rtol=1e-5, atol=1e-6 * np.abs(ds).max())
  np.testing.assert_allclose(gz, dz, rtol=1e-5, atol=1e-6 * max(np.abs(dz).max(), 1e-30))
  if not sym:
    assert np.any(gz != 0)


def test_lsq_explicit_grad_scale():
  cfg = QatConfig(estimator="lsq", per_channel=True)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(50, 3)), jnp.float32)
  qp = qparams_from_array(x * 0.7, cfg)
  w = jnp.ones_like(x)
  g_default = _lsq_grads(x, qp, cfg, w)[1]
  g_one = _lsq_grads(x, qp, cfg, w, grad_scale=1.0)[1]
  # The default for per-channel scales counts the 50 elements of each channel.
  np.testing.assert_allclose(g_default, g_one / np.sqrt(50 * 127), rtol=1e-6)


def test_lsq_forward_equals_ste_forward():
  x, cfg, qp = _random_case("int4", False, False, "channel")
  np.testing.assert_array_equal(fake_quant(x, qp, cfg.replace(estimator="lsq")), fake_quant(x, qp, cfg))


def test_lsq_scale_trains_towards_lower_error():
  # One LSQ step on the scale with the squared error as loss reduces the error (sanity of the sign).
  cfg = QatConfig(bits="int4", estimator="lsq")
  x = jnp.asarray(np.random.default_rng(7).normal(size=(4096,)), jnp.float32)

  def loss(s):
    return jnp.mean((fake_quant(x, QParams(s, jnp.float32(0)), cfg, grad_scale=1.0) - x) ** 2)

  s = jnp.float32(0.05)  # far too small: most values clip
  g = jax.grad(loss)(s)
  assert float(g) < 0
  assert float(loss(s - 0.01 * g)) < float(loss(s))


# --- dtypes and compilation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("bits", "dtype"),
  [("int4", jnp.float32), ("int4", jnp.bfloat16), ("int4", jnp.float16), ("fp8_e4m3", jnp.bfloat16)],
)
def test_dtype_and_shape_preserved(dtype, bits):
  cfg = QatConfig(bits=bits, per_channel=bits != "fp8_e4m3")
  x32 = jnp.asarray(np.random.default_rng(8).normal(size=(5, 3)), jnp.float32)
  x = x32.astype(dtype)
  qp = qparams_from_array(x, cfg)
  y = jax.jit(fake_quant, static_argnums=2)(x, qp, cfg)
  assert y.dtype == dtype and y.shape == x.shape
  # Quantized in float32, rounded once to the input dtype at the end.
  expected = fake_quant(x.astype(jnp.float32), qp, cfg).astype(dtype)
  np.testing.assert_array_equal(np.asarray(y, F32), np.asarray(expected, F32))


def test_float64_preserved(ref):
  with jax.enable_x64(True):
    cfg = QatConfig(symmetric=False, per_channel=True)
    x = np.random.default_rng(9).normal(size=(6, 4))
    qp = qparams_from_array(jnp.asarray(x), cfg)
    assert qp.scale.dtype == jnp.float64
    y = jax.jit(fake_quant, static_argnums=2)(jnp.asarray(x), qp, cfg)
    assert y.dtype == jnp.float64
    expected = ref.fake_quant(x, np.asarray(qp.scale), np.asarray(qp.zero_point), "int8", per_channel=True)
    np.testing.assert_array_equal(y, expected)
    gx = jax.grad(lambda x: fake_quant(x, qp, cfg).sum())(jnp.asarray(x) * 1.5)
    assert gx.dtype == jnp.float64


def test_second_call_does_not_recompile():
  traces = []
  cfg = QatConfig(bits="int4", per_channel=True)

  def f(x, qp):
    traces.append(1)
    return fake_quant(x, qp, cfg)

  fj = jax.jit(f)
  rng = np.random.default_rng(10)
  for _ in range(3):
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    fj(x, qparams_from_array(x, cfg)).block_until_ready()
  assert len(traces) == 1
  assert fj._cache_size() == 1
  # The same holds for the gradient.
  gj = jax.jit(jax.grad(lambda x, qp: fake_quant(x, qp, cfg.replace(estimator="lsq")).sum(), argnums=(0, 1)))
  for _ in range(2):
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    gj(x, qparams_from_array(x, cfg))
  assert gj._cache_size() == 1

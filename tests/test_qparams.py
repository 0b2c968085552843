"""Tests for jqat._src.qparams: scale and zero point for every format and granularity."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jqat
from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.qparams import MIN_SCALE, array_range, params_shape, qparams_from_array, qparams_from_range

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


def _modes():
  for bits, sym, narrow in itertools.product(INT_BITS + FP8_BITS, (True, False), (False, True)):
    if bits in FP8_BITS and (not sym or narrow):
      continue
    yield bits, sym, narrow


MODES = list(_modes())


def div(a, b):
  """a / b as the library evaluates it: a * (1 / b), in float32."""
  return F32(a) * F32(1.0 / b)


# --- hand-computed oracles -----------------------------------------------------------------------------------------


def test_asymmetric_int8_oracle():
  # ALGORITHMS.md §3: min=-1, max=3 gives scale 4/255 and zero point 64 in unsigned [0, 255], i.e. -64 in [-128, 127].
  qp = qparams_from_range(-1.0, 3.0, QatConfig(symmetric=False))
  assert float(qp.scale) == div(4.0, 255.0)
  assert float(qp.scale) == pytest.approx(0.0156863, abs=5e-8)
  assert float(qp.zero_point) == -64.0
  assert float(qp.zero_point) - (-128) == 64.0  # the unsigned convention


def test_symmetric_int8_oracle():
  qp = qparams_from_range(-1.0, 2.0, QatConfig())
  assert float(qp.scale) == div(2.0, 127.0)
  assert float(qp.zero_point) == 0.0


def test_symmetric_narrow_range_keeps_scale():
  # amax maps to qmax in both cases; narrow range only drops -128.
  full = qparams_from_range(-3.0, 1.0, QatConfig())
  narrow = qparams_from_range(-3.0, 1.0, QatConfig(narrow_range=True))
  assert float(full.scale) == float(narrow.scale) == div(3.0, 127.0)


@pytest.mark.parametrize(
  ("bits", "narrow", "levels", "zp"),
  [
    # (max - min) / (qmax - qmin); zp = qmin - round(min / scale)
    ("int8", False, 255, -128 + 64),
    ("int8", True, 254, -127 + 64),  # -1 / (4/254) = -63.5 rounds to -64 (half to even)
    ("int4", False, 15, -8 + 4),  # -1 / (4/15) = -3.75 -> -4
    ("int4", True, 14, -7 + 3),  # -1 / float32(4/14) = -3.4999998 -> -3
    ("int2", False, 3, -2 + 1),  # -0.75 -> -1
    ("int3", False, 7, -4 + 2),  # -1.75 -> -2
  ],
)
def test_asymmetric_oracles(bits, narrow, levels, zp):
  qp = qparams_from_range(-1.0, 3.0, QatConfig(bits=bits, symmetric=False, narrow_range=narrow))
  assert float(qp.scale) == div(4.0, levels)
  assert float(qp.zero_point) == zp


@pytest.mark.parametrize(("lo", "zp"), [(-2.5 / 16, -128 + 2), (-3.5 / 16, -128 + 4), (-0.5 / 16, -128 + 0)])
def test_asymmetric_zero_point_rounds_half_to_even(lo, zp):
  # max - min = 255/16 makes the scale exactly 1/16, so min / scale is exactly -2.5, -3.5 or -0.5: half to even
  # gives -2, -4 and 0 (half away from zero would give -3, -4 and -1).
  qp = qparams_from_range(lo, lo + 255 / 16, QatConfig(symmetric=False))
  assert float(qp.scale) == 1 / 16
  assert float(qp.zero_point) == zp


@pytest.mark.parametrize(
  ("bits", "qmax"), [("int8", 127), ("int4", 7), ("int2", 1), ("int3", 3), ("int5", 15), ("int6", 31), ("int7", 63)]
)
def test_symmetric_scale_per_format(bits, qmax):
  qp = qparams_from_range(-0.5, 7.0, QatConfig(bits=bits))
  assert float(qp.scale) == div(7.0, qmax)


@pytest.mark.parametrize(("bits", "fmax"), [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_scale_maps_amax_to_format_max(bits, fmax):
  cfg = QatConfig(bits=bits)
  assert float(qparams_from_range(-fmax, 1.0, cfg).scale) == 1.0
  assert float(qparams_from_range(-1.0, 2 * fmax, cfg).scale) == 2.0
  assert float(qparams_from_range(-3.0, 1.0, cfg).scale) == div(3.0, fmax)
  assert float(qparams_from_range(-3.0, 1.0, cfg).zero_point) == 0.0


@pytest.mark.parametrize(
  ("lo", "hi", "sym", "scale", "zp"),
  [
    # The range is widened to include 0 first.
    (1.0, 3.0, False, div(3.0, 255.0), -128.0),
    (-3.0, -1.0, False, div(3.0, 255.0), 127.0),
    (1.0, 3.0, True, div(3.0, 127.0), 0.0),
    (-3.0, -1.0, True, div(3.0, 127.0), 0.0),
  ],
)
def test_range_widened_to_include_zero(lo, hi, sym, scale, zp):
  qp = qparams_from_range(lo, hi, QatConfig(symmetric=sym))
  assert float(qp.scale) == scale
  assert float(qp.zero_point) == zp


@pytest.mark.parametrize(("bits", "sym", "narrow"), MODES)
def test_degenerate_range_gives_min_scale(bits, sym, narrow):
  cfg = QatConfig(bits=bits, symmetric=sym, narrow_range=narrow)
  qp = qparams_from_range(jnp.zeros(3), jnp.zeros(3), cfg)
  np.testing.assert_array_equal(qp.scale, np.full(3, MIN_SCALE, F32))
  assert np.all((qp.zero_point >= cfg.qmin) & (qp.zero_point <= cfg.qmax))
  # Zero stays exact with the tiny scale.
  assert float(jqat.fake_quant(jnp.zeros(()), qparams_lib.QParams(qp.scale[0], qp.zero_point[0]), cfg)) == 0.0


def test_min_scale_is_the_smallest_normal_float32():
  # The scale of a degenerate range only; 1 / MIN_SCALE is finite.
  assert MIN_SCALE == float(np.finfo(np.float32).tiny) == 2.0**-126
  assert np.isfinite(np.float32(1) / np.float32(MIN_SCALE))


def test_tiny_range_keeps_its_exact_scale():
  # The floor was float32 eps (2^-23): this range got 2^-23 and lost every level.
  qp = qparams_from_range(-1e-30, 1e-30, QatConfig())
  assert float(qp.scale) == F32(1e-30) * F32(1.0 / 127)


def test_scalar_bound_with_an_array_bound():
  qp = qparams_from_range(-1.0, jnp.array([1.0, 4.0, 0.5]), QatConfig())
  assert qp.scale.shape == qp.zero_point.shape == (3,)
  np.testing.assert_array_equal(qp.scale, np.maximum(F32(1.0), np.array([1.0, 4.0, 0.5], F32)) * F32(1.0 / 127))


def test_output_dtypes():
  qp = qparams_from_range(jnp.bfloat16(-1.0), jnp.float16(2.0), QatConfig(symmetric=False))
  assert qp.scale.dtype == qp.zero_point.dtype == jnp.float32
  with jax.enable_x64(True):
    qp = qparams_from_range(np.float64(-1.0), np.float64(3.0), QatConfig(symmetric=False))
    assert qp.scale.dtype == jnp.float64
    assert float(qp.scale) == 4.0 / 255.0


def test_jit_matches_eager():
  cfg = QatConfig(bits="int4", symmetric=False)
  lo, hi = jnp.array([-1.0, -0.2, 0.3]), jnp.array([3.0, 0.1, 0.9])
  eager = qparams_from_range(lo, hi, cfg)
  jitted = jax.jit(qparams_from_range, static_argnums=2)(lo, hi, cfg)
  np.testing.assert_array_equal(eager.scale, jitted.scale)
  np.testing.assert_array_equal(eager.zero_point, jitted.zero_point)


# --- parameter layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("shape", "kwargs", "expected"),
  [
    ((4, 6), dict(), ()),  # per tensor: a scalar, from every entry point
    ((4, 6), dict(per_channel=True), (1, 6)),
    ((4, 6), dict(per_channel=True, channel_axis=0), (4, 1)),
    ((4, 6), dict(per_channel=True, channel_axis=-2), (4, 1)),
    ((2, 3, 4), dict(per_channel=True, channel_axis=(0, 2)), (2, 1, 4)),
    ((8, 6), dict(group_size=2), (4, 1)),
    ((8, 6), dict(group_size=8), (1, 1)),
    ((8, 6), dict(group_size=3, group_axis=1), (1, 2)),
    ((8, 6), dict(per_channel=True, group_size=4), (2, 6)),
    ((3, 3, 8, 16), dict(per_channel=True, group_size=4, group_axis=2), (1, 1, 2, 16)),
    ((5,), dict(), ()),
    ((), dict(), ()),
  ],
)
def test_params_shape(shape, kwargs, expected):
  assert params_shape(shape, QatConfig(**kwargs)) == expected


@pytest.mark.parametrize(
  ("shape", "kwargs", "expected"),
  [
    ((2, 3, 4), dict(per_channel=True, channel_axis=(0, 2)), (2, 1, 4)),
    ((8, 6), dict(per_channel=True, group_size=4), (2, 6)),
    ((), dict(), ()),
  ],
)
def test_qparams_have_params_shape(shape, kwargs, expected):
  qp = qparams_from_array(jnp.ones(shape), QatConfig(**kwargs))
  assert qp.scale.shape == qp.zero_point.shape == expected


@pytest.mark.parametrize(
  ("shape", "kwargs", "text"),
  [
    ((8, 6), dict(group_size=3), "group_size=3"),
    ((8, 6), dict(group_size=4, group_axis=1), "group_size=4"),
    ((8, 6), dict(per_channel=True, channel_axis=2), "channel_axis=2"),
    ((8, 6), dict(per_channel=True, channel_axis=-3), "channel_axis=-3"),
    ((8, 6), dict(per_channel=True, channel_axis=(0, 5)), "channel_axis=5"),
    ((8, 6), dict(group_size=2, group_axis=2), "group_axis=2"),
    ((), dict(per_channel=True), "channel_axis=-1"),
    # Same axis only after normalization: the config cannot see it, the shape can.
    ((8, 6), dict(per_channel=True, channel_axis=-2, group_size=2, group_axis=0), "group_axis=0"),
  ],
)
def test_bad_shapes_name_the_shape(shape, kwargs, text):
  cfg = QatConfig(**kwargs)
  x = jnp.ones(shape)
  for fn in (lambda: params_shape(shape, cfg), lambda: array_range(x, cfg), lambda: jqat.fake_quant(x, qp0, cfg)):
    with pytest.raises(ValueError) as info:
      fn()
    assert text in str(info.value)
    assert str(tuple(shape)) in str(info.value)


qp0 = qparams_lib.QParams(jnp.float32(1.0), jnp.float32(0.0))


# --- random data against the NumPy reference -----------------------------------------------------------------------


@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
def test_array_range_matches_reference(ref, gran):
  kw = GRANULARITIES[gran]
  x = np.random.default_rng(1).normal(size=(8, 6, 4)).astype(F32)
  lo, hi = array_range(x, QatConfig(**kw))
  rlo, rhi = ref.array_range(x, **kw)
  np.testing.assert_array_equal(lo, rlo)
  np.testing.assert_array_equal(hi, rhi)


# test_fake_quant.py compares the parameters of every mode and granularity with the reference too.
@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
@pytest.mark.parametrize(
  ("bits", "sym", "narrow"),
  [("int8", False, False), ("int4", True, True), ("int3", False, True), ("fp8_e5m2", True, False)],
)
def test_qparams_from_array_matches_reference(ref, bits, sym, narrow, gran):
  kw = GRANULARITIES[gran]
  rng = np.random.default_rng(zlib.crc32(f"{bits}{sym}{narrow}{gran}".encode()))
  # Shifted so that asymmetric ranges are really asymmetric, and some blocks are all-positive.
  x = (rng.normal(size=(8, 6, 4)) * rng.uniform(0.1, 5.0) + rng.uniform(-1.0, 2.0)).astype(F32)
  cfg = QatConfig(bits=bits, symmetric=sym, narrow_range=narrow, **kw)
  # Under jit for a few modes (each config compiles once, which would make the whole matrix slow), eager otherwise.
  jit_modes = {("int8", False, False), ("int4", True, True), ("fp8_e5m2", True, False)}
  fn = jax.jit(qparams_from_array, static_argnums=1) if (bits, sym, narrow) in jit_modes else qparams_from_array
  qp = fn(x, cfg)
  rlo, rhi = ref.array_range(x, **kw)
  rs, rz = ref.qparams(rlo, rhi, bits, sym, narrow)
  # Same float32 operations in the same order: exact.
  np.testing.assert_array_equal(qp.scale, rs)
  np.testing.assert_array_equal(qp.zero_point, rz)


@given(
  lo=st.floats(-1e4, 0.0, width=32),
  hi=st.floats(0.0, 1e4, width=32),
  bits=st.sampled_from(INT_BITS),
  narrow=st.booleans(),
)
def test_zero_point_is_integer_in_range_and_zero_exact(lo, hi, bits, narrow):
  cfg = QatConfig(bits=bits, symmetric=False, narrow_range=narrow)
  qp = qparams_from_range(lo, hi, cfg)
  z = float(qp.zero_point)
  assert z == round(z) and cfg.qmin <= z <= cfg.qmax
  assert float(qp.scale) > 0 and np.isfinite(float(qp.scale))
  # The grid covers [lo, hi] to within half a step at each end.
  s = float(qp.scale)
  assert (cfg.qmin - z) * s <= lo + s / 2 * (1 + 1e-5)
  assert (cfg.qmax - z) * s >= hi - s / 2 * (1 + 1e-5)


def test_divide_exact_is_the_correctly_rounded_quotient():
  """Oracle: NumPy's float32 division (IEEE); the plain a * (1 / 127) differs for some values."""
  rng = np.random.default_rng(0)
  a = np.abs(rng.standard_normal(20000)).astype(np.float32) * rng.choice([1e-30, 1e-6, 1e-2, 1.0, 1e4, 1e30], 20000)
  a = np.concatenate([a.astype(np.float32), np.float32([0, 127, 127 * 2.0**-126, np.finfo(np.float32).max])])
  for n in (127, 7, 15):
    want = a / np.float32(n)
    assert (a * (np.float32(1) / np.float32(n)) != want).any() or n == 7
    for got in (qparams_lib.divide_exact(jnp.asarray(a), n), jax.jit(qparams_lib.divide_exact, static_argnums=1)(a, n)):
      np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))


def test_amax_exact_scale_rule():
  cfg = QatConfig(per_channel=True, narrow_range=True, scale_rule="amax_exact")
  x = np.random.default_rng(1).standard_normal((5, 300)).astype(np.float32)
  want = np.maximum(np.abs(x).max(0, keepdims=True) / np.float32(127), MIN_SCALE)
  np.testing.assert_array_equal(qparams_from_array(x, cfg).scale, want)
  np.testing.assert_array_equal(jax.jit(lambda x: qparams_from_array(x, cfg).scale)(x), want)
  assert float(qparams_from_range(0.0, 0.0, cfg).scale) == MIN_SCALE


def test_signed_max_scale_rule():
  """scale = m / qmin with m the first value of largest magnitude (NumPy's argmax), non-finite values skipped."""
  cfg = QatConfig(bits="int4", per_channel=True, group_size=4, scale_rule="signed_max")
  x = jnp.array(
    [
      [3.0, -1.0, 0.0, jnp.nan],
      [-3.0, 2.0, 0.0, 1.0],
      [1.0, -2.0, 0.0, 5.0],
      [0.5, 2.0, 0.0, jnp.inf],
    ]
  )
  m, scale = jax.jit(lambda x: (qparams_lib.signed_max(x, cfg), qparams_from_array(x, cfg).scale))(x)
  np.testing.assert_array_equal(m, [[3.0, 2.0, 0.0, 5.0]])
  np.testing.assert_array_equal(scale, [[-0.375, -0.25, -MIN_SCALE, -0.625]])  # +0 / -8 is -0: the sign kept
  np.testing.assert_array_equal(qparams_from_array(-jnp.zeros((4, 1)), cfg).scale, [[MIN_SCALE]])
  # From a range alone the positive end wins a tie.
  np.testing.assert_array_equal(
    qparams_from_range(jnp.array([-2.0, -3.0]), jnp.array([2.0, 1.0]), cfg).scale, [-0.25, 0.375]
  )

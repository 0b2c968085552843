"""Tests for jqat._src.qtensor: QTensor as a PyTree, storage dtypes, sub-byte packing, quantize / dequantize."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqat._src import qtensor
from jqat._src.config import QatConfig
from jqat._src.fake_quant import fake_quant
from jqat._src.formats import QuantBits
from jqat._src.qparams import QParams, qparams_from_array, qparams_from_range
from jqat._src.qtensor import QTensor, dequantize, pack_int4, quantize, unpack_int4

F32 = np.float32
INT_BITS = ["int2", "int3", "int4", "int5", "int6", "int7", "int8"]
FP8_BITS = ["fp8_e4m3", "fp8_e5m2"]
MODES = [
  (bits, sym, narrow)
  for bits, sym, narrow in itertools.product(INT_BITS + FP8_BITS, (True, False), (False, True))
  if bits in INT_BITS or (sym and not narrow)
]
# Shape (7, 6, 4): an odd length on the packing axis.
GRANULARITIES = {
  "tensor": dict(),
  "channel": dict(per_channel=True),
  "channel_axis0": dict(per_channel=True, channel_axis=0),
  "channel_axes": dict(per_channel=True, channel_axis=(0, 2)),
  "group_axis1": dict(group_size=3, group_axis=1),
  "channel_group": dict(per_channel=True, channel_axis=0, group_size=2, group_axis=2),
}


def _x(key, shape=(7, 6, 4)):
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  return (rng.normal(size=shape) * rng.uniform(0.1, 5.0) + rng.uniform(-1.0, 1.0)).astype(F32)


# --- packing -------------------------------------------------------------------------------------------------------


def test_pack_hand_values():
  # Low nibble first: [1, -1] -> 0x1 | 0xF << 4 = 0xF1; [-8, 7] -> 0x8 | 0x7 << 4 = 0x78.
  packed = pack_int4(jnp.array([1, -1, -8, 7], jnp.int8))
  assert packed.dtype == jnp.uint8
  assert packed.tolist() == [0xF1, 0x78]
  # Odd length: padded with a zero high nibble.
  assert pack_int4(jnp.array([-2, 3, 5], jnp.int8)).tolist() == [0x3E, 0x05]


def test_pack_unpack_all_pairs():
  vals = np.arange(-8, 8, dtype=np.int8)
  pairs = np.array(list(itertools.product(vals, vals)), np.int8).reshape(-1)  # 256 pairs, every byte once
  packed = pack_int4(jnp.asarray(pairs))
  assert sorted(np.asarray(packed).tolist()) == list(range(256))
  np.testing.assert_array_equal(unpack_int4(packed, pairs.size), pairs)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_pack_unpack_lengths(n):
  q = np.random.default_rng(n).integers(-8, 8, size=n).astype(np.int8)
  packed = pack_int4(jnp.asarray(q))
  assert packed.shape == ((n + 1) // 2,)
  out = unpack_int4(packed, n)
  assert out.dtype == jnp.int8
  np.testing.assert_array_equal(out, q)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_unpack_along_axis(axis):
  q = np.random.default_rng(1).integers(-8, 8, size=(5, 3)).astype(np.int8)
  packed = pack_int4(jnp.asarray(q), axis=axis)
  expected_shape = list(q.shape)
  expected_shape[axis] = (expected_shape[axis] + 1) // 2
  assert packed.shape == tuple(expected_shape)
  np.testing.assert_array_equal(unpack_int4(packed, q.shape[axis], axis=axis), q)


def test_pack_scalar():
  packed = pack_int4(jnp.int8(-3))
  assert packed.shape == (1,)
  assert packed.tolist() == [0x0D]
  assert unpack_int4(packed, 1).tolist() == [-3]


@pytest.mark.parametrize(("lo", "hi"), [(-2, 1), (-4, 3)])
def test_pack_small_formats(lo, hi):
  q = np.arange(lo, hi + 1, dtype=np.int8)
  np.testing.assert_array_equal(unpack_int4(pack_int4(jnp.asarray(q)), q.size), q)


def test_pack_under_jit():
  q = jnp.arange(-8, 8, dtype=jnp.int8).reshape(8, 2)
  packed = jax.jit(pack_int4)(q)
  np.testing.assert_array_equal(jax.jit(unpack_int4, static_argnums=1)(packed, 8), q)


# --- storage -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("bits", "dtype", "rows"),
  [
    ("int8", jnp.int8, 7),
    ("int5", jnp.int8, 7),
    ("int4", jnp.uint8, 4),
    ("int3", jnp.uint8, 4),
    ("int2", jnp.uint8, 4),
    ("fp8_e4m3", jnp.float8_e4m3fn, 7),
    ("fp8_e5m2", jnp.float8_e5m2, 7),
  ],
)
def test_values_dtype_and_shape(bits, dtype, rows):
  cfg = QatConfig(bits=bits, per_channel=True)
  x = _x(bits, (7, 3))
  q = quantize(x, qparams_from_array(x, cfg), cfg)
  assert q.values.dtype == jnp.dtype(dtype)
  assert q.values.shape == (rows, 3)  # packed formats: half the rows, rounded up for the odd length
  assert q.shape == (7, 3) and q.ndim == 2
  assert q.scale.shape == q.zero_point.shape == (1, 3)
  assert q.dequant_dtype == jnp.float32 and q.format is QuantBits(bits)
  assert q.int_values().shape == (7, 3)


def test_packed_nbytes():
  cfg = QatConfig(bits="int4", per_channel=True)
  x = _x("nbytes", (1024, 64))
  q = quantize(x, qparams_from_array(x, cfg), cfg)
  # 512 x 64 bytes of values, plus 64 float32 scales and 64 float32 zero points.
  assert q.nbytes == 512 * 64 + 64 * 4 * 2


@pytest.mark.parametrize(("bits", "sym", "narrow"), [m for m in MODES if not m[2] or m[0] in ("int4", "int8")])
def test_int_values_match_reference(ref, bits, sym, narrow):
  cfg = QatConfig(bits=bits, symmetric=sym, narrow_range=narrow, per_channel=True, channel_axis=0)
  x = _x(f"iv{bits}{sym}{narrow}", (7, 5))
  qp = qparams_from_array(x * F32(0.7), cfg)
  q = quantize(x, qp, cfg)
  expected = ref.int_values(x, qp.scale, qp.zero_point, bits, narrow, per_channel=True, channel_axis=0)
  np.testing.assert_array_equal(np.asarray(q.int_values(), F32), expected)
  qmin, qmax = ref.qrange(bits, narrow)
  assert np.any(expected == qmin) or np.any(expected == qmax)  # clipping was exercised


# --- dequantize(quantize(x)) == fake_quant(x) ------------------------------------------------------------------


# Modes that also run under jit; the others run eagerly (compiling each config and granularity is what costs time).
JIT_MODES = {("int4", False, True), ("fp8_e5m2", True, False)}
# The granularities of this test (the full set runs for the modes under jit); the odd packing axis is in each.
EAGER_GRANULARITIES = ("tensor", "channel_axes", "channel_group")


def _both_all_granularities(x, bits, sym, narrow, grans=tuple(GRANULARITIES)):
  out = {}
  for gran in grans:
    kw = GRANULARITIES[gran]
    cfg = QatConfig(bits=bits, symmetric=sym, narrow_range=narrow, **kw)
    qp = qparams_from_array(x * F32(0.8), cfg)
    out[gran] = (dequantize(quantize(x, qp, cfg)), fake_quant(x, qp, cfg))
  return out


@pytest.mark.parametrize(("bits", "sym", "narrow"), MODES)
def test_dequantize_quantize_equals_fake_quant(bits, sym, narrow):
  x = _x(f"{bits}{sym}{narrow}")
  jitted = (bits, sym, narrow) in JIT_MODES
  results = _both_all_granularities(x, bits, sym, narrow, tuple(GRANULARITIES) if jitted else EAGER_GRANULARITIES)
  for gran, (dq, fq) in results.items():
    np.testing.assert_array_equal(dq, fq, err_msg=gran)
    assert np.any(dq != x), gran
  if jitted:
    # Under jit, and across execution modes: the jitted dequantize(quantize(x)) against the eager fake_quant.
    for gran, (dq, fq) in jax.jit(_both_all_granularities, static_argnums=(1, 2, 3))(x, bits, sym, narrow).items():
      np.testing.assert_array_equal(dq, results[gran][1], err_msg=gran)
      np.testing.assert_array_equal(fq, results[gran][1], err_msg=gran)


@pytest.mark.parametrize(("bits", "dtype"), [("int4", jnp.bfloat16), ("fp8_e4m3", jnp.float16), ("int8", jnp.bfloat16)])
def test_dequantize_quantize_equals_fake_quant_eager_low_precision(bits, dtype):
  cfg = QatConfig(bits=bits, per_channel=True)
  x = jnp.asarray(_x(bits, (5, 4)), dtype)
  qp = qparams_from_array(x, cfg)
  q = quantize(x, qp, cfg)
  assert q.dequant_dtype == dtype
  dq = dequantize(q)
  assert dq.dtype == dtype
  np.testing.assert_array_equal(np.asarray(dq, F32), np.asarray(fake_quant(x, qp, cfg), F32))


def test_dequantize_quantize_equals_fake_quant_float64():
  with jax.enable_x64(True):
    cfg = QatConfig(symmetric=False, group_size=2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 3)))
    qp = qparams_from_array(x, cfg)
    dq = dequantize(quantize(x, qp, cfg))
    assert dq.dtype == jnp.float64
    np.testing.assert_array_equal(dq, fake_quant(x, qp, cfg))


def test_scalar_qparams_and_scalar_x():
  cfg = QatConfig(bits="int4")
  qp = QParams(jnp.float32(0.5), jnp.float32(0.0))
  q = quantize(jnp.float32(1.3), qp, cfg)
  assert q.shape == () and q.values.shape == (1,)
  assert q.int_values().shape == ()
  assert float(dequantize(q)) == 1.5 == float(fake_quant(jnp.float32(1.3), qp, cfg))


@pytest.mark.parametrize("kwargs", [dict(symmetric=False, per_channel=True), dict(bits="int4")])
def test_near_ties_eager_and_jit(ref, kwargs):
  # Where x / s and x * (1/s) round differently, quantize / dequantize and fake_quant agree in every mode.
  cfg = QatConfig(**kwargs)
  qp = qparams_from_range(jnp.full((1, 1), -2.9), jnp.full((1, 1), 3.0), cfg)
  x = ref.near_ties(qp.scale[0, 0], k_range=(cfg.qmin - 2, cfg.qmax + 2)).reshape(-1, 1)
  expected = ref.fake_quant(x, qp.scale, qp.zero_point, cfg.bits.value, per_channel=cfg.per_channel)
  np.testing.assert_array_equal(dequantize(quantize(x, qp, cfg)), expected)
  np.testing.assert_array_equal(jax.jit(lambda x, qp: dequantize(quantize(x, qp, cfg)))(x, qp), expected)
  np.testing.assert_array_equal(jax.jit(lambda x: dequantize(quantize(x, qp, cfg)))(x), expected)
  np.testing.assert_array_equal(jax.jit(lambda x, qp: fake_quant(x, qp, cfg))(x, qp), expected)


def test_hand_values():
  cfg = QatConfig(symmetric=False)
  qp = qparams_from_range(-1.0, 3.0, cfg)
  q = quantize(jnp.array([-1.0, 0.0, 1.0, 3.0]), qp, cfg)
  # x / (4/255) - 64, rounded: -128, -64, 0 (63.75 -> 64, minus 64), 127.
  assert q.int_values().tolist() == [-128, -64, 0, 127]
  assert q.zero_point.shape == () and float(q.zero_point) == -64.0  # per tensor: a scalar
  cfg = QatConfig(bits="fp8_e4m3")
  q = quantize(jnp.array([465.0, 1.97, 4.25]), QParams(jnp.float32(1.0), jnp.float32(0.0)), cfg)
  assert np.asarray(q.values, F32).tolist() == [448.0, 2.0, 4.0]


def test_quantize_rejects_int_input():
  with pytest.raises(TypeError, match="int32"):
    quantize(jnp.arange(4), QParams(jnp.float32(1.0), jnp.float32(0.0)), QatConfig())


def test_quantize_rejects_bad_shape():
  with pytest.raises(ValueError, match=r"\(6, 4\)"):
    quantize(jnp.ones((6, 4)), QParams(jnp.float32(1.0), jnp.float32(0.0)), QatConfig(group_size=4))


# --- PyTree --------------------------------------------------------------------------------------------------------


def _example():
  cfg = QatConfig(bits="int4", per_channel=True, symmetric=False)
  x = _x("tree", (5, 3))
  return x, cfg, quantize(x, qparams_from_array(x, cfg), cfg)


def test_pytree_round_trip():
  _, cfg, q = _example()
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 3
  assert leaves[0] is q.values and leaves[1] is q.scale and leaves[2] is q.zero_point
  q2 = jax.tree.unflatten(treedef, leaves)
  assert isinstance(q2, QTensor)
  assert (q2.config, q2.shape, q2.dequant_dtype) == (cfg, (5, 3), jnp.float32)
  np.testing.assert_array_equal(dequantize(q2), dequantize(q))
  # Static fields are part of the tree structure.
  other = quantize(jnp.ones((5, 3)), q.qparams, cfg.replace(bits="int8"))
  assert jax.tree.structure(other) != treedef


def test_pytree_through_jit():
  x, cfg, q = _example()
  q2 = jax.jit(lambda q: q)(q)
  assert isinstance(q2, QTensor) and q2.config == cfg and q2.shape == q.shape
  np.testing.assert_array_equal(q2.values, q.values)
  np.testing.assert_array_equal(jax.jit(dequantize)(q), dequantize(q))
  qj = jax.jit(quantize, static_argnums=2)(x, q.qparams, cfg)
  np.testing.assert_array_equal(qj.values, q.values)
  # tree.map over the children keeps the static fields.
  doubled = jax.tree.map(lambda a: a, q)
  assert doubled.config == q.config


def test_qparams_property():
  _, _, q = _example()
  assert isinstance(q.qparams, QParams)
  np.testing.assert_array_equal(q.qparams.scale, q.scale)
  np.testing.assert_array_equal(q.qparams.zero_point, q.zero_point)


def test_zero_point_of_asymmetric_qparams_under_a_symmetric_config():
  cfg = QatConfig()
  qp = QParams(jnp.float32(1 / 64), jnp.float32(5.0))
  # Known values: an error (it used to be dropped silently).
  with pytest.raises(ValueError, match=r"quantize: zero_point holds nonzero values \(e.g. 5.0\).*symmetric"):
    quantize(jnp.array([1.0, -1.0]), qp, cfg)
  # Under jit the values are not known: the symmetric grid ignores the zero point, as documented.
  q = jax.jit(quantize, static_argnums=2)(jnp.array([1.0, -1.0]), qp, cfg)
  assert float(q.zero_point) == 0.0
  assert q.int_values().tolist() == [64, -64]


@pytest.mark.parametrize(
  "cfg",
  [
    QatConfig(),
    QatConfig(symmetric=False),
    QatConfig(symmetric=False, per_channel=True, channel_axis=0),
    QatConfig(bits="int4", per_channel=True, group_size=4),
  ],
  ids=["sym", "asym", "per_token", "int4_group"],
)
def test_quantize_finite_is_quantize_bit_for_bit_on_finite_data(cfg):
  x = np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)
  qp = qparams_from_array(x, cfg)
  a = jax.jit(lambda x, qp: quantize(x, qp, cfg))(x, qp)
  b = jax.jit(lambda x, qp: qtensor.quantize_finite(x, qp, cfg))(x, qp)
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
  np.testing.assert_array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))

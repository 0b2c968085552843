"""Bad input to the core functions: each gets an error in the function's own words, or a visible result."""

import copy
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat._src import qparams as qparams_lib
from jqat._src.qtensor import QTensor

CFG = jqat.QatConfig()
MATMUL = (((1,), (0,)), ((), ()))


def _qp(scale, zero_point=0.0):
  return jqat.QParams(jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.float32))


# --- ranges ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("lo", "hi", "text"),
  [
    (jnp.nan, 1.0, r"min_val holds 1 non-finite value\(s\) \(e.g. nan\)"),
    (-1.0, jnp.inf, r"max_val holds 1 non-finite value\(s\) \(e.g. inf\)"),
    (jnp.array([-1.0, jnp.nan]), jnp.array([1.0, 1.0]), r"min_val holds 1 non-finite"),
    (1.0, -1.0, r"min_val > max_val \(1.0 > -1.0\)"),
    (jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]), r"min_val > max_val at index \(1,\) \(2.0 > 1.0\)"),
    (jnp.zeros(3), jnp.zeros(4), r"min_val of shape \(3,\) and max_val of shape \(4,\) differ"),
    (jnp.zeros((0,)), jnp.zeros((0,)), r"empty bounds"),
  ],
)
def test_qparams_from_range_refuses_bad_bounds(lo, hi, text):
  with pytest.raises(ValueError, match="qparams_from_range: " + text):
    jqat.qparams_from_range(lo, hi, jqat.QatConfig(symmetric=False))


def test_bad_bounds_under_jit_are_visibly_non_finite_channel_by_channel():
  f = jax.jit(jqat.qparams_from_range, static_argnums=2)
  for sym in (True, False):
    cfg = jqat.QatConfig(symmetric=sym)
    lo = jnp.array([jnp.nan, -1.0, -1.0, 2.0, -1.0])
    hi = jnp.array([1.0, jnp.inf, 1.0, 1.0, 1.0])
    s = np.asarray(f(lo, hi, cfg).scale)
    # NaN bound -> NaN, Inf bound -> non-finite, min > max -> NaN; the other channels untouched.
    assert np.isnan(s[0]) and not np.isfinite(s[1]) and np.isnan(s[3])
    np.testing.assert_array_equal(s[[2, 4]], np.asarray(jqat.qparams_from_range(-1.0, 1.0, cfg).scale))


def test_huge_asymmetric_range_gets_a_finite_scale():
  qp = jqat.qparams_from_range(-3e38, 3e38, jqat.QatConfig(symmetric=False))
  assert np.isfinite(float(qp.scale)) and float(qp.scale) > 0
  np.testing.assert_allclose(float(qp.scale), 6e38 / 255, rtol=1e-6)


def test_qparams_from_array_skips_nan_and_inf():
  x = jnp.array([[1.0, jnp.nan], [-2.0, jnp.inf]])
  qp = jqat.qparams_from_array(x, CFG)
  assert float(qp.scale) == float(jqat.qparams_from_range(-2.0, 1.0, CFG).scale)


# --- scales and parameter shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -0.1, np.nan, np.inf])
@pytest.mark.parametrize("fn", ["fake_quant", "quantize"])
def test_bad_concrete_scale_raises(fn, scale):
  with pytest.raises(ValueError, match=rf"{fn}: scale must be positive and finite, got {scale}"):
    getattr(jqat, fn)(jnp.ones(3), _qp(scale), CFG)


def test_bad_scale_under_jit_is_visibly_nan():
  x = jnp.array([0.5, -1.0, 2.0])
  for s in (0.0, -0.1):
    y = jax.jit(lambda x, s: jqat.fake_quant(x, _qp(s), CFG))(x, s)
    d = jax.jit(lambda x, s: jqat.dequantize(jqat.quantize(x, _qp(s), CFG)))(x, s)
    assert np.isnan(y).all() and np.isnan(d).all()  # a zero scale gave 0 and a negative one saturated


@pytest.mark.parametrize("fn", ["fake_quant", "quantize"])
def test_qparams_for_another_axis_raise_naming_both_shapes(fn):
  cfg = jqat.QatConfig(per_channel=True)  # axis -1 of (4, 8): scales of shape (1, 8)
  qp = _qp(jnp.ones((4, 1)), jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match=rf"{fn}: scale of shape \(4, 1\) does not fit a tensor of shape \(4, 8\).*"
                                       r"expected shape \(1, 8\)"):
    getattr(jqat, fn)(jnp.ones((4, 8)), qp, cfg)
  # A per-tensor config gets one scale, not a column of them.
  with pytest.raises(ValueError, match=r"scale of shape \(4, 1\).*expected shape \(\)"):
    getattr(jqat, fn)(jnp.ones((4, 8)), qp, CFG)


def test_documented_parameter_forms_are_accepted():
  x = jnp.arange(8.0).reshape(2, 4)
  cfg = jqat.QatConfig(per_channel=True)
  full = jqat.qparams_from_array(x, cfg)
  short = _qp(full.scale.reshape(4), 0.0)  # leading size-1 axes left out, one zero point
  np.testing.assert_array_equal(jqat.fake_quant(x, short, cfg), jqat.fake_quant(x, full, cfg))
  for s in (0.1, [0.1], [[0.1]]):  # a per-tensor scale: any size-1 array
    assert jqat.quantize(x, _qp(s), CFG).scale.shape == ()


@pytest.mark.parametrize("fn", ["fake_quant", "quantize"])
def test_asymmetric_qparams_under_a_symmetric_config_raise(fn):
  qp = jqat.qparams_from_range(-1.0, 3.0, jqat.QatConfig(symmetric=False))
  with pytest.raises(ValueError, match=rf"{fn}: zero_point holds nonzero values \(e.g. -64.0\).*symmetric"):
    getattr(jqat, fn)(jnp.ones(3), qp, CFG)


def test_qat_dot_general_checks_both_parameter_shapes():
  x, w = jnp.ones((3, 4)), jnp.ones((4, 5))
  wcfg = jqat.QatConfig(per_channel=True)
  with pytest.raises(ValueError, match=r"qat_dot_general \(rhs\): scale of shape \(4, 1\) does not fit a tensor of "
                                       r"shape \(4, 5\).*expected shape \(1, 5\)"):
    jqat.qat_dot_general(x, w, MATMUL, _qp(0.1), _qp(jnp.ones((4, 1)), jnp.zeros((4, 1))), lhs_config=CFG,
                         rhs_config=wcfg)
  with pytest.raises(ValueError, match=r"qat_dot_general: the operands do not fit: lhs of shape \(3, 4\) axis 1"):
    jqat.qat_dot_general(x, jnp.ones((5, 5)), MATMUL, _qp(0.1), _qp(0.1), lhs_config=CFG, rhs_config=CFG)


def test_a_tuple_is_not_qparams():
  for call in (lambda: jqat.fake_quant(jnp.ones(3), (0.1, 0.0), CFG), lambda: jqat.quantize(jnp.ones(3), (0.1, 0.0),
                                                                                             CFG)):
    with pytest.raises(TypeError, match=r"qparams must be a jqat.QParams .*got tuple"):
      call()


def test_a_string_is_not_a_config():
  with pytest.raises(TypeError, match=r"fake_quant: config must be a jqat.QatConfig, got str 'int4'"):
    jqat.fake_quant(jnp.ones(3), _qp(0.1), "int4")
  with pytest.raises(TypeError, match=r"qparams_from_range: config must be a jqat.QatConfig"):
    jqat.qparams_from_range(-1.0, 1.0, "int8")


def test_empty_array_range_raises():
  with pytest.raises(ValueError, match=r"array_range: x of shape \(0, 3\) is empty"):
    jqat.qparams_from_array(jnp.zeros((0, 3)), CFG)


# --- QTensor ----------------------------------------------------------------------------------------------------


def _q(bits="int8", shape=(5, 3), **kw):
  cfg = jqat.QatConfig(bits=bits, **kw)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  return jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)


def test_qtensor_checks_itself_at_construction():
  q = _q("int4", per_channel=True)
  with pytest.raises(ValueError, match=r"QTensor: values of dtype int8 do not hold the format int4, stored as uint8"):
    QTensor(q.int_values(), q.scale, q.zero_point, q.config, q.shape)
  with pytest.raises(ValueError, match=r"QTensor: values of shape \(2, 3\) do not hold a tensor of shape \(5, 3\) in "
                                       r"int4: expected \(3, 3\)"):
    QTensor(q.values[:2], q.scale, q.zero_point, q.config, q.shape)
  with pytest.raises(ValueError, match=r"QTensor: scale of shape \(5, 1\) does not fit a tensor of shape \(5, 3\)"):
    QTensor(q.values, jnp.ones((5, 1)), jnp.zeros((5, 1)), q.config, q.shape)
  with pytest.raises(TypeError, match=r"QTensor: config must be a jqat.QatConfig"):
    QTensor(q.values, q.scale, q.zero_point, "int4", q.shape)
  with pytest.raises(ValueError, match=r"QTensor: zero_point holds nonzero values \(e.g. 3.0\).*symmetric"):
    QTensor(q.values, q.scale, jnp.full(q.zero_point.shape, 3.0), q.config, q.shape)


def test_qtensor_treedef_is_the_format_and_layout_only():
  ste = _q(per_channel=True)
  lsq = ste.replace(config=ste.config.replace(estimator="lsq"))
  assert jax.tree.structure(ste) == jax.tree.structure(lsq)
  assert lsq.config.estimator is jqat.Estimator.STE


def test_qtensor_names_its_format_and_deprecates_dtype():
  q = _q("int4")
  assert q.format is jqat.QuantBits.INT4 and q.dequant_dtype == jnp.float32
  with pytest.warns(DeprecationWarning, match="dequant_dtype"):
    assert q.dtype == jnp.float32
  with pytest.warns(DeprecationWarning, match="dequant_dtype"):
    q2 = QTensor(q.values, q.scale, q.zero_point, q.config, q.shape, dtype=jnp.bfloat16)
  assert q2.dequant_dtype == jnp.bfloat16


def test_qtensor_is_a_pytree_under_transforms():
  q = _q("int4", per_channel=True)
  # Sentinel leaves, as JAX's tree utilities use them: no checks on rebuilt trees.
  marks = jax.tree.map(lambda _: object(), q)
  assert isinstance(marks, QTensor)
  assert jax.tree.structure(jax.tree.map(lambda _: None, q, is_leaf=lambda x: x is None)) is not None
  np.testing.assert_array_equal(jax.jit(jqat.dequantize)(q), jqat.dequantize(q))
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), q)
  out = jax.vmap(jqat.dequantize)(stacked)
  np.testing.assert_array_equal(out[1], jqat.dequantize(q))
  for c in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
    assert jax.tree.structure(c) == jax.tree.structure(q)
    np.testing.assert_array_equal(jqat.dequantize(c), jqat.dequantize(q))


@pytest.mark.parametrize(
  ("call", "text"),
  [
    (lambda: jqat.dequantize(jnp.ones(3)), r"dequantize: q must be a jqat.QTensor \(from jqat.quantize\), got "),
    (lambda: jqat.int_matmul(jnp.ones((2, 5)), _q()), r"int_matmul: xq must be a jqat.QTensor .*shape \(2, 5\)"),
    (lambda: jqat.int_dot_general(_q(shape=(2, 5)), jnp.ones((5, 3)), MATMUL), r"int_dot_general: rhs must be a"),
    (lambda: jqat.weight_only_matmul(jnp.ones((2, 5)), jnp.ones((5, 3))), r"weight_only_matmul: wq must be a"),
  ],
)
def test_plain_arrays_are_not_qtensors(call, text):
  with pytest.raises(TypeError, match=text):
    call()


def test_bias_of_the_wrong_width():
  xq, wq = _q(shape=(2, 5)), _q(shape=(5, 3), per_channel=True)
  with pytest.raises(ValueError, match=r"int_matmul: bias of shape \(4,\) does not broadcast against the output of "
                                       r"shape \(2, 3\)"):
    jqat.int_matmul(xq, wq, bias=jnp.ones(4))
  with pytest.raises(ValueError, match=r"weight_only_matmul: bias of shape \(4,\)"):
    jqat.weight_only_matmul(jnp.ones((2, 5)), wq, bias=jnp.ones(4))


def test_contracting_lengths_that_differ_name_both_shapes():
  with pytest.raises(ValueError, match=r"int_matmul: contracting axes differ in length: lhs \(2, 4\) axis 1 has 4, "
                                       r"rhs \(5, 3\) axis 0 has 5"):
    jqat.int_matmul(_q(shape=(2, 4)), _q(shape=(5, 3)))


# --- column sums travel with the weight --------------------------------------------------------------------------


def test_weight_sums_travel_with_the_weight():
  xcfg = jqat.QatConfig(symmetric=False)
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 2, size=(2, 5)), jnp.float32)
  xq = jqat.quantize(x, jqat.qparams_from_array(x, xcfg), xcfg)
  wq, other = _q(shape=(5, 3), per_channel=True), _q(shape=(5, 3), per_channel=True).replace(values=-_q(
    shape=(5, 3), per_channel=True).values)
  prepared = jqat.with_weight_sums(wq)
  np.testing.assert_array_equal(jqat.int_matmul(xq, prepared), jqat.int_matmul(xq, wq))
  # New values drop the sums computed from the old ones: they cannot go stale.
  moved = prepared.replace(values=other.values)
  assert moved.sums is None
  np.testing.assert_array_equal(jqat.int_matmul(xq, moved), jqat.int_matmul(xq, other))
  # Sums for another contraction are refused.
  with pytest.raises(ValueError, match=r"int_dot_general: the weight's sums were prepared over axes \(1,\), but the "
                                       r"dot contracts axes \(0,\)"):
    jqat.int_dot_general(xq, jqat.with_weight_sums(wq, (1,)), MATMUL)


def test_sums_passed_beside_the_weight_are_deprecated_and_checked():
  xcfg = jqat.QatConfig(symmetric=False)
  xq = jqat.quantize(jnp.ones((2, 5)), jqat.qparams_from_range(0.0, 1.0, xcfg), xcfg)
  wq = _q(shape=(5, 3), per_channel=True)
  with pytest.warns(DeprecationWarning, match=r"int_matmul\(w_sums=...\) is deprecated.*with_weight_sums"):
    y = jqat.int_matmul(xq, wq, w_sums=jqat.weight_sums(wq))
  np.testing.assert_array_equal(y, jqat.int_matmul(xq, wq))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with pytest.raises(ValueError, match=r"int_matmul: w_sums of shape \(1, 4\) do not fit the weight of shape "
                                         r"\(5, 3\).*expected \(1, 3\)"):
      jqat.int_matmul(xq, wq, w_sums=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"QTensor: sums of dtype int32 and shape \(1, 4\) do not fit"):
    wq.replace(sums=jnp.zeros((1, 4), jnp.int32), sums_axes=(0,))


# --- int4 packing ------------------------------------------------------------------------------------------------


def test_pack_int4_refuses_out_of_range_and_saturates_under_jit():
  with pytest.raises(ValueError, match=r"pack_int4: values must lie in \[-8, 7\].*got 2 outside, e.g. 9"):
    jqat.pack_int4(jnp.array([9, 1, -9]))
  packed = jax.jit(jqat.pack_int4)(jnp.array([9, -9]))
  assert jqat.unpack_int4(packed, 2).tolist() == [7, -8]  # saturated, never wrapped (9 used to become -7)
  with pytest.raises(TypeError, match=r"pack_int4 needs integer values, got dtype float32"):
    jqat.pack_int4(jnp.array([1.5]))


@pytest.mark.parametrize("length", [5, 2, -1])
def test_unpack_int4_length_must_fit_the_bytes(length):
  packed = jqat.pack_int4(jnp.array([1, 2, 3, 4], jnp.int8))
  with pytest.raises(ValueError, match=rf"unpack_int4: length={length} does not fit 2 bytes.*hold 3 or 4 values"):
    jqat.unpack_int4(packed, length)


# --- calibration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("p", "text"),
  [
    (0.9999, r"percentile=0.9999 looks like a fraction.*did you mean 99.99\?"),
    (0.5, r"did you mean 50\?"),
    (0, r"percentile=0 is invalid; allowed: a number in \(0, 100\]"),
    (-1, r"percentile=-1 is invalid"),
    (150, r"percentile=150 is invalid"),
    (float("nan"), r"percentile=nan is invalid"),
  ],
)
def test_percentile_is_checked_everywhere(p, text):
  x = jnp.linspace(-1.0, 1.0, 64)
  state = jqat.update_stats(jqat.init_stats((64,), CFG, "percentile"), x)
  calls = [
    lambda: jqat.calibrate_model({"a": [x]}, method="percentile", percentile=p),
    lambda: jqat.finalize_stats(state, CFG, "percentile", percentile=p),
    lambda: jqat.finalize({"a": state}, CFG, "percentile", percentile=p),
    lambda: jqat.percentile_amax(jnp.ones(8), 0.5, p),
    lambda: jqat.check_percentile(p),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=text):
      call()


def test_calibrate_model_checks_the_percentile_before_any_batch():
  # The batch would fail (empty); the percentile is named first.
  with pytest.raises(ValueError, match=r"percentile=0.9999 looks like a fraction"):
    jqat.calibrate_model({"a": [jnp.zeros((0,))]}, method="percentile", percentile=0.9999)


def test_calibrate_model_refuses_batches_that_disagree_on_the_channels():
  cfg = jqat.QatConfig(per_channel=True)
  with pytest.raises(ValueError, match=r"calibrate_model: batch 1 of 'fc1' has shape \(4, 16\) but batch 0 has "
                                       r"\(4, 8\)"):
    jqat.calibrate_model({"fc1": [jnp.ones((4, 8)), jnp.ones((4, 16))]}, config=cfg)
  # Per tensor, batches of any shape are fine.
  specs = jqat.calibrate_model({"fc1": [jnp.ones((4, 8)), jnp.ones((2, 16))]})
  assert specs["fc1"].scale.shape == ()


def test_per_tensor_parameters_are_scalars_everywhere():
  x = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
  shapes = {
    "qparams_from_range": jqat.qparams_from_range(-1.0, 1.0, CFG).scale.shape,
    "qparams_from_array": jqat.qparams_from_array(x, CFG).scale.shape,
    "params_shape": jqat.params_shape(x.shape, CFG),
    "calibrate_model": jqat.calibrate_model({"a": [x]}, config=CFG)["a"].scale.shape,
    "finalize_stats": jqat.finalize_stats(jqat.update_stats(jqat.init_stats(x.shape, CFG, "minmax"), x), CFG,
                                          "minmax").scale.shape,
    "quantize": jqat.quantize(x, jqat.qparams_from_array(x, CFG), CFG).scale.shape,
  }
  assert set(shapes.values()) == {()}, shapes


def test_check_qparams_is_public_for_the_layers():
  # The layers call the same check with their own name.
  with pytest.raises(ValueError, match=r"QatDense 'fc': scale of shape \(3,\)"):
    qparams_lib.check_qparams(_qp(jnp.ones(3)), (4, 8), jqat.QatConfig(per_channel=True), "QatDense 'fc'")

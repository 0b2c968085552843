"""NNX layer lifecycle on bad or unusual input: configs, modes, calibration arguments, serving variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqat


class Mlp(nnx.Module):
  def __init__(self, *, hidden=16, rngs, head_mode="qat", **cfg):
    self.l1 = jqat.nnx.QatDense(8, hidden, rngs=rngs, **cfg)
    self.l2 = jqat.nnx.QatDense(hidden, 4, mode=head_mode, rngs=rngs, **cfg)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def _x(n=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 8))


def _served(**kwargs):
  model = Mlp(rngs=nnx.Rngs(0), **kwargs)
  model(_x())  # activation statistics from one QAT batch
  jqat.nnx.convert(model)
  return model


@pytest.mark.parametrize(
  "source, target, match",
  [
    (dict(weight_config="int8"), dict(weight_config="int4"), r"l1.*an int8 symmetric per-channel.*expects an int4"),
    (dict(weight_config="int4"), dict(weight_config="int8"), r"l1.*hold an int4 symmetric.*expects an int8 symmetric"),
    (dict(hidden=32), dict(hidden=16), r"l1.*kernel of shape \(8, 32\).*expects.*kernel of shape \(8, 16\)"),
  ],
  ids=["int8_into_int4", "int4_into_int8", "other_width"],
)
def test_serving_variables_of_another_layout_raise(source, target, match):
  src, dst = _served(**source), _served(**target)
  nnx.update(dst, nnx.state(src, jqat.nnx.QuantServing))
  with pytest.raises(ValueError, match=match):
    nnx.jit(lambda m, x: m(x))(dst, _x())


def test_serving_variables_record_their_layout():
  model = _served(weight_config="int4")
  var = model.l1.dot_general.rhs_serving
  # [bits (index in QuantBits), symmetric, narrow_range, per_channel, group_size, packing axis, ndim, *shape]
  bits = list(jqat.QuantBits).index(jqat.QuantBits("int4"))
  assert var.get_metadata()["layout"] == (bits, 1, 0, 1, 0, 0, 2, 8, 16)
  np.testing.assert_array_equal(var.get_value()["layout"], [bits, 1, 0, 1, 0, 0, 2, 8, 16])


def test_config_of_wrong_type():
  with pytest.raises(TypeError, match=r"QatDense: weight_config must be a jqat.QatConfig.*got int 4"):
    jqat.nnx.QatDense(2, 4, weight_config=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"activation_config='int9' is not a format name"):
    jqat.nnx.QatDense(2, 4, activation_config="int9", rngs=nnx.Rngs(0))
  # A format name is shorthand for the default config with those bits.
  layer = jqat.nnx.QatDense(2, 4, weight_config="int4", rngs=nnx.Rngs(0))
  assert layer.dot_general.rhs_config == jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)


def test_float_layers_stay_float_through_calibrate_freeze_convert():
  model = Mlp(rngs=nnx.Rngs(0), head_mode="float")
  kernel = np.asarray(model.l2.kernel[...])
  jqat.nnx.calibrate(model, [_x()], method="minmax")
  assert (model.l1.dot_general.mode, model.l2.dot_general.mode) == ("qat", "float")
  jqat.nnx.freeze(model, "minmax")  # nothing left to freeze; the float layer is skipped
  jqat.nnx.convert(model)
  assert model.l1.kernel is None
  np.testing.assert_array_equal(model.l2.kernel[...], kernel)
  h = jnp.ones((2, 16))
  np.testing.assert_array_equal(model.l2(h), h @ kernel + model.l2.bias[...])


def test_convert_of_a_float_only_model_keeps_it_float():
  layer = jqat.nnx.QatDense(3, 2, mode="float", rngs=nnx.Rngs(0))
  jqat.nnx.convert(layer)  # no "calibrate the model": there is nothing to serve quantized
  assert layer.kernel is not None and layer.dot_general.rhs_serving is None


def _counting(batches, seen):
  for b in batches:
    seen.append(1)
    yield b


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(method="entrpy"), ValueError, r"method='entrpy' is invalid; allowed: 'minmax', 'percentile', 'entropy'"),
    (dict(method="moving_average"), ValueError, r"method='moving_average' is invalid"),
    (dict(method="percentile", percentile=0.9999), ValueError, r"fraction"),
    (dict(method="percentile", percentile=150), ValueError, r"percentile=150"),
    (dict(method="percentile", percentile=0), ValueError, r"percentile=0"),
  ],
)
def test_calibrate_checks_its_arguments_before_any_batch(kwargs, error, match):
  model = Mlp(rngs=nnx.Rngs(0))
  seen = []
  with pytest.raises(error, match=match):
    jqat.nnx.calibrate(model, _counting([_x(), _x(seed=1)], seen), **kwargs)
  assert seen == []
  assert model.l1.dot_general.mode == "qat" and model.l1.dot_general.lhs_calib is None


def test_histogram_exists_only_while_calibrating():
  layer = jqat.nnx.QatDense(8, 4, rngs=nnx.Rngs(0))
  stat_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(layer, jqat.nnx.QuantStat)))
  assert stat_bytes < 100  # the moving average only; the 256 KiB histogram is not there
  jqat.nnx.set_mode(layer, "calibrate")
  assert layer.dot_general.lhs_calib is not None
  layer(_x())
  jqat.nnx.freeze(layer, "minmax")
  assert layer.dot_general.lhs_calib is None
  assert bool(layer.dot_general.lhs_stats.get_value().frozen)
  with pytest.raises(ValueError, match=r"QatDotGeneral at ''.*no calibration histogram|without a calibration"):
    layer(_x())  # still in calibrate mode, but the histogram was consumed


def test_freeze_without_calibration_names_the_layer():
  model = Mlp(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"QatDotGeneral at 'l1/dot_general': no calibration histogram"):
    jqat.nnx.freeze(model, "minmax")


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: jqat.nnx.QatDense(0, 4, rngs=nnx.Rngs(0)), r"QatDense: in_features=0 is invalid"),
    (lambda: jqat.nnx.QatDotGeneral(momentum=1.5), r"momentum=1.5 is invalid"),
    (lambda: jqat.nnx.QatEmbed(10, -1, rngs=nnx.Rngs(0)), r"QatEmbed: features=-1 is invalid"),
    (
      lambda: jqat.nnx.QatDotGeneral(lhs_config=jqat.QatConfig(per_channel=True, estimator="lsq")),
      r"lsq.*per-token",
    ),
  ],
  ids=["in_features", "momentum", "embed_features", "lsq_per_token"],
)
def test_construction_errors_name_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_call_errors_name_the_layer_and_shapes():
  emb = jqat.nnx.QatEmbed(10, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"QatEmbed: the lookup needs integer ids, got dtype float32"):
    emb(jnp.ones((2,)))
  with pytest.raises(ValueError, match=r"attend needs a query ending in 4 features, got shape \(2, 3\)"):
    emb.attend(jnp.ones((2, 3)))
  lin = nnx.Linear(3, 2, dot_general=jqat.nnx.QatDotGeneral(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"lhs \(input\) shape \(2, 5\) axis 1 has 5 elements but rhs \(kernel\) shape"):
    lin(jnp.ones((2, 5)))
  conv = jqat.nnx.QatConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"input shape \(1, 5, 5, 2\) does not fit kernel shape \(3, 3, 3, 4\)"):
    conv(jnp.ones((1, 5, 5, 2)))
  op = jqat.nnx.QatEinsumOp()
  with pytest.raises(ValueError, match=r"einsum 'ab,bc,cd->ad'.*two operands"):
    op("ab,bc,cd->ad", jnp.ones((2, 3)), jnp.ones((3, 4)))


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda m: jqat.nnx.calibrate(m, _x()), TypeError, r"batches must be an iterable.*array of shape \(32, 8\)"),
    (lambda m: jqat.nnx.calibrate(m, None), TypeError, r"batches must be an iterable.*NoneType"),
    (lambda m: jqat.nnx.convert({"model": m}), TypeError, r"convert needs an NNX model.*got dict"),
    (lambda m: jqat.nnx.quantize_model([m]), TypeError, r"quantize_model needs an NNX model.*got list"),
    (lambda m: jqat.nnx.quantize_model(m, rules=".*"), TypeError, r"rules must be jqat.Rule"),
  ],
  ids=["array_as_batches", "no_batches", "convert_dict", "quantize_list", "rules_str"],
)
def test_whole_model_functions_check_their_arguments(call, error, match):
  with pytest.raises(error, match=match):
    call(Mlp(rngs=nnx.Rngs(0)))


def test_nan_in_the_input_shows_in_the_output_rows_it_touches():
  model = Mlp(rngs=nnx.Rngs(0))
  x = _x()
  model(x)
  model.eval()
  xn = x.at[3, 1].set(jnp.nan)
  ref = Mlp(rngs=nnx.Rngs(0))
  jqat.nnx.set_mode(ref, "float")
  want = np.isfinite(ref(xn)).all(axis=1)
  assert not want[3] and want.sum() == len(x) - 1
  forward = nnx.jit(lambda m, v: m(v))
  np.testing.assert_array_equal(np.isfinite(forward(model, xn)).all(axis=1), want)  # QAT: as float
  jqat.nnx.convert(model)
  np.testing.assert_array_equal(np.isfinite(forward(model, xn)).all(axis=1), want)  # serving: the same rows

"""Linen layer lifecycle: params-only apply, modes, configs, calibrate, convert, self-describing serving variables."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from flax.training import train_state
from sklearn.datasets import load_digits

import jqat
from jqat import linen as qnn


def _digits():
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  return (d.data[perm] / 16.0).astype(np.float32), d.target[perm].astype(np.int32)


class Mlp(nn.Module):
  dense: type = nn.Dense
  head: type | None = None
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.dense(self.hidden)(x))
    return (self.head or self.dense)(10)(x)


def _stats(model, v, x):
  _, upd = model.apply(v, x, mutable=["quant_stats"])
  return {**v, **upd}


X, Y = _digits()


# --- params-only apply ---------------------------------------------------------------


def _canonical_loop(model, steps=150):
  """flax's examples: init()["params"], TrainState.create(apply_fn=model.apply), apply_fn({"params": p}, x)."""
  xtr, ytr, xte, yte = X[:1400], Y[:1400], X[1400:], Y[1400:]
  params = model.init(jax.random.key(0), xtr[:8])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(3e-3))

  @jax.jit
  def step(state, xb, yb):
    def loss_fn(p):
      logits = state.apply_fn({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grads = jax.grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads)

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(xtr), 128)
    state = step(state, xtr[idx], ytr[idx])
  logits = model.apply({"params": state.params}, xte)
  return float(jnp.mean(jnp.argmax(logits, -1) == yte))


def test_canonical_train_state_loop_learns_digits_as_dense_does():
  acc_float = _canonical_loop(Mlp())
  acc_qat = _canonical_loop(Mlp(dense=qnn.QatDense))
  assert acc_float > 0.9, acc_float
  assert abs(acc_qat - acc_float) <= 0.015, (acc_qat, acc_float)


def test_params_only_apply_is_the_first_batch_behaviour():
  # No quant_stats: each activation is quantized with the batch's own range, exactly as a fresh model is.
  model = Mlp(dense=qnn.QatDense)
  x = X[:64]
  v = model.init(jax.random.key(0), x)
  np.testing.assert_array_equal(model.apply({"params": v["params"]}, x), model.apply(v, x))
  g_params_only = jax.grad(lambda p: model.apply({"params": p}, x).sum())(v["params"])
  g_fresh = jax.grad(lambda p: model.apply({**v, "params": p}, x).sum())(v["params"])
  for a, b in zip(jax.tree.leaves(g_params_only), jax.tree.leaves(g_fresh)):
    np.testing.assert_array_equal(a, b)
  # ... which is the fake-quantized float forward: activation and kernel on their own ranges.
  acfg, wcfg = jqat.QatConfig(symmetric=False), jqat.QatConfig(per_channel=True)
  fq = lambda a, c: jqat.fake_quant(a, jqat.qparams_from_array(a, c), c)
  p = v["params"]
  h = jax.nn.relu(fq(x, acfg) @ fq(p["Dense_0"]["kernel"], wcfg) + p["Dense_0"]["bias"])
  ref = fq(h, acfg) @ fq(p["Dense_1"]["kernel"], wcfg) + p["Dense_1"]["bias"]
  np.testing.assert_allclose(model.apply({"params": p}, x), ref, rtol=1e-5, atol=1e-5)


class _SetupBlock(nn.Module):
  """Layers built in setup(), as Hugging Face's Flax models build them."""

  def setup(self):
    self.fc1 = qnn.QatDense(16)
    self.fc2 = qnn.QatDense(10)

  def __call__(self, x):
    return self.fc2(nn.relu(self.fc1(x)))


class _PreTrainedModel:
  """Hugging Face's wrapper: ``__call__`` runs ``self.module.apply({"params": params}, ...)``."""

  def __init__(self, module, x):
    self.module = module
    self.params = module.init(jax.random.key(0), x)["params"]

  def __call__(self, x, params=None):
    return self.module.apply({"params": params if params is not None else self.params}, x)


def test_params_only_apply_of_a_module_built_in_setup():
  x = X[:32]
  model = _PreTrainedModel(_SetupBlock(), x)
  assert set(model.params) == {"fc1", "fc2"}
  y = model(x)
  p = model.params
  float_y = nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  rel = float(jnp.linalg.norm(y - float_y) / jnp.linalg.norm(float_y))
  assert 0 < rel < 0.03  # quantized (int8 on both operands), not float, and close to float
  g = jax.grad(lambda p: model(x, p).sum())(p)
  assert float(jnp.abs(g["fc1"]["kernel"]).sum()) > 0


# --- modes ----------------------------------------------------------------------------


def test_one_mode_vocabulary():
  from jqat._src.flax import common

  assert common.MODES == ("float", "calibrate", "qat")
  with pytest.raises(ValueError, match=r"QatDense: mode='int8' is invalid; allowed: 'float', 'calibrate', 'qat'"):
    qnn.QatDense(3, mode="int8")


def test_mode_serve_is_a_deprecated_alias_of_qat():
  x = X[:16]
  with pytest.warns(DeprecationWarning, match="mode='serve' is deprecated"):
    layer = qnn.QatDense(4, mode="serve")
  assert layer.mode == "qat"
  v = qnn.QatDense(4).init(jax.random.key(0), x)
  np.testing.assert_array_equal(layer.apply(v, x), qnn.QatDense(4).apply(v, x))


def test_mode_calibrate_observes_like_a_mutable_quant_calib():
  model = Mlp(dense=functools.partial(qnn.QatDense, mode="calibrate"))
  x = X[:64]
  v = Mlp(dense=qnn.QatDense).init(jax.random.key(0), x)
  y, upd = model.apply(v, x, mutable=["quant_calib"])
  y_ref, upd_ref = Mlp(dense=qnn.QatDense).apply(v, x, mutable=["quant_calib"])
  np.testing.assert_array_equal(y, Mlp().apply({"params": v["params"]}, x))  # computes in float
  np.testing.assert_array_equal(y, y_ref)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(
    ValueError, match=r"QatDotGeneral at '/Dense_0/quant': mode='calibrate'.*mutable=\['quant_calib'\]"
  ):
    model.apply(v, x)


# --- configs --------------------------------------------------------------------------


def test_a_format_name_is_shorthand_for_the_default_config_with_those_bits():
  x = X[:16]
  dims = (((1,), (0,)), ((), ()))
  int4 = jqat.QatConfig(bits="int4", per_channel=True)
  assert qnn.QatDense(4, weight_config="int4").weight_config == int4
  assert qnn.QatDense(4, activation_config="int4").activation_config == jqat.QatConfig(bits="int4", symmetric=False)
  assert qnn.QatDense(4, activation_config="fp8_e4m3").activation_config == jqat.QatConfig(bits="fp8_e4m3")
  assert qnn.QatConv(4, (3, 3), weight_config="int4").weight_config == int4
  assert qnn.QatDotGeneral(rhs_config="int4").rhs_config == int4
  v = qnn.QatDense(4).init(jax.random.key(0), x)
  np.testing.assert_array_equal(
    qnn.QatDense(4, weight_config="int4").apply(v, x), qnn.QatDense(4, weight_config=int4).apply(v, x)
  )
  w = jnp.ones((64, 3))
  np.testing.assert_array_equal(
    qnn.QatDotGeneral(rhs_config="int4").apply({}, x, w, dims), qnn.QatDotGeneral(rhs_config=int4).apply({}, x, w, dims)
  )


@pytest.mark.parametrize(
  "make",
  [
    lambda c: qnn.QatDense(4, weight_config=c),
    lambda c: qnn.QatDense(4, activation_config=c),
    lambda c: qnn.QatConv(4, (3, 3), weight_config=c),
    lambda c: qnn.QatDotGeneral(lhs_config=c),
  ],
)
def test_a_config_of_the_wrong_type_is_a_type_error(make):
  with pytest.raises(
    TypeError, match=r"_config must be a jqat.QatConfig, a format name such as 'int4', or None; got int 4"
  ):
    make(4)
  with pytest.raises(ValueError, match=r"_config='int9' is not a format name; allowed: 'int2', .*'fp8_e5m2'"):
    make("int9")


def test_conv_clone_honours_configs_and_mode():
  x = X[:4].reshape(-1, 8, 8, 1)
  layer = qnn.QatConv(4, (3, 3))
  v = layer.init(jax.random.key(0), x)
  float_layer = layer.clone(mode="float")
  np.testing.assert_array_equal(float_layer.apply(v, x), nn.Conv(4, (3, 3)).apply(v, x))
  int4 = layer.clone(weight_config=jqat.QatConfig(bits="int4", per_channel=True))
  served = qnn.convert(int4, _stats(int4, v, x), x)
  assert served["serving"]["QatConvGeneralDilated_0"]["rhs"]["values"].dtype == jnp.uint8


# --- calibrate and freeze ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibrate_with_per_token_activations(method):
  per_token = jqat.QatConfig(per_channel=True, symmetric=False)
  model = Mlp(dense=functools.partial(qnn.QatDense, activation_config=per_token), head=qnn.QatDense)
  v = model.init(jax.random.key(0), X[:8])
  frozen = qnn.calibrate(model, v, [X[:128], X[128:256]], method=method)
  # The per-token layer observes nothing (its ranges are dynamic); the per-tensor head is frozen.
  assert "Dense_0" not in frozen.get("quant_stats", {})
  assert bool(frozen["quant_stats"]["Dense_1"]["quant"]["lhs"].frozen)
  served = qnn.convert(model, frozen, X[:8])
  np.testing.assert_allclose(model.apply(served, X[:64]), model.apply(frozen, X[:64]), rtol=1e-4, atol=1e-4)


def _batches_that_must_not_run():
  raise AssertionError("a batch ran before the arguments were checked")
  yield  # pragma: no cover


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"method": "minmaxx"}, r"method='minmaxx' is invalid; allowed: 'minmax', 'percentile', 'entropy', 'mse'"),
    ({"method": "moving_average"}, r"method='moving_average' is invalid; allowed: 'minmax'"),
    ({"percentile": 0}, r"percentile=0 is invalid; allowed: a number in \(0, 100\]"),
    ({"percentile": -1}, r"percentile=-1 is invalid; allowed: a number in \(0, 100\]"),
    ({"percentile": 150}, r"percentile=150 is invalid; allowed: a number in \(0, 100\]"),
    ({"percentile": 0.9999}, r"percentile=0.9999 looks like a fraction; .*99.99"),
  ],
)
def test_calibrate_and_freeze_check_method_and_percentile_first(kwargs, match):
  model = Mlp(dense=qnn.QatDense)
  v = model.init(jax.random.key(0), X[:8])
  with pytest.raises(ValueError, match="jqat.linen.calibrate: " + match):
    qnn.calibrate(model, v, _batches_that_must_not_run(), **kwargs)
  _, calib = model.apply(v, X[:8], mutable=["quant_calib"])
  with pytest.raises(ValueError, match="jqat.linen.freeze: " + match):
    qnn.freeze({**v, **calib}, **{"method": "percentile", **kwargs})


# --- convert -----------------------------------------------------------------------------


def test_jit_convert_without_statistics_raises():
  model = Mlp(dense=qnn.QatDense)
  v = model.init(jax.random.key(0), X[:8])
  convert = jax.jit(lambda v, x: qnn.convert(model, v, x))
  with pytest.raises(Exception, match=r"QatDotGeneral at '/Dense_\d/quant': no activation range to serve with"):
    jax.block_until_ready(convert(v, X[:8]))
  # With statistics, jit(convert) gives what eager convert gives.
  v = _stats(model, v, X[:64])
  for a, b in zip(jax.tree.leaves(convert(v, X[:8])), jax.tree.leaves(qnn.convert(model, v, X[:8]))):
    np.testing.assert_array_equal(a, b)


def test_the_unchecked_scale_under_jit_is_nan_not_a_plausible_number():
  # The callback's error aside, the scale it guards is NaN (it was 1.19e-7, which saturates every activation).
  from jqat._src.flax import common

  cfg = jqat.QatConfig(symmetric=False)
  seen_nothing = common.init_activation_stats(cfg, 0.9)
  seen = seen_nothing._replace(ema=seen_nothing.ema._replace(count=jnp.ones((), jnp.int32)))

  def scale(stats):
    return common.serving_activation_qparams(stats, cfg, "layer").scale

  jaxpr = str(jax.make_jaxpr(scale)(seen_nothing))
  assert "pure_callback" in jaxpr and "nan" in jaxpr
  assert bool(jnp.isfinite(jax.jit(scale)(seen)))
  with pytest.raises(Exception, match="layer: no activation range"):
    jax.block_until_ready(jax.jit(scale)(seen_nothing))


def test_convert_of_params_only_variables_names_the_layer():
  model = Mlp(dense=qnn.QatDense)
  params = model.init(jax.random.key(0), X[:8])["params"]
  with pytest.raises(ValueError, match=r"QatDotGeneral at '/Dense_0/quant': no activation range"):
    qnn.convert(model, {"params": params}, X[:8])


def test_float_head_keeps_its_kernel_through_calibrate_and_convert():
  head = functools.partial(qnn.QatDense, mode="float")
  model = Mlp(dense=qnn.QatDense, head=head)
  v = model.init(jax.random.key(0), X[:8])
  frozen = qnn.calibrate(model, v, [X[:128]], method="minmax")
  assert "Dense_1" not in frozen["quant_stats"]  # the float head observes nothing
  served = qnn.convert(model, frozen, X[:8])
  assert "kernel" in served["params"]["Dense_1"] and "kernel" not in served["params"]["Dense_0"]
  assert set(served["serving"]) == {"Dense_0"}
  np.testing.assert_allclose(model.apply(served, X[:64]), model.apply(frozen, X[:64]), rtol=1e-4, atol=1e-4)


def test_a_model_of_float_layers_converts_to_empty_serving():
  model = Mlp(dense=functools.partial(qnn.QatDense, mode="float"))
  v = model.init(jax.random.key(0), X[:8])
  served = qnn.convert(model, v, X[:8])
  assert served["serving"] == {}
  assert jax.tree.structure(served["params"]) == jax.tree.structure(v["params"])
  np.testing.assert_array_equal(model.apply(served, X[:16]), Mlp().apply({"params": v["params"]}, X[:16]))
  with pytest.raises(ValueError, match="found no jqat layer"):
    qnn.convert(Mlp(), Mlp().init(jax.random.key(0), X[:8]), X[:8])


def test_convert_is_idempotent():
  model = Mlp(dense=qnn.QatDense)
  v = _stats(model, model.init(jax.random.key(0), X[:8]), X[:64])
  once = qnn.convert(model, v, X[:8])
  twice = qnn.convert(model, once, X[:8])
  assert jax.tree.structure(once) == jax.tree.structure(twice)
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
    np.testing.assert_array_equal(a, b)
  # A stock layer keeps its float kernel: converting again quantizes it again, to the same bits.
  layer = nn.Dense(6, dot_general_cls=qnn.QatDotGeneral)
  v = _stats(layer, layer.init(jax.random.key(1), X[:8]), X[:64])
  once = qnn.convert(layer, v, X[:8])
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(qnn.convert(layer, once, X[:8]))):
    np.testing.assert_array_equal(a, b)


# --- serving variables say what they hold ---------------------------------------------------


@functools.cache  # the same converted variables serve several tests; they are never modified
def _served(weight_config, features=10, use_bias=True):
  dense = functools.partial(qnn.QatDense, weight_config=weight_config, use_bias=use_bias)
  model = Mlp(dense=dense, hidden=features)
  v = _stats(model, model.init(jax.random.key(0), X[:8]), X[:64])
  return model, qnn.convert(model, v, X[:8])


INT8 = jqat.QatConfig(per_channel=True)
INT4 = jqat.QatConfig(bits="int4", per_channel=True)


def test_serving_variables_record_format_and_layout():
  from jqat._src.flax import common

  _, served = _served(INT4)
  rhs = served["serving"]["Dense_0"]["quant"]["rhs"]
  np.testing.assert_array_equal(
    rhs["layout"], [list(jqat.QuantBits).index(jqat.QuantBits("int4")), 1, 0, 1, 0, 0, 2, 64, 10]
  )
  assert common.describe_layout(rhs["layout"]) == "int4 symmetric per-channel kernel of shape (64, 10)"
  assert served["serving"]["Dense_0"]["quant"]["lhs"]["layout"].dtype == jnp.int32


@pytest.mark.parametrize("held, expects", [(INT8, INT4), (INT4, INT8)])
def test_serving_variables_applied_to_a_layer_of_another_format_raise(held, expects):
  _, served = _served(held)
  other = Mlp(dense=functools.partial(qnn.QatDense, weight_config=expects), hidden=10)
  with pytest.raises(ValueError) as e:
    other.apply(served, X[:4])
  msg = str(e.value)
  assert msg.startswith("QatDotGeneral at '/Dense_0/quant': the serving variables hold")
  assert f"{held.bits.value} symmetric per-channel kernel of shape (64, 10)" in msg
  assert f"layer expects {expects.bits.value} symmetric per-channel kernel of shape (64, 10)" in msg
  with pytest.raises(ValueError, match="the serving variables hold"):
    jax.jit(other.apply)(served, X[:4])  # dtypes and shapes are static: the same error under jit


@pytest.mark.parametrize("held, expects", [(INT8, INT4), (INT4, INT8)])
def test_restoring_serving_variables_into_a_model_of_another_format_raises(held, expects):
  _, served = _served(held)
  other_model, template = _served(expects)
  restored = serialization.from_bytes(template, serialization.to_bytes(served))
  with pytest.raises(
    ValueError,
    match=rf"Dense_0/quant': the serving variables hold {held.bits.value} .* expects "
    rf"{expects.bits.value} ",
  ):
    other_model.apply(restored, X[:4])


def test_restoring_serving_variables_into_a_layer_of_another_width_raises():
  _, served = _served(INT8, features=16, use_bias=False)
  wider, template = _served(INT8, features=32, use_bias=False)
  restored = serialization.from_bytes(template, serialization.to_bytes(served))
  with pytest.raises(
    ValueError,
    match=r"Dense_0/quant': the serving variables hold int8 symmetric per-channel kernel of shape \(64, 16\), but the "
    r"layer expects int8 symmetric per-channel kernel of shape \(64, 32\)",
  ):
    wider.apply(restored, X[:4])
  # With a bias, the bias is the first variable of the old width that the layer meets.
  _, served = _served(INT8, features=16)
  wider, template = _served(INT8, features=32)
  restored = serialization.from_bytes(template, serialization.to_bytes(served))
  with pytest.raises(
    ValueError,
    match=r"QatDense at '/Dense_0': the variables hold a bias of shape \(16,\), but the "
    r"layer has features=32",
  ):
    wider.apply(restored, X[:4])


def test_a_mismatch_shapes_cannot_show_raises_eagerly_and_is_nan_under_jit():
  _, served = _served(INT8)
  asym = Mlp(dense=functools.partial(qnn.QatDense, weight_config=INT8.replace(symmetric=False)), hidden=10)
  with pytest.raises(ValueError, match="hold int8 symmetric .* expects int8 asymmetric"):
    asym.apply(served, X[:4])
  y = jax.jit(asym.apply)(served, X[:4])
  assert bool(jnp.all(jnp.isnan(y)))


def test_serving_activation_range_against_a_weight_only_layer_raises():
  _, served = _served(INT8)
  weight_only = Mlp(dense=functools.partial(qnn.QatDense, activation_config=None), hidden=10)
  with pytest.raises(
    ValueError,
    match=r"Dense_0/quant': the serving variables hold a frozen activation range, but the "
    r"layer expects no frozen activation range",
  ):
    weight_only.apply(served, X[:4])
  a4 = Mlp(
    dense=functools.partial(qnn.QatDense, activation_config=jqat.QatConfig(bits="int4", symmetric=False)), hidden=10
  )
  with pytest.raises(ValueError, match="hold a frozen int8 asymmetric activation range, but the layer expects int4"):
    a4.apply(served, X[:4])


# --- bad input gets an error in the layer's own words -----------------------------------------


@pytest.mark.parametrize(
  "make, error, match",
  [
    (lambda: qnn.QatDense("4"), TypeError, r"QatDense: features='4' is invalid; allowed: a positive int"),
    (lambda: qnn.QatDense(0), TypeError, r"features=0 is invalid"),
    (
      lambda: qnn.QatDense(4, momentum=1.5),
      ValueError,
      r"QatDense: momentum=1.5 is invalid; allowed: a number in \[0, 1\)",
    ),
    (lambda: qnn.QatConv(4, (3, 3), momentum="0.9"), ValueError, r"QatConv: momentum='0.9' is invalid"),
    (lambda: qnn.QatDotGeneral(mode=None), ValueError, r"QatDotGeneral: mode=None is invalid"),
    (
      lambda: qnn.QatConv(4, (3, 3), activation_config=jqat.QatConfig(per_channel=True)),
      ValueError,
      r"QatConv: conv activations are quantized per tensor; got activation_config=",
    ),
    (
      lambda: qnn.QatConvGeneralDilated(lhs_config=jqat.QatConfig(per_channel=True)),
      ValueError,
      r"QatConvGeneralDilated: conv activations are quantized per tensor",
    ),
  ],
)
def test_bad_layer_fields_fail_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_bad_call_arguments_name_the_layer():
  dims = (((1,), (0,)), ((), ()))
  x, w = jnp.ones((2, 5)), jnp.ones((5, 3))
  init = lambda *args: qnn.QatDotGeneral().init(jax.random.key(0), *args)
  with pytest.raises(
    ValueError, match=r"QatDotGeneral at '/': dimension_numbers=\(\(1,\), \(0,\)\) is invalid; allowed: "
  ):
    init(x, w, ((1,), (0,)))
  with pytest.raises(
    ValueError, match=r"dimension_numbers=\(\(\(2,\), \(0,\)\), \(\(\), \(\)\)\) names an axis the 2-d lhs"
  ):
    init(x, w, (((2,), (0,)), ((), ())))
  with pytest.raises(TypeError, match=r"QatDotGeneral at '/': lhs \(input\) must be a numeric array, got str"):
    init("x", w, dims)
  conv = qnn.QatConv(4, (3, 3))
  with pytest.raises(ValueError, match=r"QatConv at '/': input shape \(5, 5\) needs 2 spatial axes and a feature axis"):
    conv.init(jax.random.key(0), jnp.ones((5, 5)))
  v = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
  with pytest.raises(ValueError, match=r"QatConv at '/': input shape \(1, 5, 5, 2\) has 2 features .* \(3, 3, 3, 4\)"):
    conv.apply(v, jnp.ones((1, 5, 5, 2)))


def test_bad_arguments_to_calibrate_freeze_convert():
  model = Mlp(dense=qnn.QatDense)
  v = model.init(jax.random.key(0), X[:8])
  with pytest.raises(TypeError, match=r"jqat.linen.convert: model must be a flax.linen.Module, got dict"):
    qnn.convert(v, model, X[:8])
  with pytest.raises(TypeError, match=r"jqat.linen.convert: variables must be a mapping of collections.*got list"):
    qnn.convert(model, [v], X[:8])
  with pytest.raises(ValueError, match=r"jqat.linen.convert: variables need a 'params' collection; got .*\['Dense_0'"):
    qnn.convert(model, v["params"], X[:8])
  with pytest.raises(TypeError, match=r"jqat.linen.calibrate: batches must be an iterable of model inputs.*ndarray"):
    qnn.calibrate(model, v, X[:8])
  with pytest.raises(
    TypeError, match=r"jqat.linen.calibrate: percentile='99' is invalid; allowed: a number in \(0, 100\]"
  ):
    qnn.calibrate(model, v, [X[:8]], percentile="99")
  with pytest.raises(TypeError, match=r"jqat.linen.freeze: variables must be a mapping"):
    qnn.freeze(None)
  with pytest.raises(TypeError, match=r"QatDense at '/': the input must be a numeric array, got str"):
    qnn.QatDense(3).apply({"params": {}}, "x")


@pytest.mark.parametrize("acfg", [jqat.QatConfig(symmetric=False), jqat.QatConfig(per_channel=True, symmetric=False)],
                         ids=["per_tensor", "per_token"])  # fmt: skip
def test_nan_in_the_input_shows_in_the_rows_it_touches(acfg):
  model = Mlp(dense=functools.partial(qnn.QatDense, activation_config=acfg))
  v = _stats(model, model.init(jax.random.key(0), X[:8]), X[:64])
  x = X[:8].copy()
  x[2, 5] = np.nan
  want = np.isfinite(Mlp().apply({"params": v["params"]}, x)).all(axis=1)  # float: row 2 only
  assert not want[2] and want.sum() == 7
  for variables in (v, {"params": v["params"]}):  # statistics skip the NaN; the batch range skips it
    y, upd = model.apply(variables, x, mutable=["quant_stats"])
    np.testing.assert_array_equal(np.isfinite(y).all(axis=1), want)  # QAT: the rows float makes NaN
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(upd) if leaf.dtype.kind == "f")
  # Serving quantizes the finite part and marks the rows the NaN touches: exactly the rows of the float model.
  served = qnn.convert(model, v, X[:8])
  np.testing.assert_array_equal(np.isfinite(jax.jit(model.apply)(served, x)).all(axis=1), want)


def test_nan_in_a_conv_input_is_not_hidden():
  layer = qnn.QatConv(4, (3, 3))
  x = X[:4].reshape(-1, 8, 8, 1).copy()
  v = _stats(layer, layer.init(jax.random.key(0), x), x)
  x[1, 3, 3, 0] = np.nan
  want = np.isfinite(nn.Conv(4, (3, 3)).apply({"params": v["params"]}, x))
  np.testing.assert_array_equal(np.isfinite(layer.apply(v, x)), want)
  served = qnn.convert(layer, v, x[:1])
  assert not bool(jnp.isfinite(layer.apply(served, x)[1]).all())

"""jqat.nnx.ptq: RTN, GPTQ, AWQ and SmoothQuant at model level, in place; the model then serves integer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqat
from jqat._src.calibration.moments import moments_init, moments_update
from jqat._src.flax import common

INT4 = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
INT3_G8 = jqat.QatConfig(bits="int3", per_channel=True, symmetric=True, group_size=8)
W8 = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
A8 = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)
SHAPES = {"fc0": (16, 24), "fc1": (24, 8)}


class MLP(nnx.Module):
  def __init__(self, weight=INT4, act=None, seed=3):
    rngs = nnx.Rngs(seed)
    self.fc0 = jqat.nnx.QatDense(16, 24, weight_config=weight, activation_config=act, rngs=rngs)
    self.fc1 = jqat.nnx.QatDense(24, 8, weight_config=weight, activation_config=act, rngs=rngs)

  def __call__(self, x):
    return self.fc1(nnx.gelu(self.fc0(x)))


class Plain(nnx.Module):
  """Stock NNX layers: the oracle for what served kernels compute, and the input of quantize_model."""

  def __init__(self, seed=3):
    rngs = nnx.Rngs(seed)
    self.fc0 = nnx.Linear(16, 24, rngs=rngs)
    self.fc1 = nnx.Linear(24, 8, rngs=rngs)

  def __call__(self, x):
    return self.fc1(nnx.gelu(self.fc0(x)))


def _inputs(n=256, k=16, seed=0):
  # Correlated inputs with two outlier channels, as a language model's normalised activations have.
  z = jax.random.normal(jax.random.key(seed), (n, k))
  mix = jnp.eye(k) + 0.3 * jax.random.normal(jax.random.key(seed + 1), (k, k))
  return (z @ mix) * jnp.where(jnp.arange(k) < 2, 12.0, 1.0)


X = _inputs()
BATCHES = [X[:128], X[128:]]
FLOAT = {n: (getattr(MLP(), n).kernel[...], getattr(MLP(), n).bias[...]) for n in SHAPES}


@nnx.jit
def _forward(model, x):
  return model(x)


def _served(layer, weight=INT4):
  """The served ``(QTensor, s or None)`` of a converted layer."""
  q = layer.dot_general
  shape = (layer.in_features, layer.out_features)
  wq = common.weight_from_serving(q.rhs_serving.get_value(), common.operand_config(weight, 2, (0,), ()), shape)
  return wq, (None if q.input_scale is None else q.input_scale.get_value())


def _dequantized_model(model, weight=INT4):
  """A plain float model whose kernels are the served ones, ``dequantize(q) / s`` per input row."""
  ref = Plain()
  for name in SHAPES:
    wq, s = _served(getattr(model, name), weight)
    w = jqat.dequantize(wq)
    getattr(ref, name).kernel.set_value(w if s is None else w / s[:, None])
    getattr(ref, name).bias.set_value(getattr(model, name).bias[...])
  return ref


def _float_out(x):
  ref = Plain()
  for name, (w, b) in FLOAT.items():
    getattr(ref, name).kernel.set_value(w)
    getattr(ref, name).bias.set_value(b)
  return _forward(ref, x)


def _ptq(method, model=None, **kw):
  model = MLP() if model is None else model
  jqat.nnx.ptq(model, BATCHES, method=method, **kw)
  return model


@pytest.fixture(scope="module")
def served():
  """One ptq per method on the same model and batches, shared by the tests below."""
  opts = {"rtn": {}, "gptq": {"block_size": 8}, "awq": {"grid": 10}}
  return {m: _ptq(m, **o) for m, o in opts.items()}


def _model_err(model):
  return float(jnp.mean((_forward(model, X) - _float_out(X)) ** 2))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_served_equals_dequantized_forward(served, method):
  model = served[method]
  np.testing.assert_allclose(_forward(model, X), _forward(_dequantized_model(model), X), rtol=1e-5, atol=1e-4)
  assert model.fc0.kernel is None
  assert (model.fc0.dot_general.input_scale is not None) == (method == "awq")
  if method == "rtn":  # jqat.nnx.convert's kernel, bit for bit
    conv = MLP()
    jqat.nnx.convert(conv)
    for name in SHAPES:
      got, want = (getattr(m, name).dot_general.rhs_serving.get_value() for m in (model, conv))
      assert set(got) == set(want)
      for key in got:
        np.testing.assert_array_equal(got[key], want[key])


def test_smoothquant_w8a8_served_equals_simulation_and_beats_plain():
  plain = _ptq("rtn", MLP(weight=W8, act=A8))
  smooth = _ptq("smoothquant", MLP(weight=W8, act=A8), alpha=0.5)
  # Layer 0 simulated by hand: x / s quantized with the served static range, times the dequantized kernel.
  wq, s = _served(smooth.fc0, W8)
  lhs = smooth.fc0.dot_general.lhs_serving.get_value()
  qp = jqat.QParams(lhs["scale"], lhs["zero_point"])
  xs = X / s
  h_sim = jqat.fake_quant(xs, qp, A8) @ jqat.dequantize(wq) + smooth.fc0.bias[...]
  np.testing.assert_allclose(_forward(smooth.fc0, X), h_sim, rtol=1e-5, atol=1e-4)
  # The static range is the min-max of x / s over the batches.
  np.testing.assert_allclose(float(lhs["scale"]), float((xs.max() - xs.min()) / 255), rtol=1e-5)
  err = {"plain": _model_err(plain), "smooth": _model_err(smooth)}
  assert err["smooth"] < err["plain"], err


def test_gptq_and_awq_beat_rtn(served):
  w = FLOAT["fc0"][0]

  def layer_err(model):
    return float(jnp.linalg.norm(X @ w - X @ jqat.dequantize(_served(model.fc0)[0])))

  # The same layer on its calibration inputs: GPTQ minimises exactly this error.
  assert layer_err(served["gptq"]) < 0.9 * layer_err(served["rtn"])
  e = {m: _model_err(v) for m, v in served.items()}
  assert e["gptq"] < e["rtn"] and e["awq"] < e["rtn"], e


def _gptq_on(h, w):
  moments = moments_update(moments_init(h.shape[-1], hessian=True), h)
  return jqat.dequantize(jqat.gptq(w, moments, INT4, block_size=8))


def test_sequential_and_one_pass(served):
  one, seq = served["gptq"], _ptq("gptq", block_size=8, sequential=True)
  q1 = [_served(m.fc0)[0] for m in (one, seq)]
  # The first layer sees the same float inputs in both modes: the same kernel.
  np.testing.assert_array_equal(q1[0].values, q1[1].values)
  # The second is jqat.gptq with the Hessian of its inputs: the float first layer's outputs in one pass, the
  # quantized first layer's in sequential mode; the two differ.
  w0, b0 = FLOAT["fc0"]
  inputs = [nnx.gelu(X @ w0 + b0), nnx.gelu(X @ jqat.dequantize(q1[1]) + b0)]
  got = [jqat.dequantize(_served(m.fc1)[0]) for m in (one, seq)]
  for h, g in zip(inputs, got):
    np.testing.assert_allclose(g, _gptq_on(h, FLOAT["fc1"][0]), atol=1e-6)
  assert not np.array_equal(got[0], got[1])


def test_rules_select_layers(served):
  chosen = _ptq("gptq", block_size=8, rules=[jqat.Rule("fc0", weight=INT4)])
  np.testing.assert_array_equal(_served(chosen.fc1)[0].values, _served(served["rtn"].fc1)[0].values)  # RTN
  np.testing.assert_array_equal(_served(chosen.fc0)[0].values, _served(served["gptq"].fc0)[0].values)  # GPTQ


def test_quantize_model_models_and_float_rule():
  rules = [jqat.Rule("fc1"), jqat.Rule(".*", weight=INT4, activation=None)]
  model = jqat.nnx.quantize_model(Plain(), rules)
  jqat.nnx.ptq(model, BATCHES, method="gptq", rules=rules, block_size=8)
  # fc1's float rule keeps it float: its kernel stays, nothing is served for it.
  assert isinstance(model.fc1.kernel, nnx.Param) and model.fc1.dot_general.rhs_serving is None
  np.testing.assert_array_equal(model.fc1.kernel[...], FLOAT["fc1"][0])
  assert isinstance(model.fc0.kernel, jqat.nnx.KernelShape)
  # fc0 holds the same GPTQ kernel as a QatDense model with the same weights and inputs.
  direct = _ptq("gptq", block_size=8, rules=[jqat.Rule("fc0", weight=INT4)])
  np.testing.assert_array_equal(_served(model.fc0)[0].values, _served(direct.fc0)[0].values)
  # Served equals the plain model with fc0's kernel replaced by its served, dequantized one.
  ref = Plain()
  ref.fc0.kernel.set_value(jqat.dequantize(_served(model.fc0)[0]))
  np.testing.assert_allclose(_forward(model, X), _forward(ref, X), rtol=1e-5, atol=1e-4)


def test_input_scale_shape_mismatch_names_layer_and_shapes(served):
  model = served["awq"]
  good = model.fc0.dot_general.input_scale.get_value()
  model.fc0.dot_general.input_scale.set_value(jnp.ones((5,), jnp.float32))
  try:
    with pytest.raises(ValueError, match=r"at 'fc0/dot_general'.*input_scale has shape \(5,\).*shape \(4, 16\)"):
      model(X[:4])
  finally:
    model.fc0.dot_general.input_scale.set_value(good)


def test_bad_input(served):
  with pytest.raises(ValueError, match="method='obq' is invalid; allowed: 'rtn', 'gptq', 'awq', 'smoothquant'"):
    jqat.nnx.ptq(MLP(), BATCHES, method="obq")
  with pytest.raises(ValueError, match="jqat.nnx.ptq: got no batches"):
    jqat.nnx.ptq(MLP(), [], method="gptq")
  with pytest.raises(TypeError, match="batches must be an iterable of model inputs"):
    jqat.nnx.ptq(MLP(), X)
  with pytest.raises(TypeError, match="takes no option alpha; its options: damp, block_size, act_order"):
    jqat.nnx.ptq(MLP(), BATCHES, method="gptq", alpha=0.5)
  with pytest.raises(ValueError, match="alpha=2"):
    jqat.nnx.ptq(MLP(), BATCHES, method="smoothquant", alpha=2)
  with pytest.raises(ValueError, match=r"rules matched no op of the model: 'attn.*'.*'fc0'"):
    jqat.nnx.ptq(MLP(), BATCHES, rules=[jqat.Rule("attn.*", weight=INT4)])
  with pytest.raises(ValueError, match="asks for weights .*int3.* quantizes them as .*int4"):
    jqat.nnx.ptq(MLP(), BATCHES, rules=[jqat.Rule(".*", weight=INT3_G8)])
  with pytest.raises(ValueError, match="at 'fc0/dot_general' is converted already"):
    jqat.nnx.ptq(served["rtn"], BATCHES)
  with pytest.raises(TypeError, match="needs an NNX model"):
    jqat.nnx.ptq(lambda x: x, BATCHES)


def test_nonfinite_rows_are_skipped():
  # A NaN and an Inf row in the calibration batches: ranges and scales equal those without the two rows.
  bad = X[128:].at[5, 3].set(jnp.nan).at[9, 0].set(jnp.inf)
  keep = jnp.concatenate([X[128:133], X[134:137], X[138:]])
  models = [MLP(weight=W8, act=A8) for _ in range(2)]
  jqat.nnx.ptq(models[0], [X[:128], bad], method="smoothquant")
  jqat.nnx.ptq(models[1], [X[:128], keep], method="smoothquant")
  for name in SHAPES:
    a, b = (getattr(m, name).dot_general for m in models)
    for key in ("scale", "zero_point"):
      np.testing.assert_array_equal(a.lhs_serving.get_value()[key], b.lhs_serving.get_value()[key])
    np.testing.assert_array_equal(a.input_scale.get_value(), b.input_scale.get_value())

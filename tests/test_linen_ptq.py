"""jqat.linen.ptq: RTN, GPTQ, AWQ and SmoothQuant at model level, served by the same model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat import linen as qnn
from jqat._src.flax.linen_ptq import served_kernel

INT4 = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
INT3_G8 = jqat.QatConfig(bits="int3", per_channel=True, symmetric=True, group_size=8)
W8 = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
A8 = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)


class MLP(nn.Module):
  weight: object = INT4
  act: object = None

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(qnn.QatDense(24, weight_config=self.weight, activation_config=self.act)(x))
    return qnn.QatDense(8, weight_config=self.weight, activation_config=self.act)(h)


class FloatMLP(nn.Module):
  """The same function with plain Flax layers: the oracle for what the served kernels compute."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="Dense_1")(nn.gelu(nn.Dense(24, name="Dense_0")(x)))


def _inputs(n=256, k=16, seed=0):
  # Correlated inputs with two outlier channels, as a language model's normalised activations have.
  z = jax.random.normal(jax.random.key(seed), (n, k))
  mix = jnp.eye(k) + 0.3 * jax.random.normal(jax.random.key(seed + 1), (k, k))
  return (z @ mix) * jnp.where(jnp.arange(k) < 2, 12.0, 1.0)


X = _inputs()
BATCHES = [X[:128], X[128:]]
MODEL = MLP()
VARS = MODEL.init(jax.random.key(3), X)


def _dequantized_params(served, weight=INT4):
  """Float parameters whose plain forward is the served kernels' (``dequantize(q) / s`` per input row)."""
  params = {}
  for name, shape in (("Dense_0", (16, 24)), ("Dense_1", (24, 8))):
    q, s = served_kernel(served, (name, "quant"), weight, shape)
    w = jqat.dequantize(q)
    if s is not None:
      w = w / s[:, None]
    params[name] = {"kernel": w, "bias": served["params"][name]["bias"]}
  return {"params": params}


def _rtn(w, cfg):
  return jqat.dequantize(jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg))


@pytest.fixture(scope="module")
def served():
  """One ptq per method on the same model and batches, shared by the tests below."""
  opts = {"rtn": {}, "gptq": {"block_size": 8}, "awq": {"grid": 10}}
  return {m: qnn.ptq(MODEL, VARS, BATCHES, method=m, **o) for m, o in opts.items()}


def _model_err(variables):
  ref = FloatMLP().apply({"params": VARS["params"]}, X)
  return float(jnp.mean((jax.jit(MODEL.apply)(variables, X) - ref) ** 2))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_served_equals_dequantized_forward(served, method):
  served = served[method]
  y = MODEL.apply(served, X)
  want = FloatMLP().apply(_dequantized_params(served), X)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)  # weight-only dot vs float dot of the same values
  assert "kernel" not in served["params"]["Dense_0"]
  assert ("input_scale" in served["serving"]["Dense_0"]["quant"]) == (method == "awq")
  if method == "rtn":  # convert's kernel, bit for bit
    q, _ = served_kernel(served, ("Dense_0", "quant"), INT4, (16, 24))
    np.testing.assert_array_equal(jqat.dequantize(q), _rtn(VARS["params"]["Dense_0"]["kernel"], INT4))


def test_smoothquant_w8a8_served_equals_simulation_and_beats_plain():
  model = MLP(weight=W8, act=A8)
  plain = qnn.ptq(model, VARS, BATCHES, method="rtn")
  smooth = qnn.ptq(model, VARS, BATCHES, method="smoothquant", alpha=0.5)
  # Layer 0 simulated by hand: x / s quantized with the served static range, times the dequantized kernel.
  q, s = served_kernel(smooth, ("Dense_0", "quant"), W8, (16, 24))
  lhs = smooth["serving"]["Dense_0"]["quant"]["lhs"]
  qp = jqat.QParams(lhs["scale"], lhs["zero_point"])
  xs = X / s
  h_sim = jqat.fake_quant(xs, qp, A8) @ jqat.dequantize(q) + smooth["params"]["Dense_0"]["bias"]
  h_srv = qnn.QatDense(24, weight_config=W8, activation_config=A8).apply(
    {"params": smooth["params"]["Dense_0"], "serving": smooth["serving"]["Dense_0"]}, X
  )
  np.testing.assert_allclose(h_srv, h_sim, rtol=1e-5, atol=1e-4)
  # The static range is the min-max of x / s over the batches.
  np.testing.assert_allclose(float(lhs["scale"]), float((xs.max() - xs.min()) / 255), rtol=1e-5)
  ref = FloatMLP().apply({"params": VARS["params"]}, X)
  err = {n: float(jnp.mean((model.apply(v, X) - ref) ** 2)) for n, v in (("plain", plain), ("smooth", smooth))}
  assert err["smooth"] < err["plain"], err


def test_gptq_and_awq_beat_rtn(served):
  w = VARS["params"]["Dense_0"]["kernel"]

  def layer_err(v):
    q, _ = served_kernel(v, ("Dense_0", "quant"), INT4, (16, 24))
    return float(jnp.linalg.norm(X @ w - X @ jqat.dequantize(q)))

  # The same layer on its calibration inputs: GPTQ minimises exactly this error.
  assert layer_err(served["gptq"]) < 0.9 * layer_err(served["rtn"])
  e = {m: _model_err(v) for m, v in served.items()}
  assert e["gptq"] < e["rtn"] and e["awq"] < e["rtn"], e


def test_sequential_and_one_pass(served):
  one = served["gptq"]
  seq = qnn.ptq(MODEL, VARS, BATCHES, method="gptq", block_size=8, sequential=True)
  q1 = [served_kernel(v, ("Dense_0", "quant"), INT4, (16, 24))[0] for v in (one, seq)]
  # The first layer sees the same float inputs in both modes: the same kernel.
  np.testing.assert_array_equal(q1[0].values, q1[1].values)
  # The second sees the quantized first layer's outputs in sequential mode: another Hessian, another kernel.
  q2 = [served_kernel(v, ("Dense_1", "quant"), INT4, (24, 8))[0] for v in (one, seq)]
  assert not np.array_equal(jqat.dequantize(q2[0]), jqat.dequantize(q2[1]))
  # Sequential GPTQ lowers the second layer's error on the inputs it is served with.
  h = nn.gelu(X @ jqat.dequantize(q1[1]) + VARS["params"]["Dense_0"]["bias"])
  w2 = VARS["params"]["Dense_1"]["kernel"]
  errs = [float(jnp.linalg.norm(h @ w2 - h @ jqat.dequantize(q))) for q in q2]
  assert errs[1] < errs[0], errs


def test_rules_select_layers(served):
  chosen = qnn.ptq(MODEL, VARS, BATCHES, method="gptq", block_size=8, rules=[jqat.Rule("Dense_0", weight=INT4)])
  k1 = [served_kernel(v, ("Dense_1", "quant"), INT4, (24, 8))[0].values for v in (chosen, served["rtn"])]
  np.testing.assert_array_equal(k1[0], k1[1])  # not selected: round to nearest
  k0 = [served_kernel(v, ("Dense_0", "quant"), INT4, (16, 24))[0].values for v in (chosen, served["gptq"])]
  np.testing.assert_array_equal(k0[0], k0[1])  # selected: GPTQ's kernel


def test_quantize_model_models():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="head")(nn.relu(nn.Dense(24, name="fc")(x)))

  rules = [jqat.Rule(".*", weight=INT4, activation=None)]
  qm = qnn.quantize_model(Plain(), rules)
  variables = qm.init(jax.random.key(0), X)
  served = qnn.ptq(qm, variables, BATCHES, method="gptq", rules=rules, block_size=8)
  paths = [p for p in jax.tree_util.tree_flatten_with_path(served["serving"])[0] if "values" in str(p[0])]
  assert len(paths) == 2
  # Served equals the plain model with each kernel replaced by its served, dequantized one.
  flat = {}
  for name, shape in (("fc", (16, 24)), ("head", (24, 8))):
    q, _ = served_kernel(served, (name, "quant"), INT4, shape)
    flat[name] = {"kernel": jqat.dequantize(q), "bias": variables["params"][name]["bias"]}
  np.testing.assert_allclose(qm.apply(served, X), Plain().apply({"params": flat}, X), rtol=1e-5, atol=1e-4)


def test_bad_input(served):
  with pytest.raises(ValueError, match="method='obq' is invalid; allowed: 'rtn', 'gptq', 'awq', 'smoothquant'"):
    qnn.ptq(MODEL, VARS, BATCHES, method="obq")
  with pytest.raises(ValueError, match="got no batches"):
    qnn.ptq(MODEL, VARS, [], method="gptq")
  with pytest.raises(TypeError, match="takes no option alpha; its options: damp, block_size, act_order"):
    qnn.ptq(MODEL, VARS, BATCHES, method="gptq", alpha=0.5)
  with pytest.raises(ValueError, match="alpha=2"):
    qnn.ptq(MODEL, VARS, BATCHES, method="smoothquant", alpha=2)
  with pytest.raises(ValueError, match=r"rules matched no op of the model: 'attn.*'.*'Dense_0/quant'"):
    qnn.ptq(MODEL, VARS, BATCHES, rules=[jqat.Rule("attn.*", weight=INT4)])
  with pytest.raises(ValueError, match="asks for weights .*int3.* quantizes them as .*int4"):
    qnn.ptq(MODEL, VARS, BATCHES, rules=[jqat.Rule(".*", weight=INT3_G8)])
  with pytest.raises(ValueError, match="hold a 'serving' collection"):
    qnn.ptq(MODEL, served["rtn"], BATCHES)

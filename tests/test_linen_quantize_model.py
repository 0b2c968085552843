"""quantize_model on linen code written without jqat: stock layers, gemma-style and Hugging Face-style modules."""

import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import jqat
from jqat import linen as qnn
from jqat._src.report import weight_serving_bytes

INT8_W = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
INT4_W = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
INT8_A = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)


# --- model code in the styles of other libraries (no jqat inside) --------------------------------------


class GemmaEinsum(nn.Module):
  """gemma's ``Einsum``: a parameter ``w`` and ``jnp.einsum(eqn, x, w)``, and a ``param`` that needs a shape."""

  shape: tuple

  def param(self, name, init_fn, *init_args):
    if not init_args:
      raise TypeError(f"{name}: this library's param needs an explicit shape")
    return super().param(name, init_fn, *init_args)

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param("w", nn.initializers.normal(0.5), self.shape)
    return jnp.einsum(eqn, x, w)


class GemmaLinear(nn.Module):
  """The weight as the first einsum operand, under gemma's parameter name ``linear``."""

  shape: tuple

  @nn.compact
  def __call__(self, x):
    w = self.param("linear", nn.initializers.normal(0.5), self.shape)
    return jnp.einsum("DF,BTD->BTF", w, x)


class GemmaBlock(nn.Module):
  """Equations as gemma writes them: the output led by a weight axis, and the weight as first operand."""

  def setup(self):
    self.qkv_einsum = GemmaEinsum((3, 16, 2, 8))
    self.gating = GemmaLinear((16, 16))

  def __call__(self, x):
    qkv = self.qkv_einsum("BTD,CDNH->CBTNH", x)  # weight axis C leads the output
    return x + self.gating(qkv.sum(0).reshape(x.shape))


class StockBlock(nn.Module):
  """flax's stock layers, as flax's own examples use them."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(h)
    x = x + nn.Einsum((16, 2, 8), "btd,dnh->btnh", name="proj")(h).reshape(x.shape)
    x = x + nn.Dense(16, name="mlp")(nn.relu(nn.DenseGeneral((2, 8), name="up")(x).reshape(x.shape)))
    return x, None


class TiedLM(nn.Module):
  layers: int = 2

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(64, 16, name="embed")
    x = embed(ids)
    stack = nn.scan(StockBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
    x, _ = stack(name="layers")(x, None)
    x = GemmaBlock(name="gemma")(x)
    return embed.attend(x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, img):
    y = nn.relu(nn.Conv(8, (3, 3), name="conv")(img))
    return nn.Dense(4, name="head")(y.reshape(y.shape[0], -1))


def _ids(n=2, t=6, seed=0):
  return jax.random.randint(jax.random.key(seed), (n, t), 0, 64)


def _with_stats(qm, v, *args):
  _, upd = jax.jit(lambda v, *a: qm.apply(v, *a, mutable=["quant_stats"]))(v, *args)
  return {**v, **upd}


def _init(model, *args, **kwargs):
  # Jitted: an eager init dispatches (and compiles) every small op on its own.
  return jax.jit(functools.partial(model.init, **kwargs))(jax.random.key(0), *args)


_JITTED = {}


def _apply(model, v, *args, **kwargs):
  # One jitted apply per model and keywords, shared by the tests (same variables' structure: no recompilation).
  key = (id(model), tuple(sorted(kwargs.items())))
  if key not in _JITTED:
    _JITTED[key] = (model, jax.jit(functools.partial(model.apply, **kwargs)))
  return _JITTED[key][1](v, *args)


def _served_and_hlo(model, served, *args):
  compiled = jax.jit(model.apply).lower(served, *args).compile()
  return compiled(served, *args), compiled.as_text()


def _convert(qm, v, *args):
  # Under jit: one compilation instead of an eager dispatch per op (the checks still run, when it runs).
  return jax.jit(lambda v, *a: qnn.convert(qm, v, *a))(v, *args)


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
  """A tied-embedding LM of stock and gemma-style layers, quantized with int8 everywhere, and its QAT variables."""
  ids = _ids()
  rules = [
    jqat.Rule(".*", ops=("embed", "attend"), weight=INT8_W, activation=INT8_A),
    jqat.Rule(".*", weight=INT8_W, activation=INT8_A),
  ]
  qm = qnn.quantize_model(TiedLM(), rules)
  v_init = _init(qm, ids)
  return qm, ids, v_init, _with_stats(qm, v_init, ids)


def test_same_parameter_tree_and_values_so_float_checkpoints_load(lm):
  qm, ids, vq, _ = lm
  model = TiedLM()
  vf = _init(model, ids)
  assert jax.tree.structure(vq["params"]) == jax.tree.structure(vf["params"])
  for a, b in zip(jax.tree.leaves(vq["params"]), jax.tree.leaves(vf["params"])):
    np.testing.assert_array_equal(a, b)
  # The float checkpoint runs in the quantized model: float output plus int8 noise.
  y = _apply(qm, {**vq, "params": vf["params"]}, ids)
  yf = _apply(model, vf, ids)
  rel = float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf))
  assert 0 < rel < 0.05, rel
  # Statistics sit under each op's module path, stacked by nn.scan like the parameters.
  stats = vq["quant_stats"]
  assert "lhs" in stats["layers"]["mlp"]["quant"] and "lhs" in stats["gemma"]["qkv_einsum"]["w_quant"]
  assert all(a.shape[0] == 2 for a in jax.tree.leaves(stats["layers"]))


def test_every_op_kind_is_quantized_and_served_equals_qat_with_s8_dots(lm):
  qm, ids, _, v = lm
  rows = qnn.report(qm, v, ids, print_table=False)
  kinds = {(r.path, r.op) for r in rows}
  expected = {
    ("embed", "embed"),
    ("embed", "attend"),
    ("layers/mlp", "dot"),
    ("layers/up", "dot"),
    ("layers/proj", "einsum"),
    ("layers/attn/query", "dot"),
    ("layers/attn/out", "dot"),
    ("gemma/qkv_einsum", "einsum"),
    ("gemma/gating", "einsum"),
  }
  assert expected <= kinds, expected - kinds
  assert all(r.weight.startswith("int8") for r in rows)
  assert all(r.activation.startswith("int8") for r in rows if r.op != "embed")  # a lookup has no activation
  served = _convert(qm, v, ids)
  # Every replaced float weight is gone, whatever its name (kernel, embedding, w, linear); biases and norms stay.
  left = {k[-1] for k in traverse_util.flatten_dict(served["params"])}
  assert left <= {"bias", "scale"}, left
  y, hlo = _served_and_hlo(qm, served, ids)
  np.testing.assert_allclose(y, _apply(qm, v, ids), rtol=1e-4, atol=1e-4)
  assert "s8" in hlo and "s32" in hlo


def test_weight_first_equations_match_the_fake_quant_reference():
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  block = GemmaBlock()
  qm = qnn.quantize_model(block, [jqat.Rule(".*", weight=INT8_W, activation=INT8_A)])
  v = _init(qm, x)
  w_qkv = v["params"]["qkv_einsum"]["w"]
  w_gate = v["params"]["gating"]["linear"]

  def fq(a, cfg):
    return jqat.fake_quant(a, jqat.qparams_from_array(a, cfg), cfg)

  # Fresh statistics: each activation is quantized with its batch's own range.
  qkv = jnp.einsum("BTD,CDNH->CBTNH", fq(x, INT8_A), fq(w_qkv, INT8_W.replace(channel_axis=(0, 2, 3))))
  h = qkv.sum(0).reshape(x.shape)
  ref = x + jnp.einsum("DF,BTD->BTF", fq(w_gate, INT8_W.replace(channel_axis=1)), fq(h, INT8_A))
  y = _apply(qm, v, x)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  # Not the same as the float block: the weights really are quantized.
  assert float(jnp.abs(y - _apply(block, v, x)).max()) > 1e-3


def test_scan_stacked_layers_calibrate_convert_and_serve(lm):
  qm, ids, v, _ = lm
  v = qnn.calibrate(qm, v, [ids, _ids(seed=1)], method="minmax")
  mlp = v["quant_stats"]["layers"]["mlp"]["quant"]["lhs"]
  assert mlp.frozen.shape == (2,) and bool(mlp.frozen.all())  # each layer of the stack has its own range
  assert float(jnp.abs(mlp.scale[0] - mlp.scale[1])) > 0
  served = _convert(qm, v, ids)
  values = served["serving"]["layers"]["mlp"]["quant"]["rhs"]["values"]
  assert values.shape == (2, 16, 16) and values.dtype == jnp.int8
  np.testing.assert_allclose(_apply(qm, served, ids), _apply(qm, v, ids), rtol=1e-4, atol=1e-4)


def test_first_rule_wins_and_a_float_rule_keeps_the_layer_float():
  img = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  model = ConvNet()
  qm = qnn.quantize_model(model, [jqat.Rule(".*head.*"), jqat.Rule(".*", weight=INT8_W, activation=INT8_A)])
  v = _with_stats(qm, _init(qm, img), img)
  assert sorted(v["quant_stats"]) == ["conv"]
  rows = {r.path: r for r in qnn.report(qm, v, img, print_table=False)}
  assert rows["head"].weight == "float" and rows["head"].rule == ".*head.*"
  assert rows["conv"].op == "conv" and rows["conv"].weight.startswith("int8")
  served = _convert(qm, v, img)
  assert "kernel" in served["params"]["head"] and "kernel" not in served["params"]["conv"]
  y, hlo = _served_and_hlo(qm, served, img)
  np.testing.assert_allclose(y, _apply(qm, v, img), rtol=1e-4, atol=1e-4)
  assert "s16" in hlo and "s32" in hlo  # the integer convolution


def test_a_rule_that_matches_nothing_raises_listing_the_paths():
  qm = qnn.quantize_model(ConvNet(), [jqat.Rule("encoder/.*", weight=INT8_W), jqat.Rule(".*", weight=INT8_W)])
  with pytest.raises(ValueError, match=r"matched no op.*'encoder/\.\*'.*'conv', 'head'"):
    qm.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))


@pytest.mark.parametrize("wcfg, limit", [(INT8_W, 0.27), (INT4_W, 0.15)])
def test_bytes_after_convert(wcfg, limit):
  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.DenseGeneral((2, 128), name="dg")(x).reshape(x.shape)
      x = nn.Conv(256, (1, 1), name="conv")(x[:, None])[:, 0]
      return GemmaEinsum((256, 256), name="w")("BD,DF->BF", x)

  x = jax.random.normal(jax.random.key(1), (4, 256))
  qm = qnn.quantize_model(Wide(), [jqat.Rule(".*", weight=wcfg, activation=INT8_A)])
  v = _with_stats(qm, _init(qm, x), x)
  served = _convert(qm, v, x)
  # int4 conv kernels pack two values per byte along their first (height) axis, which a 1x1 kernel lacks.
  for layer in ("dg", "conv", "w") if wcfg.bits.value == "int8" else ("dg", "w"):
    float_b = sum(a.nbytes for a in jax.tree.leaves(v["params"][layer]))
    served_b = sum(a.nbytes for a in jax.tree.leaves((served["params"].get(layer, {}), served["serving"][layer])))
    assert served_b <= limit * float_b, (layer, served_b / float_b)


class Counter(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="fc")(x)


JitCounter = nn.jit(Counter)


class JitModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return JitCounter(name="inner")(x)


def test_a_float_trace_cached_by_nn_jit_is_never_reused_quantized_nor_the_reverse():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = JitModel()
  qm = qnn.quantize_model(model)
  vf = model.init(jax.random.key(0), x)
  yf = model.apply(vf, x)  # traced and cached by nn.jit first
  vq = qm.init(jax.random.key(0), x)
  assert "quant_stats" in vq  # a fresh, quantized trace
  yq = qm.apply(vq, x)
  assert float(jnp.abs(yq - yf).max()) > 1e-4
  np.testing.assert_array_equal(model.apply(vf, x), yf)  # and the float model still runs float
  qm2 = qnn.quantize_model(JitModel(), [jqat.Rule(".*", weight=INT4_W, activation=INT8_A)])
  assert float(jnp.abs(qm2.apply(qm2.init(jax.random.key(0), x), x) - yq).max()) > 1e-4  # its own trace


def test_routing_is_scoped_to_the_call_and_the_thread():
  originals = (jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general)
  seen = {}

  class Threaded(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(), (8, 8))
      box = {}
      t = threading.Thread(target=lambda: box.update(y=jnp.einsum("bd,df->bf", x, w)))
      t.start()
      t.join()
      seen["other_thread"] = box["y"]
      seen["float"] = jnp.einsum("bd,df->bf", x, w + 0.0)  # a new array, not the parameter: not routed
      return jnp.einsum("bd,df->bf", x, w)

  x = jax.random.normal(jax.random.key(1), (4, 8))
  qm = qnn.quantize_model(Threaded())
  v = qm.init(jax.random.key(0), x)
  y = qm.apply(v, x)
  np.testing.assert_array_equal(seen["other_thread"], seen["float"])  # another thread: the plain einsum
  assert float(jnp.abs(y - seen["float"]).max()) > 1e-4  # this thread: quantized
  assert (jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general) == originals  # restored after the call
  with pytest.raises(RuntimeError):

    class Boom(nn.Module):
      @nn.compact
      def __call__(self, x):
        raise RuntimeError("model code failed")

    qnn.quantize_model(Boom()).init(jax.random.key(0), x)
  assert (jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general) == originals  # restored after an error too


class HFModule(nn.Module):
  """Hugging Face Flax style: layers made in setup, called from __call__."""

  def setup(self):
    self.fc1 = nn.Dense(32)
    self.fc2 = nn.Dense(10)

  def __call__(self, x):
    return self.fc2(nn.relu(self.fc1(x)))


class HFModel:
  """A FlaxPreTrainedModel-like wrapper: ``self.module.apply({"params": params}, ...)``."""

  def __init__(self, module, x):
    self.module = module
    self.params = module.init(jax.random.key(0), x)["params"]

  def __call__(self, x, params=None):
    return self.module.apply({"params": params if params is not None else self.params}, x)


def test_hugging_face_style_setup_layers_and_params_only_apply_train():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 64))
  hf = HFModel(HFModule(), x)
  float_params = hf.params
  hf.module = qnn.quantize_model(hf.module)  # the user's one-line change
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(hf(x, p), y).mean())(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, loss

  params, opt = float_params, tx.init(float_params)
  losses = []
  for _ in range(30):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  assert jax.tree.structure(params) == jax.tree.structure(float_params)
  hlo = jax.jit(hf).lower(x, params).compile().as_text()
  assert "s8" in hlo  # params-only apply quantizes (with each batch's own range)


def test_lsq_rule_under_a_param_override_that_needs_a_shape():
  lsq = jqat.QatConfig(bits="int8", per_channel=True, estimator="lsq")
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  qm = qnn.quantize_model(GemmaBlock(), [jqat.Rule(".*", weight=lsq, activation=INT8_A)])
  v = _init(qm, x)
  scales = [k for k in traverse_util.flatten_dict(v["params"]) if k[-1] == "rhs_scale"]
  assert scales  # LSQ's learned scales are parameters of the op (beside, not inside, the model's own)
  g = jax.grad(lambda p: qm.apply({**v, "params": p}, x).sum())(v["params"])
  assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g))


def test_report_prints_the_table_and_counts_a_tied_table_once(capsys):
  ids = _ids()
  qm = qnn.quantize_model(TiedLM())  # the default rules
  v = {"params": _init(TiedLM(), ids)["params"]}  # float variables will do
  rows = qnn.report(qm, v, ids)
  out = capsys.readouterr().out
  assert out.splitlines()[0].split()[:2] == ["path", "op"] and "total" in out
  by = {(r.path, r.op): r for r in rows}
  embed, attend = by[("embed", "embed")], by[("embed", "attend")]
  assert embed.float_bytes == 64 * 16 * 4 and attend.float_bytes == 0  # one table, counted once
  assert embed.weight == "int8 sym per-channel" and embed.activation == "float"  # default: embeddings weight-only
  mlp = by[("layers/mlp", "dot")]
  assert mlp.rhs_shape == (16, 16) and mlp.float_bytes == 2 * 16 * 16 * 4  # both layers of the scan stack
  assert mlp.serving_bytes == 2 * weight_serving_bytes((16, 16), INT8_W)


def test_other_methods_of_the_model_run_quantized_by_name():
  class AutoEncoder(nn.Module):
    def setup(self):
      self.enc = nn.Dense(4)
      self.dec = nn.Dense(8)

    def encode(self, x):
      return self.enc(x)

    def __call__(self, x):
      return self.dec(self.encode(x))

  x = jax.random.normal(jax.random.key(1), (2, 8))
  qm = qnn.quantize_model(AutoEncoder())
  v = _init(qm, x, method="encode")
  assert sorted(v["params"]) == sorted(v["quant_stats"]) == ["enc"]
  v = _init(qm, x)
  a, b = qm.apply(v, x, method="encode"), qm.apply(v, x, method=AutoEncoder.encode)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - AutoEncoder().apply(v, x, method="encode")).max()) > 1e-5  # quantized


class Scaled(nn.Module):
  """A wrapper that shares its child's scope (flax's LoRA pattern): no extra level in the parameter tree."""

  base: nn.Module

  def setup(self):
    nn.share_scope(self, self.base)

  def __call__(self, x):
    return 2.0 * self.base(x)


class RematModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Dense)(16, name="remat_fc")(x)
    return Scaled(nn.Dense(8, name="shared"))(nn.relu(x))


def test_remat_and_share_scope():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = RematModel()
  qm = qnn.quantize_model(model)
  v = _with_stats(qm, _init(qm, x), x)
  assert jax.tree.structure(v["params"]) == jax.tree.structure(_init(model, x)["params"])
  assert sorted(v["quant_stats"]) == ["remat_fc", "shared"]
  g = jax.jit(jax.grad(lambda p: qm.apply({**v, "params": p}, x).sum()))(v["params"])
  assert all(bool(jnp.isfinite(a).all()) and float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g))
  served = _convert(qm, v, x)
  assert sorted(traverse_util.flatten_dict(served["params"])) == [("remat_fc", "bias"), ("shared", "bias")]
  np.testing.assert_allclose(_apply(qm, served, x), _apply(qm, v, x), rtol=1e-4, atol=1e-4)

"""jqat.nnx.quantize_model on a model written with stock NNX layers only, and the NNX einsum, embedding and LSQ."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import jqat

VOCAB, D, HEADS, T = 16, 32, 2, 8


# --- a model in the style of flax's NNX examples: no jqat in it ---------------------------------


class Block(nnx.Module):
  def __init__(self, d, heads, *, rngs):
    # One einsum makes q, k and v; its output is led by a weight axis.
    self.qkv = nnx.Einsum("btd,sdnh->sbtnh", (3, d, heads, d // heads), rngs=rngs)
    self.out = nnx.LinearGeneral((heads, d // heads), d, axis=(-2, -1), rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    q, k, v = self.qkv(x)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    p = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    x = x + self.out(jnp.einsum("bnts,bsnh->btnh", p, v))
    return x + self.down(nnx.relu(self.up(x)))


class LM(nnx.Module):
  def __init__(self, *, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.conv = nnx.Conv(D, D, (3,), padding="CAUSAL", rngs=rngs)
    self.blocks = nnx.List([Block(D, HEADS, rngs=rngs)])
    self.lm_head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    x = x + self.conv(x)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(x) + self.lm_head(x)  # tied logits plus a float head


W8 = jqat.QatConfig(bits="int8", per_channel=True)
A8 = jqat.QatConfig(bits="int8", symmetric=False)
RULES = [
  jqat.Rule(".*lm_head"),
  jqat.Rule("embed", ops=("embed", "attend"), weight=W8),
  jqat.Rule(".*", weight=W8, activation=A8),
]
QUANTIZED = ["embed", "conv"] + [f"blocks/0/{n}" for n in ("qkv", "out", "up", "down")]


def _batch(seed, n=16):
  # Next token = current token + 1 (mod VOCAB): a task a two-block model learns in a few dozen steps.
  start = jax.random.randint(jax.random.key(seed), (n, 1), 0, VOCAB)
  ids = (start + jnp.arange(T + 1)) % VOCAB
  return ids[:, :-1], ids[:, 1:]


def _loss(model, ids, targets):
  return optax.softmax_cross_entropy_with_integer_labels(model(ids), targets).mean()


@nnx.jit
def _step(model, opt, ids, targets):
  loss, grads = nnx.value_and_grad(_loss)(model, ids, targets)
  opt.update(model, grads)
  return loss


def _params(model):
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def test_parameter_state_identical_to_the_unquantized_model():
  ref = _params(LM(rngs=nnx.Rngs(0)))
  model = jqat.nnx.quantize_model(LM(rngs=nnx.Rngs(0)), RULES)
  got = _params(model)
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])


def test_every_op_kind_is_covered_and_the_head_stays_float(capsys):
  model = jqat.nnx.quantize_model(LM(rngs=nnx.Rngs(0)), RULES)
  ids, _ = _batch(0)
  rows = jqat.nnx.report(model, ids)
  table = capsys.readouterr().out
  by = {(r.path, r.op): r for r in rows}
  assert {op for _, op in by} == {"dot", "einsum", "conv", "embed", "attend"}
  assert by[("lm_head", "dot")].weight == "float" and by[("lm_head", "dot")].rule == ".*lm_head"
  assert by[("blocks/0/qkv", "einsum")].rhs_shape == (3, D, HEADS, D // HEADS)
  assert by[("blocks/0/qkv", "einsum")].weight == "int8 sym per-channel"
  assert by[("embed", "attend")].lhs_shape == (16, T, D) and by[("embed", "attend")].float_bytes == 0  # one table
  assert {p for p, _ in by} == set(QUANTIZED) | {"lm_head"}
  assert "lm_head" in table and "total" in table


def test_quantizing_twice_changes_nothing():
  model = jqat.nnx.quantize_model(LM(rngs=nnx.Rngs(0)), RULES)
  before = nnx.graphdef(model)
  assert jqat.nnx.quantize_model(model, RULES) is model
  assert nnx.graphdef(model) == before


def test_report_counts_the_parameter_dtype():
  model = jqat.nnx.quantize_model(nnx.Linear(64, 32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  (row,) = jqat.nnx.report(model, jnp.ones((2, 64), jnp.bfloat16), print_table=False)
  assert row.float_bytes == 64 * 32 * 2
  assert row.serving_bytes == 64 * 32 + 32 * 2 * 4  # int8 values, a float32 scale and zero point per column


def test_a_rule_that_matches_nothing_raises_listing_the_paths():
  with pytest.raises(ValueError, match=r"'.*lm_haed'.*blocks/0/qkv.*lm_head"):
    jqat.nnx.quantize_model(LM(rngs=nnx.Rngs(0)), [jqat.Rule(".*lm_haed"), jqat.Rule(".*", weight=W8)])


def test_train_calibrate_convert_serve():
  model = jqat.nnx.quantize_model(LM(rngs=nnx.Rngs(0)), RULES)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  ids, targets = _batch(123, 64)
  losses = [float(_step(model, opt, *_batch(i))) for i in range(40)]
  before, after = losses[0], np.mean(losses[-5:])
  assert after < 0.5 * before, (before, after)
  jqat.nnx.calibrate(model, [_batch(i)[0] for i in range(2)], method="minmax")
  model.eval()
  y_qat = nnx.jit(lambda m, x: m(x))(model, ids)
  head = np.asarray(model.lm_head.kernel[...])
  jqat.nnx.convert(model)
  for path in QUANTIZED:
    layer = eval("model." + re.sub(r"/(\d+)", r"[\1]", path).replace("/", "."))  # noqa: S307 (a path of this test)
    assert isinstance(layer.embedding if path == "embed" else layer.kernel, jqat.nnx.KernelShape), path
  np.testing.assert_array_equal(model.lm_head.kernel[...], head)
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, ids).compile()
  y_serve = compiled(state, ids)
  # Serving computes the QAT numbers up to float rounding; through attention and the MLP a rounding that moves
  # one activation to the next integer level shows in a few rows.
  close = np.isclose(y_serve, y_qat, rtol=1e-4, atol=1e-4)
  assert close.mean() > 0.9, close.mean()
  assert float(jnp.mean(jnp.argmax(y_serve, -1) == jnp.argmax(y_qat, -1))) >= 0.99
  hlo = compiled.as_text()
  s8_dots = [line for line in hlo.splitlines() if re.search(r"= s32\[[\d,]*\]\S* (dot|convolution)\(", line)]
  # qkv, out, up, down; the conv accumulates in int32 too.
  assert len(s8_dots) >= 5, "\n".join(s8_dots)
  assert float(optax.softmax_cross_entropy_with_integer_labels(y_serve, targets).mean()) < 0.5 * before


@pytest.mark.parametrize("bits, limit", [("int8", 0.27), ("int4", 0.15)])
def test_serving_bytes_after_convert(bits, limit):
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      # At least 256 inputs: the scales, zero points and column sums cost 12 bytes per output column.
      self.fc = nnx.Linear(256, 64, rngs=rngs)
      self.proj = nnx.LinearGeneral(256, (2, 32), rngs=rngs)
      self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      return self.head(self.fc(x) + self.proj(x).reshape(x.shape[0], -1))

  w = jqat.QatConfig(bits=bits, per_channel=True)
  model = jqat.nnx.quantize_model(Mlp(nnx.Rngs(0)), [jqat.Rule("head"), jqat.Rule(".*", weight=w, activation=A8)])
  model(jnp.ones((4, 256)))
  jqat.nnx.convert(model)
  for name, float_bytes in (("fc", 256 * 64 * 4), ("proj", 256 * 64 * 4)):
    layer = getattr(model, name)
    served = sum(a.nbytes for a in jax.tree.leaves(nnx.state(layer)) if a.ndim and a.size > 1)
    assert served <= limit * float_bytes, (name, served / float_bytes)
    assert not jax.tree.leaves(nnx.state(layer, nnx.Param)) or all(
      v.shape in ((64,), (2, 32)) for v in jax.tree.leaves(nnx.state(layer, nnx.Param))
    )  # only the bias is left
  assert model.head.kernel[...].shape == (64, 10)


def test_tied_embedding_is_one_table_for_lookup_and_attend():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
      self.also = self.embed  # a second reference to the same module

    def __call__(self, ids):
      return self.also.attend(self.embed(ids))

  model = jqat.nnx.quantize_model(Tied(nnx.Rngs(0)))
  assert model.also is model.embed and isinstance(model.embed, jqat.nnx.QatEmbed)
  table = np.asarray(model.embed.embedding[...])
  ids = jnp.arange(VOCAB)[None]
  y_qat = model(ids)
  jqat.nnx.convert(model)
  assert isinstance(model.embed.embedding, jqat.nnx.KernelShape)
  serving = [a for a in jax.tree.leaves(nnx.state(model, jqat.nnx.QuantServing)) if a.shape == (VOCAB, D)]
  assert len(serving) == 1 and serving[0].dtype == jnp.int8
  rows = model.embed(ids)[0]
  scale = np.abs(table).max(axis=1, keepdims=True) / 127  # one scale per row
  np.testing.assert_allclose(rows, np.round(table / scale) * scale, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(model(ids), y_qat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_qat_embed_serves_int4_and_int8_rows(bits):
  emb = jqat.nnx.QatEmbed(7, 6, weight_config=jqat.QatConfig(bits=bits, per_channel=True), rngs=nnx.Rngs(1))
  ids = jnp.array([[0, 3, 6], [5, 1, 2]])
  y_qat, a_qat = emb(ids), emb.attend(jnp.ones((2, 6)))
  jqat.nnx.convert(emb)
  np.testing.assert_array_equal(emb(ids), y_qat)
  np.testing.assert_allclose(emb.attend(jnp.ones((2, 6))), a_qat, rtol=1e-5, atol=1e-6)


def test_einsum_op_under_jit_and_grad():
  # A naive einsum_op (jnp.einsum with a quantized _dot_general) fails here with
  # "Cannot mutate QuantStat from a different trace level".
  layer = nnx.Einsum("bsd,ckdh->cbskh", (3, 2, 4, 5), einsum_op=jqat.nnx.QatEinsumOp(), rngs=nnx.Rngs(0))
  ref = nnx.Einsum("bsd,ckdh->cbskh", (3, 2, 4, 5), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 7, 4))
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
  assert int(layer.einsum_op.lhs_stats.get_value().ema.count) == x.size
  assert grads["kernel"][...].shape == (3, 2, 4, 5)
  y, want = layer(x), ref(x)
  assert y.shape == want.shape == (3, 2, 7, 2, 5)
  rel = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
  assert 0 < rel < 0.03
  jqat.nnx.set_mode(layer, "float")
  np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)


def test_qat_einsum_per_channel_axes_are_the_kernel_free_axes():
  layer = jqat.nnx.QatEinsum("...d,dnh->...nh", (4, 2, 3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  y_qat = layer(x)
  jqat.nnx.convert(layer)
  entry = layer.einsum_op.rhs_serving.get_value()
  assert entry["values"].dtype == jnp.int8 and entry["scale"].shape == (1, 2, 3)
  np.testing.assert_allclose(layer(x), y_qat, rtol=1e-4, atol=1e-5)


def test_lsq_scales_are_params_with_fake_quant_gradients():
  w_cfg = jqat.QatConfig(per_channel=True, estimator="lsq")
  a_cfg = jqat.QatConfig(symmetric=False, estimator="lsq")
  layer = jqat.nnx.QatDense(4, 3, weight_config=w_cfg, activation_config=a_cfg, rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  assert {"lhs_scale", "lhs_zero_point", "rhs_scale"} <= set(params["dot_general"])
  x = jax.random.normal(jax.random.key(0), (8, 4))
  layer(x)  # the first training batch sets the activation scale
  kernel = layer.kernel[...]
  s_l, z_l = layer.dot_general.lhs_scale[...], layer.dot_general.lhs_zero_point[...]
  s_r = layer.dot_general.rhs_scale[...]
  np.testing.assert_allclose(s_r, jqat.qparams_from_array(kernel, w_cfg).scale, rtol=1e-6)

  def ref(s_l, z_l, s_r):
    xq = jqat.fake_quant(x, jqat.QParams(s_l, z_l), a_cfg)
    wq = jqat.fake_quant(kernel, jqat.QParams(s_r, jnp.zeros_like(s_r)), w_cfg)
    return jnp.sum(jnp.sin(xq @ wq + layer.bias[...]))

  want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(s_l, z_l, s_r)
  layer.eval()
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)))))(layer)["dot_general"]
  for got, w in zip((g["lhs_scale"][...], g["lhs_zero_point"][...], g["rhs_scale"][...]), want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(want[2]).sum()) > 0


def test_lsq_trains_and_serves():
  w_cfg = jqat.QatConfig(per_channel=True, estimator="lsq")
  a_cfg = jqat.QatConfig(symmetric=False, estimator="lsq")
  layer = jqat.nnx.QatDense(4, 3, weight_config=w_cfg, activation_config=a_cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (16, 4))
  s0 = np.asarray(layer.dot_general.rhs_scale[...])
  batch_scale = float(jqat.qparams_from_array(x, a_cfg).scale)

  @nnx.jit
  def step(m, opt):
    g = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
    opt.update(m, g)

  step(layer, opt)  # the first step sets the activation scale from the batch (its gradient is zero then)
  assert bool(layer.dot_general.lhs_lsq_ready[...])
  np.testing.assert_allclose(float(layer.dot_general.lhs_scale[...]), batch_scale, rtol=1e-6)
  for _ in range(4):
    step(layer, opt)
  assert not np.allclose(layer.dot_general.rhs_scale[...], s0)
  assert float(layer.dot_general.lhs_scale[...]) != batch_scale  # learned from the second step on
  layer.eval()
  y_qat = layer(x)
  jqat.nnx.convert(layer)
  np.testing.assert_allclose(layer(x), y_qat, rtol=1e-4, atol=1e-5)


def test_conv_serves_with_an_integer_convolution():
  conv = jqat.nnx.QatConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  conv(x)
  conv.eval()
  y_qat = conv(x)
  jqat.nnx.convert(conv)
  assert isinstance(conv.kernel, jqat.nnx.KernelShape)
  f = jax.jit(lambda s, x: nnx.merge(nnx.graphdef(conv), s)(x)).lower(nnx.state(conv), x).compile()
  np.testing.assert_allclose(f(nnx.state(conv), x), y_qat, rtol=1e-4, atol=1e-4)
  hlo = f.as_text()
  assert re.search(r"= s32\[[\d,]*\]\S* convolution\(", hlo), hlo


def test_hooks_of_stock_layers_left_alone_when_custom():
  custom = nnx.Linear(3, 2, dot_general=lambda *a, **k: lax.dot_general(*a, **k), rngs=nnx.Rngs(0))
  jqat.nnx.quantize_model(custom)
  assert not isinstance(custom.dot_general, jqat.nnx.QatDotGeneral)

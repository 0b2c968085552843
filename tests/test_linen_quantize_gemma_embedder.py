"""quantize_model on gemma's tied embedding: a lookup ``table[(ids,)]`` and tied logits ``jnp.dot(x, table.T)``."""

import re
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.numpy import indexing as jnp_indexing

import jqat
from jqat import linen as qnn

VOCAB, DIM = 64, 16
INT8_W = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
INT4_W = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
INT8_A = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)


# --- gemma's modules, as its linen code writes them (no jqat inside) -------------------------------------------


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param(
      "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
    )

  def encode(self, x):
    x = self.input_embedding_table[(x,)]
    x *= jnp.sqrt(self.embed_dim).astype(x.dtype)
    return x

  def decode(self, x):
    return jnp.dot(x, self.input_embedding_table.T)


class Einsum(nn.Module):
  shape: tuple

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param("w", nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w)


class Decoder(nn.Module):
  vocab: int = VOCAB
  dim: int = DIM

  def setup(self):
    self.embedder = Embedder(vocab_size=self.vocab, embed_dim=self.dim)
    self.proj = Einsum((self.dim, self.dim))

  def hidden(self, ids):
    return self.proj("BTD,DF->BTF", self.embedder.encode(ids))

  def logits(self, h):
    return self.embedder.decode(h)

  def __call__(self, ids):
    return self.logits(self.hidden(ids))


def _ids(seed=0, vocab=VOCAB):
  return jax.random.randint(jax.random.key(seed), (2, 5), 0, vocab)


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _init(model, *args):
  return jax.jit(model.init)(jax.random.key(0), *args)


# --- an independent reference: NumPy fake quantization, straight-through in JAX --------------------------------


def _np_rows(t, bits=8):
  """Symmetric per-row fake quantization of a 2-D table, in NumPy."""
  t = np.asarray(t, np.float64)
  qmax = 2 ** (bits - 1) - 1
  s = np.abs(t).max(axis=1, keepdims=True) / qmax
  return (np.clip(np.round(t / s), -qmax - 1, qmax) * s).astype(np.float32)


def _np_tensor_asym(x):
  """Asymmetric per-tensor int8 fake quantization (range includes 0), in NumPy."""
  x = np.asarray(x, np.float64)
  lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
  s = (hi - lo) / 255
  z = np.round(-128 - lo / s)
  return ((np.clip(np.round(x / s) + z, -128, 127) - z) * s).astype(np.float32)


def _ste(a, q):
  # The value of q with the identity gradient: nothing clips here (the ranges are the operands' own), so the
  # straight-through mask is all ones.
  return a + jax.lax.stop_gradient(jnp.asarray(q) - a)


def _reference(params, ids):
  """The decoder with the quantized values computed in NumPy from ``params``; a function of the parameters that
  takes its values and the identity gradient."""
  table, w = params["embedder"]["input_embedding"], params["proj"]["w"]
  tq, wq = _np_rows(table), _np_rows(np.asarray(w).T).T  # the einsum's weight: per output channel (F)
  xq = _np_tensor_asym(tq[np.asarray(ids)] * np.sqrt(DIM))

  def f(p):
    t = _ste(p["embedder"]["input_embedding"], tq)
    x = _ste(t[(ids,)] * jnp.sqrt(DIM), xq)
    h = jnp.einsum("BTD,DF->BTF", x, _ste(p["proj"]["w"], wq))
    return jnp.dot(h, t.T)  # weight-only: the activation of the tied logits stays float

  return f


@pytest.fixture(scope="module")
def dec():
  ids = _ids()
  qm = qnn.quantize_model(Decoder())  # jqat's default rules
  v = _init(qm, ids)
  return qm, ids, v


def test_same_tree_and_qat_forward_and_ste_grads_match_the_reference(dec):
  qm, ids, v = dec
  vf = _init(Decoder(), ids)
  assert jax.tree.structure(v["params"]) == jax.tree.structure(vf["params"])

  def loss(p, fn):
    return (fn(p) * jnp.arange(VOCAB)).sum()

  def qat(p):
    return qm.apply({"params": p}, ids)

  ref = _reference(v["params"], ids)

  y = jax.jit(qat)(v["params"])
  np.testing.assert_allclose(y, ref(v["params"]), rtol=1e-4, atol=1e-8)
  yf = Decoder().apply(vf, ids)
  assert _rel(y, yf) > 1e-3  # really quantized
  g = jax.jit(jax.grad(lambda p: loss(p, qat)))(v["params"])
  g_ref = jax.jit(jax.grad(lambda p: loss(p, ref)))(v["params"])
  np.testing.assert_allclose(g["embedder"]["input_embedding"], g_ref["embedder"]["input_embedding"], atol=1e-3)
  np.testing.assert_allclose(g["proj"]["w"], g_ref["proj"]["w"], rtol=1e-4, atol=1e-3)
  assert float(jnp.abs(g["embedder"]["input_embedding"]).sum()) > 0


@pytest.mark.parametrize("wcfg, limit", [(INT8_W, 0.27), (INT4_W, 0.15)])
def test_convert_drops_the_table_and_serving_equals_qat(wcfg, limit):
  ids = _ids(vocab=32)
  rules = [
    jqat.Rule("embedder", ops=("embed", "attend"), weight=wcfg),
    jqat.Rule(".*", weight=INT8_W, activation=INT8_A),
  ]
  qm = qnn.quantize_model(Decoder(vocab=32, dim=256), rules)  # wide rows: the per-row scales weigh little
  v = _init(qm, ids)
  _, stats = jax.jit(lambda v: qm.apply(v, ids, mutable=["quant_stats"]))(v)
  v = {**v, **stats}
  served = jax.jit(lambda v: qnn.convert(qm, v, ids))(v)
  assert "input_embedding" not in served["params"].get("embedder", {})
  assert "w" not in served["params"].get("proj", {})
  entry = served["serving"]["embedder"]["input_embedding_quant"]["rhs"]
  float_b = v["params"]["embedder"]["input_embedding"].nbytes
  served_b = sum(a.nbytes for a in jax.tree.leaves(served["serving"]["embedder"]))
  assert served_b <= limit * float_b, served_b / float_b
  # int8: one byte a value; int4: two rows a byte (packed along the vocab axis, as QatEmbed stores it).
  packed = wcfg.bits.is_packed
  assert entry["values"].dtype == (jnp.uint8 if packed else jnp.int8)
  assert entry["values"].shape == ((16 if packed else 32), 256)
  qat = jax.jit(qm.apply)(v, ids)
  np.testing.assert_allclose(jax.jit(qm.apply)(served, ids), qat, rtol=1e-4, atol=1e-4)
  # The served tied logits alone. Weight-only over the table's feature axis lowers to the integer table as the
  # program's input, converted to float next to a float dot (jqat's weight-only path); no float table goes in.
  h = jax.jit(lambda v: qm.apply(v, ids, method="hidden"))(v)
  lowered = jax.jit(lambda v, h: qm.apply(v, h, method="logits")).lower(served, h)
  compiled = lowered.compile()
  np.testing.assert_allclose(compiled(served, h), qat, rtol=1e-4, atol=1e-4)
  main = next(line for line in lowered.as_text().splitlines() if "func.func public @main" in line)
  assert ("tensor<16x256xui8>" if packed else "tensor<32x256xi8>") in main, main
  assert "tensor<32x256xf32>" not in main, main
  hlo = compiled.as_text()
  assert re.search(r"= s8\[(16|32),256\]\S* (parameter|convert)\(", hlo), hlo
  assert re.search(r"= f32\[(32|16,2),256\]\S* convert\(", hlo) and " dot(" in hlo, hlo


def test_report_lists_the_lookup_and_the_tied_logits_once(dec):
  qm, ids, v = dec
  rows = {(r.path, r.op): r for r in qnn.report(qm, v, ids, print_table=False)}
  embed, attend = rows[("embedder", "embed")], rows[("embedder", "attend")]
  assert embed.rhs_shape == attend.rhs_shape == (VOCAB, DIM)
  assert embed.weight == attend.weight == "int8 sym per-channel"
  assert embed.activation == attend.activation == "float"  # default rules: embeddings weight-only
  assert embed.float_bytes == VOCAB * DIM * 4 and attend.float_bytes == 0  # one table, counted once
  assert rows[("proj", "einsum")].activation.startswith("int8")


def test_rules_with_two_formats_for_one_table_raise():
  rules = [jqat.Rule(".*", ops=("embed",), weight=INT8_W), jqat.Rule(".*", weight=INT4_W)]
  with pytest.raises(ValueError, match="tied embedding at 'embedder'"):
    qnn.quantize_model(Decoder(), rules).init(jax.random.key(0), _ids())


class Ops(nn.Module):
  """A table looked up three ways; a weight contracted by ``@`` and through its transposes."""

  @nn.compact
  def __call__(self, ids):
    table = self.param("table", nn.initializers.normal(), (VOCAB, DIM))
    w = self.param("w", nn.initializers.normal(), (DIM, DIM))
    x = table[ids] + jnp.take(table, ids, axis=0) + table[(ids,)]
    h = x @ w
    return h @ w.T + jnp.dot(h, jnp.swapaxes(w, 0, 1)) + jnp.einsum("btd,fd->btf", h, jnp.transpose(w))


def test_matmul_operator_transposes_and_every_lookup_form_are_quantized():
  ids = _ids()
  rules = [jqat.Rule(".*", ops=("embed",), weight=INT8_W), jqat.Rule(".*", weight=INT8_W)]  # weight-only
  qm = qnn.quantize_model(Ops(), rules)
  v = _init(qm, ids)
  table, w = np.asarray(v["params"]["table"]), np.asarray(v["params"]["w"])
  # Per output channel: w's columns for h @ w (and the einsum, whose f is w's axis 1), its rows for h @ w.T.
  w_cols, w_rows = _np_rows(w.T).T, _np_rows(w)
  h = (3 * _np_rows(table)[np.asarray(ids)]) @ w_cols
  ref = 2 * (h @ w_rows.T) + h @ w_cols
  y = jax.jit(qm.apply)(v, ids)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-8)
  assert _rel(y, Ops().apply(v, ids)) > 1e-3
  ops = sorted((r.op, r.rhs_shape, r.weight) for r in qnn.report(qm, v, ids, print_table=False))
  assert ops == [("dot", (DIM, DIM), "int8 sym per-channel")] * 3 + [("einsum", (DIM, DIM), "int8 sym per-channel")] + [
    ("embed", (VOCAB, DIM), "int8 sym per-channel")
  ]


def test_routing_does_not_leak_to_float_models_in_this_or_another_thread():
  ids = _ids()
  model = Decoder()
  vf = _init(model, ids)
  y_float = model.apply(vf, ids)  # eager, the plain functions
  patched = (jnp.transpose, jnp.swapaxes, jnp.take, jnp.matmul, jnp_indexing.rewriting_take)
  box = {}

  class Spawner(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      t = threading.Thread(target=lambda: box.update(y=model.apply(vf, ids)))  # the concrete ids, eagerly
      t.start()
      t.join()
      return Decoder(name="inner")(tokens)

  qm = qnn.quantize_model(Spawner())
  qv = _init(qm, ids)
  y_q = jax.jit(qm.apply)(qv, ids)  # traced (the thread runs the float model eagerly) while the routing is on
  np.testing.assert_array_equal(box["y"], y_float)  # another thread, while the quantized model ran
  np.testing.assert_array_equal(model.apply(vf, ids), y_float)  # this thread, after
  assert _rel(y_q, model.apply({"params": qv["params"]["inner"]}, ids)) > 1e-3
  assert (jnp.transpose, jnp.swapaxes, jnp.take, jnp.matmul, jnp_indexing.rewriting_take) == patched


class Transposed(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (8, 6))  # (in, out)
    a = jax.lax.dot_general(x, w.T.T, (((1,), (0,)), ((), ())))  # a transpose of a transpose: w itself
    b = jax.lax.dot_general(w.T, x, (((1,), (1,)), ((), ())))  # the weight first: (out, batch)
    c = jnp.einsum("fd,bd->bf", w.T, x)  # the weight first, transposed, in an equation
    return a, b.T, c


def test_dot_general_and_weight_first_transposes_quantize_the_parameter_per_output_channel():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  qm = qnn.quantize_model(Transposed(), [jqat.Rule(".*", weight=INT8_W)])
  v = _init(qm, x)
  w = np.asarray(v["params"]["w"])
  ref = np.asarray(x) @ _np_rows(w.T).T  # per output channel: w's columns, whichever way the operand is written
  for y in jax.jit(qm.apply)(v, x):
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert _rel(ref, np.asarray(x) @ w) > 1e-3

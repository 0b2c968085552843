"""QatEinsum and QatEmbed: stock parameters, the fake-quant oracle, calibration, conversion, integer serving."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jqat
from jqat import linen as qnn

INT8_W = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
INT4_W = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
INT8_A = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)


def _fq_einsum(eq, x, w, w_axes):
  """Reference: einsum of the fake-quantized operands (activation: its own range, weight: per channel)."""
  xq = jqat.fake_quant(x, jqat.qparams_from_array(x, INT8_A), INT8_A)
  wcfg = INT8_W.replace(channel_axis=w_axes)
  wq = jqat.fake_quant(w, jqat.qparams_from_array(w, wcfg), wcfg)
  return jnp.einsum(eq, xq, wq)


def _nbytes(tree):
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "shape, eq, x_shape, w_axes",
  [
    ((6, 2, 4), "btd,dnh->btnh", (2, 3, 6), (1, 2)),
    ((6, 5), "...d,df->...f", (2, 3, 6), 1),  # ellipsis
    ((3, 6, 4), "bsd,kdh->kbsh", (2, 5, 6), (0, 2)),  # a weight axis leads the output
  ],
)
def test_qat_einsum_is_the_fake_quant_einsum_with_nn_einsum_parameters(shape, eq, x_shape, w_axes):
  x = jax.random.normal(jax.random.key(1), x_shape)
  v = qnn.QatEinsum(shape, eq, use_bias=False).init(jax.random.key(0), x)
  stock = nn.Einsum(shape, eq, use_bias=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(v["params"]["kernel"], stock["params"]["kernel"])
  # Fresh statistics: the activation uses the batch's own range, as the reference does.
  y = qnn.QatEinsum(shape, eq, use_bias=False).apply(v, x)
  ref = _fq_einsum(eq, x, v["params"]["kernel"], w_axes)
  assert y.shape == jnp.einsum(eq, x, v["params"]["kernel"]).shape
  # The integer dot and the float einsum of the same quantized operands differ by float rounding only.
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_qat_einsum_with_bias_calibrates_converts_and_serves_the_integer_path():
  x = jax.random.normal(jax.random.key(1), (4, 3, 256))
  layer = qnn.QatEinsum((256, 2, 32), "btd,dnh->btnh")
  v = layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v["params"]) == {"bias": (2, 32), "kernel": (256, 2, 32)}
  v = qnn.calibrate(layer, v, [x, x * 0.5], method="minmax")
  served = jax.jit(lambda v, x: qnn.convert(layer, v, x))(v, x)
  assert sorted(served["params"]) == ["bias"]  # the float kernel is gone
  f = jax.jit(layer.apply)
  np.testing.assert_allclose(f(served, x), f(v, x), rtol=1e-5, atol=1e-5)
  hlo = f.lower(served, x).compile().as_text()
  assert "s8" in hlo and "s32" in hlo
  kernel_bytes = 256 * 2 * 32 * 4
  assert _nbytes(served["serving"]) <= 0.27 * kernel_bytes


def test_bad_fields_and_equations_raise_in_the_layers_words():
  with pytest.raises(ValueError, match="explicit"):
    qnn.QatEinsum((3, 4), "bd,df").init(jax.random.key(0), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="momentum"):
    qnn.QatEinsum((3, 4), "bd,df->bf", momentum=2.0)
  with pytest.raises(TypeError, match="weight_config"):
    qnn.QatEmbed(8, 4, weight_config=8)
  with pytest.raises(ValueError, match="integer ids"):
    qnn.QatEmbed(8, 4).init(jax.random.key(0), jnp.ones((2,)))
  v = qnn.QatEmbed(8, 4).init(jax.random.key(0), jnp.array([1]))
  with pytest.raises(ValueError, match=r"4 features.*\(2, 3\)"):
    qnn.QatEmbed(8, 4).apply(v, jnp.ones((2, 3)), method="attend")


class TiedLM(nn.Module):
  vocab: int = 64
  dim: int = 16
  embed: type = nn.Embed

  @nn.compact
  def __call__(self, ids):
    emb = self.embed(self.vocab, self.dim, name="embed")
    h = nn.Dense(self.dim, name="mix")(emb(ids))
    return emb.attend(h)


def test_qat_embed_keeps_nn_embed_parameters_and_quantizes_rows():
  ids = jnp.array([[0, 3, 3, 7]])
  v = qnn.QatEmbed(16, 8).init(jax.random.key(0), ids)
  stock = nn.Embed(16, 8).init(jax.random.key(0), ids)
  assert jax.tree.structure(v["params"]) == jax.tree.structure(stock["params"])
  table = v["params"]["embedding"]
  np.testing.assert_array_equal(table, stock["params"]["embedding"])
  rows = qnn.QatEmbed(16, 8).apply(v, ids)
  cfg = INT8_W.replace(channel_axis=0)
  ref = jqat.fake_quant(table, jqat.qparams_from_array(table, cfg), cfg)[ids]
  np.testing.assert_array_equal(rows, ref)  # gathering first quantizes each row with its own scale: the same bits
  # Straight-through: the gradient of the sum of looked-up rows counts each id's uses.
  g = jax.grad(lambda p: qnn.QatEmbed(16, 8).apply({"params": p}, ids).sum())(v["params"])["embedding"]
  counts = np.bincount(np.asarray(ids).ravel(), minlength=16)[:, None] * np.ones((1, 8))
  np.testing.assert_array_equal(g, counts)


def test_qat_embed_attend_is_the_fake_quant_tied_logits():
  ids = jnp.array([[1, 2, 5]])
  q = jax.random.normal(jax.random.key(3), (1, 3, 8))
  emb = qnn.QatEmbed(16, 8)
  v = emb.init(jax.random.key(0), ids, method=lambda m, i: m.attend(m(i)))
  table = v["params"]["embedding"]
  y = emb.apply(v, q, method="attend")
  ref = _fq_einsum("btd,vd->btv", q, table, 0)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wcfg, limit", [(INT8_W, 0.27), (INT4_W, 0.15)])
def test_tied_embedding_serves_one_quantized_table(wcfg, limit):
  vocab, dim = 256, 256
  embed = lambda *a, **k: qnn.QatEmbed(*a, weight_config=wcfg, **k)  # noqa: E731
  model = TiedLM(vocab=vocab, dim=dim, embed=embed)
  ids = jax.random.randint(jax.random.key(2), (2, 8), 0, vocab)
  v = jax.jit(model.init)(jax.random.key(0), ids)
  v = qnn.calibrate(model, v, [ids], method="minmax")
  served = jax.jit(lambda v, x: qnn.convert(model, v, x))(v, ids)
  assert "embed" not in served["params"]  # the float table is gone
  flat = traverse_util.flatten_dict(served["serving"]["embed"])
  tables = [k for k, a in flat.items() if a.ndim == 2 and a.shape[1] == dim and a.dtype in (jnp.int8, jnp.uint8)]
  assert tables == [("attend", "rhs", "values")], flat.keys()  # one table serves lookup and attend
  assert _nbytes(served["serving"]["embed"]) <= limit * vocab * dim * 4
  f = jax.jit(model.apply)
  np.testing.assert_allclose(f(served, ids), f(v, ids), rtol=1e-5, atol=1e-4)
  # The lookup alone (packed int4 rows are unpacked from their nibbles) equals the QAT rows exactly.
  emb_served = jax.jit(lambda s, i: embed(vocab, dim).apply({"params": {}, "serving": s}, i))
  emb_qat = embed(vocab, dim).apply({"params": v["params"]["embed"]}, ids)
  np.testing.assert_array_equal(emb_served(served["serving"]["embed"], ids), emb_qat)
  hlo = f.lower(served, ids).compile().as_text()
  assert "s8" in hlo and "s32" in hlo

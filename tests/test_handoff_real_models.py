"""Save, export and hand off models written the way others write them, not with jqat's layers.

Two small decoders, quantized by rules, calibrated and converted, then taken through Orbax, ``jax.export``,
compressed-tensors and GGUF, each checked by that format's own library:

* gemma's linen style (google-deepmind/gemma): its own ``Einsum`` modules holding ``w``, an ``Embedder`` whose one
  table serves the lookup and the tied logits, RMSNorm, a gated MLP of einsums (Gemma 2/3's transposed gating
  weight ``(2, F, D)``), attention with q / kv / output einsums; ``jqat.linen.quantize_model``.
* Hugging Face's NNX style: ``nnx.Linear`` q/k/v/o and gate/up/down projections, ``nnx.Embed``, an untied
  ``lm_head``; ``jqat.nnx.quantize_model``.
"""

from __future__ import annotations

import functools
import json
import os
import re

import flax
import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jqat

VOCAB, D, N, H, F, LAYERS = 64, 32, 2, 16, 64, 2
W8 = jqat.QatConfig(bits="int8", per_channel=True)
A8 = jqat.QatConfig(bits="int8", symmetric=False)
GT = gguf.GGMLQuantizationType


# --- gemma, as its linen code writes it (no jqat inside) --------------------------------------------------------


class Einsum(nn.Module):
  shape: tuple
  weight_name: str = "w"

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param(self.weight_name, nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param(
      "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
    )

  def encode(self, x):
    x = self.input_embedding_table[(x,)]
    return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

  def decode(self, x):
    return jnp.dot(x, self.input_embedding_table.T)


class Attention(nn.Module):
  def setup(self):
    self.q_einsum = Einsum((N, D, H))
    self.kv_einsum = Einsum((2, N, D, H))
    self.attn_vec_einsum = Einsum((N, H, D))

  def __call__(self, x):
    q = self.q_einsum("BTD,NDH->BTNH", x)
    k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * H**-0.5, k)
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, :, None, :]
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    return self.attn_vec_einsum("BTNH,NHD->BTD", jnp.einsum("BTNS,BSNH->BTNH", probs, v))


class FeedForward(nn.Module):
  @nn.compact
  def __call__(self, x):
    gate = Einsum((2, F, D), weight_name="gating_einsum")("...F,NHF->...NH", x)  # transpose_gating_einsum
    return Einsum((F, D), weight_name="linear")("...H,HF->...F", nn.gelu(gate[..., 0, :]) * gate[..., 1, :])


class Block(nn.Module):
  def setup(self):
    self.pre_attention_norm = RMSNorm()
    self.attn = Attention()
    self.pre_ffw_norm = RMSNorm()
    self.mlp = FeedForward()

  def __call__(self, x):
    x = x + self.attn(self.pre_attention_norm(x))
    return x + self.mlp(self.pre_ffw_norm(x))


class Gemma(nn.Module):
  def setup(self):
    self.embedder = Embedder(VOCAB, D)
    self.blocks = [Block(name=f"layer_{i}") for i in range(LAYERS)]
    self.final_norm = RMSNorm()

  def __call__(self, ids):
    x = self.embedder.encode(ids)
    for block in self.blocks:
      x = block(x)
    return self.embedder.decode(self.final_norm(x))


W4A = jqat.QatConfig(bits="int4", per_channel=True, symmetric=False)
# int8 embedding (lookup and tied logits, weight-only), W8A8 attention, weight-only asymmetric int4 (packed) MLP.
GEMMA_RULES = [
  jqat.Rule("embedder", ops=("embed", "attend"), weight=W8),
  jqat.Rule(".*/mlp/.*", weight=W4A),
  jqat.Rule(".*", weight=W8, activation=A8),
]


# --- Hugging Face's decoder, as NNX code writes it ---------------------------------------------------------------


class HfRMSNorm(nnx.Module):
  def __init__(self, d):
    self.weight = nnx.Param(jnp.ones((d,)))

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.weight[...]


class HfAttention(nnx.Module):
  def __init__(self, rngs):
    self.q_proj, self.k_proj, self.v_proj = (nnx.Linear(D, N * H, use_bias=False, rngs=rngs) for _ in range(3))
    self.o_proj = nnx.Linear(N * H, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (p(x).reshape(b, t, N, H) for p in (self.q_proj, self.k_proj, self.v_proj))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * H**-0.5
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9), -1)
    return self.o_proj(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, N * H))


class HfMLP(nnx.Module):
  def __init__(self, rngs):
    self.gate_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class HfDecoderLayer(nnx.Module):
  def __init__(self, rngs):
    self.input_layernorm = HfRMSNorm(D)
    self.self_attn = HfAttention(rngs)
    self.post_attention_layernorm = HfRMSNorm(D)
    self.mlp = HfMLP(rngs)

  def __call__(self, x):
    x = x + self.self_attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class HfModel(nnx.Module):
  def __init__(self, rngs):
    self.embed_tokens = nnx.Embed(VOCAB, D, rngs=rngs)
    self.layers = nnx.List([HfDecoderLayer(rngs) for _ in range(LAYERS)])
    self.norm = HfRMSNorm(D)

  def __call__(self, ids):
    x = self.embed_tokens(ids)
    for layer in self.layers:
      x = layer(x)
    return self.norm(x)


class HfForCausalLM(nnx.Module):
  def __init__(self, rngs):
    self.model = HfModel(rngs)
    self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    return self.lm_head(self.model(ids))


HF_RULES = [jqat.Rule(".*embed_tokens", weight=W8), jqat.Rule(".*", weight=W8, activation=A8)]


# --- shared pieces -------------------------------------------------------------------------------------------------


def _ids(seed=0):
  return jax.random.randint(jax.random.key(seed), (2, 8), 0, VOCAB)


def _bits(a) -> bytes:
  a = np.asarray(a)
  return a.dtype.name.encode() + str(a.shape).encode() + a.tobytes()


def _same_bits(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert [_bits(x) for x in la] == [_bits(x) for x in lb]


_DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\(tensor<([^>]*)>, tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>")


def _int8_dots(exported) -> int:
  """The StableHLO's int8 x int8 -> int32 dots."""
  dots = _DOT.findall(exported.mlir_module())
  return sum(a.endswith("xi8") and b.endswith("xi8") and out.endswith("xi32") for a, b, out in dots)


def _qat_and_served(qm, key, ids):
  # Activation ranges from a QAT forward (moving averages), then convert: one compiled program for all three.
  v = qm.init(key, ids)
  _, stats = qm.apply(v, ids, mutable=["quant_stats"])
  qat = {**v, **stats}
  return qat, jqat.linen.convert(qm, qat, ids)


@pytest.fixture(scope="module")
def gemma():
  ids = _ids()
  qm = jqat.linen.quantize_model(Gemma(), GEMMA_RULES)
  qat, served = jax.jit(functools.partial(_qat_and_served, qm))(jax.random.key(0), ids)
  serve = jax.jit(lambda v, x: qm.apply(v, x))
  return qm, qat, served, ids, serve(served, ids), serve


def _hf():
  """The NNX model, quantized and converted, and its float parameters before conversion."""
  def build():
    model = jqat.nnx.quantize_model(HfForCausalLM(nnx.Rngs(0)), HF_RULES)
    model(_ids())  # moving-average activation ranges
    floats = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jqat.nnx.convert(model)
    return model, floats

  return nnx.jit(build)()  # one compiled program instead of the ops one by one


@pytest.fixture(scope="module")
def hf():
  model, floats = _hf()
  ids = _ids()
  return model, jax.tree.map(np.asarray, floats), ids, nnx.jit(lambda m, x: m(x))(model, ids)


# --- Orbax ---------------------------------------------------------------------------------------------------------


def test_gemma_serving_variables_round_trip_through_orbax(gemma, tmp_path):
  qm, qat, served, ids, y, serve = gemma
  # convert leaves zero-size markers of the dropped float parameters (serving/.../replaced): Orbax cannot save those.
  assert any(0 in x.shape for x in jax.tree.leaves(served))
  jqat.save_checkpoint(tmp_path / "served", served)
  target = jax.eval_shape(lambda v, x: jqat.linen.convert(qm, v, x), qat, ids)
  restored = jqat.restore_checkpoint(tmp_path / "served", target)
  _same_bits(restored, served)
  assert _bits(serve(restored, ids)) == _bits(y)
  # Without a target the tree comes back as nested dicts (the statistics' NamedTuples too); it serves the same.
  plain = jqat.restore_checkpoint(tmp_path / "served")
  _same_bits({k: plain[k] for k in ("params", "serving")}, {k: served[k] for k in ("params", "serving")})
  assert _bits(serve(plain, ids)) == _bits(y)
  other = jax.tree.map(lambda x: x, served)
  other["params"]["final_norm"]["scale"] = jnp.zeros((D + 1,))
  with pytest.raises(ValueError, match=r"/params/final_norm/scale: the checkpoint holds float32 \(32,\), the target"):
    jqat.restore_checkpoint(tmp_path / "served", other)


def test_gemma_qat_run_resumes_from_a_checkpoint_manager(gemma, tmp_path):
  qm, qat, _, ids, _, _ = gemma
  tx = optax.adam(1e-2)
  batches = [_ids(s) for s in (1, 2, 3)]

  @jax.jit
  def step(state, x):
    v = state["variables"]

    def loss(params):
      logits, upd = qm.apply({**v, "params": params}, x, mutable=["quant_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), upd

    grads, upd = jax.grad(loss, has_aux=True)(v["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], v["params"])
    return {"variables": {**v, **upd, "params": optax.apply_updates(v["params"], updates)}, "opt_state": opt_state}

  start = {"variables": qat, "opt_state": tx.init(qat["params"])}
  whole = start
  for x in batches:
    whole = step(whole, x)
  part = step(start, batches[0])
  options = ocp.CheckpointManagerOptions(max_to_keep=1)
  with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
    state, meta = jqat.checkpoint_state(part)
    manager.save(1, args=ocp.args.StandardSave(state), custom_metadata=meta)
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
    abstract = jqat.checkpoint_state(jax.eval_shape(lambda: start))[0]
    restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
    resumed = jqat.restored_state(restored, manager.metadata(1).custom_metadata)
  for x in batches[1:]:
    resumed = step(resumed, x)
  _same_bits(resumed, whole)


def test_hf_nnx_state_round_trips_through_orbax(hf, tmp_path):
  model, _, ids, y = hf
  jqat.save_checkpoint(tmp_path / "state", nnx.state(model))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _hf()[0]))
  restored = jqat.restore_checkpoint(tmp_path / "state", abstract)
  _same_bits(restored, nnx.state(model))
  assert _bits(nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, restored), ids)) == _bits(y)


# --- jax.export ----------------------------------------------------------------------------------------------------


def test_gemma_exports_bit_for_bit(gemma):
  qm, _, served, ids, y, _ = gemma
  exported = jqat.export(qm, served, ids)
  assert _bits(jax.export.deserialize(exported.serialize()).call(ids)) == _bits(y)
  # Three int8 x int8 -> int32 einsums a layer (q, kv, output); the MLP and the tied embedding are weight-only.
  assert _int8_dots(exported) == 3 * LAYERS


def test_hf_nnx_exports_bit_for_bit(hf):
  model, _, ids, y = hf
  exported = jqat.export(model, ids)
  assert _bits(jax.export.deserialize(exported.serialize()).call(ids)) == _bits(y)
  assert _int8_dots(exported) == 7 * LAYERS + 1  # q, k, v, o, gate, up, down and lm_head


# --- compressed-tensors --------------------------------------------------------------------------------------------


def _gemma_hf_name(name):
  """gemma's Flax paths -> Hugging Face's Gemma names; a list splits a stacked einsum along its first axis."""
  if name == "embedder":
    return None  # the tied table: embed_tokens stays float in a Hugging Face checkpoint
  layer, op = name.split(".", 1)
  p = f"model.layers.{layer.removeprefix('layer_')}."
  return {
    "attn.q_einsum": p + "self_attn.q_proj",
    "attn.kv_einsum": [p + "self_attn.k_proj", p + "self_attn.v_proj"],
    "attn.attn_vec_einsum": p + "self_attn.o_proj",
    "mlp.Einsum_0": [p + "mlp.gate_proj", p + "mlp.up_proj"],
    "mlp.Einsum_1": p + "mlp.down_proj",
  }[op]


def _served_kernel(served, *path):
  """A served kernel dequantized in NumPy from its stored codes: (values - zero_point) * scale."""
  entry = served["serving"]
  for p in path:
    entry = entry[p]
  rhs = entry["rhs"]
  values = np.asarray(rhs["values"])
  if values.dtype == np.uint8:  # int4, two codes a byte along axis 0 (element 2i in the low nibble)
    nibbles = np.stack([values & 15, values >> 4], axis=1).reshape(-1, *values.shape[1:]).astype(np.int8)
    values = ((nibbles ^ 8) - 8)[: int(np.asarray(rhs["layout"])[7])]
  return (values.astype(np.float32) - np.asarray(rhs["zero_point"])) * np.asarray(rhs["scale"])


def _decompressed(directory) -> dict:
  import torch  # noqa: PLC0415
  from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer  # noqa: PLC0415
  from safetensors.torch import load_file  # noqa: PLC0415

  tensors = load_file(os.path.join(directory, "model.safetensors"))
  out = CompressedTensorsDequantizer(directory, dtype=torch.float32).process(dict(tensors))
  return {k: v.numpy() for k, v in out.items()}


def test_gemma_einsums_write_as_hugging_face_linears(gemma, tmp_path):
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.quantization import QuantizationConfig  # noqa: PLC0415

  _, _, served, _, _, _ = gemma
  config = jqat.compressed_tensors.save(tmp_path, served, names=_gemma_hf_name)
  QuantizationConfig.model_validate(config)
  assert config["format"] == "mixed-precision"
  assert {g["format"] for g in config["config_groups"].values()} == {"int-quantized", "pack-quantized"}
  got = _decompressed(tmp_path)
  loaded = jqat.compressed_tensors.load(tmp_path)
  for i in range(LAYERS):
    layer, p = f"layer_{i}", f"model.layers.{i}."
    q = _served_kernel(served, layer, "attn", "q_einsum", "w_quant")  # (N, D, H)
    kv = _served_kernel(served, layer, "attn", "kv_einsum", "w_quant")  # (2, K, D, H)
    o = _served_kernel(served, layer, "attn", "attn_vec_einsum", "w_quant")  # (N, H, D)
    gating = _served_kernel(served, layer, "mlp", "Einsum_0", "gating_einsum_quant")  # (2, F, D): "...F,NHF->...NH"
    down = _served_kernel(served, layer, "mlp", "Einsum_1", "linear_quant")  # (F, D): "...H,HF->...F"
    # Oracle: Hugging Face's (out, in) weight of each einsum, by hand, against the package's own decompressor.
    want = {
      "self_attn.q_proj": q.transpose(0, 2, 1).reshape(N * H, D),
      "self_attn.k_proj": kv[0].transpose(0, 2, 1).reshape(N * H, D),
      "self_attn.v_proj": kv[1].transpose(0, 2, 1).reshape(N * H, D),
      "self_attn.o_proj": o.reshape(N * H, D).T,
      "mlp.gate_proj": gating[0],
      "mlp.up_proj": gating[1],
      "mlp.down_proj": down.T,
    }
    for name, w in want.items():
      np.testing.assert_array_equal(got[p + name + ".weight"], w, err_msg=name)
      back = loaded[p + name]
      np.testing.assert_array_equal(np.asarray(jqat.dequantize(back.weight)).T, w, err_msg=name)
      if name.startswith("mlp"):
        assert back.weight.config.bits.value == "int4" and back.activation is None
      else:
        assert back.activation == A8 and back.input_qparams is not None
  assert sorted(loaded) == sorted(k.removesuffix(".weight") for k in got if k.endswith(".weight"))
  # The tied embedding, left in, is the logits' Linear (vocab, d_model): the table itself.
  config = jqat.compressed_tensors.save(tmp_path / "tied", served, names=lambda n: n if n == "embedder" else None)
  np.testing.assert_array_equal(_decompressed(tmp_path / "tied")["embedder.weight"],
                                _served_kernel(served, "embedder", "input_embedding_quant"))


def test_gemma_names_that_collide_or_do_not_split(gemma, tmp_path):
  _, _, served, _, _, _ = gemma
  with pytest.raises(ValueError, match=r"two quantized layers are both named 'model.layers.0.mlp'"):
    jqat.compressed_tensors.layers(served, names=lambda n: None if n == "embedder" else "model.layers.0.mlp")
  with pytest.raises(ValueError, match=r"3 names for the layer 'layer_0.attn.kv_einsum', whose kernel's first output "
                                       r"axis has length 2"):
    jqat.compressed_tensors.layers(served, names=lambda n: ["k", "v", "x"] if n == "layer_0.attn.kv_einsum" else None)


def test_per_tensor_einsum_weights_are_written_by_their_recorded_axes(tmp_path):
  # A per-tensor scale (symmetric activations: no column sums) does not say which axes an einsum contracts;
  # convert records them (serving/.../rhs/contracting), and the Linear weight is read by them, not guessed.
  pytest.importorskip("compressed_tensors")
  x = jnp.ones((2, D))
  w8 = jqat.QatConfig(bits="int8")
  qm = jqat.linen.quantize_model(FeedForward(), [jqat.Rule("Einsum_0", weight=w8)])
  served = jax.jit(lambda k, x: jqat.linen.convert(qm, qm.init(k, x), x))(jax.random.key(0), x)
  flat = flax.traverse_util.flatten_dict(served["serving"], sep="/")
  (contracting,) = [v for k, v in flat.items() if k.endswith("rhs/contracting")]
  (values,) = [v for k, v in flat.items() if k.endswith("rhs/values")]
  layers = jqat.compressed_tensors.layers(served)
  (layer,) = layers.values()
  k_in = int(np.prod([values.shape[a] for a in np.asarray(contracting)]))
  assert layer.weight.shape == (k_in, values.size // k_in)


def test_hf_nnx_model_writes_under_its_own_names(hf, tmp_path):
  pytest.importorskip("compressed_tensors")
  model, _, _, _ = hf
  with pytest.raises(ValueError, match=r"layer 'model.embed_tokens'.*'embedding', not a Dense kernel.*names="):
    jqat.compressed_tensors.save(tmp_path, model)
  jqat.compressed_tensors.save(tmp_path, model, names=lambda n: None if n == "model.embed_tokens" else n)
  got = _decompressed(tmp_path)
  names = [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")] + ["lm_head"]
  assert sorted(k.removesuffix(".weight") for k in got if k.endswith(".weight")) == sorted(names)
  for name in names:
    module = model
    for part in name.split("."):
      module = module[int(part)] if part.isdigit() else getattr(module, part)
    rhs = module.dot_general.rhs_serving.get_value()
    kernel = (np.asarray(rhs["values"], np.float32) - np.asarray(rhs["zero_point"])) * np.asarray(rhs["scale"])
    np.testing.assert_array_equal(got[name + ".weight"], kernel.T, err_msg=name)  # torch's (out, in)


# --- GGUF ----------------------------------------------------------------------------------------------------------


def _gguf_tensors(fmt, params):
  """gemma's float parameters as llama.cpp's tensors: each kernel quantized 2-D, (in, out) or (out, in)."""
  def q(w, input_axis):
    cfg = jqat.gguf.config(fmt, input_axis=input_axis)
    return jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)

  out = {"token_embd.weight": q(params["embedder"]["input_embedding"], 1),  # (vocab, d): rows are the outputs
         "output_norm.weight": params["final_norm"]["scale"]}
  for i in range(LAYERS):
    p, blk = params[f"layer_{i}"], f"blk.{i}."
    wq, wkv, wo = (p["attn"][n]["w"] for n in ("q_einsum", "kv_einsum", "attn_vec_einsum"))
    out |= {
      blk + "attn_q.weight": q(wq.transpose(1, 0, 2).reshape(D, N * H), 0),  # (N, D, H) -> (in, out)
      blk + "attn_k.weight": q(wkv[0].transpose(1, 0, 2).reshape(D, N * H), 0),
      blk + "attn_v.weight": q(wkv[1].transpose(1, 0, 2).reshape(D, N * H), 0),
      blk + "attn_output.weight": q(wo.reshape(N * H, D), 0),
      blk + "ffn_gate.weight": q(p["mlp"]["Einsum_0"]["gating_einsum"][0], 1),  # (F, D): contracted over D
      blk + "ffn_up.weight": q(p["mlp"]["Einsum_0"]["gating_einsum"][1], 1),
      blk + "ffn_down.weight": q(p["mlp"]["Einsum_1"]["linear"], 0),  # (F, D) of "...H,HF->...F": (in, out)
      blk + "attn_norm.weight": p["pre_attention_norm"]["scale"],
      blk + "ffn_norm.weight": p["pre_ffw_norm"]["scale"],
    }
  return out


def _llama_rows(params):
  """The same tensors in llama.cpp's (out, in) order, built by hand from the einsum equations."""
  rows = {"token_embd.weight": params["embedder"]["input_embedding"]}
  for i in range(LAYERS):
    p, blk = params[f"layer_{i}"], f"blk.{i}."
    wkv = np.asarray(p["attn"]["kv_einsum"]["w"])
    rows |= {
      blk + "attn_q.weight": np.asarray(p["attn"]["q_einsum"]["w"]).transpose(0, 2, 1).reshape(N * H, D),
      blk + "attn_k.weight": wkv[0].transpose(0, 2, 1).reshape(N * H, D),
      blk + "attn_v.weight": wkv[1].transpose(0, 2, 1).reshape(N * H, D),
      blk + "attn_output.weight": np.asarray(p["attn"]["attn_vec_einsum"]["w"]).reshape(N * H, D).T,
      blk + "ffn_gate.weight": p["mlp"]["Einsum_0"]["gating_einsum"][0],
      blk + "ffn_up.weight": p["mlp"]["Einsum_0"]["gating_einsum"][1],
      blk + "ffn_down.weight": np.asarray(p["mlp"]["Einsum_1"]["linear"]).T,
    }
  return {k: np.ascontiguousarray(v, np.float32) for k, v in rows.items()}


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_gemma_kernels_write_as_llama_cpp_tensors(gemma, fmt, tmp_path):
  _, qat, _, _, _, _ = gemma
  params = jax.tree.map(np.asarray, nn.meta.unbox(qat["params"]))
  tensors = jax.tree.map(np.asarray, jax.jit(functools.partial(_gguf_tensors, fmt))(params))
  jqat.gguf.save(tmp_path / "g.gguf", tensors, {"general.architecture": "gemma"})
  reader = {t.name: t for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
  assert sorted(reader) == sorted(tensors)
  for name, rows in _llama_rows(params).items():
    t = reader[name]
    # Oracles: llama.cpp's reference quantizer gives the file's bytes; its dequantizer gives jqat's values.
    np.testing.assert_array_equal(np.asarray(t.data), gguf.quants.quantize(rows, getattr(GT, fmt)), err_msg=name)
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    mine = np.asarray(jqat.dequantize(tensors[name]))
    np.testing.assert_array_equal(mine.T if tensors[name].config.group_axis == 0 else mine, deq, err_msg=name)
  np.testing.assert_array_equal(np.asarray(reader["output_norm.weight"].data), params["final_norm"]["scale"])
  with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' has shape \(2, 32, 16\).*Reshape the float kernel"):
    cfg = jqat.gguf.config(fmt, input_axis=1)
    w = params["layer_0"]["attn"]["q_einsum"]["w"]
    jqat.gguf.save(tmp_path / "x.gguf", {"blk.0.attn_q.weight": jqat.quantize(w, jqat.qparams_from_array(w, cfg),
                                                                                cfg)})


def test_hf_nnx_kernels_write_as_llama_cpp_tensors(hf, tmp_path):
  _, floats, _, _ = hf
  cfg = jqat.gguf.config("Q4_0")
  kernels = {"output.weight": floats["lm_head"]["kernel"]}
  for i in range(LAYERS):
    layer = floats["model"]["layers"][i]
    for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
      kernels[f"blk.{i}.{theirs}.weight"] = layer["self_attn"][ours]["kernel"]
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
      kernels[f"blk.{i}.{theirs}.weight"] = layer["mlp"][ours]["kernel"]
  quantize = jax.jit(lambda ws: {k: jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg) for k, w in ws.items()})
  tensors = quantize(kernels)
  jqat.gguf.save(tmp_path / "hf.gguf", tensors, {"general.architecture": "llama"})
  reader = {t.name: t for t in gguf.GGUFReader(tmp_path / "hf.gguf").tensors}
  loaded = jqat.gguf.load(tmp_path / "hf.gguf")
  for name, w in kernels.items():
    t = reader[name]
    np.testing.assert_array_equal(np.asarray(t.data), gguf.quants.quantize(np.ascontiguousarray(w.T), GT.Q4_0))
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    np.testing.assert_array_equal(np.asarray(jqat.dequantize(loaded[name])).T, deq)
    np.testing.assert_array_equal(np.asarray(jqat.dequantize(tensors[name])).T, deq)
  assert json.loads(json.dumps(jqat.gguf.load_metadata(tmp_path / "hf.gguf")["general.architecture"])) == "llama"

"""compressed-tensors checkpoints: checked by the compressed-tensors package's own config classes and decompressor."""

import collections
import functools
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

ct = pytest.importorskip("compressed_tensors")

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import jqat  # noqa: E402
from jqat import compressed_tensors as jct  # noqa: E402
from jqat import linen as qnn  # noqa: E402

C = jqat.QatConfig
W4G128 = C(bits="int4", per_channel=True, group_size=128)

STATIC_SYM = jqat.QParams(jnp.float32(0.05), jnp.float32(0))
STATIC_ASYM = jqat.QParams(jnp.float32(0.04), jnp.float32(-3))

# name: (weight config, activation config, frozen activation range, expected format). Each scheme is written for
# two layers, kernels (256, 32) and (128, 8) with biases.
SCHEMES = {
  "w8a8_static_asym": (C(per_channel=True), C(symmetric=False), STATIC_ASYM, "int-quantized"),
  "w8a8_static_sym_narrow_weights": (C(per_channel=True, narrow_range=True), C(), STATIC_SYM, "int-quantized"),
  "w8a8_dynamic_token": (C(per_channel=True), C(per_channel=True), None, "int-quantized"),
  "w8a8_tensor": (C(), C(symmetric=False), STATIC_ASYM, "int-quantized"),
  "w4a16_g128": (W4G128, None, None, "pack-quantized"),
  "w4a16_g128_asym": (W4G128.replace(symmetric=False), None, None, "pack-quantized"),
  "w8a16_channel_asym": (C(per_channel=True, symmetric=False), None, None, "pack-quantized"),
  "w3a16_g128_shared": (C(bits="int3", group_size=128), None, None, "pack-quantized"),
  "w2a16_tensor": (C(bits="int2"), None, None, "pack-quantized"),
  "fp8_static": (C(bits="fp8_e4m3", per_channel=True), C(bits="fp8_e4m3"), STATIC_SYM, "float-quantized"),
  "fp8_dynamic_bf16": (
    C(bits="fp8_e4m3", per_channel=True),
    C(bits="fp8_e4m3", per_channel=True),
    None,
    "float-quantized",
  ),
}


@functools.partial(jax.jit, static_argnums=1)  # one compilation, not one per primitive: keeps the tests fast
def _quantize(w, cfg):
  return jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)


def _q(cfg, shape=(256, 8), seed=0, dtype=jnp.float32):
  return _quantize(jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype), cfg)


def _scheme_layers(scheme) -> dict:
  wcfg, acfg, qp, _ = SCHEMES[scheme]
  dtype = jnp.bfloat16 if scheme.endswith("bf16") else jnp.float32
  out = {}
  for i, (name, shape) in enumerate((("Dense_0", (256, 32)), ("head", (128, 8)))):
    bias = jnp.asarray(np.random.default_rng(10 + i).standard_normal(shape[1:]), dtype)
    out[name] = jct.Layer(_q(wcfg, shape, seed=i, dtype=dtype), acfg, qp, bias)
  return out


class Mlp(nn.Module):
  weight_config: jqat.QatConfig | None
  activation_config: jqat.QatConfig | None

  @nn.compact
  def __call__(self, x):
    dense = lambda n, **kw: qnn.QatDense(  # noqa: E731
      n, weight_config=self.weight_config, activation_config=self.activation_config, **kw
    )
    x = nn.relu(dense(128)(x))
    return dense(16, name="head")(x)


X = jnp.asarray(np.random.default_rng(0).standard_normal((16, 256)), jnp.float32)
LINEN = {  # scheme: (weight config, activation config, activation= for save)
  "w8a8_static_asym": (C(per_channel=True), C(symmetric=False), None),
  "w8a8_dynamic_token": (C(per_channel=True), C(per_channel=True), C(per_channel=True)),
  "w4a16_g128": (W4G128, None, None),
}


def _convert(model, x):
  # Each step under jit: one compilation instead of one per primitive.
  v = jax.jit(model.init)(jax.random.key(1), x)
  _, upd = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats"]))(v, x)  # ranges for the activations
  return jax.jit(qnn.convert, static_argnums=0)(model, {**v, **upd}, x)


@functools.cache
def _served(scheme):
  wcfg, acfg, _ = LINEN[scheme]
  model = Mlp(wcfg, acfg)
  return model, _convert(model, X)


def _bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _decompressed(directory) -> dict:
  """The package's own model-free decompressor on the saved file: {tensor name: float32 tensor}."""
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  return CompressedTensorsDequantizer(directory, dtype=torch.float32).process(dict(tensors))


def _same_qtensor(a: jqat.QTensor, b: jqat.QTensor):
  assert a.config == b.config and a.shape == b.shape and a.dequant_dtype == b.dequant_dtype
  for x, y in ((a.values, b.values), (a.scale, b.scale), (a.zero_point, b.zero_point)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(_bits(x), _bits(y))


def _check(directory, ours: dict, fmt: str):
  """The saved checkpoint against the layers it was written from: config, decompressor oracle, load."""
  config = json.loads((directory / "config.json").read_text())["quantization_config"]
  assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
  QuantizationConfig.model_validate(config)  # the package's own schema accepts it
  dequantized = _decompressed(directory)
  back = jct.load(directory)
  assert sorted(back) == sorted(ours)
  for name, layer in ours.items():
    # Oracle: compressed-tensors' decompressor gives jqat's dequantized kernel (in float32), in torch's (out, in).
    want = jqat.dequantize(layer.weight.replace(dequant_dtype=jnp.float32)).T
    np.testing.assert_array_equal(_bits(dequantized[f"{name}.weight"].numpy()), _bits(want))
    np.testing.assert_array_equal(dequantized[f"{name}.bias"].float().numpy(), np.asarray(layer.bias, np.float32))
    got = back[name]
    _same_qtensor(got.weight, layer.weight)
    assert got.activation == layer.activation
    if layer.input_qparams is None:
      assert got.input_qparams is None
    else:
      np.testing.assert_array_equal(got.input_qparams.scale, layer.input_qparams.scale)
      np.testing.assert_array_equal(got.input_qparams.zero_point, layer.input_qparams.zero_point)
    np.testing.assert_array_equal(got.bias, layer.bias)
    assert got.bias.dtype == jnp.asarray(layer.bias).dtype
  return config


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_decompressor_gives_jqat_weights_bit_for_bit_and_load_gives_them_back(scheme, tmp_path):
  ours = _scheme_layers(scheme)
  written = jct.save(tmp_path, ours)
  assert written == _check(tmp_path, ours, SCHEMES[scheme][3])


@pytest.mark.parametrize("scheme", list(LINEN))
def test_converted_linen_model(scheme, tmp_path):
  _, served = _served(scheme)
  act = LINEN[scheme][2]
  jct.save(tmp_path, served, activation=act)
  ours = jct.layers(served, activation=act)
  assert sorted(ours) == ["Dense_0", "head"]
  for name, layer in ours.items():
    np.testing.assert_array_equal(layer.bias, served["params"][name]["bias"])
    np.testing.assert_array_equal(layer.weight.values, served["serving"][name]["quant"]["rhs"]["values"])
  _check(tmp_path, ours, "pack-quantized" if scheme == "w4a16_g128" else "int-quantized")


@pytest.mark.parametrize(("scheme", "preset"), [("w8a8_dynamic_token", "W8A8"), ("w4a16_g128", "W4A16")])
def test_schemes_are_the_packages_presets(scheme, preset, tmp_path):
  _, served = _served(scheme)
  config = QuantizationConfig.model_validate(jct.save(tmp_path, served, activation=LINEN[scheme][2]))
  (group,) = config.config_groups.values()
  want = preset_name_to_scheme(preset, targets=["Dense_0", "head"])
  assert sorted(group.targets) == want.targets
  assert group.weights == want.weights and group.input_activations == want.input_activations


@pytest.mark.parametrize("scheme", ["w4a16_g128_asym", "w8a8_static_asym", "w8a16_channel_asym"])
def test_files_hold_what_the_packages_compressor_writes(scheme, tmp_path):
  # The package's compressor, given the dequantized weights and jqat's scales and zero points, writes the same
  # tensors as jqat.compressed_tensors.save: the same codes, packing and layout.
  ours = _scheme_layers(scheme)
  fmt = SCHEMES[scheme][3]
  config = QuantizationConfig.model_validate(jct.save(tmp_path, ours))
  saved = load_file(tmp_path / "model.safetensors")
  dequantized = _decompressed(tmp_path)
  (scheme_obj,) = config.config_groups.values()
  compressor = BaseCompressor.get_value_from_registry(fmt)
  for name, layer in ours.items():
    zp = np.asarray(layer.weight.zero_point).T.astype(np.int8)
    state = {
      "weight": dequantized[f"{name}.weight"],
      "weight_scale": saved[f"{name}.weight_scale"],
      "weight_zero_point": torch.from_numpy(zp.copy()),
    }
    theirs = compressor.compress(state, scheme_obj)
    assert set(theirs) == {k.removeprefix(name + ".") for k in saved if k.startswith(name + ".weight")}
    for key, t in theirs.items():
      assert torch.equal(t, saved[f"{name}.{key}"]), key


def test_loads_a_checkpoint_the_package_compressed(tmp_path):
  # A bf16 torch model quantized with the package's presets (W4A16 and W8A8) and compressed by it, as LLM
  # Compressor writes checkpoints: jqat reads the same weights as the package's decompressor, bit for bit.
  from compressed_tensors.compressors import compress_module
  from compressed_tensors.compressors.model_compressors import ModelCompressor
  from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config
  from safetensors.torch import save_file

  torch.manual_seed(0)
  layers = {"proj": torch.nn.Linear(256, 32), "fc": torch.nn.Linear(32, 8)}
  model = torch.nn.Sequential(collections.OrderedDict(layers)).to(torch.bfloat16)
  qconfig = QuantizationConfig(config_groups={"W4A16": ["re:proj"], "W8A8": ["re:fc"]})
  apply_quantization_config(model, qconfig)
  w = model.proj.weight.data.float()
  model.proj.weight_scale.data = (w.reshape(32, 2, 128).abs().amax(-1) / 7).to(torch.bfloat16)  # calibrated
  model.fc.weight_scale.data = (model.fc.weight.data.float().abs().amax(-1, keepdim=True) / 127).to(torch.bfloat16)
  for m in model.modules():
    compress_module(m)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
  qconfig.quantization_status = QuantizationStatus.COMPRESSED
  ModelCompressor(quantization_config=qconfig).update_config(str(tmp_path))
  dequantized = _decompressed(tmp_path)
  back = jct.load(tmp_path)
  assert sorted(back) == ["fc", "proj"]
  assert back["proj"].weight.config == W4G128 and back["proj"].activation is None
  assert back["fc"].activation == C(per_channel=True)  # W8A8: int8 per token, dynamic
  for name, layer in back.items():
    assert layer.weight.dequant_dtype == jnp.bfloat16  # as the file's scales
    got = np.asarray(jqat.dequantize(layer.weight), np.float32).T
    np.testing.assert_array_equal(_bits(got), _bits(dequantized[f"{name}.weight"].numpy()))
    np.testing.assert_array_equal(np.asarray(layer.bias, np.float32), layers[name].bias.data.float().numpy())


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    a = C(per_channel=True, symmetric=False)  # dynamic per token: NNX knows it, the file says it
    self.blocks = nnx.List([jqat.nnx.QatDense(256, 128, activation_config=a, rngs=rngs)])
    self.out = nnx.Linear(128, 16, dot_general=jqat.nnx.QatDotGeneral(lhs_config=None, rhs_config=W4G128), rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.blocks[0](x)))


def test_nnx_model_with_names(tmp_path):
  model = NnxMlp(nnx.Rngs(0))
  jqat.nnx.convert(model)  # per-token and weight-only layers need no activation statistics
  names = {"blocks.0": "model.layers.0.up_proj", "out": "lm_head"}
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MyForCausalLM"]}))
  config = QuantizationConfig.model_validate(jct.save(tmp_path, model, names=names))
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MyForCausalLM"]  # kept
  assert config.format == "mixed-precision"
  formats = {tuple(g.targets): g.format for g in config.config_groups.values()}
  assert formats == {("model.layers.0.up_proj",): "int-quantized", ("lm_head",): "pack-quantized"}
  dequantized = _decompressed(tmp_path)
  back = jct.load(tmp_path)
  for path, name in names.items():
    layer = jct.layers(model)[path]
    np.testing.assert_array_equal(_bits(dequantized[f"{name}.weight"].numpy()), _bits(jqat.dequantize(layer.weight).T))
    _same_qtensor(back[name].weight, layer.weight)
    np.testing.assert_array_equal(back[name].bias, layer.bias)
  assert back["model.layers.0.up_proj"].activation == C(per_channel=True, symmetric=False)
  assert back["lm_head"].activation is None


def test_torch_linear_with_the_decompressed_weights_serves_as_jqat_does(tmp_path):
  # Names, (out, in) order and biases all in place: torch's Linear on the file's weights gives jqat's weight-only
  # served output, up to float summation order.
  model, served = _served("w4a16_g128")
  jct.save(tmp_path, served)
  w = _decompressed(tmp_path)
  x = torch.from_numpy(np.array(X))
  h = torch.relu(torch.nn.functional.linear(x, w["Dense_0.weight"], w["Dense_0.bias"]))
  y = torch.nn.functional.linear(h, w["head.weight"], w["head.bias"])
  np.testing.assert_allclose(y.numpy(), model.apply(served, X), rtol=1e-5, atol=1e-5)  # float32 sums reordered


@pytest.mark.slow  # a fresh interpreter imports jax, torch and compressed-tensors
def test_round_trip_in_a_fresh_process_and_jqat_imports_without_torch(tmp_path):
  ours = _scheme_layers("w4a16_g128_asym")
  jct.save(tmp_path, ours)
  code = textwrap.dedent(f"""
    import sys
    for m in ("torch", "compressed_tensors", "safetensors.torch"):
      sys.modules[m] = None  # as if not installed
    import numpy as np, jqat, jqat.compressed_tensors as jct
    try:
      jct.load({str(tmp_path)!r})
    except ImportError as e:
      assert "pip install 'jqat[compressed-tensors]'" in str(e), e
    else:
      raise AssertionError("load without torch did not raise ImportError")
    for m in ("torch", "compressed_tensors", "safetensors.torch"):
      del sys.modules[m]
    back = jct.load({str(tmp_path)!r})
    np.savez({str(tmp_path / "out.npz")!r}, **{{n: np.asarray(jqat.dequantize(l.weight)) for n, l in back.items()}})
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  for name, layer in ours.items():
    np.testing.assert_array_equal(_bits(out[name]), _bits(jqat.dequantize(layer.weight)))


# --- what compressed-tensors cannot hold ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("layer", "match"),
  [
    (jct.Layer(_q(C(bits="fp8_e5m2", per_channel=True))), "fp8_e5m2, which compressed-tensors cannot hold"),
    (jct.Layer(_q(C(per_channel=True)), C(bits="fp8_e5m2"), STATIC_SYM), "activations are in fp8_e5m2"),
    (jct.Layer(_q(C(per_channel=True)), C(narrow_range=True), STATIC_SYM), "narrow-range activations"),
    (jct.Layer(_q(C(per_channel=True)), C(per_channel=True, group_size=32)), "per-group activations"),
    (jct.Layer(_q(C(per_channel=True)), C()), "needs its frozen range"),
    (jct.Layer(_q(C(per_channel=True), (4, 2, 8))), r"2-D Linear weights; the kernel has shape \(4, 2, 8\)"),
    (jct.Layer(_q(C(per_channel=True, channel_axis=0))), r"scales of shape \(256, 1\)"),
  ],
  ids=["e5m2_weights", "e5m2_activations", "narrow_activations", "group_activations", "no_range", "3d", "axis0"],
)
def test_what_compressed_tensors_cannot_hold_is_a_clear_error(layer, match, tmp_path):
  with pytest.raises(ValueError, match=match) as e:
    jct.save(tmp_path, {"proj": layer})
  assert "layer 'proj'" in str(e.value)
  assert not (tmp_path / "model.safetensors").exists()


def test_negative_scales_are_refused(tmp_path):
  q = _q(C(per_channel=True))
  with pytest.raises(ValueError, match="layer 'proj': a weight scale is -"):
    jct.save(tmp_path, {"proj": q.replace(scale=-q.scale)})


def test_bad_model_variables(tmp_path):
  _, static = _served("w8a8_static_asym")
  with pytest.raises(ValueError, match="no 'serving' collection"):
    jct.save(tmp_path, {"params": static["params"]})
  # Asymmetric activations without a frozen range (per token): the kernels keep column sums for their zero points.
  served = jax.tree.map(lambda a: a, static)
  for name in ("Dense_0", "head"):
    del served["serving"][name]["quant"]["lhs"]
  with pytest.raises(ValueError, match="layer 'Dense_0': its serving variables hold column sums"):
    jct.save(tmp_path, served)  # saved as weight-only
  _, symmetric = _served("w8a8_dynamic_token")
  with pytest.raises(ValueError, match="layer 'Dense_0': its serving variables hold no column sums"):
    jct.save(tmp_path, symmetric, activation=C(per_channel=True, symmetric=False))
  awq = jax.tree.map(lambda a: a, static)
  awq["serving"]["head"]["quant"]["input_scale"] = jnp.ones((128,))
  with pytest.raises(ValueError, match="layer 'head'.*AWQ / SmoothQuant input divisor"):
    jct.save(tmp_path, awq)
  with pytest.raises(ValueError, match="two quantized layers are both named 'x'"):
    jct.save(tmp_path, served, activation=C(per_channel=True, symmetric=False), names=lambda n: "x")
  with pytest.raises(ValueError, match="names has no entry for the layer 'head'"):
    jct.save(tmp_path, served, activation=C(per_channel=True, symmetric=False), names={"Dense_0": "a"})
  with pytest.raises(TypeError, match="got int"):
    jct.save(tmp_path, 3)


class EmbedMlp(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = qnn.QatEmbed(50, 16, name="embed")
    return embed.attend(qnn.QatDense(16, activation_config=None, name="proj")(embed(ids)))


def test_layers_that_are_not_dense_can_be_left_out(tmp_path):
  served = _convert(EmbedMlp(), jnp.arange(8).reshape(2, 4))
  with pytest.raises(ValueError, match="layer 'embed'.*the quantized parameter is 'embedding', not a Dense kernel"):
    jct.save(tmp_path, served)
  jct.save(tmp_path, served, names={"embed": None, "proj": "model.proj"})
  assert sorted(jct.load(tmp_path)) == ["model.proj"]


def test_convolutions_are_refused_not_written_as_linears(tmp_path):
  # A per-channel conv kernel (3, 3, 2, 4) has scales like a 3-axis einsum weight's; it is still no Linear layer.
  x = jnp.ones((1, 6, 6, 2))
  w8 = C(bits="int8", per_channel=True)
  for model in (qnn.QatConv(4, (3, 3), weight_config=w8, activation_config=None),
                qnn.quantize_model(nn.Conv(4, (3, 3)), [jqat.Rule(".*", weight=w8)])):
    served = jax.jit(qnn.convert, static_argnums=0)(model, jax.jit(model.init)(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match=r"layer 'QatConvGeneralDilated_0'.*kernel has shape \(3, 3, 2, 4\).*names="):
      jct.save(tmp_path, served)


# --- reading bad files -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt")
  jct.save(d, {"proj": jct.Layer(_q(W4G128)), "fc": jct.Layer(_q(C(per_channel=True)), C(symmetric=False), STATIC_SYM)})
  return d


def _copy(src, dst, **replace):
  dst.mkdir(exist_ok=True)
  for f in ("model.safetensors", "config.json"):
    data = (src / f).read_bytes()
    (dst / f).write_bytes(replace[f](data) if f in replace else data)
  return dst


@pytest.mark.parametrize(
  ("change", "match"),
  [
    ({"model.safetensors": lambda b: b[: len(b) // 2]}, "not a readable safetensors file"),
    ({"model.safetensors": lambda b: b[:8] + b"\x00garbage" + b[17:]}, "not a readable safetensors file"),
    ({"model.safetensors": lambda b: b""}, "not a readable safetensors file"),
    ({"config.json": lambda b: b[:10]}, "not a readable JSON file"),
    ({"config.json": lambda b: b'{"quantization_config": {"quant_method": "gptq"}}'}, "'gptq', not compressed-tensors"),
    ({"config.json": lambda b: b.replace(b'"group"', b'"bogus"')}, "not a compressed-tensors quantization_config"),
    ({"config.json": lambda b: b.replace(b'"num_bits": 4', b'"num_bits": 8')}, "weight_packed of shape"),
  ],
  ids=["truncated", "corrupt_header", "empty", "bad_json", "other_method", "bad_strategy", "wrong_bits"],
)
def test_truncated_or_corrupt_files_are_a_clear_error(checkpoint, tmp_path, change, match):
  with pytest.raises(ValueError, match=match):
    jct.load(_copy(checkpoint, tmp_path / "bad", **change))


def test_missing_files_and_tensors(checkpoint, tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    jct.load(tmp_path)
  d = _copy(checkpoint, tmp_path / "no_zp")
  tensors = load_file(d / "model.safetensors")
  del tensors["fc.input_zero_point"]
  from safetensors.torch import save_file

  save_file(tensors, d / "model.safetensors")
  with pytest.raises(ValueError, match="layer 'fc': the file has no tensor 'fc.input_zero_point'"):
    jct.load(d)


def test_a_checkpoint_in_shards(checkpoint, tmp_path):
  from safetensors.torch import save_file

  tensors = load_file(checkpoint / "model.safetensors")
  d = tmp_path / "sharded"
  d.mkdir()
  (d / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
  weight_map = {}
  for i, prefix in enumerate(("proj.", "fc.")):
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({k: t for k, t in tensors.items() if k.startswith(prefix)}, d / shard)
    weight_map.update({k: shard for k in tensors if k.startswith(prefix)})
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  back, whole = jct.load(d), jct.load(checkpoint)
  assert sorted(back) == ["fc", "proj"]
  for name in back:
    np.testing.assert_array_equal(jqat.dequantize(back[name].weight), jqat.dequantize(whole[name].weight))
  # An index names files beside it only.
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"proj.weight_scale": "../x"}}))
  with pytest.raises(ValueError, match="is not a file name in the checkpoint's directory"):
    jct.load(d)


class _Payload:
  """Unpickling this runs code: it creates a marker file."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_loading_never_executes_code(checkpoint, tmp_path):
  marker = tmp_path / "ran"
  payload = pickle.dumps(_Payload(str(marker)))
  # A pickle where the safetensors file should be: refused, never unpickled.
  d = _copy(checkpoint, tmp_path / "pickled", **{"model.safetensors": lambda b: payload})
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    jct.load(d)
  # A pickled torch checkpoint beside a good one is never read.
  d = _copy(checkpoint, tmp_path / "beside")
  (d / "pytorch_model.bin").write_bytes(payload)
  assert sorted(jct.load(d)) == ["fc", "proj"]
  assert not marker.exists()


def test_per_tensor_einsum_kernel_out_in_is_written_as_its_linear(tmp_path):
  # nn.Einsum "bf,hf->bh" holds its kernel (out, in). Per-tensor weights and symmetric activations leave
  # neither scales nor sums to show the contracted axis; convert records it, so the export is not transposed.
  model = qnn.quantize_model(
    nn.Einsum((12, 8), "bf,hf->bh", use_bias=False),
    [jqat.Rule(".*", weight=jqat.QatConfig(bits="int8"), activation=jqat.QatConfig(bits="int8"))],
  )
  x = jax.random.normal(jax.random.key(1), (4, 8))
  served = _convert(model, x)
  (name, layer), = jct.layers(served).items()
  assert layer.weight.shape == (8, 12)  # (in, out): the einsum's (out, in) kernel, transposed
  jct.save(tmp_path, served)
  flat = flax.traverse_util.flatten_dict(served["serving"], sep="/")
  (rhs,) = [v for k, v in flat.items() if k.endswith("rhs/values")]
  (scale,) = [v for k, v in flat.items() if k.endswith("rhs/scale")]
  own = np.asarray(rhs, np.float32) * np.float32(scale)  # the served (out, in) kernel; symmetric: no zero point
  # Oracle: the package's decompressor reads the file's torch Linear (out, in) as the einsum's own kernel.
  np.testing.assert_array_equal(_bits(_decompressed(tmp_path)[f"{name}.weight"].numpy()), _bits(own))

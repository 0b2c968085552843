"""Tests for jqat.gguf: llama.cpp's Q8_0 and Q4_0, checked against the gguf package's own quantizer and reader."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from gguf import GGMLQuantizationType as GT
from hypothesis import given, settings
from hypothesis import strategies as st

import jqat
from jqat._src import gguf as gguf_lib

FORMATS = ("Q8_0", "Q4_0")


def _quantize(w, cfg):
  return jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)


def _jitted(fn):
  return {f: jax.jit(functools.partial(fn, cfg=jqat.gguf.config(f))) for f in FORMATS}


# Jitted once per format: the tests share one kernel shape, so each compiles once.
_QUANTIZE = _jitted(lambda w, cfg: _quantize(w, cfg))
_FAKE_QUANT = _jitted(lambda w, cfg: jqat.fake_quant(w, jqat.qparams_from_array(w, cfg), cfg))


def _file_tensor(path, name):
  (t,) = [t for t in gguf.GGUFReader(path).tensors if t.name == name]
  return t


def _weights(seed, n_in=96, n_out=6):
  """Flax kernels (in, out) with the blocks the reference treats specially: zero, signed zero, exact ties,
  one large value, equal magnitudes of both signs, tiny and large scales."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n_in, n_out)).astype(np.float32) * rng.choice([1e-3, 0.02, 1.0, 40.0], n_out)
  w = w.astype(np.float32)
  w[:32, 0] = 0.0  # a zero block
  w[32:64, 0] = -0.0  # a block of negative zeros
  # Exact ties: Q8_0 with amax = 127/64 has d = 1/64 and x * id = k + 0.5; Q4_0 with m = 0.5 has d = -1/16.
  w[:32, 1] = (rng.integers(-126, 126, 32) + 0.5) / 64
  w[0, 1] = 127 / 64
  w[32:64, 1] = (rng.integers(-8, 7, 32) + 0.5) / 16
  w[32, 1] = 0.5
  w[:32, 2] = 1e-3
  w[5, 2] = 7.0  # one large value in a block of small ones
  w[:32, 3] = rng.choice([-3.0, 3.0], 32)  # equal magnitudes: the first one sets Q4_0's sign
  w[32:64, 3] = rng.choice([-1.5, 1.5, 0.75], 32)
  return w


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_file_bytes_are_the_reference_quantizers(fmt, seed, tmp_path):
  """Oracle: gguf.quants.quantize of the (out, in) weights gives the bytes jqat writes; the reader's
  dequantization gives jqat's dequantize and fake_quant, bit for bit (eager and jitted)."""
  cfg = jqat.gguf.config(fmt)
  w = _weights(seed)
  q = _QUANTIZE[fmt](w)
  path = tmp_path / "w.gguf"
  jqat.gguf.save(path, {"blk.0.attn_q.weight": q})
  t = _file_tensor(path, "blk.0.attn_q.weight")
  assert t.tensor_type == getattr(GT, fmt)
  assert [int(d) for d in t.shape] == [96, 6]  # ggml's ne: (in, out), i.e. NumPy (out, in)
  np.testing.assert_array_equal(np.asarray(t.data), gguf.quants.quantize(w.T, getattr(GT, fmt)))
  ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).T
  outs = [np.asarray(jqat.dequantize(q)), np.asarray(_FAKE_QUANT[fmt](w))]
  if seed == 0:  # eager too, and the eager QTensor's bytes
    outs.append(np.asarray(jqat.fake_quant(w, jqat.qparams_from_array(w, cfg), cfg)))
    eager, _ = gguf_lib._encode_qtensor("w", _quantize(w, cfg))
    np.testing.assert_array_equal(eager, np.asarray(t.data))
  for got in outs:
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))  # bit for bit, signed zeros too


@pytest.mark.parametrize("fmt", FORMATS)
def test_out_in_kernels_are_written_as_they_are(fmt, tmp_path):
  """A kernel (out, in) (torch's order, an einsum weight contracted over its last axis) quantized with
  input_axis=1: the same bytes as gguf.quants.quantize of it, without a transpose, and the same file as its
  transpose quantized (in, out)."""
  w = np.ascontiguousarray(_weights(3).T)  # (6, 96): (out, in)
  t_cfg = jqat.gguf.config(fmt, input_axis=1)
  q_t = _quantize(jnp.asarray(w), t_cfg)
  q = _quantize(jnp.asarray(w.T), jqat.gguf.config(fmt))
  jqat.gguf.save(tmp_path / "w.gguf", {"t": q_t, "k": q})
  t, k = _file_tensor(tmp_path / "w.gguf", "t"), _file_tensor(tmp_path / "w.gguf", "k")
  ref = gguf.quants.quantize(w, getattr(GT, fmt))
  np.testing.assert_array_equal(np.asarray(t.data), ref)
  np.testing.assert_array_equal(np.asarray(k.data), ref)
  deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
  np.testing.assert_array_equal(np.asarray(jqat.dequantize(q_t)).view(np.uint32), deq.view(np.uint32))
  back = jqat.gguf.load(tmp_path / "w.gguf")["t"]  # read back as (in, out)
  assert back.shape == (96, 6) and back.config == jqat.gguf.config(fmt)
  np.testing.assert_array_equal(np.asarray(jqat.dequantize(back)).T, deq)
  with pytest.raises(ValueError, match=r"input_axis=2 is invalid; allowed: 0 \(a kernel \(in, out\)\) or 1"):
    jqat.gguf.config(fmt, input_axis=2)


def _kernels():
  """Hypothesis kernels (64, 2) whose values include exact ties at several scales and repeated magnitudes."""
  return st.integers(-10, 10).flatmap(
    lambda e: st.lists(
      st.one_of(
        st.floats(-100, 100, width=32, allow_subnormal=False),
        st.integers(-300, 300).map(lambda k: (k + 0.5) / 2 ** (e + 8)),
        st.sampled_from([0.0, -0.0, 1.0, -1.0]),
      ),
      min_size=128,
      max_size=128,
    ).map(lambda v: np.asarray(v, np.float32).reshape(64, 2))
  )


@settings(max_examples=40, deadline=None)
@given(w=_kernels(), fmt=st.sampled_from(FORMATS))
def test_block_bytes_property(w, fmt):
  """Property: for any kernel, jqat's Q8_0 / Q4_0 bytes are gguf.quants.quantize's (one shape: one compile)."""
  blocks, qtype = gguf_lib._encode_qtensor("w", _QUANTIZE[fmt](jnp.asarray(w)))
  assert qtype == getattr(GT, fmt)
  np.testing.assert_array_equal(blocks, gguf.quants.quantize(w.T, qtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qat_dense_trains_on_the_files_grid(fmt, tmp_path):
  """QatDense with weight_config=jqat.gguf.config(fmt): the forward uses the file's dequantized kernel, the
  gradient reaches every kernel element (the clipped STE never clips a block quantized with its own range)."""
  cfg = jqat.gguf.config(fmt)
  layer = jqat.linen.QatDense(8, weight_config=cfg, activation_config=None, use_bias=False)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 64)), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  kernel = params["params"]["kernel"]
  path = tmp_path / "k.gguf"
  jqat.gguf.save(path, {"k": _quantize(kernel, cfg)})
  t = _file_tensor(path, "k")
  file_kernel = jnp.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).T)
  y = layer.apply(params, x)
  # The same float dot of x with the file's kernel; both run the same dot_general, so equal bits.
  np.testing.assert_array_equal(y, nn.Dense(8, use_bias=False).apply({"params": {"kernel": file_kernel}}, x))
  g = jax.grad(lambda p: layer.apply(p, x).sum())(params)["params"]["kernel"]
  np.testing.assert_array_equal(g, jnp.broadcast_to(x.sum(0)[:, None], kernel.shape))


def test_q4_0_scale_is_signed_and_checked():
  """Q4_0's d = m / -8 is negative where the block's largest magnitude is positive; a zero scale is refused,
  and under jit it gives NaN (never a plausible number)."""
  cfg = jqat.gguf.config("Q4_0")
  w = jnp.zeros((32, 2)).at[3, 0].set(2.0).at[4, 1].set(-2.0)
  scale, y = jax.jit(lambda w: (jqat.qparams_from_array(w, cfg).scale, _FAKE_QUANT["Q4_0"](w)))(w)
  np.testing.assert_array_equal(scale, [[-0.25, 0.25]])
  np.testing.assert_array_equal(y, w)
  bad = jqat.QParams(jnp.zeros((1, 2)), jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match="scale must be nonzero and finite, got 0.0"):
    jqat.fake_quant(w, bad, cfg)
  assert jnp.isnan(jax.jit(lambda s: jqat.fake_quant(w, jqat.QParams(s, s), cfg))(bad.scale)).all()
  # Elsewhere a negative scale is still refused.
  with pytest.raises(ValueError, match="scale must be positive and finite"):
    jqat.fake_quant(w, jqat.QParams(-jnp.ones(()), jnp.zeros(())), jqat.QatConfig())


def test_config_names():
  assert jqat.gguf.config("q8_0") == jqat.gguf.config("Q8_0")
  q8, q4 = jqat.gguf.config("Q8_0"), jqat.gguf.config("Q4_0")
  assert (q8.qmin, q8.qmax, q4.qmin, q4.qmax) == (-127, 127, -8, 7)
  assert {q8, q4} == {jqat.gguf.config("Q8_0"), jqat.gguf.config("Q4_0")}  # hashable, equal by value
  with pytest.raises(ValueError, match=r"'Q4_K' is not a GGUF format jqat writes; allowed: 'Q8_0', 'Q4_0'"):
    jqat.gguf.config("Q4_K")


_ROUND_TRIP = textwrap.dedent(
  """
  import builtins, json, pickle, sys
  import numpy as np

  import jax.numpy as jnp, jqat

  def refuse(*args, **kwargs):
    raise AssertionError("loading a GGUF file ran code")

  def audit(event, args):
    if event in ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
      refuse()

  path, warm, expected = sys.argv[1], sys.argv[2], dict(np.load(sys.argv[3]))
  jqat.gguf.load(warm), jqat.gguf.load_metadata(warm)  # every module the reader imports, imported now
  # From here loading must not unpickle, evaluate, execute or start anything.
  pickle.load = pickle.loads = builtins.eval = builtins.exec = builtins.compile = refuse
  sys.addaudithook(audit)
  tensors = jqat.gguf.load(path)
  meta = jqat.gguf.load_metadata(path)
  out = {"names": sorted(tensors), "meta": meta, "guard": []}
  for attempt in (lambda: pickle.loads(pickle.dumps(1)), lambda: __import__("os").system("true")):
    try:
      attempt()
    except AssertionError:
      out["guard"].append(True)  # the guard was live while loading
  for name, t in tensors.items():
    if isinstance(t, jqat.QTensor):
      out[name] = [t.config == jqat.gguf.config(name[:4]), list(t.shape), t.dequant_dtype.name]
      for field in ("values", "scale", "zero_point"):
        a, b = np.asarray(getattr(t, field)), expected[f"{name}.{field}"]
        out[name].append(a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)))
    else:
      b = expected[name] if name != "bf16" else expected[name].view(jnp.bfloat16)
      a = np.asarray(t)
      out[name] = [a.dtype.name, list(a.shape), bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))]
  print(json.dumps(out))
  """
)


def test_round_trip_in_a_fresh_process(tmp_path):
  """save here, load in a new interpreter that refuses to unpickle or eval: QTensors field for field,
  float arrays in their dtype, metadata with its types."""
  rng = np.random.default_rng(4)
  tensors = {
    "Q8_0_w": _QUANTIZE["Q8_0"](_weights(5)),
    "Q4_0_w": _QUANTIZE["Q4_0"](_weights(6)),
    "f32": rng.standard_normal((3, 5)).astype(np.float32),
    "f16": jnp.asarray(rng.standard_normal(7), jnp.float16),
    "bf16": jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16),
  }
  meta = {
    "general.architecture": "llama",
    "general.name": "__import__('os').system('touch pwned')",
    "llama.block_count": 2,
    "llama.rope.freq_base": 10000.0,
    "tokenizer.ggml.tokens": ["<s>", "a"],
    "jqat.flag": True,
    "jqat.offset": -5,
    "jqat.u8": (7, gguf.GGUFValueType.UINT8),
  }
  path = tmp_path / "model.gguf"
  jqat.gguf.save(path, tensors, metadata=meta)
  expected = {}
  for name, t in tensors.items():
    if isinstance(t, jqat.QTensor):
      for field in ("values", "scale", "zero_point"):
        expected[f"{name}.{field}"] = np.asarray(getattr(t, field))
    else:
      a = np.asarray(t)
      expected[name] = a.view(np.uint16) if a.dtype == jnp.bfloat16 else a
  np.savez(tmp_path / "expected.npz", **expected)
  warm = tmp_path / "warm.gguf"
  jqat.gguf.save(warm, {"Q4_0_w": tensors["Q4_0_w"], "f16": tensors["f16"], "bf16": tensors["bf16"]}, {"a": [1]})
  run = subprocess.run(
    [sys.executable, "-c", _ROUND_TRIP, str(path), str(warm), str(tmp_path / "expected.npz")],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
  )
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["guard"] == [True, True]
  assert out["names"] == sorted(tensors)
  assert out["Q8_0_w"] == [True, [96, 6], "float32", True, True, True]
  assert out["Q4_0_w"] == [True, [96, 6], "float32", True, True, True]
  assert out["f32"] == ["float32", [3, 5], True]
  assert out["f16"] == ["float16", [7], True]
  assert out["bf16"] == ["bfloat16", [2, 3], True]
  assert {k: out["meta"][k] for k in meta} == {**meta, "jqat.u8": 7}
  assert not (tmp_path / "pwned").exists()
  types = {k: f.types for k, f in gguf.GGUFReader(path).fields.items()}
  assert types["llama.block_count"] == [gguf.GGUFValueType.UINT32]  # what llama.cpp reads its counts as
  assert types["jqat.offset"] == [gguf.GGUFValueType.INT64]
  assert types["jqat.u8"] == [gguf.GGUFValueType.UINT8]


@pytest.mark.parametrize(
  ("config", "words"),
  [
    (jqat.QatConfig(bits="int3", per_channel=True, group_size=32), "int3 (GGUF's Q8_0 is int8 and Q4_0 int4)"),
    (jqat.QatConfig(bits="int4", symmetric=False, per_channel=True, group_size=32), "asymmetric"),
    (jqat.QatConfig(bits="int8", per_channel=True, narrow_range=True), "group_size=None"),
    (jqat.QatConfig(bits="int8", per_channel=True, group_size=32, narrow_range=True), "rounding='half_even'"),
    (jqat.QatConfig(bits="fp8_e4m3", per_channel=True, group_size=32), "fp8_e4m3"),
  ],
)
def test_save_refuses_a_format_gguf_cannot_hold(config, words, tmp_path):
  w = jnp.asarray(_weights(7, 64, 4))
  with pytest.raises(ValueError) as e:
    jqat.gguf.save(tmp_path / "x.gguf", {"blk.1.ffn_down.weight": _quantize(w, config)})
  msg = str(e.value)
  for part in ("'blk.1.ffn_down.weight'", words, "config=QatConfig(", "Q8_0", "Q4_0", "F32"):
    assert part in msg, (part, msg)
  assert not os.listdir(tmp_path)  # nothing written


def test_save_bad_shapes_dtypes_and_metadata(tmp_path):
  cfg = jqat.gguf.config("Q8_0")
  with pytest.raises(ValueError, match=r"group_size=32 does not divide axis 0 \(length 40\)"):
    _quantize(jnp.ones((40, 4)), cfg)
  with pytest.raises(ValueError, match=r"'t' has shape \(64, 2, 2\); Q8_0 holds 2-D kernels.*Reshape the float kernel"):
    jqat.gguf.save(tmp_path / "x.gguf", {"t": _quantize(jnp.ones((64, 2, 2)), cfg)})
  with pytest.raises(ValueError, match=r"'ids' has dtype int32, which jqat does not write"):
    jqat.gguf.save(tmp_path / "x.gguf", {"ids": np.arange(4, dtype=np.int32)})
  q = _QUANTIZE["Q8_0"](_weights(0))
  with pytest.raises(ValueError, match="scales that float16 does not hold exactly"):
    jqat.gguf.save(tmp_path / "x.gguf", {"t": q.replace(scale=jnp.full(q.scale.shape, 0.1))})
  with pytest.raises(ValueError, match="non-finite scales"):
    jqat.gguf.save(tmp_path / "x.gguf", {"t": _QUANTIZE["Q8_0"](jnp.asarray(_weights(0)).at[0, 0].set(jnp.nan))})
  with pytest.raises(ValueError, match="at most 63 bytes"):
    jqat.gguf.save(tmp_path / "x.gguf", {"x" * 64: q})
  with pytest.raises(ValueError, match=r"metadata\['k'\] = \{\} has no GGUF type"):
    jqat.gguf.save(tmp_path / "x.gguf", {"t": q}, {"k": {}})
  assert not os.listdir(tmp_path)


def test_load_truncated_corrupt_and_unsupported(tmp_path):
  path = tmp_path / "good.gguf"
  jqat.gguf.save(path, {"w": _QUANTIZE["Q4_0"](_weights(8))}, {"a": "b"})
  data = path.read_bytes()
  (t,) = gguf.GGUFReader(path).tensors
  end = t.data_offset + t.n_bytes  # what follows is alignment padding
  for cut in (0, 3, 10, 30, t.data_offset - 1, t.data_offset + 5, end - 1):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated or corrupt"):
      jqat.gguf.load(bad)
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
  with pytest.raises(ValueError, match=r"garbage.gguf.*is not a readable GGUF file"):
    jqat.gguf.load(garbage)
  with pytest.raises(ValueError, match="is not a readable GGUF file"):
    jqat.gguf.load_metadata(garbage)
  with pytest.raises(FileNotFoundError):
    jqat.gguf.load(tmp_path / "missing.gguf")
  # A type jqat does not read is named, with the ones it does.
  other = tmp_path / "q4_1.gguf"
  writer = gguf.GGUFWriter(str(other), "llama")
  writer.add_tensor("q41", gguf.quants.quantize(np.ones((2, 32), np.float32), GT.Q4_1), raw_dtype=GT.Q4_1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"'q41' is Q4_1, which jqat does not read; allowed: Q8_0, Q4_0, F32"):
    jqat.gguf.load(other)


def test_llama_cpp_written_tensor_loads(tmp_path):
  """A Q8_0 / Q4_0 tensor written by the gguf package itself loads as the QTensor jqat would have made."""
  w = _weights(9)
  path = tmp_path / "ref.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  for fmt in FORMATS:
    writer.add_tensor(fmt, gguf.quants.quantize(w.T, getattr(GT, fmt)), raw_dtype=getattr(GT, fmt))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  loaded = jqat.gguf.load(path)
  for fmt in FORMATS:
    want = _QUANTIZE[fmt](w)
    got = loaded[fmt]
    assert got.config == want.config and got.shape == want.shape
    for field in ("values", "scale", "zero_point"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))

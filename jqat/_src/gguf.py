"""GGUF, llama.cpp's file format: Q8_0 and Q4_0 tensors written and read with the ``gguf`` package.

llama.cpp stores a matrix ``(out, in)`` row by row in blocks of 32 input
features, each block one fp16 scale ``d`` and 32 codes. The rounding below is
that of the ``gguf`` package's reference quantizer (``gguf.quants``):

* Q8_0: ``d = amax / 127`` (float32, correctly rounded), codes
  ``roundf(x * (1 / d))`` (half away from zero) in ``[-127, 127]``, stored as
  int8 after ``fp16(d)``; read as ``code * fp16(d)``.
* Q4_0: ``d = m / -8``, ``m`` the block's value of largest magnitude with its
  sign (so ``m`` itself is code -8, and ``d < 0`` when ``m > 0``), codes
  ``clip(trunc(x * (1 / d) + 8.5), 0, 15)``, two per byte (element ``j`` in
  the low nibble of byte ``j``, element ``j + 16`` in the high one) after
  ``fp16(d)``; read as ``(code - 8) * fp16(d)``.

``config("Q8_0")`` and ``config("Q4_0")`` are ``QatConfig``s on exactly these
grids (blocks of 32 along axis 0 of a Flax kernel ``(in, out)``, one scale
per block and output feature), so ``fake_quant`` in training, ``quantize``
and the file agree bit for bit. A ``QTensor`` of shape ``(in, out)`` is
stored as llama.cpp's ``(out, in)`` and read back as ``(in, out)``; one of
``config(..., input_axis=1)`` (a kernel ``(out, in)``: torch's order, an einsum
weight contracted over its last axis, an embedding table) is stored as it is.
Float arrays are stored as they are (F32, F16, BF16).

Reading parses the header and maps the tensor bytes (``gguf.GGUFReader``);
no code in the file is ever run (GGUF holds no pickles).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jqat._src.config import QatConfig
from jqat._src.qtensor import QTensor, pack_int4

BLOCK = 32
_FORMATS = ("Q8_0", "Q4_0")
_FLOATS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ALLOWED = (
  "Q8_0 (a QTensor from jqat.gguf.config('Q8_0')), Q4_0 (a QTensor from jqat.gguf.config('Q4_0')), "
  "or a float32 / float16 / bfloat16 array (F32, F16, BF16)"
)
# llama.cpp's GGML_MAX_NAME is 64 bytes with the terminating zero.
_MAX_NAME = 63


def _gguf():
  try:
    import gguf
  except ImportError as e:  # pragma: no cover - the extra is part of the test install
    raise ImportError("jqat.gguf needs the gguf package: pip install 'jqat[gguf]'") from e
  return gguf


def config(name: str, *, input_axis: int = 0) -> QatConfig:
  """The ``QatConfig`` of a llama.cpp format: ``"Q8_0"`` or ``"Q4_0"``.

  Both are symmetric, per-block configs for a 2-D kernel: blocks of 32
  along the input features, one scale per block and output feature
  (``per_channel=True``), the scale stored as float16, and llama.cpp's
  rounding:

  * Q8_0: int8 in ``[-127, 127]``, ``scale_rule="amax_exact"``
    (``d = amax / 127``), ``rounding="half_away_from_zero"``.
  * Q4_0: int4 in ``[-8, 7]``, ``scale_rule="signed_max"`` (``d = m / -8``,
    negative where the block's largest magnitude is positive),
    ``rounding="half_up_unsigned"`` (``trunc(x / d + 8.5) - 8``).

  ``input_axis`` says which axis of the kernel holds the input features:
  0 for a Flax kernel ``(in, out)`` (``group_size=32, group_axis=0,
  channel_axis=-1``); 1 for a kernel ``(out, in)``, llama.cpp's and torch's
  order, and that of an einsum weight contracted over its last axis (gemma's
  ``"...F,NHF->...NH"``, or its embedding table for the tied logits):
  ``group_axis=1, channel_axis=0``. Quantizing an ``(out, in)`` kernel with
  ``input_axis=0`` would put the blocks on the output features, a grid
  llama.cpp does not read.

  Train with it (``fake_quant``, ``QatDense(weight_config=...)``) and the
  weights seen in training are the ones ``save`` writes, bit for bit.

  Raises:
    ValueError: for any other name or input axis, naming the allowed ones.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.gguf.config("Q4_0")
    >>> cfg.bits.value, cfg.group_size, cfg.scale_dtype
    ('int4', 32, 'float16')
    >>> w = jnp.linspace(-1.0, 0.5, 64).reshape(32, 2)
    >>> float(jqat.fake_quant(w, jqat.qparams_from_array(w, cfg), cfg)[0, 0])
    -1.0
    >>> t = jqat.gguf.config("Q8_0", input_axis=1)  # a kernel (out, in)
    >>> jqat.qparams_from_array(w.T, t).scale.shape
    (2, 1)
  """
  key = name.upper() if isinstance(name, str) else name
  if input_axis not in (0, 1) or isinstance(input_axis, bool):
    raise ValueError(
      f"jqat.gguf.config: input_axis={input_axis!r} is invalid; allowed: 0 (a kernel (in, out)) or 1 (a kernel "
      "(out, in))"
    )
  common = dict(per_channel=True, channel_axis=-1 if input_axis == 0 else 0, group_size=BLOCK,
                group_axis=input_axis, scale_dtype="float16")
  if key == "Q8_0":
    return QatConfig(bits="int8", narrow_range=True, rounding="half_away_from_zero", scale_rule="amax_exact", **common)
  if key == "Q4_0":
    return QatConfig(bits="int4", rounding="half_up_unsigned", scale_rule="signed_max", **common)
  raise ValueError(f"jqat.gguf.config: {name!r} is not a GGUF format jqat writes; allowed: 'Q8_0', 'Q4_0'")


def _format_of(cfg: QatConfig) -> tuple[str, int] | tuple[None, None]:
  """The format and input axis of a config of ``config``'s."""
  for f in _FORMATS:
    for axis in (0, 1):
      if cfg == config(f, input_axis=axis):
        return f, axis
  return None, None


def _why_not(cfg: QatConfig) -> str:
  """What keeps a config off GGUF's grids, in a few words."""
  if not cfg.symmetric:
    return "asymmetric (Q8_0 and Q4_0 are symmetric: no zero point)"
  if cfg.bits.value not in ("int8", "int4"):
    return f"{cfg.bits.value} (GGUF's Q8_0 is int8 and Q4_0 int4)"
  layouts = ((0, -1), (1, 0))
  if cfg.group_size != BLOCK or not cfg.per_channel or (cfg.group_axis, cfg.channel_axis) not in layouts:
    return (
      f"per_channel={cfg.per_channel}, channel_axis={cfg.channel_axis!r}, group_size={cfg.group_size}, "
      f"group_axis={cfg.group_axis} (GGUF blocks are 32 input features of one output: per_channel=True, "
      "group_size=32 and group_axis=0, channel_axis=-1 for a kernel (in, out) or group_axis=1, channel_axis=0 for "
      "a kernel (out, in): jqat.gguf.config(name, input_axis=0 or 1))"
    )
  return (
    f"rounding={cfg.rounding.value!r}, scale_rule={cfg.scale_rule.value!r}, scale_dtype={cfg.scale_dtype!r}, "
    f"narrow_range={cfg.narrow_range} (not llama.cpp's grid)"
  )


def _encode_qtensor(name: str, q: QTensor):
  gguf = _gguf()
  fmt, input_axis = _format_of(q.config)
  if fmt is None:
    raise ValueError(
      f"jqat.gguf.save: tensor {name!r} is quantized with a config GGUF cannot hold: {_why_not(q.config)}; "
      f"config={q.config!r}. GGUF holds {_ALLOWED}."
    )
  if q.ndim != 2:
    raise ValueError(
      f"jqat.gguf.save: tensor {name!r} has shape {q.shape}; {fmt} holds 2-D kernels, (in, out) or (out, in), "
      "stored as llama.cpp's (out, in). Reshape the float kernel to 2-D before quantizing it (e.g. an einsum "
      "weight (N, D, H) contracted over D: w.transpose(1, 0, 2).reshape(D, N * H), a kernel (in, out))"
    )
  if input_axis == 1:  # already llama.cpp's (out, in): stored as it is
    q = QTensor(_transposed_values(q), jnp.asarray(q.scale).T, jnp.asarray(q.zero_point).T, config(fmt),
                q.shape[::-1], q.dequant_dtype)
  n_in, n_out = q.shape
  scale = np.asarray(q.scale, np.float32)  # (in / 32, out)
  if not np.isfinite(scale).all():
    raise ValueError(
      f"jqat.gguf.save: tensor {name!r} has non-finite scales ({int((~np.isfinite(scale)).sum())} blocks; "
      "its weights held NaN or Inf)"
    )
  d = scale.astype(np.float16)
  if not np.array_equal(d.astype(np.float32), scale):
    raise ValueError(
      f"jqat.gguf.save: tensor {name!r} has scales that float16 does not hold exactly; quantize it with "
      f"jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg) and cfg = jqat.gguf.config({fmt!r})"
    )
  codes = np.asarray(q.int_values()).T.reshape(n_out, n_in // BLOCK, BLOCK)  # llama.cpp's (out, in) rows
  d = np.ascontiguousarray(d.T).view(np.uint8).reshape(n_out, n_in // BLOCK, 2)
  if fmt == "Q8_0":
    body = codes.astype(np.int8).view(np.uint8)
    qtype = gguf.GGMLQuantizationType.Q8_0
  else:
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    body = u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << np.uint8(4))
    qtype = gguf.GGMLQuantizationType.Q4_0
  blocks = np.concatenate([d, body], axis=-1).reshape(n_out, -1)
  return np.ascontiguousarray(blocks), qtype


def _transposed_values(q: QTensor):
  codes = jnp.asarray(q.int_values()).T
  return pack_int4(codes) if q.config.bits.is_packed else codes


def _encode_array(name: str, x):
  gguf = _gguf()
  a = np.asarray(x)
  kind = _FLOATS.get(a.dtype.name)
  if kind is None:
    raise ValueError(f"jqat.gguf.save: tensor {name!r} has dtype {a.dtype.name}, which jqat does not write; "
                     f"GGUF holds {_ALLOWED}.")
  if a.ndim == 0 or a.ndim > 4:
    raise ValueError(f"jqat.gguf.save: tensor {name!r} has shape {a.shape}; GGUF tensors have 1 to 4 axes")
  a = np.ascontiguousarray(a)
  if kind == "BF16":
    return a.view(np.uint16).view(np.uint8).reshape(a.shape[:-1] + (-1,)), gguf.GGMLQuantizationType.BF16
  return a, None


def _metadata_value(key: str, value):
  """(value, GGUFValueType, sub_type) for one metadata entry."""
  gguf = _gguf()
  t = gguf.GGUFValueType
  if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], t):
    return value[0], value[1], None

  def scalar(v):
    if isinstance(v, bool):
      return t.BOOL
    if isinstance(v, (int, np.integer)):
      if 0 <= v < 2**32:
        return t.UINT32
      if -(2**63) <= v < 2**63:
        return t.INT64
      return None
    if isinstance(v, (float, np.floating)):
      return t.FLOAT32
    if isinstance(v, str):
      return t.STRING
    return None

  if isinstance(value, (list, tuple)):
    types = {scalar(v) for v in value}
    if len(types) == 1 and None not in types:
      return list(value), t.ARRAY, types.pop()
  elif (vt := scalar(value)) is not None:
    return value, vt, None
  raise ValueError(
    f"jqat.gguf.save: metadata[{key!r}] = {value!r} has no GGUF type; allowed: str, bool, int, float, a list of "
    "one of those, or (value, gguf.GGUFValueType.X)"
  )


def save(path, tensors: Mapping, metadata: Mapping | None = None) -> None:
  """Writes ``QTensor``s (Q8_0, Q4_0) and float arrays (F32, F16, BF16) to a GGUF file.

  A ``QTensor`` must come from ``jqat.gguf.config("Q8_0")`` or ``("Q4_0")``
  and be a 2-D kernel ``(in, out)`` (or ``(out, in)`` with
  ``input_axis=1``); it is written as llama.cpp's ``(out, in)`` rows of
  34-byte (Q8_0) or 18-byte (Q4_0) blocks, the bytes
  ``gguf.quants.quantize`` gives for the same weights. Float arrays are
  written as they are. The file is written next to ``path`` and renamed
  into place, so a failed write leaves no partial file.

  Args:
    path: the file to write.
    tensors: ``{name: QTensor | array}``; names of at most 63 bytes.
    metadata: ``{key: value}`` key-value pairs: str, bool, float (FLOAT32),
      int (UINT32 when it fits, else INT64), a list of one of those, or
      ``(value, gguf.GGUFValueType.X)`` for another type. The key
      ``"general.architecture"`` (default ``"jqat"``) names the model family
      for llama.cpp.

  Raises:
    ValueError: for a tensor GGUF cannot hold (another config, e.g. int3,
      asymmetric or per-channel int8, naming the tensor, its config and the
      formats allowed; non-float arrays; scales float16 does not hold),
      a bad name or metadata value.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, jqat
    >>> cfg = jqat.gguf.config("Q8_0")
    >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(64, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.gguf")
    >>> jqat.gguf.save(path, {"blk.0.ffn_up.weight": jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)})
    >>> jqat.gguf.load(path)["blk.0.ffn_up.weight"].shape
    (64, 2)
  """
  gguf = _gguf()
  if not isinstance(tensors, Mapping):
    raise TypeError(f"jqat.gguf.save: tensors must be a {{name: QTensor | array}} dict, not {type(tensors).__name__}")
  metadata = dict(metadata or {})
  arch = metadata.pop("general.architecture", "jqat")
  if not isinstance(arch, str):
    raise ValueError(f"jqat.gguf.save: metadata['general.architecture'] must be a str, got {arch!r}")
  encoded = []
  for name, t in tensors.items():
    if not isinstance(name, str) or not name or len(name.encode()) > _MAX_NAME:
      raise ValueError(f"jqat.gguf.save: tensor name {name!r} must be a non-empty str of at most {_MAX_NAME} bytes")
    data, qtype = _encode_qtensor(name, t) if isinstance(t, QTensor) else _encode_array(name, t)
    encoded.append((name, data, qtype))
  kvs = [(k, *_metadata_value(k, v)) for k, v in metadata.items()]
  for k, *_ in kvs:
    if not isinstance(k, str) or not k:
      raise ValueError(f"jqat.gguf.save: metadata key {k!r} must be a non-empty str")

  path = os.fspath(path)
  tmp = f"{path}.{os.getpid()}.tmp"
  writer = gguf.GGUFWriter(tmp, arch)
  try:
    for key, value, vtype, sub in kvs:
      writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, qtype in encoded:
      writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  finally:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)


def _reader(path, where: str):
  gguf = _gguf()
  try:
    return gguf.GGUFReader(os.fspath(path))
  except OSError:
    raise
  except Exception as e:  # a corrupt header can fail anywhere in the parser
    size = os.path.getsize(path) if os.path.exists(path) else 0
    raise ValueError(
      f"{where}: {os.fspath(path)!r} ({size} bytes) is not a readable GGUF file, truncated or corrupt: "
      f"{type(e).__name__}: {e}"
    ) from e


def _decode_blocks(name: str, fmt: str, data: np.ndarray, ne) -> QTensor:
  n_in, n_out = (int(d) for d in ne)
  if n_in % BLOCK:
    raise ValueError(f"jqat.gguf.load: tensor {name!r} has {n_in} input features, not a multiple of {BLOCK}")
  size = 34 if fmt == "Q8_0" else 18
  blocks = np.asarray(data, np.uint8).reshape(n_out, n_in // BLOCK, size)
  d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)  # (out, in / 32)
  body = blocks[..., 2:]
  if fmt == "Q8_0":
    codes = body.view(np.int8)
  else:
    u = np.concatenate([body & np.uint8(0x0F), body >> np.uint8(4)], axis=-1)
    codes = u.astype(np.int8) - np.int8(8)
  codes = codes.reshape(n_out, n_in).T  # jqat's (in, out)
  cfg = config(fmt)
  values = jnp.asarray(codes) if fmt == "Q8_0" else pack_int4(jnp.asarray(codes))
  scale = jnp.asarray(np.ascontiguousarray(d.T))
  return QTensor(values, scale, jnp.zeros_like(scale), cfg, (n_in, n_out))


def load(path) -> dict:
  """Reads a GGUF file's tensors: Q8_0 and Q4_0 as ``QTensor``s, F32 / F16 / BF16 as arrays.

  A Q8_0 or Q4_0 tensor of llama.cpp's shape ``(out, in)`` comes back as a
  ``QTensor`` of shape ``(in, out)`` with ``jqat.gguf.config(...)``'s
  config, int8 (or packed int4) codes and the fp16 scales as float32:
  ``jqat.dequantize`` of it equals ``gguf.quants.dequantize`` of the file's
  bytes. Float arrays keep their shape and dtype. Only the header is parsed
  and the data mapped; nothing in the file is run.

  Raises:
    ValueError: for a file that is not GGUF, truncated or corrupt (naming
      the file), or a tensor of a type jqat does not read (naming it and the
      types allowed).
    FileNotFoundError: when there is no file.

  Examples:
    >>> import os, tempfile, numpy as np, jqat
    >>> path = os.path.join(tempfile.mkdtemp(), "f.gguf")
    >>> jqat.gguf.save(path, {"output_norm.weight": np.ones(4, np.float32)}, {"general.name": "tiny"})
    >>> jqat.gguf.load(path)["output_norm.weight"].tolist(), jqat.gguf.load_metadata(path)["general.name"]
    ([1.0, 1.0, 1.0, 1.0], 'tiny')
  """
  gguf = _gguf()
  reader = _reader(path, "jqat.gguf.load")
  qt = gguf.GGMLQuantizationType
  out = {}
  for t in reader.tensors:
    ne = [int(d) for d in t.shape]
    shape = tuple(reversed(ne))
    want = int(np.prod(ne)) * gguf.GGML_QUANT_SIZES[t.tensor_type][1] // gguf.GGML_QUANT_SIZES[t.tensor_type][0]
    if t.data.nbytes != want or t.data_offset + want > reader.data.size:
      raise ValueError(
        f"jqat.gguf.load: tensor {t.name!r} needs {want} bytes at offset {t.data_offset} but "
        f"{os.fspath(path)!r} has {reader.data.size}: the file is truncated or corrupt"
      )
    if t.tensor_type in (qt.Q8_0, qt.Q4_0):
      if len(ne) != 2:
        raise ValueError(
          f"jqat.gguf.load: tensor {t.name!r} is {t.tensor_type.name} of shape {shape}; jqat reads 2-D ones"
        )
      out[t.name] = _decode_blocks(t.name, t.tensor_type.name, t.data, ne)
    elif t.tensor_type in (qt.F32, qt.F16):
      out[t.name] = jnp.asarray(np.array(t.data).reshape(shape))
    elif t.tensor_type == qt.BF16:
      out[t.name] = jnp.asarray(np.array(t.data).view(np.uint16).view(jnp.bfloat16).reshape(shape))
    else:
      raise ValueError(
        f"jqat.gguf.load: tensor {t.name!r} is {t.tensor_type.name}, which jqat does not read; allowed: "
        "Q8_0, Q4_0, F32, F16, BF16"
      )
  return out


def load_metadata(path) -> dict:
  """A GGUF file's key-value metadata, ``{key: value}`` (the header's own counts left out).

  Raises:
    ValueError: for a file that is not GGUF, truncated or corrupt.
  """
  reader = _reader(path, "jqat.gguf.load_metadata")
  fields = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    fields[key] = field.contents()
  return fields

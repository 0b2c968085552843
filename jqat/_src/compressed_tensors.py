"""compressed-tensors checkpoints of quantized Dense layers: the format vLLM serves.

A checkpoint is a directory with ``model.safetensors`` (the tensors) and
``config.json`` whose ``quantization_config`` says how each layer is
quantized, as the ``compressed-tensors`` package defines it (built with its
own ``QuantizationConfig``, ``QuantizationScheme`` and ``QuantizationArgs``
classes and written by its ``ModelCompressor.update_config``; an existing
``config.json`` keeps its other keys).

Each quantized layer ``name`` becomes a torch ``Linear``'s tensors, weights in
torch's ``(out, in)`` order (a Flax kernel is ``(in, out)``):

* ``name.weight``: int8 codes (``int-quantized``, with integer activations)
  or float8_e4m3fn values (fp8);
* or ``name.weight_packed``: int32 words of ``32 / bits`` codes each along
  the input features, and ``name.weight_shape``, int64 ``[out, in]``
  (``pack-quantized``: weight-only int2 .. int8);
* ``name.weight_scale``: float32, ``(1,)`` per tensor, ``(out, 1)`` per
  channel, ``(out, in / group_size)`` per group;
* ``name.weight_zero_point``: int8, for asymmetric weights
  (``pack-quantized`` packs it along the output features);
* ``name.input_scale`` (float32 ``(1,)``) and, when asymmetric,
  ``name.input_zero_point`` (int8 ``(1,)``): a frozen per-tensor activation
  range;
* ``name.bias``: the layer's float bias, when it has one.

The storage format of each group of layers is the one ``compressed-tensors``
infers for its scheme (``infer_module_format``): int8 weights with int8
activations (W8A8) are ``int-quantized``, weight-only int4 with groups of 128
(W4A16) ``pack-quantized``, fp8 ``float-quantized``. Scales are stored in
float32, so the package's own decompressor gives ``jqat.dequantize``'s weights
bit for bit.

Layer names: a Flax path with dots, without the quantized op's own name (the
layer owns the kernel): linen ``serving/Dense_0/quant`` is ``"Dense_0"``, NNX
``model.blocks[0].dot_general`` is ``"blocks.0"``, a module's own parameter
contracted by ``jnp.einsum`` (``quantize_model`` on gemma's ``Einsum``,
``serving/layer_0/attn/q_einsum/w_quant``) is the module's path,
``"layer_0.attn.q_einsum"``. Pass ``names`` to map them onto the names of the
torch model that will load the file (e.g. ``"model.layers.0.mlp.up_proj"``);
a list of names splits a layer along its kernel's first output axis (gemma's
``kv_einsum`` ``(2, K, D, H)`` into ``k_proj`` and ``v_proj``).

Kernels of any number of axes (einsum and ``DenseGeneral`` weights, and
kernels ``(out, in)``) are written as the Linear weight ``(out, in)`` whose
input features are the contracted axes, in order, and whose outputs are the
others, in order: gemma's ``q_einsum`` ``(N, D, H)`` is ``q_proj``'s
``(N * H, D)``. Serving variables do not record an equation, so the axes are
read from the scales (per channel or per group: the contracted axes are the
reduced ones) or from the column sums of an asymmetric activation; a
per-tensor einsum weight without sums is refused, never guessed.

What compressed-tensors cannot hold raises ``ValueError`` naming the layer:
fp8 e5m2; narrow-range or per-group activations (its activations use the full
integer range, per tensor or per token); an AWQ / SmoothQuant input divisor
(fold it into the layer before, ``jqat.fold_into_layernorm``); conv kernels and
``nn.Embed`` / ``nnx.Embed`` tables; per-group weights contracted over more
than one axis.

Reading (``load``) never runs code from the files: the tensors come through
``safetensors`` and the configs through ``json``; nothing is unpickled.

Both directions need torch and the ``compressed-tensors`` package
(``pip install 'jqat[compressed-tensors]'``); jqat itself imports without them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.formats import QuantBits
from jqat._src.qparams import QParams
from jqat._src.qtensor import PACK_AXIS, QTensor, check_qtensor, pack_int4, unpack_int4

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # a checkpoint in several shards
CONFIG_NAME = "config.json"
# safetensors metadata key of what compressed-tensors does not record (each weight's whole QatConfig: narrow range,
# per-group scales shared by all output channels, ...; the float type dequantize returns), so that load gives back
# the same QTensor.
_META_KEY = "jqat"
_META_VERSION = 1
_INSTALL = "pip install 'jqat[compressed-tensors]' (it needs torch: install its CPU build first if you have no GPU)"


class Layer(NamedTuple):
  """One quantized Dense layer as a compressed-tensors checkpoint holds it.

  Attributes:
    weight: the kernel, in Flax's ``(in, out)`` layout.
    activation: how the layer's input is quantized: None (weight-only), a
      per-tensor config whose frozen range is ``input_qparams``, or a per-token
      (``per_channel=True``) config whose scales the server computes from each
      token.
    input_qparams: the frozen per-tensor activation range, or None.
    bias: the layer's float bias ``(out,)``, or None.
  """

  weight: QTensor
  activation: QatConfig | None = None
  input_qparams: QParams | None = None
  bias: Any = None


def _require(where: str):
  """torch, the compressed-tensors package and safetensors' torch API, imported on first use."""
  try:
    import compressed_tensors  # noqa: PLC0415, F401 (optional dependency)
    import safetensors.torch  # noqa: PLC0415, F401
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(f"{where} needs torch and the compressed-tensors package ({e}); {_INSTALL}") from e
  return torch


# --- collecting the quantized layers of a converted model ------------------------------------------------------


def _bits_of(code: int) -> QuantBits:
  members = tuple(QuantBits)
  if not 0 <= code < len(members):
    raise ValueError(f"an unreadable format code {code}")
  return members[code]


def _kernel_layout(where: str, entry: Mapping) -> tuple[QatConfig, tuple[int, ...], list[int]]:
  """(config, shape, code) of a kernel's recorded ``layout`` (``common.weight_layout``), checked to read back."""
  from jqat._src.flax import common  # noqa: PLC0415 (Flax is needed only for Flax models)

  if "layout" not in entry:
    raise ValueError(f"{where}: the serving variables of the kernel record no 'layout'; convert the model again.")
  code = [int(c) for c in np.asarray(entry["layout"]).reshape(-1)]
  if len(code) < 7 or len(code) != 7 + code[6]:
    raise ValueError(f"{where}: the kernel's serving variables hold {common.describe_layout(code)}.")
  bits, symmetric, narrow, per_channel, group = code[:5]
  shape = tuple(code[7:])
  cfg = QatConfig(
    bits=_bits_of(bits), symmetric=bool(symmetric), narrow_range=bool(narrow), per_channel=bool(per_channel),
    group_size=group or None,
  )
  # The layout is read back the way common.weight_layout writes it; the two must agree.
  if not np.array_equal(common.weight_layout(cfg, shape), np.asarray(code)):
    raise ValueError(f"{where}: the kernel's layout {code} is not one this version of jqat writes.")
  return cfg, shape, code


def _weight_qtensor(where: str, entry: Mapping) -> QTensor:
  """The QTensor of a kernel's serving variables (``common.serving_weight``), read from its recorded layout."""
  from jqat._src.flax import common  # noqa: PLC0415 (Flax is needed only for Flax models)

  cfg, shape, code = _kernel_layout(where, entry)
  if len(shape) != 2:
    raise ValueError(
      f"{where}: compressed-tensors holds Linear weights; this layer's kernel has shape {shape} "
      f"({common.describe_layout(code)}), and it is not a Dense, DenseGeneral or einsum weight whose scales say "
      "which axes it contracts (a convolution, or a per-tensor scale). Leave it out with names=."
    )
  try:
    return QTensor(np.asarray(entry["values"]), np.asarray(entry["scale"]), np.asarray(entry["zero_point"]), cfg,
                   shape)
  except ValueError as e:
    raise ValueError(
      f"{where}: the kernel of shape {shape} is not a Dense kernel (in, out) with its scales on the output "
      f"features ({e})."
    ) from None


def _einsum_qtensor(where: str, entry: Mapping) -> tuple[QTensor, int] | None:
  """A kernel of any axes as a Linear weight ``(in, out)``, and the length of its first output axis.

  Serving variables record a kernel's shape, format and (since convert
  records it) the axes its dot contracts; without that record the scales say
  it: a per-channel or per-group scale keeps the length of each
  output axis and reduces the contracted ones (to 1, or to the number of
  groups), and so do the column sums of an asymmetric activation. The
  contracted axes, in order, become the input features and the others, in
  order, the output features (gemma's ``q_einsum`` ``(N, D, H)`` is a Linear
  ``(D, N * H)``, its gating weight ``(2, F, D)`` of ``"...F,NHF->...NH"`` a
  Linear ``(D, 2 * F)``). None when they do not say it (a per-tensor scale
  without sums).
  """
  from jqat._src.flax import common  # noqa: PLC0415

  cfg, shape, code = _kernel_layout(where, entry)
  values = np.asarray(entry["values"])
  codes = np.asarray(unpack_int4(values, shape[PACK_AXIS])) if cfg.bits.is_packed and shape else values
  scale, zp = np.asarray(entry["scale"], np.float32), np.asarray(entry["zero_point"], np.float32)
  described = common.describe_layout(code)
  reduced = None
  if "contracting" in entry:  # recorded by convert: the axes the layer's dot contracts
    reduced = tuple(sorted({int(a) for a in np.asarray(entry["contracting"]).reshape(-1)}))
    if not reduced or not all(0 <= a < len(shape) for a in reduced):
      raise ValueError(f"{where}: the kernel's recorded contracting axes {reduced} do not fit its shape {shape}.")
  for held in (scale, np.asarray(entry["sums"]) if "sums" in entry else None):
    if reduced is None and held is not None and held.ndim == len(shape) and held.shape != shape:
      reduced = tuple(a for a in range(len(shape)) if held.shape[a] != shape[a])
  if reduced is None:
    return None
  if codes.shape != shape or scale.shape != zp.shape:
    raise ValueError(f"{where}: the serving variables of the {described} do not fit it (values {codes.shape}, "
                     f"scale {scale.shape}, zero point {zp.shape}); convert the model again.")
  outputs = tuple(a for a in range(len(shape)) if a not in reduced)
  if not reduced or not outputs:
    raise ValueError(f"{where}: the {described} has scales of shape {scale.shape}, which leave it no "
                     f"{'contracted' if not reduced else 'output'} axis.")
  grouped = [a for a in reduced if scale.ndim and scale.shape[a] != 1]
  if cfg.group_size is not None and (len(grouped) > 1 or sum(shape[a] > 1 for a in reduced) > 1):
    raise ValueError(
      f"{where}: the {described} is quantized per group of {cfg.group_size} but contracts over the axes {reduced} "
      f"of shape {tuple(shape[a] for a in reduced)}; compressed-tensors' groups run along one input axis."
    )
  n_in, n_out = int(np.prod([shape[a] for a in reduced])), int(np.prod([shape[a] for a in outputs]))
  perm = reduced + outputs
  kernel = np.ascontiguousarray(codes.transpose(perm).reshape(n_in, n_out))
  if scale.ndim:
    scale = np.ascontiguousarray(scale.transpose(perm).reshape(-1, n_out))
    zp = np.ascontiguousarray(zp.transpose(perm).reshape(-1, n_out))
  cfg2 = cfg.replace(channel_axis=-1, group_axis=0)
  try:
    q = QTensor(pack_int4(kernel) if cfg.bits.is_packed else kernel, scale, zp, cfg2, (n_in, n_out))
  except ValueError as e:
    raise ValueError(f"{where}: the {described} does not read as a Linear weight ({n_in}, {n_out}): {e}") from None
  return q, shape[outputs[0]]


def _kernel_of(where: str, entry: Mapping, dense: bool) -> tuple[QTensor, int]:
  """The Linear weight ``(in, out)`` of a kernel's serving variables, and the length of its first output axis.

  ``dense``: the kernel is known to be ``(in, out)`` (a Dense layer's), so a
  per-tensor scale that says nothing of the axes is read that way.
  """
  found = _einsum_qtensor(where, entry)
  if found is not None:
    return found
  if dense:
    q = _weight_qtensor(where, entry)
    return q, q.shape[1]
  from jqat._src.flax import common  # noqa: PLC0415

  raise ValueError(
    f"{where}: the {common.describe_layout(entry['layout'])} is a module's own parameter contracted by an einsum or "
    "dot, and its per-tensor scale (without column sums) does not say which of its axes are contracted; "
    "compressed-tensors needs a Linear weight (out, in). Quantize it per channel (per_channel=True), or leave the "
    "layer out with names=."
  )


def _activation_of(where: str, entry: Mapping) -> tuple[QatConfig, QParams]:
  from jqat._src.flax import common  # noqa: PLC0415

  code = np.asarray(entry.get("layout", ()), np.int64).reshape(-1)
  if code.size != 3:
    raise ValueError(f"{where}: the frozen activation range records no readable 'layout' ({code.tolist()}).")
  cfg = QatConfig(bits=_bits_of(int(code[0])), symmetric=bool(code[1]), narrow_range=bool(code[2]))
  if not np.array_equal(common.activation_layout(cfg), code):
    raise ValueError(f"{where}: the activation layout {code.tolist()} is not one this version of jqat writes.")
  return cfg, QParams(np.asarray(entry["scale"], np.float32), np.asarray(entry["zero_point"], np.float32))


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def _linen_layers(variables: Mapping, activation) -> dict[str, tuple[str, Layer, bool]]:
  """``{op path: (layer path, Layer, has column sums)}`` of linen serving variables."""
  from flax import traverse_util  # noqa: PLC0415

  if "serving" not in variables:
    raise ValueError(
      f"jqat.compressed_tensors.save: the variables hold no 'serving' collection (collections {sorted(variables)}); "
      "convert the model first: served = jqat.linen.convert(model, variables, x)."
    )
  flat = traverse_util.flatten_dict(dict(variables["serving"]), keep_empty_nodes=False)
  params = traverse_util.flatten_dict(dict(variables.get("params", {})), keep_empty_nodes=False)
  ops = sorted({p[:-2] for p in flat if len(p) >= 2 and p[-2] == "rhs" and p[-1] == "values"})
  out = {}
  for op in ops:
    default = _dotted(op[:-1] or op)
    try:
      layer, lead = _linen_layer(op, flat, params, activation,
                                 f"layer '{default}' (serving/{'/'.join(map(str, op))})")
    except ValueError as e:  # raised by layers() unless names= leaves the layer out
      layer, lead = e, None
    out[_dotted(op)] = (default, layer, "sums" in {p[-1] for p in flat if p[:-1] == op + ("rhs",)}, lead)
  return out


def _linen_layer(op: tuple, flat: dict, params: dict, activation, where: str) -> tuple[Layer, int]:
  from flax.core import meta  # noqa: PLC0415

  rhs = {p[-1]: v for p, v in flat.items() if p[:-1] == op + ("rhs",)}
  replaced = sorted(p[-1] for p in flat if p[:-1] == op[:-1] + ("replaced",))
  if "embedding" in replaced:  # nn.Embed's table (lookup and attend)
    raise _not_dense_error(where, "embedding")
  if op + ("input_scale",) in flat:
    raise _input_scale_error(where)
  # A layer's own op ("quant": Dense, DenseGeneral, Einsum, jqat's layers) holds a kernel; "<param>_quant" is a
  # module's own parameter that an einsum or dot contracts (gemma's Einsum "w", its tied embedding table). Any
  # other op (a convolution's, an op handed to a stock layer) must hold a Dense kernel (in, out) itself.
  if op[-1] == "quant" or str(op[-1]).endswith("_quant"):
    weight, lead = _kernel_of(where, rhs, dense=op[-1] == "quant")
  else:
    weight = _weight_qtensor(where, rhs)
    lead = weight.shape[1]
  lhs = {p[-1]: v for p, v in flat.items() if p[:-1] == op + ("lhs",)}
  if lhs:
    act, qp = _activation_of(where, lhs)
  else:
    act = activation(_dotted(op[:-1] or op)) if callable(activation) else activation
    qp = None
  return Layer(weight, act, qp, meta.unbox(params.get(op[:-1] + ("bias",)))), lead


def _nnx_layers(model) -> dict[str, tuple[str, Layer, bool]]:
  from flax import nnx  # noqa: PLC0415

  from jqat._src.flax import nnx as qnnx  # noqa: PLC0415

  modules = dict(nnx.iter_modules(model))
  out = {}
  for path, m in modules.items():
    if not isinstance(m, qnnx._Quantizer) or not m.is_converted:  # noqa: SLF001 (the NNX ops' common base)
      continue
    layer_path = path[:-1] or path
    where = f"layer '{_dotted(layer_path)}' ({type(m).__name__} at {_dotted(path)})"
    try:
      layer, lead = _nnx_layer(m, modules.get(path[:-1]) if path else None, where)
    except ValueError as e:  # raised by layers() unless names= leaves the layer out
      layer, lead = e, None
    out[_dotted(path)] = (_dotted(layer_path), layer, "sums" in m.rhs_serving.get_value(), lead)
  return out


def _nnx_layer(m, parent, where: str) -> Layer:
  from flax import nnx  # noqa: PLC0415

  from jqat._src.flax import common  # noqa: PLC0415

  if getattr(m, "input_scale", None) is not None:
    raise _input_scale_error(where)
  if parent is not None and hasattr(parent, "embedding") and not hasattr(parent, "kernel"):
    raise _not_dense_error(where, "embedding")
  entry = m.rhs_serving.get_value()
  if isinstance(parent, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
    weight, lead = _kernel_of(where, entry, dense=isinstance(parent, nnx.Linear))
  else:  # a convolution's, or a jqat layer's own: a Dense kernel (in, out) or an error
    weight = _weight_qtensor(where, entry)
    lead = weight.shape[1]
  lhs = m.lhs_serving.get_value() if m.lhs_serving is not None else None
  if lhs is not None:
    act, qp = _activation_of(where, lhs)
  else:
    act = m.lhs_config if common.is_dynamic(m.lhs_config) else None
    qp = None
  bias = getattr(parent, "bias", None) if parent is not None else None
  return Layer(weight, act, qp, bias.get_value() if isinstance(bias, nnx.Variable) else bias), lead


def _not_dense_error(where: str, param: str) -> ValueError:
  return ValueError(
    f"{where}: the quantized parameter is '{param}', not a Dense kernel; compressed-tensors' Linear layers hold "
    "Dense kernels (leave this layer out with names=)."
  )


def _input_scale_error(where: str) -> ValueError:
  return ValueError(
    f"{where}: holds an AWQ / SmoothQuant input divisor (serving 'input_scale'), which compressed-tensors cannot "
    "hold; fold it into the layer before this one (jqat.fold_into_layernorm / jqat.fold_into_dense) and convert "
    "again."
  )


def _is_nnx(obj) -> bool:
  try:
    from flax import nnx  # noqa: PLC0415
  except ImportError:
    return False
  return isinstance(obj, nnx.Module)


def layers(served, *, activation=None, names=None) -> dict[str, Layer]:
  """The quantized Dense layers of a converted model, by the names ``save`` writes them under.

  Args:
    served: linen serving variables (``jqat.linen.convert``), a converted NNX
      model (``jqat.nnx.convert``), or a mapping ``{name: Layer | QTensor}``
      (a ``QTensor`` is a weight-only layer; its kernel is ``(in, out)``).
    activation: for linen variables, the activation config of layers that
      hold no frozen range (serving variables do not record it): None for
      weight-only, a per-token config (``QatConfig(per_channel=True)``), or a
      function of the layer's name. Layers with a frozen range, and NNX
      models, say it themselves.
    names: None, a mapping from the default name (the Flax path with dots,
      without the quantized op) to the name to write, or a function of the
      default name that returns it. A name of None leaves the layer out (e.g.
      an embedding table or a conv, which compressed-tensors' Linear layers
      cannot hold); a list of names splits the layer into one Linear layer
      per index of its kernel's first output axis, whose length must be the
      number of names (a fused or stacked projection: gemma's ``kv_einsum``
      into ``[k_proj, v_proj]``, its gating einsum into
      ``[gate_proj, up_proj]``).

  Returns:
    ``{name: Layer}``, in the order of the layers' Flax paths.

  Raises:
    ValueError: for variables that are not converted, two layers with one
      name, a name the mapping lacks, a list of names whose length is not
      that of the kernel's first output axis, a layer whose variables
      contradict ``activation``, or a layer compressed-tensors cannot hold as
      a Linear layer (an ``Embed`` table, a conv, an einsum weight whose
      per-tensor scale does not say which axes it contracts, an AWQ input
      divisor) that ``names`` does not leave out.
    TypeError: for an input of another kind.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(bits="int4", per_channel=True, group_size=128)
    >>> w = jax.random.normal(jax.random.key(0), (256, 8))
    >>> q = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
    >>> layers({"proj": q}, names=lambda n: "model." + n)["model.proj"].weight.shape
    (256, 8)
  """
  if isinstance(served, Mapping) and served and all(isinstance(v, (QTensor, Layer)) for v in served.values()):
    if activation is not None:
      raise ValueError("jqat.compressed_tensors: activation= is for linen variables; a Layer says its own.")
    found = {}
    for k, v in served.items():
      if not isinstance(k, str):
        raise TypeError(f"jqat.compressed_tensors: layer names must be strings, got {k!r}.")
      v = Layer(v) if isinstance(v, QTensor) else v
      check_qtensor(v.weight, f"jqat.compressed_tensors: layer '{k}'", "weight")
      found[k] = (k, v, None, v.weight.shape[1])  # None: no serving variables to check the activation against
  elif isinstance(served, Mapping):
    found = _linen_layers(served, activation)
  elif _is_nnx(served):
    if activation is not None:
      raise ValueError(
        "jqat.compressed_tensors: activation= is for linen variables; an NNX model knows its activation configs."
      )
    found = _nnx_layers(served)
  else:
    raise TypeError(
      "jqat.compressed_tensors: expected linen serving variables (from jqat.linen.convert), a converted NNX model, "
      f"or a mapping {{name: QTensor | Layer}}; got {type(served).__name__}."
    )
  out = {}
  for op, (default, layer, sums, lead) in found.items():
    name = _rename(default, names)
    if name is None:
      continue
    if isinstance(layer, ValueError):
      raise layer
    # An integer kernel converted for asymmetric activations keeps the column sums their zero point multiplies.
    act = layer.activation
    wants_sums = act is not None and not act.symmetric and not layer.weight.config.bits.is_float
    if sums is not None and sums != wants_sums:
      held = "hold column sums, so it was" if sums else "hold no column sums, so it was not"
      raise ValueError(
        f"layer '{default}': its serving variables {held} converted for asymmetric activations, but "
        f"activation={act} says otherwise; pass the activation config it was trained with, e.g. "
        "activation=jqat.QatConfig(per_channel=True, symmetric=False) or activation=jqat.QatConfig(per_channel=True)."
      )
    parts = [name] if isinstance(name, str) else list(name)
    pieces = [layer] if isinstance(name, str) else _split(default, layer, len(parts), lead)
    for part, piece in zip(parts, pieces, strict=True):
      if part in out:
        raise ValueError(
          f"two quantized layers are both named '{part}' (the second is the op at '{op}'); pass names= to tell them "
          "apart."
        )
      out[part] = piece
  return out


def _split(default: str, layer: Layer, n: int, lead: int | None) -> list[Layer]:
  """``layer`` as ``n`` Linear layers, one per index of its kernel's first output axis (of length ``n``)."""
  q = layer.weight
  if lead != n:
    raise ValueError(
      f"names gives {n} names for the layer '{default}', whose kernel's first output axis has length {lead} (the "
      f"Linear weight is {q.shape[::-1]} (out, in)); a list of names splits a layer along that axis, one name per "
      "index (e.g. gemma's kv_einsum into k_proj and v_proj)."
    )
  width = q.shape[1] // n
  scale, zp = np.asarray(q.scale), np.asarray(q.zero_point)
  bias = None if layer.bias is None else np.asarray(layer.bias)
  out = []
  for i in range(n):
    cols = slice(i * width, (i + 1) * width)
    weight = QTensor(
      np.asarray(q.values)[:, cols], scale[:, cols] if scale.ndim else scale, zp[:, cols] if zp.ndim else zp,
      q.config, (q.shape[0], width), q.dequant_dtype,
    )
    out.append(layer._replace(weight=weight, bias=None if bias is None else bias[cols]))
  return out


def _rename(default: str, names) -> str | list | tuple | None:
  if names is None:
    return default
  if isinstance(names, Mapping):
    if default not in names:
      raise ValueError(f"names has no entry for the layer '{default}' (it has {sorted(names)}).")
    name = names[default]
  elif callable(names):
    name = names(default)
  else:
    raise TypeError(f"names must be None, a mapping or a function of the layer's name; got {type(names).__name__}.")
  if isinstance(name, (list, tuple)) and name:
    for part in name:
      _check_name(part, default)
  elif name is not None:
    _check_name(name, default)
  return name


def _check_name(name, default: str) -> None:
  if not isinstance(name, str) or not name or name != name.strip() or name.endswith("."):
    raise ValueError(
      f"names gives {name!r} for the layer '{default}'; expected a non-empty dotted name, a list of them (one per "
      "index of the kernel's first output axis), or None."
    )


# --- what compressed-tensors holds -------------------------------------------------------------------------------


def _num_type(bits: QuantBits, where: str, what: str) -> tuple[int, str]:
  if bits is QuantBits.FP8_E5M2:
    raise ValueError(
      f"{where}: {what} in fp8_e5m2, which compressed-tensors cannot hold (its fp8 is e4m3fn); quantize to "
      "'fp8_e4m3' or an integer format."
    )
  if bits is QuantBits.FP8_E4M3:
    return 8, "float"
  return bits.num_bits, "int"


def _weight_args(name: str, q: QTensor) -> dict:
  where = f"layer '{name}'"
  cfg = q.config
  if len(q.shape) != 2:
    raise ValueError(f"{where}: compressed-tensors holds 2-D Linear weights; the kernel has shape {q.shape}.")
  num_bits, kind = _num_type(cfg.bits, where, "the weights are")
  in_features, out_features = q.shape
  # The scale layout must be a Dense kernel's (in, out): per channel on axis 1, groups along axis 0.
  expected = qparams_lib.params_shape(q.shape, cfg.replace(channel_axis=1, group_axis=0))
  if tuple(np.shape(q.scale)) != expected or (
    cfg.per_channel and (cfg.channel_axes not in ((1,), (-1,)))
  ) or (cfg.group_size is not None and cfg.group_axis % 2 != 0):
    raise ValueError(
      f"{where}: the kernel {q.shape} has scales of shape {tuple(np.shape(q.scale))} ({cfg}); compressed-tensors "
      "holds a Dense kernel (in, out) with scales per tensor, per output channel or per group of input features."
    )
  scale = np.asarray(q.scale, np.float32)
  if not (np.isfinite(scale).all() and (scale > 0).all()):
    bad = scale[~(np.isfinite(scale) & (scale > 0))].reshape(-1)[0]
    raise ValueError(
      f"{where}: a weight scale is {bad}; compressed-tensors' readers take positive finite scales (a NaN scale marks "
      "a kernel that held NaN or Inf)."
    )
  args: dict = {"num_bits": num_bits, "type": kind, "symmetric": cfg.symmetric, "dynamic": False}
  if cfg.group_size is not None:
    if in_features % cfg.group_size:
      raise ValueError(f"{where}: {in_features} input features do not split into groups of {cfg.group_size}.")
    args.update(strategy="group", group_size=cfg.group_size)
  elif cfg.per_channel:
    args.update(strategy="channel")
  else:
    args.update(strategy="tensor")
  return args


def _input_args(name: str, layer: Layer) -> dict | None:
  where = f"layer '{name}'"
  act = layer.activation
  if act is None:
    if layer.input_qparams is not None:
      raise ValueError(f"{where}: input_qparams without an activation config.")
    return None
  if not isinstance(act, QatConfig):
    raise TypeError(f"{where}: activation must be a jqat.QatConfig or None, got {type(act).__name__}.")
  num_bits, kind = _num_type(act.bits, where, "the activations are")
  if act.narrow_range:
    raise ValueError(
      f"{where}: narrow-range activations, which compressed-tensors cannot hold (it clips activations to the "
      "full range, e.g. [-128, 127]); use narrow_range=False."
    )
  if act.group_size is not None:
    raise ValueError(
      f"{where}: per-group activations (group_size={act.group_size}), which compressed-tensors does not hold for "
      "integer Linear layers; use per-token (per_channel=True) or per-tensor activations."
    )
  args: dict = {"num_bits": num_bits, "type": kind, "symmetric": act.symmetric}
  if act.per_channel:
    if layer.input_qparams is not None:
      raise ValueError(f"{where}: per-token activations take their range from each token; input_qparams must be None.")
    return {**args, "strategy": "token", "dynamic": True}
  if layer.input_qparams is None:
    raise ValueError(
      f"{where}: a per-tensor activation config needs its frozen range (input_qparams); calibrate and convert the "
      "model, or use per-token activations (per_channel=True)."
    )
  scale = np.asarray(layer.input_qparams.scale, np.float32)
  zp = np.asarray(layer.input_qparams.zero_point, np.float32)
  if scale.size != 1 or zp.size != 1:
    raise ValueError(f"{where}: a per-tensor activation range has one scale, got shapes {scale.shape}, {zp.shape}.")
  if not (np.isfinite(scale).all() and (scale > 0).all()):
    raise ValueError(f"{where}: the activation scale {scale.reshape(-1)[0]} is not positive and finite.")
  if act.symmetric and np.any(zp != 0):
    raise ValueError(f"{where}: a symmetric activation config with a nonzero zero point {zp.reshape(-1)[0]}.")
  return {**args, "strategy": "tensor", "dynamic": False}


# --- torch <-> numpy, bit for bit --------------------------------------------------------------------------------

_VIEWS = {  # dtypes numpy lacks: moved between numpy (ml_dtypes) and torch as raw bits of this width
  "bfloat16": (np.uint16, ml_dtypes.bfloat16),
  "float8_e4m3fn": (np.uint8, ml_dtypes.float8_e4m3fn),
  "float8_e5m2": (np.uint8, ml_dtypes.float8_e5m2),
}


def _to_torch(torch, a):
  a = np.ascontiguousarray(np.asarray(a))
  name = a.dtype.name
  if name in _VIEWS:
    raw, _ = _VIEWS[name]
    torch_raw = {np.uint16: torch.uint16, np.uint8: torch.uint8}[raw]
    return torch.from_numpy(a.view(raw).copy()).view(torch_raw).view(getattr(torch, name))
  return torch.from_numpy(a.copy())


def _to_numpy(torch, t) -> np.ndarray:
  name = str(t.dtype).removeprefix("torch.")
  if name in _VIEWS:
    raw, np_dtype = _VIEWS[name]
    torch_raw = {np.uint16: torch.uint16, np.uint8: torch.uint8}[raw]
    return t.contiguous().view(torch_raw).numpy().view(np_dtype)
  return t.numpy()


# --- save ----------------------------------------------------------------------------------------------------------


def _codes(q: QTensor) -> np.ndarray:
  """The weight's codes in torch's (out, in) order: int8 integers, or float8_e4m3fn values."""
  v = np.asarray(q.int_values())
  return np.ascontiguousarray(v.T)


def _weight_tensors(torch, name: str, layer: Layer, args: dict, fmt: str) -> dict:
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: PLC0415

  q = layer.weight
  out_features = q.shape[1]
  codes = _codes(q)
  scale = np.asarray(q.scale, np.float32)
  zp = np.asarray(q.zero_point, np.float32)
  if args["strategy"] == "tensor":
    scale, zp = scale.reshape(1), zp.reshape(1)
  else:
    # (1, out) per channel, (in / g, out or 1) per group -> torch's (out, 1) / (out, in / g); a group scale shared
    # by all output channels is repeated on each (compressed-tensors keeps one per row and group).
    scale = np.ascontiguousarray(np.broadcast_to(scale.T, (out_features, scale.shape[0])))
    zp = np.ascontiguousarray(np.broadcast_to(zp.T, (out_features, zp.shape[0])))
  t = {f"{name}.weight_scale": torch.from_numpy(scale.copy())}
  packed = fmt == "pack-quantized"
  if packed:
    t[f"{name}.weight_packed"] = pack_to_int32(torch.from_numpy(codes.astype(np.int8)), args["num_bits"])
    t[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
  else:
    t[f"{name}.weight"] = _to_torch(torch, codes)
  if not args["symmetric"]:
    zp8 = torch.from_numpy(zp.astype(np.int8))
    if packed and args["strategy"] in ("group", "channel"):
      zp8 = pack_to_int32(zp8, args["num_bits"], packed_dim=0).contiguous()
    t[f"{name}.weight_zero_point"] = zp8
  return t


def _input_tensors(torch, name: str, layer: Layer, args: dict | None) -> dict:
  if args is None or args["dynamic"]:
    return {}
  qp = layer.input_qparams
  t = {f"{name}.input_scale": torch.from_numpy(np.asarray(qp.scale, np.float32).reshape(1).copy())}
  if not args["symmetric"]:
    t[f"{name}.input_zero_point"] = torch.from_numpy(np.asarray(qp.zero_point, np.float32).reshape(1).astype(np.int8))
  return t


def _config_json(cfg: QatConfig) -> dict:
  """A ``QatConfig`` as JSON values, field by field (enums by value, tuples as lists)."""
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    out[f.name] = v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v
  return out


def _config_from_json(d) -> QatConfig:
  """The ``QatConfig`` of ``_config_json``, validated by ``QatConfig`` itself (no other code runs)."""
  if not isinstance(d, dict):
    raise TypeError(f"expected an object, got {type(d).__name__}")
  return QatConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _meta(layer: Layer) -> dict:
  return {"config": _config_json(layer.weight.config), "dequant_dtype": layer.weight.dequant_dtype.name}


def save(directory: str | os.PathLike, served, *, activation=None, names=None) -> dict:
  """Writes the quantized Dense layers of a converted model as a compressed-tensors checkpoint.

  ``directory`` gets ``model.safetensors`` and ``config.json`` (its
  ``quantization_config``; other keys of an existing ``config.json`` stay).
  Layers with one scheme form one config group whose targets are their names.

  Args:
    directory: where to write (created if missing).
    served: linen serving variables (``jqat.linen.convert``), a converted NNX
      model, or ``{name: QTensor | Layer}`` (see ``layers``).
    activation: for linen variables: the activation config of layers without
      a frozen range (None: weight-only; ``QatConfig(per_channel=True)``:
      int8 per token), or a function of the layer's name.
    names: maps the default names (Flax paths with dots) to the names to
      write: a mapping, or a function that returns a name, a list of names
      (split the layer along its kernel's first output axis) or None (leave
      the layer out).

  Returns:
    The ``quantization_config`` written into ``config.json``, as a dict.

  Raises:
    ValueError: naming the layer, for what compressed-tensors cannot hold
      (fp8 e5m2, narrow-range or per-group activations, an AWQ input divisor,
      a conv or embedding table, an einsum weight whose contracted axes its
      scales do not show), and for inputs ``layers`` rejects.
    ImportError: without torch or compressed-tensors.

  Examples:
    >>> import pytest; _ = pytest.importorskip("compressed_tensors")
    >>> import tempfile, jax, jqat, flax.linen as nn
    >>> w4 = jqat.QatConfig(bits="int4", per_channel=True, group_size=128)
    >>> model = nn.Sequential([jqat.linen.QatDense(8, weight_config=w4, activation_config=None)])
    >>> x = jax.random.normal(jax.random.key(0), (4, 256))
    >>> served = jqat.linen.convert(model, model.init(jax.random.key(1), x), x)
    >>> d = tempfile.mkdtemp()
    >>> config = jqat.compressed_tensors.save(d, served, names={"layers_0": "model.proj"})
    >>> config["format"], config["config_groups"]["group_0"]["weights"]["group_size"]
    ('pack-quantized', 128)
    >>> back = jqat.compressed_tensors.load(d)["model.proj"].weight
    >>> bool((jqat.dequantize(back) == jqat.dequantize(layers(served)["layers_0"].weight)).all())
    True
  """
  torch = _require("jqat.compressed_tensors.save")
  import safetensors.torch  # noqa: PLC0415
  from compressed_tensors.compressors import BaseCompressor  # noqa: PLC0415
  from compressed_tensors.compressors.format import infer_module_format  # noqa: PLC0415
  from compressed_tensors.compressors.model_compressors import ModelCompressor  # noqa: PLC0415
  from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: PLC0415

  found = layers(served, activation=activation, names=names)
  if not found:
    raise ValueError("jqat.compressed_tensors.save: no quantized Dense layer to write (all float, or names= left "
                     "them all out).")
  groups: dict[str, dict] = {}
  plan = {}
  for name, layer in found.items():
    w_args, in_args = _weight_args(name, layer.weight), _input_args(name, layer)
    key = json.dumps([w_args, in_args], sort_keys=True)
    groups.setdefault(key, {"weights": w_args, "input_activations": in_args, "targets": []})["targets"].append(name)
    plan[name] = key
  schemes, formats = {}, {}
  for i, (key, g) in enumerate(groups.items()):
    scheme = QuantizationScheme(
      targets=g["targets"],
      weights=QuantizationArgs(**g["weights"]),
      input_activations=QuantizationArgs(**g["input_activations"]) if g["input_activations"] else None,
    )
    # The storage format compressed-tensors itself picks for a Linear layer with this scheme.
    scheme.format = infer_module_format(torch.nn.Linear, scheme)
    schemes[f"group_{i}"] = scheme
    formats[key] = (scheme, scheme.format.value if hasattr(scheme.format, "value") else str(scheme.format))
  distinct = {f for _, f in formats.values()}
  qconfig = QuantizationConfig(
    config_groups=schemes,
    format=distinct.pop() if len(distinct) == 1 else "mixed-precision",
    quantization_status="compressed",
  )
  tensors: dict = {}
  for name, layer in found.items():
    scheme, fmt = formats[plan[name]]
    wt = _weight_tensors(torch, name, layer, groups[plan[name]]["weights"], fmt)
    # The tensors the package's own compressor expects for this scheme, no more and no fewer.
    want = {f"{name}.{p}" for p in BaseCompressor.get_value_from_registry(fmt).compression_param_names(scheme)}
    if set(wt) != want:
      raise RuntimeError(f"layer '{name}': wrote {sorted(wt)}, but compressed-tensors' {fmt} expects {sorted(want)}")
    tensors.update(wt)
    tensors.update(_input_tensors(torch, name, layer, groups[plan[name]]["input_activations"]))
    if layer.bias is not None:
      bias = np.asarray(layer.bias)
      if bias.shape != (layer.weight.shape[1],):
        raise ValueError(f"layer '{name}': bias of shape {bias.shape} for {layer.weight.shape[1]} output features.")
      tensors[f"{name}.bias"] = _to_torch(torch, bias)
  meta = {"version": _META_VERSION, "layers": {name: _meta(layer) for name, layer in found.items()}}
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, WEIGHTS_NAME)
  # Written next to the target and renamed, so that a failed write never leaves a truncated checkpoint.
  tmp = path + ".tmp"
  safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", _META_KEY: json.dumps(meta)})
  os.replace(tmp, path)
  ModelCompressor(quantization_config=qconfig).update_config(os.fspath(directory))
  with open(os.path.join(directory, CONFIG_NAME)) as f:
    return json.load(f)["quantization_config"]


# --- load ----------------------------------------------------------------------------------------------------------


def _unpack(words: np.ndarray, num_bits: int, cols: int) -> np.ndarray:
  """Codes of ``num_bits`` each, packed densely from bit 0 of each row's int32 words (pack_to_int32's layout).

  Code ``i`` of a row occupies bits ``i * num_bits ..`` of the row's little-endian bit stream, stored with the
  offset ``2^(num_bits - 1)``; returns int8 codes of shape ``(rows, cols)``.
  """
  rows = words.shape[0]
  raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8).reshape(rows, -1)
  bits = np.unpackbits(raw, axis=1, bitorder="little")[:, : cols * num_bits].reshape(rows, cols, num_bits)
  values = (bits.astype(np.int32) << np.arange(num_bits, dtype=np.int32)).sum(-1)
  return (values - (1 << (num_bits - 1))).astype(np.int8)


def _read_config(directory) -> dict:
  path = os.path.join(directory, CONFIG_NAME)
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path}: no config.json; a compressed-tensors checkpoint carries its quantization_config "
                     "there.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e}).") from None
  q = data.get("quantization_config") if isinstance(data, dict) else None
  if not isinstance(q, dict):
    raise ValueError(f"{path}: holds no 'quantization_config' object.")
  if q.get("quant_method", "compressed-tensors") != "compressed-tensors":
    raise ValueError(f"{path}: the quantization_config is '{q.get('quant_method')}', not compressed-tensors.")
  return q


def _weight_files(directory) -> list[str]:
  """``model.safetensors``, or the shards a ``model.safetensors.index.json`` lists (files of ``directory`` only)."""
  path = os.path.join(directory, WEIGHTS_NAME)
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(path) or not os.path.isfile(index):
    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file; a checkpoint directory holds {WEIGHTS_NAME} (or {INDEX_NAME} and its "
                       f"shards) and {CONFIG_NAME}.")
    return [path]
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{index}: not a readable safetensors index ({e!r}).") from None
  for name in files:
    # A shard is a file beside the index: no directories, so an index never reaches outside the checkpoint.
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
      raise ValueError(f"{index}: the shard {name!r} is not a file name in the checkpoint's directory.")
  return [os.path.join(directory, name) for name in files]


def _read_tensors(directory) -> tuple[dict, dict]:
  import safetensors  # noqa: PLC0415

  tensors, meta = {}, {}
  for path in _weight_files(directory):
    try:
      with safetensors.safe_open(path, framework="pt") as f:
        meta.update(f.metadata() or {})
        tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) for a bad file
      raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
  return tensors, meta


def _jqat_meta(meta: dict, path: str) -> dict:
  if _META_KEY not in meta:
    return {}
  try:
    data = json.loads(meta[_META_KEY])
    assert isinstance(data, dict) and data.get("version") == _META_VERSION and isinstance(data.get("layers"), dict)
  except (ValueError, AssertionError):
    raise ValueError(f"{path}: its '{_META_KEY}' metadata is unreadable or of another version.") from None
  return data["layers"]


def _scheme_for(name: str, qconfig) -> Any:
  from compressed_tensors.utils.match import match_name  # noqa: PLC0415

  if any(match_name(name, ign) for ign in qconfig.ignore or ()):
    return None
  for scheme in qconfig.config_groups.values():
    if "Linear" in scheme.targets or any(match_name(name, t) for t in scheme.targets):
      return scheme
  return None


def _bits_from_args(where: str, args) -> QuantBits:
  kind = str(getattr(args.type, "value", args.type))
  if kind == "float" and args.num_bits == 8:
    return QuantBits.FP8_E4M3
  if kind == "int" and 2 <= args.num_bits <= 8:
    return QuantBits(f"int{args.num_bits}")
  raise ValueError(f"{where}: {kind} of {args.num_bits} bits is not a jqat format (int2..int8, fp8_e4m3).")


def _strategy(args) -> str:
  return str(getattr(args.strategy, "value", args.strategy))


def _need(tensors: dict, key: str, where: str):
  if key not in tensors:
    raise ValueError(f"{where}: the file has no tensor '{key}'.")
  return tensors[key]


def _load_weight(torch, name: str, tensors: dict, args, meta: dict | None) -> QTensor:
  where = f"layer '{name}'"
  bits = _bits_from_args(where, args)
  strategy = _strategy(args)
  if strategy not in ("tensor", "channel", "group"):
    raise ValueError(f"{where}: weight strategy '{strategy}' is not a jqat layout (tensor, channel, group).")
  scale_t = _need(tensors, f"{name}.weight_scale", where)
  scale_dtype = str(scale_t.dtype).removeprefix("torch.")
  scale = scale_t.float().numpy()
  if f"{name}.weight_packed" in tensors:
    shape = [int(d) for d in _need(tensors, f"{name}.weight_shape", where).reshape(-1).tolist()]
    words = _to_numpy(torch, tensors[f"{name}.weight_packed"])
    if len(shape) != 2 or words.dtype != np.int32 or words.ndim != 2 or words.shape[0] != shape[0] or (
      words.shape[1] != -(-shape[1] * args.num_bits // 32)
    ):
      raise ValueError(f"{where}: weight_packed of shape {words.shape} does not hold a weight of shape {shape} in "
                       f"{args.num_bits}-bit codes.")
    codes = _unpack(words, args.num_bits, shape[1])
  else:
    codes = _to_numpy(torch, _need(tensors, f"{name}.weight", where))
    if codes.ndim != 2:
      raise ValueError(f"{where}: weight of shape {codes.shape}; expected (out, in).")
  out_f, in_f = codes.shape
  if bits.is_float:
    if codes.dtype != ml_dtypes.float8_e4m3fn:
      raise ValueError(f"{where}: fp8 weights stored as {codes.dtype}, expected float8_e4m3fn.")
  else:
    if codes.dtype != np.int8:
      raise ValueError(f"{where}: integer weights stored as {codes.dtype}, expected int8 or int32 words.")
    lo, hi = -(1 << (bits.num_bits - 1)), (1 << (bits.num_bits - 1)) - 1
    if codes.min(initial=0) < lo or codes.max(initial=0) > hi:
      raise ValueError(f"{where}: weight codes outside [{lo}, {hi}] for {bits.value}.")
  group = args.group_size if strategy == "group" else None
  if group is not None and in_f % group:
    raise ValueError(f"{where}: {in_f} input features do not split into groups of {group}.")
  want = {"tensor": [(1,), ()], "channel": [(out_f, 1)], "group": [(out_f, in_f // (group or 1))]}[strategy]
  if scale.shape not in want:
    raise ValueError(f"{where}: weight_scale of shape {scale.shape}; a {strategy} scale of a weight "
                     f"({out_f}, {in_f}) has shape {want[0]}.")
  if args.symmetric:
    zp = np.zeros_like(scale)
  else:
    zp_t = _need(tensors, f"{name}.weight_zero_point", where)
    if f"{name}.weight_packed" in tensors and strategy in ("group", "channel"):
      zw = _to_numpy(torch, zp_t)
      zp = _unpack(np.ascontiguousarray(zw.T), args.num_bits, scale.shape[0]).T.astype(np.float32)
    else:
      zp = zp_t.float().numpy()
    if zp.shape != scale.shape:
      raise ValueError(f"{where}: weight_zero_point of shape {zp.shape} for a scale of shape {scale.shape}.")
  cfg = QatConfig(bits=bits, per_channel=strategy != "tensor", symmetric=bool(args.symmetric), group_size=group)
  dequant = scale_dtype if scale_dtype in ("float32", "bfloat16", "float16", "float64") else "float32"
  if meta is not None:
    # What compressed-tensors does not record (narrow range, one group scale for all outputs, the dequantized
    # dtype, ...) comes from the file's jqat metadata, which must agree with the quantization_config.
    try:
      held = _config_from_json(meta["config"])
      dequant = str(jnp.dtype(meta["dequant_dtype"]))
      ok = (held.bits is bits and held.symmetric == cfg.symmetric and held.group_size == group
            and (held.per_channel or strategy != "channel"))
    except (KeyError, TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"{where}: the file's jqat metadata {meta} disagrees with its quantization_config ({args}).")
    cfg = held
  per_channel = cfg.per_channel
  # torch's (out, ...) rows back to Flax's (in, out): a transpose; a group scale shared by all rows is one row.
  if strategy == "tensor":
    scale, zp = scale.reshape(()), zp.reshape(())
  else:
    if not per_channel:
      if not (np.array_equal(scale, np.broadcast_to(scale[:1], scale.shape))
              and np.array_equal(zp, np.broadcast_to(zp[:1], zp.shape))):
        raise ValueError(f"{where}: the metadata says one scale per group for all outputs, but the rows differ.")
      scale, zp = scale[:1], zp[:1]
    scale, zp = np.ascontiguousarray(scale.T), np.ascontiguousarray(zp.T)
  kernel = np.ascontiguousarray(codes.T)
  if not bits.is_float and kernel.min(initial=0) < cfg.qmin:
    raise ValueError(f"{where}: a weight code is {kernel.min()}, below {cfg.qmin} of {cfg.bits.value} (narrow range).")
  values = pack_int4(kernel) if bits.is_packed else jnp.asarray(kernel)
  try:
    return QTensor(values, jnp.asarray(scale, jnp.float32), jnp.asarray(zp, jnp.float32), cfg, (in_f, out_f),
                   jnp.dtype(dequant))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def _load_activation(name: str, tensors: dict, args) -> tuple[QatConfig | None, QParams | None]:
  if args is None:
    return None, None
  where = f"layer '{name}'"
  bits = _bits_from_args(where, args)
  strategy = _strategy(args)
  dynamic = args.dynamic is True
  if strategy == "token" and dynamic:
    return QatConfig(bits=bits, per_channel=True, symmetric=bool(args.symmetric)), None
  if strategy == "tensor" and not dynamic:
    scale = _need(tensors, f"{name}.input_scale", where).float().numpy()
    zp = np.zeros_like(scale) if args.symmetric else _need(tensors, f"{name}.input_zero_point", where).float().numpy()
    if scale.size != 1 or zp.size != 1:
      raise ValueError(f"{where}: input_scale of shape {scale.shape}; a per-tensor range has one value.")
    return QatConfig(bits=bits, symmetric=bool(args.symmetric)), QParams(
      jnp.asarray(scale.reshape(()), jnp.float32), jnp.asarray(zp.reshape(()), jnp.float32))
  raise ValueError(f"{where}: activations '{strategy}' (dynamic={args.dynamic}) are not a jqat layout (static "
                   "per tensor, or dynamic per token).")


def load(directory: str | os.PathLike) -> dict[str, Layer]:
  """Reads a compressed-tensors checkpoint's quantized Linear layers back as ``Layer``s of ``QTensor``s.

  Reads ``model.safetensors`` (or the shards ``model.safetensors.index.json``
  lists) and ``config.json`` in ``directory``: files
  ``save`` wrote (the same QTensors back, bit for bit), or others in the
  int-quantized, pack-quantized or float-quantized formats with tensor,
  channel or group weight scales (e.g. W8A8 and W4A16 checkpoints). Each layer
  is a ``Layer`` whose weight is in Flax's ``(in, out)`` layout. Nothing in
  the files is executed: tensors come through ``safetensors``, configs
  through ``json`` (checked with compressed-tensors' ``QuantizationConfig``).

  Returns:
    ``{name: Layer}`` of every layer with a ``weight_scale``.

  Raises:
    ValueError: for a missing, truncated or corrupt file, a config that is
      not compressed-tensors', or a layer whose tensors do not fit it (naming
      the layer and the tensor).
    ImportError: without torch or compressed-tensors.
  """
  torch = _require("jqat.compressed_tensors.load")
  import pydantic  # noqa: PLC0415 (compressed-tensors' configs are pydantic models)
  from compressed_tensors.quantization import QuantizationConfig  # noqa: PLC0415

  raw = _read_config(directory)
  try:
    qconfig = QuantizationConfig.model_validate(raw)
  except (pydantic.ValidationError, ValueError, KeyError, NotImplementedError) as e:
    raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: not a compressed-tensors quantization_config: "
                     f"{e}") from None
  tensors, file_meta = _read_tensors(directory)
  meta = _jqat_meta(file_meta, os.path.join(directory, WEIGHTS_NAME))
  out = {}
  for key in tensors:
    if not key.endswith(".weight_scale"):
      continue
    name = key.removesuffix(".weight_scale")
    scheme = _scheme_for(name, qconfig)
    if scheme is None or scheme.weights is None:
      continue
    weight = _load_weight(torch, name, tensors, scheme.weights, meta.get(name))
    act, qp = _load_activation(name, tensors, scheme.input_activations)
    bias = tensors.get(f"{name}.bias")
    out[name] = Layer(weight, act, qp, None if bias is None else jnp.asarray(_to_numpy(torch, bias)))
  return out

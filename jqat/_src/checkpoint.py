"""Orbax checkpoints of QAT and serving variables that restore every bit, or fail saying what differs.

Orbax (``orbax-checkpoint``) saves jqat's variables as they are: int8, packed
int4 (``uint8``), fp8 values, scales, sums and layouts, and a QAT training
state (``params``, ``quant_stats``, an optax state). Three things are added
here, because Orbax does not do them:

- a checksum of each array's bits, recorded in the checkpoint's custom
  metadata and checked on restore: Orbax restores a flipped byte in its data
  files without a word, and casts an array to whatever dtype the restore
  target asks for;
- shapes and dtypes checked against the restore target before reading,
  naming the variable and both shapes (Orbax's own error names no variable);
- ``ConvertedParam`` boxes (the zero-byte place of a float kernel that
  ``jqat.linen.convert`` replaced in a stock Flax layer) and every other
  zero-size array (e.g. the ``serving/.../replaced`` markers that
  ``quantize_model``'s conversion leaves) saved as a small record of their
  shape and dtype: Orbax cannot save zero-size arrays.

The checksums guard against corruption, not against forgery. Nothing here
unpickles or runs code from a checkpoint: Orbax reads JSON metadata and
TensorStore arrays.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqat._src.formats import QuantBits

_KEY = "jqat_checkpoint"
_VERSION = 1
# A ConvertedParam is saved as this record: its shape (``[ndim, *shape]``, never empty) and one element of its dtype.
_SHAPE, _DTYPE = "converted_param_shape", "converted_param_dtype"
# Any other zero-size array: the same record under other keys, restored as a zero-size array.
_ZSHAPE, _ZDTYPE = "zero_size_shape", "zero_size_dtype"
_BITS = tuple(QuantBits)


def _name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path(path) -> str:
  return "/" + "/".join(_name(k) for k in path)


def _converted_param_type():
  # Only jqat.linen makes ConvertedParam boxes; when it is not imported there are none to find.
  linen = sys.modules.get("jqat._src.flax.linen")
  return getattr(linen, "ConvertedParam", None)


def _is_box(x) -> bool:
  box = _converted_param_type()
  return box is not None and isinstance(x, box)


def _is_record(x) -> bool:
  return isinstance(x, Mapping) and set(x) in ({_SHAPE, _DTYPE}, {_ZSHAPE, _ZDTYPE})


def _is_zero_size(x) -> bool:
  return (_is_array(x) or isinstance(x, jax.ShapeDtypeStruct)) and 0 in tuple(x.shape)


def _shape_record(keys, shape, dtype, abstract: bool):
  shape_key, dtype_key = keys
  if abstract:
    return {shape_key: jax.ShapeDtypeStruct((len(shape) + 1,), jnp.int32), dtype_key: jax.ShapeDtypeStruct((1,), dtype)}
  return {shape_key: np.array([len(shape), *shape], np.int32), dtype_key: np.zeros((1,), dtype)}


def _encode_leaf(x):
  if _is_box(x):
    marker = x.marker
    return _shape_record((_SHAPE, _DTYPE), tuple(marker.shape[:-1]), marker.dtype,
                         isinstance(marker, jax.ShapeDtypeStruct))
  if _is_zero_size(x):
    return _shape_record((_ZSHAPE, _ZDTYPE), tuple(x.shape), x.dtype, isinstance(x, jax.ShapeDtypeStruct))
  return x


def _decode_record(record):
  if _ZSHAPE in record:
    code = [int(c) for c in np.asarray(record[_ZSHAPE])]
    return jnp.zeros(tuple(code[1 : 1 + code[0]]), jnp.result_type(record[_ZDTYPE]))
  code = [int(c) for c in np.asarray(record[_SHAPE])]
  box = _converted_param_type()
  if box is None:
    from jqat._src.flax.linen import ConvertedParam as box  # noqa: PLC0415 (Flax only for Flax variables)
  return box(jnp.zeros((*code[1 : 1 + code[0]], 0), jnp.result_type(record[_DTYPE])))


def _encode(tree):
  return jax.tree.map(_encode_leaf, tree, is_leaf=_is_box)


def _decode(tree):
  return jax.tree.map(lambda x: _decode_record(x) if _is_record(x) else x, tree, is_leaf=_is_record)


_MUL, _ADD = 0x9E3779B1, 0x7F4A7C15
_SUB_BYTE = ("int4", "uint4", "int2", "uint2", "int1", "uint1")


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32, one per element (two for 64-bit dtypes, on a last axis)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  if x.dtype == jnp.bool_ or x.dtype.name in _SUB_BYTE:
    return x.astype(jnp.int32).astype(jnp.uint32)  # sub-byte and bool values convert exactly
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _np_words(x: np.ndarray) -> np.ndarray:
  """``_words`` in NumPy, for the arrays on this host."""
  if np.issubdtype(x.dtype, np.complexfloating):
    x = np.stack([x.real, x.imag], axis=-1)
  if x.dtype == np.bool_ or x.dtype.name in _SUB_BYTE:
    return x.astype(np.int32).astype(np.uint32)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
  words = np.ascontiguousarray(x).view(unsigned).astype(np.uint32)
  return words.reshape(*x.shape, 2) if x.dtype.itemsize == 8 else words


def _sums(words, index, np_or_jnp):
  # Two position-weighted sums of the bit patterns, mod 2**32. Every weight is odd, so any change of one
  # element's bits changes both sums; other corruptions collide with probability about 2**-64.
  u32 = np_or_jnp.uint32
  one = (index << u32(1)) | u32(1)
  two = (index * u32(_MUL) + u32(_ADD)) | u32(1)
  rotated = (words << u32(7)) | (words >> u32(25))
  return np_or_jnp.sum(words * one, dtype=u32), np_or_jnp.sum(rotated * two, dtype=u32)


@jax.jit
def _checksum_words(x):
  # Elementwise work and one reduction: on a sharded array each device sums its shard, nothing is gathered.
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.stack(_sums(w, index, jnp))


def _np_checksum(pieces, shape) -> list[int]:
  # ``pieces``: (data, offsets) of disjoint blocks of an array of ``shape``; the sums add up block by block.
  total = [0, 0]
  with np.errstate(over="ignore"):
    for data, offsets in pieces:
      words = _np_words(np.asarray(data))
      wshape = tuple(shape) + words.shape[len(shape) :]
      index = np.zeros(words.shape, np.uint64)
      stride = 1
      for axis in reversed(range(words.ndim)):
        start = offsets[axis] if axis < len(offsets) else 0
        local = np.arange(words.shape[axis], dtype=np.uint64) + np.uint64(start)
        index += local.reshape((-1,) + (1,) * (words.ndim - axis - 1)) * np.uint64(stride % 2**32)
        stride *= wshape[axis]
      sums = _sums(words, (index % np.uint64(2**32)).astype(np.uint32), np)
      total = [(t + int(c)) % 2**32 for t, c in zip(total, sums, strict=True)]
  return total


def _checksum(x) -> list[int]:
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if not isinstance(x, jax.Array):
    return _np_checksum([(np.asarray(x), ())], np.shape(x))
  if not x.is_fully_addressable:
    # Across hosts: XLA sums each shard where it lives and adds the sums up.
    return [int(c) for c in np.asarray(jax.device_get(_checksum_words(x)))]
  # One copy of each distinct block, read from its device: no array is gathered.
  pieces = [
    (shard.data, tuple(sl.start or 0 for sl in shard.index)) for shard in x.addressable_shards if shard.replica_id == 0
  ]
  return _np_checksum(pieces, x.shape)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _describe(dtype, shape) -> str:
  return f"{jnp.dtype(dtype).name} {tuple(int(d) for d in shape)}"


def checkpoint_state(tree: Any) -> tuple[Any, dict]:
  """The tree to hand Orbax, and the custom metadata that lets ``restored_state`` check what comes back.

  Every array's dtype, shape and a checksum of its bits go into the
  metadata; ``ConvertedParam`` boxes become a small record. Abstract leaves
  (``jax.ShapeDtypeStruct``, e.g. a restore target) are encoded the same way
  and get no checksum. Use this pair with ``ocp.CheckpointManager``;
  ``save_checkpoint`` / ``restore_checkpoint`` do the same around
  ``ocp.StandardCheckpointer``.

  Args:
    tree: a PyTree of arrays: QAT variables, serving variables, a training
      state with an optax state, ...

  Returns:
    ``(state, metadata)``: pass ``state`` to ``ocp.args.StandardSave`` and
    ``metadata`` as ``custom_metadata`` (a JSON-able dict).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> state, meta = jqat.checkpoint_state({"values": jnp.array([1, -2], jnp.int8)})
    >>> entry = meta["jqat_checkpoint"]["arrays"]["/values"]
    >>> entry["dtype"], entry["shape"], len(entry["checksum"])
    ('int8', [2], 2)
  """
  state = _encode(tree)
  arrays = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.ShapeDtypeStruct):
      continue
    if not _is_array(leaf):
      leaf = np.asarray(leaf)
    arrays[_path(path)] = {"dtype": jnp.dtype(leaf.dtype).name, "shape": list(leaf.shape), "checksum": _checksum(leaf)}
  return state, {_KEY: {"version": _VERSION, "arrays": arrays}}


def _valid_entry(entry) -> bool:
  try:
    jnp.dtype(entry["dtype"])
    return len(entry["checksum"]) == 2 and all(isinstance(d, int) for d in entry["shape"])
  except (TypeError, KeyError):
    return False


def _record(metadata, where: str) -> dict:
  record = metadata.get(_KEY) if isinstance(metadata, Mapping) else None
  if not isinstance(record, Mapping) or not isinstance(record.get("arrays"), Mapping):
    raise ValueError(
      f"{where}: the checkpoint has no jqat record (custom metadata '{_KEY}'), so its bits cannot be checked: it was "
      "written by Orbax directly. Save it with jqat.save_checkpoint (or jqat.checkpoint_state), or restore it "
      "with Orbax alone."
    )
  for path, entry in record["arrays"].items():
    if not _valid_entry(entry):
      raise ValueError(f"{where}: the checkpoint's jqat record is damaged at {path!r}: {entry!r}.")
  return record


def _check_target(arrays: Mapping, target, where: str) -> None:
  # Before reading: the same variables, shapes and dtypes as the target, named by path.
  flat = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(flat) - set(arrays))
  extra = sorted(set(arrays) - set(flat))
  if missing or extra:
    raise ValueError(
      f"{where}: the checkpoint does not hold the target's variables: missing {missing[:5]}"
      f"{' ...' if len(missing) > 5 else ''}, not in the target {extra[:5]}{' ...' if len(extra) > 5 else ''}. "
      "Was it saved from another model or another kind of state?"
    )
  for path, leaf in flat.items():
    held = arrays[path]
    if not hasattr(leaf, "shape"):
      leaf = np.asarray(leaf)
    if tuple(held["shape"]) != tuple(leaf.shape) or jnp.dtype(held["dtype"]) != jnp.dtype(leaf.dtype):
      hint = " (converted with other quantization configs?)" if path.startswith("/serving/") else ""
      raise ValueError(
        f"{where}: {path}: the checkpoint holds {_describe(held['dtype'], held['shape'])}, the target expects "
        f"{_describe(leaf.dtype, leaf.shape)}{hint}."
      )


def _describe_layout(code) -> str:
  code = [int(c) for c in np.asarray(code).reshape(-1)]
  if len(code) == 3 and 0 <= code[0] < len(_BITS):  # an activation range: [bits, symmetric, narrow_range]
    return f"a {_BITS[code[0]].value} {'symmetric' if code[1] else 'asymmetric'} activation range"
  from jqat._src.flax.common import describe_layout  # noqa: PLC0415 (layouts come from Flax variables)

  return describe_layout(code)


def restored_state(restored: Any, metadata: Mapping, target: Any = None, *, where: str = "jqat.restored_state") -> Any:
  """Checks what Orbax restored against the checkpoint's record, and rebuilds ``ConvertedParam`` boxes.

  Args:
    restored: what ``ocp.CheckpointManager.restore`` (or a checkpointer)
      returned for a state saved from ``checkpoint_state``.
    metadata: the checkpoint's custom metadata
      (``manager.metadata(step).custom_metadata``).
    target: optional, the restore target; where it holds concrete
      ``layout`` arrays (serving variables converted from the model), the
      restored layouts must equal them.

  Returns:
    ``restored`` with each ``ConvertedParam`` record turned back into a box.

  Raises:
    ValueError: naming the variable, when its dtype, shape or bits differ from
      what was saved (a corrupt file, or a restore target of another dtype,
      which Orbax casts to), or its layout from the target's (variables of a
      model converted with other quantization configs).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> state, meta = jqat.checkpoint_state({"values": jnp.array([1, -2], jnp.int8)})
    >>> jqat.restored_state({"values": jnp.array([1, -2], jnp.int8)}, meta)["values"]
    Array([ 1, -2], dtype=int8)
    >>> jqat.restored_state({"values": jnp.array([1, -3], jnp.int8)}, meta)
    Traceback (most recent call last):
    ...
    ValueError: jqat.restored_state: /values: its bits differ from those saved (checksum ...): ... corrupt.
  """
  arrays = _record(metadata, where)["arrays"]
  for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    path = _path(p)
    held = arrays.get(path)
    if held is None:
      raise ValueError(f"{where}: {path} was restored but the checkpoint's record has no such variable.")
    if not _is_array(leaf):
      leaf = np.asarray(leaf)
    if tuple(held["shape"]) != tuple(leaf.shape) or jnp.dtype(held["dtype"]) != jnp.dtype(leaf.dtype):
      raise ValueError(
        f"{where}: {path}: the checkpoint holds {_describe(held['dtype'], held['shape'])}, but it was restored as "
        f"{_describe(leaf.dtype, leaf.shape)}; restore it with a target of the saved dtype and shape."
      )
    got = _checksum(leaf)
    if got != list(held["checksum"]):
      raise ValueError(
        f"{where}: {path}: its bits differ from those saved (checksum {got} != {list(held['checksum'])}): "
        "the checkpoint is corrupt."
      )
  if target is not None:
    flat_target = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(_encode(target))[0]}
    for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
      path = _path(p)
      want = flat_target.get(path)
      if path.endswith("/layout") and _is_array(want) and not np.array_equal(np.asarray(leaf), np.asarray(want)):
        raise ValueError(
          f"{where}: {path[: -len('/layout')]}: the checkpoint holds {_describe_layout(leaf)}, but the model "
          f"expects {_describe_layout(want)}: it was converted with other quantization configs."
        )
  out = _decode(restored)
  if target is not None:
    _check_placeholders(out, target, where)
  return out


def _placeholder_shape(x) -> tuple:
  return tuple(x.marker.shape if _is_box(x) else x.shape)


def _check_placeholders(out, target, where: str) -> None:
  # A zero-size placeholder is saved as a record of its shape: the record's own shape does not show the one it holds.
  flat_out = jax.tree_util.tree_flatten_with_path(out, is_leaf=_is_box)[0]
  flat_target = dict(jax.tree_util.tree_flatten_with_path(target, is_leaf=_is_box)[0])
  for p, leaf in flat_out:
    want = flat_target.get(p)
    if want is None or not (_is_box(leaf) or _is_zero_size(leaf)):
      continue
    if not (_is_box(want) or hasattr(want, "shape")) or _placeholder_shape(leaf) != _placeholder_shape(want):
      shape = _placeholder_shape(want) if _is_box(want) or hasattr(want, "shape") else type(want).__name__
      raise ValueError(
        f"{where}: {_path(p)}: the checkpoint holds a placeholder of shape {_placeholder_shape(leaf)} (a parameter "
        f"a quantized op replaced), the target expects {shape}: it is a checkpoint of another model."
      )


def save_checkpoint(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
  """Saves ``tree`` with ``orbax.checkpoint.StandardCheckpointer``, with the record ``restore_checkpoint`` checks.

  Args:
    path: the checkpoint directory (must not exist unless ``force``).
    tree: QAT or serving variables, or any training state of arrays.
    force: overwrite an existing checkpoint.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, jqat
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> jqat.save_checkpoint(path, {"values": jnp.array([1, -2], jnp.int8), "scale": jnp.array(0.5)})
    >>> jqat.restore_checkpoint(path)["values"]
    Array([ 1, -2], dtype=int8)
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415 (an optional dependency: the checkpoint extra)

  state, metadata = checkpoint_state(tree)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.fspath(path), state, force=force, custom_metadata=metadata)
    checkpointer.wait_until_finished()


def restore_checkpoint(path: str | os.PathLike, target: Any = None) -> Any:
  """Restores a checkpoint of ``save_checkpoint``: every bit as saved, shaped and placed as ``target``.

  The target (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
  ``jax.eval_shape``) gives the tree structure, and with ``sharding`` on its
  leaves, where each array goes: a restore onto a mesh (specs from
  ``jqat.serving_partition_specs``) reads each device's shard, never a whole
  kernel. Without a target the tree comes back as saved, as nested dicts
  and lists of arrays on the default device.

  Args:
    path: the checkpoint directory.
    target: optional, a tree of the restored state's structure, shapes, dtypes
      (and shardings).

  Returns:
    The restored tree.

  Raises:
    ValueError: naming the variable and both dtypes and shapes, when the
      target does not match the checkpoint (another model, other quantization
      configs); when the restored bits differ from those saved (a corrupt
      file); when a concrete target's ``layout`` differs (a model converted
      with other quantization configs); or when the checkpoint has no jqat
      record. Orbax's own error when a file is missing or truncated.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, jqat
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> jqat.save_checkpoint(path, {"dense": {"values": jnp.zeros((4, 3), jnp.int8)}})
    >>> target = {"dense": {"values": jax.ShapeDtypeStruct((4, 3), jnp.int8)}}
    >>> jqat.restore_checkpoint(path, target)["dense"]["values"].shape
    (4, 3)
    >>> jqat.restore_checkpoint(path, {"dense": {"values": jax.ShapeDtypeStruct((4, 6), jnp.int8)}})
    Traceback (most recent call last):
    ...
    ValueError: jqat.restore_checkpoint: /dense/values: the checkpoint holds int8 (4, 3), the target expects int8 ...
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  where = "jqat.restore_checkpoint"
  path = os.fspath(path)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).custom_metadata
    arrays = _record(metadata, where)["arrays"]
    abstract = None
    if target is not None:
      encoded = _encode(target)
      _check_target(arrays, encoded, where)
      abstract = jax.tree.map(_abstract, encoded)
    restored = checkpointer.restore(path, abstract)
  return restored_state(restored, metadata, target, where=where)


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)

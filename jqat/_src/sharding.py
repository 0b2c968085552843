"""Shardings of quantized weights, derived from the shardings of the float kernels.

jqat scales out on JAX's own SPMD machinery: ``jax.jit`` over arrays placed
with ``NamedSharding`` on a ``Mesh``, and ``shard_map`` with collectives. No
layer needs to know about the mesh:

* QAT under ``jax.jit``: kernels sharded over a ``model`` axis and batches over
  a ``data`` axis train as they do on one device. Per-channel kernel scales are
  reductions over the kernel's contracting axis, so they come out sharded like
  the kernel's output axis; the activation ranges are ``min`` / ``max`` over the
  whole (global) batch, so XLA reduces them across the data axis and every
  replica holds the same ``quant_stats`` and freezes the same ranges.
* Inside ``shard_map`` each device sees only its shard: merge per-device
  calibration statistics with ``all_reduce_stats`` (``psum`` / ``pmin`` /
  ``pmax``), which is exact, so the merged state and its QParams are
  bit-identical to one device observing the whole batch.
* Serving: a ``QTensor``'s ``values`` take the float kernel's
  ``PartitionSpec``; its ``scale`` and ``zero_point`` (and the column sums of
  serving variables) take it on the axes where they keep one entry per
  channel or group, and are replicated on reduced axes. Sub-byte values are
  packed two rows per byte along axis 0 (``PACK_AXIS``), so a shard along that
  axis must hold an even number of rows: shards then split on whole bytes.

Layers run under the default ``Auto`` mesh axes (sharding propagated by XLA),
e.g. ``jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.qtensor import PACK_AXIS, QTensor

SERVE = "serving"
PARAMS = "params"


def _axis_sizes(mesh) -> dict[str, int] | None:
  """Mesh axis sizes by name: from a ``Mesh``, an ``AbstractMesh``, a mapping, or the current mesh."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape) if mesh.shape else None
  if isinstance(mesh, Mapping):
    return {str(k): int(v) for k, v in mesh.items()}
  return dict(mesh.shape)


def _num_shards(entry, sizes: dict[str, int] | None, where: str) -> int | None:
  """How many pieces one ``PartitionSpec`` entry cuts an axis into; None when no mesh says."""
  if entry is None:
    return 1
  if sizes is None:
    return None
  names = entry if isinstance(entry, tuple) else (entry,)
  missing = [n for n in names if n not in sizes]
  if missing:
    raise ValueError(f"{where}: mesh axis {missing[0]!r} is not in the mesh axes {sorted(sizes)}")
  return math.prod(sizes[n] for n in names)


def _padded(spec: PartitionSpec | Sequence | None, ndim: int, where: str) -> tuple:
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(f"{where}: the PartitionSpec {PartitionSpec(*entries)} has more entries than the {ndim} axes")
  return entries + (None,) * (ndim - len(entries))


def _param_spec(kernel_entries: tuple, param_shape, sizes, where: str) -> PartitionSpec:
  """The spec of a per-channel or per-group parameter of a kernel sharded as ``kernel_entries``.

  An axis of size 1 (reduced) is replicated; an axis that keeps one entry per
  channel or per group takes the kernel's entry when its length divides into
  the shards (group boundaries then fall on shard boundaries), and is
  replicated otherwise.
  """
  param_shape = tuple(param_shape)
  if not param_shape:
    return PartitionSpec()
  if len(param_shape) != len(kernel_entries):
    raise ValueError(
      f"{where}: a parameter of shape {param_shape} does not match a kernel with {len(kernel_entries)} axes"
    )
  out = []
  for entry, n in zip(kernel_entries, param_shape):
    shards = _num_shards(entry, sizes, where)
    out.append(entry if n != 1 and entry is not None and (shards is None or n % shards == 0) else None)
  return PartitionSpec(*out)


def _check_packed(entries: tuple, length: int, rows_per_unit: int, what: str, sizes, where: str) -> None:
  """Raises unless the shards of axis 0 hold whole bytes: ``length`` units of ``rows_per_unit`` rows each."""
  entry = entries[PACK_AXIS]
  if entry is None:
    return
  shards = _num_shards(entry, sizes, where)
  if shards is None:
    raise ValueError(
      f"{where}: packed sub-byte values are sharded along axis {PACK_AXIS} ({entry!r}); pass mesh= (or run "
      "under jax.sharding.use_mesh) so that shards can be checked to split on whole bytes"
    )
  if length % (shards * (2 // rows_per_unit)):
    raise ValueError(
      f"{where}: packed sub-byte values hold two rows of axis {PACK_AXIS} per byte; {length} {what} split over "
      f"{shards} shards ({entry!r}) does not give each shard an even number of rows, so shards would split "
      f"bytes. Use a row count that is a multiple of {2 * shards}, or shard another axis."
    )


def qtensor_partition_spec(
  kernel_spec: PartitionSpec | Sequence | None,
  config: QatConfig,
  shape: Sequence[int],
  *,
  mesh: Any = None,
) -> QTensor:
  """The ``PartitionSpec`` of each array of a ``QTensor`` quantized from a kernel sharded as ``kernel_spec``.

  * ``values``: the kernel's spec, axis for axis. Sub-byte formats pack two
    rows of axis 0 per byte, so when axis 0 is sharded over ``n`` devices the
    kernel needs a multiple of ``2 n`` rows (each shard an even number).
  * ``scale``, ``zero_point``: the kernel's spec on the axes that keep one
    parameter per channel (or per group, when the groups divide into the
    shards), ``None`` on reduced axes. A per-channel scale then lives on the
    device that holds its channel.

  Args:
    kernel_spec: the float kernel's ``PartitionSpec`` in mesh axis names
      (``nn.get_partition_spec`` then ``nn.logical_to_mesh`` for Flax logical
      axes). Missing trailing entries are ``None``.
    config: the kernel's ``QatConfig`` (with the channel and group axes the
      layer uses).
    shape: the kernel's logical shape.
    mesh: a ``Mesh``, an ``AbstractMesh`` or a mapping from axis name to size;
      by default the current mesh (``jax.sharding.use_mesh``). Needed to check
      divisibility; without one, packed values sharded along axis 0 raise.

  Returns:
    A ``QTensor`` whose ``values``, ``scale`` and ``zero_point`` are
    ``PartitionSpec``s padded to ``len(shape)`` entries; map it to shardings
    with ``jax.tree.map(lambda s: NamedSharding(mesh, s), spec)``.

  Raises:
    ValueError: when the spec has more entries than ``shape`` has axes, names
      an axis the mesh lacks, or splits packed bytes.

  Examples:
    >>> import jqat
    >>> from jax.sharding import PartitionSpec as P
    >>> cfg = jqat.QatConfig(bits="int4", per_channel=True)
    >>> s = jqat.qtensor_partition_spec(P(None, "model"), cfg, (64, 32), mesh={"model": 2})
    >>> s.values, s.scale
    (P(None, 'model'), P(None, 'model'))
    >>> s = jqat.qtensor_partition_spec(P("model", None), cfg, (64, 32), mesh={"model": 2})
    >>> s.values, s.scale
    (P('model', None), P(None, None))
    >>> jqat.qtensor_partition_spec(P("model"), cfg, (6, 32), mesh={"model": 2})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: qtensor_partition_spec: packed sub-byte values hold two rows of axis 0 per byte; ...
  """
  where = "qtensor_partition_spec"
  shape = tuple(int(d) for d in shape)
  entries = _padded(kernel_spec, len(shape), where)
  sizes = _axis_sizes(mesh)
  if config.bits.is_packed and shape:
    _check_packed(entries, shape[PACK_AXIS], 1, "rows", sizes, where)
  pspec = _param_spec(entries, qparams_lib.params_shape(shape, config), sizes, where)
  return QTensor(PartitionSpec(*entries), pspec, pspec, config, shape)


def _names(path) -> tuple:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def serving_partition_specs(
  variables: Mapping,
  specs: Mapping,
  *,
  mesh: Any = None,
  rules: Sequence[tuple[str, Any]] | None = None,
):
  """``PartitionSpec``s for serving variables (from ``jqat.linen.convert``), from the QAT variables' specs.

  Every quantized kernel in the ``serving`` collection,
  ``serving/<layer>/<quant>/rhs/{values, scale, zero_point, sums}``, follows
  the float kernel it was made from, ``params/<layer>/kernel``: ``values``
  take the kernel's spec (checked to split packed sub-byte values on whole
  bytes); ``scale``, ``zero_point`` and ``sums`` take it on their per-channel
  (or per-group) axes and are replicated on reduced ones, so the column sums
  follow the output axis. Activation ranges (``serving/.../lhs``) are
  replicated scalars. Every other variable keeps the spec it has in
  ``specs`` (``P()``, replicated, when it has none).

  Args:
    variables: serving variables, arrays or ``jax.ShapeDtypeStruct``s (e.g.
      ``jax.eval_shape(jqat.linen.convert, ...)``).
    specs: ``PartitionSpec``s of the QAT variables, collections at the top
      (``nn.get_partition_spec(qat_variables)``); only ``params`` is required.
    mesh: a ``Mesh``, ``AbstractMesh`` or mapping of axis sizes, as for
      ``qtensor_partition_spec``; by default the current mesh.
    rules: Flax logical axis rules; when given, ``specs`` hold logical axis
      names (``nn.with_logical_partitioning``) and are mapped to mesh axes
      with ``nn.logical_to_mesh``.

  Returns:
    A tree shaped as ``variables`` with a ``PartitionSpec`` per array.

  Raises:
    ValueError: when a quantized kernel has no float kernel in
      ``specs["params"]``, or a spec splits packed bytes.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jqat
    >>> init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    >>> layer = jqat.linen.QatDense(8, kernel_init=init)
    >>> x = jnp.ones((2, 4))
    >>> qat = layer.init(jax.random.key(0), x)
    >>> specs = nn.get_partition_spec(qat)
    >>> served = jax.eval_shape(lambda v: jqat.linen.convert(layer, v, x), nn.meta.unbox(qat))
    >>> out = jqat.serving_partition_specs(served, specs, mesh={"model": 2}, rules=[("mlp", "model")])
    >>> rhs = out["serving"]["quant"]["rhs"]
    >>> rhs["values"], rhs["scale"], rhs["sums"]
    (P(None, 'model'), P(None, 'model'), P(None, 'model'))
  """
  if rules is not None:
    import flax.linen as nn  # only for logical axis names

    specs = nn.logical_to_mesh(specs, rules)
  is_spec = lambda s: isinstance(s, PartitionSpec)
  flat_specs = {_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}
  sizes = _axis_sizes(mesh)

  def spec_of(path, leaf):
    names = _names(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if len(names) >= 4 and names[0] == SERVE and names[-2] == "rhs":
      where = "serving_partition_specs: /" + "/".join(map(str, names))
      layer = names[1:-3]
      kernel = (PARAMS, *layer, "kernel")
      if kernel not in flat_specs:
        raise ValueError(f"{where}: no float kernel spec at /{'/'.join(map(str, kernel))} in specs")
      entries = _padded(flat_specs[kernel], len(shape), where)
      if names[-1] == "values":
        if shape and jnp.dtype(leaf.dtype) == jnp.uint8:  # packed sub-byte values: two rows per byte
          _check_packed(entries, shape[PACK_AXIS], 2, "bytes (two rows each)", sizes, where)
        return PartitionSpec(*entries)
      return _param_spec(entries, shape, sizes, where)
    if names and names[0] == SERVE:
      return PartitionSpec()
    spec = flat_specs.get(names)
    return spec if spec is not None else PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, variables)

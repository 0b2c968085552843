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
  ``PartitionSpec``; its ``scale`` and ``zero_point`` take it on the axes
  where they keep one entry per channel or group, and are replicated on
  reduced axes. Sub-byte values are packed two rows per byte along axis 0
  (``PACK_AXIS``), so a shard along that axis must hold an even number of
  rows: shards then split on whole bytes. The specs of a Flax model's serving
  variables are ``jqat.serving_partition_specs`` (``jqat._src.flax.sharding``),
  built on these.

Layers run under the default ``Auto`` mesh axes (sharding propagated by XLA),
e.g. ``jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.qtensor import PACK_AXIS, QTensor


def axis_sizes(mesh) -> dict[str, int] | None:
  """Mesh axis sizes by name: from a ``Mesh``, an ``AbstractMesh``, a mapping, or the current mesh."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape) if mesh.shape else None
  if isinstance(mesh, Mapping):
    return {str(k): int(v) for k, v in mesh.items()}
  return dict(mesh.shape)


def num_shards(entry, sizes: dict[str, int] | None, where: str) -> int | None:
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


def padded_entries(spec: PartitionSpec | Sequence | None, ndim: int, where: str) -> tuple:
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(f"{where}: the PartitionSpec {PartitionSpec(*entries)} has more entries than the {ndim} axes")
  return entries + (None,) * (ndim - len(entries))


def param_spec(kernel_entries: tuple, param_shape, sizes, where: str) -> PartitionSpec:
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
    shards = num_shards(entry, sizes, where)
    out.append(entry if n != 1 and entry is not None and (shards is None or n % shards == 0) else None)
  return PartitionSpec(*out)


def check_packed(entries: tuple, length: int, rows_per_unit: int, what: str, sizes, where: str) -> None:
  """Raises unless the shards of axis 0 hold whole bytes: ``length`` units of ``rows_per_unit`` rows each."""
  entry = entries[PACK_AXIS]
  if entry is None:
    return
  shards = num_shards(entry, sizes, where)
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
  entries = padded_entries(kernel_spec, len(shape), where)
  sizes = axis_sizes(mesh)
  if config.bits.is_packed and shape:
    check_packed(entries, shape[PACK_AXIS], 1, "rows", sizes, where)
  pspec = param_spec(entries, qparams_lib.params_shape(shape, config), sizes, where)
  return QTensor(PartitionSpec(*entries), pspec, pspec, config, shape)

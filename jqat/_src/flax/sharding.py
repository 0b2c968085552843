"""Shardings of a linen model's serving variables, derived from the shardings of its QAT variables.

The linen layout is ``serving/<layer>/<quant>/rhs/{values, scale, zero_point,
sums, layout}`` beside the float kernel it was made from,
``params/<layer>/kernel``; the rules for one quantized tensor are
``jqat.qtensor_partition_spec``'s (``jqat._src.sharding``). Flax itself is
imported only to map logical axis names, so ``jqat`` imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jqat._src import sharding as core
from jqat._src.qtensor import PACK_AXIS

SERVE = "serving"
PARAMS = "params"
# Serving entries of a quantized kernel that follow the kernel's axes; "layout"
# (the format record) is a small replicated vector.
_FOLLOWS_KERNEL = ("values", "scale", "zero_point", "sums")


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
  follow the output axis. The format record (``rhs/layout``) and activation
  ranges (``serving/.../lhs``) are replicated. Every other variable keeps the
  spec it has in ``specs`` (``P()``, replicated, when it has none).

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
    >>> _, stats = layer.apply(qat, x, mutable=["quant_stats"])
    >>> specs = nn.get_partition_spec(qat)
    >>> served = jax.eval_shape(lambda v: jqat.linen.convert(layer, v, x), nn.meta.unbox({**qat, **stats}))
    >>> out = jqat.serving_partition_specs(served, specs, mesh={"model": 2}, rules=[("mlp", "model")])
    >>> rhs = out["serving"]["quant"]["rhs"]
    >>> rhs["values"], rhs["scale"], rhs["sums"], rhs["layout"]
    (P(None, 'model'), P(None, 'model'), P(None, 'model'), P())
  """
  if rules is not None:
    import flax.linen as nn  # only for logical axis names

    specs = nn.logical_to_mesh(specs, rules)
  is_spec = lambda s: isinstance(s, PartitionSpec)
  flat_specs = {_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}
  sizes = core.axis_sizes(mesh)

  def spec_of(path, leaf):
    names = _names(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if len(names) >= 4 and names[0] == SERVE and names[-2] == "rhs" and names[-1] in _FOLLOWS_KERNEL:
      where = "serving_partition_specs: /" + "/".join(map(str, names))
      layer = names[1:-3]
      kernel = (PARAMS, *layer, "kernel")
      if kernel not in flat_specs:
        raise ValueError(f"{where}: no float kernel spec at /{'/'.join(map(str, kernel))} in specs")
      entries = core.padded_entries(flat_specs[kernel], len(shape), where)
      if names[-1] == "values":
        if shape and jnp.dtype(leaf.dtype) == jnp.uint8:  # packed sub-byte values: two rows per byte
          core.check_packed(entries, shape[PACK_AXIS], 2, "bytes (two rows each)", sizes, where)
        return PartitionSpec(*entries)
      return core.param_spec(entries, shape, sizes, where)
    if names and names[0] == SERVE:
      return PartitionSpec()
    spec = flat_specs.get(names)
    return spec if spec is not None else PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, variables)

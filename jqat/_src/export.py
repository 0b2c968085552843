"""``jax.export`` of a converted model: the integer serving function as serialized StableHLO.

The exported function is the serving forward with its variables baked in as
constants, so the artifact is self-contained: whoever loads it needs only
``jax`` (``jax.export.deserialize(data).call(x)``), never the model's code,
Flax or jqat. Its StableHLO holds the integer dots the model serves with
(``int8 x int8 -> int32`` for int8 and packed int4 kernels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

_WHERE = "jqat.export"
_SERVE = "serving"


def _example(arg, i: int):
  # Arrays and ShapeDtypeStructs pass as they are; Python numbers become arrays.
  if isinstance(arg, jax.ShapeDtypeStruct) or hasattr(arg, "shape") and hasattr(arg, "dtype"):
    if not all(isinstance(d, (int, np.integer)) for d in arg.shape):
      # Quantized tensors record their logical shape statically (int4 packing, per-group scales need it).
      raise ValueError(
        f"{_WHERE}: example argument {i} has the symbolic shape {tuple(arg.shape)}; the serving function needs "
        "concrete shapes. Export one artifact per input shape."
      )
    return arg
  if isinstance(arg, (int, float, bool, complex, list, tuple)):
    try:
      return np.asarray(arg)
    except (TypeError, ValueError):
      pass
  raise TypeError(
    f"{_WHERE}: example argument {i} is a {type(arg).__name__}; pass an array or a jax.ShapeDtypeStruct of each "
    "input of the serving function."
  )


def _quantized_kernels(tree) -> list[str]:
  # Paths of the stored integer / fp8 kernels: the ``values`` of each quantized tensor in the serving variables.
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names and names[-1] == "values" and hasattr(leaf, "dtype"):
      out.append("/".join(names[:-1]))
  return out


def _linen_function(model, variables, apply_kwargs):
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"{_WHERE}: a linen model needs its serving variables (a mapping from jqat.linen.convert), got "
      f"{type(variables).__name__}."
    )
  if _SERVE not in variables or not _quantized_kernels(variables[_SERVE]):
    held = sorted(variables)
    raise ValueError(
      f"{_WHERE}: the variables hold no quantized kernel (collections {held}, no '{_SERVE}' entries): they are "
      "float or QAT variables. Convert them first: served = jqat.linen.convert(model, variables, x), then "
      "jqat.export(model, served, x)."
    )
  return lambda *args: model.apply(variables, *args, **apply_kwargs)


def _nnx_function(model, apply_kwargs):
  from flax import nnx  # noqa: PLC0415 (Flax is needed only for Flax models)

  from jqat._src.flax import nnx as qnnx  # noqa: PLC0415

  ops = qnnx.quantizers(model, _WHERE)
  if not any(op.is_converted for _, op in ops):
    found = f"its {len(ops)} jqat ops hold float kernels" if ops else "it has no jqat layer"
    raise ValueError(
      f"{_WHERE}: the NNX model is not converted ({found}). Convert it first: jqat.nnx.convert(model), then "
      "jqat.export(model, x)."
    )
  graphdef, state = nnx.split(model)

  def fn(*args):
    # A copy of the model per trace: whatever the call writes to its variables stays out of the user's model.
    return nnx.merge(graphdef, state)(*args, **apply_kwargs)

  return fn


def export(
  model: Any,
  variables: Any = None,
  *example_args: Any,
  platforms: Sequence[str] = ("cpu",),
  **apply_kwargs: Any,
) -> jax.export.Exported:
  """Exports a converted model's integer serving function with ``jax.export``.

  The function exported is ``lambda *args: model.apply(variables, *args)``
  (linen) or ``lambda *args: model(*args)`` (NNX) with the serving variables
  **baked in as constants**: the artifact is self-contained, and a consumer
  calls it with the model's inputs alone, in a process that has only
  ``jax`` (``jax.export.deserialize(data).call(x)``). Its StableHLO holds
  the integer dots the model serves with: ``int8 x int8 -> int32`` for int8
  and packed int4 kernels (unpacked in the graph); fp8 kernels are held as
  fp8 constants and cast in the graph, as the model serves them.
  The artifact's size is about the serving variables' bytes. To pass the
  variables as arguments instead (one artifact, many checkpoints), export
  ``jax.jit(lambda v, x: model.apply(v, x))`` with ``jax.export.export``.

  Calling forms:

  - linen: ``jqat.export(model, served, *example_args)``, where ``served``
    comes from ``jqat.linen.convert``;
  - NNX: ``jqat.export(module, *example_args)`` with a module converted by
    ``jqat.nnx.convert`` (its variables are in it, so the second positional
    argument is the first example input). The module is not changed. Call
    ``module.eval()`` first if it has dropout or batch norm.

  ``platforms`` lowers one artifact for several targets, e.g.
  ``("cpu", "cuda", "tpu")``; lowering needs no device of those kinds (JAX
  lowers for any platform), but only platforms with a device here can run it.

  Args:
    model: a linen ``nn.Module``, or a converted ``nnx.Module``.
    variables: the linen model's serving variables; for NNX, the first
      example argument.
    *example_args: the serving function's inputs: arrays or
      ``jax.ShapeDtypeStruct`` of concrete shapes (the artifact serves those
      shapes; quantized tensors need static shapes, so symbolic ones are
      refused). Only their shapes and dtypes are used.
    platforms: the platforms to lower for (``"cpu"``, ``"cuda"``, ``"rocm"``,
      ``"tpu"``).
    **apply_kwargs: static keyword arguments of ``model.apply`` (linen) or of
      the module's call (NNX), baked into the artifact.

  Returns:
    A ``jax.export.Exported``; ``.serialize()`` gives its bytes and
    ``.mlir_module()`` its StableHLO text.

  Raises:
    ValueError: when the model is not converted: linen variables without
      quantized kernels in ``serving`` (float or QAT variables), or an NNX
      module none of whose jqat ops is converted; or when ``platforms`` is
      empty or not a sequence of platform names; or when an example argument
      has a symbolic shape. A layer whose serving variables do not fit it
      raises its own error, naming the layer.
    TypeError: when ``model`` is neither a linen nor an NNX module, or an
      example argument is not an array.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> layer = jqat.linen.QatDense(3)
    >>> x = jnp.array([[0.5, -1.0]])
    >>> v = layer.init(jax.random.key(0), x)
    >>> _, stats = layer.apply(v, x, mutable=["quant_stats"])
    >>> served = jqat.linen.convert(layer, {**v, **stats}, x)
    >>> exported = jqat.export(layer, served, x)
    >>> restored = jax.export.deserialize(exported.serialize())
    >>> bool((restored.call(x) == jax.jit(lambda x: layer.apply(served, x))(x)).all())
    True
    >>> "xi8>, tensor<2x3xi8>) -> tensor<1x3xi32>" in exported.mlir_module()
    True
  """
  if isinstance(platforms, str) or not isinstance(platforms, Sequence) or not platforms:
    raise ValueError(f"{_WHERE}: platforms={platforms!r} is invalid; allowed: a non-empty tuple such as ('cpu',).")
  platforms = tuple(platforms)
  if not all(isinstance(p, str) for p in platforms):
    raise ValueError(f"{_WHERE}: platforms={platforms!r} is invalid; allowed: names such as 'cpu', 'cuda', 'tpu'.")
  if _is_nnx(model):
    example_args = (variables, *example_args) if variables is not None else example_args
    fn = _nnx_function(model, apply_kwargs)
  elif _is_linen(model):
    fn = _linen_function(model, variables, apply_kwargs)
  else:
    raise TypeError(
      f"{_WHERE}: model is a {type(model).__name__}; expected a linen nn.Module (with its serving variables) or a "
      "converted nnx.Module."
    )
  args = tuple(_example(a, i) for i, a in enumerate(example_args))
  return jax.export.export(jax.jit(fn), platforms=platforms)(*args)


def _is_linen(model) -> bool:
  try:
    import flax.linen as nn  # noqa: PLC0415
  except ImportError:
    return False
  return isinstance(model, nn.Module)


def _is_nnx(model) -> bool:
  try:
    from flax import nnx  # noqa: PLC0415
  except ImportError:
    return False
  return isinstance(model, nnx.Module)

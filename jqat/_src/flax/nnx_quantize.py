"""``quantize_model`` and ``report`` for Flax NNX: quantize a model you did not write, by graph surgery.

NNX models are plain object graphs. ``quantize_model`` walks it
(``nnx.iter_modules``) and, for each stock layer whose path a rule matches,
puts a jqat op in the layer's own hook: ``dot_general`` of ``nnx.Linear`` and
``nnx.LinearGeneral``, ``einsum_op`` of ``nnx.Einsum``, ``conv_general_dilated``
of ``nnx.Conv``. ``nnx.Embed`` has no hook, so it is replaced (``setattr`` on
every parent that holds it) by a ``QatEmbed`` holding the same ``nnx.Param``.
Parameters keep their values and paths; the ops add only statistics
(``QuantStat``) and, for LSQ configs, learned scales.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jqat._src import rules as rules_lib
from jqat._src.flax import common, nnx_layers
from jqat._src.flax import nnx as qnnx
from jqat._src.report import OpReport, describe, format_table, weight_serving_bytes

# The attribute of the quantizer in the layer that holds it, left out of the layer's path.
_HOOKS = ("dot_general", "einsum_op", "conv_general_dilated", "quant")


def _kind(m) -> tuple[tuple[str, ...], bool] | None:
  """The op kinds of a layer that quantize_model covers, and whether it is still stock (not yet quantized)."""
  if isinstance(m, nnx.Embed):
    return ("embed", "attend"), not isinstance(m, nnx_layers.QatEmbed)
  if isinstance(m, nnx.Conv):
    hook, stock = m.conv_general_dilated, lax.conv_general_dilated
    kinds = ("conv",)
  elif isinstance(m, nnx.Einsum):
    hook, stock = m.einsum_op, jnp.einsum
    kinds = ("einsum",)
  elif isinstance(m, nnx.Linear):
    hook, stock = m.dot_general, lax.dot_general
    kinds = ("dot",)
  elif isinstance(m, nnx.LinearGeneral):
    hook, stock = (lax.dot_general if m.dot_general is None else m.dot_general), lax.dot_general
    if m.dot_general_cls is not None:
      return None
    kinds = ("dot",)
  else:
    return None
  if isinstance(hook, qnnx._Quantizer):
    return kinds, False  # quantized already (a jqat layer, or an earlier quantize_model)
  return (kinds, True) if hook is stock else None  # a user's own op is left alone


def _configs(rules, index):
  if index is None:
    return None, None, None
  r = rules[index]
  return r.weight, r.activation, r.pattern


def _replace_everywhere(model, old, new) -> None:
  """Points every reference to ``old`` in ``model``'s graph (attributes, nnx.List / nnx.Dict items) at ``new``."""
  for _, node in list(nnx.iter_graph(model)):
    if isinstance(node, nnx.List):
      for i in range(len(node)):
        if node[i] is old:
          node[i] = new
    elif isinstance(node, nnx.Dict):
      for k in list(node.keys()):
        if node[k] is old:
          node[k] = new
    elif isinstance(node, nnx.Module):
      for k, v in list(vars(node).items()):
        if v is old:
          setattr(node, k, new)


def _mode(weight, activation) -> str:
  return "float" if weight is None and activation is None else "qat"


def quantize_model(model, rules=None):
  """Quantizes the stock layers of an NNX model in place, by rules on their paths; returns the model.

  Covered: ``nnx.Linear`` and ``nnx.LinearGeneral`` (op ``"dot"``),
  ``nnx.Einsum`` (``"einsum"``), ``nnx.Conv`` (``"conv"``), ``nnx.Embed``
  (``"embed"`` for the lookup, ``"attend"`` for the tied logits; one table,
  whose format the ``"embed"`` rule gives, serves both, and the ``"attend"``
  rule gives the query's activation config). For each layer the first rule
  whose pattern full-matches its path (``"blocks/0/attn/query"``) wins; a rule
  with ``weight=None, activation=None``, or no matching rule, keeps the layer
  float (it gets a float op, so that ``report`` lists it). Layers quantized
  already (jqat layers, an earlier call) are matched but left as they are, so
  a second call changes nothing; a stock layer with a user's own op in its
  hook is left alone. Afterwards
  ``calibrate``, training, ``convert`` and serving work as with jqat's own
  layers.

  Args:
    model: an NNX module (changed in place).
    rules: a sequence of ``jqat.Rule``; None for jqat's defaults (int8
      weights per channel, int8 activations per tensor, embeddings weight-only).

  Returns:
    ``model``.

  Raises:
    ValueError: when a rule matches no layer (listing the paths there are), or
      a rule gives a conv a per-token activation config, or the embed and
      attend rules of one table ask for different weight formats.
    TypeError: for rules that are not ``jqat.Rule``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> class Mlp(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc = nnx.Linear(4, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.fc(x)))
    >>> model = jqat.nnx.quantize_model(Mlp(nnx.Rngs(0)), [jqat.Rule("head"), jqat.Rule(".*", weight=jqat.QatConfig())])
    >>> type(model.fc.dot_general).__name__, model.head.dot_general.mode
    ('QatDotGeneral', 'float')
  """
  qnnx.check_model(model, "quantize_model")
  rules = rules_lib.normalize_rules(rules)
  plan, matched, paths = [], set(), []
  for path, m in nnx.iter_modules(model):
    kind = _kind(m)
    if kind is None:
      continue
    kinds, stock = kind
    p = qnnx.path_str(path)
    found = {}
    for op in kinds:
      i = rules_lib.match(rules, p, op)
      found[op] = i
      paths.append(p)
      if i is not None:
        matched.add(i)
    if stock:
      plan.append((p, m, found))
  rules_lib.check_all_matched(rules, matched, paths)

  for p, m, found in plan:
    if isinstance(m, nnx.Embed):
      _quantize_embed(model, p, m, rules, found)
      continue
    (op,) = found
    w, a, pattern = _configs(rules, found[op])
    mode = _mode(w, a)
    if isinstance(m, nnx.Conv):
      if common.is_dynamic(a):
        raise ValueError(f"rule {pattern!r} gives the conv at '{p}' a per-token activation config; need per tensor.")
      q = qnnx.QatConvGeneralDilated(lhs_config=a, rhs_config=w, mode=mode)
      q.init_lsq(m.kernel[...], q.kernel_config(m.kernel.shape))
      m.conv_general_dilated = nnx.data(q)
    elif isinstance(m, nnx.Einsum):
      q = nnx_layers.QatEinsumOp(lhs_config=a, rhs_config=w, mode=mode)
      if common.uses_lsq(w):
        q.init_lsq(m.kernel[...], q.kernel_config(m.einsum_str, m.kernel.ndim))
      m.einsum_op = nnx.data(q)
    else:
      q = qnnx.QatDotGeneral(lhs_config=a, rhs_config=w, mode=mode)
      if common.uses_lsq(w):
        if isinstance(m, nnx.Linear):
          contracting, batch = (0,), ()
        else:
          contracting, batch = qnnx._linear_general_dims(m)
        q.init_lsq(m.kernel[...], common.operand_config(w, m.kernel.ndim, contracting, batch))
      m.dot_general = nnx.data(q)
    q.path, q.rule = p, pattern
  return model


def _quantize_embed(model, p, m, rules, found) -> None:
  w, _, pattern = _configs(rules, found["embed"])
  aw, a, attend_pattern = _configs(rules, found["attend"])
  if w is not None and aw is not None and aw != w:
    raise ValueError(
      f"the embedding at '{p}' has one table for lookup and attend, but rule {pattern!r} (embed) asks for "
      f"{describe(w)} and rule {attend_pattern!r} (attend) for {describe(aw)}; give both the same weight config."
    )
  if w is None:
    a = None  # a float table: attend is float too
  new = nnx_layers.QatEmbed.from_embed(m, weight_config=w, activation_config=a, mode=_mode(w, a))
  new.quant.path, new.quant.rule = p, pattern
  _replace_everywhere(model, m, new)


def _layer_path(q) -> str:
  path = q.path or ""
  head, _, tail = path.rpartition("/")
  return head if tail in _HOOKS and head else path


def report(model, *args, print_table: bool = True, **kwargs) -> list[OpReport]:
  """Lists every quantized (or float-kept) matmul-like op of ``model``, as ``model(*args, **kwargs)`` calls them.

  The model runs abstractly (``jax.eval_shape`` on a copy: nothing computes,
  no statistic changes). One row per op and kind: path, op (``"dot"``,
  ``"einsum"``, ``"conv"``, ``"embed"``, ``"attend"``), operand shapes, the
  rule that matched (None when the layer was not made by a rule), the weight
  and activation formats, the float and the serving bytes of the weight. A
  table used twice (tied lookup and attend) counts its bytes once.

  Args:
    model: an NNX model with jqat ops (from ``quantize_model`` or jqat layers).
    *args: a sample input, as for ``model(*args)``.
    print_table: print ``format_table(rows)``.
    **kwargs: passed to ``model``.

  Returns:
    A list of ``OpReport``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> model = jqat.nnx.quantize_model(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    >>> rows = jqat.nnx.report(model, jnp.ones((2, 4)), print_table=False)
    >>> [(r.op, r.lhs_shape, r.rhs_shape, r.weight, r.float_bytes, r.serving_bytes) for r in rows]
    [('dot', (2, 4), (4, 8), 'int8 sym per-channel', 128, 96)]
  """
  qnnx.quantizers(model, "report")  # the copies below keep the paths
  graphdef, state = nnx.split(model)

  def run(state):
    nnx.merge(graphdef, state)(*args, **kwargs)

  with qnnx.recording() as recorded:
    jax.eval_shape(run, state)
  rows, seen, counted = [], set(), set()
  for q, op, lhs_shape, rhs_shape, lhs_cfg, rhs_cfg, itemsize in recorded:
    path = _layer_path(q)
    key = (path, op, lhs_shape, rhs_shape)
    if key in seen:
      continue
    seen.add(key)
    n_bytes = (0, 0)
    if (path, rhs_shape) not in counted:
      counted.add((path, rhs_shape))
      n_bytes = (math.prod(rhs_shape) * itemsize, weight_serving_bytes(rhs_shape, rhs_cfg, itemsize))
    rows.append(OpReport(path, op, lhs_shape, rhs_shape, q.rule, describe(rhs_cfg), describe(lhs_cfg), *n_bytes))
  if print_table:
    print(format_table(rows))
  return rows

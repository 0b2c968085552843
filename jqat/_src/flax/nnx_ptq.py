"""``ptq``: post-training quantization of an NNX model's kernels with RTN, GPTQ, AWQ or SmoothQuant, in place.

The NNX counterpart of ``jqat.linen.ptq``, with the same methods, options and
modes. The model is one that already quantizes (``QatDense``, an
``nnx.Linear`` with a ``QatDotGeneral``, or ``jqat.nnx.quantize_model``'s
output): its layers' configs fix the formats. ``ptq`` freezes every static
activation's range from the calibration batches, converts the model as
``jqat.nnx.convert`` does, and replaces the round-to-nearest kernel of each
selected layer by the kernel of the chosen method.

Statistics come from a jitted float forward over the batches, during which
every ``QatDotGeneral`` hands its inputs to ``ptq`` (``nnx.observing``)
instead of computing: a ``MomentsState`` of the input (``Σ xᵀx`` for GPTQ,
mean and max ``|x|`` for AWQ and SmoothQuant) and its per-channel minimum and
maximum. The forward runs on a copy of the model's state, so that layers with
state (batch norm, moving averages) are not changed by it.

Costs: one pass (default) is one forward over the batches with ``Σ K_l²``
floats of Hessians for GPTQ (``K_l`` per layer otherwise, plus up to
``sample_rows`` input rows per layer for AWQ); ``sequential=True`` is one more
pass per selected layer (one compile), each layer's statistics taken with the
layers before it (in call order) weight-only simulated with their quantized
kernels.

AWQ's and SmoothQuant's divisor ``s`` is stored as the layer's
``QatDotGeneral.input_scale`` (a ``QuantServing`` variable) and applied at
serving as one elementwise division of the input before the quantized dot.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jqat._src import rules as rules_lib
from jqat._src.calibration import range_stats
from jqat._src.calibration.moments import moments_init, moments_update
from jqat._src.flax import common
from jqat._src.flax import linen_ptq as lptq
from jqat._src.flax import nnx as qnnx
from jqat._src.qtensor import dequantize

METHODS = lptq.METHODS
OPTIONS = lptq.OPTIONS
_WHERE = "jqat.nnx.ptq"


def _layers(model) -> list[tuple[str, nnx.Module, qnnx.QatDotGeneral]]:
  """``(layer path, layer, quantizer)`` of every ``nnx.Linear`` (``QatDense`` included) with a jqat dot."""
  qnnx.quantizers(model, _WHERE)  # records each quantizer's path
  out = []
  for path, m in nnx.iter_modules(model):
    if isinstance(m, nnx.Linear) and isinstance(m.dot_general, qnnx.QatDotGeneral):
      out.append((qnnx.path_str(path), m, m.dot_general))
  return out


def _pass(model, call_kwargs: Mapping, hessian: bool, sample_rows: int):
  """``(step, order, plain_dots)``: a jitted float forward returning every ``QatDotGeneral``'s input statistics.

  ``step(replace, batch)``: ``replace`` maps a quantizer's path to ``(kernel, s)``,
  the kernel it computes with instead of its own and the divisor of its input
  (sequential mode). ``order`` (the call order of the dots' paths) and
  ``plain_dots`` (path: whether the dot is a ``(K, N)`` kernel on the input's
  last axis) are filled while tracing. Models of one structure share the
  compiled forward.
  """
  graphdef, state = nnx.split(model)
  try:
    key = (graphdef, tuple(sorted(call_kwargs.items())), hessian, sample_rows)
    hash(key)
  except TypeError:  # unhashable call arguments: compile for this call alone
    jitted, order, plain_dots = _build(graphdef, call_kwargs, hessian, sample_rows)
  else:
    jitted, order, plain_dots = _cached_build(key)
  return (lambda replace, batch: jitted(state, replace, batch)), order, plain_dots


@functools.lru_cache(maxsize=8)
def _cached_build(key):
  graphdef, kwargs, hessian, sample_rows = key
  return _build(graphdef, dict(kwargs), hessian, sample_rows)


def _build(graphdef, call_kwargs: Mapping, hessian: bool, sample_rows: int):
  order: list = []
  plain_dots: dict = {}

  def step(state, replace, batch):
    m = nnx.merge(graphdef, state)
    stats = {}
    order.clear()

    def observe(q, lhs, rhs, dn, precision, preferred_element_type):
      if isinstance(rhs, jax.ShapeDtypeStruct):
        raise ValueError(f"{_WHERE}: the layer at '{q.path}' has no float kernel; ptq takes a float (or QAT) model.")
      path = q.path
      plain = lptq._plain(lhs, rhs, dn)
      x = lax.stop_gradient(jnp.asarray(lhs))
      if path in replace:
        rhs, s = replace[path]
        x = x / s.astype(x.dtype)
      k = x.shape[-1]
      if path not in stats:
        order.append(path)
        plain_dots[path] = plain
        stats[path] = {"moments": moments_init(k, hessian=hessian and plain)}
        if plain and sample_rows:
          stats[path]["sample"] = x.reshape(-1, k)[:sample_rows]
      entry = stats[path]
      if plain:
        entry["moments"] = moments_update(entry["moments"], x)
        rows = x.reshape(-1, k).astype(jnp.float32)
        finite = jnp.all(jnp.isfinite(rows), axis=1, keepdims=True)
        lo = jnp.min(jnp.where(finite, rows, jnp.inf), axis=0)
        hi = jnp.max(jnp.where(finite, rows, -jnp.inf), axis=0)
      else:
        lo, hi, _ = range_stats.finite_range(x, (1,))  # NaN and ±Inf left out
      entry["lo"] = jnp.minimum(entry.get("lo", lo), lo)
      entry["hi"] = jnp.maximum(entry.get("hi", hi), hi)
      rhs = jnp.asarray(rhs).astype(x.dtype)
      return lax.dot_general(x, rhs, dn, precision=precision, preferred_element_type=preferred_element_type)

    args = batch if isinstance(batch, tuple) else (batch,)
    with qnnx.observing(observe):
      m(*args, **call_kwargs)
    return stats

  return jax.jit(step), order, plain_dots


def _statistics(step, replace, batches, sample_rows):
  total = None
  for batch in batches:
    stats = step(replace, batch)
    if total is not None and set(stats) != set(total):
      raise ValueError(f"{_WHERE}: the batches take different paths through the model; ptq needs one structure.")
    total = lptq._merge(total, stats)
  for e in total.values():
    if "more" in e:
      e["sample"] = jnp.concatenate([e["sample"], *e.pop("more")])[:sample_rows]
  return total


def _select(layers, plain: dict, rules) -> list[str]:
  """Quantizer paths that ptq quantizes with its method; the others keep convert's round to nearest."""
  candidates = [(p, m, q) for p, m, q in layers if plain.get(q.path) and not q.is_float and q.rhs_config is not None]
  if rules is None:
    return [q.path for _, _, q in candidates]
  rules = rules_lib.normalize_rules(rules)
  want_paths = {q.path for _, _, q in candidates}
  chosen, matched, names = [], set(), []
  for p, _, q in layers:
    names.append(p)
    i = rules_lib.match(rules, p, "dot")
    if i is None and q.path != p:
      i = rules_lib.match(rules, q.path, "dot")
    if i is None:
      continue
    matched.add(i)
    rule = rules[i]
    if rule.weight is None or q.path not in want_paths:
      continue  # a float rule (the layer stays as it is), or a layer ptq cannot quantize with its method
    want = common.operand_config(rule.weight, 2, (0,), ())
    have = common.operand_config(q.rhs_config, 2, (0,), ())
    if lptq._config_key(want) != lptq._config_key(have):
      raise ValueError(
        f"{_WHERE}: the rule {rule.pattern!r} asks for weights {rule.weight}, but the layer at '{p}' "
        f"quantizes them as {have}; build the model with the same rules (jqat.nnx.quantize_model)."
      )
    chosen.append(q.path)
  rules_lib.check_all_matched(rules, matched, names)
  return chosen


def ptq(
  model: nnx.Module,
  batches: Iterable,
  *,
  method: str = "rtn",
  rules: Sequence[rules_lib.Rule] | None = None,
  sequential: bool = False,
  call_kwargs: Mapping | None = None,
  **options,
) -> None:
  """Post-training quantization of ``model``'s kernels, in place; afterwards ``model(x)`` serves integer.

  Every ``nnx.Linear`` (``QatDense`` included) whose ``dot_general`` is a
  ``QatDotGeneral`` is quantized with ``method`` in the format of its own
  weight config; static (per-tensor) activations get the min-max range of
  the calibration batches (of ``x / s`` where the method scales the input).
  Other jqat dots, and layers that ``rules`` leave out, get ``convert``'s
  round-to-nearest kernel and the same min-max range. The model is then
  converted as by ``jqat.nnx.convert`` (float kernels dropped).

  Methods (options, defaults): as ``jqat.linen.ptq``: ``"rtn"``; ``"gptq"``
  (``damp=0.01``, ``block_size=128``, ``act_order=False``); ``"awq"``
  (``grid=20``, ``sample_rows=512``); ``"smoothquant"`` (``alpha=0.5``).

  Args:
    model: an NNX model whose dots quantize through ``QatDotGeneral``; changed in place.
    batches: an iterable of model inputs (a tuple is positional arguments);
      kept in a list, and read once per pass.
    method: one of ``METHODS``.
    rules: ``jqat.Rule``s selecting the layers (full-matched against the
      layer's path, then its quantizer's; first match wins): a rule with a
      weight config selects (that config must be the layer's own), one with
      ``weight=None`` leaves the layer as it is (float layers stay float,
      others get round to nearest); unmatched layers get round to nearest.
      None: all.
    sequential: each layer's statistics from a forward through the already
      quantized layers before it.
    call_kwargs: passed to ``model`` with every batch.
    **options: the method's options.

  Raises:
    ValueError: an unknown method (listing the allowed ones), no batches, a
      rule that matches no layer, a rule whose weight config is not the
      layer's, or a model converted already.
    TypeError: an option the method does not take, or batches that are one array.

  Examples:
    >>> import jax, jqat
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatDense(16, 4, weight_config="int4", activation_config=None, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (64, 16))
    >>> jqat.nnx.ptq(layer, [x], method="gptq")
    >>> layer.kernel, layer.dot_general.rhs_serving.get_value()["values"].dtype, layer(x).shape
    (None, dtype('uint8'), (64, 4))
  """
  qnnx.check_model(model, _WHERE)
  opts = lptq._check_options(method, options, _WHERE)
  if not isinstance(batches, Iterable) or isinstance(batches, (jax.Array, np.ndarray)):
    raise TypeError(f"{_WHERE}: batches must be an iterable of model inputs, got {type(batches).__name__}.")
  batches = list(batches)
  if not batches:
    raise ValueError(f"{_WHERE}: got no batches; ptq needs calibration inputs.")
  converted = [p for p, q in qnnx.quantizers(model, _WHERE) if q.is_converted]
  if converted:
    raise ValueError(f"{_WHERE}: the layer at '{converted[0]}' is converted already; ptq takes a float (or QAT) model.")
  call_kwargs = dict(call_kwargs or {})
  sample_rows = opts.get("sample_rows", 0)
  layers = _layers(model)
  by_path = {q.path: (m, q) for _, m, q in layers}
  step, order, plain = _pass(model, call_kwargs, method == "gptq", sample_rows)
  stats = _statistics(step, {}, batches, sample_rows)
  order = list(order)
  chosen = _select(layers, plain, rules)
  kernels = {p: jnp.asarray(by_path[p][0].kernel[...]) for p in chosen}

  def wcfg(p):
    return common.operand_config(by_path[p][1].rhs_config, 2, (0,), ())

  results = {}  # quantizer path -> (QTensor, s, statistics)
  if sequential:
    # Every chosen layer is replaced in every pass (its float kernel and s = 1 until its turn): one compile.
    replace = {p: (kernels[p], jnp.ones((kernels[p].shape[0],), jnp.float32)) for p in chosen}
    for n, p in enumerate([p for p in order if p in chosen]):
      if n:
        stats = _statistics(step, replace, batches, sample_rows)
      q, s = lptq._quantize_layer(method, kernels[p], stats[p], wcfg(p), opts)
      results[p] = (q, s, stats[p])
      ones = jnp.ones((kernels[p].shape[0],), jnp.float32)
      replace = {**replace, p: (dequantize(q), ones if s is None else s)}
  else:
    for p in chosen:
      q, s = lptq._quantize_layer(method, kernels[p], stats[p], wcfg(p), opts)
      results[p] = (q, s, stats[p])

  # Frozen min-max ranges for every static activation, then convert; then the method's kernels replace RTN's.
  for path, q in qnnx.quantizers(model, _WHERE):
    cfg = q.lhs_config
    if path not in stats or q.is_float or cfg is None or q.rhs_config is None:
      continue
    if common.is_dynamic(cfg) or common.uses_lsq(cfg) or q.lhs_stats is None:
      continue
    entry, s = (results[path][2], results[path][1]) if path in results else (stats[path], None)
    qp = lptq._activation_range(entry, s, cfg, _WHERE)
    q.lhs_stats.set_value(common.freeze_activation_stats(q.lhs_stats.get_value(), qp))
  qnnx.convert(model)
  for p, (wq, s, _) in results.items():
    q = by_path[p][1]
    layout = tuple(int(c) for c in common.weight_layout(wcfg(p), kernels[p].shape))
    q.rhs_serving = qnnx.QuantServing(common.serving_weight(wq, (0,), q.lhs_config), layout=layout)
    if s is not None:
      q.input_scale = qnnx.QuantServing(jnp.asarray(s, jnp.float32))

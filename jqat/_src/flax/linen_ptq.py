"""``ptq``: post-training quantization of a linen model's kernels with RTN, GPTQ, AWQ or SmoothQuant.

The model is one that already quantizes (jqat's ``QatDense``, a
``QatDotGeneral`` injected into stock layers, or ``quantize_model``'s
output): its layers' configs fix the formats. ``ptq`` replaces what
``convert`` would store, the round-to-nearest kernel, with the kernel of the
chosen method, and returns serving variables in ``convert``'s layout that the
same model serves.

Statistics come from a float forward over the batches: an interceptor
(``nn.intercept_methods``) on every ``QatDotGeneral`` computes the float dot
and accumulates a ``MomentsState`` of its input (``Σ xᵀx`` for GPTQ, mean and
max ``|x|`` for AWQ and SmoothQuant) and its per-channel minimum and maximum
(the static activation ranges, min-max, of ``x`` or of ``x / s``).

What each mode costs, for ``L`` selected layers of input sizes ``K_l``:

* one pass (default): one float forward over the batches, all layers'
  statistics at once; memory ``Σ K_l²`` floats for GPTQ's Hessians (``K_l``
  values per layer for the other methods), plus up to ``sample_rows`` input
  rows per layer for AWQ's search.
* ``sequential=True``: layer ``l`` is quantized from statistics of a forward
  in which the ``l`` layers before it (in call order) already use their
  quantized kernels (weight-only simulated: float activations, dequantized
  kernels, ``x / s`` where a method scales). ``L`` passes over the batches
  (two compiles), the same memory as one pass.

AWQ's and SmoothQuant's divisor ``s`` is stored as ``serving/<dot>/input_scale``
and applied by the layer at serving as one elementwise division of its input,
which XLA fuses into the activation's quantization. ``ptq`` does not rewrite
the model: folding ``1 / s`` into a preceding LayerNorm or dense kernel
(``jqat.fold_into_layernorm``, ``jqat.fold_into_dense``) is for a model whose
graph is known to allow it (every consumer of that input scaled by the same ``s``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from jqat._src import rules as rules_lib
from jqat._src.calibration import range_stats
from jqat._src.calibration.moments import moments_init, moments_merge, moments_update
from jqat._src.config import QatConfig
from jqat._src.flax import common
from jqat._src.flax import linen as qlinen
from jqat._src.ptq.awq import awq as awq_fn
from jqat._src.ptq.gptq import gptq as gptq_fn
from jqat._src.ptq.smoothquant import check_alpha, smooth_quant_scales
from jqat._src.qparams import qparams_from_array, qparams_from_range
from jqat._src.qtensor import QTensor, dequantize, quantize

METHODS = ("rtn", "gptq", "awq", "smoothquant")
# Options each method takes (``ptq(..., **options)``), with their defaults.
OPTIONS = {
  "rtn": {},
  "gptq": {"damp": 0.01, "block_size": 128, "act_order": False},
  "awq": {"grid": 20, "sample_rows": 512},
  "smoothquant": {"alpha": 0.5},
}
_WHERE = "jqat.linen.ptq"


@dataclasses.dataclass
class _Layer:
  """One quantized dot the forward passed through, as the statistics pass saw it."""

  path: tuple
  kernel: jax.Array | None  # (K, N) float, when ptq can quantize it
  lhs_config: QatConfig | None
  rhs_config: QatConfig | None


def _config_key(c: QatConfig | None):
  return None if c is None else (c.bits, c.symmetric, c.narrow_range, c.per_channel, c.group_size)


def _check_options(method: str, options: dict, where: str = _WHERE) -> dict:
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(f"{where}: method={method!r} is invalid; allowed: {', '.join(map(repr, METHODS))}.")
  allowed = OPTIONS[method]
  bad = sorted(set(options) - set(allowed))
  if bad:
    names = ", ".join(allowed) or "none"
    raise TypeError(f"{where}: method={method!r} takes no option {', '.join(bad)}; its options: {names}.")
  out = {**allowed, **options}
  if method == "smoothquant":
    check_alpha(out["alpha"])
  if method == "awq":
    n = out["sample_rows"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"{where}: sample_rows={n!r} is invalid; allowed: a positive int.")
  return out


def _dot_args(args, kwargs):
  names = ("lhs", "rhs", "dimension_numbers")
  vals = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]) :]]
  return vals[0], vals[1], vals[2]


def _plain(lhs, rhs, dn) -> bool:
  """A kernel ``(K, N)`` contracted with the input's last axis: the layout the weight algorithms take."""
  (lc, rc), (lb, rb) = dn
  return jnp.ndim(rhs) == 2 and tuple(lc) == (jnp.ndim(lhs) - 1,) and tuple(rc) == (0,) and not lb and not rb


def _pass(model, apply_kwargs, layers_out: dict, order: list, hessian: bool, sample_rows: int):
  """A jitted float forward that returns every quantized dot's input statistics.

  ``replace`` maps a dot's path to ``(kernel, s)``: the kernel it computes with
  instead of its own and the divisor of its input (sequential mode).
  """

  def step(variables, replace, batch):
    stats = {}
    order.clear()  # the call order, recorded while tracing

    def interceptor(next_fun, args, kwargs, context):
      mod = context.module
      if not isinstance(mod, qlinen.QatDotGeneral) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      lhs, rhs, dn = _dot_args(args, kwargs)
      if isinstance(rhs, jax.ShapeDtypeStruct):
        raise ValueError(
          f"{_WHERE}: the layer at '/{'/'.join(map(str, mod.scope.path))}' has no float kernel; ptq takes the "
          "model's float (or QAT) variables, not converted ones."
        )
      path = tuple(mod.scope.path)
      (lc, rc), (lb, rb) = dn
      rhs_cfg = None if mod.mode == "float" else common.operand_config(mod.rhs_config, jnp.ndim(rhs), rc, rb)
      lhs_cfg = None if mod.mode == "float" else common.operand_config(mod.lhs_config, jnp.ndim(lhs), lc, lb)
      plain = _plain(lhs, rhs, dn)
      x = lax.stop_gradient(jnp.asarray(lhs))
      if path in replace:
        rhs, s = replace[path]
        x = x / s.astype(x.dtype)
      if path not in stats:
        order.append(path)
        layers_out.setdefault(path, _Layer(path, None, lhs_cfg, rhs_cfg))
        if plain and rhs_cfg is not None and layers_out[path].kernel is None:
          layers_out[path].kernel = True  # filled with the float kernel after the pass
        k = x.shape[-1]
        stats[path] = {"moments": moments_init(k, hessian=hessian and plain), "kernel": jnp.asarray(args[1])}
        if plain and sample_rows:
          stats[path]["sample"] = x.reshape(-1, k)[:sample_rows]
      if plain:
        entry = stats[path]
        entry["moments"] = moments_update(entry["moments"], x)
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        finite = jnp.all(jnp.isfinite(rows), axis=1, keepdims=True)
        lo = jnp.min(jnp.where(finite, rows, jnp.inf), axis=0)
        hi = jnp.max(jnp.where(finite, rows, -jnp.inf), axis=0)
        entry["lo"] = jnp.minimum(entry.get("lo", lo), lo)
        entry["hi"] = jnp.maximum(entry.get("hi", hi), hi)
      else:
        entry = stats[path]
        lo, hi, _ = range_stats.finite_range(x, (1,))  # NaN and ±Inf left out
        entry["lo"] = jnp.minimum(entry.get("lo", lo), lo)
        entry["hi"] = jnp.maximum(entry.get("hi", hi), hi)
      return lax.dot_general(
        x,
        jnp.asarray(rhs).astype(x.dtype),
        dn,
        precision=kwargs.get("precision"),
        preferred_element_type=kwargs.get("preferred_element_type"),
      )

    args = batch if isinstance(batch, tuple) else (batch,)
    with nn.intercept_methods(interceptor):
      model.apply(variables, *args, **apply_kwargs)
    return stats

  return jax.jit(step)


def _merge(a, b):
  """Merges two batches' statistics per dot path (also used by the NNX ptq, whose entries hold no kernel)."""
  if a is None:
    return b
  out = {}
  for path, e in b.items():
    o = a[path]
    out[path] = {
      "moments": moments_merge(o["moments"], e["moments"]),
      "lo": jnp.minimum(o["lo"], e["lo"]),
      "hi": jnp.maximum(o["hi"], e["hi"]),
    }
    if "kernel" in o:
      out[path]["kernel"] = o["kernel"]
    if "sample" in o:
      out[path]["sample"] = o["sample"]
      out[path]["more"] = o.get("more", []) + [e["sample"]]
  return out


def _statistics(step, variables, replace, batches, sample_rows):
  total = None
  for batch in batches:
    stats = step(variables, replace, batch)
    if total is not None and set(stats) != set(total):
      raise ValueError(f"{_WHERE}: the batches take different paths through the model; ptq needs one structure.")
    total = _merge(total, stats)
  for e in total.values():
    if "more" in e:
      e["sample"] = jnp.concatenate([e["sample"], *e.pop("more")])[:sample_rows]
  return total


def _select(layers: dict, rules) -> list:
  """The paths ptq quantizes with its method; the others keep convert's round-to-nearest."""
  candidates = [p for p, layer in layers.items() if layer.kernel is not None]
  if rules is None:
    return candidates
  rules = rules_lib.normalize_rules(rules)
  chosen, matched, paths = [], set(), []
  for path in candidates:
    name = "/".join(map(str, path))
    parent = "/".join(map(str, path[:-1]))
    paths.append(name)
    i = rules_lib.match(rules, name, "dot")
    if i is None and parent:
      i = rules_lib.match(rules, parent, "dot")
    if i is None:
      continue
    matched.add(i)
    rule = rules[i]
    if rule.weight is None:
      continue
    want = common.operand_config(rule.weight, 2, (0,), ())
    have = layers[path].rhs_config
    if _config_key(want) != _config_key(have):
      raise ValueError(
        f"{_WHERE}: the rule {rule.pattern!r} asks for weights {rule.weight}, but the layer at '/{name}' "
        f"quantizes them as {have}; build the model with the same rules (jqat.linen.quantize_model)."
      )
    chosen.append(path)
  rules_lib.check_all_matched(rules, matched, paths)
  return chosen


def _quantize_layer(method: str, w: jax.Array, entry: dict, config: QatConfig, opts: dict):
  """``(QTensor, s or None)`` for one kernel."""
  if method == "gptq":
    q = gptq_fn(
      w, entry["moments"], config, damp=opts["damp"], block_size=opts["block_size"], act_order=opts["act_order"]
    )
    return q, None
  if method == "awq":
    return awq_fn(w, entry["sample"], config, grid=opts["grid"], moments=entry["moments"])
  if method == "smoothquant":
    s = smooth_quant_scales(entry["moments"].abs_max, w, alpha=opts["alpha"])
    w = w * s[:, None].astype(w.dtype)
  else:
    s = None
  q = quantize(w, qparams_from_array(w, config), config)
  return q.replace(dequant_dtype=jnp.dtype(w.dtype)), s


def _activation_range(entry: dict, s, config: QatConfig, where: str = _WHERE):
  lo, hi = entry["lo"], entry["hi"]
  if s is not None:
    lo, hi = lo / s, hi / s
  lo, hi = jnp.min(lo), jnp.max(hi)
  if not bool(jnp.isfinite(lo) & jnp.isfinite(hi)):
    raise ValueError(f"{where}: the calibration batches hold no finite row for an activation.")
  return qparams_from_range(lo, hi, config)


def ptq(
  model: nn.Module,
  variables: Mapping,
  batches: Iterable,
  *,
  method: str = "rtn",
  rules: Sequence[rules_lib.Rule] | None = None,
  sequential: bool = False,
  apply_kwargs: Mapping | None = None,
  **options,
) -> dict:
  """Post-training quantization of ``model``'s kernels; returns serving variables the same model serves.

  Every ``QatDotGeneral`` of the model (inside ``QatDense``, injected into a
  stock layer, or put in by ``quantize_model``) whose kernel is ``(K, N)``
  and contracted with its input's last axis is quantized with ``method`` in
  the format of its own weight config; static (per-tensor) activations get
  the min-max range of the calibration batches (of ``x / s`` where the method
  scales the input). Other dots, and layers that ``rules`` leave out, get
  ``convert``'s round-to-nearest kernel and the same min-max range.

  Methods (options, defaults):
    * ``"rtn"``: round to nearest, as ``convert``.
    * ``"gptq"`` (``damp=0.01``, ``block_size=128``, ``act_order=False``):
      ``jqat.gptq`` with the Hessian of the layer's inputs.
    * ``"awq"`` (``grid=20``, ``sample_rows=512``): ``jqat.awq`` with mean
      ``|x|`` of all batches and the output error measured on the first
      ``sample_rows`` input rows.
    * ``"smoothquant"`` (``alpha=0.5``): ``jqat.smooth_quant_scales`` from max
      ``|x|``, the kernel ``diag(s) W`` rounded to nearest; for w8a8 with
      static per-tensor activations.

  Costs of the two modes: see the module docstring (one pass and ``Σ K²``
  floats of Hessians for GPTQ; ``sequential``: one more pass per layer).

  Args:
    model: a linen model whose dots quantize through ``QatDotGeneral``.
    variables: its float (or QAT) variables.
    batches: an iterable of model inputs (a tuple is positional arguments);
      kept in a list, and read once per pass.
    method: one of ``METHODS``.
    rules: ``jqat.Rule``s selecting the layers (full-matched against the
      dot's path or its layer's, first match wins): a rule with a weight config
      selects (that config must be the layer's own), one with ``weight=None``
      leaves the layer to round-to-nearest, unmatched layers too. None: all.
    sequential: each layer's statistics from a forward through the already
      quantized layers before it.
    apply_kwargs: passed to ``model.apply``.
    **options: the method's options (above).

  Returns:
    Serving variables, ``convert``'s layout, with ``serving/<dot>/input_scale``
    where AWQ or SmoothQuant scale an input.

  Raises:
    ValueError: an unknown method (listing the allowed ones), no batches, a
      rule that matches no layer, a rule whose weight config is not the
      layer's, or converted variables.
    TypeError: an option the method does not take.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> layer = jqat.linen.QatDense(4, weight_config="int4", activation_config=None)
    >>> x = jax.random.normal(jax.random.key(0), (64, 16))
    >>> v = layer.init(jax.random.key(1), x)
    >>> served = jqat.linen.ptq(layer, v, [x], method="gptq")
    >>> served["serving"]["quant"]["rhs"]["values"].dtype, layer.apply(served, x).shape
    (dtype('uint8'), (64, 4))
  """
  qlinen._check_model(model, _WHERE)
  variables = {k: v for k, v in qlinen._check_variables(variables, _WHERE).items() if k != qlinen.CALIB}
  if qlinen.SERVE in variables:
    raise ValueError(f"{_WHERE}: the variables hold a 'serving' collection; ptq takes float (or QAT) variables.")
  opts = _check_options(method, options)
  if not isinstance(batches, Iterable) or isinstance(batches, (jax.Array, np.ndarray)):
    raise TypeError(f"{_WHERE}: batches must be an iterable of model inputs, got {type(batches).__name__}.")
  batches = list(batches)
  if not batches:
    raise ValueError(f"{_WHERE}: got no batches; ptq needs calibration inputs.")
  apply_kwargs = dict(apply_kwargs or {})
  sample_rows = opts.get("sample_rows", 0)
  layers: dict = {}
  order: list = []
  step = _pass(model, apply_kwargs, layers, order, method == "gptq", sample_rows)
  stats = _statistics(step, variables, {}, batches, sample_rows)
  order = list(order)
  for path in order:
    if layers[path].kernel is not None:
      layers[path].kernel = stats[path]["kernel"]
  chosen = _select(layers, rules)

  results = {}  # path -> (QTensor, s, statistics)
  if sequential:
    # Every chosen layer is replaced in every pass (its float kernel and s = 1 until its turn): one compile.
    replace = {p: (layers[p].kernel, jnp.ones((layers[p].kernel.shape[0],), jnp.float32)) for p in chosen}
    for n, path in enumerate([p for p in order if p in chosen]):
      if n:
        stats = _statistics(step, variables, replace, batches, sample_rows)
      q, s = _quantize_layer(method, layers[path].kernel, stats[path], layers[path].rhs_config, opts)
      results[path] = (q, s, stats[path])
      k = layers[path].kernel.shape[0]
      replace = {**replace, path: (dequantize(q), jnp.ones((k,), jnp.float32) if s is None else s)}
  else:
    for path in chosen:
      q, s = _quantize_layer(method, layers[path].kernel, stats[path], layers[path].rhs_config, opts)
      results[path] = (q, s, stats[path])

  # Frozen min-max ranges for every static activation, then convert; then the method's kernels replace RTN's.
  flat_stats = traverse_util.flatten_dict(dict(variables.get(qlinen.STATS, {})))
  for path, layer in layers.items():
    cfg = layer.lhs_config
    if cfg is None or layer.rhs_config is None or common.is_dynamic(cfg) or common.uses_lsq(cfg):
      continue
    entry = results[path][2] if path in results else stats[path]
    s = results[path][1] if path in results else None
    qp = _activation_range(entry, s, cfg)
    old = flat_stats.get(path + ("lhs",))
    base = old if old is not None else common.init_activation_stats(cfg, 0.9)
    flat_stats[path + ("lhs",)] = common.freeze_activation_stats(base, qp)
  if flat_stats:
    variables[qlinen.STATS] = traverse_util.unflatten_dict(flat_stats)
  first = batches[0] if isinstance(batches[0], tuple) else (batches[0],)
  # Jitted: eagerly, the model's one forward would compile each small op on its own.
  served = jax.jit(lambda v, *a: qlinen.convert(model, v, *a, **apply_kwargs))(variables, *first)
  flat = traverse_util.flatten_dict(dict(served[qlinen.SERVE]))
  for path, (q, s, _) in results.items():
    layer = layers[path]
    flat[path + ("rhs",)] = common.serving_weight(q, (0,), layer.lhs_config)
    if s is not None:
      flat[path + (qlinen.INPUT_SCALE,)] = jnp.asarray(s, jnp.float32)
  served[qlinen.SERVE] = traverse_util.unflatten_dict(flat)
  return served


def served_kernel(served: Mapping, path: Sequence[str], config: QatConfig, shape) -> tuple[QTensor, jax.Array | None]:
  """The ``QTensor`` and input divisor (or None) that ``served`` holds for the dot at ``path``."""
  node = served[qlinen.SERVE]
  for p in path:
    node = node[p]
  wcfg = common.operand_config(config, len(shape), (0,), ())
  return common.weight_from_serving(node["rhs"], wcfg, shape), node.get(qlinen.INPUT_SCALE)

"""``quantize_model``: quantize a linen model you did not write, by rules, keeping its parameter tree.

``quantize_model(model, rules)`` returns a module that shares ``model``'s
scope (``nn.share_scope``): ``init`` and ``apply`` take the same arguments and
give the same parameters, so a float checkpoint loads unchanged. While it
runs, an ``nn.intercept_methods`` interceptor sees every module method call
of the model and, for each op a rule matches:

* ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv``, ``nn.Embed``
  (lookup and ``attend``) run as ``QatDense``, ``QatDenseGeneral``,
  ``QatEinsum``, ``QatConv``, ``QatEmbed``, bound to the stock layer's own
  scope (same parameters; statistics under that layer's path). The
  projections of ``nn.MultiHeadDotProductAttention`` are ``DenseGeneral``\\ s.
* Any other module method that calls ``jnp.einsum``, ``jnp.dot``,
  ``jnp.matmul`` or ``lax.dot_general`` with one of that module's own
  parameters (by identity with the value its ``self.param`` returned, so a
  parameter cast to another dtype first is not recognised), in either operand
  position, runs that contraction through ``QatDotGeneral`` with the
  parameter as the weight. ``x @ w`` counts as ``jnp.matmul``, and a
  transpose of a 2-D parameter made in the same call (``w.T``,
  ``jnp.transpose``, ``jnp.swapaxes``) as the parameter itself, contracted
  with the transposed dimension numbers.
* An integer gather of a module's own 2-D parameter (``table[ids]``,
  ``table[(ids,)]``, ``jnp.take(table, ids, axis=0)``) is an ``"embed"``
  op: the rows, quantized per row, as ``QatEmbed`` looks them up. A table
  that was looked up and is then contracted over its feature axis
  (``jnp.dot(x, table.T)``, gemma's tied logits) is an ``"attend"`` op:
  the same per-row table serves both, and ``convert`` stores it once
  (``serving/<module>/<param>_quant/rhs``) and drops the float one. The
  lookup has to run first in the model's call (or in an earlier call of the
  same quantized model, e.g. ``init``) for the contraction to be known as
  tied; before that it is a ``"dot"``.

  These functions (and the array methods ``.T``, ``@`` and ``[]``, through
  the functions jax's array methods call) are routed only while a quantized
  model runs, and only for the thread running it: the routing looks at a
  thread-local stack of the module calls in progress, so other threads and
  other models see the plain functions.

Transforms: a model written elsewhere lists only ``params`` in ``nn.scan``'s
``variable_axes``; while a quantized model runs, flax's split of those axes
(``flax.core.lift._split_in_out_axes``) adds the statistics, calibration and
serving collections on the parameters' axis, so they stack per layer.
``nn.jit`` caches a trace by a fingerprint of the module's fields and state
(``flax.linen.transforms._module_fingerprint``), which knows nothing of
interceptors; the run's token joins that fingerprint, so a quantized trace is
never reused for the float model, nor the other way round. Both are flax
0.12 internals, routed as the contraction functions are (this thread, this
call); ``nn.remat``, ``nn.share_scope`` and ``setup()`` need nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import lift, meta
from flax.core import scope as core_scope
from flax.linen import transforms as linen_transforms
from jax._src.numpy import indexing as jnp_indexing
from jax._src.numpy import lax_numpy as jnp_lax_numpy
from jax._src.numpy import tensor_contractions as jnp_contractions

from jqat._src import report as report_lib
from jqat._src import rules as rules_lib
from jqat._src.config import QatConfig
from jqat._src.einsum import parse_einsum
from jqat._src.flax import common
from jqat._src.flax.linen import CALIB, REPLACED, SERVE, STATS, QatConv, QatConvGeneralDilated, QatDense, QatDotGeneral
from jqat._src.flax.linen_layers import (
  QatDenseGeneral,
  QatEinsum,
  QatEmbed,
  einsum_dot,
  mark_replaced,
  quantized_lookup,
  stock_fields,
)
from jqat._src.rules import Rule

_OWN_TYPES = (QatDotGeneral, QatConvGeneralDilated, QatDense, QatConv, QatEinsum, QatEmbed, QatDenseGeneral)


class OpRecord(NamedTuple):
  """One op seen while the quantized model ran (a ``report`` row before bytes are counted)."""

  path: str
  op: str
  lhs_shape: tuple
  rhs_shape: tuple
  rule: int | None
  weight: QatConfig | None
  activation: QatConfig | None
  param: tuple | None  # the weight's path in ``params``
  name: str = ""  # the op within its module (a module may contract one parameter more than once)


class _Registry:
  """What every run of one quantized model has seen; equal to every other registry, so never part of a hash."""

  _tokens = itertools.count()

  def __init__(self):
    self.token = f"__jqat_quantized_{next(self._tokens)}"
    self.matched: set[int] = set()
    self.paths: set[str] = set()
    self.tables: set[tuple] = set()  # parameters looked up by an integer gather (embedding tables)

  def __eq__(self, other):
    return isinstance(other, _Registry)

  def __hash__(self):
    return 0

  def __repr__(self):
    return "_Registry()"


class _Run:
  """The state of one quantized model's call: its rules and the ops seen."""

  def __init__(self, rules, registry, token):
    self.rules = rules
    self.registry = registry
    self.token = token
    self.records: list[OpRecord] = []

  def rule(self, path: str, op: str) -> int | None:
    return rules_lib.match(self.rules, path, op)

  def record(self, rec: OpRecord):
    self.records.append(rec)
    if rec.rule is not None:
      self.registry.matched.add(rec.rule)
    self.registry.paths.add(rec.path)


class _Frame:
  """A module method call in progress; ``run`` is None for calls whose contractions are never routed."""

  __slots__ = ("module", "run", "uses", "views")

  def __init__(self, module, run):
    self.module = module
    self.run = run
    self.uses: dict[str, int] = {}
    # id(value) -> (parameter name, perm, value): transposes of a 2-D parameter made in this call; the value
    # is kept so that its id is not reused while the call runs.
    self.views: dict[int, tuple[str, tuple, Any]] = {}


class _Local(threading.local):
  def __init__(self):
    self.runs: list[_Run] = []
    self.frames: list[_Frame] = []
    self.collectors: list[list] = []
    self.nonce: str | None = None


_local = _Local()


def _path(module) -> str:
  return "/".join(str(p) for p in module.scope.path)


# --- routing jnp.einsum / jnp.dot / jnp.matmul / lax.dot_general ----------------------

_route_lock = threading.Lock()
_route_depth = 0
_ORIGINALS: dict[tuple[Any, str], Any] = {}


def _own_params(module) -> dict[int, tuple[str, Any]]:
  params = module.variables.get("params", {})
  out = {}
  for name, value in params.items():
    if isinstance(value, Mapping):
      continue  # a submodule's parameters
    value = meta.unbox(value)
    out[id(value)] = (name, value)
  return out


def _param_of(frame: _Frame, own, v):
  """``(name, perm)`` when ``v`` is the module's own parameter (perm None) or a transpose of one made here."""
  e = own.get(id(v))
  if e is not None and e[1] is v:
    return e[0], None
  e = frame.views.get(id(v))
  if e is not None and e[2] is v:
    return e[0], e[1]
  return None


def _weight_operand(frame: _Frame, a, b):
  """``(name, weight_first, perm)`` when ``a`` or ``b`` is one of the module's own parameters or its transpose.

  ``perm``: the operand is ``jnp.transpose(parameter, perm)``; None for the parameter itself.
  """
  own = _own_params(frame.module)
  found = _param_of(frame, own, b)
  if found is not None:
    return found[0], False, found[1]
  found = _param_of(frame, own, a)
  if found is not None:
    return found[0], True, found[1]
  return None


def _untransposed_equation(equation: str, weight_first: bool, perm: tuple) -> str | None:
  """``equation`` with the weight operand ``transpose(P, perm)`` replaced by ``P`` itself; None with ``...``."""
  ins, out = equation.replace(" ", "").split("->")
  a, b = ins.split(",")
  w = a if weight_first else b
  if "." in w or len(w) != len(perm):
    return None
  p = [""] * len(w)
  for i, c in enumerate(w):
    p[perm[i]] = c
  w = "".join(p)
  return f"{w},{b}->{out}" if weight_first else f"{a},{w}->{out}"


def _letters(n, start=0):
  return "".join(chr(ord("a") + start + i) for i in range(n))


def _dot_equation(kind: str, a_ndim: int, b_ndim: int) -> str | None:
  """The einsum equation of ``jnp.dot`` / ``jnp.matmul`` for these ranks, or None when it has none here."""
  if a_ndim == 0 or b_ndim == 0:
    return None
  if kind == "matmul" and a_ndim > 2 and b_ndim > 2:
    return None  # broadcast batch axes: left to jnp.matmul
  a = _letters(a_ndim)
  if b_ndim == 1:
    b = a[-1]
    out = a[:-1]
  elif kind == "matmul" and a_ndim > 2:
    b = a[-1] + "z"
    out = a[:-1] + "z"
  elif kind == "matmul" and b_ndim > 2 and a_ndim >= 1:
    b = _letters(b_ndim - 2, 10) + a[-1] + "z"
    out = (b[:-2] + a[:-1] + "z") if a_ndim == 2 else b[:-2] + "z"
  else:
    b = _letters(b_ndim - 2, 10) + a[-1] + "z"
    out = a[:-1] + b[:-2] + "z"
  return f"{a},{b}->{out}"


def _routed_contraction(frame: _Frame, kind: str, a, b, *, equation=None, dimension_numbers=None, **kw):
  """The contraction through ``QatDotGeneral`` when a rule quantizes it; None to call the original."""
  found = _weight_operand(frame, a, b)
  if found is None:
    return None
  pname, weight_first, perm = found
  x = b if weight_first else a
  module, run = frame.module, frame.run
  w = a if weight_first else b
  if perm is not None:
    # A transpose of the parameter: contract the parameter itself, with the transposed dimension numbers.
    w = meta.unbox(module.get_variable("params", pname))
    if dimension_numbers is not None:
      (lc, rc), (lb, rb) = dimension_numbers
      if weight_first:
        lc, lb = tuple(perm[i] for i in lc), tuple(perm[i] for i in lb)
      else:
        rc, rb = tuple(perm[i] for i in rc), tuple(perm[i] for i in rb)
      dimension_numbers = ((lc, rc), (lb, rb))
    else:
      equation = _untransposed_equation(equation, weight_first, perm)
      if equation is None:
        return None
  path = _path(module)
  param = (*module.scope.path, pname)
  if dimension_numbers is not None:
    (lc, rc), (lb, rb) = dimension_numbers
    dims = dimension_numbers if not weight_first else ((rc, lc), (rb, lb))
  else:
    dims = parse_einsum(equation, jnp.ndim(x), jnp.ndim(w), weight_first=weight_first).dimension_numbers
  # A looked-up table contracted over its features (``x @ table.T``) gives tied logits: one table, per row.
  tied = jnp.ndim(w) == 2 and tuple(dims[0][1]) == (1,) and not dims[1][1] and param in _tables(run)
  op = "attend" if tied else ("einsum" if kind == "einsum" else "dot")
  i = run.rule(path, op)
  rule = None if i is None else run.rules[i]
  quantized = rule is not None and not rule.is_float
  wcfg = rule.weight if quantized else None
  acfg = rule.activation if quantized else None
  if tied:
    _check_tied(run, path, wcfg)
  wcfg_axes = common.operand_config(wcfg, jnp.ndim(w), dims[0][1], dims[1][1]) if wcfg is not None else None
  if tied:
    name = f"{pname}_quant"  # the lookup's name: both serve from one table
  else:
    n = frame.uses.get(pname, 0)
    frame.uses[pname] = n + 1
    name = f"{pname}_quant" + (f"_{n}" if n else "")
  run.record(OpRecord(path, op, tuple(jnp.shape(x)), tuple(jnp.shape(w)), i, wcfg_axes, acfg, param, name))
  if not quantized:
    return None
  dot = QatDotGeneral(lhs_config=acfg, rhs_config=wcfg, parent=module.scope.push(name, reuse=True))
  mark_replaced(module.scope, pname, jnp.shape(w), jnp.result_type(w))
  kw = {k: v for k, v in kw.items() if k in ("precision", "preferred_element_type") and v is not None}
  if equation is not None:
    return einsum_dot(dot, equation, x, w, weight_first=weight_first, **kw)
  y = dot(x, w, dims, **kw)
  if weight_first:
    # dot_general's output is (batch, lhs free, rhs free); the call asked for (batch, weight free, input free).
    nb = len(dims[1][0])
    nx = jnp.ndim(x) - len(dims[0][0]) - nb
    perm = tuple(range(nb)) + tuple(range(nb + nx, y.ndim)) + tuple(range(nb, nb + nx))
    y = jnp.transpose(y, perm)
  return y


def _tables(run: _Run) -> set:
  return run.registry.tables


def _check_tied(run: _Run, path: str, w_attend):
  _, w_embed, _ = _rule_configs(run, path, "embed")
  if w_attend != w_embed:
    raise ValueError(
      f"the tied embedding at {path!r} has one table for the lookup and attend, but the rules give it two "
      f"weight formats: {report_lib.describe(w_embed)} for 'embed' and {report_lib.describe(w_attend)} for "
      "'attend'. Give both ops the same weight config (e.g. jqat.Rule(pattern, ops=('embed', 'attend'), ...))."
    )


def _routed_lookup(frame: _Frame, pname: str, table, ids, gather):
  """An integer gather of the module's own 2-D parameter as a quantized lookup; None to call the original."""
  module, run = frame.module, frame.run
  path = _path(module)
  param = (*module.scope.path, pname)
  run.registry.tables.add(param)
  i, w, _ = _rule_configs(run, path, "embed")
  cfg = common.operand_config(w, 2, (1,), ()) if w is not None else None
  shapes = tuple(jnp.shape(ids)), tuple(jnp.shape(table))
  run.record(OpRecord(path, "embed", *shapes, i, cfg, None, param, f"{pname}_quant"))
  if cfg is None:
    return None
  # Run without routing: the lookup's own gathers are not the model's.
  lookup = functools.partial(quantized_lookup, module.scope, pname, table, ids, cfg, gather)
  return _call_in_frame(_Frame(module, None), lookup, (), {})


def _integer_ids(v) -> bool:
  return isinstance(v, jax.Array | np.ndarray) and jnp.issubdtype(v.dtype, jnp.integer)


def _current_frame() -> _Frame | None:
  frames = _local.frames
  frame = frames[-1] if frames else None
  return None if frame is None or frame.run is None else frame


def _make_gather_route(kind: str, original):
  # ``table[ids]`` / ``table[(ids,)]`` (jax's __getitem__ calls indexing.rewriting_take) and
  # ``jnp.take(table, ids, axis=0)`` of a module's own 2-D parameter: an embedding lookup.
  @functools.wraps(original)
  def routed(*args, **kwargs):
    frame = _current_frame()
    if frame is None or len(args) < 2:
      return original(*args, **kwargs)
    table, ids = args[0], args[1]
    if kind == "getitem":
      if len(args) != 2 or kwargs:
        return original(*args, **kwargs)
      if isinstance(ids, tuple) and len(ids) == 1:
        ids = ids[0]
    else:
      axis = args[2] if len(args) > 2 else kwargs.get("axis")
      if axis != 0 or len(args) > 3 or set(kwargs) - {"axis"}:
        return original(*args, **kwargs)
    if not (_integer_ids(ids) and jnp.ndim(table) == 2):
      return original(*args, **kwargs)
    found = _param_of(frame, _own_params(frame.module), table)
    if found is None or found[1] is not None:
      return original(*args, **kwargs)
    y = _routed_lookup(frame, found[0], table, ids, lambda t: original(t, *args[1:], **kwargs))
    return original(*args, **kwargs) if y is None else y

  return routed


def _make_transpose_route(kind: str, original):
  # ``w.T``, ``w.transpose()``, ``jnp.transpose(w)``, ``jnp.swapaxes(w, 0, 1)`` of a module's own 2-D parameter:
  # the output is remembered as that parameter, transposed, so a contraction with it still finds the weight.
  @functools.wraps(original)
  def routed(*args, **kwargs):
    y = original(*args, **kwargs)
    frame = _current_frame()
    if frame is None or not args or jnp.ndim(args[0]) != 2 or jnp.ndim(y) != 2:
      return y
    found = _param_of(frame, _own_params(frame.module), args[0])
    if found is None:
      return y
    pname, perm0 = found
    if kind == "transpose":
      axes = args[1] if len(args) > 1 else kwargs.get("axes")
      perm = (1, 0) if axes is None else tuple(int(i) % 2 for i in axes)
    else:
      a1 = args[1] if len(args) > 1 else kwargs.get("axis1")
      a2 = args[2] if len(args) > 2 else kwargs.get("axis2")
      perm = (0, 1) if int(a1) % 2 == int(a2) % 2 else (1, 0)
    if perm0 is not None:
      perm = tuple(perm0[i] for i in perm)
    frame.views[id(y)] = (pname, perm, y)
    return y

  return routed


def _make_route(kind: str, original):
  @functools.wraps(original)
  def routed(*args, **kwargs):
    frames = _local.frames
    frame = frames[-1] if frames else None
    if frame is None or frame.run is None:
      return original(*args, **kwargs)
    y = None
    if kind == "einsum":
      if len(args) == 3 and isinstance(args[0], str) and not kwargs.get("_dot_general") and not kwargs.get("out"):
        y = _routed_contraction(frame, kind, args[1], args[2], equation=args[0], **kwargs)
    elif kind == "dot_general":
      dn = args[2] if len(args) > 2 else kwargs.get("dimension_numbers")
      if len(args) >= 2 and dn is not None:
        rest = {k: v for k, v in kwargs.items() if k != "dimension_numbers"}
        y = _routed_contraction(frame, kind, args[0], args[1], dimension_numbers=dn, **rest)
    elif len(args) == 2:
      eq = _dot_equation(kind, jnp.ndim(args[0]), jnp.ndim(args[1]))
      if eq is not None:
        y = _routed_contraction(frame, kind, args[0], args[1], equation=eq, **kwargs)
    return original(*args, **kwargs) if y is None else y

  return routed


_ROUTED = (
  (jnp, "einsum", "einsum"),
  (jnp, "dot", "dot"),
  (jnp, "matmul", "matmul"),
  (jax.lax, "dot_general", "dot_general"),
  # ``x @ w``: jax's array operators call tensor_contractions.matmul, not jnp.matmul.
  (jnp_contractions, "matmul", "matmul"),
  (jnp, "transpose", "transpose"),
  (jnp_lax_numpy, "transpose", "transpose"),  # ``.T`` and ``.transpose()``
  (jnp, "swapaxes", "swapaxes"),
  (jnp_lax_numpy, "swapaxes", "swapaxes"),  # ``.swapaxes()``
  (jnp, "take", "take"),
  (jnp_indexing, "rewriting_take", "getitem"),  # ``table[ids]``
  (lift, "_split_in_out_axes", "axes"),
  (linen_transforms, "_module_fingerprint", "fingerprint"),
)


def _make_fingerprint_route(original):
  # nn.jit keys its trace cache on this fingerprint of the module (fields and
  # state), which knows nothing of the interceptor; the run's token joins it,
  # so a quantized trace is never reused for the float model, nor the other
  # way round, nor across two quantized models.
  @functools.wraps(original)
  def routed(module):
    fingerprint = original(module)
    return (fingerprint, _local.runs[-1].token) if _local.runs else fingerprint

  return routed


@contextlib.contextmanager
def _routing():
  """Routes the functions of ``_ROUTED`` while at least one quantized model runs (any thread)."""
  global _route_depth
  missing = [f"{mod.__name__}.{attr}" for mod, attr, _ in _ROUTED if not hasattr(mod, attr)]
  if missing:
    raise RuntimeError(
      f"quantize_model needs {', '.join(missing)}, which this flax / jax version lacks (made for flax 0.12): "
      "without them nn.scan and nn.jit would run the quantized model wrongly."
    )
  with _route_lock:
    if _route_depth == 0:
      for mod, attr, kind in _ROUTED:
        original = getattr(mod, attr)
        _ORIGINALS[(mod, attr)] = original
        setattr(mod, attr, _ROUTE_MAKERS.get(kind, functools.partial(_make_route, kind))(original))
    _route_depth += 1
  try:
    yield
  finally:
    with _route_lock:
      _route_depth -= 1
      if _route_depth == 0:
        for mod, attr, _ in _ROUTED:
          setattr(mod, attr, _ORIGINALS.pop((mod, attr)))


# --- nn.scan: the quantization collections join variable_axes ------------------------


def _covered(axes: Mapping, col: str) -> bool:
  return any(core_scope.in_filter(f, col) for f in axes)


def _with_quant_axes(variable_axes):
  """``variable_axes`` plus the statistics, calibration and serving collections, on the parameters' axis."""
  axes = dict(variable_axes or {})
  axis = axes.get("params", 0)
  if not isinstance(axis, int):
    axis = 0
  for col in (STATS, CALIB, SERVE):
    if not _covered(axes, col):
      axes[col] = axis
  return axes


def _make_axes_route(original):
  # ``lift.scan`` (and ``lift.vmap``) split their variable_axes with this
  # function on every call; while a quantized model runs in this thread, the
  # collections of the quantized ops are scanned too (stacked per layer),
  # since a model written elsewhere lists only "params".
  @functools.wraps(original)
  def routed(variable_axes, *args, **kwargs):
    if _local.runs:
      variable_axes = _with_quant_axes(variable_axes)
    return original(variable_axes, *args, **kwargs)

  return routed


_ROUTE_MAKERS = {
  "axes": _make_axes_route,
  "fingerprint": _make_fingerprint_route,
  "transpose": functools.partial(_make_transpose_route, "transpose"),
  "swapaxes": functools.partial(_make_transpose_route, "swapaxes"),
  "take": functools.partial(_make_gather_route, "take"),
  "getitem": functools.partial(_make_gather_route, "getitem"),
}


# --- the interceptor ---------------------------------------------------------------


def _rule_configs(run: _Run, path: str, op: str):
  i = run.rule(path, op)
  rule = None if i is None else run.rules[i]
  if rule is None or rule.is_float:
    return i, None, None
  return i, rule.weight, rule.activation


def _in_features(x):
  return jnp.shape(x)[-1] if jnp.ndim(x) else 1


def _stock(run: _Run, m: nn.Module, method: str, args, kwargs, next_fun):
  """Runs a stock Flax layer as its jqat counterpart; None when ``m`` is not one."""
  t = type(m)
  path = _path(m)
  if method == "__call__" and t is nn.Dense and m.dot_general is None and m.dot_general_cls is None:
    i, w, a = _rule_configs(run, path, "dot")
    shape = (_in_features(args[0]), m.features)
    cfg = common.operand_config(w, 2, (0,), ())
    run.record(OpRecord(path, "dot", tuple(jnp.shape(args[0])), shape, i, cfg, a, (*m.scope.path, "kernel")))
    if w is None and a is None:
      return next_fun(*args, **kwargs)
    layer = QatDense(**stock_fields(m), weight_config=w, activation_config=a, parent=m.scope)
    y = layer(*args, **kwargs)
    if w is not None and m.has_variable("params", "kernel"):
      k = meta.unbox(m.get_variable("params", "kernel"))
      mark_replaced(m.scope, "kernel", jnp.shape(k), jnp.result_type(k))
    return y
  if method == "__call__" and t is nn.DenseGeneral and m.dot_general is None and m.dot_general_cls is None:
    i, w, a = _rule_configs(run, path, "dot")
    kernel = m.get_variable("params", "kernel") if m.has_variable("params", "kernel") else None
    kshape = tuple(jnp.shape(meta.unbox(kernel))) if kernel is not None else ()
    axes = m.axis if isinstance(m.axis, Sequence) else (m.axis,)
    n_contract = len(axes)
    bdims = m.batch_dims if isinstance(m.batch_dims, Sequence) else (m.batch_dims,)
    cfg = w
    if w is not None and kshape:
      cfg = common.operand_config(
        w, len(kshape), tuple(range(len(bdims), len(bdims) + n_contract)), tuple(range(len(bdims)))
      )
    run.record(OpRecord(path, "dot", tuple(jnp.shape(args[0])), kshape, i, cfg, a, (*m.scope.path, "kernel")))
    if w is None and a is None:
      return next_fun(*args, **kwargs)
    layer = QatDenseGeneral(**stock_fields(m), weight_config=w, activation_config=a, parent=m.scope)
    return layer(*args, **kwargs)
  if method == "__call__" and t is nn.Einsum:
    i, w, a = _rule_configs(run, path, "einsum")
    eq = args[1] if len(args) > 1 else kwargs.get("einsum_str", m.einsum_str)
    cfg = w
    if w is not None and isinstance(eq, str) and "->" in eq:
      (_, rc), (_, rb) = parse_einsum(eq.replace(" ", ""), jnp.ndim(args[0]), len(m.shape)).dimension_numbers
      cfg = common.operand_config(w, len(m.shape), rc, rb)
    run.record(
      OpRecord(path, "einsum", tuple(jnp.shape(args[0])), tuple(m.shape), i, cfg, a, (*m.scope.path, "kernel"))
    )
    if w is None and a is None:
      return next_fun(*args, **kwargs)
    return QatEinsum(**stock_fields(m), weight_config=w, activation_config=a, parent=m.scope)(*args, **kwargs)
  if method == "__call__" and t is nn.Conv and m.conv_general_dilated is None and m.conv_general_dilated_cls is None:
    i, w, a = _rule_configs(run, path, "conv")
    kernel = m.get_variable("params", "kernel") if m.has_variable("params", "kernel") else None
    kshape = tuple(jnp.shape(meta.unbox(kernel))) if kernel is not None else ()
    cfg = w.replace(channel_axis=-1) if w is not None and w.per_channel else w
    run.record(OpRecord(path, "conv", tuple(jnp.shape(args[0])), kshape, i, cfg, a, (*m.scope.path, "kernel")))
    if w is None and a is None:
      return next_fun(*args, **kwargs)
    y = QatConv(**stock_fields(m), weight_config=w, activation_config=a, parent=m.scope)(*args, **kwargs)
    if w is not None and m.has_variable("params", "kernel"):
      k = meta.unbox(m.get_variable("params", "kernel"))
      mark_replaced(m.scope, "kernel", jnp.shape(k), jnp.result_type(k))
    return y
  if t is nn.Embed and method in ("__call__", "attend"):
    i, w, a = _rule_configs(run, path, "embed")
    shape = (m.num_embeddings, m.features)
    table_cfg = w.replace(channel_axis=0) if w is not None and w.per_channel else w
    j, w_att, act = _rule_configs(run, path, "attend")
    if method == "__call__":
      run.record(
        OpRecord(path, "embed", tuple(jnp.shape(args[0])), shape, i, table_cfg, None, (*m.scope.path, "embedding"))
      )
    else:
      if w_att != w:
        raise ValueError(
          f"the tied embedding at {path!r} has one table for the lookup and attend, but the rules give it two "
          f"weight formats: {report_lib.describe(w)} for 'embed' and {report_lib.describe(w_att)} for 'attend'. "
          "Give both ops the same weight config (e.g. jqat.Rule(pattern, ops=('embed', 'attend'), ...))."
        )
      run.record(
        OpRecord(path, "attend", tuple(jnp.shape(args[0])), shape, j, table_cfg, act, (*m.scope.path, "embedding"))
      )
    if w is None:
      return next_fun(*args, **kwargs)
    # One twin per stock instance: its setup reserves names in the shared scope.
    layer = m.__dict__.get("_jqat_twin")
    if layer is None:
      layer = QatEmbed(**stock_fields(m), weight_config=w, activation_config=act, parent=m.scope)
      object.__setattr__(m, "_jqat_twin", layer)
    return getattr(layer, method)(*args, **kwargs)
  return None


def _interceptor(next_fun, args, kwargs, context):
  run = _local.runs[-1] if _local.runs else None
  m = context.module
  if run is None or m.scope is None:
    return next_fun(*args, **kwargs)
  method = context.method_name
  if isinstance(m, _OWN_TYPES) or method == "setup":
    return _call_in_frame(_Frame(m, None), next_fun, args, kwargs)
  frame = _Frame(m, None)
  y = _call_in_frame(frame, lambda *a, **k: _stock(run, m, method, a, k, next_fun), args, kwargs)
  if y is not None:
    return y
  return _call_in_frame(_Frame(m, run), next_fun, args, kwargs)


def _call_in_frame(frame, fn, args, kwargs):
  _local.frames.append(frame)
  try:
    return fn(*args, **kwargs)
  finally:
    _local.frames.pop()


@contextlib.contextmanager
def _quantized_run(rules, registry):
  token = registry.token if _local.nonce is None else registry.token + _local.nonce
  run = _Run(rules, registry, token)
  _local.runs.append(run)
  try:
    with _routing(), nn.intercept_methods(_interceptor):
      yield run
  finally:
    _local.runs.pop()
    for c in _local.collectors:
      c.extend(run.records)


def _placeholders(variables: Mapping) -> Mapping:
  """``variables`` with a zero stand-in for each float parameter ``convert`` dropped.

  Stock layers (``nn.DenseGeneral``, ``nn.Conv``, a module's own einsum)
  still read their parameter; the quantized op ignores its values and serves
  from the ``serving`` collection, so under ``jax.jit`` the zeros are never
  materialised.
  """
  serving = variables.get(SERVE) if isinstance(variables, Mapping) else None
  if not serving:
    return variables
  flat = traverse_util.flatten_dict(dict(serving))
  params = traverse_util.flatten_dict(dict(variables.get("params", {})))
  added = False
  for path, marker in flat.items():
    if len(path) >= 2 and path[-2] == REPLACED:
      target = path[:-2] + (path[-1],)
      if target not in params:
        params[target] = jnp.zeros(jnp.shape(marker)[:-1], marker.dtype)
        added = True
  if not added:
    return variables
  return {**variables, "params": traverse_util.unflatten_dict(params)}


class QuantizedModel(nn.Module):
  """A linen model run with jqat's quantized ops where ``rules`` say so; made by ``quantize_model``.

  Attributes:
    model: the float model (unchanged; it shares this module's scope).
    rules: the rules, first match wins.
  """

  model: nn.Module
  rules: tuple[Rule, ...] = rules_lib.DEFAULT_RULES
  registry: _Registry = dataclasses.field(default_factory=_Registry)

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs):
    return self._run("__call__", *args, **kwargs)

  def _run(self, method_name: str, *args, **kwargs):
    with _quantized_run(self.rules, self.registry) as run:
      y = getattr(self.model, method_name)(*args, **kwargs)
    if self.is_initializing():
      paths = self.registry.paths | {r.path for r in run.records}
      rules_lib.check_all_matched(self.rules, self.registry.matched, paths)
    return y

  @nn.nowrap
  def _method(self, method):
    if method is None or getattr(method, "_jqat_method", False):
      return method
    name = method if isinstance(method, str) else getattr(method, "__name__", None)
    if name is None or not hasattr(type(self.model), name):
      raise ValueError(f"method={method!r}: the quantized model runs methods of {type(self.model).__name__} by name.")

    def run(module, *a, **k):
      return module._run(name, *a, **k)

    run._jqat_method = True
    return run

  @nn.nowrap
  def init_with_output(self, rngs, *args, method=None, **kwargs):
    return super().init_with_output(rngs, *args, method=self._method(method), **kwargs)

  @nn.nowrap
  def apply(self, variables, *args, method=None, **kwargs):
    return super().apply(_placeholders(variables), *args, method=self._method(method), **kwargs)


def quantize_model(model: nn.Module, rules: Sequence[Rule] | Rule | None = None) -> QuantizedModel:
  """A module that runs ``model`` with jqat's quantized ops wherever a rule matches.

  ``init`` and ``apply`` take the same arguments as ``model``'s and give the
  same parameter tree (float checkpoints load unchanged); the quantized ops
  add the ``quant_stats`` collection (activation ranges) and, with
  ``convert``, ``serving``. ``calibrate``, ``freeze`` and ``convert`` work on
  it as on a model built from jqat layers, and ``apply`` serves from
  converted variables (under ``jax.jit``).

  Applied with ``{"params": ...}`` alone, each activation is quantized with
  its batch's own range (nothing is recorded), as before any statistics exist.

  Args:
    model: any linen module (unbound).
    rules: ``jqat.Rule``\\ s, the first whose pattern full-matches an op's
      module path (and whose ``ops`` include its kind) wins; an op no rule
      matches stays float. None: ``jqat``'s defaults (int8 weights per
      channel and int8 activations per tensor for every dot; embeddings
      weight-only, one scale per row).

  Returns:
    The quantized model.

  Raises:
    ValueError: at ``init``, when a rule matches no op (listing the paths of
      the ops the model has).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jqat
    >>> class Mlp(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name="head")(nn.relu(nn.Dense(8, name="fc")(x)))
    >>> int8 = jqat.QatConfig(bits="int8")
    >>> qm = jqat.linen.quantize_model(Mlp(), [jqat.Rule("head"), jqat.Rule(".*", weight=int8, activation=int8)])
    >>> x = jnp.ones((4, 3))
    >>> v = qm.init(jax.random.key(0), x)
    >>> jax.tree.structure(v["params"]) == jax.tree.structure(Mlp().init(jax.random.key(0), x)["params"])
    True
    >>> sorted(v["quant_stats"])
    ['fc']
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantize_model needs a flax.linen Module, got {type(model).__name__}")
  if model.scope is not None:
    raise ValueError("quantize_model needs an unbound module (the model itself, not one inside init/apply)")
  return QuantizedModel(model=model, rules=rules_lib.normalize_rules(rules))


def _bytes_rows(records: Sequence[OpRecord], rules, variables: Mapping) -> list[report_lib.OpReport]:
  params = traverse_util.flatten_dict(dict(variables.get("params", {})))
  serving = traverse_util.flatten_dict(dict(variables.get(SERVE, {}) or {}))
  seen_params: set = set()
  rows = []
  # A scan body is traced more than once, a shared layer runs more than once: one row per op.
  records = list({(r.path, r.op, r.name, r.lhs_shape, r.rhs_shape): r for r in records}.values())
  for r in records:
    n_seen = math.prod(r.rhs_shape) if r.rhs_shape else 0
    stored = meta.unbox(params.get(r.param)) if r.param is not None else None
    if stored is not None:
      n_stored, itemsize = math.prod(jnp.shape(stored)), jnp.dtype(stored.dtype).itemsize
    elif r.param is not None and (*r.param[:-1], REPLACED, r.param[-1]) in serving:
      marker = serving[(*r.param[:-1], REPLACED, r.param[-1])]  # converted: the marker has the float shape
      n_stored, itemsize = math.prod(jnp.shape(marker)[:-1]), jnp.dtype(marker.dtype).itemsize
    else:
      n_stored, itemsize = n_seen, 4
    copies = n_stored // n_seen if n_seen and n_stored % n_seen == 0 else 1
    if r.param in seen_params:
      float_b = serve_b = 0  # a tied weight: counted at its first use
    else:
      seen_params.add(r.param)
      float_b = n_stored * itemsize
      serve_b = copies * report_lib.weight_serving_bytes(r.rhs_shape, r.weight) if r.weight is not None else float_b
    rows.append(
      report_lib.OpReport(
        path=r.path,
        op=r.op,
        lhs_shape=tuple(r.lhs_shape),
        rhs_shape=tuple(r.rhs_shape),
        rule=None if r.rule is None else rules[r.rule].pattern,
        weight=report_lib.describe(r.weight),
        activation=report_lib.describe(r.activation),
        float_bytes=int(float_b),
        serving_bytes=int(serve_b),
      )
    )
  return rows


_report_nonces = itertools.count()


def report(qmodel: QuantizedModel, variables: Mapping, *args, print_table: bool = True, **kwargs):
  """Every matmul-like op of a quantized model: path, kind, shapes, rule, formats, float and served bytes.

  Traces ``qmodel.apply(variables, *args, **kwargs)`` abstractly (nothing is
  computed) and lists each op in call order. Bytes are those of the weight
  (all layers of an ``nn.scan`` stack together); a weight used twice (a tied
  embedding's lookup and ``attend``) is counted at its first use.

  Args:
    qmodel: a model from ``quantize_model``.
    variables: its variables (``params`` at least).
    *args: a sample input.
    print_table: print ``jqat``'s table of the rows.
    **kwargs: passed to ``apply``.

  Returns:
    A list of ``OpReport`` rows.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jqat
    >>> qm = jqat.linen.quantize_model(nn.Dense(4))
    >>> x = jnp.ones((2, 8))
    >>> rows = jqat.linen.report(qm, qm.init(jax.random.key(0), x), x, print_table=False)
    >>> [(r.op, r.rhs_shape, r.float_bytes, r.serving_bytes) for r in rows]
    [('dot', (8, 4), 128, 64)]
  """
  if not isinstance(qmodel, QuantizedModel):
    raise TypeError(f"report needs a model from jqat.linen.quantize_model, got {type(qmodel).__name__}")
  records: list[OpRecord] = []
  _local.collectors.append(records)
  old, _local.nonce = _local.nonce, f"_report{next(_report_nonces)}"
  try:
    # Statistics mutable: variables without them (params alone) trace as well.
    jax.eval_shape(lambda v, a: qmodel.apply(v, *a, mutable=[STATS], **kwargs), variables, args)
  finally:
    _local.nonce = old
    _local.collectors.remove(records)
  rows = _bytes_rows(records, qmodel.rules, variables)
  if print_table:
    print(report_lib.format_table(rows))
  return rows

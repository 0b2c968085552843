"""Linen ``QatEinsum`` and ``QatEmbed``: the einsum and embedding layers of Flax, quantization-aware.

Both mirror the stock layer field for field (``nn.Einsum``, ``nn.Embed``) and
keep its parameters, so swapping the class keeps a float checkpoint loadable.
They quantize through ``QatDotGeneral`` and therefore calibrate, convert and
serve as ``QatDense`` does.

* ``QatEinsum``: the activation is always the left operand of the dot, the
  kernel the right one, whatever the equation's order; ``...`` is allowed and
  the output is transposed back to the equation's order. Per-channel kernel
  scales sit on the kernel's non-contracting axes.
* ``QatEmbed``: one table, quantized per row (int8 or int4), serves both the
  lookup and ``attend`` (tied logits, ``query @ table.T``): a row is both a
  looked-up vector and one output channel of the logits. Serving stores only
  that table.

``convert`` drops a parameter that a layer names under ``serving/.../replaced``
(a zero-size marker array whose shape, less its last axis, and dtype are the
parameter's), so it works for any parameter name.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import errors
from flax.core import meta

from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.einsum import parse_einsum
from jqat._src.fake_quant import fake_quant
from jqat._src.flax import common
from jqat._src.flax.linen import CALIB, REPLACED, SERVE, QatDotGeneral, _autoname_as, _check_fields, _where
from jqat._src.formats import compute_dtype
from jqat._src.qtensor import quantize
from jqat._src.rules import DEFAULT_EMBEDDING


def mark_replaced(scope, name: str, shape, dtype) -> None:
  """Records in ``serving`` that ``convert`` may drop the float parameter ``name`` of ``scope``.

  The marker is a zero-size array of shape ``shape + (0,)``: it costs no bytes,
  survives ``flax.serialization`` and stacks like the parameter under
  ``nn.scan`` (its shape, less the last axis, is the parameter's).
  """
  if not scope.is_mutable_collection(SERVE) or scope.get_flag("initializing", False):
    return
  marks = dict(scope.get_variable(SERVE, REPLACED, {}) or {})
  marks[name] = jnp.zeros((*shape, 0), dtype)
  scope.put_variable(SERVE, REPLACED, marks)


def einsum_dot(dot: nn.Module, equation: str, x, w, *, weight_first: bool = False, **dot_kwargs):
  """``jnp.einsum(equation, x, w)`` (or ``(w, x)`` when ``weight_first``) through a dot_general module.

  ``dot`` is a ``QatDotGeneral`` (or anything with its call signature); ``x``
  goes in as its lhs, ``w`` as its rhs, and the result is transposed back to
  the equation's output order. ``w`` may be a ``jax.ShapeDtypeStruct`` when
  ``dot`` serves from converted variables.
  """
  dims = parse_einsum(equation, jnp.ndim(x), len(w.shape), weight_first=weight_first)
  if dims.rhs_sum_axes:
    raise ValueError(
      f"einsum {equation!r}: weight axes {dims.rhs_sum_axes} are summed away before the contraction; "
      "quantize the summed weight instead (this equation has no per-channel form)."
    )
  if dims.lhs_sum_axes:
    x = jnp.sum(x, axis=dims.lhs_sum_axes)
  y = dot(x, w, dims.dimension_numbers, **dot_kwargs)
  return y if dims.out_perm == tuple(range(y.ndim)) else jnp.transpose(y, dims.out_perm)


class QatEinsum(nn.Einsum):
  """``flax.linen.Einsum`` with quantization-aware training; same fields, parameters and shapes.

  Adds ``weight_config`` (default int8, symmetric, per-channel on the kernel's
  non-contracting axes), ``activation_config`` (default int8, asymmetric,
  per-tensor), ``mode`` and ``momentum``, as ``QatDense``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jqat
    >>> x = jnp.ones((2, 3, 4))
    >>> layer = jqat.linen.QatEinsum((4, 2, 5), "btd,dnh->btnh")
    >>> v = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, v["params"]) == jax.tree.map(jnp.shape, nn.Einsum((4, 2, 5), "btd,dnh->btnh").init(
    ...     jax.random.key(0), x)["params"])
    True
    >>> layer.apply(v, x).shape
    (2, 3, 2, 5)
  """

  weight_config: QatConfig | None = common.DEFAULT_WEIGHT_CONFIG
  activation_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG
  mode: str = "qat"
  momentum: float = 0.9

  def __post_init__(self):
    _check_fields(self, "weight_config", "activation_config")
    _autoname_as(self, nn.Einsum)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, einsum_str: str | None = None):
    where = _where(self)
    einsum_str = nn.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
      raise ValueError(f"{where}: einsum_str must be explicit ('->') with exactly two operands, got {einsum_str!r}.")
    inputs = jnp.asarray(inputs)
    quant = QatDotGeneral(
      lhs_config=self.activation_config,
      rhs_config=self.weight_config,
      mode=self.mode,
      momentum=self.momentum,
      name="quant",
    )
    serving = not self.is_initializing() and not self.has_variable("params", "kernel")
    if serving:
      kernel = jax.ShapeDtypeStruct(tuple(self.shape), jnp.dtype(self.dtype or inputs.dtype))
    else:
      kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
      if self.weight_config is not None and self.mode != "float":
        mark_replaced(self.scope, "kernel", jnp.shape(kernel), jnp.result_type(kernel))
    bias, bias_shape = None, None
    if self.use_bias:
      bias_shape, bias_shape_b = self._get_bias_shape(einsum_str, inputs, kernel)
      bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
    if serving:
      inputs, bias = self.promote_dtype(inputs, bias, dtype=self.dtype)
    else:
      inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    try:
      y = einsum_dot(
        quant, einsum_str, inputs, kernel, precision=self.precision, preferred_element_type=self.preferred_element_type
      )
    except ValueError as e:
      raise ValueError(f"{where}: input shape {inputs.shape}, kernel shape {tuple(kernel.shape)}: {e}") from None
    if bias is not None:
      y += jnp.reshape(bias, bias_shape_b)
    return y


def _gather_rows(entry, config: QatConfig, ids, num_rows: int, dtype):
  """Rows ``ids`` of a served table, dequantized: ``(q - z) * s`` as ``dequantize`` computes it."""
  values = entry["values"]
  if config.bits.is_packed:
    # Two rows per byte along axis 0 (``pack_int4``): row 2i is the low nibble of byte row i.
    b = jnp.take(values, ids // 2, axis=0)
    nib = jnp.where((ids % 2 == 0)[..., None], b & 0xF, b >> 4).astype(jnp.int8)
    q = (nib ^ 8) - 8
  else:
    q = jnp.take(values, ids, axis=0)
  cd = compute_dtype(jnp.dtype(dtype))
  scale = jnp.take(jnp.broadcast_to(entry["scale"], (num_rows, 1)), ids, axis=0).astype(cd)
  zp = jnp.take(jnp.broadcast_to(entry["zero_point"], (num_rows, 1)), ids, axis=0).astype(cd)
  return ((q.astype(cd) - zp) * scale).astype(dtype)


def quantized_lookup(scope, name: str, table, ids, config: QatConfig, gather):
  """Rows ``ids`` of ``table`` (a parameter of ``scope`` named ``name``), one int table per row, as ``QatEmbed``.

  ``gather(t)`` looks the rows up in ``t`` as the model's own code does
  (``t[ids]``, ``jnp.take``). QAT fake-quantizes the rows (straight-through
  gradient to the table); ``convert`` stores the table in
  ``serving/<name>_quant/rhs``, where a tied ``x @ table.T`` through a
  ``QatDotGeneral`` named ``<name>_quant`` finds it too, and marks the float
  table replaced; serving gathers and dequantizes the stored rows.
  """
  sub = scope.push(f"{name}_quant", reuse=True)
  converting = scope.is_mutable_collection(SERVE) and not scope.get_flag("initializing", False)
  if not converting and sub.has_variable(SERVE, "rhs"):
    return _gather_rows(sub.get_variable(SERVE, "rhs"), config, ids, table.shape[0], table.dtype)
  if scope.is_mutable_collection(CALIB):
    return gather(table)
  if converting:
    mark_replaced(scope, name, table.shape, table.dtype)
    if not sub.has_variable(SERVE, "rhs"):
      qp = qparams_lib.qparams_from_array(jax.lax.stop_gradient(table), config)
      sub.put_variable(SERVE, "rhs", common.serving_weight(quantize(table, qp, config), (1,), None))
  if config.per_channel and config.group_size is None:
    # A row's scale depends on that row alone: quantize only the rows looked up.
    rows = gather(table)
    flat = jnp.reshape(rows, (-1, table.shape[-1]))  # one row per looked-up id, a scalar id included
    row_cfg = config.replace(channel_axis=(0,))
    flat = fake_quant(flat, qparams_lib.qparams_from_array(jax.lax.stop_gradient(flat), row_cfg), row_cfg)
    return jnp.reshape(flat, rows.shape)
  qp = qparams_lib.qparams_from_array(jax.lax.stop_gradient(table), config)
  return gather(fake_quant(table, qp, config))


class QatEmbed(nn.Embed):
  """``flax.linen.Embed`` with a quantized table for the lookup and for ``attend`` (tied logits).

  Same fields and parameter (``embedding``, ``(num_embeddings, features)``) as
  ``nn.Embed``, plus:

  * ``weight_config``: the table's format (default int8, symmetric), one scale
    per row when ``per_channel`` (the row is both the looked-up vector and
    the logit's output channel, so one quantized table serves both).
  * ``activation_config``: the input of ``attend`` (default int8, asymmetric,
    per-tensor); None makes ``attend`` weight-only. The lookup has no
    activation operand.

  QAT fake-quantizes the looked-up rows (straight-through gradient to the
  table) and ``attend`` runs ``QatDotGeneral`` with the table as the weight.
  ``convert`` stores the table once (int8 or packed int4 values and per-row
  scales) in ``serving/<path>/attend/rhs`` and drops the float table.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> emb = jqat.linen.QatEmbed(16, 4)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> tied_lm = lambda m, ids: m.attend(m(ids))  # lookup, then tied logits
    >>> v = emb.init(jax.random.key(0), ids, method=tied_lm)
    >>> v["params"]["embedding"].shape, emb.apply(v, ids).shape
    ((16, 4), (1, 3, 4))
    >>> emb.apply(v, ids, method=tied_lm).shape
    (1, 3, 16)
  """

  weight_config: QatConfig | None = DEFAULT_EMBEDDING
  activation_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG
  mode: str = "qat"
  momentum: float = 0.9

  def __post_init__(self):
    _check_fields(self, "weight_config", "activation_config")
    _autoname_as(self, nn.Embed)
    super().__post_init__()

  def setup(self):
    if self.is_initializing() or self.has_variable("params", "embedding"):
      try:
        self.embedding = self.param(
          "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype
        )
      except errors.NameInUseError:
        # Bound to the scope of an nn.Embed whose setup made the table (quantize_model).
        self.embedding = meta.unbox(self.get_variable("params", "embedding"))
    else:
      self.embedding = None  # serving: the table is in the serving collection
    self.attend_quant = QatDotGeneral(
      lhs_config=self.activation_config,
      rhs_config=self._table_config(),
      mode=self.mode,
      momentum=self.momentum,
      name="attend",
    )

  def _table_config(self) -> QatConfig | None:
    cfg = self.weight_config
    if cfg is None or not cfg.per_channel:
      return cfg
    return cfg.replace(channel_axis=0)

  def _quantized(self) -> bool:
    return self.weight_config is not None and self.mode != "float"

  def _served(self):
    """The served table entry, or None (QAT, or converting now)."""
    converting = self.is_mutable_collection(SERVE) and not self.is_initializing()
    if converting or not self._quantized():
      return None
    variables = self.variables.get(SERVE, {}).get("attend", {})
    return variables.get("rhs")

  def _need_table(self, where: str):
    if self.embedding is None:
      raise ValueError(f"{where}: no 'embedding' parameter and no served table; convert with jqat.linen.convert.")
    return self.embedding

  def __call__(self, inputs):
    where = _where(self)
    inputs = jnp.asarray(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"{where}: the lookup needs integer ids, got dtype {inputs.dtype}.")
    out_dtype = self.dtype or self.param_dtype
    entry = self._served()
    if entry is not None:
      return _gather_rows(entry, self._table_config(), inputs, self.num_embeddings, out_dtype)
    table = self._need_table(where)
    (table,) = self.promote_dtype(table, dtype=self.dtype, inexact=False)
    if not self._quantized() or self.is_mutable_collection(CALIB):
      return jnp.take(table, inputs, axis=0)
    cfg = self._table_config()
    if self.is_mutable_collection(SERVE) and not self.is_initializing():
      self._write_table(table, None)
    if cfg.per_channel and cfg.group_size is None:
      # A row's scale depends on that row alone: quantize only the rows looked up.
      rows = jnp.take(table, inputs, axis=0)
      row_cfg = cfg.replace(channel_axis=tuple(range(rows.ndim - 1))) if rows.ndim > 1 else cfg
      return fake_quant(rows, qparams_lib.qparams_from_array(jax.lax.stop_gradient(rows), row_cfg), row_cfg)
    qp = qparams_lib.qparams_from_array(jax.lax.stop_gradient(table), cfg)
    return jnp.take(fake_quant(table, qp, cfg), inputs, axis=0)

  def _write_table(self, table, lhs_config):
    cfg = self._table_config()
    mark_replaced(self.scope, "embedding", table.shape, table.dtype)
    if self.attend_quant.has_variable(SERVE, "rhs"):
      return  # attend stored it already (with the sums its activation needs)
    qp = qparams_lib.qparams_from_array(jax.lax.stop_gradient(table), cfg)
    entry = common.serving_weight(quantize(table, qp, cfg), (1,), lhs_config)
    self.attend_quant.put_variable(SERVE, "rhs", entry)

  def attend(self, query):
    """Tied logits ``query @ table.T`` with the quantized table (the same one the lookup uses)."""
    where = _where(self)
    query = jnp.asarray(query)
    if query.ndim < 1 or query.shape[-1] != self.features:
      raise ValueError(f"{where}: attend needs a query with {self.features} features last, got shape {query.shape}.")
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    if self._served() is not None:
      (query,) = self.promote_dtype(query, dtype=self.dtype)
      table = jax.ShapeDtypeStruct((self.num_embeddings, self.features), query.dtype)
      return self.attend_quant(query, table, dims)
    table = self._need_table(where)
    query, table = self.promote_dtype(query, table, dtype=self.dtype)
    if not self._quantized():
      return jax.lax.dot_general(query, table, dims)
    if self.is_mutable_collection(SERVE) and not self.is_initializing():
      mark_replaced(self.scope, "embedding", table.shape, table.dtype)
    return self.attend_quant(query, table, dims)


class QatDenseGeneral(nn.DenseGeneral):
  """``flax.linen.DenseGeneral`` quantizing through ``QatDotGeneral``; same fields and parameters.

  ``convert`` drops its float kernel (through the ``replaced`` marker); serve
  it through ``quantize_model``'s ``apply``, which stands a zero placeholder
  in for the dropped kernel so that ``nn.DenseGeneral``'s own code still runs.
  """

  weight_config: QatConfig | None = common.DEFAULT_WEIGHT_CONFIG
  activation_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG
  mode: str = "qat"
  momentum: float = 0.9

  def __post_init__(self):
    _check_fields(self, "weight_config", "activation_config")
    if self.dot_general_cls is None and self.dot_general is None:
      object.__setattr__(
        self,
        "dot_general_cls",
        functools.partial(
          QatDotGeneral,
          lhs_config=self.activation_config,
          rhs_config=self.weight_config,
          mode=self.mode,
          momentum=self.momentum,
        ),
      )
    _autoname_as(self, nn.DenseGeneral)
    super().__post_init__()

  def __call__(self, inputs):
    y = super().__call__(inputs)
    if self.weight_config is not None and self.mode != "float" and self.has_variable("params", "kernel"):
      k = meta.unbox(self.get_variable("params", "kernel"))
      mark_replaced(self.scope, "kernel", jnp.shape(k), jnp.result_type(k))
    return y


def stock_fields(module: nn.Module) -> dict:
  """The constructor fields of a bound module, without ``parent`` and ``name``."""
  return {
    f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.init and f.name not in ("parent", "name")
  }

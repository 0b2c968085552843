"""Flax linen layers: ``QatDotGeneral`` and the layers built on it.

``QatDotGeneral`` is the one mechanism: any Flax layer that accepts a
``dot_general_cls`` (``nn.Dense``, ``nn.DenseGeneral``, the projections of
``nn.MultiHeadDotProductAttention``) quantizes through it, and ``QatDense`` and
``QatConv`` are thin layers on top. The left operand is the activation, the
right one the kernel.

Collections:
  * ``params``: the same parameters as the stock layer (plus learned scales
    when a config uses ``estimator="lsq"``).
  * ``quant_stats``: activation ranges (moving average, or frozen by
    calibration). Updated only when the collection is mutable and the module
    is not initializing, as ``nn.BatchNorm`` does with ``batch_stats``.
  * ``quant_calib``: calibration statistics. When this collection is mutable
    (or a layer has ``mode="calibrate"``), layers observe their float inputs
    into it and compute in float.
  * ``serving``: written by ``convert``: quantized kernels with their format
    and layout, and frozen activation ranges. A layer that holds serving
    variables serves from them, whatever its mode.

Modes (``common.MODES``, shared with NNX): ``"float"`` (no quantization; the
layer keeps its float kernel through ``convert``), ``"calibrate"`` (float
compute, inputs observed into ``quant_calib``) and ``"qat"`` (default).
``"serve"`` is a deprecated alias of ``"qat"``.

Applied with ``{"params": ...}`` alone (no ``quant_stats``, not mutable, as
``TrainState.apply_fn`` is in flax's examples), a QAT layer quantizes each
activation with that batch's own range, with the same straight-through
gradient: exactly what it does before its first statistics exist.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import meta
from flax.linen import module as _linen_module
from jax import lax

from jqat._src import qparams as qparams_lib
from jqat._src.calibration import stats as calibration
from jqat._src.calibration.search import check_percentile
from jqat._src.config import CalibMethod, QatConfig
from jqat._src.fake_quant import fake_quant
from jqat._src.flax import common
from jqat._src.formats import QuantBits
from jqat._src.qparams import QParams
from jqat._src.qtensor import quantize

STATS = "quant_stats"
SERVE = "serving"
OWNS_KERNEL = "owns_kernel"
KEEPS_FLOAT = "keeps_float"
# ``serving/<layer>/replaced/<param>``: a zero-size marker naming a float
# parameter that the layer serves without (any name: "kernel", "embedding",
# gemma's "w"); ``convert`` drops that parameter. Shape: the parameter's + (0,).
REPLACED = "replaced"
CALIB = "quant_calib"
# An injected op's note to convert: which float parameter of its parent it quantized (removed by convert).
DROPS_PARAM = "drops_param"
# ``serving/<dot>/input_scale``: per-input-channel divisor ``s`` (K,) of AWQ / SmoothQuant, applied before the dot.
INPUT_SCALE = "input_scale"
_BITS = tuple(QuantBits)


def _where(module: nn.Module) -> str:
  if getattr(module, "scope", None) is None:  # not bound yet: at construction
    return type(module).__name__ + (f" {module.name!r}" if isinstance(module.name, str) else "")
  path = "/".join(str(p) for p in module.scope.path)
  return f"{type(module).__name__} at '/{path}'"


def _as_array(x, what: str, where: str) -> jax.Array:
  try:
    return jnp.asarray(x)
  except TypeError:
    raise TypeError(f"{where}: {what} must be a numeric array, got {type(x).__name__}.") from None


def _check_fields(module: nn.Module, weight_field: str, activation_field: str) -> None:
  """Validates and normalizes a layer's configs, mode and momentum, at construction.

  A format name is shorthand for the default config with those bits
  (``weight_config="int4"``); anything else that is not a ``QatConfig`` or
  None raises ``TypeError``.
  """
  where = _where(module)
  for field, default in (
    (weight_field, common.DEFAULT_WEIGHT_CONFIG),
    (activation_field, common.DEFAULT_ACTIVATION_CONFIG),
  ):
    object.__setattr__(module, field, common.as_config(getattr(module, field), default, field, where))
  object.__setattr__(module, "mode", common.check_mode(module.mode, where))
  m = module.momentum
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
    raise ValueError(f"{where}: momentum={m!r} is invalid; allowed: a number in [0, 1).")


def _encode_config(config: QatConfig) -> dict:
  # The calibration collection records the activation format as arrays so
  # that ``freeze`` can finalize it from the variables alone.
  return {
    "bits": jnp.asarray(_BITS.index(config.bits), jnp.int32),
    "symmetric": jnp.asarray(config.symmetric),
    "narrow_range": jnp.asarray(config.narrow_range),
  }


def _decode_config(code: Mapping) -> QatConfig:
  return QatConfig(
    bits=_BITS[int(code["bits"])], symmetric=bool(code["symmetric"]), narrow_range=bool(code["narrow_range"])
  )


def _autoname_as(module: nn.Module, stock: type) -> None:
  """Names an unnamed submodule as Flax names ``stock`` (``Dense_0``, ``Conv_1``, ...).

  Swapping ``nn.Dense`` for ``QatDense`` then keeps every parameter path, so
  float checkpoints load into the quantized model unchanged.
  """
  parent = module.parent
  if parent is _linen_module._unspecified_parent:
    # Inside a compact method the parent is the module being called; Flax
    # resolves it from this stack right after, in Module.__post_init__.
    stack = _linen_module._context.module_stack
    parent = stack[-1] if stack else None
  if module.name is not None or not isinstance(parent, nn.Module) or parent._state.in_setup:
    return
  prefix = stock.__name__
  cursor = parent._state.autoname_cursor.get(prefix, 0)
  object.__setattr__(module, "name", f"{prefix}_{cursor}")
  parent._state.autoname_cursor[prefix] = cursor + 1


class ConvertedParam(struct.PyTreeNode, meta.AxisMetadata):
  """The place of a float parameter that ``convert`` replaced by serving variables; it holds no bytes.

  A stock Flax layer with ``QatDotGeneral`` (or ``QatConvGeneralDilated``)
  injected still reads its parameter when it serves: this box unboxes to
  zeros of the parameter's shape (dead code under ``jax.jit``: the op
  serves from the ``serving`` collection and never reads them). Its one
  leaf, ``marker``, is a zero-size array of shape ``shape + (0,)``, so the
  variables survive ``flax.serialization``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from jqat._src.flax.linen import ConvertedParam
    >>> p = ConvertedParam(jnp.zeros((3, 4, 0)))
    >>> p.shape, p.unbox().shape, p.marker.nbytes
    ((3, 4), (3, 4), 0)
  """

  marker: jax.Array

  @property
  def shape(self) -> tuple:
    return tuple(jnp.shape(self.marker)[:-1])

  def unbox(self):
    return jnp.zeros(self.shape, jnp.result_type(self.marker))

  def replace_boxed(self, val):
    return self  # the parameter's values are gone; nothing to update

  def add_axis(self, index, params):
    return self

  def remove_axis(self, index, params):
    return self


class _QuantOperands:
  """Operand quantization shared by ``QatDotGeneral`` and ``QatConvGeneralDilated``."""

  def _calibrating(self) -> bool:
    """Calibration observes (and computes in float) when asked by mode or by a mutable ``quant_calib``."""
    if self.is_initializing() or self.is_mutable_collection(SERVE):
      return False
    return self.mode == "calibrate" or self.is_mutable_collection(CALIB)

  def _observe(self, x, config: QatConfig | None, where: str) -> None:
    # Dynamic (per-token) and weight-only activations have no range to calibrate.
    if config is None or common.is_dynamic(config):
      return
    if not self.is_mutable_collection(CALIB):
      raise ValueError(
        f"{where}: mode='calibrate' observes activations into the 'quant_calib' collection; apply the model "
        "with mutable=['quant_calib'] (as jqat.linen.calibrate does)."
      )
    x = lax.stop_gradient(x)
    calib = self.variable(
      CALIB,
      "lhs",
      lambda: {
        "stats": calibration.init_stats((), config, CalibMethod.ENTROPY),
        "config": _encode_config(config),
      },
    )
    calib.value = {**calib.value, "stats": calibration.update_stats(calib.value["stats"], x)}

  def _lhs_qparams(self, x, config: QatConfig) -> QParams:
    return self._lhs_qparams_and_mark(x, config)[0]

  def _lhs_qparams_and_mark(self, x, config: QatConfig, contracting=None) -> tuple[QParams, jax.Array | None]:
    """The activation's QParams, and its rows' non-finite mark when its range reduction gives it, else None."""
    if common.uses_lsq(config):
      init = qparams_lib.qparams_from_array(lax.stop_gradient(x), config)
      scale = self.param("lhs_scale", lambda _: init.scale)
      zp = self.param("lhs_zero_point", lambda _: init.zero_point) if not config.symmetric else init.zero_point
      return QParams(scale, zp), None
    if common.is_dynamic(config):
      return common.dynamic_activation_qparams(x, config, contracting)
    if not self.has_variable(STATS, "lhs") and not self.is_mutable_collection(STATS):
      # Applied with params alone: the batch's own range, as before the first statistics.
      return common.activation_qparams(x, None, config, update=False)[0], None
    stats = self.variable(STATS, "lhs", common.init_activation_stats, config, self.momentum)
    update = self.is_mutable_collection(STATS) and not self.is_initializing()
    qp, new, mark = common.activation_qparams(x, stats.value, config, update=update, contracting=contracting)
    if update:
      stats.value = new
    return qp, mark

  def _write_serving(self, rhs, rhs_qp, contracting, lhs_cfg, rhs_cfg, where):
    """Stores the quantized kernel and the activation's frozen range in the ``serving`` collection.

    ``contracting``: the kernel's contracting axes, for the column sums an
    asymmetric activation needs in a dot; None for a conv (which centres the
    activation instead).
    """
    wq = quantize(rhs, rhs_qp, rhs_cfg)
    self.put_variable(SERVE, "rhs", common.serving_weight(wq, contracting or (), lhs_cfg if contracting else None))
    if lhs_cfg is None or common.is_dynamic(lhs_cfg):
      return  # weight-only, or activations quantized per token at serving time
    if common.uses_lsq(lhs_cfg):
      scale, zp = self.get_variable("params", "lhs_scale"), self.get_variable("params", "lhs_zero_point", None)
      qp = QParams(scale, zp if zp is not None else jnp.zeros_like(scale))
    else:
      qp = common.serving_activation_qparams(self.get_variable(STATS, "lhs"), lhs_cfg, where)
    self.put_variable(SERVE, "lhs", common.serving_activation(qp, lhs_cfg))

  def _keeps_float(self) -> None:
    """Tells ``convert`` that this jqat layer deliberately serves in float (nothing to convert)."""
    if self.is_mutable_collection(SERVE) and not self.is_initializing():
      self.put_variable(SERVE, KEEPS_FLOAT, jnp.ones((), bool))

  def _parent_params(self) -> dict:
    parent = self.parent
    if not isinstance(parent, nn.Module):
      return {}
    return {k: v for k, v in parent.variables.get("params", {}).items() if not isinstance(v, Mapping)}

  def _note_parent_param(self, rhs) -> None:
    """At convert, tells convert which float parameter of the parent layer ``rhs`` is (found by identity).

    A stock layer with this op injected reads its parameter itself; an
    operand that is a computed copy (cast to another dtype, masked) matches
    none and its parameter stays.
    """
    for name, value in self._parent_params().items():
      if value is rhs:
        marks = dict(self.parent.get_variable(SERVE, DROPS_PARAM, {}) or {})
        marks[name] = jnp.zeros((0,), bool)
        self.parent.put_variable(SERVE, DROPS_PARAM, marks)
        return

  def _is_stand_in(self, rhs) -> bool:
    """Whether ``rhs`` is the zero stand-in of a parameter convert dropped (so its values are not the kernel)."""
    return any(
      isinstance(v, ConvertedParam) and v.shape == tuple(jnp.shape(rhs)) for v in self._parent_params().values()
    )

  def _served_weight(self, rhs_cfg, rhs_shape, lhs_cfg, where):
    wq = common.weight_from_serving(self.get_variable(SERVE, "rhs"), rhs_cfg, rhs_shape, where)
    lhs_qp = common.activation_from_serving(self.get_variable(SERVE, "lhs", None), lhs_cfg, where)
    return wq, lhs_qp

  def _rhs_qparams(self, w, config: QatConfig) -> QParams:
    init = qparams_lib.qparams_from_array(lax.stop_gradient(w), config)
    if common.uses_lsq(config):
      scale = self.param("rhs_scale", lambda _: init.scale)
      zp = self.param("rhs_zero_point", lambda _: init.zero_point) if not config.symmetric else init.zero_point
      return QParams(scale, zp)
    return init


class QatDotGeneral(_QuantOperands, nn.Module):
  """A quantization-aware ``lax.dot_general`` for any Flax layer's ``dot_general_cls``.

  Fake-quantizes the activation (lhs) and the kernel (rhs) with straight-through
  gradients and computes the dot. Per-channel kernel scales sit on the kernel's
  output axes, per-group scales split the contraction axis (both derived from
  the dimension numbers). The activation's range comes from calibration when
  frozen, else from a moving average kept in ``quant_stats``, else (before any
  statistics exist, or when the layer is applied with ``{"params": ...}``
  alone) from the batch itself, with the same straight-through gradient.

  Attributes:
    lhs_config: activation config (default int8, asymmetric, per-tensor);
      ``None`` leaves it in float. A per-channel activation config means
      dynamic per-token ranges. A format name (``"int4"``) is shorthand for
      the default config with those bits; any other non-``QatConfig`` value
      raises ``TypeError``.
    rhs_config: kernel config (default int8, symmetric, per-channel); ``None``
      leaves it in float. Format names as for ``lhs_config``.
    mode: ``"qat"`` (default), ``"calibrate"`` (compute in float and observe
      the activation into ``quant_calib``, which must be mutable) or
      ``"float"`` (no quantization; the kernel stays float through
      ``convert``). ``"serve"`` is a deprecated alias of ``"qat"``: a layer
      serves whenever it holds serving variables.
    momentum: of the activation-range moving average, in [0, 1).
    out_sharding: where the output goes, as ``lax.dot_general``'s
      ``out_sharding`` (also accepted per call). Needed for a row-parallel
      layer on a mesh with Explicit axes, as for the float dot:
      ``nn.Dense(n, dot_general_cls=functools.partial(QatDotGeneral, out_sharding=P("data", None)))``.

  Examples:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, jqat
    >>> layer = nn.Dense(4, dot_general_cls=jqat.linen.QatDotGeneral)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> sorted(variables)
    ['params', 'quant_stats']
    >>> y, updates = layer.apply(variables, jnp.ones((2, 3)), mutable=["quant_stats"])
    >>> y.shape
    (2, 4)
  """

  lhs_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG
  rhs_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG
  mode: str = "qat"
  momentum: float = 0.9
  out_sharding: Any = None

  def __post_init__(self):
    _check_fields(self, "rhs_config", "lhs_config")
    super().__post_init__()

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    where = _where(self)
    out_sharding = self.out_sharding if out_sharding is None else out_sharding
    lhs = _as_array(lhs, "lhs (input)", where)
    if not isinstance(rhs, jax.ShapeDtypeStruct):
      rhs = _as_array(rhs, "rhs (kernel)", where)
    # A QatDense serving from converted variables has no float kernel: it
    # passes the kernel's shape alone.
    has_kernel = not isinstance(rhs, jax.ShapeDtypeStruct)
    rhs_shape = jnp.shape(rhs) if has_kernel else rhs.shape
    # A stock layer serving from converted variables passes the zero stand-in of its dropped kernel.
    has_kernel = has_kernel and not (self.has_variable(SERVE, "rhs") and self._is_stand_in(rhs))
    err = common.dot_shape_error(where, lhs.shape, rhs_shape, dimension_numbers)
    if err is not None:
      raise err
    (lc, rc), (lb, rb) = dimension_numbers
    lhs_cfg = common.operand_config(self.lhs_config, lhs.ndim, lc, lb)
    rhs_cfg = common.operand_config(self.rhs_config, len(rhs_shape), rc, rb)
    converting = self.is_mutable_collection(SERVE) and not self.is_initializing()

    def float_dot(a, b):
      return lax.dot_general(
        a,
        b,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
      )

    if self.mode == "float" or rhs_cfg is None:
      # Float, or activation-only: the float kernel stays and nothing is served from integers.
      self._keeps_float()
      if not has_kernel:
        raise ValueError(f"{where}: this layer computes with its float kernel, which the variables lack.")
      if self.mode == "float" or lhs_cfg is None:
        return float_dot(lhs, rhs)
    elif self.has_variable(SERVE, "rhs") and not (converting and has_kernel):
      # Serving; or converting already-converted variables, which keeps them.
      return self._serve(lhs, rhs_shape, dimension_numbers, lhs_cfg, rhs_cfg, preferred_element_type, out_sharding)
    if not has_kernel:
      raise ValueError(f"{where}: no kernel and no serving variables; convert the model with jqat.linen.convert.")
    rhs = jnp.asarray(rhs)

    if self._calibrating():
      self._observe(lhs, lhs_cfg, where)
      return float_dot(lhs, rhs)

    lhs_qp, lhs_mark = self._lhs_qparams_and_mark(lhs, lhs_cfg, lc) if lhs_cfg is not None else (None, None)
    rhs_qp = None
    if rhs_cfg is not None and (converting or common.uses_lsq(lhs_cfg) or common.uses_lsq(rhs_cfg)):
      rhs_qp = self._rhs_qparams(rhs, rhs_cfg)
    # Else the kernel's own range is taken in the dot, from the reduction that also finds its NaN columns.
    if converting and rhs_cfg is not None:
      self._write_serving(rhs, rhs_qp, rc, lhs_cfg, rhs_cfg, where)
      self._note_parent_param(rhs)
    if common.uses_lsq(lhs_cfg) or common.uses_lsq(rhs_cfg):
      lq = fake_quant(lhs, lhs_qp, lhs_cfg) if lhs_cfg is not None else lhs
      rq = fake_quant(rhs, rhs_qp, rhs_cfg) if rhs_cfg is not None else rhs
      return float_dot(lq, rq)
    return common.quantized_dot_general(
      lhs,
      rhs,
      dimension_numbers,
      lhs_qp,
      rhs_qp,
      lhs_cfg,
      rhs_cfg,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
      lhs_mark=lhs_mark,
    )

  def _serve(self, lhs, rhs_shape, dimension_numbers, lhs_cfg, rhs_cfg, preferred_element_type, out_sharding):
    where = _where(self)
    wq, lhs_qp = self._served_weight(rhs_cfg, rhs_shape, lhs_cfg, where)
    s = self.get_variable(SERVE, INPUT_SCALE, None)
    if s is not None:
      # AWQ / SmoothQuant (jqat.linen.ptq): the kernel holds diag(s) W, so the input is divided by s; one
      # elementwise op that XLA fuses into the activation's quantization (or the weight-only dot's operand).
      if jnp.shape(s) != (lhs.shape[-1],):
        raise ValueError(
          f"{where}: the serving input_scale has shape {jnp.shape(s)}, but the input has shape {lhs.shape} "
          f"(needs ({lhs.shape[-1]},))."
        )
      lhs = lhs / jnp.asarray(s).astype(lhs.dtype)
    return common.serve_dot_general(
      lhs,
      wq,
      dimension_numbers,
      lhs_qp,
      lhs_cfg,
      rhs_sums=self.get_variable(SERVE, "rhs").get("sums"),
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
    )


class QatDense(nn.Dense):
  """``flax.linen.Dense`` with quantization-aware training: swap the class, keep everything else.

  Same fields, parameter names and shapes as ``nn.Dense``, plus
  ``weight_config`` (default int8, symmetric, per-channel) and
  ``activation_config`` (default int8, asymmetric, per-tensor), ``mode`` and
  ``momentum`` (see ``QatDotGeneral``). By default it fake-quantizes its
  kernel and its input with straight-through gradients. A config may be given
  as a format name: ``QatDense(4, weight_config="int4")`` is the default
  weight config with int4 bits.

  ``variables = {"params": params}`` alone (flax's ``TrainState.apply_fn``
  pattern) quantizes each activation with its own batch's range, as a fresh
  model does; pass ``quant_stats`` (mutable while training) to keep moving
  averages, and calibrate before ``convert``. ``__call__`` also takes
  ``out_sharding`` (as ``nnx.Linear``) for row-parallel layers on a mesh with
  Explicit axes.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jqat
    >>> x = jnp.ones((2, 3))
    >>> float_vars = nn.Dense(4).init(jax.random.key(0), x)
    >>> qat_vars = jqat.linen.QatDense(4).init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, float_vars["params"]) == jax.tree.map(jnp.shape, qat_vars["params"])
    True
  """

  weight_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG
  activation_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG
  mode: str = "qat"
  momentum: float = 0.9

  def __post_init__(self):
    _check_fields(self, "weight_config", "activation_config")
    f = self.features
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
      raise TypeError(f"{_where(self)}: features={f!r} is invalid; allowed: a positive int.")
    _autoname_as(self, nn.Dense)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, out_sharding=None):
    """Applies the layer; ``out_sharding`` places the output as ``lax.dot_general``'s does (row-parallel layers)."""
    where = _where(self)
    if self.dot_general is not None or self.dot_general_cls is not None:
      raise ValueError(f"{where}: QatDense quantizes through QatDotGeneral; pass dot_general_cls to nn.Dense instead.")
    inputs = _as_array(inputs, "the input", where)
    if inputs.ndim < 1:
      raise ValueError(f"{where}: the input needs at least one axis, got shape {inputs.shape}.")
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    quant = QatDotGeneral(
      lhs_config=self.activation_config,
      rhs_config=self.weight_config,
      mode=self.mode,
      momentum=self.momentum,
      name="quant",
    )
    quantizes_kernel = self.mode != "float" and self.weight_config is not None
    if not self.is_initializing() and not self.has_variable("params", "kernel") and quantizes_kernel:
      # Serving: the kernel lives, quantized, in the "serving" collection.
      bias = self._serving_bias()
      inputs, bias = self.promote_dtype(inputs, bias, dtype=self.dtype)
      kernel = jax.ShapeDtypeStruct((inputs.shape[-1], self.features), inputs.dtype)
      y = quant(inputs, kernel, dims, precision=self.precision, out_sharding=out_sharding)
      return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)) if bias is not None else y
    if self.is_mutable_collection(SERVE) and not self.is_initializing() and quantizes_kernel:
      # Tells convert() that this layer's float kernel is not needed to serve.
      self.put_variable(SERVE, OWNS_KERNEL, jnp.ones((), bool))
    if self.has_variable("params", "kernel"):
      kshape = jnp.shape(meta.unbox(self.get_variable("params", "kernel")))
      if kshape[0] != inputs.shape[-1]:
        raise ValueError(
          f"{where}: input shape {inputs.shape} has {inputs.shape[-1]} features on its last axis, "
          f"but the kernel has shape {kshape} (expects {kshape[0]})."
        )
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = quant(inputs, kernel, dims, precision=self.precision, out_sharding=out_sharding)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  def _serving_bias(self):
    if not self.use_bias:
      return None
    held = self.get_variable("params", "bias")
    if held is not None and jnp.shape(meta.unbox(held)) != (self.features,):
      raise ValueError(
        f"{_where(self)}: the variables hold a bias of shape {jnp.shape(meta.unbox(held))}, but the layer has "
        f"features={self.features}; restore variables converted from a layer of this width."
      )
    return self.param("bias", self.bias_init, (self.features,), self.param_dtype)


class QatConvGeneralDilated(_QuantOperands, nn.Module):
  """A quantization-aware ``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated_cls=...)``.

  The same statistics and estimators as ``QatDotGeneral``; kernel scales are
  per output feature.
  """

  lhs_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG
  rhs_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG
  mode: str = "qat"
  momentum: float = 0.9

  def __post_init__(self):
    _check_fields(self, "rhs_config", "lhs_config")
    if common.is_dynamic(self.lhs_config):
      raise ValueError(f"{_where(self)}: conv activations are quantized per tensor; got lhs_config={self.lhs_config}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs):
    where = _where(self)
    conv = functools.partial(
      lax.conv_general_dilated,
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      **kwargs,
    )
    if self.mode == "float" or self.rhs_config is None:
      self._keeps_float()
      if self.mode == "float" or self.lhs_config is None:
        return conv(lhs, rhs)
    dn = kwargs.get("dimension_numbers")
    rhs_cfg = common.conv_kernel_config(self.rhs_config, lhs.shape, rhs.shape, dn)
    lhs_cfg = self.lhs_config

    converting = self.is_mutable_collection(SERVE) and not self.is_initializing()
    stand_in = self.has_variable(SERVE, "rhs") and self._is_stand_in(rhs)
    if self.has_variable(SERVE, "rhs") and (not converting or stand_in) and rhs_cfg is not None:
      wq, lhs_qp = self._served_weight(rhs_cfg, rhs.shape, lhs_cfg, where)
      return common.serve_conv(lhs, wq, lhs_qp, lhs_cfg, conv, dn)

    if self._calibrating():
      self._observe(lhs, lhs_cfg, where)
      return conv(lhs, rhs)
    lhs_q = lhs
    if lhs_cfg is not None:
      lhs_q = fake_quant(lhs, self._lhs_qparams(lhs, lhs_cfg), lhs_cfg)
    rhs_q = rhs
    if rhs_cfg is not None:
      rhs_qp = self._rhs_qparams(rhs, rhs_cfg)
      if converting:
        self._write_serving(rhs, rhs_qp, None, lhs_cfg, rhs_cfg, where)
        self._note_parent_param(rhs)
      rhs_q = fake_quant(rhs, rhs_qp, rhs_cfg)
    return conv(lhs_q, rhs_q)


class _OwnConv(functools.partial):
  """The ``conv_general_dilated_cls`` that ``QatConv`` builds from its own fields (rebuilt on ``clone``)."""


class QatConv(nn.Conv):
  """``flax.linen.Conv`` with quantization-aware training; same fields and parameters.

  ``weight_config``, ``activation_config``, ``mode`` and ``momentum`` are read
  when the layer is built, so ``clone(weight_config=...)`` takes effect.
  After ``convert`` the float kernel in ``params`` is a ``ConvertedParam``
  of no bytes (the conv serves from its quantized copy).

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> layer = jqat.linen.QatConv(8, (3, 3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    >>> variables["params"]["kernel"].shape
    (3, 3, 3, 8)
  """

  weight_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG
  activation_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG
  mode: str = "qat"
  momentum: float = 0.9

  def __post_init__(self):
    _check_fields(self, "weight_config", "activation_config")
    if common.is_dynamic(self.activation_config):
      raise ValueError(
        f"{_where(self)}: conv activations are quantized per tensor; got activation_config={self.activation_config}."
      )
    own = self.conv_general_dilated_cls is None or isinstance(self.conv_general_dilated_cls, _OwnConv)
    if own and self.conv_general_dilated is None:
      object.__setattr__(
        self,
        "conv_general_dilated_cls",
        _OwnConv(
          QatConvGeneralDilated,
          lhs_config=self.activation_config,
          rhs_config=self.weight_config,
          mode=self.mode,
          momentum=self.momentum,
        ),
      )
    _autoname_as(self, nn.Conv)
    super().__post_init__()

  def __call__(self, inputs):
    where = _where(self)
    inputs = _as_array(inputs, "the input", where)
    ks = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    if inputs.ndim < len(ks) + 1:
      raise ValueError(
        f"{where}: input shape {inputs.shape} needs {len(ks)} spatial axes and a feature axis for "
        f"kernel_size={self.kernel_size}."
      )
    if self.has_variable("params", "kernel"):
      kshape = jnp.shape(meta.unbox(self.get_variable("params", "kernel")))
      if len(kshape) >= 2 and inputs.shape[-1] // self.feature_group_count != kshape[-2]:
        raise ValueError(
          f"{where}: input shape {inputs.shape} has {inputs.shape[-1]} features on its last axis, but the kernel "
          f"has shape {kshape} (expects {kshape[-2] * self.feature_group_count})."
        )
    return super().__call__(inputs)


# --- whole-model calibration ----------------------------------------------------

# What freeze can finalize from the calibration histogram.
CALIB_METHODS = (CalibMethod.MINMAX, CalibMethod.PERCENTILE, CalibMethod.ENTROPY, CalibMethod.MSE)


def _check_method(method, where: str) -> CalibMethod:
  allowed = ", ".join(repr(m.value) for m in CALIB_METHODS) + " (or 'kl' for 'entropy')"
  try:
    m = CalibMethod(method)
  except (ValueError, TypeError):
    m = None
  if m not in CALIB_METHODS:
    raise ValueError(f"{where}: method={method!r} is invalid; allowed: {allowed}.")
  return m


def _check_percentile(percentile, where: str) -> float:
  # The calibration package's rule, (0, 100] with a hint for fractions, in this function's name.
  try:
    check_percentile(percentile)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{where}: {e}") from None
  return percentile


def _check_variables(variables, where: str) -> dict:
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"{where}: variables must be a mapping of collections (as model.init returns), got {type(variables).__name__}."
    )
  if "params" not in variables:
    raise ValueError(f"{where}: variables need a 'params' collection; got collections {sorted(variables)}.")
  return dict(variables)


def _check_model(model, where: str) -> None:
  if not isinstance(model, nn.Module):
    raise TypeError(f"{where}: model must be a flax.linen.Module, got {type(model).__name__}.")


def _is_calib_entry(node) -> bool:
  return isinstance(node, Mapping) and "stats" in node and "config" in node


def _freeze_entry(entry, old, method, percentile):
  """One activation's frozen statistics; entries stacked by ``nn.scan`` (leading axes) freeze layer by layer."""
  lead = jnp.shape(entry["config"]["bits"])
  config = _decode_config(jax.tree.map(lambda a: jnp.ravel(a)[0], entry["config"]))
  if old is None:
    old = jax.tree.map(lambda a: jnp.broadcast_to(a, lead + jnp.shape(a)), common.init_activation_stats(config, 0.9))
  frozen = []
  for i in np.ndindex(*lead):
    layer = functools.partial(jax.tree.map, lambda a, i=i: a[i])
    qp = calibration.finalize_stats(layer(entry["stats"]), config, method, percentile=percentile)
    frozen.append(common.freeze_activation_stats(layer(old), qp))
  if not lead:
    return frozen[0]
  return jax.tree.map(lambda *a: jnp.stack(a).reshape(lead + jnp.shape(a[0])), *frozen)


def freeze(
  variables: Mapping,
  method: CalibMethod | str = CalibMethod.PERCENTILE,
  *,
  percentile: float = 99.99,
) -> dict:
  """Turns the ``quant_calib`` statistics of ``variables`` into frozen activation ranges.

  Pure: returns new variables whose ``quant_stats`` hold the frozen QParams of
  every observed activation, without the ``quant_calib`` collection.

  Args:
    variables: a model's variables including a ``quant_calib`` collection
      (from applying it with ``mutable=["quant_calib"]``).
    method: ``"minmax"``, ``"percentile"``, ``"entropy"`` (alias ``"kl"``)
      or ``"mse"``, or the ``CalibMethod``.
    percentile: for PERCENTILE, in percent: (0, 100].

  Returns:
    The variables with frozen ranges.

  Raises:
    ValueError: without a ``quant_calib`` collection, or for a method or
      percentile outside what is allowed (listed in the message).
  """
  where = "jqat.linen.freeze"
  method = _check_method(method, where)
  percentile = _check_percentile(percentile, where)
  if not isinstance(variables, Mapping):
    raise TypeError(f"{where}: variables must be a mapping of collections, got {type(variables).__name__}.")
  variables = dict(variables)
  calib = variables.pop(CALIB, None)
  if not calib:
    raise ValueError(
      "freeze needs variables with a 'quant_calib' collection; run jqat.linen.calibrate() or apply the "
      "model with mutable=['quant_calib'] first."
    )
  flat_stats = traverse_util.flatten_dict(dict(variables.get(STATS, {})))
  flat_calib = traverse_util.flatten_dict(calib, is_leaf=lambda _, v: _is_calib_entry(v))
  for path, entry in flat_calib.items():
    try:
      flat_stats[path] = _freeze_entry(entry, flat_stats.get(path), method, percentile)
    except ValueError as e:  # name the activation whose statistics could not be finalized
      raise ValueError(f"{where}: the activation at /{'/'.join(map(str, path))} ({method.value}): {e}") from None
  variables[STATS] = traverse_util.unflatten_dict(flat_stats)
  return variables


def calibrate(
  model: nn.Module,
  variables: Mapping,
  batches: Iterable,
  method: CalibMethod | str = CalibMethod.PERCENTILE,
  *,
  percentile: float = 99.99,
  **apply_kwargs,
) -> dict:
  """Runs calibration batches through any linen model and freezes its activation ranges.

  Each batch goes through ``model.apply(variables, batch, mutable=["quant_calib"])``
  under ``jax.jit`` (quantized layers compute in float and observe their
  inputs); then ``freeze`` finalizes the statistics with ``method``. The
  method and percentile are checked before any batch runs. Per-token
  (per-channel) and weight-only activations take no range from calibration
  and are not observed; float layers stay float.

  Args:
    model: a linen module using jqat layers.
    variables: its variables (``params`` and optionally ``quant_stats``).
    batches: an iterable of model inputs (a tuple is passed as positional arguments).
    method: ``"minmax"``, ``"percentile"``, ``"entropy"`` (``"kl"``) or ``"mse"``.
    percentile: for PERCENTILE, in percent: (0, 100].
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    New variables with frozen activation ranges in ``quant_stats``.

  Raises:
    ValueError: for a method or percentile outside what is allowed, or no batches.
  """
  where = "jqat.linen.calibrate"
  method = _check_method(method, where)
  percentile = _check_percentile(percentile, where)
  _check_model(model, where)
  variables = {k: v for k, v in _check_variables(variables, where).items() if k != CALIB}
  if not isinstance(batches, Iterable) or isinstance(batches, (jax.Array, np.ndarray)):
    raise TypeError(
      f"{where}: batches must be an iterable of model inputs (e.g. a list of arrays), got {type(batches).__name__}."
    )

  @jax.jit
  def step(calib, batch):
    args = batch if isinstance(batch, tuple) else (batch,)
    v = dict(variables)
    if calib is not None:
      v[CALIB] = calib
    _, updates = model.apply(v, *args, mutable=[CALIB], **apply_kwargs)
    return updates.get(CALIB, {})

  calib = None
  for batch in batches:
    calib = step(calib, batch)
  if calib is None:
    raise ValueError(f"{where}: got no batches.")
  if not calib:
    # Nothing observes a range (float, weight-only or per-token layers): nothing to freeze.
    return variables
  return freeze({**variables, CALIB: calib}, method, percentile=percentile)


# --- conversion to serving variables ----------------------------------------------


def _serving_markers(flat_serving: dict) -> tuple[list, bool]:
  """Takes the layers' markers out of the flat serving collection.

  Returns the layer paths whose float kernel convert drops (``OWNS_KERNEL``),
  and whether any jqat layer took part (a converted kernel, or a layer that
  deliberately stays float).
  """
  owners = [p[:-1] for p in flat_serving if p[-1] == OWNS_KERNEL]
  floats = [p for p in flat_serving if p[-1] == KEEPS_FLOAT]
  for p in floats + [o + (OWNS_KERNEL,) for o in owners]:
    del flat_serving[p]
  return owners, bool(flat_serving or floats)


def _drop_replaced_params(flat_params: dict, owners: list, replaced: list = ()) -> dict:
  """Drops from ``params`` the float kernels that serving variables replace, and the parameters named ``replaced``."""
  for path in owners:
    flat_params.pop(path + ("kernel",), None)
  for path in replaced:
    flat_params.pop(path, None)
  return flat_params


def convert(model: nn.Module, variables: Mapping, *args, **apply_kwargs) -> dict:
  """Converts QAT variables to serving variables: integer kernels and frozen activation ranges.

  Runs ``model`` once on ``args`` with the ``serving`` collection mutable:
  every quantized dot stores its kernel as a quantized tensor (int8, packed
  int4 or fp8 values, scale, zero point, the column sums an asymmetric
  activation needs, and ``layout``: its format and logical shape) and its
  activation's frozen (or moving-average) range. The float kernels of
  ``QatDense`` layers are dropped from ``params``. A stock Flax layer with
  ``QatDotGeneral`` or ``QatConvGeneralDilated`` injected (``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.MultiHeadDotProductAttention``, ``nn.Conv``, and
  ``QatConv``) reads its parameter itself: the parameter the op quantized is
  replaced by a ``ConvertedParam`` of no bytes, which unboxes to zeros of its
  shape, and the layer serves from the quantized copy. A kernel the layer
  hands the op as a computed copy (cast by ``dtype``, masked) is not the
  parameter itself and stays. Layers with ``mode="float"``
  (or no weight config) keep their float kernel and compute as before; a
  model whose jqat layers are all float converts to an empty ``serving``.

  Converting converted variables gives them back unchanged (idempotent).

  Applying the same model to the returned variables serves with the integer
  path: activations quantized with the frozen range, ``int8 x int8`` dots with
  int32 accumulation, one rescale. Per-channel activation configs quantize per
  token at serving time; an activation config of None serves weight-only. A
  layer of another format or width than its serving variables raises,
  naming the layer, what the variables hold and what the layer expects.

  Under ``jax.jit`` (e.g. to place the result with ``out_shardings``) the
  activation ranges are checked when the computation runs: a missing range
  fails it with the same message, never serving with a made-up scale.

  Args:
    model: a linen model using jqat layers.
    variables: its QAT variables (``params``, ``quant_stats``).
    *args: a sample input (its values only pass through the model once).
    **apply_kwargs: passed to ``model.apply``.

  Returns:
    Serving variables: ``params`` without the converted float kernels,
    ``serving``, and the other collections of ``variables`` except
    ``quant_calib``.

  Raises:
    ValueError: when an activation has neither a frozen range nor statistics
      (e.g. variables holding ``params`` alone), or the model has no jqat layer.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> layer = jqat.linen.QatDense(3)
    >>> x = jnp.array([[0.5, -1.0]])
    >>> v = layer.init(jax.random.key(0), x)
    >>> _, stats = layer.apply(v, x, mutable=["quant_stats"])
    >>> served = jqat.linen.convert(layer, {**v, **stats}, x)
    >>> sorted(served["params"]), served["serving"]["quant"]["rhs"]["values"].dtype
    (['bias'], dtype('int8'))
    >>> bool(jnp.allclose(layer.apply(served, x), layer.apply({**v, **stats}, x), atol=1e-6))
    True
  """
  where = "jqat.linen.convert"
  _check_model(model, where)
  variables = {k: v for k, v in _check_variables(variables, where).items() if k != CALIB}
  _, updates = model.apply(variables, *args, mutable=[SERVE], **apply_kwargs)
  flat_serving = traverse_util.flatten_dict(dict(updates.get(SERVE, {})))
  noted = [p[:-2] + (p[-1],) for p in flat_serving if len(p) >= 2 and p[-2] == DROPS_PARAM]
  for p in noted:
    del flat_serving[p[:-1] + (DROPS_PARAM, p[-1])]
  owners, any_layer = _serving_markers(flat_serving)
  if not any_layer:
    raise ValueError(f"{where}: found no jqat layer in the model (QatDense, QatConv, or a QatDotGeneral injected).")
  # REPLACED markers stay in serving: they shape the stand-in that quantize_model's apply passes to stock code.
  replaced = [p[:-2] + (p[-1],) for p in flat_serving if len(p) >= 2 and p[-2] == REPLACED]
  out = dict(variables)
  flat_params = _drop_replaced_params(traverse_util.flatten_dict(dict(variables["params"])), owners, replaced)
  from jqat._src.flax.linen_quantize import QuantizedModel  # noqa: PLC0415 (it imports this module)

  if not isinstance(model, QuantizedModel):
    # Stock layers with a jqat op injected read their parameter themselves: it stays, as a box of no bytes.
    for p in noted:
      w = flat_params.get(p)
      if w is not None and not isinstance(w, meta.AxisMetadata):
        flat_params[p] = ConvertedParam(jnp.zeros((*jnp.shape(w), 0), jnp.result_type(w)))
  out["params"] = traverse_util.unflatten_dict(flat_params)
  out[SERVE] = traverse_util.unflatten_dict(flat_serving)
  return out

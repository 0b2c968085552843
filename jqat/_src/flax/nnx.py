"""Flax NNX layers: ``QatDotGeneral`` and the layers built on it.

``QatDotGeneral`` is a module callable like ``lax.dot_general``; it plugs into
any NNX layer that takes a ``dot_general`` (``nnx.Linear``,
``nnx.LinearGeneral``), and ``QatDense`` / ``QatConv`` are ``nnx.Linear`` /
``nnx.Conv`` with it built in. Statistics live in ``QuantStat`` variables and
update unless ``use_running_average`` is set (as ``nnx.BatchNorm``;
``model.eval()`` sets it, ``model.train()`` clears it).

Modes (``set_mode``), one vocabulary with linen: ``"float"`` (quantization
off), ``"calibrate"`` (observe the float inputs into calibration histograms,
compute in float), ``"qat"`` (quantize kernel and input, the default).
Serving is not a mode: after ``convert`` a layer holds ``QuantServing``
variables and serves from them.

The calibration histogram (256 KiB per activation) exists only between
entering ``"calibrate"`` and ``freeze``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jqat._src import qparams as qparams_lib
from jqat._src.calibration import stats as calibration
from jqat._src.config import CalibMethod, QatConfig
from jqat._src.fake_quant import fake_quant
from jqat._src.flax import common
from jqat._src.qparams import QParams
from jqat._src.qtensor import quantize

MODES = common.MODES
# ``freeze`` finalizes a histogram: these methods apply to it.
CALIBRATION_METHODS = (CalibMethod.MINMAX, CalibMethod.PERCENTILE, CalibMethod.ENTROPY, CalibMethod.MSE)


class QuantStat(nnx.Variable):
  """Quantization statistics: activation ranges and calibration histograms (not trained)."""


class QuantServing(nnx.Variable):
  """Serving variables: a quantized kernel (values, scale, zero point, sums) or a frozen activation range.

  A kernel's entry holds its layout (``common.weight_layout``: bits,
  symmetric, narrow range, per channel, group size, packing axis, logical
  shape) as an array, and its variable carries the same as static
  ``layout`` metadata, so that serving variables of another format or shape,
  pushed into a layer with ``nnx.update``, raise even under ``nnx.jit``.
  """


@dataclasses.dataclass(frozen=True)
class KernelShape:
  """Stands in for a float parameter that ``convert`` dropped: its shape and dtype, no values.

  The stock layer's ``__call__`` still reads ``self.kernel[...]``; it gets
  zeros that the quantized op ignores (it serves from its ``QuantServing``
  variables) and that XLA removes.
  """

  shape: tuple[int, ...]
  dtype: str

  def __getitem__(self, index):
    return jnp.zeros(self.shape, self.dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def value(self):
    return self[...]


jax.tree_util.register_dataclass(KernelShape, data_fields=[], meta_fields=["shape", "dtype"])


def _lsq_floor(qp: QParams) -> QParams:
  # Serving uses the learned scale as the LSQ forward does: floored at MIN_SCALE.
  return QParams(jnp.maximum(qp.scale, qparams_lib.MIN_SCALE), qp.zero_point)


def _check(mode: str, where: str) -> str:
  if mode not in MODES:
    raise ValueError(f"{where}: mode={mode!r} is invalid; allowed: {', '.join(map(repr, MODES))}.")
  return mode


def check_calibration_args(method, percentile, where: str = "calibrate") -> CalibMethod:
  """The calibration method as a ``CalibMethod``, with ``percentile`` checked; raises before any work."""
  try:
    m = CalibMethod(method)
  except ValueError:
    m = None
  if m not in CALIBRATION_METHODS:
    allowed = ", ".join(repr(c.value) for c in CALIBRATION_METHODS)
    raise ValueError(f"{where}: method={method!r} is invalid; allowed: {allowed} (or 'kl' for 'entropy').")
  checker = getattr(calibration, "check_percentile", None)
  if checker is None:
    _check_percentile(percentile, where)
    return m
  try:
    checker(percentile)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{where}: {e}") from None
  return m


def _check_percentile(percentile, where: str) -> None:
  if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
    raise TypeError(f"{where}: percentile must be a number in (0, 100], got {percentile!r}.")
  p = float(percentile)
  if not 0 < p <= 100:
    raise ValueError(f"{where}: percentile={percentile!r} is invalid; allowed: (0, 100].")
  if p <= 1:
    raise ValueError(
      f"{where}: percentile={percentile!r} looks like a fraction; percentile is in percent, (0, 100] "
      f"(e.g. {p * 100:g} for the {p * 100:g}th percentile)."
    )


# --- recording ops for the report ------------------------------------------------

_RECORD = threading.local()


def _record(quantizer, op: str, lhs_shape, rhs_shape, lhs_cfg, rhs_cfg, rhs_dtype=jnp.float32) -> None:
  rows = getattr(_RECORD, "rows", None)
  if rows is not None:
    itemsize = jnp.dtype(rhs_dtype).itemsize
    rows.append((quantizer, op, tuple(lhs_shape), tuple(rhs_shape), lhs_cfg, rhs_cfg, itemsize))


_OBSERVE = threading.local()


class observing:  # noqa: N801 (a context manager, used like a function)
  """Inside, every ``QatDotGeneral`` call returns ``fn(quantizer, lhs, rhs, ...)`` instead of computing.

  ``fn(quantizer, lhs, rhs, dimension_numbers, precision, preferred_element_type)``
  sees each dot's operands (at trace time under ``jax.jit``): how ``jqat.nnx.ptq``
  collects its statistics.
  """

  def __init__(self, fn):
    self.fn = fn

  def __enter__(self):
    self.previous = getattr(_OBSERVE, "fn", None)
    _OBSERVE.fn = self.fn

  def __exit__(self, *exc):
    _OBSERVE.fn = self.previous


class recording:  # noqa: N801 (a context manager, used like a function)
  """Collects ``(quantizer, op, lhs_shape, rhs_shape, lhs_cfg, rhs_cfg, rhs_itemsize)`` of every op called inside."""

  def __enter__(self):
    self.previous = getattr(_RECORD, "rows", None)
    _RECORD.rows = self.rows = []
    return self.rows

  def __exit__(self, *exc):
    _RECORD.rows = self.previous


# --- the quantizers ----------------------------------------------------------------


class _Quantizer(nnx.Module):
  """Activation statistics, learned scales and operand quantization shared by the NNX quantized ops."""

  def __init__(self, lhs_config, rhs_config, mode, momentum, use_running_average):
    name = type(self).__name__
    lhs_config = common.as_config(lhs_config, common.DEFAULT_ACTIVATION_CONFIG, "lhs_config", name)
    rhs_config = common.as_config(rhs_config, common.DEFAULT_WEIGHT_CONFIG, "rhs_config", name)
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0 <= momentum < 1:
      raise ValueError(f"{name}: momentum={momentum!r} is invalid; allowed: a number in [0, 1).")
    if common.uses_lsq(lhs_config) and common.is_dynamic(lhs_config):
      raise ValueError(
        f"{name}: lhs_config has estimator='lsq' with per-token or per-group ranges, which are taken from each "
        "batch and cannot be learned; use a per-tensor activation config for LSQ."
      )
    self.lhs_config = lhs_config
    self.rhs_config = rhs_config
    self.momentum = momentum
    self.use_running_average = use_running_average
    # Where the op sits in its model, for error messages; set by the functions that walk the model.
    self.path = None
    # The rule of quantize_model that chose these configs (for the report).
    self.rule = None
    self._stats_on = lhs_config is not None and not common.is_dynamic(lhs_config)
    ema_on = self._stats_on and not common.uses_lsq(lhs_config)
    self.lhs_stats = QuantStat(common.init_activation_stats(lhs_config, momentum)) if ema_on else nnx.data(None)
    self.lhs_calib = nnx.data(None)
    if common.uses_lsq(lhs_config):
      # LSQ (Esser et al. 2020): a learned per-tensor scale (and zero point when
      # asymmetric), set from the first training batch or by calibration.
      self.lhs_scale = nnx.Param(jnp.ones((), jnp.float32))
      self.lhs_zero_point = nnx.Param(jnp.zeros((), jnp.float32)) if not lhs_config.symmetric else nnx.data(None)
      self.lhs_lsq_ready = QuantStat(jnp.zeros((), bool))
    self.rhs_scale = nnx.data(None)
    self.rhs_zero_point = nnx.data(None)
    self.rhs_serving = nnx.data(None)
    self.lhs_serving = nnx.data(None)
    self._mode = "float"
    self.mode = mode

  # The mode is a property so that entering "calibrate" (by set_mode or by
  # assignment) allocates the histogram, which no other mode needs.
  @property
  def mode(self) -> str:
    return self._mode

  @mode.setter
  def mode(self, mode: str) -> None:
    self._mode = _check(mode, self._where())
    if mode == "calibrate" and self._stats_on and self.lhs_calib is None:
      self.lhs_calib = QuantStat(calibration.init_stats((), self.lhs_config, CalibMethod.ENTROPY))

  def _where(self) -> str:
    path = getattr(self, "path", None)
    return f"{type(self).__name__} at '{path}'" if path else type(self).__name__

  @property
  def is_float(self) -> bool:
    """True when this op computes in float: mode ``"float"``, or neither operand has a config."""
    return self.mode == "float" or (self.lhs_config is None and self.rhs_config is None)

  @property
  def is_converted(self) -> bool:
    return self.rhs_serving is not None

  def init_lsq(self, kernel, config: QatConfig) -> None:
    """Creates the learned scale (and zero point) of a kernel quantized with an LSQ ``config``, from its range."""
    if not common.uses_lsq(config) or self.rhs_scale is not None:
      return
    qp = qparams_lib.qparams_from_array(jnp.asarray(kernel), config)
    self.rhs_scale = nnx.Param(jnp.asarray(qp.scale, jnp.float32))
    if not config.symmetric:
      self.rhs_zero_point = nnx.Param(jnp.asarray(qp.zero_point, jnp.float32))

  def _observe(self, x):
    if not self._stats_on:
      return
    if self.lhs_calib is None:
      raise ValueError(
        f"{self._where()}: in 'calibrate' mode without a calibration histogram (freeze() consumed it); "
        "set the mode again with jqat.nnx.set_mode(model, 'calibrate') or use jqat.nnx.calibrate."
      )
    self.lhs_calib.set_value(calibration.update_stats(self.lhs_calib.get_value(), lax.stop_gradient(x)))

  def _lhs_qparams(self, x, config: QatConfig) -> QParams:
    return self._lhs_qparams_and_mark(x, config)[0]

  def _lhs_qparams_and_mark(self, x, config: QatConfig, contracting=None) -> tuple[QParams, jax.Array | None]:
    """The activation's QParams, and its rows' non-finite mark when its range reduction gives it, else None."""
    shape = qparams_lib.params_shape(jnp.shape(x), config)
    if common.uses_lsq(config):
      batch = qparams_lib.qparams_from_array(lax.stop_gradient(x), config)
      ready = self.lhs_lsq_ready.get_value()
      scale = jnp.where(ready, self.lhs_scale.get_value(), batch.scale.reshape(()))
      zp_param = self.lhs_zero_point
      zp = jnp.where(ready, zp_param.get_value(), batch.zero_point.reshape(())) if zp_param is not None else None
      if not self.use_running_average:
        # Before the first update the learned scale is the first batch's; the
        # gradient reaches the parameter from the step after.
        self.lhs_scale.set_value(lax.stop_gradient(scale))
        if zp_param is not None:
          zp_param.set_value(lax.stop_gradient(zp))
        self.lhs_lsq_ready.set_value(jnp.ones((), bool))
      zp = jnp.zeros((), jnp.float32) if zp is None else zp
      return QParams(scale.reshape(shape), zp.reshape(shape)), None
    if common.is_dynamic(config):
      return common.dynamic_activation_qparams(x, config, contracting)
    stats = self.lhs_stats.get_value() if self.lhs_stats is not None else None
    update = stats is not None and not self.use_running_average
    qp, new, mark = common.activation_qparams(x, stats, config, update=update, contracting=contracting)
    if update:
      self.lhs_stats.set_value(new)
    return qp, mark

  def _rhs_qparams(self, w, config: QatConfig) -> QParams:
    if common.uses_lsq(config):
      if self.rhs_scale is None:
        raise ValueError(
          f"{self._where()}: rhs_config has estimator='lsq' but there is no learned kernel scale; use a jqat layer "
          "(QatDense, QatConv, QatEinsum), jqat.nnx.quantize_model, or call init_lsq(kernel, config) first."
        )
      scale = self.rhs_scale.get_value()
      zp = self.rhs_zero_point.get_value() if self.rhs_zero_point is not None else jnp.zeros_like(scale)
      return QParams(scale, zp)
    return qparams_lib.qparams_from_array(lax.stop_gradient(w), config)

  def freeze(self, method: CalibMethod | str = CalibMethod.PERCENTILE, *, percentile: float = 99.99) -> None:
    """Freezes the activation range from the calibration histogram with ``method``, and drops the histogram.

    Float layers, weight-only layers and per-token activations have nothing
    to freeze.

    Raises:
      ValueError: for an invalid method or percentile, or when this layer
        should have a histogram but has none (it never entered ``"calibrate"``
        and is not frozen).
    """
    method = check_calibration_args(method, percentile, f"{self._where()}.freeze")
    if self.mode == "float" or not self._stats_on:
      return
    if self.lhs_calib is None:
      if self._frozen():
        return  # frozen before: freezing again changes nothing
      raise ValueError(
        f"{self._where()}: no calibration histogram to freeze; run jqat.nnx.calibrate(model, batches), or "
        "jqat.nnx.set_mode(model, 'calibrate') and some batches, before freeze."
      )
    qp = calibration.finalize_stats(self.lhs_calib.get_value(), self.lhs_config, method, percentile=percentile)
    if common.uses_lsq(self.lhs_config):
      self.lhs_scale.set_value(jnp.asarray(qp.scale, jnp.float32).reshape(()))
      if self.lhs_zero_point is not None:
        self.lhs_zero_point.set_value(jnp.asarray(qp.zero_point, jnp.float32).reshape(()))
      self.lhs_lsq_ready.set_value(jnp.ones((), bool))
    else:
      self.lhs_stats.set_value(common.freeze_activation_stats(self.lhs_stats.get_value(), qp))
    self.lhs_calib = nnx.data(None)

  def _frozen(self) -> bool:
    if common.uses_lsq(self.lhs_config):
      return bool(self.lhs_lsq_ready.get_value())
    return bool(self.lhs_stats.get_value().frozen)

  # --- serving ---------------------------------------------------------------------

  def _store_serving(self, kernel, rhs_cfg: QatConfig, contracting) -> None:
    """Quantizes ``kernel`` (learned scales when LSQ) and freezes the activation range, for serving.

    ``contracting``: the kernel's contracting axes, for the column sums an
    asymmetric activation needs in a dot; None for a conv (which centres the
    activation instead).
    """
    kernel = jnp.asarray(kernel)
    qp = _lsq_floor(self._rhs_qparams(kernel, rhs_cfg))
    wq = quantize(kernel, qp, rhs_cfg)
    lhs_cfg = self.lhs_config
    entry = common.serving_weight(wq, contracting or (), lhs_cfg if contracting is not None else None)
    lhs_entry = None
    if lhs_cfg is not None and not common.is_dynamic(lhs_cfg):
      if common.uses_lsq(lhs_cfg):
        scale = self.lhs_scale.get_value()
        zp = self.lhs_zero_point.get_value() if self.lhs_zero_point is not None else jnp.zeros_like(scale)
        lhs_qp = _lsq_floor(QParams(scale, zp))
      else:
        lhs_qp = common.serving_activation_qparams(self.lhs_stats.get_value(), lhs_cfg, self._where())
      lhs_entry = common.serving_activation(lhs_qp, lhs_cfg)
    layout = tuple(int(c) for c in common.weight_layout(rhs_cfg, kernel.shape))
    self.rhs_serving = QuantServing(entry, layout=layout)
    self.lhs_serving = QuantServing(lhs_entry) if lhs_entry is not None else nnx.data(None)

  def _served_weight(self, rhs_cfg: QatConfig, rhs_shape):
    """The kernel as served, after checking that the serving variables hold what this layer expects."""
    where = self._where()
    expected = common.weight_layout(rhs_cfg, rhs_shape)
    held = self.rhs_serving.get_metadata().get("layout")
    if held is not None and tuple(held) != tuple(int(c) for c in expected):
      raise ValueError(
        f"{where}: the serving variables hold an {common.describe_layout(held)}, but this layer expects an "
        f"{common.describe_layout(expected)}; convert this model with jqat.nnx.convert, or load serving variables "
        "converted from a model with the same configs and shapes."
      )
    return common.weight_from_serving(self.rhs_serving.get_value(), rhs_cfg, rhs_shape, where)

  def _served_activation(self, lhs_cfg: QatConfig | None) -> QParams | None:
    entry = self.lhs_serving.get_value() if self.lhs_serving is not None else None
    return common.activation_from_serving(entry, lhs_cfg, self._where())


class QatDotGeneral(_Quantizer):
  """A quantization-aware ``lax.dot_general`` for NNX layers' ``dot_general``.

  Args:
    lhs_config: activation config (default int8 asymmetric per-tensor), None,
      or a format name such as ``"int4"`` (the default config with those bits).
    rhs_config: kernel config (default int8 symmetric per-channel), None, or a
      format name.
    mode: ``"qat"``, ``"calibrate"`` or ``"float"``.
    momentum: of the activation-range moving average.
    use_running_average: when True, statistics are used but not updated.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = nnx.Linear(3, 4, dot_general=jqat.nnx.QatDotGeneral(), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)
  """

  def __init__(
    self,
    *,
    lhs_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG,
    rhs_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    use_running_average: bool = False,
  ):
    super().__init__(lhs_config, rhs_config, mode, momentum, use_running_average)
    # AWQ / SmoothQuant (jqat.nnx.ptq): a QuantServing divisor (K,) of the input; the served kernel holds diag(s) W.
    self.input_scale = nnx.data(None)

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    return self.dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding, op="dot")

  def dot(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None, *, op):
    where = self._where()
    _check(self.mode, where)
    # A converted QatDense has no float kernel: it passes the kernel's shape alone.
    rhs_shape = tuple(rhs.shape) if hasattr(rhs, "shape") else jnp.shape(rhs)
    lhs_shape = jnp.shape(lhs)
    try:
      (lc, rc), (lb, rb) = dimension_numbers
      lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
    except (TypeError, ValueError):
      raise ValueError(
        f"{where}: dimension_numbers={dimension_numbers!r} is invalid; expected "
        "((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))."
      ) from None
    for name, axes, nd in (("lhs", lc + lb, len(lhs_shape)), ("rhs", rc + rb, len(rhs_shape))):
      bad = [a for a in axes if not -nd <= a < nd]
      if bad:
        shape = lhs_shape if name == "lhs" else rhs_shape
        raise ValueError(f"{where}: {name} axes {bad} are out of range for shape {shape}.")
    err = common.dot_shape_error(where, lhs_shape, rhs_shape, dimension_numbers)
    if err is not None:
      raise err
    lhs_cfg = common.operand_config(self.lhs_config, len(lhs_shape), lc, lb)
    rhs_cfg = common.operand_config(self.rhs_config, len(rhs_shape), rc, rb)
    float_cfg = self.is_float
    rhs_dtype = getattr(rhs, "dtype", jnp.float32)
    _record(self, op, lhs_shape, rhs_shape, None if float_cfg else lhs_cfg, None if float_cfg else rhs_cfg, rhs_dtype)
    kwargs = dict(precision=precision, preferred_element_type=preferred_element_type)
    observer = getattr(_OBSERVE, "fn", None)
    if observer is not None:
      return observer(self, lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if self.rhs_serving is not None and rhs_cfg is not None:
      wq = self._served_weight(rhs_cfg, rhs_shape)
      s = getattr(self, "input_scale", None)
      if s is not None:
        # One elementwise division that XLA fuses into the activation's quantization (or the weight-only operand).
        s = s.get_value()
        if jnp.shape(s) != (lhs_shape[-1],) or tuple(a % len(lhs_shape) for a in lc) != (len(lhs_shape) - 1,):
          raise ValueError(
            f"{where}: the serving input_scale has shape {jnp.shape(s)}, but the input has shape {lhs_shape} "
            f"contracted on axes {lc} (needs ({lhs_shape[-1]},) and the last axis)."
          )
        lhs = lhs / jnp.asarray(s).astype(jnp.result_type(lhs))
      return common.serve_dot_general(
        lhs,
        wq,
        dimension_numbers,
        self._served_activation(lhs_cfg),
        lhs_cfg,
        rhs_sums=self.rhs_serving.get_value().get("sums"),
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
      )
    if isinstance(rhs, jax.ShapeDtypeStruct):
      raise ValueError(f"{where}: no kernel and no serving variables.")
    if out_sharding is not None:
      kwargs["out_sharding"] = out_sharding
    if float_cfg:
      return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
    if self.mode == "calibrate":
      self._observe(lhs)
      return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
    (lc, _), _ = dimension_numbers
    lhs_qp, lhs_mark = self._lhs_qparams_and_mark(lhs, lhs_cfg, lc) if lhs_cfg is not None else (None, None)
    lsq = common.uses_lsq(lhs_cfg) or common.uses_lsq(rhs_cfg)
    # Without LSQ the kernel's own range is taken in the dot, from the reduction that also finds its NaN columns.
    rhs_qp = self._rhs_qparams(rhs, rhs_cfg) if rhs_cfg is not None and lsq else None
    if lsq:
      # LSQ's scale gradients come from fake_quant; the dot is a float dot of the fake-quantized operands.
      lq = fake_quant(lhs, lhs_qp, lhs_cfg) if lhs_cfg is not None else lhs
      rq = fake_quant(rhs, rhs_qp, rhs_cfg) if rhs_cfg is not None else rhs
      return lax.dot_general(lq, rq, dimension_numbers, **kwargs)
    return common.quantized_dot_general(
      lhs, rhs, dimension_numbers, lhs_qp, rhs_qp, lhs_cfg, rhs_cfg, lhs_mark=lhs_mark, **kwargs
    )

  def convert(self, kernel, contracting=(0,), batch=()) -> None:
    """Stores ``kernel`` quantized, and the frozen (or moving-average) activation range, for serving.

    After this the module serves with the integer path and ignores the float
    kernel it is given.

    Args:
      kernel: the float kernel (the rhs of the dot).
      contracting: the kernel's contracting axes.
      batch: the kernel's batch axes.
    """
    kernel = jnp.asarray(kernel)
    rhs_cfg = common.operand_config(self.rhs_config, kernel.ndim, tuple(contracting), tuple(batch))
    if rhs_cfg is None:
      raise ValueError(f"{self._where()}.convert: rhs_config is None; there is no kernel to quantize.")
    self._store_serving(kernel, rhs_cfg, tuple(contracting))


class QatConvGeneralDilated(_Quantizer):
  """A quantization-aware ``lax.conv_general_dilated`` for ``nnx.Conv(conv_general_dilated=...)``.

  Kernel scales are per output feature; activations per tensor. After
  ``convert`` it serves with an integer convolution (int32 accumulation).
  """

  def __init__(
    self,
    *,
    lhs_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG,
    rhs_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    use_running_average: bool = False,
  ):
    lhs_config = common.as_config(lhs_config, common.DEFAULT_ACTIVATION_CONFIG, "lhs_config", "QatConvGeneralDilated")
    if common.is_dynamic(lhs_config):
      raise ValueError(f"QatConvGeneralDilated: conv activations are quantized per tensor; got {lhs_config}.")
    super().__init__(lhs_config, rhs_config, mode, momentum, use_running_average)

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs):
    where = self._where()
    _check(self.mode, where)
    conv = functools.partial(
      lax.conv_general_dilated,
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      **kwargs,
    )
    dn = kwargs.get("dimension_numbers")
    rhs_shape = tuple(rhs.shape)
    rhs_cfg = common.conv_kernel_config(self.rhs_config, jnp.shape(lhs), rhs_shape, dn)
    lhs_rec, rhs_rec = (None, None) if self.is_float else (self.lhs_config, rhs_cfg)
    _record(self, "conv", jnp.shape(lhs), rhs_shape, lhs_rec, rhs_rec, rhs.dtype)
    dims = lax.conv_dimension_numbers(jnp.shape(lhs), rhs_shape, dn)
    groups = kwargs.get("feature_group_count", 1) or 1
    if jnp.ndim(lhs) != len(rhs_shape) or jnp.shape(lhs)[dims.lhs_spec[1]] != rhs_shape[dims.rhs_spec[1]] * groups:
      raise ValueError(
        f"{where}: input shape {jnp.shape(lhs)} does not fit kernel shape {rhs_shape}: the input needs "
        f"{len(rhs_shape)} axes with {rhs_shape[dims.rhs_spec[1]] * groups} features on axis {dims.lhs_spec[1]}."
      )
    if self.rhs_serving is not None and rhs_cfg is not None:
      wq = self._served_weight(rhs_cfg, rhs_shape)
      return common.serve_conv(lhs, wq, self._served_activation(self.lhs_config), self.lhs_config, conv, dn)
    if self.is_float:
      return conv(lhs, rhs)
    if self.mode == "calibrate":
      self._observe(lhs)
      return conv(lhs, rhs)
    if self.lhs_config is not None:
      lhs = fake_quant(lhs, self._lhs_qparams(lhs, self.lhs_config), self.lhs_config)
    if rhs_cfg is not None:
      rhs = fake_quant(rhs, self._rhs_qparams(rhs, rhs_cfg), rhs_cfg)
    return conv(lhs, rhs)

  def convert(self, kernel, dimension_numbers=None) -> None:
    """Stores ``kernel`` quantized per output feature, and the frozen activation range, for serving."""
    kernel = jnp.asarray(kernel)
    rhs_cfg = self.kernel_config(kernel.shape, dimension_numbers)
    if rhs_cfg is None:
      raise ValueError(f"{self._where()}.convert: rhs_config is None; there is no kernel to quantize.")
    self._store_serving(kernel, rhs_cfg, None)

  def kernel_config(self, kernel_shape, dimension_numbers=None) -> QatConfig | None:
    """The kernel's config with its axes placed (Flax's HWIO layout unless ``dimension_numbers`` say otherwise)."""
    nd = len(kernel_shape)
    if dimension_numbers is None:
      dimension_numbers = _flax_conv_dimension_numbers(nd)
    return common.conv_kernel_config(self.rhs_config, (1,) * nd, tuple(kernel_shape), dimension_numbers)


def _flax_conv_dimension_numbers(ndim: int):
  # What nnx.Conv passes: channels last for the input and output, HWIO kernel.
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, ndim - 1) + tuple(range(1, ndim - 1)),
    rhs_spec=(ndim - 1, ndim - 2) + tuple(range(0, ndim - 2)),
    out_spec=(0, ndim - 1) + tuple(range(1, ndim - 1)),
  )


def _configs(cls_name, weight_config, activation_config):
  w = common.as_config(weight_config, common.DEFAULT_WEIGHT_CONFIG, "weight_config", cls_name)
  a = common.as_config(activation_config, common.DEFAULT_ACTIVATION_CONFIG, "activation_config", cls_name)
  return w, a


class QatDense(nnx.Linear):
  """``flax.nnx.Linear`` with quantization-aware training: same arguments and parameters.

  Adds ``weight_config`` (default int8, symmetric, per-channel),
  ``activation_config`` (default int8, asymmetric, per-tensor), ``mode`` and
  ``momentum``; statistics live in ``self.dot_general`` as ``QuantStat``. A
  config is a ``jqat.QatConfig``, None (float), or a format name such as
  ``"int4"`` (the default config with those bits).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatDense(3, 4, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer(jnp.ones((2, 3))).shape
    ((3, 4), (2, 4))
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    weight_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG,
    activation_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    if "dot_general" in kwargs:
      raise ValueError("QatDense quantizes through its own QatDotGeneral; pass dot_general to nnx.Linear instead.")
    for name, n in (("in_features", in_features), ("out_features", out_features)):
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"QatDense: {name}={n!r} is invalid; allowed: a positive int.")
    weight_config, activation_config = _configs("QatDense", weight_config, activation_config)
    quant = QatDotGeneral(lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum)
    super().__init__(in_features, out_features, dot_general=quant, rngs=rngs, **kwargs)
    if weight_config is not None:
      quant.init_lsq(self.kernel[...], common.operand_config(weight_config, 2, (0,), ()))

  def __call__(self, inputs, out_sharding=None):
    if jnp.shape(inputs)[-1:] != (self.in_features,):
      raise ValueError(
        f"QatDense(in_features={self.in_features}, out_features={self.out_features}): input shape "
        f"{jnp.shape(inputs)} does not end in {self.in_features} features "
        f"(kernel shape {(self.in_features, self.out_features)})."
      )
    if self.kernel is not None:
      return super().__call__(inputs, out_sharding=out_sharding)
    # Serving: the kernel lives, quantized, in the quantizer.
    bias = self.bias[...] if self.bias is not None else None
    inputs, bias = self.promote_dtype((inputs, bias), dtype=self.dtype)
    kernel = jax.ShapeDtypeStruct((self.in_features, self.out_features), inputs.dtype)
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    y = self.dot_general(inputs, kernel, dims, precision=self.precision, out_sharding=out_sharding)
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)) if bias is not None else y

  def convert(self) -> None:
    """Quantizes the kernel for serving and drops the float kernel (in place); float layers stay as they are."""
    q = self.dot_general
    if self.kernel is None or q.is_float or q.rhs_config is None:
      return
    q.convert(self.kernel[...])
    self.kernel = None


class QatConv(nnx.Conv):
  """``flax.nnx.Conv`` with quantization-aware training: same arguments and parameters.

  After ``jqat.nnx.convert`` it serves with an integer convolution and holds
  no float kernel.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 5, 5, 3))).shape
    (1, 5, 5, 8)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size,
    *,
    weight_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG,
    activation_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    weight_config, activation_config = _configs("QatConv", weight_config, activation_config)
    quant = QatConvGeneralDilated(lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum)
    super().__init__(in_features, out_features, kernel_size, conv_general_dilated=quant, rngs=rngs, **kwargs)
    quant.init_lsq(self.kernel[...], quant.kernel_config(self.kernel.shape))


# --- whole-model functions -------------------------------------------------------------


def path_str(path) -> str:
  return "/".join(str(p) for p in path)


def check_model(model, where: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{where} needs an NNX model (an nnx.Module), got {type(model).__name__}.")


def quantizers(model, where: str = "jqat.nnx") -> list[tuple[str, _Quantizer]]:
  """``(path, quantizer)`` of every jqat quantized op in ``model``; records each one's path for its messages."""
  check_model(model, where)
  out = []
  for path, m in nnx.iter_modules(model):
    if isinstance(m, _Quantizer):
      p = path_str(path)
      if m.path is None:
        m.path = p
      out.append((p, m))
  return out


def set_mode(model, mode: str) -> None:
  """Sets the mode of every jqat quantizer in ``model``: ``"float"``, ``"calibrate"`` or ``"qat"``.

  Entering ``"calibrate"`` allocates each activation's calibration histogram.
  """
  _check(mode, "set_mode")
  for _, q in quantizers(model, "set_mode"):
    q.mode = mode


def freeze(model, method: CalibMethod | str = CalibMethod.PERCENTILE, *, percentile: float = 99.99) -> None:
  """Freezes every activation range of ``model`` from its calibration histogram, and drops the histograms.

  Raises:
    ValueError: for an invalid method or percentile (before anything
      changes), or a quantized layer that has no histogram.
  """
  method = check_calibration_args(method, percentile, "freeze")
  for _, q in quantizers(model, "freeze"):
    q.freeze(method, percentile=percentile)


def calibrate(
  model,
  batches: Iterable,
  method: CalibMethod | str = CalibMethod.PERCENTILE,
  *,
  percentile: float = 99.99,
  **call_kwargs,
) -> None:
  """Runs calibration batches through ``model``, freezes its activation ranges, and restores each layer's mode.

  Layers in ``"float"`` mode stay float: they neither observe nor freeze.
  ``method`` and ``percentile`` are checked before any batch runs.

  Args:
    model: an NNX module using jqat layers; called as ``model(*batch)``.
    batches: an iterable of inputs (a tuple is passed as positional arguments).
    method: ``"minmax"``, ``"percentile"``, ``"entropy"`` (``"kl"``) or ``"mse"``.
    percentile: for PERCENTILE, in (0, 100].
    **call_kwargs: passed to ``model`` with every batch (e.g. ``train=False``).

  Raises:
    ValueError: for an invalid method or percentile, or no batches.
    TypeError: when ``model`` is not an NNX module, or ``batches`` is one array
      instead of an iterable of batches.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatDense(2, 3, rngs=nnx.Rngs(0))
    >>> jqat.nnx.calibrate(layer, [jnp.array([[0.0, 2.55]])], method="minmax")
    >>> round(float(layer.dot_general.lhs_stats.get_value().scale), 6), layer.dot_general.mode
    (0.01, 'qat')
    >>> layer.dot_general.lhs_calib is None
    True
  """
  method = check_calibration_args(method, percentile, "calibrate")
  check_model(model, "calibrate")
  if hasattr(batches, "shape") or not isinstance(batches, Iterable):
    what = f"an array of shape {tuple(batches.shape)}" if hasattr(batches, "shape") else type(batches).__name__
    raise TypeError(f"calibrate: batches must be an iterable of model inputs (e.g. [x0, x1]), got {what}.")

  @nnx.jit
  def step(m, batch):
    m(*batch, **call_kwargs) if isinstance(batch, tuple) else m(batch, **call_kwargs)

  previous = [(q, q.mode) for _, q in quantizers(model, "calibrate")]
  try:
    for q, mode in previous:
      if mode != "float":
        q.mode = "calibrate"
    n = 0
    for batch in batches:
      step(model, batch)
      n += 1
    if n == 0:
      raise ValueError("calibrate got no batches.")
    freeze(model, method, percentile=percentile)
  finally:
    for q, mode in previous:
      q.mode = mode
      q.lhs_calib = nnx.data(None)


def _linear_general_dims(layer: nnx.LinearGeneral):
  n_batch = len(layer.batch_axis)
  n_in = len(layer.in_features)
  return tuple(range(n_batch, n_batch + n_in)), tuple(range(n_batch))


def _drop(layer, name: str) -> None:
  v = getattr(layer, name)
  setattr(layer, name, KernelShape(tuple(v.shape), jnp.dtype(v.dtype).name))


def convert(model) -> None:
  """Converts every quantized layer of ``model`` to serving, in place.

  Each quantized kernel is stored quantized (int8, packed int4 or fp8 values,
  scale, zero point) with its activation's frozen (or moving-average) range,
  and the float parameter it replaces is dropped: ``QatDense`` sets
  ``kernel`` to None; ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``
  and ``nnx.Conv`` with a jqat op injected (``QatConv`` included) and
  ``QatEmbed`` replace the parameter by a ``KernelShape`` (shape, no values).
  Afterwards ``model(x)`` runs the integer path. Float layers (mode
  ``"float"``, or no configs) keep their parameters and compute in float.
  Converting a converted model changes nothing.

  Raises:
    ValueError: when a quantized activation has neither a frozen range nor statistics.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatDense(2, 3, rngs=nnx.Rngs(0))
    >>> x = jnp.array([[0.5, -1.0]])
    >>> y_qat = layer(x)
    >>> jqat.nnx.convert(layer)
    >>> layer.kernel is None, layer.dot_general.rhs_serving.get_value()["values"].dtype
    (True, dtype('int8'))
    >>> layer.eval()
    >>> bool(jnp.allclose(layer(x), y_qat, atol=1e-6))
    True
  """
  from jqat._src.flax import nnx_layers  # the einsum and embedding layers build on this module

  quantizers(model, "convert")  # records paths for the messages below
  for _, m in list(nnx.iter_modules(model)):
    if isinstance(m, QatDense):
      m.convert()
    elif isinstance(m, nnx_layers.QatEmbed):
      m.convert()
    elif isinstance(m, nnx.Linear) and isinstance(m.dot_general, QatDotGeneral):
      if _convertible(m.dot_general, m.kernel):
        m.dot_general.convert(m.kernel[...])
        _drop(m, "kernel")
    elif isinstance(m, nnx.LinearGeneral) and isinstance(m.dot_general, QatDotGeneral):
      if _convertible(m.dot_general, m.kernel):
        contracting, batch = _linear_general_dims(m)
        m.dot_general.convert(m.kernel[...], contracting, batch)
        _drop(m, "kernel")
    elif isinstance(m, nnx.Einsum) and isinstance(m.einsum_op, nnx_layers.QatEinsumOp):
      if _convertible(m.einsum_op, m.kernel):
        m.einsum_op.convert(m.kernel[...], m.einsum_str, where=type(m).__name__)
        _drop(m, "kernel")
    elif isinstance(m, nnx.Conv) and isinstance(m.conv_general_dilated, QatConvGeneralDilated):
      if _convertible(m.conv_general_dilated, m.kernel):
        m.conv_general_dilated.convert(m.kernel[...])
        _drop(m, "kernel")


def _convertible(q: _Quantizer, kernel) -> bool:
  return not q.is_float and q.rhs_config is not None and not q.is_converted and isinstance(kernel, nnx.Variable)

"""Flax NNX layers: ``QatDotGeneral`` and the layers built on it.

``QatDotGeneral`` is a module callable like ``lax.dot_general``; it plugs into
any NNX layer that takes a ``dot_general`` (``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum``), and ``QatDense`` / ``QatConv`` are
``nnx.Linear`` / ``nnx.Conv`` with it built in. Statistics live in
``QuantStat`` variables and update unless ``use_running_average`` is set (as
``nnx.BatchNorm``; ``model.eval()`` sets it, ``model.train()`` clears it).

Modes (``set_mode``): ``"float"`` (quantization off), ``"calibrate"`` (observe
the float inputs into calibration histograms, compute in float), ``"qat"``
(fake-quantize kernel and input, the default).
"""

from __future__ import annotations

import functools
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

NNX_MODES = ("float", "calibrate", "qat")


class QuantStat(nnx.Variable):
  """Quantization statistics: activation ranges and calibration histograms (not trained)."""


class QuantServing(nnx.Variable):
  """Serving variables: a quantized kernel (values, scale, zero point, sums) or a frozen activation range."""


def _check(mode: str, where: str):
  if mode not in NNX_MODES:
    raise ValueError(f"{where}: mode={mode!r} is invalid; allowed: {', '.join(map(repr, NNX_MODES))}.")


class _Quantizer(nnx.Module):
  """Activation statistics and operand quantization shared by the NNX quantized ops."""

  def __init__(self, lhs_config, rhs_config, mode, momentum, use_running_average):
    for name, cfg in (("lhs_config", lhs_config), ("rhs_config", rhs_config)):
      if common.uses_lsq(cfg):
        raise ValueError(
          f"{type(self).__name__}: {name} has estimator='lsq', which NNX layers do not support; "
          "use 'ste' here or the linen layers for learned scales."
        )
    _check(mode, type(self).__name__)
    self.lhs_config = lhs_config
    self.rhs_config = rhs_config
    self.mode = mode
    self.momentum = momentum
    self.use_running_average = use_running_average
    stats_on = lhs_config is not None and not lhs_config.per_channel and lhs_config.group_size is None
    self.lhs_stats = QuantStat(common.init_activation_stats(lhs_config, momentum)) if stats_on else None
    self.lhs_calib = QuantStat(calibration.init_stats((), lhs_config, CalibMethod.ENTROPY)) if stats_on else None
    self.rhs_serving = nnx.data(None)
    self.lhs_serving = nnx.data(None)

  def _observe(self, x):
    if self.lhs_calib is None:
      return
    self.lhs_calib.set_value(calibration.update_stats(self.lhs_calib.get_value(), lax.stop_gradient(x)))

  def _lhs_qparams(self, x, config: QatConfig) -> QParams:
    stats = self.lhs_stats.get_value() if self.lhs_stats is not None else None
    update = stats is not None and not self.use_running_average
    qp, new = common.activation_qparams(x, stats, config, update=update)
    if update:
      self.lhs_stats.set_value(new)
    return qp

  def freeze(self, method: CalibMethod | str = CalibMethod.PERCENTILE, *, percentile: float = 99.99) -> None:
    """Freezes the activation range from the calibration histogram with ``method``."""
    if self.lhs_calib is None:
      return
    qp = calibration.finalize_stats(
      self.lhs_calib.get_value(), self.lhs_config, CalibMethod(method), percentile=percentile
    )
    self.lhs_stats.set_value(common.freeze_activation_stats(self.lhs_stats.get_value(), qp))


class QatDotGeneral(_Quantizer):
  """A quantization-aware ``lax.dot_general`` for NNX layers' ``dot_general``.

  Args:
    lhs_config: activation config (default int8 asymmetric per-tensor), or None.
    rhs_config: kernel config (default int8 symmetric per-channel), or None.
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
    lhs_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG,
    rhs_config: QatConfig | None = common.DEFAULT_WEIGHT_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    use_running_average: bool = False,
  ):
    super().__init__(lhs_config, rhs_config, mode, momentum, use_running_average)

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    where = f"{type(self).__name__}"
    _check(self.mode, where)
    # A converted QatDense has no float kernel: it passes the kernel's shape alone.
    rhs_shape = rhs.shape if isinstance(rhs, jax.ShapeDtypeStruct) else jnp.shape(rhs)
    err = common.dot_shape_error(where, jnp.shape(lhs), rhs_shape, dimension_numbers)
    if err is not None:
      raise err
    (lc, rc), (lb, rb) = dimension_numbers
    lhs_cfg = common.operand_config(self.lhs_config, jnp.ndim(lhs), lc, lb)
    rhs_cfg = common.operand_config(self.rhs_config, len(rhs_shape), rc, rb)
    if self.rhs_serving is not None:
      entry = self.rhs_serving.get_value()
      wq = common.weight_from_serving(entry, rhs_cfg, rhs_shape)
      lhs_qp = QParams(**self.lhs_serving.get_value()) if self.lhs_serving is not None else None
      return common.serve_dot_general(
        lhs,
        wq,
        dimension_numbers,
        lhs_qp,
        lhs_cfg,
        rhs_sums=entry.get("sums"),
        preferred_element_type=preferred_element_type,
      )
    if isinstance(rhs, jax.ShapeDtypeStruct):
      raise ValueError(f"{where}: no kernel and no serving variables.")
    kwargs = dict(precision=precision, preferred_element_type=preferred_element_type)
    if out_sharding is not None:
      kwargs["out_sharding"] = out_sharding
    if self.mode == "float" or (lhs_cfg is None and rhs_cfg is None):
      return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
    if self.mode == "calibrate":
      self._observe(lhs)
      return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
    lhs_qp = self._lhs_qparams(lhs, lhs_cfg) if lhs_cfg is not None else None
    rhs_qp = qparams_lib.qparams_from_array(lax.stop_gradient(rhs), rhs_cfg) if rhs_cfg is not None else None
    return common.quantized_dot_general(lhs, rhs, dimension_numbers, lhs_qp, rhs_qp, lhs_cfg, rhs_cfg, **kwargs)

  def convert(self, kernel, contracting=(0,)) -> None:
    """Stores ``kernel`` quantized, and the frozen (or moving-average) activation range, for serving.

    After this the module serves with the integer path and ignores the float
    kernel it is given.
    """
    kernel = jnp.asarray(kernel)
    rhs_cfg = common.operand_config(self.rhs_config, kernel.ndim, contracting, ())
    if rhs_cfg is None:
      raise ValueError("QatDotGeneral.convert: rhs_config is None; there is no kernel to quantize.")
    wq = quantize(kernel, qparams_lib.qparams_from_array(kernel, rhs_cfg), rhs_cfg)
    lhs_cfg = self.lhs_config
    self.rhs_serving = QuantServing(common.serving_weight(wq, contracting, lhs_cfg))
    if lhs_cfg is not None and self.lhs_stats is not None:
      qp = common.serving_activation_qparams(self.lhs_stats.get_value(), lhs_cfg, type(self).__name__)
      self.lhs_serving = QuantServing({"scale": qp.scale, "zero_point": qp.zero_point})


class QatConvGeneralDilated(_Quantizer):
  """A quantization-aware ``lax.conv_general_dilated`` for ``nnx.Conv(conv_general_dilated=...)``."""

  def __init__(
    self,
    *,
    lhs_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG,
    rhs_config: QatConfig | None = common.DEFAULT_WEIGHT_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    use_running_average: bool = False,
  ):
    if lhs_config is not None and (lhs_config.per_channel or lhs_config.group_size is not None):
      raise ValueError(f"QatConvGeneralDilated: conv activations are quantized per tensor; got {lhs_config}.")
    super().__init__(lhs_config, rhs_config, mode, momentum, use_running_average)

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kwargs):
    _check(self.mode, type(self).__name__)
    conv = functools.partial(
      lax.conv_general_dilated,
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      **kwargs,
    )
    if self.mode == "float" or (self.lhs_config is None and self.rhs_config is None):
      return conv(lhs, rhs)
    if self.mode == "calibrate":
      self._observe(lhs)
      return conv(lhs, rhs)
    if self.lhs_config is not None:
      lhs = fake_quant(lhs, self._lhs_qparams(lhs, self.lhs_config), self.lhs_config)
    rhs_cfg = self.rhs_config
    if rhs_cfg is not None:
      rhs_cfg = common.conv_kernel_config(rhs_cfg, jnp.shape(lhs), jnp.shape(rhs), kwargs.get("dimension_numbers"))
      rhs = fake_quant(rhs, qparams_lib.qparams_from_array(lax.stop_gradient(rhs), rhs_cfg), rhs_cfg)
    return conv(lhs, rhs)


class QatDense(nnx.Linear):
  """``flax.nnx.Linear`` with quantization-aware training: same arguments and parameters.

  Adds ``weight_config`` (default int8, symmetric, per-channel),
  ``activation_config`` (default int8, asymmetric, per-tensor), ``mode`` and
  ``momentum``; statistics live in ``self.dot_general`` as ``QuantStat``.

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
    weight_config: QatConfig | None = common.DEFAULT_WEIGHT_CONFIG,
    activation_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    if "dot_general" in kwargs:
      raise ValueError("QatDense quantizes through its own QatDotGeneral; pass dot_general to nnx.Linear instead.")
    quant = QatDotGeneral(lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum)
    super().__init__(in_features, out_features, dot_general=quant, rngs=rngs, **kwargs)

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
    y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)) if bias is not None else y

  def convert(self) -> None:
    """Quantizes the kernel for serving and drops the float kernel (in place)."""
    if self.kernel is None:
      return
    self.dot_general.convert(self.kernel[...])
    self.kernel = None


class QatConv(nnx.Conv):
  """``flax.nnx.Conv`` with quantization-aware training: same arguments and parameters.

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
    weight_config: QatConfig | None = common.DEFAULT_WEIGHT_CONFIG,
    activation_config: QatConfig | None = common.DEFAULT_ACTIVATION_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    quant = QatConvGeneralDilated(lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum)
    super().__init__(in_features, out_features, kernel_size, conv_general_dilated=quant, rngs=rngs, **kwargs)


def _quantizers(model) -> Iterable[_Quantizer]:
  for _, m in nnx.iter_modules(model):
    if isinstance(m, _Quantizer):
      yield m


def set_mode(model, mode: str) -> None:
  """Sets the mode of every jqat quantizer in ``model``: ``"float"``, ``"calibrate"`` or ``"qat"``."""
  _check(mode, "set_mode")
  for q in _quantizers(model):
    q.mode = mode


def freeze(model, method: CalibMethod | str = CalibMethod.PERCENTILE, *, percentile: float = 99.99) -> None:
  """Freezes every activation range of ``model`` from its calibration histogram."""
  for q in _quantizers(model):
    q.freeze(method, percentile=percentile)


def calibrate(
  model, batches: Iterable, method: CalibMethod | str = CalibMethod.PERCENTILE, *, percentile: float = 99.99
) -> None:
  """Runs calibration batches through ``model``, freezes its activation ranges, and leaves it in QAT mode.

  Args:
    model: an NNX module using jqat layers; called as ``model(*batch)``.
    batches: an iterable of inputs (a tuple is passed as positional arguments).
    method: a ``CalibMethod``.
    percentile: for PERCENTILE.
  """

  @nnx.jit
  def step(m, batch):
    m(*batch) if isinstance(batch, tuple) else m(batch)

  set_mode(model, "calibrate")
  try:
    n = 0
    for batch in batches:
      step(model, batch)
      n += 1
    if n == 0:
      raise ValueError("calibrate got no batches.")
    freeze(model, method, percentile=percentile)
  finally:
    set_mode(model, "qat")


def convert(model) -> None:
  """Converts every quantized dense layer of ``model`` to serving, in place.

  ``QatDense`` layers keep their kernel quantized (int8, packed int4 or fp8
  values, scale, zero point) and drop the float kernel; a stock ``nnx.Linear``
  with a ``QatDotGeneral`` keeps its float kernel (it owns it) but serves from
  the quantized copy. Other layers with an injected ``QatDotGeneral`` keep
  their QAT forward. Activations are quantized with their frozen (or
  moving-average) range. Afterwards ``model(x)`` runs the integer path.

  Raises:
    ValueError: when an activation has neither a frozen range nor statistics.

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
  for _, m in list(nnx.iter_modules(model)):
    if isinstance(m, QatDense):
      m.convert()
    elif isinstance(m, nnx.Linear) and isinstance(m.dot_general, QatDotGeneral) and m.kernel is not None:
      m.dot_general.convert(m.kernel[...])

"""``QatConfig``: how one tensor is quantized. Frozen, hashable, validated."""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp

from jqat._src import formats
from jqat._src.formats import QuantBits

Axes = int | tuple[int, ...]


class Estimator(str, enum.Enum):
  """The gradient estimator of ``fake_quant``.

  * ``STE``: clipped straight-through estimator (Bengio et al. 2013): the
    gradient passes where the input lies inside the representable range and
    is zero outside; scale and zero point get no gradient.
  * ``LSQ``: learned step size (Esser et al. 2020): the clipped STE for the
    input, plus gradients for the scale and, when asymmetric, the zero point,
    so both can be trained as parameters.
  """

  STE = "ste"
  LSQ = "lsq"


class Rounding(str, enum.Enum):
  """How grid units ``u = x / scale`` round to an integer (integer formats only).

  * ``HALF_EVEN``: ``jnp.round``, ties to even, as PyTorch and NVIDIA's tools.
  * ``HALF_AWAY_FROM_ZERO``: C's ``roundf``; llama.cpp's Q8_0 (``np_roundf`` in
    the ``gguf`` package).
  * ``HALF_UP_UNSIGNED``: ties up, computed on the unsigned code:
    ``floor(u + (0.5 - qmin)) + qmin`` in the compute dtype; llama.cpp's Q4_0
    (``trunc(x / d + 8.5) - 8``). The addition of ``0.5 - qmin`` rounds in
    float32 exactly as the reference does, so the codes agree bit for bit.
  """

  HALF_EVEN = "half_even"
  HALF_AWAY_FROM_ZERO = "half_away_from_zero"
  HALF_UP_UNSIGNED = "half_up_unsigned"


class ScaleRule(str, enum.Enum):
  """How a symmetric scale comes from a block's values (integer formats only).

  * ``AMAX``: ``scale = amax / qmax``, evaluated as ``amax * (1 / qmax)``.
  * ``AMAX_EXACT``: ``scale = amax / qmax`` correctly rounded (the float32
    division of NumPy and C); llama.cpp's Q8_0 (``d = amax / 127``).
  * ``SIGNED_MAX``: ``scale = m / qmin``, ``m`` the block's value of largest
    magnitude with its sign (the first one on a tie), so that ``m`` lands
    exactly on ``qmin``; llama.cpp's Q4_0 (``d = m / -8``). The scale is
    negative where ``m`` is positive; its magnitude is never below
    ``MIN_SCALE``.
  """

  AMAX = "amax"
  AMAX_EXACT = "amax_exact"
  SIGNED_MAX = "signed_max"


# Dtypes a scale may be stored in (``QatConfig.scale_dtype``).
SCALE_DTYPES = ("float32", "float16", "bfloat16")


class CalibMethod(str, enum.Enum):
  """How calibration statistics become a range.

  ``KL`` is an alias of ``ENTROPY``.
  """

  MINMAX = "minmax"
  MOVING_AVERAGE = "moving_average"
  PERCENTILE = "percentile"
  ENTROPY = "entropy"
  KL = "entropy"
  MSE = "mse"

  @classmethod
  def _missing_(cls, value):
    if isinstance(value, str):
      value = value.lower().replace("-", "_")
      if value == "kl":
        return cls.ENTROPY
      for member in cls:
        if member.value == value:
          return member
    return None


def _allowed(enum_cls) -> str:
  return ", ".join(repr(m.value) for m in enum_cls)


def _error(field: str, value, allowed: str) -> ValueError:
  return ValueError(f"QatConfig.{field}={value!r} is invalid; allowed: {allowed}.")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatConfig:
  """How to quantize one tensor.

  Attributes:
    bits: the format: ``"int2"`` .. ``"int8"``, ``"fp8_e4m3"`` (alias
      ``"fp8"``) or ``"fp8_e5m2"``, or a ``QuantBits``. Stored as ``QuantBits``.
    per_channel: one scale per index of ``channel_axis`` instead of one for the
      whole tensor.
    symmetric: zero point fixed at 0 and the range ``[-amax, amax]``; when
      False, an asymmetric (affine) range with an integer zero point. fp8 is
      always symmetric.
    channel_axis: the axis (or axes) that keeps its own scales when
      ``per_channel``. Default -1: the output features of a Flax kernel
      ``(in, out)`` or HWIO conv kernel.
    group_size: when set, ``group_axis`` is split into blocks of this many
      elements, each with its own scale (per-group, also called block-wise or
      sub-channel). Combines with ``per_channel``.
    group_axis: the axis split into groups. Default 0: the contraction axis of
      a Flax kernel ``(in, out)``.
    narrow_range: integers use ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (``[-127, 127]``
      for int8) instead of the full ``[-2^(b-1), 2^(b-1) - 1]``.
    estimator: ``"ste"`` (clipped straight-through) or ``"lsq"`` (learned step
      size), see ``Estimator``.
    rounding: how grid units round, ``"half_even"`` (default),
      ``"half_away_from_zero"`` or ``"half_up_unsigned"``, see ``Rounding``.
      Integer formats only.
    scale_rule: how a symmetric scale comes from the values, ``"amax"``
      (default), ``"amax_exact"`` or ``"signed_max"``, see ``ScaleRule``.
    scale_dtype: None (default), or the dtype the scale is stored in
      (``"float16"``, ``"bfloat16"``, ``"float32"``): grid units use the scale
      as computed, dequantization the scale rounded to this dtype, as a file
      that stores it rounded (llama.cpp's fp16 ``d``) is read. ``QTensor.scale``
      holds the rounded scale.

  Raises:
    ValueError: at construction, naming the field, the value and what is allowed.

  Examples:
    >>> import jqat
    >>> cfg = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
    >>> cfg.bits, cfg.qmin, cfg.qmax
    (<QuantBits.INT4: 'int4'>, -8, 7)
    >>> jqat.QatConfig(bits="int9")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: QatConfig.bits='int9' is invalid; allowed: 'int2', 'int3', ..., 'fp8_e5m2' (or 'fp8' for 'fp8_e4m3').
  """

  bits: QuantBits | str = QuantBits.INT8
  per_channel: bool = False
  symmetric: bool = True
  channel_axis: Axes = -1
  group_size: int | None = None
  group_axis: int = 0
  narrow_range: bool = False
  estimator: Estimator | str = Estimator.STE
  rounding: Rounding | str = Rounding.HALF_EVEN
  scale_rule: ScaleRule | str = ScaleRule.AMAX
  scale_dtype: str | None = None

  def __post_init__(self):
    try:
      bits = QuantBits(self.bits)
    except ValueError:
      raise _error(
          "bits", self.bits, _allowed(QuantBits) + " (or 'fp8' for 'fp8_e4m3')"
      ) from None
    object.__setattr__(self, "bits", bits)
    try:
      estimator = Estimator(self.estimator)
    except ValueError:
      raise _error("estimator", self.estimator, _allowed(Estimator)) from None
    object.__setattr__(self, "estimator", estimator)
    try:
      rounding = Rounding(self.rounding)
    except ValueError:
      raise _error("rounding", self.rounding, _allowed(Rounding)) from None
    object.__setattr__(self, "rounding", rounding)
    try:
      scale_rule = ScaleRule(self.scale_rule)
    except ValueError:
      raise _error("scale_rule", self.scale_rule, _allowed(ScaleRule)) from None
    object.__setattr__(self, "scale_rule", scale_rule)
    if self.scale_dtype is not None:
      try:
        name = jnp.dtype(self.scale_dtype).name
      except (TypeError, ValueError):
        name = None
      if name not in SCALE_DTYPES:
        raise _error("scale_dtype", self.scale_dtype, "None, " + ", ".join(repr(d) for d in SCALE_DTYPES))
      # Stored as the dtype's name: a plain string keeps the config hashable and readable.
      object.__setattr__(self, "scale_dtype", name)

    for name in ("per_channel", "symmetric", "narrow_range"):
      if not isinstance(getattr(self, name), bool):
        raise _error(name, getattr(self, name), "True, False")

    axes = self.channel_axis
    if _is_int(axes):
      axes = (axes,)
    if (
        not isinstance(axes, tuple)
        or not axes
        or not all(_is_int(a) for a in axes)
        or len(set(axes)) != len(axes)
    ):
      raise _error("channel_axis", self.channel_axis, "an int or a non-empty tuple of distinct ints")
    object.__setattr__(self, "channel_axis", axes[0] if len(axes) == 1 else axes)

    if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
      raise _error("group_size", self.group_size, "None or a positive int")
    if not _is_int(self.group_axis):
      raise _error("group_axis", self.group_axis, "an int")
    if self.group_size is not None and self.per_channel and self.group_axis in axes:
      raise _error(
          "group_axis",
          self.group_axis,
          f"an axis other than channel_axis={self.channel_axis!r} (a channel cannot be split into groups of itself)",
      )
    if bits.is_float and not self.symmetric:
      raise _error("symmetric", self.symmetric, f"True for the float format {bits.value!r}")
    if bits.is_float and self.narrow_range:
      raise _error("narrow_range", self.narrow_range, f"False for the float format {bits.value!r}")
    if bits.is_float and rounding is not Rounding.HALF_EVEN:
      raise _error("rounding", rounding.value, f"'half_even' for the float format {bits.value!r} (fp8 rounds to even)")
    if scale_rule is not ScaleRule.AMAX:
      if bits.is_float:
        raise _error("scale_rule", scale_rule.value, f"'amax' for the float format {bits.value!r}")
      if not self.symmetric:
        raise _error("scale_rule", scale_rule.value, "'amax' for an asymmetric config (the rules are symmetric)")
    if scale_rule is ScaleRule.SIGNED_MAX:
      if self.narrow_range:
        raise _error(
            "narrow_range", self.narrow_range, "False with scale_rule='signed_max' (the largest value sits on qmin)"
        )
      if estimator is not Estimator.STE:
        raise _error(
            "estimator", estimator.value, "'ste' with scale_rule='signed_max' (a signed scale; LSQ keeps it positive)"
        )

  @property
  def channel_axes(self) -> tuple[int, ...]:
    """``channel_axis`` as a tuple."""
    a = self.channel_axis
    return (a,) if isinstance(a, int) else a

  @property
  def qmin(self) -> float | int:
    """Smallest quantized value: an int, or ``-max`` for fp8."""
    lo, _ = self._range()
    return lo

  @property
  def qmax(self) -> float | int:
    """Largest quantized value: an int, or the fp8 format's max."""
    _, hi = self._range()
    return hi

  def _range(self):
    if self.bits.is_float:
      m = self.bits.float_max
      return -m, m
    return formats.int_range(self.bits, self.narrow_range)

  @property
  def signed_scale(self) -> bool:
    """Whether the scale may be negative (``scale_rule="signed_max"``)."""
    return self.scale_rule is ScaleRule.SIGNED_MAX

  def replace(self, **changes) -> QatConfig:
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

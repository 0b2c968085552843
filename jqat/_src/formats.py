"""Number formats: signed integers of 2 to 8 bits and the two fp8 formats.

A format says which values a quantized tensor may hold (``qmin`` .. ``qmax``
for integers, ``±max`` for fp8) and which dtype stores them. Integers of 4 bits
or fewer are stored packed, two per byte (see ``jqat._src.qtensor``).
"""

from __future__ import annotations

import enum

import jax.numpy as jnp
import numpy as np


class QuantBits(str, enum.Enum):
  """The number formats jqat quantizes to.

  The value of each member is the string accepted by ``QatConfig(bits=...)``.

  Examples:
    >>> from jqat import QuantBits
    >>> QuantBits("int4").num_bits
    4
    >>> QuantBits.FP8_E4M3.is_float
    True
  """

  INT2 = "int2"
  INT3 = "int3"
  INT4 = "int4"
  INT5 = "int5"
  INT6 = "int6"
  INT7 = "int7"
  INT8 = "int8"
  FP8_E4M3 = "fp8_e4m3"
  FP8_E5M2 = "fp8_e5m2"

  @classmethod
  def _missing_(cls, value):
    # "fp8" is the common short name for the forward-pass format e4m3fn.
    if isinstance(value, str):
      value = value.lower()
      if value in ("fp8", "e4m3", "float8_e4m3fn", "fp8_e4m3fn"):
        return cls.FP8_E4M3
      if value in ("e5m2", "float8_e5m2"):
        return cls.FP8_E5M2
      for member in cls:
        if member.value == value:
          return member
    return None

  @property
  def is_float(self) -> bool:
    return self in (QuantBits.FP8_E4M3, QuantBits.FP8_E5M2)

  @property
  def num_bits(self) -> int:
    return 8 if self.is_float else int(self.value[3:])

  @property
  def is_packed(self) -> bool:
    """Whether values are stored two per byte (integers of 4 bits or fewer)."""
    return not self.is_float and self.num_bits <= 4

  @property
  def storage_dtype(self) -> jnp.dtype:
    """dtype of ``QTensor.values``: float8, uint8 (packed nibbles) or int8."""
    if self is QuantBits.FP8_E4M3:
      return jnp.dtype(jnp.float8_e4m3fn)
    if self is QuantBits.FP8_E5M2:
      return jnp.dtype(jnp.float8_e5m2)
    return jnp.dtype(jnp.uint8 if self.is_packed else jnp.int8)

  @property
  def float_dtype(self) -> jnp.dtype:
    """The ml_dtypes float8 dtype of an fp8 format."""
    if not self.is_float:
      raise ValueError(f"{self.value} is an integer format, it has no float8 dtype")
    return self.storage_dtype

  @property
  def float_max(self) -> float:
    """Largest finite value of an fp8 format: 448 (e4m3fn) or 57344 (e5m2)."""
    return float(jnp.finfo(self.float_dtype).max)


def int_range(bits: QuantBits, narrow_range: bool = False) -> tuple[int, int]:
  """(qmin, qmax) of a signed integer format.

  Full range is ``[-2^(b-1), 2^(b-1) - 1]``; narrow range drops the most
  negative value so the grid is symmetric (``[-127, 127]`` for int8).

  Examples:
    >>> from jqat import QuantBits
    >>> int_range(QuantBits.INT8)
    (-128, 127)
    >>> int_range(QuantBits.INT4, narrow_range=True)
    (-7, 7)
  """
  if bits.is_float:
    raise ValueError(f"{bits.value} is a float format; it has no integer range")
  b = bits.num_bits
  qmax = 2 ** (b - 1) - 1
  qmin = -qmax if narrow_range else -(2 ** (b - 1))
  return qmin, qmax


def qrange(bits: QuantBits, narrow_range: bool = False) -> tuple[float, float]:
  """The representable range of the quantized values, integer or fp8."""
  if bits.is_float:
    m = bits.float_max
    return -m, m
  qmin, qmax = int_range(bits, narrow_range)
  return float(qmin), float(qmax)


def compute_dtype(dtype) -> np.dtype:
  """The dtype quantization arithmetic runs in: float32, or float64 for float64.

  bfloat16 and float16 inputs are quantized in float32 so that ``x / scale``
  is not rounded twice; the result is cast back to the input dtype.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    return dtype
  return jnp.dtype(jnp.float32)

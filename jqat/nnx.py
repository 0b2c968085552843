"""jqat for Flax NNX: quantization-aware layers, modes and calibration."""

from jqat._src.flax.nnx import QatConv as QatConv
from jqat._src.flax.nnx import QatConvGeneralDilated as QatConvGeneralDilated
from jqat._src.flax.nnx import QatDense as QatDense
from jqat._src.flax.nnx import QatDotGeneral as QatDotGeneral
from jqat._src.flax.nnx import QuantServing as QuantServing
from jqat._src.flax.nnx import QuantStat as QuantStat
from jqat._src.flax.nnx import calibrate as calibrate
from jqat._src.flax.nnx import convert as convert
from jqat._src.flax.nnx import freeze as freeze
from jqat._src.flax.nnx import set_mode as set_mode

__all__ = (
  "QatConv",
  "QatConvGeneralDilated",
  "QatDense",
  "QatDotGeneral",
  "QuantServing",
  "QuantStat",
  "calibrate",
  "convert",
  "freeze",
  "set_mode",
)

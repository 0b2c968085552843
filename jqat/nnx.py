"""jqat for Flax NNX: quantization-aware layers, modes, calibration, conversion, PTQ and quantize_model."""

from jqat._src.flax.attention import AttentionQuantConfig as AttentionQuantConfig
from jqat._src.flax.nnx import KernelShape as KernelShape
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
from jqat._src.flax.nnx_attention import QatMultiHeadAttention as QatMultiHeadAttention
from jqat._src.flax.nnx_attention import dot_product_attention as dot_product_attention
from jqat._src.flax.nnx_attention import quantized_attention as quantized_attention
from jqat._src.flax.nnx_layers import QatEinsum as QatEinsum
from jqat._src.flax.nnx_layers import QatEinsumOp as QatEinsumOp
from jqat._src.flax.nnx_layers import QatEmbed as QatEmbed
from jqat._src.flax.nnx_ptq import ptq as ptq
from jqat._src.flax.nnx_quantize import quantize_model as quantize_model
from jqat._src.flax.nnx_quantize import report as report

__all__ = (
  "AttentionQuantConfig",
  "QatMultiHeadAttention",
  "dot_product_attention",
  "quantized_attention",
  "KernelShape",
  "QatConv",
  "QatConvGeneralDilated",
  "QatDense",
  "QatDotGeneral",
  "QatEinsum",
  "QatEinsumOp",
  "QatEmbed",
  "QuantServing",
  "QuantStat",
  "calibrate",
  "convert",
  "freeze",
  "ptq",
  "quantize_model",
  "report",
  "set_mode",
)

"""jqat for Flax linen: quantization-aware layers and whole-model calibration."""

from jqat._src.flax.attention import AttentionQuantConfig as AttentionQuantConfig
from jqat._src.flax.attention import QatAttention as QatAttention
from jqat._src.flax.attention import dot_product_attention as dot_product_attention
from jqat._src.flax.attention import quantized_attention as quantized_attention
from jqat._src.flax.linen import QatConv as QatConv
from jqat._src.flax.linen import QatConvGeneralDilated as QatConvGeneralDilated
from jqat._src.flax.linen import QatDense as QatDense
from jqat._src.flax.linen import QatDotGeneral as QatDotGeneral
from jqat._src.flax.linen import calibrate as calibrate
from jqat._src.flax.linen import convert as convert
from jqat._src.flax.linen import freeze as freeze
from jqat._src.flax.linen_layers import QatEinsum as QatEinsum
from jqat._src.flax.linen_layers import QatEmbed as QatEmbed
from jqat._src.flax.linen_ptq import ptq as ptq
from jqat._src.flax.linen_quantize import quantize_model as quantize_model
from jqat._src.flax.linen_quantize import report as report
from jqat._src.flax.sharding import serving_partition_specs as serving_partition_specs

__all__ = (
  "AttentionQuantConfig",
  "QatAttention",
  "dot_product_attention",
  "quantized_attention",
  "QatConv",
  "QatConvGeneralDilated",
  "QatDense",
  "QatDotGeneral",
  "QatEinsum",
  "QatEmbed",
  "calibrate",
  "convert",
  "freeze",
  "ptq",
  "quantize_model",
  "report",
  "serving_partition_specs",
)

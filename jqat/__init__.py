"""jqat: quantization-aware training and integer inference for JAX and Flax."""

from jqat._src.config import CalibMethod as CalibMethod
from jqat._src.config import Estimator as Estimator
from jqat._src.config import QatConfig as QatConfig
from jqat._src.fake_quant import fake_quant as fake_quant
from jqat._src.fake_quant import lsq_grad_scale as lsq_grad_scale
from jqat._src.formats import QuantBits as QuantBits
from jqat._src.qparams import MIN_SCALE as MIN_SCALE
from jqat._src.qparams import QParams as QParams
from jqat._src.qparams import array_range as array_range
from jqat._src.qparams import params_shape as params_shape
from jqat._src.qparams import qparams_from_array as qparams_from_array
from jqat._src.qparams import qparams_from_range as qparams_from_range
from jqat._src.qtensor import QTensor as QTensor
from jqat._src.qtensor import dequantize as dequantize
from jqat._src.qtensor import pack_int4 as pack_int4
from jqat._src.qtensor import quantize as quantize
from jqat._src.qtensor import unpack_int4 as unpack_int4

__version__ = "0.1.0"

__all__ = (
    "CalibMethod",
    "Estimator",
    "MIN_SCALE",
    "QParams",
    "QTensor",
    "QatConfig",
    "QuantBits",
    "array_range",
    "dequantize",
    "fake_quant",
    "lsq_grad_scale",
    "pack_int4",
    "params_shape",
    "qparams_from_array",
    "qparams_from_range",
    "quantize",
    "unpack_int4",
)

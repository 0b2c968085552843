"""jqat: quantization-aware training and integer inference for JAX and Flax."""

from jqat._src.calibration.histogram import HistogramState as HistogramState
from jqat._src.calibration.moments import MomentsState as MomentsState
from jqat._src.calibration.moments import moments_all_reduce as moments_all_reduce
from jqat._src.calibration.moments import moments_init as moments_init
from jqat._src.calibration.moments import moments_mean_abs as moments_mean_abs
from jqat._src.calibration.moments import moments_merge as moments_merge
from jqat._src.calibration.moments import moments_update as moments_update
from jqat._src.calibration.range_stats import MovingAverageState as MovingAverageState
from jqat._src.calibration.range_stats import RangeState as RangeState
from jqat._src.calibration.search import entropy_amax as entropy_amax
from jqat._src.calibration.search import entropy_divergences as entropy_divergences
from jqat._src.calibration.search import mse_amax as mse_amax
from jqat._src.calibration.search import percentile_amax as percentile_amax
from jqat._src.calibration.stats import all_reduce_stats as all_reduce_stats
from jqat._src.calibration.stats import check_percentile as check_percentile
from jqat._src.calibration.stats import finalize_stats as finalize_stats
from jqat._src.calibration.stats import init_stats as init_stats
from jqat._src.calibration.stats import merge_stats as merge_stats
from jqat._src.calibration.stats import nonfinite_count as nonfinite_count
from jqat._src.calibration.stats import update_stats as update_stats
from jqat._src.calibration.tree import QuantizationSpec as QuantizationSpec
from jqat._src.calibration.tree import calibrate_model as calibrate_model
from jqat._src.calibration.tree import finalize as finalize
from jqat._src.calibration.tree import init as init_tree
from jqat._src.calibration.tree import merge as merge
from jqat._src.calibration.tree import observe as observe
from jqat._src.checkpoint import checkpoint_state as checkpoint_state
from jqat._src.checkpoint import restore_checkpoint as restore_checkpoint
from jqat._src.checkpoint import restored_state as restored_state
from jqat._src.checkpoint import save_checkpoint as save_checkpoint
from jqat._src.config import CalibMethod as CalibMethod
from jqat._src.config import Estimator as Estimator
from jqat._src.config import QatConfig as QatConfig
from jqat._src.export import export as export
from jqat._src.fake_quant import fake_quant as fake_quant
from jqat._src.fake_quant import lsq_grad_scale as lsq_grad_scale
from jqat._src.flax.sharding import serving_partition_specs as serving_partition_specs
from jqat._src.formats import QuantBits as QuantBits
from jqat._src.int_ops import accumulator_bound as accumulator_bound
from jqat._src.int_ops import int_conv_general_dilated as int_conv_general_dilated
from jqat._src.int_ops import int_dot_accumulator as int_dot_accumulator
from jqat._src.int_ops import int_dot_general as int_dot_general
from jqat._src.int_ops import int_matmul as int_matmul
from jqat._src.int_ops import weight_only_matmul as weight_only_matmul
from jqat._src.int_ops import weight_sums as weight_sums
from jqat._src.int_ops import with_weight_sums as with_weight_sums
from jqat._src.kv_cache import KVCacheConfig as KVCacheConfig
from jqat._src.kv_cache import kv_dequantize as kv_dequantize
from jqat._src.kv_cache import kv_quantize as kv_quantize
from jqat._src.kv_cache import kv_values as kv_values
from jqat._src.kv_cache import kv_write as kv_write
from jqat._src.ptq.awq import awq as awq
from jqat._src.ptq.fold import fold_into_dense as fold_into_dense
from jqat._src.ptq.fold import fold_into_layernorm as fold_into_layernorm
from jqat._src.ptq.gptq import gptq as gptq
from jqat._src.ptq.smoothquant import smooth_quant_scales as smooth_quant_scales
from jqat._src.qat_dot import qat_dot_general as qat_dot_general
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
from jqat._src.rules import Rule as Rule
from jqat._src.sharding import qtensor_partition_spec as qtensor_partition_spec

__version__ = "0.1.0"


def __getattr__(name):
  # The Flax layers and the hand-off formats load on first use, so the core imports without Flax, gguf or torch.
  if name in ("linen", "nnx", "gguf", "compressed_tensors"):
    import importlib

    return importlib.import_module(f"jqat.{name}")
  raise AttributeError(f"module 'jqat' has no attribute {name!r}")


__all__ = (
    "CalibMethod",
    "Estimator",
    "HistogramState",
    "KVCacheConfig",
    "MIN_SCALE",
    "MomentsState",
    "MovingAverageState",
    "QParams",
    "QTensor",
    "QatConfig",
    "QuantBits",
    "QuantizationSpec",
    "RangeState",
    "Rule",
    "accumulator_bound",
    "all_reduce_stats",
    "array_range",
    "awq",
    "calibrate_model",
    "check_percentile",
    "checkpoint_state",
    "dequantize",
    "entropy_amax",
    "entropy_divergences",
    "export",
    "fake_quant",
    "finalize",
    "finalize_stats",
    "fold_into_dense",
    "fold_into_layernorm",
    "gptq",
    "init_stats",
    "init_tree",
    "int_conv_general_dilated",
    "int_dot_accumulator",
    "int_dot_general",
    "int_matmul",
    "kv_dequantize",
    "kv_quantize",
    "kv_values",
    "kv_write",
    "lsq_grad_scale",
    "merge",
    "merge_stats",
    "moments_all_reduce",
    "moments_init",
    "moments_mean_abs",
    "moments_merge",
    "moments_update",
    "mse_amax",
    "nonfinite_count",
    "observe",
    "pack_int4",
    "params_shape",
    "percentile_amax",
    "qat_dot_general",
    "qparams_from_array",
    "qparams_from_range",
    "qtensor_partition_spec",
    "quantize",
    "restore_checkpoint",
    "restored_state",
    "save_checkpoint",
    "serving_partition_specs",
    "smooth_quant_scales",
    "unpack_int4",
    "update_stats",
    "weight_only_matmul",
    "weight_sums",
    "with_weight_sums",
)

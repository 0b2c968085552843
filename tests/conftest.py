"""Shared test settings and an independent NumPy reference of the quantization numerics.

The reference is written from the formulas (DESIGN.md "Numerics, exactly"), in float32 NumPy so that it can be
compared bit for bit with the float32 JAX arithmetic; it maps each element to its scale with explicit index
arithmetic instead of the reshapes the library uses.
"""

import types

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Each example runs a few small XLA computations: no deadline (the first example compiles), and few examples
# so the whole suite stays fast on two cores.
settings.register_profile(
  "jqat", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("jqat")

_FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0)}


def ref_qrange(bits: str, narrow_range: bool = False):
  """(qmin, qmax): signed b-bit integers, or ±max of an fp8 format."""
  if bits in _FP8:
    m = _FP8[bits][1]
    return -m, m
  b = int(bits[3:])
  qmax = 2 ** (b - 1) - 1
  return (-qmax if narrow_range else -(2 ** (b - 1))), qmax


def ref_param_index(shape, *, per_channel=False, channel_axis=-1, group_size=None, group_axis=0):
  """(params shape, per-element index into the params) for a tensor of ``shape``."""
  ndim = len(shape)
  chan = set()
  if per_channel:
    axes = channel_axis if isinstance(channel_axis, tuple) else (channel_axis,)
    chan = {a % ndim for a in axes}
  g = None if group_size is None else group_axis % ndim
  pshape = []
  for a in range(ndim):
    if a == g:
      pshape.append(shape[a] // group_size)
    elif a in chan:
      pshape.append(shape[a])
    else:
      pshape.append(1)
  grids = np.indices(shape)
  index = []
  for a in range(ndim):
    if a == g:
      index.append(grids[a] // group_size)
    elif a in chan:
      index.append(grids[a])
    else:
      index.append(np.zeros(shape, np.intp))
  if not chan and g is None:
    pshape = []  # per tensor: a scalar
  return tuple(pshape), tuple(index)


def _full_rank(p, ndim: int) -> np.ndarray:
  """A parameter with leading size-1 axes added up to ``ndim`` (a per-tensor scalar becomes (1, ..., 1))."""
  p = np.asarray(p)
  return p.reshape((1,) * (ndim - p.ndim) + p.shape)


def ref_array_range(x, **granularity):
  """(min, max) of ``x`` per scale, accumulated element by element."""
  x = np.asarray(x, np.float32)
  pshape, index = ref_param_index(x.shape, **granularity)
  full = tuple(int(i.max()) + 1 for i in index) if x.size else (1,) * x.ndim
  lo = np.full(full, np.inf, np.float32)
  hi = np.full(full, -np.inf, np.float32)
  np.minimum.at(lo, index, x)
  np.maximum.at(hi, index, x)
  return lo.reshape(pshape), hi.reshape(pshape)


def ref_qparams(lo, hi, bits: str, symmetric: bool, narrow_range: bool = False):
  """Scale and zero point of DESIGN.md, in float32, each ``a / b`` taken as ``a * (1 / b)`` as the library does."""
  f = np.float32
  lo = np.minimum(np.asarray(lo, f), f(0))
  hi = np.maximum(np.asarray(hi, f), f(0))
  qmin, qmax = ref_qrange(bits, narrow_range)
  eps = np.finfo(np.float32).tiny  # MIN_SCALE: the scale of a degenerate range
  if symmetric:
    scale = np.maximum(np.maximum(-lo, hi) * f(1.0 / qmax), eps).astype(f)
    zp = np.zeros_like(scale)
  else:
    scale = np.maximum((hi - lo) * f(1.0 / (qmax - qmin)), eps).astype(f)
    zp = np.clip(f(qmin) - np.round(lo * (f(1) / scale)), qmin, qmax).astype(f)
  return scale, zp


def ref_grid(xs, zp, bits: str, narrow_range: bool = False):
  """Quantized values (as floats) of ``xs = x / scale``."""
  qmin, qmax = ref_qrange(bits, narrow_range)
  if bits in _FP8:
    dt, m = _FP8[bits]
    return np.clip(xs, -m, m).astype(dt).astype(xs.dtype)
  return np.clip(np.round(xs) + zp, qmin, qmax).astype(xs.dtype)


def ref_fake_quant(x, scale, zp, bits: str, narrow_range: bool = False, **granularity):
  """(q - zp) * s with q on the grid; ``scale`` and ``zp`` in the parameter layout of ``granularity``."""
  x = np.asarray(x)
  cd = np.float64 if x.dtype == np.float64 else np.float32
  _, index = ref_param_index(x.shape, **granularity)
  s = _full_rank(np.asarray(scale, cd), x.ndim)[index]
  z = _full_rank(np.asarray(zp, cd), x.ndim)[index]
  xs = x.astype(cd) * (cd(1) / s)  # x / s, as the library evaluates it (see to_grid_units)
  q = ref_grid(xs, z, bits, narrow_range)
  return ((q - z) * s).astype(x.dtype)


def ref_int_values(x, scale, zp, bits: str, narrow_range: bool = False, **granularity):
  """The quantized values themselves (integers, or fp8 values as float32)."""
  x = np.asarray(x, np.float32)
  _, index = ref_param_index(x.shape, **granularity)
  s = _full_rank(np.asarray(scale, np.float32), x.ndim)[index]
  z = _full_rank(np.asarray(zp, np.float32), x.ndim)[index]
  return ref_grid(x * (np.float32(1) / s), z, bits, narrow_range)


def ref_near_ties(scale, k_range=(-140, 140), ulps=3):
  """Inputs whose x / scale lies within a few ulps of k + 1/2: where x / s and x * (1/s) can round differently."""
  f = np.float32
  base = (np.arange(*k_range).astype(f) + f(0.5)) * f(scale)
  out, up, down = [base], base, base
  for _ in range(ulps):
    up, down = np.nextafter(up, f(np.inf)), np.nextafter(down, f(-np.inf))
    out += [up, down]
  return np.concatenate(out)


@pytest.fixture(scope="session")
def ref():
  """The NumPy reference, as a namespace."""
  return types.SimpleNamespace(
    qrange=ref_qrange,
    param_index=ref_param_index,
    full_rank=_full_rank,
    array_range=ref_array_range,
    qparams=ref_qparams,
    grid=ref_grid,
    fake_quant=ref_fake_quant,
    int_values=ref_int_values,
    near_ties=ref_near_ties,
  )


# Whole examples, multi-process / eight-device subprocess runs, optional-dependency tests and the longest training
# loops: they are marked slow,
# so the README's test command (``-m "not slow"``) stays within a few minutes on two cores; .ci/run runs them
# too, as a second step.
SLOW_FILES = {
  "test_example_char_lm.py",
  "test_example_digits.py",
  "test_example_ptq_lm.py",
  "test_example_quantize_any_model.py",
  "test_multihost.py",
  "test_nnx_sharding.py",
  "test_handoff_real_models.py",
  # Optional dependencies (orbax-checkpoint, flatbuffers, gguf, torch + compressed-tensors) and the GPU script's
  # CPU smoke run: CI installs them and runs these in its second step.
  "test_checkpoint_orbax.py",
  "test_export.py",
  "test_gguf.py",
  "test_compressed_tensors.py",
  "test_gpu_check.py",
}
SLOW_FIXTURES = {"sharded"}  # tests/test_sharding.py's eight-device subprocess
# Training loops and end-to-end layer runs of 10 s or more on two cores.
SLOW_TESTS = {
  "test_linen.py::test_attention_with_injected_qat_dot_general_trains",
  "test_linen.py::test_optax_training_learns_digits_without_recompiling",
  "test_linen_lifecycle.py::test_canonical_train_state_loop_learns_digits_as_dense_does",
  "test_linen_lifecycle.py::test_params_only_apply_of_a_module_built_in_setup",
  "test_nnx.py::test_conv_and_injected_dot_general",
  "test_nnx_quantize_model.py::test_train_calibrate_convert_serve",
  "test_qat_dot.py::test_operands_with_their_own_range_skip_the_all_ones_mask",
  "test_serving.py::test_conv_serves_with_an_integer_convolution",
  "test_serving.py::test_serving_matches_qat_forward",
  "test_linen_lifecycle.py::test_serving_variables_record_format_and_layout",
  "test_linen_quantize_model.py::test_lsq_rule_under_a_param_override_that_needs_a_shape",
  "test_linen_einsum_embed.py::test_qat_einsum_with_bias_calibrates_converts_and_serves_the_integer_path",
  "test_nnx_quantize_model.py::test_einsum_op_under_jit_and_grad",
  "attention.py::jqat._src.flax.attention.QatAttention",
  "attention.py::jqat._src.flax.attention.quantized_attention",
  "nnx_attention.py::jqat._src.flax.nnx_attention.QatMultiHeadAttention",
  "test_nnx_lifecycle.py::test_serving_variables_of_another_layout_raise",
  "test_linen_einsum_embed.py::test_tied_embedding_serves_one_quantized_table",
  # Fresh-process and eight-device runs of the hand-off formats.
  "test_checkpoint_orbax.py::test_round_trip_and_resume_in_a_fresh_process",
  "test_checkpoint_orbax.py::test_restore_onto_eight_devices_is_sharded",
  "test_checkpoint_orbax.py::test_corrupt_or_truncated_checkpoints_raise",
  "test_export.py::test_round_trip_in_a_process_without_jqat_or_flax",
  "test_gguf.py::test_qat_dense_trains_on_the_files_grid",
  "test_gguf.py::test_round_trip_in_a_fresh_process",
  "test_compressed_tensors.py::test_nnx_model_with_names",
  "test_compare_peers.py::test_compile_section_times_each_step_against_float",
  "test_decode_step.py::test_quantized_step_equals_attention_over_the_written_cache",
  "test_compressed_tensors.py::test_converted_linen_model",
  "test_compressed_tensors.py::test_layers_that_are_not_dense_can_be_left_out",
  # The slowest of the README command's tests (4-13 s each on two cores): CI runs them in its second step.
  "test_linen_injected_convert.py::test_injected_dot_general_drops_its_kernel",
  "test_linen_injected_convert.py::test_kernel_cast_by_the_layer_stays_and_serves",
  "test_linen_injected_convert.py::test_injected_conv_drops_its_kernel",
  "test_serving_property.py::test_integer_serving_equals_fake_quant_forward",
  "test_linen.py::test_bfloat16_compute_dtype",
  "test_linen.py::test_conv_trains_on_digits",
  "test_linen.py::test_serialization_round_trip_of_params_and_stats",
  "test_linen_lifecycle.py::test_params_only_apply_is_the_first_batch_behaviour",
  "test_linen_lifecycle.py::test_restoring_serving_variables_into_a_layer_of_another_width_raises",
  "test_linen_lifecycle.py::test_calibrate_with_per_token_activations",
  "test_serving.py::test_int4_kernel_is_packed_two_per_byte",
  "test_serving.py::test_convert_after_calibration_uses_frozen_ranges",
  "test_linen_quantize_model.py::test_scan_stacked_layers_calibrate_convert_and_serve",
  "test_linen_quantize_model.py::test_weight_first_equations_match_the_fake_quant_reference",
  "test_nnx_lifecycle.py::test_serving_variables_record_their_layout",
  "attention.py::jqat._src.flax.attention.dot_product_attention",
  "nnx_attention.py::jqat._src.flax.nnx_attention.dot_product_attention",
  "test_linen_quantize_model.py::test_same_parameter_tree_and_values_so_float_checkpoints_load",
  "test_linen_quantize_model.py::test_a_rule_that_matches_nothing_raises_listing_the_paths",
  "test_linen_ptq.py::test_smoothquant_w8a8_served_equals_simulation_and_beats_plain",
  "test_nnx_quantize_model.py::test_serving_bytes_after_convert",
  "test_nnx_quantize_model.py::test_conv_serves_with_an_integer_convolution",
  "test_linen_lifecycle.py::test_convert_is_idempotent",
  "test_linen.py::test_lsq_scales_are_parameters_and_train",
  "test_serving.py::test_save_and_load_round_trip_keeps_integer_dtypes_and_size",
  "test_serving.py::test_serving_hlo_has_integer_dot_with_int32_result",
  "test_serving.py::test_serving_writes_the_output_once_after_the_int8_dot",
  "test_linen.py::test_wrong_input_shape_names_the_layer",
  "test_linen.py::test_param_trees_identical_to_dense",
  "test_linen_quantize_model.py::test_every_op_kind_is_quantized_and_served_equals_qat_with_s8_dots",
  "test_nan_propagation.py::test_qat_kernel_columns_that_hold_nan_are_marked_in_large_layers",
  "test_nnx_lifecycle.py::test_nan_in_the_input_shows_in_the_output_rows_it_touches",
  "test_serving.py::test_injected_dot_general_in_stock_dense_serves_from_quantized_copy",
  "test_nnx_ptq.py::test_smoothquant_w8a8_served_equals_simulation_and_beats_plain",
  "test_linen_lifecycle.py::test_mode_calibrate_observes_like_a_mutable_quant_calib",
  "test_nnx_quantize_model.py::test_qat_einsum_per_channel_axes_are_the_kernel_free_axes",
  "test_linen.py::test_ste_gradient_of_layer_matches_masked_float_gradient",
  "test_linen.py::test_gradients_finite_and_reach_kernels",
  "test_linen_injected_convert.py::test_quantize_model_keeps_injected_kernels_as_before",
  "test_linen_quantize_model.py::test_remat_and_share_scope",
  "test_linen_quantize_model.py::test_first_rule_wins_and_a_float_rule_keeps_the_layer_float",
}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    slow_test = f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS
    if slow_test or item.path.name in SLOW_FILES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)

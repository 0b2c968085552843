"""Tests for jqat._src.formats: ranges, dtypes and the grid mapping of every format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqat._src import formats
from jqat._src.config import QatConfig
from jqat._src.formats import QuantBits
from jqat._src.numerics import quantize_grid

# (qmin, qmax) full and narrow, written out by hand.
INT_RANGES = {
  "int2": ((-2, 1), (-1, 1)),
  "int3": ((-4, 3), (-3, 3)),
  "int4": ((-8, 7), (-7, 7)),
  "int5": ((-16, 15), (-15, 15)),
  "int6": ((-32, 31), (-31, 31)),
  "int7": ((-64, 63), (-63, 63)),
  "int8": ((-128, 127), (-127, 127)),
}


@pytest.mark.parametrize("bits", sorted(INT_RANGES))
def test_int_range(bits):
  full, narrow = INT_RANGES[bits]
  assert formats.int_range(QuantBits(bits)) == full
  assert formats.int_range(QuantBits(bits), narrow_range=True) == narrow
  assert formats.qrange(QuantBits(bits)) == (float(full[0]), float(full[1]))


def test_int4_range_matches_jnp_int4():
  info = jnp.iinfo(jnp.int4)
  assert formats.int_range(QuantBits.INT4) == (int(info.min), int(info.max))


@pytest.mark.parametrize(
  ("bits", "fmax", "dtype"),
  [("fp8_e4m3", 448.0, jnp.float8_e4m3fn), ("fp8_e5m2", 57344.0, jnp.float8_e5m2)],
)
def test_float_formats(bits, fmax, dtype):
  b = QuantBits(bits)
  assert b.is_float and not b.is_packed
  assert b.num_bits == 8
  assert b.float_max == fmax
  assert b.float_dtype == jnp.dtype(dtype)
  assert b.storage_dtype == jnp.dtype(dtype)
  assert formats.qrange(b) == (-fmax, fmax)
  with pytest.raises(ValueError, match=bits):
    formats.int_range(b)


@pytest.mark.parametrize(
  ("bits", "num_bits", "packed", "storage"),
  [
    ("int2", 2, True, jnp.uint8),
    ("int3", 3, True, jnp.uint8),
    ("int4", 4, True, jnp.uint8),
    ("int5", 5, False, jnp.int8),
    ("int6", 6, False, jnp.int8),
    ("int7", 7, False, jnp.int8),
    ("int8", 8, False, jnp.int8),
  ],
)
def test_int_format_properties(bits, num_bits, packed, storage):
  b = QuantBits(bits)
  assert b.num_bits == num_bits
  assert b.is_packed is packed
  assert not b.is_float
  assert b.storage_dtype == jnp.dtype(storage)
  with pytest.raises(ValueError, match=bits):
    _ = b.float_dtype


@pytest.mark.parametrize(
  ("name", "member"),
  [
    ("fp8", QuantBits.FP8_E4M3),
    ("FP8", QuantBits.FP8_E4M3),
    ("e4m3", QuantBits.FP8_E4M3),
    ("float8_e4m3fn", QuantBits.FP8_E4M3),
    ("e5m2", QuantBits.FP8_E5M2),
    ("float8_e5m2", QuantBits.FP8_E5M2),
    ("INT8", QuantBits.INT8),
    ("int4", QuantBits.INT4),
  ],
)
def test_aliases(name, member):
  assert QuantBits(name) is member


@pytest.mark.parametrize("bad", ["int9", "int1", "fp16", 8, None])
def test_unknown_format(bad):
  with pytest.raises(ValueError):
    QuantBits(bad)


@pytest.mark.parametrize(
  ("dtype", "expected"),
  [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32), (np.float64, np.float64)],
)
def test_compute_dtype(dtype, expected):
  assert formats.compute_dtype(dtype) == jnp.dtype(expected)


# --- the grid mapping: hand-computed values ------------------------------------------------------------------------


def _grid(xs, bits, zp=0.0, narrow_range=False):
  cfg = QatConfig(bits=bits, narrow_range=narrow_range)
  out = jax.jit(quantize_grid, static_argnums=2)(jnp.asarray(xs, jnp.float32), jnp.float32(zp), cfg)
  return np.asarray(out).tolist()


def test_int_grid_rounds_half_to_even():
  assert _grid([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001], "int8") == [0, 2, 2, -0, -2, -2, 2, 3]


def test_int_grid_clips():
  assert _grid([-200.0, 200.0, -128.4, 127.4], "int8") == [-128, 127, -128, 127]
  assert _grid([-200.0, 200.0, -127.6], "int8", narrow_range=True) == [-127, 127, -127]
  assert _grid([-8.5, -8.4, 7.4, 7.6, 100.0], "int4") == [-8, -8, 7, 7, 7]
  assert _grid([-8.0, 8.0], "int4", narrow_range=True) == [-7, 7]
  assert _grid([-3.0, -1.6, 0.4, 1.6], "int2") == [-2, -2, 0, 1]


def test_int_grid_adds_zero_point_before_clipping():
  # round(x / s) + z, then clip: with z = -64, x/s = 100 gives 36 and x/s = 250 clips at 127.
  assert _grid([100.0, 250.0, -70.0], "int8", zp=-64.0) == [36, 127, -128]


def test_fp8_e4m3_grid():
  # Values of ALGORITHMS.md §5: 464 rounds down to 448; 465 would be NaN on a plain cast but is clipped first.
  xs = [464.0, 465.0, 1000.0, -1000.0, 4.25, 4.75, 2.0**-10, 1.5 * 2.0**-9, 0.0]
  assert _grid(xs, "fp8_e4m3") == [448.0, 448.0, 448.0, -448.0, 4.0, 5.0, 0.0, 2.0**-8, 0.0]


def test_fp8_e4m3_mantissa_carry():
  # 1.97 is closest to 2.0 (the grid near 2 is 1.875, 2.0): the mantissa carries into the exponent.
  assert _grid([1.97, -1.97, 1.9], "fp8_e4m3") == [2.0, -2.0, 1.875]


def test_fp8_e5m2_grid():
  xs = [61439.0, 61440.0, 1e6, -1e6, 57344.0]
  assert _grid(xs, "fp8_e5m2") == [57344.0, 57344.0, 57344.0, -57344.0, 57344.0]


def test_plain_cast_does_not_saturate():
  # The reason quantize_grid clips: this is what it would produce otherwise.
  assert np.isnan(float(jnp.float32(465.0).astype(jnp.float8_e4m3fn)))
  assert np.isinf(float(jnp.float32(61440.0).astype(jnp.float8_e5m2)))


@pytest.mark.parametrize("bits", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_grid_matches_ml_dtypes_cast(bits):
  # Every finite fp8 value, every midpoint between neighbours and a few ulps either side (the ties and near-ties,
  # subnormals included), and random values of all magnitudes: the same as ml_dtypes' round-to-nearest-even cast.
  b = QuantBits(bits)
  dt = np.dtype(b.float_dtype)
  grid = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
  grid = np.unique(grid[np.isfinite(grid)])
  mids = (grid[1:] + grid[:-1]) / 2
  xs, up, down = [grid, mids], mids, mids
  for _ in range(3):
    up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
    xs += [up, down]
  rng = np.random.default_rng(0)
  xs.append((rng.standard_normal(20000) * rng.choice([1e-4, 1e-2, 1.0, 30.0, 300.0, 3e4], 20000)).astype(np.float32))
  x = np.clip(np.concatenate(xs), -b.float_max, b.float_max)
  expected = x.astype(dt).astype(np.float32)
  got = np.asarray(jax.jit(quantize_grid, static_argnums=2)(jnp.asarray(x), jnp.float32(0), QatConfig(bits=bits)))
  np.testing.assert_array_equal(got, expected)

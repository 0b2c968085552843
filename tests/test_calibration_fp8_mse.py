"""The MSE threshold search on an fp8 grid against an independent NumPy search.

The oracle follows the MSE search of the reference algorithms (every bin centre from ``start_bin`` on is a
candidate ``amax``; the error of a candidate is ``sum(counts * (fq(c) - c)^2) / n`` over all centres ``c``; the
first minimum wins) with jqat's documented fp8 arithmetic: ``s = amax * (1 / fp8_max)``, ``u = c * (1 / s)``,
clipped to ``±fp8_max`` and rounded to the fp8 format by the ``ml_dtypes`` cast (round to nearest, ties to even),
then ``u_hat * s``, all in float32. It shares no code with ``jqat`` (not its rounding, not its grid).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jqat
from jqat._src.calibration import histogram as hist_lib

FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0)}


def _numpy_fp8_mse(counts, width, fp8_dtype, fp8_max, start_bin):
  """(amax, per-candidate errors) of the MSE search on the fp8 grid, in NumPy float32."""
  counts = np.asarray(counts, np.float32)
  n = counts.shape[0]
  f32 = np.float32
  centres = ((np.arange(n, dtype=f32) + f32(0.5)) * f32(width)).astype(f32)
  errors = []
  for amax in centres[start_bin:]:
    s = f32(amax) * (f32(1) / f32(fp8_max))
    u = np.clip(centres * (f32(1) / s), -fp8_max, fp8_max).astype(f32)
    fq = u.astype(fp8_dtype).astype(f32) * s
    err = (fq - centres).astype(np.float64)
    errors.append(np.sum(err * err * counts) / n)
  errors = np.asarray(errors)
  return float(centres[start_bin + int(np.argmin(errors))]), errors


def _histograms():
  rng = np.random.default_rng(0)
  n = 512
  grid = np.arange(n)
  yield "exponential", np.round(1e5 * np.exp(-grid / 40.0)), 0.01
  yield "gaussian |x|", np.histogram(np.abs(rng.normal(size=200_000)), bins=n, range=(0, 5.0))[0], 5.0 / n
  # Heavy tail: a bulk and a few far outliers, where clipping the outliers wins.
  x = np.concatenate([np.abs(rng.standard_t(3, size=100_000)), [60.0, 80.0]])
  yield "student-t with outliers", np.histogram(x, bins=n, range=(0, 81.0))[0], 81.0 / n


@pytest.mark.parametrize("fmt", sorted(FP8))
@pytest.mark.parametrize("name,counts,width", list(_histograms()), ids=lambda v: v if isinstance(v, str) else "")
def test_fp8_mse_amax_matches_numpy_search(fmt, name, counts, width):
  dtype, fmax = FP8[fmt]
  start_bin = 16
  expected, errors = _numpy_fp8_mse(counts, width, dtype, fmax, start_bin)
  got = float(
    jqat.mse_amax(jnp.asarray(counts, jnp.int32), width, qmax=fmax, start_bin=start_bin, fp8_dtype=jnp.dtype(dtype))
  )
  # jqat sums each candidate's error in float32, the oracle in float64: they may order two candidates whose errors
  # agree to float32 rounding (the fp8 error curve is flat near its minimum) differently. So: jqat's threshold is
  # a candidate bin centre whose oracle error is the minimum to 1e-5 relative (a few float32 roundings of a
  # 512-term sum), and it is the oracle's very threshold unless the runner-up lies that close.
  i = int(np.rint(got / width - 0.5)) - start_bin
  assert 0 <= i < len(errors) and got == float(np.float32((i + start_bin + 0.5) * np.float32(width))), got
  assert errors[i] <= errors.min() * (1 + 1e-5), (name, fmt, got, expected, errors[i], errors.min())
  close = np.flatnonzero(errors <= errors.min() * (1 + 1e-5))
  if len(close) == 1:
    assert got == expected, (name, fmt, got, expected)


def test_fp8_grid_is_not_the_integer_grid():
  # The search on the fp8 grid picks another threshold than on an integer grid of the same qmax: a search that
  # ignored fp8_dtype would fail test_fp8_mse_amax_matches_numpy_search.
  _, counts, width = next(iter(_histograms()))
  c = jnp.asarray(counts, jnp.int32)
  fp8 = float(jqat.mse_amax(c, width, qmax=448.0, start_bin=16, fp8_dtype=jnp.float8_e4m3fn))
  integer = float(jqat.mse_amax(c, width, qmax=448.0, start_bin=16))
  assert fp8 != integer


def test_fp8_mse_calibration_end_to_end():
  # finalize_stats on a histogram state: the resampled histogram's oracle threshold, mapped to the format max.
  x = jnp.asarray(np.random.default_rng(3).standard_t(4, size=20_000), jnp.float32)
  cfg = jqat.QatConfig(bits="fp8_e4m3")
  state = jax.jit(jqat.update_stats)(jqat.init_stats(x.shape, cfg, "mse", num_bins=4096), x)
  qp = jqat.finalize_stats(state, cfg, "mse")
  counts, width = hist_lib.search_histogram(state)
  start_bin = jqat._src.calibration.stats.START_BIN
  amax, _ = _numpy_fp8_mse(np.asarray(counts), float(width), ml_dtypes.float8_e4m3fn, 448.0, start_bin)
  # scale = amax * (1 / 448) in float32, as qparams_from_range computes it.
  assert float(qp.scale) == float(np.float32(amax) * (np.float32(1) / np.float32(448)))
  assert amax < float(jnp.abs(x).max())  # the t(4) tail is clipped

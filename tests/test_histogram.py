"""The histogram state's counts, bin for bin, against NumPy's ``np.histogram`` of the same finite values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jqat
from jqat._src.calibration import histogram as hist_lib

_update = jax.jit(jqat.update_stats)
_merge = jax.jit(jqat.merge_stats)


def _reference(batches, num_bins):
  """``np.histogram`` of ``|x|`` over ``[0, 2^e)`` for every finite value, ``e`` the smallest with ``max|x| < 2^e``.

  The bin width ``2^e / num_bins`` is a power of two, so NumPy's edges and bin indices are exact too.
  """
  values = np.concatenate([np.abs(np.asarray(b, np.float64).reshape(-1)) for b in batches])
  finite = values[np.isfinite(values)]
  amax = finite.max() if finite.size else 0.0
  if amax == 0:
    # Only zeros (or nothing finite): everything sits in bin 0 at the empty exponent.
    counts = np.zeros(num_bins, np.int64)
    counts[0] = finite.size
    return counts, hist_lib.EMPTY_EXPONENT, values.size - finite.size
  e = int(np.frexp(amax)[1])  # amax < 2^e
  counts, _ = np.histogram(finite, bins=num_bins, range=(0.0, 2.0**e))
  return counts, e, values.size - finite.size


def _check(state, batches, num_bins):
  counts, e, bad = _reference(batches, num_bins)
  np.testing.assert_array_equal(np.asarray(state.counts), counts)
  assert int(state.exponent) == e
  assert int(state.nonfinite) == bad
  assert int(state.count) == sum(np.size(b) for b in batches) - bad


def _batches(seed, sizes, scales, bad_every):
  rng = np.random.default_rng(seed)
  out = []
  for size, scale in zip(sizes, scales):
    x = (rng.laplace(size=size) * scale).astype(np.float32)
    if bad_every:
      x[::bad_every] = np.array([np.nan, np.inf, -np.inf], np.float32)[rng.integers(0, 3)]
    out.append(x)
  return out


@pytest.mark.parametrize("num_bins", [4096, 65536])
@pytest.mark.parametrize("bad_every", [0, 7])
def test_counts_equal_np_histogram_batch_by_batch_and_merged(num_bins, bad_every):
  # The scales make later batches widen the range (and one narrower batch follows a wide one).
  batches = _batches(0, (1000, 777, 4096, 300), (0.01, 3.0, 0.5, 200.0), bad_every)
  state = jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=num_bins)
  for k, b in enumerate(batches):
    state = _update(state, b)
    _check(state, batches[: k + 1], num_bins)
  # Each batch on its own, merged in another order: the same counts.
  parts = [_update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=num_bins), b) for b in batches]
  merged = parts[3]
  for p in (parts[1], parts[0], parts[2]):
    merged = _merge(merged, p)
  _check(merged, batches, num_bins)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_edges_zeros_subnormals_and_bf16():
  n = 4096
  # Values exactly on bin edges (multiples of the bin width 2^3 / 4096), just below them, zeros and subnormals.
  width = 2.0**3 / n
  edges = np.arange(0, n, 37) * width
  x = np.concatenate([edges, np.nextafter(edges, -1), [0.0, -0.0, 1e-45, -1e-40, 7.999999]]).astype(np.float32)
  s = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=n), x)
  _check(s, [x], n)
  xb = jnp.asarray(x[:200], jnp.bfloat16)
  sb = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=n), xb)
  _check(sb, [np.asarray(xb, np.float32)], n)


def test_only_nonfinite_and_only_zeros():
  n = 4096
  s = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=n), jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  assert int(s.counts.sum()) == 0 and int(s.nonfinite) == 3 and int(s.count) == 0
  s = _update(s, jnp.zeros((5,)))
  assert int(s.counts[0]) == 5 and int(s.counts.sum()) == 5 and int(s.exponent) == hist_lib.EMPTY_EXPONENT


_VALUES = st.floats(-1e6, 1e6, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(_VALUES, min_size=32, max_size=32), min_size=1, max_size=4))  # one shape: one compilation
def test_counts_equal_np_histogram_property(batches):
  batches = [np.asarray(b, np.float32) for b in batches]
  n = 4096
  state = jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=n)
  for b in batches:
    state = _update(state, b)
  _check(state, batches, n)


@pytest.mark.parametrize("size", [2 * hist_lib.SCATTER_CHUNK, 3 * hist_lib.SCATTER_CHUNK + 77])
def test_chunked_scatter_equals_np_histogram(size):
  # Batches larger than one scatter chunk: whole chunks in a loop, then the remainder.
  (x,) = _batches(3, (size,), (2.5,), 1001)
  state = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=4096), x)
  _check(state, [x], 4096)


def _floor_reference(batches, num_bins):
  """Counts from the bin index itself, ``floor(|x| * 2^(log2(num_bins) - e))`` in float64, finite values only.

  Independent of ``np.histogram``'s edges: the index of each value, then ``np.bincount``. With no nonzero value
  ``e`` is the empty exponent and every finite value (a zero) gets index 0. XLA:CPU computes with subnormal
  inputs read as zero, so a subnormal counts as a zero here too (it matters only when every value is tiny).
  """
  values = np.concatenate([np.abs(np.asarray(b, np.float32).astype(np.float64).reshape(-1)) for b in batches])
  finite = values[np.isfinite(values)]
  finite = np.where(finite < np.finfo(np.float32).tiny, 0.0, finite)
  amax = finite.max(initial=0.0)
  e = int(np.frexp(amax)[1]) if amax > 0 else hist_lib.EMPTY_EXPONENT
  idx = np.floor(finite * 2.0 ** (num_bins.bit_length() - 1 - e)).astype(np.int64)
  return np.bincount(idx, minlength=num_bins), e, values.size - finite.size


def _check_floor(state, batches, num_bins):
  counts, e, bad = _floor_reference(batches, num_bins)
  assert counts.shape == (num_bins,)  # no index at or past num_bins
  np.testing.assert_array_equal(np.asarray(state.counts), counts)
  assert int(state.exponent) == e and int(state.nonfinite) == bad


# Runs of one value (zeros above all, as after a ReLU) next to bin edges, subnormals, wide magnitudes and NaN/±Inf.
_RUN_VALUES = st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 2.0**-20, 1.0, -1.0, 0.75, 3.0, 1e30, np.nan, np.inf, -np.inf])
_RUNS = st.lists(st.tuples(_RUN_VALUES | st.floats(-1e4, 1e4, width=32), st.integers(1, 40)), min_size=1, max_size=12)


def _from_runs(runs, size=96):
  out = np.concatenate([np.full(n, v, np.float32) for v, n in runs])
  return np.resize(out, size)  # one shape: one compilation


@settings(max_examples=40, deadline=None)
@given(st.lists(_RUNS, min_size=1, max_size=3))
def test_counts_equal_floor_of_scaled_values_property(batches):
  batches = [_from_runs(r) for r in batches]
  n = 4096
  state = jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=n)
  for k, b in enumerate(batches):
    state = _update(state, b)
    _check_floor(state, batches[: k + 1], n)


def test_long_runs_across_scatter_chunks_equal_floor_reference():
  # Runs of zeros, NaN and one repeated value that straddle the 64K-element chunks of the scatter, and the
  # remainder after the last chunk.
  size = 2 * hist_lib.SCATTER_CHUNK + 1000
  x = np.random.default_rng(4).normal(size=size).astype(np.float32)
  x[: hist_lib.SCATTER_CHUNK + 500] = 0.0
  x[hist_lib.SCATTER_CHUNK + 500 : hist_lib.SCATTER_CHUNK + 700] = np.nan
  x[-1500:-200] = 0.375
  x[-200:] = np.maximum(x[-200:], 0.0)
  for n in (4096, 65536):
    state = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=n), x)
    _check_floor(state, [x], n)
    assert int(state.counts[0]) >= hist_lib.SCATTER_CHUNK + 500


_CHUNK = hist_lib.SCATTER_CHUNK


@pytest.mark.parametrize("size,shapes", [(6000, [(60, 100), (4, 15, 100)]), (2 * _CHUNK + 10, [(2, _CHUNK + 5)])])
def test_any_shape_gives_the_flat_counts(size, shapes):
  # The range and a one-chunk batch read x in its own shape; the state must not depend on it.
  (x,) = _batches(5, (size,), (1.5,), 997)
  x[100:400] = 0.0
  flat = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=4096), x)
  _check_floor(flat, [x], 4096)
  for shape in shapes:
    s = _update(jqat.init_stats((), jqat.QatConfig(), "entropy", num_bins=4096), x.reshape(shape))
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(flat)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

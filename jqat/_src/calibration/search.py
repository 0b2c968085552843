"""Threshold searches on a histogram of ``|x|``: percentile, entropy (KL) and MSE.

Each function takes the counts of a histogram whose bin ``j`` covers
``[j * bin_width, (j + 1) * bin_width)`` and returns the clipping threshold
``amax``. They follow NVIDIA's calibrators (pytorch-quantization / modelopt,
``_compute_amax_{percentile,entropy,mse}``) candidate for candidate, but every
candidate is evaluated at once: no Python loop over bins, and the functions
run under ``jax.jit``.

Counts may be integers or non-negative floats (a histogram resampled onto
another grid has fractional counts); they are handled as float32, with
prefix sums carried in double-float so that large totals keep their
precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jqat._src import numerics
from jqat._src.formats import QuantBits


def _as_counts(counts: ArrayLike) -> jax.Array:
  counts = jnp.asarray(counts)
  if counts.ndim != 1 or counts.shape[0] == 0:
    raise ValueError(f"counts must be a non-empty 1-D histogram, got shape {counts.shape}")
  return counts.astype(jnp.float32)


def _exclusive_cumsum(v: jax.Array) -> jax.Array:
  """``[0, v0, v0 + v1, ...]``: prefix sums with a leading zero (length ``len(v) + 1``)."""
  return jnp.concatenate([jnp.zeros((1,), v.dtype), jnp.cumsum(v)])


def _two_sum(a, b):
  # Knuth's TwoSum: s + err == a + b exactly in float32.
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _df_exclusive_cumsum(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Prefix sums with a leading zero, carried as unevaluated float32 pairs (hi, lo): about 48 bits.

  A float32 running sum of ``b log b`` grows to ``S log S`` (≈ 1e7 for a
  million samples), whose rounding is larger than the gaps between the
  divergences of neighbouring candidates. A double-float running sum keeps
  the difference of two prefix sums accurate to the rounding of its own size.
  A sequential scan: one pass of a few flops per bin, and quick to compile.
  """

  def step(carry, x):
    s, e = _two_sum(carry[0], x)
    carry = _two_sum(s, carry[1] + e)
    return carry, carry

  zero = jnp.zeros((), v.dtype)
  _, (hi, lo) = lax.scan(step, (zero, zero), v)
  zero = zero[None]
  return jnp.concatenate([zero, hi]), jnp.concatenate([zero, lo])


def check_percentile(percentile) -> None:
  """Raises unless ``percentile`` is a number in ``(0, 100]``; one that looks like a fraction gets a hint.

  A value of 1 or less (0.9999) is almost certainly a fraction meant as a
  percentage, so it is refused with the percentage it probably means. A
  traced percentile (an array under ``jit``) cannot be checked here and is
  used as it is.

  Raises:
    TypeError: for a percentile that is not a real number.
    ValueError: for one outside ``(1, 100]``.

  Examples:
    >>> from jqat._src.calibration.stats import check_percentile
    >>> check_percentile(99.99)
    >>> check_percentile(0.9999)
    Traceback (most recent call last):
    ...
    ValueError: percentile=0.9999 looks like a fraction; percentile is in percent, in (0, 100]: did you mean 99.99?
  """
  if isinstance(percentile, jax.core.Tracer):
    return
  if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.integer, np.floating)):
    arr = np.asarray(percentile) if hasattr(percentile, "__array__") else None
    if arr is None or arr.shape != () or not np.issubdtype(arr.dtype, np.number):
      raise TypeError(f"percentile={percentile!r} is invalid; allowed: a number in (0, 100]")
    percentile = arr.item()
  p = float(percentile)
  if not np.isfinite(p) or p <= 0 or p > 100:
    raise ValueError(f"percentile={percentile!r} is invalid; allowed: a number in (0, 100] (percent, e.g. 99.99)")
  if p <= 1:
    raise ValueError(
      f"percentile={percentile!r} looks like a fraction; percentile is in percent, in (0, 100]: "
      f"did you mean {p * 100:g}?"
    )


def percentile_amax(counts: ArrayLike, bin_width: ArrayLike, percentile: ArrayLike = 99.99) -> jax.Array:
  """Left edge of the bin where the cumulative distribution first reaches ``percentile``.

  ``cdf = cumsum(counts) / sum(counts)``; ``idx`` is the first bin with
  ``cdf[idx] >= percentile / 100`` (``searchsorted`` side left) and
  ``amax = idx * bin_width``.

  A Python number is used exactly (``100 - percentile`` is formed in float64);
  a traced one is a float32, in which 99.99 is 99.98999786.

  Args:
    counts: 1-D histogram of ``|x|``.
    bin_width: width of every bin.
    percentile: in ``(0, 100]``.

  Returns:
    A float32 scalar; 0 for an empty histogram.

  Examples:
    >>> import jqat
    >>> float(jqat.percentile_amax([5, 3, 1, 1], 0.5, 90.0))
    1.0
  """
  check_percentile(percentile)
  if isinstance(percentile, (int, float)):
    tail_frac = (100.0 - percentile) / 100.0
  else:
    tail_frac = (100.0 - jnp.asarray(percentile, jnp.float32)) / 100.0
  return _percentile_amax(_as_counts(counts), jnp.asarray(bin_width, jnp.float32), jnp.asarray(tail_frac, jnp.float32))


@jax.jit
def _percentile_amax(c: jax.Array, bin_width: jax.Array, tail_frac: jax.Array) -> jax.Array:
  # cdf >= q  <=>  tail <= (1 - q) * total. The tail (the count above a bin)
  # is small near the top, where a float32 cdf could not tell 0.99990 from
  # 0.9999 (its ulp there is 6e-8).
  cum_hi, cum_lo = _df_exclusive_cumsum(c)
  total = cum_hi[-1] + cum_lo[-1]
  tail = (cum_hi[-1] - cum_hi[1:]) + (cum_lo[-1] - cum_lo[1:])
  idx = jnp.sum(tail > tail_frac * total).astype(jnp.float32)
  idx = jnp.minimum(idx, c.shape[0] - 1)
  return jnp.where(total > 0, idx * bin_width, 0.0)


@functools.partial(jax.jit, static_argnames=("num_levels", "start_bin"))
def entropy_divergences(counts: ArrayLike, *, num_levels: int = 128, start_bin: int = 128) -> jax.Array:
  """``KL(P_i || Q_i)`` for every candidate ``i`` in ``start_bin .. len(counts)``.

  The candidates of NVIDIA's entropy calibration (``_compute_amax_entropy``):

  * ``bins = counts`` with ``bins[0] = bins[1]`` (drops the spike of zeros);
  * ``P = bins[:i]`` with the outliers ``sum(bins[i:])`` added to ``P[i-1]``;
  * ``Q``: bin ``j < i`` belongs to level ``floor(num_levels * j / i)``; each
    non-zero bin gets the mean of the non-zero bins of its level, zero bins
    stay 0; outliers are not in ``Q``;
  * ``KL = sum p log(p / q)`` after normalizing both, ``inf`` where ``p > 0``
    and ``q = 0``.

  With ``G_k``, ``n_k`` and ``B_k`` the sum, number of non-zero bins and sum of
  ``b log b`` of level ``k``, ``O`` the outliers, ``S`` the total and
  ``b = bins[i-1]``::

    S * KL_i = sum_k (B_k - G_k log(G_k / n_k))
               + O log(b / m) + (b + O) log1p(O / b) + S log1p(-O / S)

  where ``m = G_{last} / n_{last}``; every level sum is a difference of prefix
  sums, so all candidates cost ``O(len(counts) * num_levels)`` together.

  Args:
    counts: 1-D histogram of ``|x|``.
    num_levels: quantized levels of the positive half (128 for int8).
    start_bin: the first candidate.

  Returns:
    float32 array of length ``len(counts) - start_bin + 1``.
  """
  bins = _as_counts(counts)
  n = bins.shape[0]
  if not 1 <= start_bin <= n:
    raise ValueError(f"start_bin={start_bin} must lie in [1, {n}] for a histogram of {n} bins")
  if n >= 2:
    bins = bins.at[0].set(bins[1])
  nonzero = _exclusive_cumsum((bins > 0).astype(jnp.int32))
  c_hi, c_lo = _df_exclusive_cumsum(bins)
  safe_bins = jnp.where(bins > 0, bins, 1.0)
  blogb = jnp.where(bins > 0, bins * jnp.log(safe_bins), 0.0)
  bl_hi, bl_lo = _df_exclusive_cumsum(blogb)

  def diff(hi, lo, e1, e0):
    # (hi + lo)[e1] - (hi + lo)[e0], accurate to the rounding of the result.
    d, err = _two_sum(hi[e1], -hi[e0])
    return d + (err + (lo[e1] - lo[e0]))

  i = jnp.arange(start_bin, n + 1, dtype=jnp.int32)[:, None]
  k = jnp.arange(num_levels + 1, dtype=jnp.int32)[None, :]
  # Bin j is in level floor(L j / i), so level k starts at ceil(k i / L).
  edges = (k * i + (num_levels - 1)) // num_levels
  e0, e1 = edges[:, :-1], edges[:, 1:]
  nz = nonzero[e1] - nonzero[e0]
  g = jnp.where(nz > 0, diff(c_hi, c_lo, e1, e0), 0.0)
  nzf = jnp.maximum(nz, 1).astype(jnp.float32)
  safe_g = jnp.where(g > 0, g, 1.0)
  g_log_mean = jnp.where(g > 0, g * (jnp.log(safe_g) - jnp.log(nzf)), 0.0)
  within = jnp.sum(jnp.where(nz > 0, diff(bl_hi, bl_lo, e1, e0), 0.0) - g_log_mean, axis=1)

  i = i[:, 0]
  total = c_hi[-1] + c_lo[-1]
  outliers = jnp.maximum((c_hi[-1] - c_hi[i]) + (c_lo[-1] - c_lo[i]), 0.0)
  b = bins[i - 1]
  mean_last = safe_g[:, -1] / nzf[:, -1]
  safe_b = safe_bins[i - 1]
  # (b + O) log((b + O) / m) - b log(b / m), without the cancellation when O << b.
  folded = outliers * jnp.log(safe_b / mean_last) + (b + outliers) * jnp.log1p(outliers / safe_b)
  folded = jnp.where(b > 0, folded, jnp.where(outliers > 0, jnp.inf, 0.0))
  safe_total = jnp.where(total > 0, total, 1.0)
  kl = (within + folded) / safe_total + jnp.log1p(-outliers / safe_total)
  return jnp.where(jnp.isnan(kl) | (total <= 0), jnp.inf, kl)


@functools.partial(jax.jit, static_argnames=("num_levels", "start_bin"))
def entropy_amax(counts: ArrayLike, bin_width: ArrayLike, *, num_levels: int = 128, start_bin: int = 128) -> jax.Array:
  """Entropy (KL) calibration: the threshold whose quantized distribution is closest to the data.

  The candidate ``i`` in ``start_bin .. len(counts)`` with the least
  ``KL(P_i || Q_i)`` (see ``entropy_divergences``); ties go to the largest
  ``i``. ``amax = i * bin_width``, the right edge of bin ``i - 1``.

  Args:
    counts: 1-D histogram of ``|x|`` (2048 bins in the reference method).
    bin_width: width of every bin.
    num_levels: quantized levels of the positive half, ``2^(bits-1)``.
    start_bin: the smallest candidate.

  Returns:
    A float32 scalar; 0 for an empty histogram.

  References:
    Migacz, "8-bit Inference with TensorRT", GTC 2017.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> counts = jnp.round(1e5 * jnp.exp(-jnp.arange(512) / 40.0)).astype(jnp.int32)
    >>> round(float(jqat.entropy_amax(counts, 0.01, start_bin=128)), 4)  # the right edge of bin 423
    4.24
  """
  bins = _as_counts(counts)
  kl = entropy_divergences(bins, num_levels=num_levels, start_bin=start_bin)
  # Ties to the largest candidate, as NVIDIA's calibrator does.
  last = kl.shape[0] - 1 - jnp.argmin(kl[::-1])
  amax = (start_bin + last).astype(jnp.float32) * jnp.asarray(bin_width, jnp.float32)
  return jnp.where(jnp.sum(bins) > 0, amax, 0.0)


def _fake_quant_grid(x: jax.Array, amax: jax.Array, qmax: float, fp8_dtype: DTypeLike | None) -> jax.Array:
  # The one quantize -> dequantize arithmetic (numerics) on the symmetric grid
  # [-qmax, qmax], with the scale qparams_from_range gives amax: amax * (1 / qmax).
  bits = None if fp8_dtype is None else QuantBits(jnp.dtype(fp8_dtype).name)
  g = numerics.Grid(-float(qmax), float(qmax), bits)
  scale = numerics.to_grid_units(amax, float(qmax))
  zero = jnp.zeros((), x.dtype)
  q = numerics.quantize_grid(numerics.to_grid_units(x, scale), zero, g)
  return numerics.dequantize_values(q, scale, zero, x.dtype)


@functools.partial(jax.jit, static_argnames=("qmax", "start_bin", "fp8_dtype"))
def mse_amax(
  counts: ArrayLike,
  bin_width: ArrayLike,
  *,
  qmax: float = 127,
  start_bin: int = 128,
  fp8_dtype: DTypeLike | None = None,
) -> jax.Array:
  """MSE calibration: the bin centre that, as ``amax``, least distorts the histogram.

  For every centre ``c_i``, ``i`` in ``start_bin .. len(counts) - 1``:
  ``mse_i = mean(counts * (fq(c; c_i) - c)^2)`` over all centres ``c``, where
  ``fq`` is the symmetric fake quant with scale ``s = amax / qmax``,
  ``clip(round(c / s), ±qmax) * s`` (rounding half to even), or with
  ``fp8_dtype`` ``clip(c / s, ±qmax)`` rounded to that float8 format (``qmax``
  is then its max): the arithmetic of ``fake_quant`` (``jqat._src.numerics``),
  with ``c / s`` evaluated as ``c * (1 / s)``. ``amax = c_i`` of the first minimum.

  Args:
    counts: 1-D histogram of ``|x|``.
    bin_width: width of every bin.
    qmax: largest quantized magnitude (127 for int8, 448 for fp8 e4m3).
    start_bin: the first candidate centre.
    fp8_dtype: a float8 dtype for an fp8 grid; None for an integer grid.

  Returns:
    A float32 scalar; 0 for an empty histogram.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> counts = jnp.round(1e5 * jnp.exp(-jnp.arange(512) / 40.0)).astype(jnp.int32)
    >>> round(float(jqat.mse_amax(counts, 0.01, qmax=7, start_bin=16)), 4)  # the centre of bin 192
    1.925
  """
  bins = _as_counts(counts)
  n = bins.shape[0]
  if not 0 <= start_bin < n:
    raise ValueError(f"start_bin={start_bin} must lie in [0, {n - 1}] for a histogram of {n} bins")
  w = jnp.asarray(bin_width, jnp.float32)
  centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) * w
  weights = bins
  cand = centres[start_bin:]

  def one(amax):
    err = _fake_quant_grid(centres, amax, qmax, fp8_dtype) - centres
    return jnp.sum(err * err * weights) / n

  mse = jax.vmap(one)(cand)
  amax = cand[jnp.argmin(mse)]
  return jnp.where((jnp.sum(bins) > 0) & (w > 0), amax, 0.0)

"""One interface over the statistics states: ``init_stats``, ``update_stats``, ``merge_stats``, ``finalize_stats``.

Which state a method needs:

* ``MINMAX``: ``RangeState`` (per-tensor, per-channel or per-group);
* ``MOVING_AVERAGE``: ``MovingAverageState`` (same layouts);
* ``PERCENTILE``, ``ENTROPY`` (``KL``), ``MSE``: ``HistogramState``, per-tensor
  only (a per-channel or per-group config raises ``ValueError``).

What the histogram methods do with each config. The histogram is of ``|x|``,
as in NVIDIA's calibrators, and each method gives a threshold ``amax``:

* symmetric configs get ``[-amax, amax]``;
* asymmetric configs get ``[-amax, amax]`` clipped to the observed
  ``[min, max]``, so non-negative data (after ReLU) gets ``[0, min(amax, max)]``
  and uses the whole integer grid;
* fp8 configs map ``amax`` to the format's max (``qparams_from_range``).

The searches model the positive half of a signed grid: ``ENTROPY`` uses
``2^(bits-1)`` levels (128 for int8 and for fp8) and ``MSE`` the symmetric grid
``±(2^(bits-1) - 1)``, or the fp8 format's own values for fp8 configs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jqat._src import qparams as qp_lib
from jqat._src.calibration import histogram as hist_lib
from jqat._src.calibration import range_stats, search
from jqat._src.calibration.histogram import HistogramState
from jqat._src.calibration.range_stats import MovingAverageState, RangeState
from jqat._src.calibration.search import check_percentile as check_percentile
from jqat._src.config import CalibMethod, QatConfig

StatsState = RangeState | MovingAverageState | HistogramState
STATE_TYPES = (RangeState, MovingAverageState, HistogramState)
HISTOGRAM_METHODS = (CalibMethod.PERCENTILE, CalibMethod.ENTROPY, CalibMethod.MSE)
# The reference searches start at bin 128 of 2048: thresholds below 1/16 of max|x| are not tried.
START_BIN = 128


def _method(method) -> CalibMethod:
  try:
    return CalibMethod(method)
  except ValueError:
    allowed = ", ".join(repr(m.value) for m in CalibMethod)
    raise ValueError(f"method={method!r} is invalid; allowed: {allowed} (or 'kl' for 'entropy')") from None


def _check_per_tensor(config: QatConfig, method: CalibMethod) -> None:
  if config.per_channel or config.group_size is not None:
    raise ValueError(
      f"method {method.value!r} is per-tensor only (a histogram of |x| for the whole tensor), but the config is "
      f"per-channel or per-group (per_channel={config.per_channel}, group_size={config.group_size}); use "
      "'minmax' or 'moving_average' for per-channel and per-group ranges"
    )


def init_stats(
  shape,
  config: QatConfig,
  method: CalibMethod | str,
  *,
  num_bins: int = hist_lib.DEFAULT_NUM_BINS,
  momentum: float = 0.9,
) -> StatsState:
  """An empty, fixed-shape statistics state for tensors of ``shape``, as ``method`` needs.

  The state is a PyTree of arrays, so it can live in a Flax variable
  collection and be updated under ``jax.jit``.

  Args:
    shape: shape of the observed tensors (per-channel and per-group layouts
      depend on it; per-tensor states accept any shape later).
    config: the quantization config (granularity).
    method: a ``CalibMethod`` or its name.
    num_bins: internal bins of a histogram (a power of two ≥ 4096).
    momentum: weight of the past in a moving average, in ``[0, 1)``.

  Returns:
    ``RangeState`` (MINMAX), ``MovingAverageState`` (MOVING_AVERAGE) or
    ``HistogramState`` (PERCENTILE, ENTROPY, MSE).

  Raises:
    ValueError: for an unknown method, a per-channel or per-group config with
      a histogram method, or a layout that does not fit ``shape``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig()
    >>> s = jqat.init_stats((2, 3), cfg, "minmax")
    >>> s = jqat.update_stats(s, jnp.array([[1., -2., 3.], [0., 5., jnp.nan]]))
    >>> float(s.min), float(s.max), int(s.nonfinite)
    (-2.0, 5.0, 1)
    >>> round(float(jqat.finalize_stats(s, cfg, "minmax").scale), 6)
    0.03937
  """
  method = _method(method)
  if method is CalibMethod.MINMAX:
    return range_stats.range_init(shape, config)
  if method is CalibMethod.MOVING_AVERAGE:
    return range_stats.moving_average_init(shape, config, momentum)
  _check_per_tensor(config, method)
  return hist_lib.histogram_init(num_bins)


def _check_state(state) -> None:
  if not isinstance(state, STATE_TYPES):
    raise TypeError(
      f"expected a RangeState, MovingAverageState or HistogramState (from jqat.init_stats), got {type(state).__name__}"
    )


def update_stats(state: StatsState, x: ArrayLike) -> StatsState:
  """The state after observing ``x``; NaN and ±Inf are skipped and counted.

  Raises:
    ValueError: for an empty ``x`` or a shape that does not fit the state.
  """
  _check_state(state)
  if isinstance(state, RangeState):
    return range_stats.range_update(state, x)
  if isinstance(state, MovingAverageState):
    return range_stats.moving_average_update(state, x)
  return hist_lib.histogram_update(state, x)


def merge_stats(a: StatsState, b: StatsState) -> StatsState:
  """The statistics of everything ``a`` and ``b`` observed.

  Exact, associative and commutative: any order or split of the batches gives
  bit-identical statistics. (A moving average has no such merge; see
  ``MovingAverageState``: states are joined into the range covering both.)

  Raises:
    TypeError: for states of different kinds.
    ValueError: for states of different shapes.
  """
  _check_state(a)
  _check_state(b)
  if type(a) is not type(b):
    raise TypeError(f"cannot merge a {type(a).__name__} with a {type(b).__name__}")
  if isinstance(a, HistogramState):
    return hist_lib.histogram_merge(a, b)
  if a.min.shape != b.min.shape:
    raise ValueError(f"cannot merge {type(a).__name__}s of shapes {a.min.shape} and {b.min.shape}")
  if isinstance(a, RangeState):
    return range_stats.range_merge(a, b)
  return range_stats.moving_average_merge(a, b)


def all_reduce_stats(state: StatsState, axis_name) -> StatsState:
  """``merge_stats`` across a mapped axis with collectives (``psum``, ``pmin``, ``pmax``).

  For statistics gathered per device inside ``shard_map`` (or ``pmap``,
  ``vmap`` with ``axis_name``): every device gets the merged state, equal to
  merging the states one by one.
  """
  _check_state(state)
  if isinstance(state, HistogramState):
    return hist_lib.histogram_all_reduce(state, axis_name)
  lo = lax.pmin(state.min, axis_name)
  hi = lax.pmax(state.max, axis_name)
  count = lax.psum(state.count, axis_name)
  bad = lax.psum(state.nonfinite, axis_name)
  if isinstance(state, RangeState):
    return RangeState(lo, hi, count, bad)
  return MovingAverageState(lo, hi, state.momentum, count, bad)


def nonfinite_count(stats_tree):
  """The ``nonfinite`` count of every state in a tree (same structure, one int32 per state).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> s = jqat.init_stats((3,), jqat.QatConfig(), "entropy")
    >>> s = jqat.update_stats(s, jnp.array([1.0, jnp.inf, jnp.nan]))
    >>> jqat.nonfinite_count({"a": s})
    {'a': Array(2, dtype=int32)}
  """
  return jax.tree.map(lambda s: s.nonfinite, stats_tree, is_leaf=lambda s: isinstance(s, STATE_TYPES))


def _levels(config: QatConfig) -> int:
  return 2 ** (config.bits.num_bits - 1)


def histogram_threshold(
  state: HistogramState, config: QatConfig, method: CalibMethod | str, *, percentile: ArrayLike = 99.99
) -> jax.Array:
  """The threshold ``amax`` that ``method`` picks from a histogram state (0 when nothing was seen)."""
  method = _method(method)
  check_percentile(percentile)
  if method not in HISTOGRAM_METHODS:
    raise ValueError(f"histogram_threshold needs one of {[m.value for m in HISTOGRAM_METHODS]}, got {method.value!r}")
  if isinstance(percentile, (int, float)):
    return _threshold_static(state, config, method, float(percentile))
  return _threshold_traced(state, config, method, percentile)


def _threshold(state: HistogramState, config: QatConfig, method: CalibMethod, percentile) -> jax.Array:
  counts, width = hist_lib.search_histogram(state)
  if method is CalibMethod.PERCENTILE:
    amax = search.percentile_amax(counts, width, percentile)
  elif method is CalibMethod.ENTROPY:
    amax = search.entropy_amax(counts, width, num_levels=_levels(config), start_bin=START_BIN)
  elif config.bits.is_float:
    amax = search.mse_amax(
      counts, width, qmax=config.bits.float_max, start_bin=START_BIN, fp8_dtype=config.bits.float_dtype
    )
  else:
    amax = search.mse_amax(counts, width, qmax=_levels(config) - 1, start_bin=START_BIN)
  return jnp.where(hist_lib.histogram_amax(state) > 0, amax, 0.0)


# Compiled once per (config, method): quick in eager use too. A Python-number
# percentile stays static (used exactly), an array one is traced.
_threshold_static = jax.jit(_threshold, static_argnames=("config", "method", "percentile"))
_threshold_traced = jax.jit(_threshold, static_argnames=("config", "method"))


def finalize_stats(
  state: StatsState, config: QatConfig, method: CalibMethod | str, *, percentile: ArrayLike = 99.99
) -> qp_lib.QParams:
  """``QParams`` from a statistics state.

  * ``RangeState``: ``MINMAX``.
  * ``MovingAverageState``: ``MOVING_AVERAGE`` or ``MINMAX`` (both the averaged range).
  * ``HistogramState``: ``PERCENTILE``, ``ENTROPY``, ``MSE``, or ``MINMAX``
    from its exact min and max; per-tensor, scalar parameters.

  Scale and zero point are in the layout of ``jqat.params_shape`` (scalars
  per tensor). A state that saw no finite value gives the smallest positive
  scale. Jittable with ``config`` and ``method`` static.

  Args:
    state: from ``init_stats`` / ``update_stats`` / ``merge_stats``.
    config: the format and mode.
    method: a ``CalibMethod`` or its name.
    percentile: for ``PERCENTILE``, in ``(0, 100]`` (``check_percentile``).

  Raises:
    ValueError: for a method the state cannot serve, a per-channel config
      with a histogram or per-tensor state, or a percentile outside
      ``(1, 100]`` (``check_percentile``).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(symmetric=False)
    >>> s = jqat.init_stats((1000,), cfg, "percentile")
    >>> s = jqat.update_stats(s, jnp.linspace(-1.0, 3.0, 1000))
    >>> qp = jqat.finalize_stats(s, cfg, "percentile", percentile=99.0)
    >>> round(float(qp.scale), 6), float(qp.zero_point)  # the range [-1, 2.959]
    (0.015525, -64.0)
  """
  _check_state(state)
  method = _method(method)
  check_percentile(percentile)
  name = type(state).__name__
  if isinstance(state, HistogramState):
    _check_per_tensor(config, method)
    if method is CalibMethod.MINMAX:
      lo, hi = range_stats.observed_range(state.min, state.max)
      return qp_lib.qparams_from_range(lo, hi, config)
    if method not in HISTOGRAM_METHODS:
      raise ValueError(f"a {name} supports 'minmax', 'percentile', 'entropy' and 'mse', not {method.value!r}")
    amax = histogram_threshold(state, config, method, percentile=percentile)
    if config.symmetric:
      return qp_lib.qparams_from_range(-amax, amax, config)
    lo, hi = range_stats.observed_range(state.min, state.max)
    # Both ends are clipped to [-amax, amax]: clipping is monotone, so the range stays ordered even when the
    # threshold (a bin edge) falls below the data's minimum, as it does for constant positive data.
    return qp_lib.qparams_from_range(jnp.clip(lo, -amax, amax), jnp.clip(hi, -amax, amax), config)

  allowed = (CalibMethod.MINMAX,) if isinstance(state, RangeState) else (CalibMethod.MINMAX, CalibMethod.MOVING_AVERAGE)
  if method not in allowed:
    hint = " (collect a HistogramState with init_stats(..., method) instead)" if method in HISTOGRAM_METHODS else ""
    raise ValueError(f"a {name} supports {[m.value for m in allowed]}, not {method.value!r}{hint}")
  if state.min.size != 1 and not config.per_channel and config.group_size is None:
    raise ValueError(f"the {name} has per-channel shape {state.min.shape} but the config is per-tensor")
  lo, hi = range_stats.observed_range(state.min, state.max)
  return qp_lib.qparams_from_range(lo, hi, config)

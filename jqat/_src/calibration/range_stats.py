"""Range statistics: the running min and max, and their moving average.

Both states hold ``min`` and ``max`` in the parameter layout of
``jqat.params_shape``: size 1 on reduced axes, the full size on per-channel
axes and the number of groups on a group axis. ``update`` reads the layout off
the state's own shape, so it needs no config: axis ``a`` of ``x`` is split into
``state.min.shape[a]`` equal blocks, each reduced to one value (the same
reduction as ``to_groups`` + ``reduce_axes``). A state with a single element
is per-tensor and accepts ``x`` of any shape.

An empty state holds ``min = +inf`` and ``max = -inf``, the identities of
``minimum`` and ``maximum``; finalizing it (or a channel that saw no finite
value) gives the range ``[0, 0]`` and so the smallest positive scale.

Non-finite values (NaN, ±Inf) are skipped and counted in ``nonfinite``.
Counts are int32 and wrap after 2^31 elements.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jqat._src import qparams as qp_lib
from jqat._src.config import QatConfig


class RangeState(NamedTuple):
  """Running min and max of everything observed (``CalibMethod.MINMAX``).

  Attributes:
    min: float32, parameter layout; ``+inf`` before any finite value.
    max: float32, same shape; ``-inf`` before any finite value.
    count: int32 scalar, finite elements observed.
    nonfinite: int32 scalar, NaN and ±Inf elements skipped.
  """

  min: jax.Array
  max: jax.Array
  count: jax.Array
  nonfinite: jax.Array


class MovingAverageState(NamedTuple):
  """Exponential moving average of per-batch min and max (``CalibMethod.MOVING_AVERAGE``).

  ``new = momentum * old + (1 - momentum) * batch``; the first batch that
  holds a finite value (per channel) sets the value directly.

  Attributes:
    min: float32, parameter layout; ``+inf`` before the first batch.
    max: float32, same shape; ``-inf`` before the first batch.
    momentum: float32 scalar, kept in the state so that ``update`` is a pure
      function of ``(state, x)``.
    count: int32 scalar, finite elements observed.
    nonfinite: int32 scalar, NaN and ±Inf elements skipped.
  """

  min: jax.Array
  max: jax.Array
  momentum: jax.Array
  count: jax.Array
  nonfinite: jax.Array


def _empty_range(shape) -> tuple[jax.Array, jax.Array]:
  return jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32)


def range_init(shape, config: QatConfig) -> RangeState:
  """An empty ``RangeState`` for tensors of ``shape`` at the granularity of ``config``.

  Examples:
    >>> import jqat
    >>> s = jqat.init_stats((4, 3), jqat.QatConfig(per_channel=True), "minmax")
    >>> s.min.shape
    (1, 3)
  """
  lo, hi = _empty_range(qp_lib.params_shape(tuple(shape), config))
  return RangeState(lo, hi, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def moving_average_init(shape, config: QatConfig, momentum: float = 0.9) -> MovingAverageState:
  """An empty ``MovingAverageState``; ``momentum`` in ``[0, 1)`` weighs the past."""
  if not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"momentum={momentum!r} is invalid; allowed: a number in [0, 1)")
  lo, hi = _empty_range(qp_lib.params_shape(tuple(shape), config))
  return MovingAverageState(
    lo, hi, jnp.asarray(momentum, jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
  )


def check_nonempty(x: jax.Array, what: str = "x") -> None:
  if x.size == 0:
    raise ValueError(f"cannot calibrate on an empty array: {what} has shape {x.shape}")


def _blocks(x: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
  """``x`` reshaped to ``(b_0, n_0, b_1, n_1, ...)`` with ``b_a = shape[a]``, and the axes ``n_a``."""
  if math.prod(shape) == 1:
    # Reduce over every axis in place: flattening a sharded array would gather it.
    return x, tuple(range(x.ndim))
  if x.ndim != len(shape) or any(d % b for d, b in zip(x.shape, shape)):
    raise ValueError(
      f"an array of shape {x.shape} does not match statistics of shape {shape}: each axis of the array "
      "must be a multiple of the statistics' axis (the layout of jqat.params_shape)"
    )
  split = []
  for d, b in zip(x.shape, shape):
    split += [b, d // b]
  return x.reshape(split), tuple(range(1, 2 * len(shape), 2))


def finite_range(
  x: ArrayLike, shape: tuple[int, ...], plain: tuple[jax.Array, jax.Array, jax.Array] | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(min, max) of the finite values of ``x`` per block of ``shape``, and the number of non-finite values.

  A block with no finite value gets ``(+inf, -inf)``. ``plain``: each
  block's ``qparams.plain_range`` (its min and max in the layout of
  ``shape``, and a mark of any shape whose NaN says that ``x`` is not
  finite) when the caller has them already, from reductions it needs anyway.
  """
  x = jnp.asarray(x)
  check_nonempty(x)
  x = x.astype(jnp.float32)
  xb, axes = _blocks(x, shape)
  if plain is None:
    plain = qp_lib.plain_range(xb, axis=axes)
  lo, hi = (jnp.asarray(a, jnp.float32).reshape(shape) for a in plain[:2])

  # A finite mark proves the whole batch finite, and only then are the plain
  # min and max its range; else the masked second pass (about 3x the plain
  # reductions on CPU) takes the finite values' range.
  def clean(_):
    # zeros_like(ok), not a fresh constant: inside shard_map both branches must
    # vary over the same mesh axes.
    return lo, hi, jnp.zeros_like(ok, jnp.int32)

  def masked(_):
    finite = jnp.isfinite(xb)
    mlo = jnp.min(jnp.where(finite, xb, jnp.inf), axis=axes).reshape(shape)
    mhi = jnp.max(jnp.where(finite, xb, -jnp.inf), axis=axes).reshape(shape)
    return mlo, mhi, jnp.sum(~finite, dtype=jnp.int32)

  # The barrier: a mark summed from finer marks stays a sum of those (XLA
  # would fold the two sums into a second pass over x).
  ok = jnp.isfinite(jnp.sum(lax.optimization_barrier(plain[2])))
  return lax.cond(ok, clean, masked, None)


@jax.jit
def range_update(state: RangeState, x: ArrayLike) -> RangeState:
  """Widens the range to include the finite values of ``x``."""
  x = jnp.asarray(x)
  lo, hi, bad = finite_range(x, state.min.shape)
  return RangeState(
    jnp.minimum(state.min, lo),
    jnp.maximum(state.max, hi),
    state.count + (x.size - bad),
    state.nonfinite + bad,
  )


@jax.jit
def moving_average_update(state: MovingAverageState, x: ArrayLike) -> MovingAverageState:
  """One EMA step with the finite min and max of ``x``."""
  return moving_average_step(state, x)


def moving_average_step(
  state: MovingAverageState, x: ArrayLike, plain: tuple[jax.Array, jax.Array, jax.Array] | None = None
) -> MovingAverageState:
  """``moving_average_update`` (not jitted), with ``finite_range``'s ``plain`` reductions when the caller has them."""
  x = jnp.asarray(x)
  lo, hi, bad = finite_range(x, state.min.shape, plain)
  m = state.momentum
  seen = lo <= hi  # the block held a finite value
  unset = state.min > state.max  # nothing averaged yet
  new_lo = jnp.where(unset, lo, m * state.min + (1 - m) * lo)
  new_hi = jnp.where(unset, hi, m * state.max + (1 - m) * hi)
  return MovingAverageState(
    jnp.where(seen, new_lo, state.min),
    jnp.where(seen, new_hi, state.max),
    m,
    state.count + (x.size - bad),
    state.nonfinite + bad,
  )


@jax.jit
def range_merge(a: RangeState, b: RangeState) -> RangeState:
  """The range of the union of what ``a`` and ``b`` observed (exact, associative, commutative)."""
  return RangeState(jnp.minimum(a.min, b.min), jnp.maximum(a.max, b.max), a.count + b.count, a.nonfinite + b.nonfinite)


@jax.jit
def moving_average_merge(a: MovingAverageState, b: MovingAverageState) -> MovingAverageState:
  """The smallest range covering both averaged ranges.

  A moving average depends on the order of batches, so no merge can equal one
  pass. This one is exact, associative and commutative, keeps the range of a
  replica (``merge(a, a)`` has ``a``'s min and max, for states replicated
  across devices; the counts add up), and an empty state is its identity. The
  momentum is ``a``'s.
  """
  return MovingAverageState(
    jnp.minimum(a.min, b.min),
    jnp.maximum(a.max, b.max),
    a.momentum,
    a.count + b.count,
    a.nonfinite + b.nonfinite,
  )


def observed_range(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(lo, hi)`` with blocks that saw no finite value set to ``[0, 0]``."""
  seen = lo <= hi
  return jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0)

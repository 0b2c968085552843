"""Per-input-channel moments of a layer's inputs: the GPTQ Hessian, mean |x| and max |x|.

For a layer that contracts the last axis of its input ``x`` (shape ``(..., K)``)
with a kernel ``(K, N)``, the weight algorithms need, over all calibration rows
``x_r`` (the leading axes flattened):

* ``xtx = Σ_r x_rᵀ x_r``, ``(K, K)``: the Hessian of GPTQ's layer objective
  ``‖XW − XŴ‖²`` (up to the factor 2, which GPTQ's dampening makes irrelevant);
* ``abs_sum = Σ_r |x_r|`` and ``count``, so ``mean|x_j| = abs_sum_j / count``
  (AWQ's activation statistic);
* ``abs_max = max_r |x_r|`` (SmoothQuant's).

A sum and a count instead of a running mean keep ``merge`` a plain addition:
associative and commutative up to float rounding, so statistics gathered batch
by batch, in any split or order, or on many devices and reduced with ``psum``
(``moments_all_reduce``), agree with one pass over all the rows.

A row with any NaN or ±Inf is dropped and counted in ``nonfinite``: one bad
value would otherwise poison every entry of its row and column of ``xtx``.
Counts are int32 rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike


class MomentsState(NamedTuple):
  """Second-moment statistics of the inputs of one layer (see the module docstring).

  Attributes:
    xtx: float32 ``(K, K)``, ``Σ xᵀx`` over the finite rows; ``(0, 0)`` when
      the state was made with ``hessian=False``.
    abs_sum: float32 ``(K,)``, ``Σ |x|`` per input channel.
    abs_max: float32 ``(K,)``, ``max |x|`` per input channel (0 before any row).
    count: int32 scalar, finite rows observed.
    nonfinite: int32 scalar, rows skipped because they held a NaN or ±Inf.
  """

  xtx: jax.Array
  abs_sum: jax.Array
  abs_max: jax.Array
  count: jax.Array
  nonfinite: jax.Array

  @property
  def num_features(self) -> int:
    """``K``, the contraction size of the observed inputs."""
    return self.abs_sum.shape[0]

  @property
  def has_hessian(self) -> bool:
    """Whether ``xtx`` is accumulated."""
    return self.xtx.shape[0] > 0


def _check_state(state) -> None:
  if not isinstance(state, MomentsState):
    raise TypeError(f"expected a MomentsState (from jqat.moments_init), got {type(state).__name__}")


def moments_init(num_features: int, *, hessian: bool = True) -> MomentsState:
  """An empty ``MomentsState`` for inputs whose last axis has ``num_features`` elements.

  Args:
    num_features: ``K``, the contraction size.
    hessian: accumulate ``xtx`` (``K × K`` floats, and a ``K × K × rows`` dot per
      update). AWQ and SmoothQuant need only the per-channel statistics.

  Returns:
    A state of zeros.

  Raises:
    ValueError: when ``num_features`` is not a positive int.

  Examples:
    >>> import jqat
    >>> s = jqat.moments_init(3)
    >>> s.xtx.shape, s.abs_max.shape, int(s.count)
    ((3, 3), (3,), 0)
    >>> jqat.moments_init(3, hessian=False).xtx.shape
    (0, 0)
  """
  if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
    raise ValueError(f"num_features={num_features!r} is invalid; allowed: a positive int")
  k = num_features if hessian else 0
  zero = jnp.zeros((), jnp.int32)
  return MomentsState(
    jnp.zeros((k, k), jnp.float32),
    jnp.zeros((num_features,), jnp.float32),
    jnp.zeros((num_features,), jnp.float32),
    zero,
    zero,
  )


@jax.jit
def _update(state: MomentsState, x: jax.Array) -> MomentsState:
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(rows), axis=1)
  rows = jnp.where(finite[:, None], rows, 0.0)
  xtx = state.xtx
  if state.has_hessian:
    # HIGHEST: on TPU / GPU the default float32 dot may run in bf16 passes.
    xtx = xtx + lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
  a = jnp.abs(rows)
  n = jnp.sum(finite, dtype=jnp.int32)
  return MomentsState(
    xtx,
    state.abs_sum + jnp.sum(a, axis=0),
    jnp.maximum(state.abs_max, jnp.max(a, axis=0)),
    state.count + n,
    state.nonfinite + (rows.shape[0] - n),
  )


def moments_update(state: MomentsState, x: ArrayLike) -> MomentsState:
  """The state after observing the rows of ``x``, shape ``(..., K)``.

  ``xtx += Σ_r x_rᵀ x_r``, ``abs_sum += Σ_r |x_r|``, ``abs_max = max(abs_max, |x_r|)``,
  over the rows ``r`` of ``x`` flattened to ``(rows, K)`` that are all finite;
  the others are counted in ``nonfinite``.

  Raises:
    ValueError: for an empty ``x`` or a last axis that is not ``K``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> s = jqat.moments_update(jqat.moments_init(2), jnp.array([[1., -2.], [3., 4.], [jnp.nan, 0.]]))
    >>> s.xtx.tolist(), s.abs_sum.tolist(), s.abs_max.tolist(), int(s.count), int(s.nonfinite)
    ([[10.0, 10.0], [10.0, 20.0]], [4.0, 6.0], [3.0, 4.0], 2, 1)
  """
  _check_state(state)
  x = jnp.asarray(x)
  if x.size == 0 or x.ndim == 0:
    raise ValueError(f"cannot calibrate on an empty array or a scalar: x has shape {x.shape}")
  if x.shape[-1] != state.num_features:
    raise ValueError(
      f"x has shape {x.shape}, but the statistics are for inputs with {state.num_features} features on the last axis"
    )
  return _update(state, x)


def _check_pair(a: MomentsState, b: MomentsState) -> None:
  _check_state(a)
  _check_state(b)
  if a.xtx.shape != b.xtx.shape or a.abs_sum.shape != b.abs_sum.shape:
    raise ValueError(
      f"cannot merge MomentsStates of {a.num_features} and {b.num_features} features "
      f"(xtx shapes {a.xtx.shape} and {b.xtx.shape})"
    )


def moments_merge(a: MomentsState, b: MomentsState) -> MomentsState:
  """The statistics of everything ``a`` and ``b`` observed: sums add, maxima take the max.

  Associative and commutative up to float rounding of the sums (the maxima and
  counts are exact).

  Raises:
    TypeError: for something other than two ``MomentsState``.
    ValueError: for states of different sizes.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> s0 = jqat.moments_init(2)
    >>> a = jqat.moments_update(s0, jnp.array([[1., -2.]]))
    >>> b = jqat.moments_update(s0, jnp.array([[3., 4.]]))
    >>> jqat.moments_merge(a, b).xtx.tolist()
    [[10.0, 10.0], [10.0, 20.0]]
  """
  _check_pair(a, b)
  return _merge(a, b)


@jax.jit
def _merge(a: MomentsState, b: MomentsState) -> MomentsState:
  return MomentsState(
    a.xtx + b.xtx,
    a.abs_sum + b.abs_sum,
    jnp.maximum(a.abs_max, b.abs_max),
    a.count + b.count,
    a.nonfinite + b.nonfinite,
  )


def moments_all_reduce(state: MomentsState, axis_name) -> MomentsState:
  """``moments_merge`` across a mapped axis: ``psum`` of the sums and counts, ``pmax`` of the maxima.

  For statistics gathered per device inside ``shard_map`` (or ``pmap``, or
  ``vmap`` with ``axis_name``); every device gets the merged state.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> def local(x):
    ...   return jqat.moments_all_reduce(jqat.moments_update(jqat.moments_init(2), x), "d")
    >>> s = jax.vmap(local, axis_name="d")(jnp.arange(8.0).reshape(2, 2, 2))
    >>> s.abs_max[0].tolist(), int(s.count[0])
    ([6.0, 7.0], 4)
  """
  _check_state(state)
  return MomentsState(
    lax.psum(state.xtx, axis_name),
    lax.psum(state.abs_sum, axis_name),
    lax.pmax(state.abs_max, axis_name),
    lax.psum(state.count, axis_name),
    lax.psum(state.nonfinite, axis_name),
  )


def moments_mean_abs(state: MomentsState) -> jax.Array:
  """``mean |x_j|`` per input channel over the finite rows; 0 where no row was seen.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> s = jqat.moments_update(jqat.moments_init(2), jnp.array([[1., -2.], [3., 4.]]))
    >>> jqat.moments_mean_abs(s).tolist()
    [2.0, 3.0]
  """
  _check_state(state)
  return state.abs_sum / jnp.maximum(state.count, 1).astype(jnp.float32)

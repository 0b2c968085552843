"""Calibration over PyTrees: ``observe``, ``merge``, ``finalize`` and ``calibrate_model``.

A statistics tree has a state (``RangeState``, ``MovingAverageState`` or
``HistogramState``) where the matching tree of activations has an array. The
functions map the single-state functions over both trees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jqat._src import qparams as qp_lib
from jqat._src.calibration import stats
from jqat._src.config import CalibMethod, QatConfig


def _is_state(x) -> bool:
  return isinstance(x, stats.STATE_TYPES)


def _check_same(what: str, a, b, a_name: str, b_name: str, is_leaf=None) -> None:
  sa = jax.tree.structure(a, is_leaf=_is_state)
  sb = jax.tree.structure(b, is_leaf=is_leaf)
  if sa != sb:
    raise ValueError(f"{what}: the {a_name} tree {sa} and the {b_name} tree {sb} have different structures")


def init(tree, config: QatConfig, method: CalibMethod | str, **kwargs):
  """A statistics tree for a tree of example arrays (or anything with ``.shape``), see ``init_stats``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> st = jqat.init_tree({"a": jnp.zeros((2, 3))}, jqat.QatConfig(), "minmax")
    >>> st["a"].min.shape  # per tensor: a scalar
    ()
  """
  return jax.tree.map(lambda x: stats.init_stats(jnp.shape(x), config, method, **kwargs), tree)


def observe(stats_tree, activations_tree):
  """Updates every state with the array at the same place in ``activations_tree``.

  Raises:
    ValueError: when the trees have different structures (both are named).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig()
    >>> st = jqat.init_tree({"a": jnp.zeros(3), "b": jnp.zeros(2)}, cfg, "minmax")
    >>> st = jqat.observe(st, {"a": jnp.array([1.0, -4.0, 2.0]), "b": jnp.array([0.5, 0.25])})
    >>> float(st["a"].min), float(st["b"].max)
    (-4.0, 0.5)
  """
  _check_same("observe", stats_tree, activations_tree, "statistics", "activations")
  return jax.tree.map(stats.update_stats, stats_tree, activations_tree, is_leaf=_is_state)


def merge(a_tree, b_tree):
  """Merges two statistics trees state by state (``merge_stats``).

  Raises:
    ValueError: when the trees have different structures (both are named).
  """
  _check_same("merge", a_tree, b_tree, "first statistics", "second statistics", is_leaf=_is_state)
  return jax.tree.map(stats.merge_stats, a_tree, b_tree, is_leaf=_is_state)


def finalize(stats_tree, config: QatConfig, method: CalibMethod | str, *, percentile: ArrayLike = 99.99):
  """``QParams`` for every state of a statistics tree (``finalize_stats``).

  Raises:
    ValueError: for a percentile outside ``(1, 100]`` (``check_percentile``), before any state is finalized.
  """
  stats.check_percentile(percentile)
  return jax.tree.map(
    lambda s: stats.finalize_stats(s, config, method, percentile=percentile), stats_tree, is_leaf=_is_state
  )


class QuantizationSpec(NamedTuple):
  """The calibrated quantization of one named tensor.

  Attributes:
    layer_name: the key it was calibrated under.
    scale: positive float32, in the layout of ``jqat.params_shape``.
    zero_point: integer-valued float32, same shape.
    method: the ``CalibMethod`` that produced it.
  """

  layer_name: str
  scale: jax.Array
  zero_point: jax.Array
  method: CalibMethod

  @property
  def qparams(self) -> qp_lib.QParams:
    return qp_lib.QParams(self.scale, self.zero_point)


_update = jax.jit(stats.update_stats)
_finalize = jax.jit(stats.finalize_stats, static_argnames=("config", "method", "percentile"))


def calibrate_model(
  activations: Mapping[str, Sequence[ArrayLike]],
  *,
  method: CalibMethod | str = CalibMethod.MINMAX,
  config: QatConfig | None = None,
  percentile: float = 99.99,
  **init_kwargs,
) -> dict[str, QuantizationSpec]:
  """Calibrates every named tensor from its batches.

  Each name gets the state ``method`` needs, sized by its first batch; the
  batches are observed in order under ``jax.jit``; the result is finalized
  with ``config``. Scale and zero point are in the layout of
  ``jqat.params_shape`` for the first batch's shape, for every method.

  Args:
    activations: ``{name: [batch, ...]}``, a non-empty sequence of arrays per
      name.
    method: a ``CalibMethod`` or its name.
    config: the quantization config; default ``QatConfig()``.
    percentile: for ``PERCENTILE``.
    **init_kwargs: ``num_bins`` or ``momentum``, for ``init_stats``.

  Returns:
    ``{name: QuantizationSpec}``.

  Raises:
    ValueError: for a name with no batches, an empty batch, batches of one
      name whose shapes disagree on the channel or group axes (both shapes
      are named), a percentile outside ``(1, 100]`` (checked before any batch
      runs), or an invalid method / config combination.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> x = jnp.linspace(-2.0, 2.0, 4096)
    >>> specs = jqat.calibrate_model({"fc1": [x, 0.5 * x]}, method="entropy", config=jqat.QatConfig())
    >>> spec = specs["fc1"]
    >>> spec.layer_name, spec.method, spec.scale.shape, round(float(spec.scale) * 127, 4)
    ('fc1', <CalibMethod.ENTROPY: 'entropy'>, (), 2.0)
  """
  config = QatConfig() if config is None else config
  qp_lib.check_config(config, "calibrate_model")
  method = stats._method(method)
  stats.check_percentile(percentile)
  specs = {}
  for name, batches in activations.items():
    if isinstance(batches, jax.Array) or hasattr(batches, "__array__"):
      batches = [batches]
    batches = list(batches)
    if not batches:
      raise ValueError(f"calibrate_model: no batches for {name!r}")
    shape = jnp.shape(batches[0])
    state = stats.init_stats(shape, config, method, **init_kwargs)
    kept = qp_lib.kept_axes(shape, config)
    for i, batch in enumerate(batches):
      batch = jnp.asarray(batch)
      if batch.size == 0:
        raise ValueError(f"calibrate_model: an empty batch (shape {batch.shape}) for {name!r}")
      if kept and (batch.ndim != len(shape) or any(batch.shape[a] != shape[a] for a in kept)):
        raise ValueError(
          f"calibrate_model: batch {i} of {name!r} has shape {batch.shape} but batch 0 has {shape}; under a "
          f"per-channel or per-group config the batches must agree on axes {kept} (the channel and group axes)"
        )
      state = _update(state, batch)
    qp = _finalize(state, config, method, percentile=float(percentile))
    pshape = qp_lib.params_shape(shape, config)
    specs[name] = QuantizationSpec(
      name, jnp.broadcast_to(qp.scale, pshape), jnp.broadcast_to(qp.zero_point, pshape), method
    )
  return specs

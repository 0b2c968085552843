"""SmoothQuant: move the activations' outlier channels into the weights before w8a8 quantization.

A layer ``y = x W`` with ``W`` of shape ``(K, N)`` computes the same with
``x' = x / s`` and ``W' = diag(s) W`` for any positive ``s`` of shape ``(K,)``.
SmoothQuant picks, per input channel ``j``,

    s_j = max|x_j|^α / max_n |W_jn|^(1−α),

which balances the ranges of ``x'`` and ``W'`` (``α = 0.5``) so that static
per-tensor int8 activations lose less to a few large channels. ``x / s`` is
folded into the op that produces ``x`` (a LayerNorm's scale and bias, or a
preceding dense kernel's output columns and bias; see
``jqat._src.ptq.fold``), and ``diag(s) W`` is quantized as usual.

References:
  Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and
  Efficient Post-Training Quantization for Large Language Models", ICML 2023
  (arXiv 2211.10438, 2022).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jqat._src.calibration.moments import MomentsState

# The reference implementation's clamp: an all-zero weight row or activation channel
# gives this floor instead of a division by zero or a zero scale.
MIN_SMOOTH = 1e-5


def check_alpha(alpha, name: str = "alpha") -> float:
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{name}={alpha!r} is invalid; allowed: a number in [0, 1]")
  return float(alpha)


def smooth_quant_scales(act_absmax: ArrayLike | MomentsState, kernel: ArrayLike, alpha: float = 0.5) -> jax.Array:
  """The SmoothQuant scales ``s_j = max|x_j|^α / max_n |W_jn|^(1−α)`` of a ``(K, N)`` kernel.

  ``max_n |W_jn|`` is clamped below at ``1e-5``, and so is the result (the
  reference implementation's guards): an input channel that is always zero or a
  weight row of zeros gives a finite positive scale, never 0, NaN or Inf.

  Args:
    act_absmax: ``max|x_j|`` per input channel, shape ``(K,)``, or a
      ``MomentsState`` (its ``abs_max``).
    kernel: float ``(K, N)``, the Flax ``(in, out)`` layout.
    alpha: the migration strength in ``[0, 1]``: 0 leaves the activations'
      ranges as they are up to the weights', 1 moves them all into the weights.

  Returns:
    float32 ``(K,)``: serve with ``x / s`` and the kernel ``s[:, None] * W``.

  Raises:
    ValueError: ``alpha`` outside ``[0, 1]``, shapes that do not match, or a
      negative or non-finite ``act_absmax`` (checked on concrete arrays).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> w = jnp.array([[1.0, -4.0], [0.5, 0.25], [0.0, 0.0]])
    >>> s = jqat.smooth_quant_scales(jnp.array([16.0, 1.0, 0.0]), w, alpha=0.5)
    >>> [float(f"{v:.4g}") for v in s.tolist()]  # 16^.5 / 4^.5, 1 / .5^.5, the floor
    [2.0, 1.414, 1e-05]

  References:
    Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
    Quantization for Large Language Models", arXiv 2211.10438, 2022.
  """
  alpha = check_alpha(alpha)
  if isinstance(act_absmax, MomentsState):
    act_absmax = act_absmax.abs_max
  a = jnp.asarray(act_absmax)
  w = jnp.asarray(kernel)
  if w.ndim != 2:
    raise ValueError(f"smooth_quant_scales needs an (in, out) kernel, got shape {w.shape}")
  if a.shape != (w.shape[0],):
    raise ValueError(
      f"act_absmax has shape {a.shape}, but the kernel of shape {w.shape} needs ({w.shape[0]},): one value per "
      "input feature"
    )
  if not isinstance(a, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a) & (a >= 0))):
    raise ValueError("act_absmax must be finite and >= 0 (max|x| per input channel)")
  return _scales(a, w, alpha)


@jax.jit
def _scales(a: jax.Array, w: jax.Array, alpha) -> jax.Array:
  a = a.astype(jnp.float32)
  wmax = jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1), MIN_SMOOTH)
  return jnp.maximum(a**alpha / wmax ** (1.0 - alpha), MIN_SMOOTH)

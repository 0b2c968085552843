"""Folding ``x / s`` into the op that produces ``x``: per-channel scales of AWQ and SmoothQuant at no serving cost.

AWQ and SmoothQuant serve a layer ``y = x W`` as ``(x / s) (diag(s) W)``. The
division costs nothing when the op that produces ``x`` is itself linear per
channel on its output:

* a LayerNorm or RMSNorm, ``x = γ ⊙ n(h) + β``: then ``x / s`` is the same
  normalisation with ``γ / s`` and ``β / s`` (``fold_into_layernorm``);
* a dense layer, ``x = h K + b``: then ``x / s = h (K / s) + b / s``, the
  kernel's output columns divided by ``s`` (``fold_into_dense``). Anything
  between the two must commute with a positive per-channel scale (a reshape,
  a ReLU; not a GELU or a residual add shared with other consumers).

Every consumer of ``x`` must then use ``diag(s) W``: in a transformer block the
LayerNorm before attention feeds the query, key and value projections, which
share one ``s`` (computed from their concatenated kernels). Where no such op
exists (the input of a residual stream, an attention output after a softmax),
``x / s`` stays one multiply, fused by XLA into the activation's quantization.

References:
  Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
  for Large Language Models", arXiv 2211.10438, 2022 (Section 4.3).
  Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
  and Acceleration", arXiv 2306.00978, 2023.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def _check_s(s: jax.Array, features: int, what: str, shape) -> None:
  if s.shape != (features,):
    raise ValueError(f"s has shape {s.shape}, but the {what} of shape {tuple(shape)} needs ({features},)")
  if not isinstance(s, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
    raise ValueError("s must be finite and > 0")


def fold_into_layernorm(
  scale: ArrayLike, s: ArrayLike, bias: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array | None]:
  """``(γ / s, β / s)``: a LayerNorm (or RMSNorm, ``bias=None``) whose output is the old one divided by ``s``.

  Args:
    scale: the norm's ``scale`` parameter ``γ``, shape ``(K,)``.
    s: positive per-channel scales ``(K,)`` (``jqat.awq``, ``jqat.smooth_quant_scales``).
    bias: the norm's ``bias`` ``β`` ``(K,)``, or None.

  Returns:
    ``(scale / s, bias / s)`` in the parameters' dtypes (``bias`` stays None).

  Raises:
    ValueError: shapes that do not match, or ``s`` not finite and positive.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> g, b = jqat.fold_into_layernorm(jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0]), jnp.array([0.5, 1.0]))
    >>> g.tolist(), b.tolist()
    ([0.5, 0.5], [0.25, 0.25])
  """
  scale = jnp.asarray(scale)
  s = jnp.asarray(s)
  if scale.ndim != 1:
    raise ValueError(f"scale must be a norm's (K,) parameter, got shape {scale.shape}")
  _check_s(s, scale.shape[0], "scale", scale.shape)
  new_scale = (scale / s).astype(scale.dtype)
  if bias is None:
    return new_scale, None
  bias = jnp.asarray(bias)
  if bias.shape != scale.shape:
    raise ValueError(f"bias has shape {bias.shape}, but scale has shape {scale.shape}")
  return new_scale, (bias / s).astype(bias.dtype)


def fold_into_dense(kernel: ArrayLike, bias: ArrayLike | None, s: ArrayLike) -> tuple[jax.Array, jax.Array | None]:
  """``(K / s, b / s)``: a dense layer (kernel ``(..., K)``) whose output is the old one divided by ``s``.

  Args:
    kernel: the preceding layer's kernel; its last axis is the output features
      (Flax ``(in, out)``).
    bias: its bias ``(K,)``, or None.
    s: positive per-channel scales ``(K,)``.

  Returns:
    ``(kernel / s, bias / s)`` in the parameters' dtypes (``bias`` stays None).

  Raises:
    ValueError: shapes that do not match, or ``s`` not finite and positive.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> k, b = jqat.fold_into_dense(jnp.array([[2.0, 4.0]]), jnp.array([1.0, 1.0]), jnp.array([2.0, 4.0]))
    >>> k.tolist(), b.tolist()
    ([[1.0, 1.0]], [0.5, 0.25])
  """
  kernel = jnp.asarray(kernel)
  s = jnp.asarray(s)
  if kernel.ndim < 1:
    raise ValueError(f"kernel must have an output axis, got shape {kernel.shape}")
  _check_s(s, kernel.shape[-1], "kernel", kernel.shape)
  new_kernel = (kernel / s).astype(kernel.dtype)
  if bias is None:
    return new_kernel, None
  bias = jnp.asarray(bias)
  if bias.shape != s.shape:
    raise ValueError(f"bias has shape {bias.shape}, but the kernel of shape {kernel.shape} needs {s.shape}")
  return new_kernel, (bias / s).astype(bias.dtype)

"""AWQ: scale up the weight rows of the inputs that matter most before round-to-nearest quantization.

A layer ``y = x W`` (``W`` of shape ``(K, N)``) equals ``(x / s) (diag(s) W)``
for any positive per-input scales ``s``. Quantizing ``diag(s) W`` instead of
``W`` shrinks, relative to the weight, the rounding error of the rows with
``s_j > 1``, and the inputs with large activations are the ones whose rows
cost most in the output. AWQ takes ``a_j = mean|x_j|`` over calibration
tokens and, for ``α`` on the grid ``{0, 1/g, …, (g−1)/g}``,

    s = max(a^α, 1e-4),   s ← s / sqrt(max(s) · min(s)),

keeping the ``α`` with the least output error

    mean ‖x W − (x / s) Q(diag(s) W)‖²

where ``Q`` is round-to-nearest on ``config``'s grid (``qparams_from_array``,
``quantize``). The normalisation centres ``s`` around 1 so that the scales
of ``Q`` stay in range.

Serving divides the activation by ``s``. Where the model allows it this is
folded into the op that produces ``x``, at no cost (``fold_into_layernorm``:
a LayerNorm's or RMSNorm's scale and bias; ``fold_into_dense``: a preceding
dense kernel's output columns and bias, with nothing in between but
operations that commute with a per-channel scale). Otherwise it is one
multiply by ``1 / s`` fused into the activation's quantization.

References:
  Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "AWQ:
  Activation-aware Weight Quantization for LLM Compression and Acceleration",
  MLSys 2024 (arXiv 2306.00978, 2023).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jqat._src.calibration.moments import MomentsState, moments_mean_abs
from jqat._src.config import QatConfig
from jqat._src.ptq.gptq import check_kernel_config
from jqat._src.qparams import qparams_from_array
from jqat._src.qtensor import QTensor, dequantize, quantize

# The reference implementation's floor on a^α, before the normalisation.
MIN_AWQ_SCALE = 1e-4
_HIGHEST = lax.Precision.HIGHEST


def awq(
  kernel: ArrayLike,
  x: ArrayLike,
  config: QatConfig,
  *,
  grid: int = 20,
  moments: MomentsState | None = None,
) -> tuple[QTensor, jax.Array]:
  """Quantizes a ``(K, N)`` kernel with AWQ's searched per-input scales (see the module docstring).

  Args:
    kernel: float ``(K, N)``, the Flax ``(in, out)`` layout.
    x: calibration activations ``(..., K)`` (leading axes are rows); rows with
      a NaN or Inf are left out. The output error of the search is measured on
      them, and ``mean|x|`` comes from them unless ``moments`` is given.
    config: the weight format and layout (per-channel ``channel_axis=-1``
      and/or groups along ``group_axis=0``), typically int4 with groups of 128.
    grid: the number of ``α`` values tried, ``{0, 1/grid, …, (grid−1)/grid}``.
    moments: statistics of a larger calibration set (``jqat.moments_update``);
      its ``mean|x|`` is used and ``x`` is only the sample for the error.

  Returns:
    ``(q, s)``: the ``QTensor`` of ``diag(s) W`` and the float32 scales ``s``
    ``(K,)``; serve ``(x / s) @ dequantize(q)`` (or the integer path).

  Raises:
    ValueError: shapes that do not match, a non-positive ``grid``, ``x``
      without a finite row, a non-finite kernel (concrete arrays), or a
      config that cannot quantize an ``(in, out)`` kernel.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> x = jax.random.normal(jax.random.key(0), (128, 32)) * jnp.where(jnp.arange(32) < 4, 20.0, 1.0)
    >>> w = jax.random.normal(jax.random.key(1), (32, 8))
    >>> cfg = jqat.QatConfig(bits="int3", per_channel=True, group_size=16)
    >>> q, s = jqat.awq(w, x, cfg, grid=10)
    >>> rtn, ones = jqat.awq(w, x, cfg, grid=1)  # only alpha = 0: s = 1, round to nearest
    >>> err = lambda q, s: float(jnp.linalg.norm(x @ w - (x / s) @ jqat.dequantize(q)))
    >>> bool((ones == 1).all()), err(q, s) < err(rtn, ones)
    (True, True)

  References:
    Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
    and Acceleration", arXiv 2306.00978, 2023.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"awq needs a float (in, out) kernel, got shape {kernel.shape} and dtype {kernel.dtype}")
  k = kernel.shape[0]
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != k or x.size == 0:
    raise ValueError(f"x has shape {x.shape}, but the kernel of shape {kernel.shape} needs rows of {k} input features")
  if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
    raise ValueError(f"grid={grid!r} is invalid; allowed: a positive int")
  check_kernel_config(config, kernel.shape, "awq", allow_float=True)
  if moments is not None:
    if not isinstance(moments, MomentsState):
      raise TypeError(f"moments must be a MomentsState (from jqat.moments_init), got {type(moments).__name__}")
    if moments.num_features != k:
      raise ValueError(f"the MomentsState has {moments.num_features} features, but the kernel needs {k}")
  if not isinstance(kernel, jax.core.Tracer) and not bool(jnp.isfinite(kernel).all()):
    raise ValueError("the kernel holds NaN or Inf")
  rows = x.reshape(-1, k)
  mean_abs = None if moments is None else moments_mean_abs(moments)
  q, s, finite_rows = _awq(kernel, rows, mean_abs, config=config, grid=grid)
  if not isinstance(finite_rows, jax.core.Tracer) and int(finite_rows) == 0:
    raise ValueError(f"x of shape {x.shape} has no row without NaN or Inf")
  return q, s


def _rtn(w: jax.Array, config: QatConfig) -> QTensor:
  return quantize(w, qparams_from_array(w, config), config)


def awq_scales(mean_abs: jax.Array, alpha) -> jax.Array:
  """``s = max(a^α, 1e-4) / sqrt(max(s) · min(s))``, the scales AWQ tries for one ``α``."""
  s = jnp.maximum(mean_abs**alpha, MIN_AWQ_SCALE)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def awq_losses(kernel: jax.Array, rows: jax.Array, mean_abs: jax.Array, config: QatConfig, grid: int) -> jax.Array:
  """The search's mean squared output errors, one per ``α = i / grid``, over the finite rows."""
  w = kernel.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(rows), axis=1)
  x = jnp.where(finite[:, None], rows, 0.0).astype(jnp.float32)
  y = jnp.matmul(x, w, precision=_HIGHEST)
  n = jnp.maximum(jnp.sum(finite), 1) * w.shape[1]

  def loss(alpha):
    s = awq_scales(mean_abs, alpha)
    wq = dequantize(_rtn(w * s[:, None], config))
    # x / s as served; the rows left out are zeros on both sides.
    return jnp.sum(jnp.square(y - jnp.matmul(x / s, wq, precision=_HIGHEST))) / n

  return lax.map(loss, jnp.arange(grid, dtype=jnp.float32) / grid)


@functools.partial(jax.jit, static_argnames=("config", "grid"))
def _awq(kernel, rows, mean_abs, *, config: QatConfig, grid: int):
  finite = jnp.all(jnp.isfinite(rows), axis=1)
  count = jnp.sum(finite, dtype=jnp.int32)
  if mean_abs is None:
    clean = jnp.where(finite[:, None], rows, 0.0).astype(jnp.float32)
    mean_abs = jnp.sum(jnp.abs(clean), axis=0) / jnp.maximum(count, 1)
  mean_abs = mean_abs.astype(jnp.float32)
  # The first minimum, as the reference's strict `<` keeps.
  alpha = jnp.argmin(awq_losses(kernel, rows, mean_abs, config, grid)).astype(jnp.float32) / grid
  s = awq_scales(mean_abs, alpha)
  q = _rtn(kernel.astype(jnp.float32) * s[:, None], config)
  return q.replace(dequant_dtype=jnp.dtype(kernel.dtype)), s, count

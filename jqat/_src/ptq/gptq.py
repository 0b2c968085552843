"""GPTQ: quantize a kernel column by column, compensating each rounding error in the columns not yet quantized.

For a Flax kernel ``W`` of shape ``(K, N)`` (inputs × outputs) and the layer
inputs ``X`` (``n × K``), GPTQ minimises ``‖XW − XŴ‖²_F`` over grid values
``Ŵ``, one input row ``k`` of ``W`` at a time. With ``H = XᵀX`` (the Hessian
of the objective up to a factor 2):

1. dead inputs, ``H_kk = 0``: set ``H_kk = 1`` and ``W_k = 0`` (they never
   reach the output);
2. optional activation order: visit rows by decreasing ``H_kk``;
3. dampen, ``H += damp · mean(diag H) · I``;
4. ``U`` = the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``);
5. for each row ``k``: ``q = Q(W_k)``, ``e = (W_k − q) / U_kk``,
   ``W_j −= U_kj · e`` for ``j > k``.

Step 5 runs in blocks of ``block_size`` rows (the paper's lazy batch
updates): inside a block only the block's rows are updated; at its end the
rows after it get ``U[block, rest]ᵀ E``, a dense product per later block.
This equals the plain loop up to float rounding and turns most of the work
into matrix products.

The grid ``Q`` is jqat's (``qparams_from_array`` / ``fake_quant``):

* per-channel (or per-tensor): the scales come from the original kernel,
  before any update;
* per-group (groups of ``group_size`` input rows): each group's scales come
  from the current, already updated rows of the group when its first row is
  reached, as in the paper's loop. With ``act_order`` the groups stay
  contiguous in the original order (so the result is an ordinary per-group
  ``QTensor``) and their scales are computed up front from the kernel (the
  reference implementation's ``static_groups``).

References:
  Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers", ICLR 2023
  (arXiv 2210.17323, 2022).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jqat._src.calibration.moments import MomentsState
from jqat._src.config import QatConfig
from jqat._src.fake_quant import fake_quant
from jqat._src.qparams import QParams, qparams_from_array, qparams_from_range
from jqat._src.qtensor import QTensor, quantize

_HIGHEST = lax.Precision.HIGHEST


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _row_config(config: QatConfig) -> QatConfig:
  """The config of one input row ``(1, N)``: per output channel or per tensor, no groups."""
  return config.replace(group_size=None, group_axis=0, channel_axis=-1)


def check_kernel_config(config: QatConfig, shape, who: str, *, allow_float: bool = False) -> None:
  """Errors for a config that cannot quantize an ``(in, out)`` kernel row by row."""
  if not isinstance(config, QatConfig):
    raise TypeError(f"config must be a jqat.QatConfig, got {type(config).__name__}")
  if config.bits.is_float and not allow_float:
    raise ValueError(f"{who} needs an integer format ('int2' .. 'int8'), got bits={config.bits.value!r}")
  if config.per_channel and tuple(a % 2 for a in config.channel_axes) != (1,):
    raise ValueError(
      f"{who} quantizes per output feature: channel_axis must be -1 (or 1) of the (in, out) kernel, got "
      f"channel_axis={config.channel_axis!r}"
    )
  if config.group_size is not None:
    if config.group_axis % 2 != 0:
      raise ValueError(
        f"{who} groups the input features: group_axis must be 0 of the (in, out) kernel, got {config.group_axis}"
      )
    if shape[0] % config.group_size:
      raise ValueError(
        f"group_size={config.group_size} does not divide K={shape[0]}, the input features of the kernel of shape "
        f"{tuple(shape)}"
      )


def _block_size(block_size: int, group_size: int | None) -> int:
  """``block_size`` made a multiple of ``group_size`` (when smaller) or a divisor of it (when larger).

  Then a group starts either inside a block, at a multiple of ``group_size``
  with all its rows in the block, or at a block start; both see fully updated
  rows. The block size changes only the float rounding of the result.
  """
  if group_size is None:
    return block_size
  if group_size <= block_size:
    return block_size // group_size * group_size
  return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def gptq(
  kernel: ArrayLike,
  hessian: ArrayLike | MomentsState,
  config: QatConfig,
  *,
  damp: float = 0.01,
  block_size: int = 128,
  act_order: bool = False,
) -> QTensor:
  """Quantizes a ``(K, N)`` kernel with GPTQ (see the module docstring for the algorithm).

  Args:
    kernel: float array ``(K, N)``, the Flax ``(in, out)`` layout.
    hessian: ``H = Σ xᵀx`` over the layer inputs, a ``(K, K)`` array, or a
      ``MomentsState`` that accumulated it (``jqat.moments_init(K)``).
    config: an integer format (``int2`` .. ``int8``), symmetric or not,
      per-tensor, per output channel (``per_channel=True``, ``channel_axis=-1``)
      and/or per group of input features (``group_size``, ``group_axis=0``).
    damp: the dampening relative to the mean of ``diag H``, ``> 0``.
    block_size: rows per lazy batch update (rounded to fit ``group_size``).
    act_order: visit input rows by decreasing ``H_kk``; the permutation is
      undone in the result.

  Returns:
    A ``QTensor`` of the kernel's shape and dtype, in ``config``'s layout.

  Raises:
    ValueError: a kernel that is not 2-D, a Hessian whose shape does not match,
      ``damp <= 0``, a non-finite kernel or Hessian, a Hessian that is not
      positive definite even after dampening, an empty ``MomentsState``,
      a group size that does not divide ``K``, or a config gptq cannot serve.
      (Value checks need concrete arrays; under an outer ``jit`` they are
      skipped and a failed factorization gives NaN.)

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> x = jax.random.normal(jax.random.key(0), (256, 32))
    >>> w = jax.random.normal(jax.random.key(1), (32, 8))
    >>> cfg = jqat.QatConfig(bits="int4", per_channel=True)
    >>> q = jqat.gptq(w, x.T @ x, cfg)
    >>> q.shape, q.scale.shape
    ((32, 8), (1, 8))
    >>> err = lambda w2: float(jnp.linalg.norm(x @ w - x @ w2))
    >>> rtn = jqat.dequantize(jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg))
    >>> err(jqat.dequantize(q)) < err(rtn)
    True

  References:
    Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", arXiv 2210.17323, 2022.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"gptq needs a float (in, out) kernel, got shape {kernel.shape} and dtype {kernel.dtype}")
  k, _ = kernel.shape
  if isinstance(hessian, MomentsState):
    if not hessian.has_hessian:
      raise ValueError("the MomentsState holds no Hessian: make it with jqat.moments_init(K, hessian=True)")
    if _concrete(hessian.count) and int(hessian.count) == 0:
      raise ValueError("the MomentsState observed no finite rows: its Hessian is all zeros")
    hessian = hessian.xtx
  hessian = jnp.asarray(hessian)
  if hessian.shape != (k, k):
    raise ValueError(
      f"the Hessian has shape {hessian.shape}, but the kernel of shape {kernel.shape} needs ({k}, {k}): "
      "H = Σ xᵀx over the kernel's input features (axis 0)"
    )
  if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
    raise ValueError(f"damp={damp!r} is invalid; allowed: a finite number > 0 (relative to mean(diag H))")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r} is invalid; allowed: a positive int")
  if not isinstance(act_order, bool):
    raise ValueError(f"act_order={act_order!r} is invalid; allowed: True, False")
  check_kernel_config(config, kernel.shape, "gptq")
  for name, a in (("kernel", kernel), ("Hessian", hessian)):
    if _concrete(a) and not bool(jnp.isfinite(a).all()):
      raise ValueError(f"the {name} holds NaN or Inf")
  q, ok = _gptq(kernel, hessian, float(damp), config=config, block_size=block_size, act_order=act_order)
  if _concrete(ok) and not bool(ok):
    raise ValueError(
      f"the Cholesky factorization of the dampened Hessian failed (it is not positive definite); "
      f"a larger damp than {damp} may help"
    )
  return q


def _inverse_cholesky_upper(h: jax.Array) -> jax.Array:
  """``U`` upper triangular with ``UᵀU = h⁻¹``."""
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.linalg.cholesky(inv).T


@functools.partial(jax.jit, static_argnames=("config", "block_size", "act_order"))
def _gptq(kernel, hessian, damp, *, config: QatConfig, block_size: int, act_order: bool):
  cd = jnp.float64 if kernel.dtype == jnp.float64 else jnp.float32
  w = kernel.astype(cd)
  h = hessian.astype(cd)
  k, n = w.shape
  gs = config.group_size
  row_cfg = _row_config(config)
  # With act_order the groups' scales are fixed up front, so no group starts inside the loop.
  b = block_size if act_order else _block_size(block_size, gs)
  nb = -(-k // b)
  kp = nb * b

  # Per-channel / per-tensor scales come from the original kernel.
  if gs is None:
    params = qparams_from_array(w, row_cfg)

  diag = jnp.diagonal(h)
  dead = diag == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(cd))
  w = jnp.where(dead[:, None], 0.0, w)

  if gs is not None and act_order:
    params = qparams_from_array(w, config)  # (K / gs, N or 1), contiguous groups in the original order
  elif gs is not None:
    # Filled group by group during the loop; groups past K (padding) stay at the smallest scale.
    nc = n if config.per_channel else 1
    empty = jnp.zeros((kp // gs, nc), cd)
    params = qparams_from_range(empty, empty, row_cfg)

  if act_order:
    perm = jnp.argsort(-jnp.diagonal(h), stable=True)
    w = w[perm]
    h = h[perm][:, perm]
  else:
    perm = jnp.arange(k)

  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=cd)
  u = _inverse_cholesky_upper(h)
  ok = jnp.all(jnp.isfinite(u))

  # Pad to whole blocks: zero rows with an identity Hessian quantize to 0 and pass no error on.
  w = jnp.pad(w, ((0, kp - k), (0, 0)))
  u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(jnp.arange(kp) >= k).astype(cd)
  perm = jnp.concatenate([perm, jnp.arange(k, kp)])
  num_groups = None if gs is None else k // gs

  def row_params(p_loop: QParams, row) -> QParams:
    """The ``(1, N)`` or ``(1, 1)`` parameters of (permuted) row ``row``."""
    if gs is None:
      return params
    if act_order:  # fixed groups of the original order
      p, g = params, jnp.minimum(perm[row] // gs, num_groups - 1)
    else:  # groups filled in as the loop reaches them
      p, g = p_loop, row // gs
    return QParams(lax.dynamic_slice_in_dim(p.scale, g, 1), lax.dynamic_slice_in_dim(p.zero_point, g, 1))

  def group_params(rows: jax.Array) -> QParams:
    # (1, N) per channel, (1, 1) per tensor: one row of the group table.
    return QParams(*(a.reshape(1, -1) for a in qparams_from_array(rows, row_cfg)))

  def set_group(p: QParams, g, new: QParams) -> QParams:
    return QParams(
      lax.dynamic_update_slice_in_dim(p.scale, new.scale.astype(p.scale.dtype), g, 0),
      lax.dynamic_update_slice_in_dim(p.zero_point, new.zero_point.astype(p.zero_point.dtype), g, 0),
    )

  in_block_groups = gs is not None and not act_order and b % gs == 0
  block_start_groups = gs is not None and not act_order and b % gs != 0  # gs a multiple of b

  def block(i, carry):
    w, p, before = carry
    i1 = i * b
    w1 = lax.dynamic_slice_in_dim(w, i1, b)
    u1 = lax.dynamic_slice(u, (i1, i1), (b, b))
    if block_start_groups:
      # A group starts here when i1 is a multiple of gs; its rows all come after the updates so far.
      new = group_params(lax.dynamic_slice_in_dim(w, jnp.minimum(i1, kp - gs), gs))
      starts = i1 % gs == 0
      p = jax.tree.map(lambda a, c: jnp.where(starts, c, a), p, set_group(p, i1 // gs, new))

    def column(j, c):
      w1, err, before1, p = c
      if in_block_groups:

        def start_group(p):
          return set_group(p, (i1 + j) // gs, group_params(lax.dynamic_slice_in_dim(w1, j, gs)))

        p = lax.cond(j % gs == 0, start_group, lambda p: p, p)
      row = w1[j]
      q = fake_quant(row[None], row_params(p, i1 + j), row_cfg)[0]
      e = (row - q) / u1[j, j]
      # U is upper triangular: u1[j, :j] is zero, so rows before j are left as they are.
      w1 = w1 - u1[j][:, None] * e[None, :]
      return w1, err.at[j].set(e), before1.at[j].set(row), p

    zeros = jnp.zeros((b, n), cd)
    w1, err, before1, p = lax.fori_loop(0, b, column, (w1, zeros, zeros, p))

    # Lazy batch update of the rows after the block, W[rest] -= U[block, rest]ᵀ E, one later block at a
    # time: only the upper triangle of U is multiplied (one masked product over all rows would do twice the work).
    def later(j, w):
      uj = lax.dynamic_slice(u, (i1, j * b), (b, b))
      delta = lax.dot_general(uj, err, (((0,), (0,)), ((), ())), precision=_HIGHEST)
      return lax.dynamic_update_slice_in_dim(w, lax.dynamic_slice_in_dim(w, j * b, b) - delta, j * b, 0)

    w = lax.fori_loop(i + 1, nb, later, w)
    return w, p, lax.dynamic_update_slice_in_dim(before, before1, i1, 0)

  dummy = QParams(jnp.ones((1, 1), cd), jnp.zeros((1, 1), cd))
  p0 = params if gs is not None and not act_order else dummy
  _, p_loop, before = lax.fori_loop(0, nb, block, (w, p0, jnp.zeros_like(w)))
  if gs is not None and not act_order:
    params = QParams(p_loop.scale[:num_groups], p_loop.zero_point[:num_groups])

  # Each row as it was just before it was quantized, in the original order; quantizing
  # these with the same parameters reproduces the loop's grid values exactly.
  before = jnp.zeros((k, n), cd).at[perm[:k]].set(before[:k])
  out = quantize(before, params, config)
  return out.replace(dequant_dtype=jnp.dtype(kernel.dtype)), ok

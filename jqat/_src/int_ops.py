"""Integer matmul and dot_general on ``QTensor`` operands, with int32 accumulation.

With ``x = (q_x - z_x) * s_x`` and ``w = (q_w - z_w) * s_w``, a contraction over
``K`` elements is

``Σ x w = s_x s_w Σ (q_x - z_x)(q_w - z_w)
        = s_x s_w (Σ q_x q_w - z_w Σ q_x - z_x Σ q_w + K z_x z_w)``

(Jacob et al. 2018). ``Σ q_x q_w`` is one ``lax.dot_general`` on int8 values
with an int32 result; the zero-point terms are row and column sums (the column
sums of a constant weight can be prepared once, see ``weight_sums``), and the
scales are applied once, in float32, after the integer sum. Scales that vary
along the contraction (per-group) split it into groups: a batched integer dot
over the groups, then a float rescale per group and a sum over the groups.
Convolutions (``int_conv_general_dilated``) sum the same centred products with
the same overflow planner. The kernels themselves are ``int_kernels``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jqat._src import int_kernels, numerics
from jqat._src.int_kernels import INT32_MAX as INT32_MAX
from jqat._src.int_kernels import DimensionNumbers as DimensionNumbers
from jqat._src.int_kernels import accumulator_bound as accumulator_bound
from jqat._src.qtensor import QTensor, check_qtensor, dequantize, sums_shape


def _contracting(wq: QTensor, contracting_dims, where: str) -> tuple[int, ...]:
  try:
    axes = tuple(int(a) for a in contracting_dims)
  except TypeError:
    raise TypeError(f"{where}: contracting_dims must be a tuple of ints, got {contracting_dims!r}") from None
  for a in axes:
    if not -wq.ndim <= a < wq.ndim:
      raise ValueError(f"{where}: contracting axis {a} is out of range for a weight of shape {wq.shape}")
  return tuple(a % wq.ndim for a in axes)


def weight_sums(wq: QTensor, contracting_dims=(0,)) -> jax.Array:
  """Sums of a weight's integer values over its contracting axes.

  The zero-point correction of an asymmetric left operand needs ``Σ_k q_w``.
  For a constant weight, prepare it once with ``with_weight_sums``, which
  stores these sums in the weight's ``QTensor`` so they travel with the values
  they were computed from. The result keeps every axis (size 1 on the
  contracting ones), except that a per-group weight keeps one sum per group on
  its group axis.

  Args:
    wq: the quantized weight (integer format).
    contracting_dims: the weight's contracting axes (``(0,)`` for a ``(K, N)`` kernel).

  Returns:
    int32 array.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(per_channel=True)
    >>> w = jnp.array([[1.0, -2.0], [3.0, 4.0]])
    >>> wq = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
    >>> jqat.weight_sums(wq).tolist()
    [[169, 63]]
  """
  check_qtensor(wq, "weight_sums", "wq")
  if wq.config.bits.is_float:
    raise ValueError(f"weight_sums: {wq.config.bits.value} weights need no sums: fp8 operands are symmetric")
  v = wq.int_values()
  contract = _contracting(wq, contracting_dims, "weight_sums")
  cfg = wq.config
  if cfg.group_size is not None and cfg.group_axis % v.ndim in contract:
    g = cfg.group_axis % v.ndim
    vg = v.reshape(v.shape[:g] + (v.shape[g] // cfg.group_size, cfg.group_size) + v.shape[g + 1 :])
    axes = tuple(a + (a > g) for a in contract if a != g) + (g + 1,)
    return jnp.sum(vg, axis=axes, dtype=jnp.int32, keepdims=True).squeeze(g + 1)
  return int_kernels.column_sums(v, contract)


def with_weight_sums(wq: QTensor, contracting_dims=(0,)) -> QTensor:
  """``wq`` carrying its ``weight_sums`` over ``contracting_dims``, prepared once for serving.

  The sums live in the same ``QTensor`` as the values they were computed
  from, so they cannot be paired with another weight. ``int_dot_general`` and
  ``int_matmul`` use them when the left operand is asymmetric and the weight
  is contracted over the same axes.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(per_channel=True)
    >>> w = jnp.array([[1.0, -2.0], [3.0, 4.0]])
    >>> wq = jqat.with_weight_sums(jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg))
    >>> wq.sums.tolist(), wq.sums_axes
    ([[169, 63]], (0,))
  """
  contract = _contracting(check_qtensor(wq, "with_weight_sums", "wq"), contracting_dims, "with_weight_sums")
  return wq.replace(sums=weight_sums(wq, contract), sums_axes=contract)


def _check_dims(lhs: QTensor, rhs: QTensor, dimension_numbers, where: str):
  check_qtensor(lhs, where, "lhs")
  check_qtensor(rhs, where, "rhs")
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    axes = [int(a) for a in tuple(lc) + tuple(lb)], [int(a) for a in tuple(rc) + tuple(rb)]
  except (TypeError, ValueError):
    raise TypeError(
      f"{where}: dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
      f"got {dimension_numbers!r}"
    ) from None
  for name, q, ax in (("lhs", lhs, axes[0]), ("rhs", rhs, axes[1])):
    for a in ax:
      if not -q.ndim <= a < q.ndim:
        raise ValueError(f"{where}: axis {a} of dimension_numbers is out of range for {name} of shape {q.shape}")
  dims = int_kernels.normalize_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  (lc, rc), (lb, rb) = dims
  for (a, b), kind in [(p, "contracting") for p in zip(lc, rc)] + [(p, "batch") for p in zip(lb, rb)]:
    if lhs.shape[a] != rhs.shape[b]:
      raise ValueError(
        f"{where}: {kind} axes differ in length: lhs {lhs.shape} axis {a} has {lhs.shape[a]}, "
        f"rhs {rhs.shape} axis {b} has {rhs.shape[b]}"
      )
  return dims


def _prepared_sums(rhs: QTensor, rc, rhs_sums, where: str, kwarg: str):
  """The column sums to use: the weight's own, or (deprecated) ones passed beside it, checked for shape."""
  if rhs_sums is not None:
    warnings.warn(
      f"{where}({kwarg}=...) is deprecated: sums passed beside the weight can go stale; prepare the weight with "
      "jqat.with_weight_sums(wq, contracting_dims) instead",
      DeprecationWarning,
      stacklevel=3,
    )
    expected = sums_shape(rhs.shape, rhs.config, rc)
    if tuple(jnp.shape(rhs_sums)) != expected:
      raise ValueError(
        f"{where}: {kwarg} of shape {tuple(jnp.shape(rhs_sums))} do not fit the weight of shape {rhs.shape} "
        f"contracted over axes {tuple(rc)}: expected {expected} (jqat.weight_sums)"
      )
    return rhs_sums
  if rhs.sums is None:
    return None
  if tuple(rhs.sums_axes) != tuple(rc):
    raise ValueError(
      f"{where}: the weight's sums were prepared over axes {rhs.sums_axes}, but the dot contracts axes {tuple(rc)}; "
      "prepare them with jqat.with_weight_sums(wq, contracting_dims) for this dot"
    )
  return rhs.sums


def _check_bias(bias, out_shape, where: str):
  if bias is None:
    return None
  b = jnp.asarray(bias)
  try:
    shape = jnp.broadcast_shapes(b.shape, tuple(out_shape))
  except ValueError:
    shape = None
  if shape != tuple(out_shape):
    raise ValueError(
      f"{where}: bias of shape {b.shape} does not broadcast against the output of shape {tuple(out_shape)} "
      f"(e.g. bias of shape ({out_shape[-1] if out_shape else 1},))"
    )
  return b.astype(jnp.float32)


def _out_shape(lhs: QTensor, rhs: QTensor, dims) -> tuple[int, ...]:
  (lc, rc), (lb, rb) = dims
  lf = [lhs.shape[a] for a in range(lhs.ndim) if a not in lc and a not in lb]
  rf = [rhs.shape[a] for a in range(rhs.ndim) if a not in rc and a not in rb]
  return tuple(lhs.shape[a] for a in lb) + tuple(lf) + tuple(rf)


def int_dot_accumulator(
  lhs: QTensor,
  rhs: QTensor,
  dimension_numbers,
  *,
  rhs_sums: ArrayLike | None = None,
  max_accumulator: int = INT32_MAX,
) -> jax.Array:
  """The integer sum ``Σ (q_l - z_l)(q_r - z_r)`` of ``int_dot_general``, before any scale.

  Exact: int32 when ``accumulator_bound`` fits in int32, otherwise float32 (the
  sum of exact int32 pieces, see ``int_dot_general``). Integer formats only,
  and scales must not vary along the contraction (no groups). ``rhs_sums`` is
  deprecated: prepare the weight with ``with_weight_sums``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(symmetric=False)
    >>> x = jnp.array([[0.0, 1.0, 2.0]])
    >>> xq = jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)
    >>> acc = jqat.int_dot_accumulator(xq, xq, (((1,), (1,)), ((), ())))
    >>> acc.dtype, acc.tolist()
    (dtype('int32'), [[81154]])
  """
  dims = _check_dims(lhs, rhs, dimension_numbers, "int_dot_accumulator")
  if lhs.config.bits.is_float or rhs.config.bits.is_float:
    raise ValueError("int_dot_accumulator needs integer formats on both sides")
  sums = _prepared_sums(rhs, dims[0][1], rhs_sums, "int_dot_accumulator", "rhs_sums")
  acc, _, plan = int_kernels.accumulate(
    int_kernels.operand(lhs), int_kernels.operand(rhs), dims, rhs_sums=sums, max_accumulator=max_accumulator
  )
  if plan.grouped:
    raise ValueError("scales vary along the contraction (per-group): there is no single accumulator")
  return acc


def int_dot_general(
  lhs: QTensor,
  rhs: QTensor,
  dimension_numbers,
  *,
  bias: ArrayLike | None = None,
  out_dtype: DTypeLike = jnp.float32,
  rhs_sums: ArrayLike | None = None,
  max_accumulator: int = INT32_MAX,
) -> jax.Array:
  """``lax.dot_general`` of two ``QTensor``s with integer arithmetic.

  ``y = s_l s_r Σ (q_l - z_l)(q_r - z_r) + bias``, where the sum runs as
  ``lax.dot_general(q_l, q_r, preferred_element_type=int32)`` on int8 values
  (packed int4 / int2 values are unpacked to int8 first) with the zero-point
  terms ``- z_r Σ q_l - z_l Σ q_r + K z_l z_r`` added in int32, and the scales
  applied once, in float32, to the integer sum. Scales may vary along the free
  and batch axes (per-tensor, per-token on the left, per-channel on the right).
  Scales that vary along a contracting axis (per-group) split it into groups of
  the greatest common size: one batched integer dot over the groups, a float
  rescale per group and a sum over the groups. fp8 operands are multiplied with
  ``preferred_element_type=float32`` (an asymmetric integer partner is centered
  in float32 first, exactly).

  Column sums: ``Σ q_r`` over the contraction is computed here unless the
  right operand carries its own (``with_weight_sums``), prepared once for a
  constant weight.

  Overflow guard: the int32 sum is exact while ``K · max|q_l - z_l| ·
  max|q_r - z_r| <= max_accumulator`` (``accumulator_bound``; int8 both sides
  asymmetric allows K up to 33025). Beyond that the contraction is split, at
  trace time, into pieces that each satisfy the bound; every piece is
  accumulated in int32 and the pieces are added in int32 when the whole bound
  fits in int32, in float32 otherwise (a relative error of at most ``2^-24``
  per addition).

  NaN: a ``QTensor`` quantized from data holding NaN or ±Inf has a NaN scale
  for the blocks concerned (see ``quantize``), so the outputs they touch are NaN.

  Accuracy: the integer sum is exact, so the result differs from the float
  dot of the dequantized operands only by float32 rounding: the conversion of
  the sum (exact below ``2^24``), the scale product and the final product
  (three roundings), plus one rounding per group in the sum over groups. The
  fake-quant float forward ``dot(fake_quant(x), fake_quant(w))`` itself rounds
  after every product and addition, so the two agree within
  ``(K + 3) · 2^-24 · Σ_k |x̂_k ŵ_k|``.

  Args:
    lhs: left operand.
    rhs: right operand.
    dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``
      as for ``lax.dot_general``.
    bias: added after the rescale; broadcasts against the output.
    out_dtype: dtype of the result.
    rhs_sums: deprecated; use ``with_weight_sums(rhs, rhs_contracting)``.
      Checked for shape; its values are trusted.
    max_accumulator: the largest magnitude one integer sum may reach; lower it
      to exercise the split.

  Returns:
    The product, shaped as ``lax.dot_general``'s: batch, lhs free, rhs free axes.

  Raises:
    TypeError: when an operand is not a ``QTensor``.
    ValueError: when the shapes, bias or sums do not fit (both shapes named),
      or even one element of the split axis overflows the bound.
    NotImplementedError: when scales vary along two different contracting axes.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> x = jnp.array([[1.0, -2.0, 0.5]])
    >>> w = jnp.array([[1.0], [0.5], [2.0]])
    >>> cfg = jqat.QatConfig()
    >>> xq = jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)
    >>> wq = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
    >>> y = jqat.int_dot_general(xq, wq, (((1,), (0,)), ((), ())))
    >>> [round(v, 3) for v in y[0].tolist()]
    [1.016]

  References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018.
  """
  return _int_dot_general(
    lhs, rhs, dimension_numbers, bias, out_dtype, rhs_sums, max_accumulator, "int_dot_general", "rhs_sums"
  )


def _int_dot_general(lhs, rhs, dimension_numbers, bias, out_dtype, rhs_sums, max_accumulator, where, kwarg):
  dims = _check_dims(lhs, rhs, dimension_numbers, where)
  bias = _check_bias(bias, _out_shape(lhs, rhs, dims), where)
  sums = _prepared_sums(rhs, dims[0][1], rhs_sums, where, kwarg)
  acc, scale, plan = int_kernels.accumulate(
    int_kernels.operand(lhs), int_kernels.operand(rhs), dims, rhs_sums=sums, max_accumulator=max_accumulator
  )
  y = int_kernels.rescale(acc, scale, plan)
  if bias is not None:
    y = y + bias
  return y.astype(out_dtype)


def int_matmul(
  xq: QTensor,
  wq: QTensor,
  *,
  bias: ArrayLike | None = None,
  w_sums: ArrayLike | None = None,
  out_dtype: DTypeLike = jnp.float32,
  max_accumulator: int = INT32_MAX,
) -> jax.Array:
  """``x @ w`` for ``x`` of shape ``(..., K)`` and ``w`` of shape ``(K, N)``, integer arithmetic.

  ``int_dot_general`` contracting the last axis of ``xq`` with axis 0 of
  ``wq``; see there for the arithmetic, the overflow guard and the accuracy.

  Args:
    xq: activations, per-tensor or per-token (scales on the leading axes),
      symmetric or asymmetric.
    wq: weight ``(K, N)``: per-tensor, per-channel (axis -1) or per-group
      (``group_axis=0``); ``with_weight_sums(wq)`` prepares its column sums once.
    bias: ``(N,)``, added after the rescale.
    w_sums: deprecated; use ``with_weight_sums(wq)``.
    out_dtype: dtype of the result.
    max_accumulator: see ``int_dot_general``.

  Returns:
    ``(..., N)`` array of ``out_dtype``.

  Raises:
    TypeError: when ``xq`` or ``wq`` is not a ``QTensor``.
    ValueError: for a weight that is not ``(K, N)``, a ``K`` that differs,
      or a bias or sums of the wrong width.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> xcfg = jqat.QatConfig(symmetric=False)
    >>> wcfg = jqat.QatConfig(per_channel=True)
    >>> x = jnp.array([[0.0, 1.0, 2.0]])
    >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> xq = jqat.quantize(x, jqat.qparams_from_array(x, xcfg), xcfg)
    >>> wq = jqat.with_weight_sums(jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg))
    >>> jqat.int_matmul(xq, wq).round(2).tolist()
    [[2.0, 3.0]]
  """
  check_qtensor(xq, "int_matmul", "xq")
  check_qtensor(wq, "int_matmul", "wq")
  if wq.ndim != 2:
    raise ValueError(f"int_matmul needs a (K, N) weight, got shape {wq.shape}")
  if xq.ndim < 1:
    raise ValueError(f"int_matmul needs activations of shape (..., K), got shape {xq.shape}")
  dims = (((xq.ndim - 1,), (0,)), ((), ()))
  return _int_dot_general(xq, wq, dims, bias, out_dtype, w_sums, max_accumulator, "int_matmul", "w_sums")


def int_conv_general_dilated(
  lhs: QTensor,
  rhs: QTensor,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  *,
  bias: ArrayLike | None = None,
  out_dtype: DTypeLike = jnp.float32,
  max_accumulator: int = INT32_MAX,
) -> jax.Array:
  """``lax.conv_general_dilated`` of two ``QTensor``s with integer arithmetic.

  ``y = s_l s_r Σ (q_l - z_l)(q_r - z_r) + bias``: both operands are centred
  on their zero points (``|q - z| <= 255`` fits int16), so the convolution's
  zero padding stays exact, and ``lax.conv_general_dilated(...,
  preferred_element_type=int32)`` sums them; the scales are applied once to
  the integer result.

  Overflow guard: one output sums ``K = in_features · window`` products. The
  int32 sum is exact while ``K · max|q_l - z_l| · max|q_r - z_r| <=
  max_accumulator`` (the bound of ``accumulator_bound``); beyond that the
  input features are split, at trace time, into pieces that each satisfy it,
  and the exact int32 pieces are added in int32 when the whole bound fits, in
  float32 otherwise (for example an asymmetric int8 3×3×4096 conv, whose bound
  is 2.4e9, runs as two pieces of 2048 features).

  Args:
    lhs: the input, integer format, one scale (per-tensor).
    rhs: the kernel, integer format, per-tensor or per-output-feature scales.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count: as for ``lax.conv_general_dilated``.
    bias: added after the rescale; broadcasts against the output.
    out_dtype: dtype of the result.
    max_accumulator: the largest magnitude one integer sum may reach.

  Returns:
    The convolution, shaped as ``lax.conv_general_dilated``'s.

  Raises:
    TypeError: when an operand is not a ``QTensor``.
    ValueError: for fp8 or per-group operands, scales of another layout, or
      feature counts that do not fit.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(symmetric=False)
    >>> x = jnp.arange(8.0).reshape(1, 8, 1)  # NWC
    >>> w = jnp.ones((3, 1, 1))  # WIO
    >>> xq = jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)
    >>> wq = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
    >>> y = jqat.int_conv_general_dilated(xq, wq, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    >>> y.reshape(-1).round(1).tolist()
    [3.0, 6.0, 9.0, 12.0, 15.0, 18.0]
  """
  check_qtensor(lhs, "int_conv_general_dilated", "lhs")
  check_qtensor(rhs, "int_conv_general_dilated", "rhs")
  if lhs.ndim != rhs.ndim or lhs.ndim < 3:
    raise ValueError(
      f"int_conv_general_dilated: input of shape {lhs.shape} and kernel of shape {rhs.shape} need the same "
      "number of axes, at least 3 (batch, features and one spatial axis)"
    )
  conv = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
  )
  y = int_kernels.convolve(lhs, rhs, conv, dimension_numbers, max_accumulator=max_accumulator)
  if bias is not None:
    y = y + _check_bias(bias, y.shape, "int_conv_general_dilated")
  return y.astype(out_dtype)


# Elements of the converted weight block that ``k_block="auto"`` aims at: 2^21 float32 values are 8 MiB, about
# what the last-level cache of a small CPU keeps while the dot reads the block back.
AUTO_BLOCK_ELEMENTS = 2**21
MIN_AUTO_BLOCK = 128


def auto_k_block(k: int, n: int) -> int | None:
  """The ``k_block`` that ``weight_only_matmul(..., k_block="auto")`` uses for a ``(k, n)`` weight.

  None (one dot) when the whole converted weight holds at most
  ``AUTO_BLOCK_ELEMENTS`` values; otherwise the largest power of two
  ``>= 128`` dividing ``k`` whose block ``k_block x n`` holds at most that
  many (None when no such divisor exists).

  Examples:
    >>> auto_k_block(4096, 4096), auto_k_block(1024, 1024), auto_k_block(4096, 11008)
    (512, None, 128)
  """
  if k * n <= AUTO_BLOCK_ELEMENTS:
    return None
  kb = MIN_AUTO_BLOCK
  while kb * 2 * n <= AUTO_BLOCK_ELEMENTS and k % (kb * 2) == 0:
    kb *= 2
  return kb if k % kb == 0 and kb < k else None


def _nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The low and high signed nibbles of packed int4 bytes, as int8 (rows ``2i`` and ``2i + 1``, see ``pack_int4``)."""
  b = lax.bitcast_convert_type(packed, jnp.int8)
  return lax.shift_right_arithmetic(lax.shift_left(b, jnp.int8(4)), jnp.int8(4)), lax.shift_right_arithmetic(
    b, jnp.int8(4)
  )


def _planes(wq: QTensor, x: jax.Array):
  """``(activations, stored rows, convert)`` with ``x @ q == Σ_j xs[j] @ convert(rows)[j]``.

  int8 weights: one plane, the values themselves. Packed int4 / int2 weights:
  two planes read straight from the bytes, the low nibbles (even rows of the
  weight) against the even columns of ``x`` and the high nibbles against the
  odd ones, so the weight is never unpacked as a whole.
  """
  if not wq.config.bits.is_packed:
    return (x,), wq.values, lambda rows, dt: (rows.astype(dt),)
  k = wq.shape[0]
  even, odd = x[..., 0::2], x[..., 1::2]
  if k % 2:  # the last byte's high nibble is padding (zero): give it a zero column
    odd = jnp.concatenate([odd, jnp.zeros(odd.shape[:-1] + (1,), odd.dtype)], axis=-1)

  def convert(rows, dt):
    lo, hi = _nibbles(rows)
    return lo.astype(dt), hi.astype(dt)

  return (even, odd), wq.values, convert


def weight_only_matmul(
  x: ArrayLike,
  wq: QTensor,
  *,
  bias: ArrayLike | None = None,
  k_block: int | str | None = "auto",
  compute_dtype: DTypeLike | None = None,
) -> jax.Array:
  """``x @ dequantize(wq)`` for float activations ``x (..., K)`` and an integer weight ``(K, N)``.

  The weight's integer values are converted to the compute dtype next to the
  dot (exact: int8 fits in bfloat16 and float32) and the per-channel scale is
  applied once to the ``(..., N)`` result, ``y = (x @ (q_w - z_w)) s_w``, with
  ``x @ z_w`` computed as ``(Σ_k x) z_w`` for an asymmetric weight. With
  ``k_block`` the contraction runs as a loop over blocks of ``k_block`` rows
  of the weight, so each block is converted while it is in cache instead of
  materializing the whole float weight (on CPU the conversion, not the dot,
  is what costs: XLA:CPU does not fuse the conversion into its dot). Packed
  int4 / int2 weights are converted from their bytes block by block, never
  unpacked as a whole. A weight whose scale varies along K (per-group) is
  dequantized and multiplied as a whole.

  Args:
    x: float activations ``(..., K)``.
    wq: quantized weight ``(K, N)``, integer format.
    bias: ``(N,)``, added at the end.
    k_block: rows of the weight per loop step; ``"auto"`` (default,
      ``auto_k_block``: one dot for a weight of up to 2^21 values, else blocks
      of about 8 MiB of float32); None for one dot.
    compute_dtype: the dtype of the dot's operands (float32 accumulation);
      default ``x``'s dtype. ``jnp.bfloat16`` rounds float32 activations to
      bfloat16 (relative error ``2^-9`` per element) and halves the converted
      weight's bytes.

  Returns:
    ``(..., N)`` array of ``x``'s dtype (float32 accumulation).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(per_channel=True)
    >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> wq = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
    >>> jqat.weight_only_matmul(jnp.array([[1.0, 1.0]]), wq).tolist()
    [[1.0, 2.0]]
  """
  check_qtensor(wq, "weight_only_matmul", "wq")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"weight_only_matmul needs float activations, got dtype {x.dtype}")
  if wq.ndim != 2 or wq.config.bits.is_float:
    raise ValueError(f"weight_only_matmul needs an integer (K, N) weight, got {wq.config.bits.value} {wq.shape}")
  k, n = wq.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(
      f"weight_only_matmul: activations of shape {x.shape} do not fit a ({k}, {n}) weight: need (..., {k})"
    )
  if k_block == "auto":
    k_block = auto_k_block(k, n)
  elif k_block is not None and (isinstance(k_block, bool) or not isinstance(k_block, int) or k_block < 1):
    raise ValueError(f"weight_only_matmul: k_block={k_block!r} is invalid; allowed: a positive int, 'auto' or None")
  if compute_dtype is not None and jnp.dtype(compute_dtype) not in (jnp.bfloat16, jnp.float32, jnp.float64):
    raise ValueError(
      f"weight_only_matmul: compute_dtype={jnp.dtype(compute_dtype).name} is invalid; allowed: bfloat16, float32, "
      "float64 or None"
    )
  bias = _check_bias(bias, x.shape[:-1] + (n,), "weight_only_matmul")
  scale = jnp.broadcast_to(jnp.asarray(wq.scale, jnp.float32), jnp.broadcast_shapes(jnp.shape(wq.scale), (1, 1)))
  if compute_dtype is not None:
    cdt = jnp.dtype(compute_dtype)
  else:
    cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32, jnp.float64) else jnp.float32
  if scale.shape[0] != 1:
    y = jnp.matmul(x.astype(cdt), dequantize(wq).astype(cdt), preferred_element_type=jnp.float32)
  else:
    xs, rows, convert = _planes(wq, x.astype(cdt))
    per_row = len(xs)  # weight rows per stored row
    r = rows.shape[0]
    if k_block is not None and k > k_block and k % k_block == 0 and k_block % per_row == 0:
      rb = k_block // per_row
      nb = r // rb
      xb = tuple(jnp.moveaxis(xi.reshape(xi.shape[:-1] + (nb, rb)), -2, 0) for xi in xs)
      qb = rows.reshape(nb, rb, n)

      def step(acc, blk):
        xi, qi = blk
        for a, b in zip(xi, convert(qi, cdt)):
          acc = acc + jnp.matmul(a, b, preferred_element_type=jnp.float32)
        return acc, None

      y, _ = lax.scan(step, jnp.zeros(x.shape[:-1] + (n,), jnp.float32), (xb, qb))
    else:
      y = None
      for a, b in zip(xs, convert(rows, cdt)):
        part = jnp.matmul(a, b, preferred_element_type=jnp.float32)
        y = part if y is None else y + part
    if not wq.config.symmetric:
      zero = jnp.reshape(numerics.effective_zero_point(wq.zero_point, wq.config, jnp.float32), (-1,))
      # The same (compute-dtype) activations as the dot's, so that x @ (q - z) holds exactly in its terms.
      y = y - jnp.sum(x.astype(cdt).astype(jnp.float32), axis=-1, keepdims=True) * zero
    y = y * scale.reshape(-1)
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)

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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jqat._src.config import QatConfig
from jqat._src.fake_quant import _effective_zero_point
from jqat._src.qtensor import QTensor, dequantize

# The largest value an int32 accumulator holds.
INT32_MAX = 2**31 - 1

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


class _Operand(NamedTuple):
  """One side of a dot: unpacked values (int8 or float8) and their parameters."""

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  config: QatConfig


class _Plan(NamedTuple):
  """Static plan of a contraction: where it is split and how."""

  split: int | None  # index of the contracting pair split into pieces, or None
  num_pieces: int
  piece: int  # elements of the split axis per piece
  grouped: bool  # scales vary along the split axis
  int32_sum: bool  # piece accumulators may be summed in int32


def accumulator_bound(lhs_config: QatConfig, rhs_config: QatConfig, k: int) -> int:
  """Largest ``|Σ (q_l - z_l)(q_r - z_r)|`` over ``k`` products of the two formats.

  ``max |q - z|`` is ``max(-qmin, qmax)`` for a symmetric format (``z = 0``) and
  ``qmax - qmin`` for an asymmetric one (``z`` may sit at either end). The raw
  terms ``Σ q_l q_r``, ``z Σ q`` and ``k z_l z_r`` are each bounded by the same
  value, so int32 arithmetic is exact when the bound is at most ``2^31 - 1``.

  Examples:
    >>> import jqat
    >>> accumulator_bound(jqat.QatConfig(symmetric=False), jqat.QatConfig(), 1024)
    33423360
  """
  return k * _max_centered(lhs_config) * _max_centered(rhs_config)


def _max_centered(config: QatConfig) -> int:
  if config.bits.is_float:
    raise ValueError(f"{config.bits.value} is a float format; it has no integer accumulator")
  if config.symmetric:
    return max(-config.qmin, config.qmax)
  return config.qmax - config.qmin


def _normalize_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> DimensionNumbers:
  (lc, rc), (lb, rb) = dimension_numbers
  lc = tuple(int(a) % lhs_ndim for a in lc)
  rc = tuple(int(a) % rhs_ndim for a in rc)
  lb = tuple(int(a) % lhs_ndim for a in lb)
  rb = tuple(int(a) % rhs_ndim for a in rb)
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers={dimension_numbers!r} pair unequal numbers of lhs and rhs axes")
  return (lc, rc), (lb, rb)


def _free(ndim: int, contract, batch) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in contract and a not in batch)


def _params(op: _Operand, contract) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point with the operand's ndim; groups on non-contracting axes expanded."""
  ndim = op.values.ndim
  scale = jnp.asarray(op.scale, jnp.float32)
  zero = _effective_zero_point(op.zero_point, op.config, jnp.float32)
  shape = jnp.broadcast_shapes(scale.shape, zero.shape)
  if len(shape) > ndim:
    raise ValueError(f"scale of shape {scale.shape} has more axes than its operand {op.values.shape}")
  shape = (1,) * (ndim - len(shape)) + tuple(shape)
  scale = jnp.broadcast_to(scale, jnp.broadcast_shapes(scale.shape, zero.shape)).reshape(shape)
  zero = jnp.broadcast_to(zero, scale.shape)
  cfg = op.config
  if cfg.group_size is not None:
    g = cfg.group_axis % ndim
    if g not in contract and scale.shape[g] not in (1, op.values.shape[g]):
      # Groups along a free or batch axis are plain per-index scales once repeated.
      scale = jnp.repeat(scale, op.values.shape[g] // scale.shape[g], axis=g)
      zero = jnp.repeat(zero, op.values.shape[g] // zero.shape[g], axis=g)
  for a in range(ndim):
    if scale.shape[a] not in (1, op.values.shape[a]) and (a not in contract or op.values.shape[a] % scale.shape[a]):
      raise ValueError(
        f"scale of shape {tuple(op.scale.shape)} does not fit an operand of shape {tuple(op.values.shape)}"
      )
  return scale, zero


def _blocks(scale: jax.Array, values: jax.Array, contract) -> dict[int, int]:
  """{pair index: block length} for the contracting axes along which ``scale`` varies."""
  return {j: values.shape[a] // scale.shape[a] for j, a in enumerate(contract) if scale.shape[a] > 1}


def _plan(lhs: _Operand, rhs: _Operand, ls, rs, dims, max_accumulator: int, exact: bool) -> _Plan:
  (lc, rc), _ = dims
  sizes = [lhs.values.shape[a] for a in lc]
  for j, a in enumerate(rc):
    if rhs.values.shape[a] != sizes[j]:
      raise ValueError(
        f"contracting axes differ in length: lhs {tuple(lhs.values.shape)} axis {lc[j]}, "
        f"rhs {tuple(rhs.values.shape)} axis {a}"
      )
  k = math.prod(sizes)
  lblocks = _blocks(ls, lhs.values, lc)
  rblocks = _blocks(rs, rhs.values, rc)
  varying = set(lblocks) | set(rblocks)
  if len(varying) > 1:
    raise NotImplementedError(
      "scales vary along more than one contracting axis; only one axis may be split into groups"
    )
  if exact:
    bound = accumulator_bound(lhs.config, rhs.config, k)
    per_element = bound // k
  else:
    bound, per_element = 0, 0
  if varying:
    (j,) = varying
    group = math.gcd(lblocks.get(j, sizes[j]), rblocks.get(j, sizes[j]))
    piece = group
    if exact and bound > max_accumulator:
      limit = max_accumulator // ((k // sizes[j]) * per_element)
      if limit < 1:
        raise ValueError(_too_large(k // sizes[j], per_element, max_accumulator))
      # A piece must stay inside one group, so it is a divisor of the group.
      piece = max(d for d in range(1, min(group, limit) + 1) if group % d == 0)
    return _Plan(j, sizes[j] // piece, piece, True, False)
  if not exact or bound <= max_accumulator or not sizes:
    return _Plan(None, 1, k, False, True)
  j = int(np.argmax(sizes))
  limit = max_accumulator // ((k // sizes[j]) * per_element)
  if limit < 1:
    raise ValueError(_too_large(k // sizes[j], per_element, max_accumulator))
  num_pieces = -(-sizes[j] // limit)
  piece = -(-sizes[j] // num_pieces)
  return _Plan(j, num_pieces, piece, False, bound <= INT32_MAX)


def _too_large(k_rest: int, per_element: int, max_accumulator: int) -> str:
  return (
    f"the contracting axes other than the longest hold {k_rest} elements; with |q - z| up to "
    f"{per_element} per product their sum cannot stay below max_accumulator={max_accumulator}"
  )


def _split(x: jax.Array, axis: int, num_pieces: int, piece: int) -> jax.Array:
  """Splits ``axis`` into ``(num_pieces, piece)``, zero-padding its end."""
  pad = num_pieces * piece - x.shape[axis]
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths)
  return x.reshape(x.shape[:axis] + (num_pieces, piece) + x.shape[axis + 1 :])


def _split_params(p: jax.Array, axis: int, num_pieces: int) -> jax.Array:
  """Parameters of an operand split by ``_split``: one entry per piece, 1 for the inner axis."""
  if p.shape[axis] > 1:
    p = jnp.repeat(p, num_pieces // p.shape[axis], axis=axis)
  return jnp.expand_dims(p, axis + 1)


def _to_out(a: jax.Array, contract, batch, free, other_free: int, is_lhs: bool, lead: tuple[int, ...]) -> jax.Array:
  """Puts a per-operand array (size 1 on ``contract``) in the layout of the dot's output.

  ``lead`` are axes (the piece axis) that go first, before the batch axes.
  """
  perm = tuple(lead) + tuple(batch) + tuple(free) + tuple(contract)
  a = jnp.transpose(a, perm)
  a = a.reshape(a.shape[: len(perm) - len(contract)])
  n_lead = len(lead) + len(batch)
  if is_lhs:
    return a.reshape(a.shape + (1,) * other_free)
  return a.reshape(a.shape[:n_lead] + (1,) * other_free + a.shape[n_lead:])


def _sums(values: jax.Array, contract) -> jax.Array:
  return jnp.sum(values, axis=contract, dtype=jnp.int32, keepdims=True)


def _usable_sums(rhs_sums, rc, plan: _Plan, rhs_shape) -> jax.Array | None:
  """The prepared column sums in the piece layout, or None when they do not fit the plan."""
  if rhs_sums is None:
    return None
  s = jnp.asarray(rhs_sums, jnp.int32)
  if s.ndim != len(rhs_shape):
    raise ValueError(f"rhs_sums of shape {s.shape} do not fit a right operand of shape {tuple(rhs_shape)}")
  if plan.split is None:
    return jnp.sum(s, axis=rc, keepdims=True, dtype=jnp.int32)
  split_axis = rc[plan.split]
  rhs_len = rhs_shape[split_axis]
  varying = [a for a in rc if s.shape[a] > 1]
  if varying and varying != [split_axis]:
    return None
  blocks = s.shape[split_axis]
  block = rhs_len // blocks
  if plan.num_pieces * plan.piece != rhs_len or plan.piece % block:
    return None
  others = tuple(a for a in rc if a != split_axis)
  s = jnp.sum(s, axis=others, keepdims=True, dtype=jnp.int32)
  s = s.reshape(s.shape[:split_axis] + (plan.num_pieces, plan.piece // block) + s.shape[split_axis + 1 :])
  return jnp.sum(s, axis=split_axis + 1, keepdims=True, dtype=jnp.int32)


def _dot(
  lhs: _Operand,
  rhs: _Operand,
  dims: DimensionNumbers,
  *,
  rhs_sums=None,
  max_accumulator: int = INT32_MAX,
) -> tuple[jax.Array, jax.Array | None, _Plan]:
  """The accumulators and the scale to apply to them, in the output layout.

  Returns ``(acc, scale, plan)``: ``acc`` is the int32 (or float32) zero-point
  corrected sum, with a leading piece axis when the plan keeps pieces apart
  (grouped scales); ``scale`` broadcasts against ``acc``.
  """
  (lc, rc), (lb, rb) = dims
  lf = _free(lhs.values.ndim, lc, lb)
  rf = _free(rhs.values.ndim, rc, rb)
  ls, lz = _params(lhs, lc)
  rs, rz = _params(rhs, rc)
  is_float = lhs.config.bits.is_float or rhs.config.bits.is_float
  plan = _plan(lhs, rhs, ls, rs, dims, max_accumulator, exact=not is_float)
  lv, rv = lhs.values, rhs.values

  if is_float:
    # fp8 values and small integers are exact in float32; centering an
    # asymmetric integer side removes the zero-point terms altogether.
    lv = _centered(lv, lz, lhs.config)
    rv = _centered(rv, rz, rhs.config)
  if plan.split is not None:
    la, ra = lc[plan.split], rc[plan.split]
    lv = _split(lv, la, plan.num_pieces, plan.piece)
    rv = _split(rv, ra, plan.num_pieces, plan.piece)
    ls, lz = _split_params(ls, la, plan.num_pieces), _split_params(lz, la, plan.num_pieces)
    rs, rz = _split_params(rs, ra, plan.num_pieces), _split_params(rz, ra, plan.num_pieces)
    lmap = [a + (a > la) for a in range(lhs.values.ndim)]
    rmap = [a + (a > ra) for a in range(rhs.values.ndim)]
    lc2 = tuple(la + 1 if a == la else lmap[a] for a in lc)
    rc2 = tuple(ra + 1 if a == ra else rmap[a] for a in rc)
    lb2 = (la,) + tuple(lmap[a] for a in lb)
    rb2 = (ra,) + tuple(rmap[a] for a in rb)
    lf2 = tuple(lmap[a] for a in lf)
    rf2 = tuple(rmap[a] for a in rf)
    llead, rlead = (la,), (ra,)
  else:
    lc2, rc2, lb2, rb2, lf2, rf2 = lc, rc, lb, rb, lf, rf
    llead, rlead = (), ()

  def lout(a):
    return _to_out(a, lc2, lb2[len(llead) :], lf2, len(rf2), True, llead)

  def rout(a):
    return _to_out(a, rc2, rb2[len(rlead) :], rf2, len(lf2), False, rlead)

  dn = ((lc2, rc2), (lb2, rb2))
  scale = lout(ls) * rout(rs)
  if is_float:
    if lv.dtype != rv.dtype:
      lv, rv = lv.astype(jnp.float32), rv.astype(jnp.float32)
    acc = lax.dot_general(lv, rv, dn, preferred_element_type=jnp.float32)
  else:
    acc = lax.dot_general(lv, rv, dn, preferred_element_type=jnp.int32)
    lsym, rsym = lhs.config.symmetric, rhs.config.symmetric
    if not rsym:
      acc = acc - rout(rz.astype(jnp.int32)) * lout(_sums(lv, lc2))
    if not lsym:
      sums = _usable_sums(rhs_sums, rc, plan, rhs.values.shape)
      if sums is None:
        sums = _sums(rv, rc2)
      acc = acc - lout(lz.astype(jnp.int32)) * rout(sums)
    if not lsym and not rsym:
      acc = acc + _piece_counts(lhs.values.shape, lc, plan, acc.ndim) * (
        lout(lz.astype(jnp.int32)) * rout(rz.astype(jnp.int32))
      )
  if plan.split is not None and not plan.grouped:
    # Pieces exist only to keep each int32 sum in range; add them up exactly
    # in int32 when the whole sum fits, else in float32.
    acc = jnp.sum(acc, axis=0, dtype=jnp.int32 if plan.int32_sum else jnp.float32)
    scale = scale[0]
  return acc, scale, plan


def _centered(v: jax.Array, z: jax.Array, config: QatConfig) -> jax.Array:
  if config.bits.is_float or config.symmetric:
    return v
  rep = [v.shape[a] // z.shape[a] if z.shape[a] > 1 else 1 for a in range(v.ndim)]
  for a, r in enumerate(rep):
    if r > 1:
      z = jnp.repeat(z, r, axis=a)
  return v.astype(jnp.float32) - z


def _piece_counts(shape, lc, plan: _Plan, ndim: int) -> jax.Array | int:
  """Number of real (unpadded) products in each piece, in the output layout."""
  k = math.prod(shape[a] for a in lc)
  if plan.split is None:
    return k
  length = shape[lc[plan.split]]
  rest = k // length
  counts = np.array([rest * min(plan.piece, length - i * plan.piece) for i in range(plan.num_pieces)], np.int32)
  return jnp.asarray(counts.reshape((-1,) + (1,) * (ndim - 1)))


def _operand(q: QTensor) -> _Operand:
  return _Operand(q.int_values(), q.scale, q.zero_point, q.config)


def weight_sums(wq: QTensor, contracting_dims=(0,)) -> jax.Array:
  """Sums of a weight's integer values over its contracting axes, to prepare once.

  The zero-point correction of an asymmetric left operand needs ``Σ_k q_w``.
  For a constant weight it is computed once here and passed to
  ``int_dot_general(..., rhs_sums=...)`` or ``int_matmul(..., w_sums=...)``,
  so serving does not read the weight a second time. The result keeps every
  axis (size 1 on the contracting ones), except that a per-group weight keeps
  one sum per group on its group axis.

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
  if wq.config.bits.is_float:
    raise ValueError(f"{wq.config.bits.value} weights need no sums: fp8 operands are symmetric")
  v = wq.int_values()
  contract = tuple(a % v.ndim for a in contracting_dims)
  cfg = wq.config
  if cfg.group_size is not None and cfg.group_axis % v.ndim in contract:
    g = cfg.group_axis % v.ndim
    vg = v.reshape(v.shape[:g] + (v.shape[g] // cfg.group_size, cfg.group_size) + v.shape[g + 1 :])
    axes = tuple(a + (a > g) for a in contract if a != g) + (g + 1,)
    return jnp.sum(vg, axis=axes, dtype=jnp.int32, keepdims=True).squeeze(g + 1)
  return _sums(v, contract)


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
  and scales must not vary along the contraction (no groups).

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> cfg = jqat.QatConfig(symmetric=False)
    >>> x = jnp.array([[0.0, 1.0, 2.0]])
    >>> xq = jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)
    >>> acc = jqat.int_dot_accumulator(xq, xq, (((1,), (1,)), ((), ())))
    >>> acc.dtype, acc.tolist()
    (dtype('int32'), [[81154]])
  """
  dims = _normalize_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  if lhs.config.bits.is_float or rhs.config.bits.is_float:
    raise ValueError("int_dot_accumulator needs integer formats on both sides")
  acc, _, plan = _dot(_operand(lhs), _operand(rhs), dims, rhs_sums=rhs_sums, max_accumulator=max_accumulator)
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

  Overflow guard: the int32 sum is exact while ``K · max|q_l - z_l| ·
  max|q_r - z_r| <= max_accumulator`` (``accumulator_bound``; int8 both sides
  asymmetric allows K up to 33025). Beyond that the contraction is split, at
  trace time, into pieces that each satisfy the bound; every piece is
  accumulated in int32 and the pieces are added in int32 when the whole bound
  fits in int32, in float32 otherwise (a relative error of at most ``2^-24``
  per addition).

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
    rhs_sums: ``weight_sums(rhs, rhs_contracting)``, prepared once for a
      constant right operand; used when the left operand is asymmetric.
    max_accumulator: the largest magnitude one integer sum may reach; lower it
      to exercise the split.

  Returns:
    The product, shaped as ``lax.dot_general``'s: batch, lhs free, rhs free axes.

  Raises:
    ValueError: when even one element of the split axis overflows the bound,
      or the shapes do not fit.
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
  dims = _normalize_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  acc, scale, plan = _dot(_operand(lhs), _operand(rhs), dims, rhs_sums=rhs_sums, max_accumulator=max_accumulator)
  y = _rescale(acc, scale, plan.grouped)
  if bias is not None:
    y = y + jnp.asarray(bias, jnp.float32)
  return y.astype(out_dtype)


def _rescale(acc: jax.Array, scale: jax.Array, grouped: bool) -> jax.Array:
  y = acc.astype(jnp.float32) * scale
  return jnp.sum(y, axis=0) if grouped else y


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
      (``group_axis=0``).
    bias: ``(N,)``, added after the rescale.
    w_sums: ``weight_sums(wq)``, prepared once.
    out_dtype: dtype of the result.
    max_accumulator: see ``int_dot_general``.

  Returns:
    ``(..., N)`` array of ``out_dtype``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> xcfg = jqat.QatConfig(symmetric=False)
    >>> wcfg = jqat.QatConfig(per_channel=True)
    >>> x = jnp.array([[0.0, 1.0, 2.0]])
    >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> xq = jqat.quantize(x, jqat.qparams_from_array(x, xcfg), xcfg)
    >>> wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
    >>> jqat.int_matmul(xq, wq, w_sums=jqat.weight_sums(wq)).round(2).tolist()
    [[2.0, 3.0]]
  """
  if wq.ndim != 2:
    raise ValueError(f"int_matmul needs a (K, N) weight, got shape {wq.shape}")
  dims = (((xq.ndim - 1,), (0,)), ((), ()))
  return int_dot_general(xq, wq, dims, bias=bias, out_dtype=out_dtype, rhs_sums=w_sums, max_accumulator=max_accumulator)


def weight_only_matmul(
  x: ArrayLike,
  wq: QTensor,
  *,
  bias: ArrayLike | None = None,
  k_block: int | None = 1024,
) -> jax.Array:
  """``x @ dequantize(wq)`` for float activations ``x (..., K)`` and an integer weight ``(K, N)``.

  The weight's integer values are converted to the activation dtype next to
  the dot (exact: int8 fits in bfloat16 and float32) and the per-channel scale
  is applied once to the ``(..., N)`` result, ``y = (x @ (q_w - z_w)) s_w``,
  with ``x @ z_w`` computed as ``(Σ_k x) z_w`` for an asymmetric weight. With
  ``k_block`` the contraction runs as a loop over blocks of ``k_block`` rows
  of the weight, so each block is converted while it is in cache instead of
  materializing the whole float weight (on CPU the conversion, not the dot,
  is what costs). A weight whose scale varies along K (per-group) is
  dequantized and multiplied as a whole.

  Args:
    x: float activations ``(..., K)``.
    wq: quantized weight ``(K, N)``, integer format.
    bias: ``(N,)``, added at the end.
    k_block: rows of the weight per loop step (default 1024, the fastest of 64, 256, 1024 and one dot in
      ``benchmarks/bench_serving.py`` on a 2-core x86-64 CPU); None for one dot.

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
  x = jnp.asarray(x)
  if wq.ndim != 2 or wq.config.bits.is_float:
    raise ValueError(f"weight_only_matmul needs an integer (K, N) weight, got {wq.config.bits.value} {wq.shape}")
  k, n = wq.shape
  scale = jnp.broadcast_to(jnp.asarray(wq.scale, jnp.float32), jnp.broadcast_shapes(jnp.shape(wq.scale), (1, 1)))
  cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32, jnp.float64) else jnp.float32
  if scale.shape[0] != 1:
    y = jnp.matmul(x, dequantize(wq).astype(cdt), preferred_element_type=jnp.float32)
  else:
    q = wq.int_values()
    xc = x.astype(cdt)
    if k_block is not None and k > k_block and k % k_block == 0:
      nb = k // k_block
      xb = jnp.moveaxis(xc.reshape(xc.shape[:-1] + (nb, k_block)), -2, 0)
      qb = q.reshape(nb, k_block, n)

      def step(acc, blk):
        xi, qi = blk
        return acc + jnp.matmul(xi, qi.astype(cdt), preferred_element_type=jnp.float32), None

      y, _ = lax.scan(step, jnp.zeros(x.shape[:-1] + (n,), jnp.float32), (xb, qb))
    else:
      y = jnp.matmul(xc, q.astype(cdt), preferred_element_type=jnp.float32)
    if not wq.config.symmetric:
      zero = jnp.reshape(_effective_zero_point(wq.zero_point, wq.config, jnp.float32), (-1,))
      y = y - jnp.sum(x.astype(jnp.float32), axis=-1, keepdims=True) * zero
    y = y * scale.reshape(-1)
  if bias is not None:
    y = y + jnp.asarray(bias, jnp.float32)
  return y.astype(x.dtype)

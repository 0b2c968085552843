"""The integer kernels: dots, grouped dots and convolutions with int32 accumulation.

A small internal API that the public ``int_ops`` functions, ``qat_dot`` and the
Flax layers share:

* ``Operand``: one side (unpacked int8 / float8 values, scale, zero point, config);
  ``operand(q)`` makes one from a ``QTensor``;
* ``plan_dot`` / ``plan_conv``: the static overflow planner, where a
  contraction is split so that every int32 sum stays exact
  (``accumulator_bound``);
* ``accumulate`` / ``accumulate_conv``: the zero-point corrected integer sums;
* ``rescale``: the one float rescale;
* ``nonfinite_out``: where a float operand's NaN / Inf must show in the output.

With ``x = (q_x - z_x) * s_x`` and ``w = (q_w - z_w) * s_w``, a contraction over
``K`` elements is

``Σ x w = s_x s_w Σ (q_x - z_x)(q_w - z_w)
        = s_x s_w (Σ q_x q_w - z_w Σ q_x - z_x Σ q_w + K z_x z_w)``

(Jacob et al. 2018).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqat._src import numerics
from jqat._src.config import QatConfig
from jqat._src.qtensor import QTensor

# The largest value an int32 accumulator holds.
INT32_MAX = 2**31 - 1

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


class Operand(NamedTuple):
  """One side of a dot: unpacked values (int8 or float8) and their parameters."""

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  config: QatConfig


class Plan(NamedTuple):
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


def normalize_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> DimensionNumbers:
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


def _params(op: Operand, contract) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point with the operand's ndim; groups on non-contracting axes expanded."""
  ndim = op.values.ndim
  scale = jnp.asarray(op.scale, jnp.float32)
  zero = numerics.effective_zero_point(op.zero_point, op.config, jnp.float32)
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


def plan_dot(lhs: Operand, rhs: Operand, ls, rs, dims, max_accumulator: int, exact: bool) -> Plan:
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
    return Plan(j, sizes[j] // piece, piece, True, False)
  if not exact or bound <= max_accumulator or not sizes:
    return Plan(None, 1, k, False, True)
  j = int(np.argmax(sizes))
  limit = max_accumulator // ((k // sizes[j]) * per_element)
  if limit < 1:
    raise ValueError(_too_large(k // sizes[j], per_element, max_accumulator))
  num_pieces = -(-sizes[j] // limit)
  piece = -(-sizes[j] // num_pieces)
  return Plan(j, num_pieces, piece, False, bound <= INT32_MAX)


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


def column_sums(values: jax.Array, contract) -> jax.Array:
  return jnp.sum(values, axis=contract, dtype=jnp.int32, keepdims=True)


def _usable_sums(rhs_sums, rc, plan: Plan, rhs_shape) -> jax.Array | None:
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


def accumulate(
  lhs: Operand,
  rhs: Operand,
  dims: DimensionNumbers,
  *,
  rhs_sums=None,
  max_accumulator: int = INT32_MAX,
) -> tuple[jax.Array, jax.Array | None, Plan]:
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
  plan = plan_dot(lhs, rhs, ls, rs, dims, max_accumulator, exact=not is_float)
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
      acc = acc - rout(rz.astype(jnp.int32)) * lout(column_sums(lv, lc2))
    if not lsym:
      sums = _usable_sums(rhs_sums, rc, plan, rhs.values.shape)
      if sums is None:
        sums = column_sums(rv, rc2)
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


def _piece_counts(shape, lc, plan: Plan, ndim: int) -> jax.Array | int:
  """Number of real (unpadded) products in each piece, in the output layout."""
  k = math.prod(shape[a] for a in lc)
  if plan.split is None:
    return k
  length = shape[lc[plan.split]]
  rest = k // length
  counts = np.array([rest * min(plan.piece, length - i * plan.piece) for i in range(plan.num_pieces)], np.int32)
  return jnp.asarray(counts.reshape((-1,) + (1,) * (ndim - 1)))


def operand(q: QTensor) -> Operand:
  return Operand(q.int_values(), q.scale, q.zero_point, q.config)




def rescale(acc: jax.Array, scale: jax.Array, plan: Plan) -> jax.Array:
  """``acc * scale`` in float32, summed over the groups when the plan keeps them apart."""
  y = acc.astype(jnp.float32) * scale
  return jnp.sum(y, axis=0) if plan.grouped else y


def nonfinite_out(lhs: jax.Array, rhs: jax.Array, dims: DimensionNumbers, *, check_lhs: bool = True,
                  check_rhs: bool = True) -> jax.Array | None:
  """0, or NaN where the dot of float ``lhs`` and ``rhs`` meets a NaN or ±Inf: add it to the output (or None).

  An output element is touched when its row of ``lhs`` or its column of
  ``rhs`` (over the contracting axes) holds a non-finite value; that is where
  the float dot is non-finite (up to an Inf meeting a 0). ``Σ (x - x)`` over the
  contraction is NaN exactly there (``Inf - Inf`` and ``NaN - NaN`` are NaN):
  one float sum per operand. (Not ``Σ x · 0``: XLA shares the broadcast zeros of
  that product with other zeros of the program and writes them out as a whole
  tensor first.)

  The mark is ``where(isnan(Σ (x - x)), NaN, 0)``, the same values as the sum
  itself, so that its broadcast add fuses into the one elementwise pass of the
  rescale: XLA:CPU runs the plain sum as a library (YNNPACK) reduction, which
  takes its float consumers (the add and the scale's multiply) in with it, and
  the int32 -> float32 conversion before them is then written out as a whole
  ``(M, N)`` tensor and read back. The compare and select end that reduction's
  fusion at the ``(M, 1)`` mark.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [jnp.inf, 0.0], [3.0, jnp.nan]])
    >>> w = jnp.ones((2, 3))
    >>> nonfinite_out(x, w, (((1,), (0,)), ((), ())), check_rhs=False)[:, 0].tolist()
    [0.0, nan, nan]
  """
  (lc, rc), (lb, rb) = dims
  lf, rf = _free(lhs.ndim, lc, lb), _free(rhs.ndim, rc, rb)

  def mark(a, axes):
    a = a.astype(jnp.float32)
    s = jnp.sum(a - a, axis=axes, keepdims=True)
    return jnp.where(jnp.isnan(s), jnp.float32(jnp.nan), jnp.float32(0))

  out = None
  if check_lhs:
    out = _to_out(mark(lhs, lc), lc, lb, lf, len(rf), True, ())
  if check_rhs:
    m = _to_out(mark(rhs, rc), rc, rb, rf, len(lf), False, ())
    out = m if out is None else out + m
  return out


# --- convolutions ----------------------------------------------------------------------------------------------


def plan_conv(lhs_config: QatConfig, rhs_config: QatConfig, in_features: int, window: int, max_accumulator: int):
  """``(num_pieces, piece)``: the split of the input features that keeps every int32 sum of a conv exact.

  A conv output sums ``K = in_features · window`` products (``window`` the
  kernel's spatial size); the int32 sum is exact while ``K · max|q_l - z_l| ·
  max|q_r - z_r| <= max_accumulator``. Beyond that the input features are
  split into pieces that each satisfy the bound.

  Examples:
    >>> import jqat
    >>> plan_conv(jqat.QatConfig(symmetric=False), jqat.QatConfig(symmetric=False), 4096, 9, 2**31 - 1)
    (2, 2048)
  """
  per = _max_centered(lhs_config) * _max_centered(rhs_config)
  if in_features * window * per <= max_accumulator:
    return 1, in_features
  limit = max_accumulator // (window * per)
  if limit < 1:
    raise ValueError(
      f"a kernel window of {window} elements with |q - z| products up to {per} cannot stay below "
      f"max_accumulator={max_accumulator} even with one input feature per piece"
    )
  num_pieces = -(-in_features // limit)
  return num_pieces, -(-in_features // num_pieces)


def _conv_scale(q: QTensor, axis: int, what: str) -> jax.Array:
  """The per-tensor scale, or the one along ``axis``, as a 1-D array (length 1 or ``shape[axis]``)."""
  s = jnp.asarray(q.scale, jnp.float32)
  if s.size == 1:
    return s.reshape(1)
  if s.ndim != q.ndim or any(d != 1 for a, d in enumerate(s.shape) if a != axis):
    raise ValueError(
      f"int_conv_general_dilated: the {what} scale of shape {tuple(s.shape)} varies along an axis other than "
      f"axis {axis} (the output features) of {q.shape}; only per-tensor or per-output-feature scales are supported"
    )
  return s.reshape(-1)


def accumulate_conv(lhs: QTensor, rhs: QTensor, conv, dimension_numbers, *, max_accumulator: int = INT32_MAX):
  """The exact integer convolution ``Σ (q_l - z_l)(q_r - z_r)`` and the scale to apply to it.

  Both operands are centred on their zero points (``|q - z| <= 255`` fits
  int16), so the zero padding of the convolution stays exact, and
  ``conv(..., preferred_element_type=int32)`` sums them. When ``plan_conv``
  splits the input features, each piece is an exact int32 convolution and the
  pieces are added in int32 when the whole bound fits, in float32 otherwise.

  Args:
    lhs: the quantized input (per-tensor parameters).
    rhs: the quantized kernel (per-tensor or per-output-feature parameters).
    conv: ``lax.conv_general_dilated`` with strides, padding, dilations,
      dimension numbers and feature groups bound; called as
      ``conv(x, w, preferred_element_type=...)``.
    dimension_numbers: the conv's dimension numbers (None for lax's default).
    max_accumulator: the largest magnitude one integer sum may reach.

  Returns:
    ``(acc, scale)``: int32 (or float32) sums in the output layout, and the
    float32 scale that broadcasts against them.
  """
  for name, q in (("lhs", lhs), ("rhs", rhs)):
    if q.config.bits.is_float or q.config.group_size is not None:
      raise ValueError(
        f"int_conv_general_dilated: {name} is {q.config.bits.value} with group_size={q.config.group_size}; the "
        "integer convolution needs integer formats with per-tensor or per-channel scales"
      )
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  feat, k_in, k_out = dn.lhs_spec[1], dn.rhs_spec[1], dn.rhs_spec[0]
  in_features = rhs.shape[k_in]
  if lhs.shape[feat] % in_features:
    raise ValueError(
      f"int_conv_general_dilated: the input has {lhs.shape[feat]} features (axis {feat} of {lhs.shape}), not a "
      f"multiple of the kernel's {in_features} (axis {k_in} of {rhs.shape})"
    )
  groups = lhs.shape[feat] // in_features
  if jnp.size(lhs.scale) != 1:
    raise ValueError(
      f"int_conv_general_dilated: the input needs one scale (per-tensor), got scale of shape {tuple(lhs.scale.shape)}"
    )
  ls = jnp.asarray(lhs.scale, jnp.float32).reshape(1)
  rs = _conv_scale(rhs, k_out, "kernel")
  lz = numerics.effective_zero_point(lhs.zero_point, lhs.config, jnp.float32).reshape(())
  rz = numerics.effective_zero_point(rhs.zero_point, rhs.config, jnp.float32)
  xi = lhs.int_values().astype(jnp.int16) - lz.astype(jnp.int16)
  wi = rhs.int_values().astype(jnp.int16)
  if not rhs.config.symmetric:
    rz_b = rz.reshape(-1) if rz.size > 1 else rz.reshape(1)
    shape = [1] * rhs.ndim
    shape[k_out] = rz_b.size
    wi = wi - rz_b.reshape(shape).astype(jnp.int16)
  window = math.prod(rhs.shape[a] for a in dn.rhs_spec[2:])
  num_pieces, piece = plan_conv(lhs.config, rhs.config, in_features, window, max_accumulator)
  if num_pieces == 1:
    acc = conv(xi, wi, preferred_element_type=jnp.int32)
  else:
    whole = in_features * window * _max_centered(lhs.config) * _max_centered(rhs.config)
    acc_dtype = jnp.int32 if whole <= INT32_MAX else jnp.float32
    # Input features of group g are [g * in_features, (g + 1) * in_features):
    # a piece takes the same slice of every group.
    xg = xi.reshape(xi.shape[:feat] + (groups, in_features) + xi.shape[feat + 1 :])
    acc = None
    for i in range(num_pieces):
      lo, hi = i * piece, min((i + 1) * piece, in_features)
      xp = lax.slice_in_dim(xg, lo, hi, axis=feat + 1)
      xp = xp.reshape(xi.shape[:feat] + (groups * (hi - lo),) + xi.shape[feat + 1 :])
      wp = lax.slice_in_dim(wi, lo, hi, axis=k_in)
      part = conv(xp, wp, preferred_element_type=jnp.int32).astype(acc_dtype)
      acc = part if acc is None else acc + part
  out_shape = [1] * acc.ndim
  out_shape[dn.out_spec[1]] = rs.size
  scale = ls.reshape(()) * rs.reshape(out_shape)
  return acc, scale


def convolve(lhs: QTensor, rhs: QTensor, conv_fn, dimension_numbers, *, max_accumulator: int = INT32_MAX) -> jax.Array:
  """``accumulate_conv`` then the rescale: the float32 convolution of two ``QTensor``s."""
  acc, scale = accumulate_conv(lhs, rhs, conv_fn, dimension_numbers, max_accumulator=max_accumulator)
  return acc.astype(jnp.float32) * scale

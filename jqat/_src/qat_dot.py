"""``qat_dot_general``: a quantization-aware dot whose forward is the integer serving kernel.

The forward quantizes both operands and multiplies the integers with int32
accumulation (``int_ops``), so training sees the numbers serving will produce;
they equal ``lax.dot_general(fake_quant(lhs), fake_quant(rhs))`` to within the
float rounding of the rescale. The backward is the clipped straight-through
estimator of the fake-quant float dot.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jqat._src import formats, int_kernels, numerics
from jqat._src import qparams as qparams_lib
from jqat._src.config import QatConfig
from jqat._src.qparams import QParams


class _Static(NamedTuple):
  """Everything static about one call: hashable, passed through ``nondiff_argnums``."""

  dims: int_kernels.DimensionNumbers
  lhs_config: QatConfig | None
  rhs_config: QatConfig | None
  precision: object
  out_dtype: jnp.dtype
  integer: bool  # forward runs the integer kernel
  lhs_may_clip: bool = True  # False: the mask is all ones by construction, skip it
  rhs_may_clip: bool = True


def _storage_dtype(config: QatConfig):
  return config.bits.float_dtype if config.bits.is_float else jnp.int8


def _quantize(x: jax.Array, scale, zero_point, config: QatConfig):
  """Grid values (in their storage dtype) and the in-range mask."""
  cd = formats.compute_dtype(x.dtype)
  s = qparams_lib.params_to_groups(jnp.asarray(scale), x.ndim, config)
  z = qparams_lib.params_to_groups(jnp.asarray(zero_point), x.ndim, config)
  q, xs, z = numerics.quantize_values(qparams_lib.to_groups(x, config), s, z, config, cd)
  inside = numerics.in_range(xs, z, config)  # the same mask as fake_quant's clipped STE
  q = qparams_lib.from_groups(q.astype(_storage_dtype(config)), x.shape, config)
  return q, qparams_lib.from_groups(inside, x.shape, config)


def _kernel_sums(static: _Static, qr: jax.Array, lhs_shape) -> jax.Array | None:
  """``Σ_k q_r`` over the contraction (what an asymmetric activation's zero point multiplies), or None.

  Summed in float32 from the int8 values, which XLA reads with the
  conversion fused into the reduction; every partial sum is an integer of
  magnitude below ``K * max|q|``, exact in float32 while that stays below
  ``2^24``. (The backward's dequantize converts the same values another way,
  see ``_dequantize``; an int32 sum, or one through bfloat16, runs 2-3x
  slower on XLA:CPU.) None (the sums are then taken by
  ``int_kernels.accumulate``) for a symmetric activation, an asymmetric
  kernel, or a contraction too long.
  """
  lcfg, rcfg = static.lhs_config, static.rhs_config
  (lc, rc), _ = static.dims
  k = math.prod(lhs_shape[a] for a in lc)
  if lcfg.symmetric or not rcfg.symmetric or k * max(-rcfg.qmin, rcfg.qmax) >= 2**24:
    return None
  return jnp.sum(qr.astype(jnp.float32), axis=rc, keepdims=True).astype(jnp.int32)


def _dequantize(q: jax.Array, scale, zero_point, config: QatConfig, dtype, *, backward: bool = False) -> jax.Array:
  """``fake_quant``'s output from its grid values: the same arithmetic, bit for bit.

  ``backward``: int8 values pass through bfloat16 (exact for them) on their
  way to the compute dtype, so this conversion is not the one the forward's
  column sums make (``_kernel_sums``): shared, XLA wrote a float32 copy of
  the kernel for both instead of summing the int8 values as they are.
  """
  cd = formats.compute_dtype(dtype)
  s = numerics.stored_scale(qparams_lib.params_to_groups(jnp.asarray(scale), q.ndim, config), config)  # as stored
  z = numerics.effective_zero_point(qparams_lib.params_to_groups(jnp.asarray(zero_point), q.ndim, config), config, cd)
  qg = qparams_lib.to_groups(q, config)
  if backward and jnp.issubdtype(qg.dtype, jnp.integer):
    qg = qg.astype(jnp.bfloat16)
  qg = qg.astype(cd)
  return qparams_lib.from_groups(numerics.dequantize_values(qg, s, z, dtype), q.shape, config)


def _float_dot(static: _Static, a, b):
  return lax.dot_general(a, b, static.dims, precision=static.precision, preferred_element_type=static.out_dtype).astype(
    static.out_dtype
  )


def _integer_forward(static: _Static, ql, ls, lz, qr, rs, rz, rhs_sums=None):
  lhs = int_kernels.Operand(ql, ls, lz, static.lhs_config)
  rhs = int_kernels.Operand(qr, rs, rz, static.rhs_config)
  acc, scale, plan = int_kernels.accumulate(lhs, rhs, static.dims, rhs_sums=rhs_sums)
  return int_kernels.rescale(acc, scale, plan).astype(static.out_dtype)


def _materialized(scale, zero_point, *, with_zero_point: bool) -> tuple[jax.Array, jax.Array]:
  """``(scale, zero_point)``, as the results of one small kernel of their own: the same values, computed once.

  The quantization parameters are a few scalars or one value per channel,
  computed from the ranges by a chain of cheap elementwise ops. XLA would
  fuse that chain into every elementwise consumer (the quantize, the
  rescale, the backward's dequantize and masks) and evaluate it again for
  each element there: on CPU that cost a QAT step of an MLP 4-6 %. A
  reduction is never fused into a consumer that broadcasts it, so a sum
  with ``-0.0`` padding (exact for every value, NaN included; a zero
  point's ``-0.0`` may come back as ``+0.0``, which quantizes alike) makes
  XLA compute the parameters once. (Not ``max`` with
  ``-inf``: XLA:CPU's max reduction does not propagate NaN. Nor
  ``lax.optimization_barrier``: XLA removes it before fusion. A
  single-element scale and zero point get seven padding rows: XLA turns a
  two-element reduction back into an elementwise op.) Without
  ``with_zero_point`` (a symmetric config: its zero point is a constant 0)
  the zero point is returned as it is.
  """
  parts = [jnp.asarray(scale)] + ([jnp.asarray(zero_point)] if with_zero_point else [])
  dtype = jnp.result_type(*parts)
  if not jnp.issubdtype(dtype, jnp.floating) or any(p.size == 0 for p in parts):
    return scale, zero_point
  flat = jnp.concatenate([p.astype(dtype).reshape(-1) for p in parts])
  zero = jnp.array(-0.0, dtype)
  pad = jnp.full((7 if flat.size <= 2 else 1, flat.size), zero)
  out = lax.reduce(jnp.concatenate([flat[None], pad]), zero, lax.add, (0,))
  n = parts[0].size
  scale = out[:n].reshape(parts[0].shape).astype(parts[0].dtype)
  if with_zero_point:
    zero_point = out[n:].reshape(parts[1].shape).astype(parts[1].dtype)
  return scale, zero_point


def _forward(static: _Static, lhs, rhs, ls, lz, rs, rz, rhs_mark=None, lhs_mark=None):
  """Output and residuals: the grid values (int8 / fp8) or raw operand, and the masks."""
  lcfg, rcfg = static.lhs_config, static.rhs_config
  if lcfg is not None:
    ls, lz = _materialized(ls, lz, with_zero_point=not lcfg.symmetric)
    ql, ml = _quantize(lhs, ls, lz, lcfg)
  else:
    ql, ml = lhs, None
  if rcfg is not None:
    rs, rz = _materialized(rs, rz, with_zero_point=not rcfg.symmetric)
    qr, mr = _quantize(rhs, rs, rz, rcfg)
  else:
    qr, mr = rhs, None
  # An operand quantized with its own range never clips: its mask is all ones,
  # and keeping it would cost a byte per element forward and a pass backward.
  ml = ml if static.lhs_may_clip else None
  mr = mr if static.rhs_may_clip else None
  if static.integer:
    y = _integer_forward(static, ql, ls, lz, qr, rs, rz, _kernel_sums(static, qr, lhs.shape))
  else:
    a = ql if lcfg is None else _dequantize(ql, ls, lz, lcfg, lhs.dtype)
    b = qr if rcfg is None else _dequantize(qr, rs, rz, rcfg, rhs.dtype)
    y = _float_dot(static, a, b)
  # An integer grid has no NaN: rows and columns that met a NaN or Inf are
  # made non-finite, as the float dot would give them (one fused reduction).
  # ``rhs_mark`` (0 or NaN per column, contracting axes of size 1) is that sum
  # when the caller already knows it from the kernel's range, ``lhs_mark``
  # (per row) from the activation's.
  mark = int_kernels.nonfinite_out(
    lhs if lhs_mark is None else lhs_mark,
    rhs if rhs_mark is None else rhs_mark,
    static.dims,
    check_lhs=lcfg is not None,
    check_rhs=rcfg is not None,
  )
  if mark is not None:
    y = y + mark.astype(y.dtype)
  # Low-precision values and byte masks instead of float copies: the backward
  # rebuilds fake_quant(x) from them with one elementwise op.
  return y, (ql, ml, ls, lz, qr, mr, rs, rz)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qat_dot(static: _Static, lhs, rhs, ls, lz, rs, rz, rhs_mark, lhs_mark):
  return _forward(static, lhs, rhs, ls, lz, rs, rz, rhs_mark, lhs_mark)[0]


def _qat_dot_fwd(static: _Static, lhs, rhs, ls, lz, rs, rz, rhs_mark, lhs_mark):
  y, res = _forward(static, lhs, rhs, ls, lz, rs, rz, rhs_mark, lhs_mark)
  return y, (res, jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype), rhs_mark, lhs_mark)


def _qat_dot_bwd(static: _Static, res, g):
  (ql, ml, ls, lz, qr, mr, rs, rz), lproto, rproto, rhs_mark, lhs_mark = res
  lcfg, rcfg = static.lhs_config, static.rhs_config
  a = ql if lcfg is None else _dequantize(ql, ls, lz, lcfg, lproto.dtype, backward=True)
  b = qr if rcfg is None else _dequantize(qr, rs, rz, rcfg, rproto.dtype, backward=True)
  # Clipped straight-through estimator (Bengio et al. 2013): the float dot's
  # gradient at the fake-quantized operands, zeroed where an operand was clipped.
  (da,) = jax.linear_transpose(lambda t: _float_dot(static, t, b), a)(g)
  (db,) = jax.linear_transpose(lambda t: _float_dot(static, a, t), b)(g)
  if ml is not None:
    da = jnp.where(ml, da, jnp.zeros_like(da))
  if mr is not None:
    db = jnp.where(mr, db, jnp.zeros_like(db))
  zeros = jnp.zeros_like(ls), jnp.zeros_like(lz), jnp.zeros_like(rs), jnp.zeros_like(rz)
  marks = (None if m is None else jnp.zeros_like(m) for m in (rhs_mark, lhs_mark))
  return da, db, *zeros, *marks


_qat_dot.defvjp(_qat_dot_fwd, _qat_dot_bwd)


def _integer_path_applies(lhs, rhs, dims, lcfg: QatConfig | None, rcfg: QatConfig | None, ls, lz, rs, rz) -> bool:
  """Whether the integer kernel can run: integer formats, scales constant along the contraction."""
  if lcfg is None or rcfg is None or lcfg.bits.is_float or rcfg.bits.is_float:
    return False
  if lcfg.group_size is not None or rcfg.group_size is not None:
    # Per-group scales split the contraction into many small dots; the
    # single float dot of the fake-quantized operands is faster for training.
    return False
  (lc, rc), _ = dims
  for x, s, z, contract in ((lhs, ls, lz, lc), (rhs, rs, rz, rc)):
    shape = jnp.broadcast_shapes(jnp.shape(s), jnp.shape(z))
    if len(shape) > x.ndim:
      return False
    shape = (1,) * (x.ndim - len(shape)) + tuple(shape)
    if any(shape[a] != 1 for a in contract):
      return False
  k = 1
  for a in lc:
    k *= lhs.shape[a]
  # Training keeps one int32 sum; a contraction long enough to need pieces
  # is left to the float dot.
  return int_kernels.accumulator_bound(lcfg, rcfg, k) <= int_kernels.INT32_MAX


def qat_dot_general(
  lhs: ArrayLike,
  rhs: ArrayLike,
  dimension_numbers,
  lhs_qparams: QParams | None = None,
  rhs_qparams: QParams | None = None,
  *,
  lhs_config: QatConfig | None = None,
  rhs_config: QatConfig | None = None,
  precision=None,
  preferred_element_type: DTypeLike | None = None,
  lhs_may_clip: bool = True,
  rhs_may_clip: bool = True,
) -> jax.Array:
  """``lax.dot_general`` with quantized operands, for quantization-aware training.

  Forward: both operands are quantized with their ``QParams`` (one fused
  elementwise op each) and multiplied as integers,
  ``y = s_l s_r Σ (q_l - z_l)(q_r - z_r)`` with int32 accumulation, as
  ``int_dot_general`` serves them. The result equals
  ``lax.dot_general(fake_quant(lhs), fake_quant(rhs))`` to within float
  rounding (``(K + 3) · 2^-24 · Σ_k |x̂_k ŵ_k|`` in float32, see
  ``int_dot_general``). Scales may be per-tensor, per-token (on lhs free axes)
  or per-channel (on rhs free axes). Where the integer kernel does not apply
  (fp8, per-group scales, scales along a contracting axis, a contraction too
  long for one int32 sum, or only one operand quantized) the forward is the
  float dot of the fake-quantized operands (a quantized fp8 operand is its fp8
  value times its scale; an unquantized one enters as it is, so a weight-only
  layer is a float dot with the dequantized weight).

  Backward, in every case the clipped straight-through estimator (Bengio et
  al. 2013) of that float dot:

  * ``d_lhs = (g contracted with fake_quant(rhs)) · [lhs in range]``;
  * ``d_rhs = (fake_quant(lhs) contracted with g) · [rhs in range]``;
  * the quantization parameters get zero gradient.

  Only the int8 (or fp8) values and the in-range masks are kept for the
  backward, not float copies of the operands.

  NaN and ±Inf: the outputs whose row of ``lhs`` or column of ``rhs`` holds
  one are NaN, as in the float dot (an integer grid would otherwise turn the
  NaN into 0 and hide it); a NaN input is not "clipped", so the gradients
  that flow from a NaN loss stay NaN.

  Args:
    lhs: left operand, float.
    rhs: right operand, float.
    dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
    lhs_qparams: ``QParams`` in the parameter layout of ``lhs``; ignored when
      ``lhs_config`` is None.
    rhs_qparams: the same for ``rhs``.
    lhs_config: how ``lhs`` is quantized; None leaves it in float.
    rhs_config: how ``rhs`` is quantized; None leaves it in float.
    precision: passed to the float dots.
    preferred_element_type: dtype of the result; default that of
      ``lax.dot_general(lhs, rhs)``.
    lhs_may_clip: pass False when ``lhs_qparams`` come from ``lhs``'s own
      range (``qparams_from_array(lhs, ...)``): then nothing clips, the STE
      mask is all ones by construction, and it is neither kept nor applied.
    rhs_may_clip: the same for ``rhs`` (a kernel quantized with its own
      per-channel range).

  Returns:
    The product, shaped as ``lax.dot_general``'s.

  Raises:
    TypeError: for non-float operands, or qparams that are not ``QParams``.
    ValueError: when the operands' axes differ, or qparams do not fit their
      operand's ``params_shape`` (both shapes named), or a concrete scale is
      not positive and finite, or a symmetric config gets a nonzero zero point.

  Examples:
    >>> import jax, jax.numpy as jnp, jqat
    >>> x = jnp.array([[0.5, -1.0, 2.0]])
    >>> w = jnp.array([[1.0, 0.0], [0.5, 1.0], [0.25, -1.0]])
    >>> xcfg, wcfg = jqat.QatConfig(symmetric=False), jqat.QatConfig(per_channel=True)
    >>> xqp, wqp = jqat.qparams_from_array(x, xcfg), jqat.qparams_from_array(w, wcfg)
    >>> dims = (((1,), (0,)), ((), ()))
    >>> y = jqat.qat_dot_general(x, w, dims, xqp, wqp, lhs_config=xcfg, rhs_config=wcfg)
    >>> y.round(1).tolist()
    [[0.5, -3.0]]
    >>> loss = lambda w: jqat.qat_dot_general(x, w, dims, xqp, wqp, lhs_config=xcfg, rhs_config=wcfg).sum()
    >>> jax.grad(loss)(w).round(1).tolist()
    [[0.5, 0.5], [-1.0, -1.0], [2.0, 2.0]]

  References:
    Bengio, Léonard and Courville, "Estimating or propagating gradients through
    stochastic neurons for conditional computation", 2013.
    Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018.
  """
  return dot_general_with_mark(
    lhs,
    rhs,
    dimension_numbers,
    lhs_qparams,
    rhs_qparams,
    lhs_config=lhs_config,
    rhs_config=rhs_config,
    precision=precision,
    preferred_element_type=preferred_element_type,
    lhs_may_clip=lhs_may_clip,
    rhs_may_clip=rhs_may_clip,
  )


def dot_general_with_mark(
  lhs,
  rhs,
  dimension_numbers,
  lhs_qparams,
  rhs_qparams,
  *,
  lhs_config,
  rhs_config,
  precision=None,
  preferred_element_type=None,
  lhs_may_clip=True,
  rhs_may_clip=True,
  rhs_mark=None,
  lhs_mark=None,
) -> jax.Array:
  """``qat_dot_general`` with the kernel's non-finite mark given instead of computed.

  ``rhs_mark``: None, or 0 / NaN per column of ``rhs`` (``rhs``'s shape with
  the contracting axes of size 1): NaN exactly where the column holds a NaN
  or ±Inf. A kernel quantized with its own per-channel range has it from the
  range's reduction (see ``flax.common.own_range_qparams``), which saves a
  pass over the kernel. ``lhs_mark``: the same per row of ``lhs`` (its
  contracting axes of size 1), from an activation's range
  (``flax.common.activation_qparams``).
  """
  lhs = jnp.asarray(lhs)
  rhs = jnp.asarray(rhs)
  out_dtype = jnp.dtype(
    preferred_element_type if preferred_element_type is not None else jnp.result_type(lhs.dtype, rhs.dtype)
  )
  if lhs_config is None and rhs_config is None:
    return lax.dot_general(
      lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
    )
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"qat_dot_general needs float operands, got {name} of dtype {x.dtype}")
  dims = int_kernels.normalize_dims(dimension_numbers, lhs.ndim, rhs.ndim)
  (lc, rc), (lb, rb) = dims
  for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
    if lhs.shape[a] != rhs.shape[b]:
      raise ValueError(
        f"qat_dot_general: the operands do not fit: lhs of shape {lhs.shape} axis {a} has {lhs.shape[a]} "
        f"elements but rhs of shape {rhs.shape} axis {b} has {rhs.shape[b]}"
      )
  ls, lz = _params_or_placeholder(lhs_qparams, lhs_config, "lhs", lhs.shape)
  rs, rz = _params_or_placeholder(rhs_qparams, rhs_config, "rhs", rhs.shape)
  integer = _integer_path_applies(lhs, rhs, dims, lhs_config, rhs_config, ls, lz, rs, rz)
  static = _Static(dims, lhs_config, rhs_config, precision, out_dtype, integer, lhs_may_clip, rhs_may_clip)
  if rhs_config is None:
    rhs_mark = None
  if lhs_config is None:
    lhs_mark = None
  return _qat_dot(static, lhs, rhs, ls, lz, rs, rz, rhs_mark, lhs_mark)


def _params_or_placeholder(qp: QParams | None, config: QatConfig | None, name: str, shape):
  if config is None:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  if qp is None:
    raise ValueError(f"qat_dot_general: {name}_config is set but {name}_qparams is None")
  where = f"qat_dot_general ({name})"
  qparams_lib.check_qparams(qp, shape, config, where)
  expected = qparams_lib.params_shape(shape, config)
  scale = qparams_lib.visible_scale(qparams_lib.to_params_shape(qp.scale, expected), config)
  return scale, qparams_lib.to_params_shape(qp.zero_point, expected)

"""Einsum of an activation with a weight, written as one ``lax.dot_general``.

Quantized layers need the contraction in ``dot_general`` form: which axes are
contracted, which are batch axes, and which stay free, with the activation as
the left operand and the weight as the right one (the integer kernels and the
per-channel axes of the weight follow from that). Equations put the operands
in either order (``"BTD,DNH->BTNH"``, or gemma's weight-first
``"BSD,CKDH->CBSKH"`` with the weight second but the output led by a weight
axis), so the parse also gives the transpose that brings ``dot_general``'s
output (batch axes, lhs free axes, rhs free axes) back to the equation's order.
"""

from __future__ import annotations

import string
from typing import NamedTuple


class EinsumDims(NamedTuple):
  """An activation x weight einsum as ``lax.dot_general`` plus a transpose.

  Attributes:
    dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``
      with the activation as lhs and the weight as rhs.
    out_perm: the permutation to apply (``jnp.transpose``) to the
      ``dot_general`` output to get the equation's output order.
    lhs_sum_axes: activation axes that appear nowhere else and are summed
      before the dot (rare; ``"bij,jk->bk"`` sums ``i``).
    rhs_sum_axes: the same for the weight.
  """

  dimension_numbers: tuple
  out_perm: tuple[int, ...]
  lhs_sum_axes: tuple[int, ...]
  rhs_sum_axes: tuple[int, ...]


def _expand(term: str, ndim: int, ell: str, where: str) -> str:
  if "..." in term:
    if term.count("...") > 1:
      raise ValueError(f"{where}: more than one '...' in {term!r}")
    n = ndim - (len(term) - 3)
    if n < 0:
      raise ValueError(f"{where}: {term!r} names more axes than the operand's {ndim}")
    return term.replace("...", ell[len(ell) - n :] if n else "")
  if len(term) != ndim:
    raise ValueError(f"{where}: {term!r} names {len(term)} axes but the operand has {ndim}")
  return term


def parse_einsum(equation: str, lhs_ndim: int, rhs_ndim: int, *, weight_first: bool = False) -> EinsumDims:
  """The ``dot_general`` form of a two-operand einsum, activation first.

  Args:
    equation: an einsum equation with two operands, explicit ``->`` output or
      implicit (NumPy's rule: the letters that appear once, sorted). ``...``
      is allowed in each term.
    lhs_ndim: rank of the activation.
    rhs_ndim: rank of the weight.
    weight_first: the equation's first operand is the weight (``"ABC,..."``
      applied as ``einsum(eq, weight, x)``); the result still has the
      activation as lhs.

  Returns:
    ``EinsumDims``.

  Raises:
    ValueError: for an equation that is not a two-operand contraction of
      these ranks, or that repeats a letter inside one operand (a diagonal).

  Examples:
    >>> d = parse_einsum("BSD,CKDH->CBSKH", 3, 4)
    >>> d.dimension_numbers
    (((2,), (2,)), ((), ()))
    >>> d.out_perm
    (2, 0, 1, 3, 4)
    >>> parse_einsum("...d,dh->...h", 3, 2).dimension_numbers
    (((2,), (0,)), ((), ()))
  """
  where = f"einsum {equation!r}"
  eq = equation.replace(" ", "")
  if "->" in eq:
    ins, out = eq.split("->")
  else:
    ins, out = eq, None
  terms = ins.split(",")
  if len(terms) != 2:
    raise ValueError(f"{where}: needs exactly two operands, got {len(terms)}")
  used = set(c for c in eq if c.isalpha())
  ell = "".join(c for c in string.ascii_letters if c not in used)
  a_term, b_term = terms
  a_ndim, b_ndim = (rhs_ndim, lhs_ndim) if weight_first else (lhs_ndim, rhs_ndim)
  a = _expand(a_term, a_ndim, ell, where)
  b = _expand(b_term, b_ndim, ell, where)
  for t in (a, b):
    if len(set(t)) != len(t):
      raise ValueError(f"{where}: a letter repeats inside one operand ({t!r}); diagonals are not supported")
    if not all(c.isalpha() for c in t):
      raise ValueError(f"{where}: operand term {t!r} has characters other than letters and '...'")
  if out is None:
    counts = {c: (a + b).count(c) for c in set(a + b)}
    ell_part = "".join(c for c in ell if c in counts)
    out = ell_part + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
  else:
    if "..." in out:
      n_ell = max(len([c for c in a if c in ell]), len([c for c in b if c in ell]))
      out = out.replace("...", ell[len(ell) - n_ell :] if n_ell else "")
    if len(set(out)) != len(out):
      raise ValueError(f"{where}: a letter repeats in the output")
    missing = [c for c in out if c not in a and c not in b]
    if missing:
      raise ValueError(f"{where}: output letters {missing} appear in no operand")
  x, w = (b, a) if weight_first else (a, b)

  contract = [c for c in x if c in w and c not in out]
  batch = [c for c in x if c in w and c in out]
  x_sum = tuple(i for i, c in enumerate(x) if c not in w and c not in out)
  w_sum = tuple(i for i, c in enumerate(w) if c not in x and c not in out)
  # Axes summed before the dot leave the operand; the remaining positions shift.
  x_kept = [c for c in x if c in w or c in out]
  w_kept = [c for c in w if c in x or c in out]
  lc = tuple(x_kept.index(c) for c in contract)
  rc = tuple(w_kept.index(c) for c in contract)
  lb = tuple(x_kept.index(c) for c in batch)
  rb = tuple(w_kept.index(c) for c in batch)
  x_free = [c for c in x_kept if c not in w]
  w_free = [c for c in w_kept if c not in x]
  dot_out = batch + x_free + w_free
  if sorted(dot_out) != sorted(out):
    raise ValueError(f"{where}: output {out!r} is not the batch and free letters {''.join(dot_out)!r}")
  perm = tuple(dot_out.index(c) for c in out)
  return EinsumDims(((lc, rc), (lb, rb)), perm, x_sum, w_sum)

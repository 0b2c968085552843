"""parse_einsum: the dot_general form of an activation x weight einsum, checked against np.einsum."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jqat._src.einsum import parse_einsum

CASES = [
  # (equation, activation shape, weight shape, weight_first)
  ("BTD,DNH->BTNH", (2, 3, 4), (4, 5, 6), False),
  ("BSD,CKDH->CBSKH", (2, 3, 4), (2, 5, 4, 6), False),  # gemma's kv projection: output led by a weight axis
  ("CKDH,BSD->CBSKH", (2, 3, 4), (2, 5, 4, 6), True),  # the weight as the first operand
  ("...d,dh->...h", (2, 3, 4), (4, 5), False),
  ("...D,D...->...", (3, 4), (4, 3), False),  # '...' in both: batch axis
  ("bij,jk->bk", (2, 3, 4), (4, 5), False),  # i summed away before the dot
  ("bd,dh", (2, 4), (4, 5), False),  # implicit output
  ("bnd,nhd->bnh", (2, 3, 4), (3, 5, 4), False),  # a batch axis shared with the weight
]


@pytest.mark.parametrize("eq,xs,ws,weight_first", CASES)
def test_matches_numpy_einsum(eq, xs, ws, weight_first):
  rng = np.random.default_rng(0)
  x = rng.normal(size=xs).astype(np.float32)
  w = rng.normal(size=ws).astype(np.float32)
  want = np.einsum(eq, w, x) if weight_first else np.einsum(eq, x, w)
  d = parse_einsum(eq, x.ndim, w.ndim, weight_first=weight_first)
  xr = x.sum(axis=d.lhs_sum_axes) if d.lhs_sum_axes else x
  wr = w.sum(axis=d.rhs_sum_axes) if d.rhs_sum_axes else w
  got = jnp.transpose(lax.dot_general(xr, wr, d.dimension_numbers), d.out_perm)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "eq,xs,ws,msg",
  [
    ("ab,bc,cd->ad", 2, 2, "exactly two operands"),
    ("abc,cd->ad", 2, 2, "names 3 axes"),
    ("aa,ab->b", 2, 2, "repeats inside one operand"),
    ("ab,bc->az", 2, 2, "appear in no operand"),
    ("...a...,ab->b", 3, 2, "more than one"),
  ],
)
def test_bad_equations_raise(eq, xs, ws, msg):
  with pytest.raises(ValueError, match=msg):
    parse_einsum(eq, xs, ws)

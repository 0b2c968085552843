"""Property: the integer serving products equal the fake-quant float forward, over formats, symmetry, granularities
and shapes.

``int_dot_general`` (and ``int_matmul``) of ``quantize(x)`` and ``quantize(w)`` equals
``lax.dot_general(fake_quant(x), fake_quant(w))`` within the bound its docstring states: the integer sum is exact,
so the two differ by float32 rounding only, ``(K + 3) 2^-24 sum_k |x_k w_k|`` of the dequantized operands, plus one
rounding per group in the sum over groups. ``weight_only_matmul(x, quantize(w))`` equals ``x @ fake_quant(w)`` to the
bound counted over ``|q| + |z|`` rather than ``|q - z|``: it sums ``x q`` and ``x`` in float32, then rescales once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jqat

FORMATS = ("int2", "int3", "int4", "int5", "int6", "int7", "int8", "fp8_e4m3", "fp8_e5m2")
EPS32 = 2.0**-24


def _config(bits, symmetric, granularity, group_size, *, k_axis, free_axes, side):
  kw = {"bits": bits, "symmetric": symmetric or bits.startswith("fp8")}  # fp8 is symmetric only
  if granularity == "channel":  # per token on the left, per output channel on the right: the free axes
    kw.update(per_channel=True, channel_axis=free_axes)
  elif granularity == "group":  # blocks of the contraction axis; on the right, per output channel too
    kw.update(group_size=group_size, group_axis=k_axis)
    if side == "rhs":
      kw.update(per_channel=True, channel_axis=free_axes[-1])
  return jqat.QatConfig(**kw)


def _quantized(a, cfg):
  qp = jqat.qparams_from_array(a, cfg)
  return jqat.quantize(a, qp, cfg), jqat.fake_quant(a, qp, cfg)


@st.composite
def _case(draw):
  batch = draw(st.sampled_from([0, 2]))  # 0: a plain (M, K) @ (K, N) through int_matmul
  # Few shapes: every new shape compiles each eager operation again, and the configurations are what varies.
  m, n = 3, draw(st.sampled_from([2, 5]))
  group_size = 4
  k = group_size * draw(st.sampled_from([1, 3]))
  lhs = (draw(st.sampled_from(FORMATS)), draw(st.booleans()), draw(st.sampled_from(["tensor", "channel", "group"])))
  rhs = (draw(st.sampled_from(FORMATS)), draw(st.booleans()), draw(st.sampled_from(["tensor", "channel", "group"])))
  # Gaussian data, sometimes with an outlier (a per-tensor scale then rounds most values to few levels), sometimes
  # all zeros (the degenerate range).
  kind = draw(st.sampled_from(["normal", "outlier", "zeros"]))
  return batch, m, k, n, group_size, lhs, rhs, kind, draw(st.integers(0, 2**16))


def _data(shape, kind, rng):
  a = rng.normal(size=shape).astype(np.float32)
  if kind == "outlier":
    a.flat[rng.integers(a.size)] = 40.0
  elif kind == "zeros":
    a[:] = 0.0
  return jnp.asarray(a)


def _check(y, ref, bound, what):
  err = np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64))
  assert np.all(err <= bound), (what, float(err.max()), float(bound[err > bound].min()))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _products(x, w, lcfg, rcfg, dims, batch):
  """The serving products and their fake-quant references; one compile per drawn configuration."""
  xq, x_hat = _quantized(x, lcfg)
  wq, w_hat = _quantized(w, rcfg)
  ref = lax.dot_general(x_hat, w_hat, dims, precision=lax.Precision.HIGHEST)
  y = jqat.int_dot_general(xq, wq, dims) if batch else jqat.int_matmul(xq, wq)
  y_wo = None if batch or rcfg.bits.is_float else jqat.weight_only_matmul(x, wq)
  return y, ref, x_hat, w_hat, y_wo


@settings(max_examples=20, deadline=None)
@given(_case())
def test_integer_serving_equals_fake_quant_forward(case):
  batch, m, k, n, group_size, (lbits, lsym, lgran), (rbits, rsym, rgran), kind, seed = case
  rng = np.random.default_rng(seed)
  if batch:
    x_shape, w_shape = (batch, m, k), (batch, k, n)
    dims = (((2,), (1,)), ((0,), (0,)))
    lcfg = _config(lbits, lsym, lgran, group_size, k_axis=2, free_axes=(0, 1), side="lhs")
    rcfg = _config(rbits, rsym, rgran, group_size, k_axis=1, free_axes=(0, 2), side="rhs")
  else:
    x_shape, w_shape = (m, k), (k, n)
    dims = (((1,), (0,)), ((), ()))
    lcfg = _config(lbits, lsym, lgran, group_size, k_axis=1, free_axes=(0,), side="lhs")
    rcfg = _config(rbits, rsym, rgran, group_size, k_axis=0, free_axes=(1,), side="rhs")
  x = _data(x_shape, "normal" if kind == "zeros" and seed % 2 else kind, rng)
  w = _data(w_shape, kind, rng)
  hp = lax.Precision.HIGHEST  # the reference in full float32 on every backend
  y, ref, x_hat, w_hat, y_wo = _products(x, w, lcfg, rcfg, dims, bool(batch))
  assert y.shape == ref.shape and y.dtype == jnp.float32
  groups = k // group_size if "group" in (lgran, rgran) else 1
  # The documented bound, (K + 3) 2^-24 sum_k |x_k w_k|, plus one rounding per group in the sum over groups.
  abs_sum = lax.dot_general(jnp.abs(x_hat), jnp.abs(w_hat), dims, precision=hp)
  _check(y, ref, (k + 3 + groups) * EPS32 * np.asarray(abs_sum, np.float64), (lcfg, rcfg))

  if not batch and not rcfg.bits.is_float:
    # Weight-only serving: float activations, the integer weight. Its documented arithmetic is
    # (x @ q - (sum_k x) z) s: float32 sums of x q and of x, so the bound counts |q| + |z| (not |q - z|) per term.
    ref_wo = jnp.dot(x, w_hat, precision=hp)
    qp = jqat.qparams_from_array(w, rcfg)
    zs = np.abs(np.asarray(qp.zero_point, np.float64) * np.asarray(qp.scale, np.float64)).reshape(-1, 1)[:, 0]
    zs = np.atleast_2d(zs.reshape(np.broadcast_shapes(np.shape(qp.scale), (1, 1))))
    zs = np.repeat(zs, k // zs.shape[0], axis=0)  # per-group parameters: one row per group of K
    terms = np.abs(np.asarray(w_hat, np.float64)) + 2 * zs  # s (|q| + |z|) <= |w_hat| + 2 |z| s
    bound = (k + 3 + groups) * EPS32 * (np.abs(np.asarray(x, np.float64)) @ terms)
    _check(y_wo, ref_wo, bound, rcfg)

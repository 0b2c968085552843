"""GPTQ against an independent NumPy reference of the paper's plain column loop (float64)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat._src.ptq import gptq as gptq_lib

# --- the reference: Frantar et al. 2022, Algorithm 1 without the lazy batches, in float64 --------------


def _qrange(bits):
  b = int(bits[3:])
  return -(2 ** (b - 1)), 2 ** (b - 1) - 1


def _params(x, bits, symmetric):
  """Scale and zero point (DESIGN.md numerics) of each row of ``x`` (out, in)."""
  qmin, qmax = _qrange(bits)
  lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
  hi = np.maximum(x.max(axis=1, keepdims=True), 0.0)
  eps = np.finfo(np.float32).eps
  if symmetric:
    s = np.maximum(np.maximum(-lo, hi) / qmax, eps)
    return s, np.zeros_like(s)
  s = np.maximum((hi - lo) / (qmax - qmin), eps)
  return s, np.clip(qmin - np.round(lo / s), qmin, qmax)


def _grid(w, s, z, bits):
  qmin, qmax = _qrange(bits)
  return np.clip(np.round(w / s) + z, qmin, qmax)


def ref_gptq(kernel, h, *, bits, symmetric, per_channel, group=None, damp=0.01, act_order=False):
  """(integer values (K, N), dequantized kernel (K, N)) from the plain column loop."""
  w = np.array(kernel, np.float64).T  # (out, in): the paper's layout, one column per input
  h = np.array(h, np.float64)
  n_out, k = w.shape

  def params(block):  # per output row, or one for the whole block
    if per_channel:
      return _params(block, bits, symmetric)
    s, z = _params(block.reshape(1, -1), bits, symmetric)
    return np.full((n_out, 1), s.item()), np.full((n_out, 1), z.item())

  if group is None:
    s, z = params(w)
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  if group is not None and act_order:
    static = [params(w[:, g : g + group]) for g in range(0, k, group)]
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  w, h = w[:, perm], h[perm][:, perm]
  h += damp * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  q_int = np.zeros_like(w)
  q = np.zeros_like(w)
  for i in range(k):
    if group is not None:
      if act_order:
        s, z = static[perm[i] // group]
      elif i % group == 0:
        s, z = params(w[:, i : i + group])  # the current, already updated columns
    qi = _grid(w[:, i : i + 1], s, z, bits)
    q_int[:, i] = qi[:, 0]
    q[:, i] = ((qi - z) * s)[:, 0]
    err = (w[:, i] - q[:, i]) / u[i, i]
    w[:, i:] -= np.outer(err, u[i, i:])
  inv = np.argsort(perm)
  return q_int[:, inv].T, q[:, inv].T


# --- data ------------------------------------------------------------------------------------------------


def _layer(seed, k, n, rows=None):
  """Correlated inputs with uneven channel scales (ALGORITHMS.md), and a kernel."""
  rng = np.random.default_rng(seed)
  rows = rows or 4 * k
  mix = np.eye(k) + 0.3 * rng.normal(size=(k, k)) / np.sqrt(k)
  x = rng.normal(size=(rows, k)) @ mix * np.exp(0.5 * rng.normal(size=k))
  w = rng.normal(size=(k, n)) / np.sqrt(k)
  return x.astype(np.float32), w.astype(np.float32)


def _err(x, w, w_hat):
  x = np.asarray(x, np.float64)
  return float(np.linalg.norm(x @ np.asarray(w, np.float64) - x @ np.asarray(w_hat, np.float64)))


def _hessian(x):
  x = np.asarray(x, np.float64)
  return (x.T @ x).astype(np.float32)


# Shapes and configs are shared between the tests so that each compiles once (~0.6 s each on two cores).
K, N = 64, 16
CASES = {
  # name: (K, config, block_size, act_order)
  "int4_sym_channel": (K, jqat.QatConfig(bits="int4", per_channel=True), 16, False),
  "int4_asym_channel_pad": (80, jqat.QatConfig(bits="int4", per_channel=True, symmetric=False), 32, False),
  "int8_sym_tensor": (K, jqat.QatConfig(bits="int8"), 16, False),
  "int3_sym_g16_in_block": (K, jqat.QatConfig(bits="int3", per_channel=True, group_size=16), 32, False),
  "int2_asym_g32_block_start": (
    K, jqat.QatConfig(bits="int2", per_channel=True, symmetric=False, group_size=32), 16, False
  ),
  "int4_tensor_g32": (K, jqat.QatConfig(bits="int4", group_size=32), 32, False),
  "int4_sym_channel_act": (K, jqat.QatConfig(bits="int4", per_channel=True), 16, True),
  "int3_asym_g16_act": (K, jqat.QatConfig(bits="int3", per_channel=True, symmetric=False, group_size=16), 32, True),
}  # fmt: skip


def _gptq(case, w, h):
  _, cfg, block, act = CASES[case]
  return jqat.gptq(w, h, cfg, block_size=block, act_order=act)


def _ref(case, w, h):
  _, cfg, _, act = CASES[case]
  return ref_gptq(
    w, h, bits=cfg.bits.value, symmetric=cfg.symmetric, per_channel=cfg.per_channel, group=cfg.group_size,
    act_order=act,
  )  # fmt: skip


# Jitted: eager jqat calls dispatch (and compile) op by op, which costs more than GPTQ itself at these sizes.
@functools.partial(jax.jit, static_argnums=1)
def _rtn(w, cfg):
  return jqat.dequantize(jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg))


_deq = jax.jit(jqat.dequantize)


@jax.jit
def _ints(q):
  return q.int_values()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_plain_loop_reference_and_beats_rtn(case):
  k, cfg, _, _ = CASES[case]
  x, w = _layer(list(CASES).index(case), k, N)
  h = _hessian(x)
  q = _gptq(case, w, h)
  ref_int, ref_w = _ref(case, w, h)
  assert q.shape == w.shape and q.config == cfg and q.dequant_dtype == jnp.float32
  assert q.scale.shape == jqat.params_shape(w.shape, cfg)
  got = np.asarray(_ints(q), np.float64)
  # float32 against float64: the updated weights drift by ~1e-6 relative, which flips an element that
  # sits on a rounding boundary (a tie, up to that drift) by one step; the flip then propagates a little.
  assert np.mean(got != ref_int) <= 0.01
  assert np.max(np.abs(got - ref_int)) <= 1
  err = _err(x, w, _deq(q))
  assert err <= _err(x, w, ref_w) * 1.01
  assert err < _err(x, w, _rtn(w, cfg))  # 4-15% less on these inputs (int8: 1%)


def test_float64_matches_reference_exactly():
  x, w = _layer(3, K, N)
  cfg = jqat.QatConfig(bits="int4", per_channel=True, symmetric=False, group_size=16)
  h = np.asarray(x, np.float64).T @ x
  with jax.enable_x64(True):
    q = jqat.gptq(np.asarray(w, np.float64), h, cfg, block_size=32)
    assert q.dequant_dtype == jnp.float64 and _deq(q).dtype == jnp.float64
    got = np.asarray(_ints(q))
  ref_int, _ = ref_gptq(w, h, bits="int4", symmetric=False, per_channel=True, group=16)
  np.testing.assert_array_equal(got, ref_int)  # the same algorithm in the same precision: no drift to flip ties


def test_block_size_changes_only_rounding():
  x, w = _layer(5, K, N)
  h = _hessian(x)
  cfg = CASES["int3_sym_g16_in_block"][1]
  base = _gptq("int3_sym_g16_in_block", w, h)  # blocks of 32: groups start inside blocks
  q = jqat.gptq(w, h, cfg, block_size=8)  # groups span two blocks
  assert np.mean(np.asarray(_ints(q)) != np.asarray(_ints(base))) <= 0.01
  np.testing.assert_allclose(q.scale, base.scale, rtol=1e-5)


def test_block_size_fits_the_group_size():
  # A multiple of the group size when larger, a divisor when smaller: a group never starts mid-block
  # with rows in the next block.
  assert gptq_lib._block_size(128, None) == 128
  assert gptq_lib._block_size(32, 24) == 24
  assert gptq_lib._block_size(128, 48) == 96
  assert gptq_lib._block_size(32, 64) == 32
  assert gptq_lib._block_size(48, 64) == 32
  assert gptq_lib._block_size(128, 1000) == 125


def test_act_order_permutation_round_trip():
  x, w = _layer(6, K, N)
  h = _hessian(x)
  q = np.asarray(_ints(_gptq("int4_sym_channel_act", w, h)))
  # Permuting the inputs (kernel rows and Hessian) permutes the result's rows the same way.
  p = np.random.default_rng(0).permutation(K)
  qp = np.asarray(_ints(_gptq("int4_sym_channel_act", w[p], h[p][:, p])))
  assert np.mean(qp != q[p]) <= 0.01  # the same visits; only the float summation order differs
  # Inputs already in decreasing diag(H) order: act_order visits them in place.
  order = np.argsort(-np.diag(h), kind="stable")
  ws, hs = w[order], h[order][:, order]
  a = np.asarray(_ints(_gptq("int4_sym_channel_act", ws, hs)))
  np.testing.assert_array_equal(a, np.asarray(_ints(_gptq("int4_sym_channel", ws, hs))))
  # In the original layout the order matters: it is undone, not ignored.
  assert not np.array_equal(q, np.asarray(_ints(_gptq("int4_sym_channel", w, h))))


@pytest.mark.parametrize("case", ["int3_sym_g16_in_block", "int3_asym_g16_act"])
def test_dead_inputs(case):
  x, w = _layer(7, K, N)
  x[:, [3, 40, 41]] = 0  # inputs that never fire
  h = _hessian(x)
  q = _gptq(case, w, h)
  got = np.asarray(_deq(q))
  assert np.isfinite(got).all()
  assert not got[[3, 40, 41]].any()  # set to zero, as the reference implementation does
  ref_int, ref_w = _ref(case, w, h)
  assert np.mean(np.asarray(_ints(q)) != ref_int) <= 0.01
  assert _err(x, w, got) <= _err(x, w, ref_w) * 1.01


def test_all_inputs_dead_gives_zero_kernel():
  q = _gptq("int4_sym_channel", np.ones((K, N), np.float32), np.zeros((K, K), np.float32))
  assert not np.asarray(_deq(q)).any()


def test_moments_state_as_hessian():
  x, w = _layer(8, K, N)
  s = jqat.moments_update(jqat.moments_init(K), x)
  np.testing.assert_array_equal(_gptq("int4_sym_channel", w, s).values, _gptq("int4_sym_channel", w, s.xtx).values)


def test_bf16_kernel_keeps_dtype():
  x, w = _layer(9, K, N)
  q = _gptq("int4_sym_channel", jnp.asarray(w, jnp.bfloat16), _hessian(x))
  assert q.dequant_dtype == jnp.bfloat16 and _deq(q).dtype == jnp.bfloat16


def test_compiles_once_and_runs_under_jit():
  x, w = _layer(10, K, N)
  _gptq("int4_sym_channel", w, _hessian(x))
  n = gptq_lib._gptq._cache_size()
  x2, w2 = _layer(11, K, N)
  _, cfg, block, _ = CASES["int4_sym_channel"]
  jqat.gptq(w2, _hessian(x2), cfg, block_size=block, damp=0.05)  # new values and damp: no new compilation
  assert gptq_lib._gptq._cache_size() == n
  jitted = jax.jit(lambda w, h: jqat.dequantize(_gptq("int4_sym_channel", w, h)))
  np.testing.assert_array_equal(jitted(w2, _hessian(x2)), _deq(_gptq("int4_sym_channel", w2, _hessian(x2))))


def test_errors():
  w = np.ones((K, N), np.float32)
  h = np.eye(K, dtype=np.float32)
  _, cfg, block, _ = CASES["int4_sym_channel"]
  shapes = r"the Hessian has shape \(6, 6\), but the kernel of shape \(64, 16\) needs \(64, 64\)"
  with pytest.raises(ValueError, match=shapes):
    jqat.gptq(w, np.eye(6), cfg)
  for bad in (0, -0.1, float("nan")):
    with pytest.raises(ValueError, match="damp=.* is invalid; allowed: a finite number > 0"):
      jqat.gptq(w, h, cfg, damp=bad)
  with pytest.raises(ValueError, match="the Hessian holds NaN or Inf"):
    jqat.gptq(w, np.where(np.eye(K) > 0, np.inf, 0.0), cfg)
  with pytest.raises(ValueError, match="the kernel holds NaN or Inf"):
    jqat.gptq(np.full((K, N), np.nan), h, cfg)
  with pytest.raises(ValueError, match=r"group_size=24 does not divide K=64, the input features of the kernel"):
    jqat.gptq(w, h, cfg.replace(group_size=24))
  with pytest.raises(ValueError, match="not positive definite"):
    jqat.gptq(w, -h, cfg, block_size=block)
  with pytest.raises(ValueError, match="integer format"):
    jqat.gptq(w, h, jqat.QatConfig(bits="fp8_e4m3"))
  with pytest.raises(ValueError, match="channel_axis must be -1"):
    jqat.gptq(w, h, jqat.QatConfig(bits="int4", per_channel=True, channel_axis=0))
  with pytest.raises(ValueError, match=r"float \(in, out\) kernel"):
    jqat.gptq(np.ones((2, 3, 4)), h, cfg)
  with pytest.raises(ValueError, match="block_size=0 is invalid"):
    jqat.gptq(w, h, cfg, block_size=0)
  with pytest.raises(ValueError, match="observed no finite rows"):
    jqat.gptq(w, jqat.moments_init(K), cfg)
  with pytest.raises(ValueError, match="holds no Hessian"):
    jqat.gptq(w, jqat.moments_init(K, hessian=False), cfg)

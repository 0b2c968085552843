"""``weight_only_matmul``: int8 and packed int4 / int2 weights, K-blocked or one dot, float32 or bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat
from jqat._src import int_ops

EPS32 = 2.0**-24  # unit roundoff of float32


def _case(bits, symmetric, k, m=3, n=6, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((m, k)) + 0.3).astype(np.float32)
  w = (rng.standard_normal((k, n)) * 0.1 + 0.02).astype(np.float32)
  cfg = jqat.QatConfig(bits=bits, per_channel=True, symmetric=symmetric)
  return x, w, cfg


@pytest.mark.parametrize(
  "bits, symmetric, k",
  [
    ("int8", True, 64),
    ("int8", False, 63),
    ("int4", True, 63),
    ("int4", False, 64),
    ("int2", True, 64),
    ("int2", False, 63),
  ],
)
def test_blocked_and_whole_equal_the_dequantized_product(bits, symmetric, k):
  x, w, cfg = _case(bits, symmetric, k)

  @jax.jit
  def run(x, w):
    wq = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
    return (
      jqat.dequantize(wq),
      jqat.weight_only_matmul(x, wq, k_block=16),  # blocks when k = 64; one dot when 16 does not divide 63
      jqat.weight_only_matmul(x, wq, k_block=None),
      jqat.weight_only_matmul(x, wq),
      jqat.weight_only_matmul(x, wq, compute_dtype=jnp.bfloat16),
    )

  wd, blocked, whole, auto, bf16 = run(x, w)
  xd, wd = np.asarray(x, np.float64), np.asarray(wd, np.float64)
  ref = xd @ wd
  mag = np.abs(xd) @ np.abs(wd)
  # Float32 sums in another order, the zero-point term and the scale product: (K + 4) roundings on Σ|x ŵ|.
  tol = (k + 4) * EPS32 * (mag + np.abs(xd).sum(-1, keepdims=True) * np.abs(wd).max(0))
  for y in (blocked, whole, auto):
    assert y.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol)
  # bfloat16 compute: x rounded to bfloat16 (2^-9 relative per element), the weight exact.
  assert bf16.dtype == jnp.float32
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  np.testing.assert_array_less(np.abs(np.asarray(bf16, np.float64) - xb @ wd), tol)
  assert np.max(np.abs(np.asarray(bf16, np.float64) - ref) / (mag + 1e-30)) <= 2**-8


def test_nibble_planes_are_the_unpacked_rows():
  q = np.arange(-8, 8, dtype=np.int8).repeat(2).reshape(16, 2)
  q[1::2] = q[1::2][::-1]
  packed = jqat.pack_int4(jnp.asarray(q))
  lo, hi = int_ops._nibbles(packed)
  np.testing.assert_array_equal(np.asarray(lo), q[0::2])
  np.testing.assert_array_equal(np.asarray(hi), q[1::2])


def test_auto_k_block():
  assert int_ops.auto_k_block(4096, 4096) == 512  # 512 x 4096 float32 = 8 MiB
  assert int_ops.auto_k_block(1024, 1024) is None  # the whole weight fits: one dot
  assert int_ops.auto_k_block(512, 512) is None
  assert int_ops.auto_k_block(4096, 11008) == 128
  assert int_ops.auto_k_block(4100, 4096) is None  # no power-of-two block >= 128 divides K
  assert int_ops.auto_k_block(14336, 4096) == 512


def test_blocked_scan_in_the_hlo():
  # The auto block turns (4096, 4096) into a loop of 8 steps: a while loop, not one dot on a converted weight.
  cfg = jqat.QatConfig(per_channel=True)
  wq = jax.eval_shape(lambda: jqat.quantize(jnp.ones((4096, 4096)), jqat.QParams(jnp.ones((1, 4096)), 0), cfg))
  text = jax.jit(jqat.weight_only_matmul).lower(jax.ShapeDtypeStruct((8, 4096), jnp.float32), wq).as_text()
  assert "stablehlo.while" in text
  assert "tensor<512x4096xi8>" in text


def test_bad_block_and_compute_dtype():
  cfg = jqat.QatConfig(per_channel=True)
  w = np.ones((4, 3), np.float32)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg)
  with pytest.raises(ValueError, match=r"weight_only_matmul: k_block=0 is invalid; allowed: a positive int"):
    jqat.weight_only_matmul(np.ones((2, 4), np.float32), wq, k_block=0)
  with pytest.raises(ValueError, match=r"weight_only_matmul: compute_dtype=int8 is invalid"):
    jqat.weight_only_matmul(np.ones((2, 4), np.float32), wq, compute_dtype=jnp.int8)

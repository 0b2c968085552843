"""Second-moment statistics: NumPy oracle, non-finite rows, merge under splits and permutations, eight devices.

The eight-device check needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, so it runs
this file as a script in a subprocess that prints one JSON line; the same reduction over eight shards is also
checked in process with ``jax.vmap(..., axis_name=...)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jqat


def _ref(x):
  """float64 NumPy statistics of the all-finite rows of ``x``."""
  rows = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  keep = np.isfinite(rows).all(axis=1)
  r = rows[keep]
  amax = np.abs(r).max(axis=0) if len(r) else np.zeros(rows.shape[1])
  return r.T @ r, np.abs(r).sum(axis=0), amax, int(keep.sum()), int((~keep).sum())


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _data(seed, n, k):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, k)) * np.exp(rng.normal(size=k))).astype(np.float32)


def test_update_matches_numpy():
  x = _data(0, 300, 16).reshape(3, 100, 16)  # leading axes flatten to rows
  s = jqat.moments_update(jqat.moments_init(16), x)
  xtx, asum, amax, count, bad = _ref(x)
  assert _rel(s.xtx, xtx) <= 1e-6  # float32 dot against float64
  assert _rel(s.abs_sum, asum) <= 1e-6
  np.testing.assert_array_equal(s.abs_max, amax.astype(np.float32))  # a max is exact
  assert (int(s.count), int(s.nonfinite)) == (count, bad) == (300, 0)
  np.testing.assert_allclose(jqat.moments_mean_abs(s), asum / 300, rtol=1e-6)


def test_nonfinite_rows_are_dropped_and_counted():
  x = _data(1, 20, 5)
  x[3, 1] = np.nan
  x[7, 4] = np.inf
  x[7, 0] = -np.inf
  x[11, 2] = -np.inf
  s = jqat.moments_update(jqat.moments_init(5), x)
  clean = jqat.moments_update(jqat.moments_init(5), np.delete(x, [3, 7, 11], axis=0))
  assert (int(s.count), int(s.nonfinite)) == (17, 3)
  for a, b in zip(s[:3], clean[:3]):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert all(bool(jnp.isfinite(a).all()) for a in s[:3])


def test_all_nonfinite_batch_leaves_state_empty():
  s = jqat.moments_update(jqat.moments_init(3), jnp.full((4, 3), jnp.nan))
  assert (int(s.count), int(s.nonfinite)) == (0, 4)
  assert not bool(s.xtx.any() | s.abs_sum.any() | s.abs_max.any())
  assert jqat.moments_mean_abs(s).tolist() == [0.0, 0.0, 0.0]  # no 0 / 0


def test_without_hessian():
  x = _data(2, 30, 4)
  s = jqat.moments_update(jqat.moments_init(4, hessian=False), x)
  full = jqat.moments_update(jqat.moments_init(4), x)
  assert s.xtx.shape == (0, 0) and not s.has_hessian
  np.testing.assert_array_equal(s.abs_sum, full.abs_sum)
  np.testing.assert_array_equal(s.abs_max, full.abs_max)


def test_update_compiles_once():
  s = jqat.moments_init(6)
  s = jqat.moments_update(s, _data(3, 10, 6))
  before = jqat._src.calibration.moments._update._cache_size()
  jqat.moments_update(s, _data(4, 10, 6))
  assert jqat._src.calibration.moments._update._cache_size() == before


@settings(max_examples=20)
@given(
  seed=st.integers(0, 2**16),
  cuts=st.lists(st.integers(1, 5), max_size=5),
  order=st.randoms(use_true_random=False),
)
def test_merge_under_splits_and_permutations(seed, cuts, order):
  # Chunks of whole multiples of 4 rows: a handful of shapes, each compiled once for all examples.
  n, k = 24, 5
  x = _data(seed, n, k)
  x[seed % n, seed % k] = np.nan  # a non-finite row in one of the chunks
  bounds = sorted({0, n, *(4 * c for c in cuts)})
  chunks = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  order.shuffle(chunks)
  states = [jqat.moments_update(jqat.moments_init(k), c) for c in chunks]
  # Merge as a random binary tree: pick two neighbours, replace them by their merge.
  while len(states) > 1:
    i = order.randrange(len(states) - 1)
    states[i : i + 2] = [jqat.moments_merge(states[i], states[i + 1])]
  merged, one = states[0], jqat.moments_update(jqat.moments_init(k), x)
  assert (int(merged.count), int(merged.nonfinite)) == (int(one.count), int(one.nonfinite))
  np.testing.assert_array_equal(merged.abs_max, one.abs_max)  # max: exact in any order
  # Sums in another order: float32 rounding, ~1e-7 relative to the magnitude.
  xtx, asum, *_ = _ref(x)
  assert _rel(merged.xtx, xtx) <= 1e-6 and _rel(one.xtx, xtx) <= 1e-6
  assert _rel(merged.abs_sum, asum) <= 1e-6


def test_empty_state_is_the_identity():
  s = jqat.moments_update(jqat.moments_init(3), _data(5, 7, 3))
  for a, b in zip(jqat.moments_merge(s, jqat.moments_init(3)), s):
    np.testing.assert_array_equal(a, b)


def test_vmap_over_eight_shards_equals_one_pass():
  x = _data(6, 8 * 32, 12)
  x[17, 3] = np.nan

  def local(xs):
    return jqat.moments_all_reduce(jqat.moments_update(jqat.moments_init(12), xs), "d")

  s = jax.vmap(local, axis_name="d")(x.reshape(8, 32, 12))
  one = jqat.moments_update(jqat.moments_init(12), x)
  for i in (0, 7):  # every shard holds the reduced state
    assert _rel(s.xtx[i], one.xtx) <= 1e-6 and _rel(s.abs_sum[i], one.abs_sum) <= 1e-6
    np.testing.assert_array_equal(s.abs_max[i], one.abs_max)
    assert (int(s.count[i]), int(s.nonfinite[i])) == (255, 1)


def test_errors():
  s = jqat.moments_init(4)
  with pytest.raises(ValueError, match="num_features=0 is invalid"):
    jqat.moments_init(0)
  with pytest.raises(ValueError, match=r"x has shape \(2, 3\), but the statistics are for inputs with 4 features"):
    jqat.moments_update(s, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="empty"):
    jqat.moments_update(s, jnp.ones((0, 4)))
  with pytest.raises(ValueError, match="cannot merge MomentsStates of 4 and 5 features"):
    jqat.moments_merge(s, jqat.moments_init(5))
  with pytest.raises(ValueError, match="cannot merge"):
    jqat.moments_merge(s, jqat.moments_init(4, hessian=False))
  with pytest.raises(TypeError, match="expected a MomentsState"):
    jqat.moments_update(jqat.init_stats((4,), jqat.QatConfig(), "minmax"), jnp.ones((2, 4)))


# --- eight simulated devices, in a subprocess --------------------------------------------


def test_eight_devices_equal_one():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
  assert r["devices"] == 8
  assert r["xtx_rel"] <= 1e-6 and r["abs_sum_rel"] <= 1e-6  # the bound: 1e-6 relative
  assert r["abs_max_equal"] and r["counts"] == [1023, 1]
  assert r["replicated"]


def _main():
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",))
  x = _data(7, 1024, 64)
  x[100, 5] = np.inf

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P())
  def sharded(xs):
    return jqat.moments_all_reduce(jqat.moments_update(jqat.moments_init(64), xs), "data")

  s = sharded(jax.device_put(x, jax.NamedSharding(mesh, P("data"))))
  one = jqat.moments_update(jqat.moments_init(64), x)
  out = {
    "devices": jax.device_count(),
    "xtx_rel": _rel(s.xtx, np.asarray(one.xtx, np.float64)),
    "abs_sum_rel": _rel(s.abs_sum, np.asarray(one.abs_sum, np.float64)),
    "abs_max_equal": bool((s.abs_max == one.abs_max).all()),
    "counts": [int(s.count), int(s.nonfinite)],
    "replicated": bool(s.xtx.sharding.is_fully_replicated),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  _main()

"""Calibration speed: jqat against straightforward NumPy implementations of the same algorithms.

For each method, calibrating 4 batches of 1M float32 elements (observe each batch, then finalize), and the entropy
threshold search alone on a 2048-bin histogram. jqat is timed after a warm-up call (compilation excluded), with
``block_until_ready``; every figure is the median of several runs. Also: ``observe`` (one update) against a bare
jitted ``jnp.max(jnp.abs(x))`` over the same batch, alternating the two over ``--rounds`` rounds (the best median
of each), and the calibration forward of Flax models (``model.apply(..., mutable=["quant_calib"])``, each quantized
layer computing in float and observing its input into a histogram) against the float model's forward, alternating
likewise.

``observe`` runs on two batches: Laplace values, and ReLU outputs (half of them exact zeros, the input of every
layer after a ReLU). ``alternatives``: other ways to count the same 1M bin indices (65536 bins), each checked equal to
``observe``'s counts and timed against the same ``jnp.max(jnp.abs(x))``: a one-hot matmul per chunk (the index split
into high and low bytes, bf16 one-hots, float32 accumulation: exact below 2^24 per chunk), ``jnp.bincount``, and a
sort followed by ``searchsorted`` of the bin edges.

Run: ``python benchmarks/bench_calibration.py [--repeats N] [--rounds R] [--only observe,forward,alternatives]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from bench_qat_step import Block, Mlp  # the same two models: one definition

import jqat

NUM_BATCHES = 4
BATCH = 1 << 20


# ---------------------------------------------------------------------------------------------------------------------
# NumPy: one candidate at a time, as the published calibrators do.


def np_entropy_amax(hist, edges, num_levels=128, start_bin=128):
  bins = np.array(hist, dtype=np.float64)
  bins[0] = bins[1]
  divergences = []
  for i in range(start_bin, len(bins) + 1):
    p = bins[:i].copy()
    p[i - 1] += bins[i:].sum()
    level = np.digitize(np.arange(i), np.linspace(0, i, num_levels + 1)) - 1
    level[bins[:i] == 0] = -1
    used = level >= 0
    sums = np.bincount(level[used], weights=bins[:i][used], minlength=num_levels)
    nonzero = np.bincount(level[used], minlength=num_levels)
    q = np.zeros(i)
    q[used] = sums[level[used]] / nonzero[level[used]]
    divergences.append(scipy.stats.entropy(p, q))
  divergences = np.array(divergences)
  return edges[len(divergences) - 1 - np.argmin(divergences[::-1]) + start_bin]


def np_percentile_amax(hist, edges, percentile=99.99):
  return edges[np.searchsorted(np.cumsum(hist / hist.sum()), percentile / 100)]


def np_mse_amax(hist, edges, qmax=127, start_bin=128):
  centres = (edges[1:] + edges[:-1]) / 2
  mses = []
  for i in range(start_bin, len(centres)):
    s = qmax / centres[i]
    mses.append(((np.clip(np.round(centres * s), -qmax, qmax) / s - centres) ** 2 * hist).mean())
  return centres[start_bin + np.argmin(mses)]


def np_calibrate(batches, method):
  """Running min/max or a 2048-bin histogram of |x| (re-binned as the range grows), then the search."""
  if method in ("minmax", "moving_average"):
    lo, hi = np.inf, -np.inf
    for k, b in enumerate(batches):
      blo, bhi = float(b.min()), float(b.max())
      if method == "minmax" or k == 0:
        lo, hi = min(lo, blo), max(hi, bhi)
      else:
        lo, hi = 0.9 * lo + 0.1 * blo, 0.9 * hi + 0.1 * bhi
    return max(-lo, hi)
  amax = max(float(np.abs(b).max()) for b in batches)  # one extra pass instead of re-binning: favours NumPy
  hist = np.zeros(2048)
  for b in batches:
    hist += np.histogram(np.abs(b), bins=2048, range=(0, amax))[0]
  edges = np.linspace(0, amax, 2049)
  if method == "percentile":
    return np_percentile_amax(hist, edges)
  if method == "entropy":
    return np_entropy_amax(hist, edges)
  return np_mse_amax(hist, edges)


# ---------------------------------------------------------------------------------------------------------------------


def _median_time(fn, repeats, warm_up=True):
  if warm_up:
    fn()  # compiles
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def interleaved(fns: dict, rounds: int, reps: int) -> dict:
  """Best of ``rounds`` medians of ``reps`` calls per function, the order of the functions flipping every round."""
  for f in fns.values():
    jax.block_until_ready(f())  # compiles
  best = {k: float("inf") for k in fns}
  names = list(fns)
  for r in range(rounds):
    for k in names if r % 2 == 0 else names[::-1]:
      best[k] = min(best[k], _median_time(fns[k], reps, warm_up=False))
  return best


def bench_observe(rounds: int, reps: int = 20) -> dict:
  """``update_stats`` on one batch of 1M against a bare jitted ``jnp.max(jnp.abs(x))``, interleaved."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.laplace(size=BATCH).astype(np.float32))
  relu = jnp.asarray(np.maximum(rng.normal(size=BATCH), 0).astype(np.float32))
  cfg = jqat.QatConfig()
  update = jax.jit(jqat.update_stats)
  maxabs = jax.jit(lambda x: jnp.max(jnp.abs(x)))
  fns = {"jnp.max(abs)": lambda: maxabs(x)}
  for method in ("minmax", "moving_average", "entropy"):
    s = update(jqat.init_stats((BATCH,), cfg, method), x)  # a state that has seen a batch, as after the first
    fns[method] = lambda s=s: update(s, x)
  s = update(jqat.init_stats((BATCH,), cfg, "entropy"), relu)
  fns["entropy, relu"] = lambda s=s: update(s, relu)
  best = interleaved(fns, rounds, reps)
  print(f"\nobserve one batch of {BATCH} vs a bare jitted jnp.max(jnp.abs(x)), best median seconds of {rounds} rounds")
  print("(Laplace values; 'entropy, relu': ReLU outputs, half exact zeros)")
  for k, t in best.items():
    print(f"{k:<16}{t:>10.5f}{t / best['jnp.max(abs)']:>9.2f}x")
  return best


def bench_alternatives(rounds: int, reps: int = 5) -> dict:
  """Other ways to count the bin indices of one batch, against ``observe`` and ``jnp.max(jnp.abs(x))``."""
  x = jnp.asarray(np.random.default_rng(0).laplace(size=BATCH).astype(np.float32))
  state = jqat.init_stats((BATCH,), jqat.QatConfig(), "entropy")
  n = state.counts.shape[0]
  update = jax.jit(jqat.update_stats)
  want = np.asarray(update(state, x).counts)
  e = int(update(state, x).exponent)

  def bins(x):  # the same bin indices as observe: floor(|x| * 2^(log2 n - e)), exact
    return (jnp.abs(x) * np.float32(2.0 ** (n.bit_length() - 1 - e))).astype(jnp.int32)

  @jax.jit
  def onehot(x, chunk=4096):
    def step(acc, xi):
      i = bins(xi)
      hi = jax.nn.one_hot(i >> 8, 256, dtype=jnp.bfloat16)
      lo = jax.nn.one_hot(i & 255, 256, dtype=jnp.bfloat16)
      return acc + jnp.dot(hi.T, lo, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(step, jnp.zeros((256, 256), jnp.float32), x.reshape(-1, chunk))
    return acc.reshape(-1).astype(jnp.int32)

  bincount = jax.jit(lambda x: jnp.bincount(bins(x), length=n))

  @jax.jit
  def sort_search(x):
    edges = jnp.searchsorted(jnp.sort(bins(x)), jnp.arange(n + 1, dtype=jnp.int32))
    return jnp.diff(edges)

  maxabs = jax.jit(lambda x: jnp.max(jnp.abs(x)))
  fns = {
    "jnp.max(abs)": lambda: maxabs(x),
    "observe": lambda: update(state, x),
    "one-hot matmul": lambda: onehot(x),
    "jnp.bincount": lambda: bincount(x),
    "sort+search": lambda: sort_search(x),
  }
  for name in ("one-hot matmul", "jnp.bincount", "sort+search"):
    np.testing.assert_array_equal(np.asarray(fns[name]()), want, err_msg=name)
  best = interleaved(fns, rounds, reps)
  print(f"\ncounting {BATCH} bin indices ({n} bins), best median seconds of {rounds} rounds (ratio to jnp.max(abs))")
  for k, t in best.items():
    print(f"{k:<16}{t:>10.5f}{t / best['jnp.max(abs)']:>9.2f}x")
  return best


def bench_forward(rounds: int, reps: int = 20) -> dict:
  """Calibration forward (``mutable=["quant_calib"]``, entropy histograms) against the float forward."""
  key = jax.random.key(0)
  results = {}
  for name, cls, x in (
    ("mlp b256", Mlp, jax.random.normal(key, (256, 784))),
    ("block b16 s128", Block, jax.random.normal(key, (16, 128, 512))),
  ):
    fmodel, qmodel = cls(), cls(quant=True)
    fv = fmodel.init(jax.random.key(1), x)
    qv = qmodel.init(jax.random.key(1), x)
    float_fwd = jax.jit(fmodel.apply)
    _, calib = qmodel.apply(qv, x, mutable=["quant_calib"])  # statistics that have seen a batch

    @jax.jit
    def calib_fwd(v, c, x, qmodel=qmodel):
      return qmodel.apply({**v, "quant_calib": c}, x, mutable=["quant_calib"])

    qat = jax.jit(lambda v, x, qmodel=qmodel: qmodel.apply(v, x))  # for scale: the QAT forward
    c = calib["quant_calib"]
    fns = {
      "float": lambda f=float_fwd, v=fv, x=x: f(v, x),
      "calibrate": lambda f=calib_fwd, v=qv, c=c, x=x: f(v, c, x),
      "qat forward": lambda f=qat, v=qv, x=x: f(v, x),
    }
    best = interleaved(fns, rounds, reps)
    results[name] = best
    print(f"\nforward of {name}: best median seconds of {rounds} rounds (ratio to float)")
    for k, t in best.items():
      print(f"{k:<16}{t:>10.5f}{t / best['float']:>9.2f}x")
  return results


def bench_methods(repeats: int) -> None:
  rng = np.random.default_rng(0)
  batches_np = [rng.laplace(size=BATCH).astype(np.float32) for _ in range(NUM_BATCHES)]
  batches = [jnp.asarray(b) for b in batches_np]
  cfg = jqat.QatConfig()
  update = jax.jit(jqat.update_stats)
  finalize = jax.jit(jqat.finalize_stats, static_argnames=("config", "method", "percentile"))

  print(f"\ncalibration of {NUM_BATCHES} batches of {BATCH} float32 (observe each, then finalize), median seconds")
  print(f"{'method':<16}{'jqat':>10}{'numpy':>10}{'speed-up':>10}")
  for method in ("minmax", "moving_average", "percentile", "entropy", "mse"):

    def run(method=method):
      s = jqat.init_stats((BATCH,), cfg, method)
      for b in batches:
        s = update(s, b)
      return finalize(s, cfg, method)

    t_jqat = _median_time(run, repeats)
    np_repeats = 1 if method in ("entropy", "mse") else repeats  # the loops take seconds
    t_np = _median_time(lambda method=method: np_calibrate(batches_np, method), np_repeats, warm_up=False)
    print(f"{method:<16}{t_jqat:>10.4f}{t_np:>10.4f}{t_np / t_jqat:>9.1f}x")

  print("\nentropy threshold search alone (2048-bin histogram), median seconds")
  hist, edges = np.histogram(np.abs(batches_np[0]), bins=2048)
  counts = jnp.asarray(hist.astype(np.int32))
  width = np.float32(edges[1])
  t_jqat = _median_time(lambda: jqat.entropy_amax(counts, width), 20)
  t0 = time.perf_counter()
  ref = np_entropy_amax(hist, edges)
  t_np = time.perf_counter() - t0
  got = float(jqat.entropy_amax(counts, width))
  print(f"jqat {t_jqat:.5f}  numpy loop {t_np:.4f}  speed-up {t_np / t_jqat:.0f}x  (amax {got:.6g} vs {ref:.6g})")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the timed comparisons")
  parser.add_argument("--only", type=str, default="methods,observe,forward", help="comma-separated sections")
  args = parser.parse_args()
  sections = set(args.only.split(","))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  if "methods" in sections:
    bench_methods(args.repeats)
  if "observe" in sections:
    bench_observe(args.rounds)
  if "forward" in sections:
    bench_forward(args.rounds)
  if "alternatives" in sections:
    bench_alternatives(args.rounds)


if __name__ == "__main__":
  main()

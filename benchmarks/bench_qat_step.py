"""QAT train step vs float train step with jqat's Flax layers, in one run.

Run: ``python benchmarks/bench_qat_step.py [--reps 15] [--rounds 3]``.

Models (Flax linen, each jitted as ``loss -> grad -> optax.adam update``):

* ``mlp``: 784-1024-1024-10 with ReLU, batch 256. Float uses ``nn.Dense``;
  QAT swaps in ``jqat.linen.QatDense`` (weights int8 symmetric per channel,
  activations int8 asymmetric per tensor with moving-average ranges).
* ``block``: a pre-LN transformer block, d=512, 8 heads, MLP 2048, sequence
  128, batch 16. QAT injects ``jqat.linen.QatDotGeneral`` into the attention
  projections and uses ``QatDense`` in the MLP. (``block12``, twelve such
  blocks, is used by ``compare_peers.py`` for compile times.)

The QAT step runs the integer dot in its forward (int8 x int8 -> int32) and
the straight-through float gradient in its backward. Each figure is the
best of ``rounds`` medians of ``reps`` calls; the float and QAT steps
alternate so load from other processes hits both alike.

``--nan-check``: instead, the QAT step as it is against the same step with
the NaN / Inf check of ``qat_dot_general`` (``int_kernels.nonfinite_out``)
and ``quantize`` (``qtensor._nonfinite_scale``) replaced by no-ops while
tracing, alternating (the order flips every round), to measure what making
NaN visible costs: best wall time and median process CPU time per step (the
CPU time is what to read on a loaded machine).
"""

from __future__ import annotations

import argparse
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jqat
from jqat._src import int_kernels, qtensor


class Mlp(nn.Module):
  quant: bool = False

  @nn.compact
  def __call__(self, x):
    dense = jqat.linen.QatDense if self.quant else nn.Dense
    x = nn.relu(dense(1024)(x))
    x = nn.relu(dense(1024)(x))
    return dense(10)(x)


class Block(nn.Module):
  quant: bool = False
  heads: int = 8

  @nn.compact
  def __call__(self, x):
    dense = jqat.linen.QatDense if self.quant else nn.Dense
    dg = jqat.linen.QatDotGeneral if self.quant else None
    d = x.shape[-1]
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_dot_general_cls=dg, out_dot_general_cls=dg)(
      h, mask=mask
    )
    h = nn.LayerNorm()(x)
    return x + dense(d)(nn.gelu(dense(4 * d)(h)))


class Stack(nn.Module):
  """``depth`` transformer blocks in sequence (to show how compile time grows with depth)."""

  quant: bool = False
  depth: int = 12

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = Block(quant=self.quant)(x)
    return x


def float_model(name: str) -> nn.Module:
  """The float model of ``name``: ``"mlp"``, ``"block"`` or ``"block12"`` (12 blocks)."""
  return {"mlp": Mlp, "block": Block, "block12": Stack}[name]()


def make_step(model, loss_fn, opt):
  @jax.jit
  def step(params, stats, opt_state, x, y):
    def objective(p):
      out, upd = model.apply({"params": p, "quant_stats": stats}, x, mutable=["quant_stats"])
      return loss_fn(out, y), upd.get("quant_stats", stats)

    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


def median_ms(step, state, x, y, reps: int) -> float:
  params, stats, opt_state = state
  for _ in range(3):
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
  jax.block_until_ready(loss)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
    jax.block_until_ready((params, loss))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def setup(name: str, quant: bool, opt):
  key = jax.random.key(0)
  if name == "mlp":
    model = Mlp(quant=quant)
    x = jax.random.normal(key, (256, 784))
    y = jax.random.randint(jax.random.fold_in(key, 1), (256,), 0, 10)
    loss_fn = lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  else:
    model = Block(quant=quant) if name == "block" else Stack(quant=quant)
    x = jax.random.normal(key, (16, 128, 512))
    y = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    loss_fn = lambda out, y: jnp.mean((out - y) ** 2)
  v = jax.jit(model.init)(jax.random.key(1), x)
  params, stats = v["params"], v.get("quant_stats", {})
  return make_step(model, loss_fn, opt), (params, stats, opt.init(params)), x, y


def run(reps: int = 15, rounds: int = 3) -> dict:
  opt = optax.adam(1e-4)
  results = {}
  for name in ("mlp", "block"):
    runs = {q: setup(name, q, opt) for q in (False, True)}
    times = {False: [], True: []}
    for _ in range(rounds):
      for q, (step, state, x, y) in runs.items():
        times[q].append(median_ms(step, state, x, y, reps))
    best = {q: min(t) for q, t in times.items()}
    results[name] = {"float_ms": best[False], "qat_ms": best[True], "ratio": best[True] / best[False]}
  return results


class without_nan_check:
  """Traces with the NaN / Inf checks replaced by no-ops (for measuring their cost only)."""

  def __enter__(self):
    self.saved = int_kernels.nonfinite_out, qtensor._nonfinite_scale
    int_kernels.nonfinite_out = lambda *args, **kwargs: None
    qtensor._nonfinite_scale = lambda scale, *args: scale

  def __exit__(self, *exc):
    int_kernels.nonfinite_out, qtensor._nonfinite_scale = self.saved


def cpu_ms_per_step(step, state, x, y, reps: int) -> float:
  """Process CPU time (user + system) per step: what the step costs, less sensitive than wall time to other load."""
  params, stats, opt_state = state
  jax.block_until_ready(step(params, stats, opt_state, x, y))
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(reps):
    jax.block_until_ready(step(params, stats, opt_state, x, y))
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / reps * 1e3


def run_nan_check(reps: int = 15, rounds: int = 3) -> dict:
  opt = optax.adam(1e-4)
  results = {}
  for name in ("mlp", "block"):
    runs = {"checked": setup(name, True, opt)}
    with without_nan_check():
      step, state, x, y = setup(name, True, opt)
      jax.block_until_ready(step(*state, x, y))  # traced and compiled without the check
    runs["unchecked"] = (step, state, x, y)
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for i in range(rounds):
      order = list(runs) if i % 2 == 0 else list(runs)[::-1]
      for k in order:
        step, state, x, y = runs[k]
        wall[k].append(median_ms(step, state, x, y, reps))
        cpu[k].append(cpu_ms_per_step(step, state, x, y, reps))
    best = {k: min(t) for k, t in wall.items()}
    best_cpu = {k: float(np.median(t)) for k, t in cpu.items()}
    results[name] = {
      **best,
      "ratio": best["checked"] / best["unchecked"],
      "cpu_checked": best_cpu["checked"],
      "cpu_unchecked": best_cpu["unchecked"],
      "cpu_ratio": best_cpu["checked"] / best_cpu["unchecked"],
    }
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--nan-check", action="store_true", help="measure the cost of the NaN / Inf check")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
  if args.nan_check:
    print("| model | wall without / with the NaN check (ms, best) | ratio | CPU without / with (ms, median) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, r in run_nan_check(args.reps, args.rounds).items():
      print(
        f"| {name} | {r['unchecked']:.2f} / {r['checked']:.2f} | {r['ratio']:.3f}x | "
        f"{r['cpu_unchecked']:.2f} / {r['cpu_checked']:.2f} | {r['cpu_ratio']:.3f}x |"
      )
    return
  results = run(args.reps, args.rounds)
  print("| model | float step (ms) | jqat int8 QAT step (ms) | QAT / float |")
  print("|---|---:|---:|---:|")
  for name, r in results.items():
    label = {"mlp": "MLP 784-1024-1024-10, batch 256", "block": "transformer block d=512, 8 heads, seq 128, batch 16"}[
      name
    ]
    print(f"| {label} | {r['float_ms']:.1f} | {r['qat_ms']:.1f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
  main()

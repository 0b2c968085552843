"""``quantize_model`` against hand-swapped jqat layers: QAT step time and compile time, in one run.

Run: ``python benchmarks/bench_quantize_model.py [--reps 15] [--rounds 3]``.

Models (Flax linen, each jitted as ``loss -> grad -> optax.adam update``, the
statistics updated as in training):

* ``mlp``: 784-1024-1024-10 with ReLU, batch 256.
* ``block``: a pre-LN transformer block, d=512, 8 heads, MLP 2048, sequence
  128, batch 16 (``nn.MultiHeadDotProductAttention`` and ``nn.Dense``).

Three variants of each, with the same formats (int8 weights per channel,
int8 asymmetric activations per tensor): the float model; the float model
handed to ``jqat.linen.quantize_model`` unchanged; and the same model
written with jqat's layers by hand (``QatDense``, ``QatDotGeneral`` injected
into the attention). Step times are the best of ``rounds`` medians of
``reps`` calls, the two quantized variants alternating so that load from
other processes hits both alike. Compile time is
``jax.jit(step).lower(...).compile()`` (tracing included), best of
``rounds``.

Targets: the quantize_model step within 3% of the hand-swapped one; its
compile time at most 1.5x the float model's.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_qat_step import Block, Mlp  # the same two models: one definition

import jqat


def make_step(model, loss_fn, opt):
  def step(params, stats, opt_state, x, y):
    def objective(p):
      out, upd = model.apply({"params": p, "quant_stats": stats}, x, mutable=["quant_stats"])
      return loss_fn(out, y), upd.get("quant_stats", stats)

    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


def setup(name):
  rng = np.random.default_rng(0)
  if name == "mlp":
    x = jnp.asarray(rng.normal(size=(256, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 256))

    def loss_fn(out, y):
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    return Mlp, x, y, loss_fn
  x = jnp.asarray(rng.normal(size=(16, 128, 512)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 128, 512)), jnp.float32)

  def loss_fn(out, y):
    return jnp.mean((out - y) ** 2)

  return Block, x, y, loss_fn


def variant(cls, kind, x, loss_fn, opt):
  model = {"float": cls(), "quantize_model": jqat.linen.quantize_model(cls()), "hand": cls(quant=True)}[kind]
  v = jax.jit(model.init)(jax.random.key(0), x)
  params, stats = v["params"], v.get("quant_stats", {})
  return make_step(model, loss_fn, opt), (params, stats, opt.init(params))


def compile_seconds(step, state, x, y, rounds):
  """Best-of-rounds seconds to trace and lower (Python: Flax, jqat, the interceptor) and to compile (XLA)."""
  best = (float("inf"), float("inf"))
  for _ in range(rounds):
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(*state, x, y)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    best = (min(best[0], t1 - t0), min(best[1], t2 - t1))
  return best


def step_ms(fns, reps, rounds):
  """Best-of-rounds median milliseconds of each jitted step, the steps alternating call by call."""
  best = [float("inf")] * len(fns)
  for _ in range(rounds):
    times = [[] for _ in fns]
    for _ in range(reps):
      for i, f in enumerate(fns):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times[i].append(time.perf_counter() - t)
    best = [min(b, float(np.median(t)) * 1e3) for b, t in zip(best, times)]
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--models", nargs="+", default=["mlp", "block"], choices=["mlp", "block"])
  args = parser.parse_args(argv)
  opt = optax.adam(1e-3)
  print(
    f"{'model':6}  {'float ms':>9}  {'qm ms':>8}  {'hand ms':>8}  {'qm/hand':>7}  "
    f"{'trace+compile s: float':>22}  {'qm':>11}  {'hand':>11}  {'qm/float':>8}  {'qm/hand':>7}"
  )
  results = {}
  for name in args.models:
    cls, x, y, loss_fn = setup(name)
    variants = {k: variant(cls, k, x, loss_fn, opt) for k in ("float", "quantize_model", "hand")}
    compiled = {k: compile_seconds(step, state, x, y, args.rounds) for k, (step, state) in variants.items()}
    jitted = {k: (jax.jit(step), state) for k, (step, state) in variants.items()}
    fns = [lambda f=f, s=s, x=x, y=y: f(*s, x, y)[-1] for f, s in jitted.values()]
    for f in fns:
      jax.block_until_ready(f())  # compile outside the timing
    ms = dict(zip(jitted, step_ms(fns, args.reps, args.rounds)))
    total = {k: sum(v) for k, v in compiled.items()}
    r = {
      "step_ms": ms,
      "trace_s": {k: v[0] for k, v in compiled.items()},
      "compile_s": {k: v[1] for k, v in compiled.items()},
      "step_qm_over_hand": ms["quantize_model"] / ms["hand"],
      "compile_qm_over_float": total["quantize_model"] / total["float"],
      "compile_qm_over_hand": total["quantize_model"] / total["hand"],
    }
    results[name] = r

    def fmt(k, compiled=compiled):
      return f"{compiled[k][0]:.2f}+{compiled[k][1]:.2f}"

    print(
      f"{name:6}  {ms['float']:9.1f}  {ms['quantize_model']:8.1f}  {ms['hand']:8.1f}  {r['step_qm_over_hand']:7.3f}  "
      f"{fmt('float'):>22}  {fmt('quantize_model'):>11}  {fmt('hand'):>11}  {r['compile_qm_over_float']:8.2f}  "
      f"{r['compile_qm_over_hand']:7.2f}"
    )
  return results


if __name__ == "__main__":
  main()

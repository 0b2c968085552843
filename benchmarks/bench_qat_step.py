"""QAT train step vs float train step: a plain-JAX MLP 784-1024-1024-10 at batch 256.

Run: ``python benchmarks/bench_qat_step.py [--reps 15] [--batch 256]``.

Both steps are jitted ``loss -> grad -> optax.adam update``. The float step uses
``lax.dot_general``; the QAT step uses ``jqat.qat_dot_general`` with weights
int8 symmetric per channel (qparams from the weight) and activations int8
asymmetric per tensor (qparams from the batch), so its forward runs int8 dots
with int32 accumulation and its backward the clipped straight-through float
dots. Prints the median step times and their ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jqat

MATMUL = (((1,), (0,)), ((), ()))
SIZES = (784, 1024, 1024, 10)
XCFG = jqat.QatConfig(symmetric=False)
WCFG = jqat.QatConfig(per_channel=True)


def init(key):
  params = []
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    k = jax.random.fold_in(key, i)
    params.append({"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros((b,))})
  return params


def float_dot(x, w):
  return lax.dot_general(x, w, MATMUL)


def qat_dot(x, w):
  xqp = jax.lax.stop_gradient(jqat.qparams_from_array(x, XCFG))
  wqp = jax.lax.stop_gradient(jqat.qparams_from_array(w, WCFG))
  return jqat.qat_dot_general(x, w, MATMUL, xqp, wqp, lhs_config=XCFG, rhs_config=WCFG)


def make_step(dot, opt):
  def loss_fn(params, x, y):
    h = x
    for i, p in enumerate(params):
      h = dot(h, p["w"]) + p["b"]
      if i < len(params) - 1:
        h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def median_ms(step, params, opt_state, x, y, reps: int) -> float:
  for _ in range(3):
    params, opt_state, loss = step(params, opt_state, x, y)
  jax.block_until_ready(loss)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready((params, loss))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=3, help="alternate the two steps this many times")
  args = parser.parse_args()
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(jax.random.fold_in(key, 100), (args.batch, SIZES[0]))
  y = jax.random.randint(jax.random.fold_in(key, 101), (args.batch,), 0, SIZES[-1])
  opt = optax.adam(1e-3)
  params = init(key)
  opt_state = opt.init(params)
  steps = {"float": make_step(float_dot, opt), "qat": make_step(qat_dot, opt)}
  times = {name: [] for name in steps}
  # Alternating rounds, so that load from other processes hits both alike.
  for _ in range(args.rounds):
    for name, step in steps.items():
      times[name].append(median_ms(step, params, opt_state, x, y, args.reps))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, MLP {SIZES}, batch {args.batch}")
  best = {name: min(t) for name, t in times.items()}
  for name, t in times.items():
    print(f"  {name:<5} step: {best[name]:8.3f} ms (best of {args.rounds} medians; all {[round(v, 3) for v in t]})")
  print(f"  qat / float = {best['qat'] / best['float']:.2f}x")


if __name__ == "__main__":
  main()

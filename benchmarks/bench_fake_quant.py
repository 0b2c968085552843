"""fake_quant against the memory-bound floor ``x * 2.0``, forward and forward + STE backward.

Both sides read and write the same number of bytes, so the ratio says how far fake_quant is from the memory
bandwidth limit. Each figure is the median of ``--repeats`` jitted calls after one warm-up call.

Usage:
  python benchmarks/bench_fake_quant.py [--elements 16777216] [--repeats 21]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jqat


def median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--elements", type=int, default=16 * 1024 * 1024)
  parser.add_argument("--repeats", type=int, default=21)
  args = parser.parse_args()
  if args.repeats < 15:
    parser.error("--repeats must be at least 15")

  cols = 4096
  rows = args.elements // cols
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)

  floor_fwd = jax.jit(lambda x: x * 2.0)

  def floor_fwd_bwd(x, g):
    y, vjp = jax.vjp(lambda x: x * 2.0, x)
    return y, vjp(g)[0]

  floor_fwd_bwd = jax.jit(floor_fwd_bwd)
  t_floor = median_seconds(floor_fwd, x, repeats=args.repeats)
  t_floor_bwd = median_seconds(floor_fwd_bwd, x, g, repeats=args.repeats)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {x.size:,} float32 elements ({x.shape})")
  print(f"floor x * 2.0:          forward {t_floor * 1e3:8.2f} ms   forward+backward {t_floor_bwd * 1e3:8.2f} ms")
  print(f"{'case':<24}{'forward ms':>12}{'ratio':>8}{'fwd+bwd ms':>14}{'ratio':>8}")

  cases = {
    "int8 per-tensor": jqat.QatConfig(bits="int8"),
    "int8 per-channel": jqat.QatConfig(bits="int8", per_channel=True),
    "int8 asym per-tensor": jqat.QatConfig(bits="int8", symmetric=False),
    "int4 per-channel": jqat.QatConfig(bits="int4", per_channel=True),
    "fp8_e4m3 per-tensor": jqat.QatConfig(bits="fp8_e4m3"),
  }
  for name, cfg in cases.items():
    qp = jqat.qparams_from_array(x * 0.8, cfg)  # some values clip, as in training

    fwd = jax.jit(lambda x, qp, cfg=cfg: jqat.fake_quant(x, qp, cfg))

    def fwd_bwd(x, qp, g, cfg=cfg):
      y, vjp = jax.vjp(lambda x: jqat.fake_quant(x, qp, cfg), x)
      return y, vjp(g)[0]

    fwd_bwd = jax.jit(fwd_bwd)
    t = median_seconds(fwd, x, qp, repeats=args.repeats)
    tb = median_seconds(fwd_bwd, x, qp, g, repeats=args.repeats)
    print(f"{name:<24}{t * 1e3:12.2f}{t / t_floor:8.2f}{tb * 1e3:14.2f}{tb / t_floor_bwd:8.2f}")


if __name__ == "__main__":
  main()

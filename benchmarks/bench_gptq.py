"""GPTQ speed and error: jqat.gptq against Qwix's ``gptq_core.quantize_weight`` on the same kernel and Hessian.

For each size K: a K x K kernel, int4 symmetric with groups of 128 along the inputs (one scale per output column per
group); inputs X of 2K rows with correlated features and uneven channel scales; H = XᵀX from
``jqat.moments_update``. Reported per library:

* first call: compile + run, wall time of the first call in this process;
* steady: median of ``--repeats`` further calls (``block_until_ready``);
* error: ‖XW − XŴ‖_F / ‖XW‖_F, and round to nearest's for reference.

Also jqat's compile time alone (``jit(...).lower(...).compile()``). Qwix's loop is a Python loop over columns that
XLA sees unrolled, so its compile time grows with K; it is run only for K <= ``--qwix-max-k`` (default 1024).
Qwix runs when it can be imported (the ``bench`` extra); otherwise its columns say "skipped".

The grids differ: jqat's symmetric int4 is ``amax / 7`` on [-7, 7] (DESIGN.md, as torch.ao and NVIDIA's tools),
Qwix's ``amax / 7.5`` clipped to [-8, 7], half a level more, so about 6% less rounding error whatever the
algorithm. Qwix is therefore run twice: on its own grid, and on jqat's (``calibration_method="absmax,<7.5/7>"``)
to compare the algorithms alone. (Qwix's GPTQ supports symmetric grids only.)

Run: ``python benchmarks/bench_gptq.py [--sizes 256 1024 4096] [--repeats 3] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jqat
from jqat._src.ptq import gptq as gptq_lib

GROUP = 128


def layer(k: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  rows = 2 * k
  mix = np.eye(k) + 0.3 * rng.normal(size=(k, k)) / np.sqrt(k)
  x = (rng.normal(size=(rows, k)) @ mix * np.exp(0.5 * rng.normal(size=k))).astype(np.float32)
  w = (rng.normal(size=(k, k)) / np.sqrt(k)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


@jax.jit
def rel_error(x, w, w_hat):
  y = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
  d = y - jnp.matmul(x, w_hat, precision=jax.lax.Precision.HIGHEST)
  return jnp.linalg.norm(d) / jnp.linalg.norm(y)


def timed(fn):
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t


def bench_jqat(x, w, h, cfg, repeats):
  k = w.shape[0]
  run = lambda: jqat.dequantize(jqat.gptq(w, h, cfg))  # noqa: E731
  w_hat, first = timed(run)
  steady = statistics.median(timed(run)[1] for _ in range(repeats))
  jax.clear_caches()  # or the compilation below is a cache hit
  t = time.perf_counter()
  gptq_lib._gptq.lower(w, h, 0.01, config=cfg, block_size=128, act_order=False).compile()
  compile_s = time.perf_counter() - t
  return {"k": k, "first_s": first, "steady_s": steady, "compile_s": compile_s, "error": float(rel_error(x, w, w_hat))}


def bench_qwix(x, w, h, same_grid, repeats):
  from qwix._src.core import qarray
  from qwix.contrib import gptq_core

  # Qwix's symmetric int4 scale is absmax / 7.5; absmax scaled by 7.5 / 7 gives jqat's absmax / 7.
  method = f"absmax,{7.5 / 7!r}" if same_grid else "absmax"
  how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(0,), tiled_axes={1: GROUP}, calibration_method=method)
  fn = jax.jit(functools.partial(gptq_core.quantize_weight, how=how, blocksize=128, percdamp=0.01))
  wt = w.T  # Qwix's layout: (out, in)
  run = lambda: qarray.dequantize(fn(wt, h)[0]).T  # noqa: E731
  w_hat, first = timed(run)
  steady = statistics.median(timed(run)[1] for _ in range(repeats))
  return {"first_s": first, "steady_s": steady, "error": float(rel_error(x, w, w_hat))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--qwix-max-k", type=int, default=1024)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  try:
    import qwix

    qwix_version = getattr(qwix, "__version__", "installed")
  except ImportError:
    qwix_version = None
  print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
        f"qwix {qwix_version or 'not installed'}")  # fmt: skip
  print("| K | jqat first call (s) | jqat compile (s) | jqat steady (s) | jqat error | RTN error "
        "| Qwix first call (s) | Qwix steady (s) | Qwix error | Qwix on jqat's grid: first call (s) | error "
        "| Qwix / jqat first call | jqat / Qwix error, same grid | jqat / Qwix error, own grids |")  # fmt: skip
  print("|" + "---|" * 14)
  results = []
  cfg = jqat.QatConfig(bits="int4", per_channel=True, group_size=GROUP)
  for k in args.sizes:
    x, w = layer(k)
    h = jqat.moments_update(jqat.moments_init(k), x).xtx
    r = bench_jqat(x, w, h, cfg, args.repeats)
    rtn = jqat.dequantize(jqat.quantize(w, jqat.qparams_from_array(w, cfg), cfg))
    r["rtn_error"] = float(rel_error(x, w, rtn))
    cols = [f"{r['first_s']:.2f}", f"{r['compile_s']:.2f}", f"{r['steady_s']:.3f}", f"{r['error']:.5f}",
            f"{r['rtn_error']:.5f}"]  # fmt: skip
    if qwix_version and k <= args.qwix_max_k:
      r["qwix_own_grid"] = own = bench_qwix(x, w, h, False, args.repeats)
      r["qwix_same_grid"] = same = bench_qwix(x, w, h, True, args.repeats)
      cols += [f"{own['first_s']:.2f}", f"{own['steady_s']:.3f}", f"{own['error']:.5f}", f"{same['first_s']:.2f}",
               f"{same['error']:.5f}", f"{same['first_s'] / r['first_s']:.1f}x",
               f"{r['error'] / same['error']:.4f}", f"{r['error'] / own['error']:.4f}"]  # fmt: skip
    else:
      cols += ["skipped"] * 5 + ["-"] * 3
    results.append(r)
    print(f"| {k} | " + " | ".join(cols) + " |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "jax": jax.__version__, "qwix": qwix_version}, f, indent=1)


if __name__ == "__main__":
  main()

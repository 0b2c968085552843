"""Serving matmul: float32 vs the raw int8 dot vs jqat w8a8 and weight-only int8.

Run: ``python benchmarks/bench_serving.py [--reps 15] [--rounds 5] [--shapes 8x4096x4096,...] [--only w-only,...]
[--parts] [--nan-check]``.

For each (M, K, N) it times, as jitted functions (median of ``reps`` calls
after warm-up, each ``block_until_ready``):

* ``float``: ``x @ w`` in float32;
* ``raw int8``: ``lax.dot_general(int8, int8, preferred_element_type=int32)``;
* ``w8a8 dyn``: float activations quantized in the same jitted function (int8,
  symmetric, per tensor, range from the batch), weights int8 symmetric per
  channel, ``jqat.int_matmul``;
* ``w8a8 frozen``: activations asymmetric with frozen (calibrated) qparams,
  prepared weight sums (``jqat.weight_sums``);
* ``w8a8 int-in``: activations already int8 (the previous layer's output):
  ``int_matmul`` on QTensors alone, comparable with the raw int8 dot;
* ``w8a8 flax``: a converted ``jqat.linen.QatDense`` (default configs: int8
  per-channel kernel, asymmetric int8 activations with the frozen range)
  applied to float activations: the serving path of a Flax model, with its
  NaN / Inf row mark;
* ``w8a8 floor``: the least XLA program for float activations: the frozen
  quantize (no NaN / Inf check), the int8 dot and one rescale, written out by
  hand; what any w8a8 with float inputs can reach on this backend;
* ``w-only``: float activations, int8 weights, ``jqat.weight_only_matmul``
  (``k_block="auto"``: one dot for a weight of up to 2^21 values, else blocks
  of about 8 MiB of float32; ``kb128`` / ``kb1024`` other block sizes;
  ``w-only 1dot``: one dot with the whole weight converted; ``w-only bf16``:
  ``compute_dtype=bfloat16``, activations rounded to bfloat16);
* ``w4-only`` (and ``bf16``): the same with int4 weights, converted from the
  packed bytes block by block.

Every variant runs once per round, the order alternating between rounds, and
each figure is the best of the ``--rounds`` medians.

It prints times, ratios to float and to the raw int8 dot, the number of
fusions in each compiled program's entry computation (every fusion but the
dot's is a pass over an operand or the output), and the bytes of the serving
variables (int8 values, scales, weight sums) against float32.

``--parts``: instead, each pass of w8a8 with float inputs as its own jitted
function, interleaved with the raw int8 dot: the activation range (min / max
of the finite values, as ``qparams_from_array``; and a plain min / max), the
NaN / Inf mark ``Σ (x - x)``, the quantize, the rescale; and their sums for the
dynamic and the frozen path, as ratios to the raw int8 dot.

``--profile DIR``: instead, the w8a8 variants under ``jax.profiler.trace``
(written to DIR): the median duration of every compiled op over ``reps``
calls, the dot's and the sum of the others (the passes around the dot), so
that the cost of each pass is read per op, not from wall times that other
load on the machine moves (the two threads' events overlap, so the sum is an
upper bound of the wall time they add), and their sum as a fraction of the
same program's dot.

``--nan-check``: instead, ``w8a8 dyn`` and ``w8a8 frozen`` as they are against
the same functions traced with ``quantize``'s NaN / Inf check
(``qtensor._nonfinite_scale``) replaced by a no-op, alternating over
``--rounds`` rounds (best median wall time, and median process CPU time, the
figure to read on a loaded machine), to measure what the check costs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import resource
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jqat
from jqat import linen as qnn
from jqat._src import qtensor

MATMUL = (((1,), (0,)), ((), ()))
SHAPES = ((8, 4096, 4096), (256, 1024, 1024), (2048, 512, 512))


def median_ms(f, *args, reps: int) -> float:
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def interleaved(variants: dict, reps: int, rounds: int) -> dict:
  """Best of ``rounds`` medians per ``name: (f, *args)``; every variant compiled first, the order flipping every round.

  The alternating order makes load from other processes hit every variant alike.
  """
  for f, *args in variants.values():
    jax.block_until_ready(f(*args))
  best = {name: float("inf") for name in variants}
  names = list(variants)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      f, *args = variants[name]
      best[name] = min(best[name], median_ms(f, *args, reps=reps))
  return best


def nbytes(tree) -> int:
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def fusion_count(f, *args) -> int:
  """Fusions in the entry computation of ``f``'s compiled program (the dot's library fusion among them)."""
  text = f.lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY") :]
  return sum(" fusion(" in line for line in entry.splitlines())


def flax_serving(x: jax.Array, w: jax.Array):
  """``(apply, served variables)`` of a converted ``QatDense`` holding ``w``, its range frozen from ``x``."""
  model = qnn.QatDense(w.shape[1], use_bias=False)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  variables = {**variables, "params": {"kernel": w}}
  _, stats = model.apply(variables, x, mutable=["quant_stats"])
  return jax.jit(model.apply), qnn.convert(model, {**variables, **stats}, x)


def w8a8_floor(x, xqp, wp):
  """Frozen asymmetric quantize, int8 dot, one rescale: no NaN / Inf mark, nothing else."""
  inv = 1 / xqp.scale
  q = jnp.clip(jnp.round(x * inv) + xqp.zero_point, -128, 127).astype(jnp.int8)
  acc = lax.dot_general(q, wp.values, MATMUL, preferred_element_type=jnp.int32)
  acc = acc - xqp.zero_point.astype(jnp.int32) * wp.sums
  return acc.astype(jnp.float32) * (xqp.scale * wp.scale)


def bench_shape(m: int, k: int, n: int, reps: int, rounds: int = 1, only=()) -> None:
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  xcfg_dyn = jqat.QatConfig()
  xcfg = jqat.QatConfig(symmetric=False)
  wcfg = jqat.QatConfig(per_channel=True)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
  wp = jqat.with_weight_sums(wq)  # the weight with its column sums, prepared once
  sums = wp.sums
  xqp = jqat.qparams_from_array(x, xcfg)  # frozen: as calibration would leave them
  xq = jqat.quantize(x, xqp, xcfg)
  xi, wi = xq.values, wq.values

  def w8a8_dynamic(x, wq):
    qp = jqat.qparams_from_array(x, xcfg_dyn)
    return jqat.int_matmul(jqat.quantize(x, qp, xcfg_dyn), wq)

  def w8a8_frozen(x, xqp, wp):
    return jqat.int_matmul(jqat.quantize(x, xqp, xcfg), wp)

  w4cfg = jqat.QatConfig(bits="int4", per_channel=True)
  w4q = jqat.quantize(w, jqat.qparams_from_array(w, w4cfg), w4cfg)
  bf16 = jnp.bfloat16
  variants = {
    "float": (jax.jit(lambda a, b: a @ b), x, w),
    "raw int8": (jax.jit(lambda a, b: lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.int32)), xi, wi),
    "w8a8 dyn": (jax.jit(w8a8_dynamic), x, wq),
    "w8a8 frozen": (jax.jit(w8a8_frozen), x, xqp, wp),
    "w8a8 int-in": (jax.jit(jqat.int_matmul), xq, wp),
    "w8a8 flax": (*flax_serving(x, w), x),
    "w8a8 floor": (jax.jit(w8a8_floor), x, xqp, wp),
    "w-only": (jax.jit(jqat.weight_only_matmul), x, wq),
    "w-only 1dot": (jax.jit(lambda a, b: jqat.weight_only_matmul(a, b, k_block=None)), x, wq),
    "w-only kb128": (jax.jit(lambda a, b: jqat.weight_only_matmul(a, b, k_block=128)), x, wq),
    "w-only kb1024": (jax.jit(lambda a, b: jqat.weight_only_matmul(a, b, k_block=1024)), x, wq),
    "w-only bf16": (jax.jit(lambda a, b: jqat.weight_only_matmul(a, b, compute_dtype=bf16)), x, wq),
    "w4-only": (jax.jit(jqat.weight_only_matmul), x, w4q),
    "w4-only bf16": (jax.jit(lambda a, b: jqat.weight_only_matmul(a, b, compute_dtype=bf16)), x, w4q),
  }
  if only:
    variants = {name: v for name, v in variants.items() if name in only or name in ("float", "raw int8")}
  times = interleaved(variants, reps, rounds)
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  print(f"(M, K, N) = ({m}, {k}, {n})")
  print(f"  {'variant':<13} {'ms':>8} {'/float':>7} {'/raw int8':>9} {'fusions':>7}  max |err| vs float64")
  for name, t in times.items():
    f, *args = variants[name]
    out = np.asarray(f(*args), np.float64)
    err = "" if name == "raw int8" else f"{np.max(np.abs(out - ref)):.2e}"
    if name.startswith("w4"):
      err += " (int4)"
    fusions = fusion_count(f, *args)
    print(f"  {name:<13} {t:8.3f} {t / times['float']:7.2f} {t / times['raw int8']:9.2f} {fusions:7d}  {err}")
  float_bytes = nbytes(w)
  serve_bytes = nbytes((wq, sums))
  print(
    f"  serving variables: {serve_bytes:,} B (int8 values + scales + sums) vs float32 {float_bytes:,} B "
    f"= {serve_bytes / float_bytes:.3f}x"
  )


def cpu_ms(f, *args, reps: int) -> float:
  """Process CPU time (user + system) per call, less sensitive than wall time to other load."""
  jax.block_until_ready(f(*args))
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(reps):
    jax.block_until_ready(f(*args))
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / reps * 1e3


def nan_check_cost(m: int, k: int, n: int, reps: int, rounds: int) -> None:
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  xcfg_dyn, xcfg, wcfg = jqat.QatConfig(), jqat.QatConfig(symmetric=False), jqat.QatConfig(per_channel=True)
  wp = jqat.with_weight_sums(jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg))
  xqp = jqat.qparams_from_array(x, xcfg)

  def dynamic(x, wp):
    return jqat.int_matmul(jqat.quantize(x, jqat.qparams_from_array(x, xcfg_dyn), xcfg_dyn), wp)

  def frozen(x, xqp, wp):
    return jqat.int_matmul(jqat.quantize(x, xqp, xcfg), wp)

  cases = {"w8a8 dyn": (dynamic, (x, wp)), "w8a8 frozen": (frozen, (x, xqp, wp))}
  saved = qtensor._nonfinite_scale
  print(f"(M, K, N) = ({m}, {k}, {n})")
  for name, (f, args) in cases.items():
    checked = jax.jit(f)
    jax.block_until_ready(checked(*args))
    qtensor._nonfinite_scale = lambda scale, *a: scale
    try:
      unchecked = jax.jit(f)
      jax.block_until_ready(unchecked(*args))  # traced and compiled without the check
    finally:
      qtensor._nonfinite_scale = saved
    times = {"checked": [], "unchecked": []}
    cpu = {"checked": [], "unchecked": []}
    fns = {"checked": checked, "unchecked": unchecked}
    for i in range(rounds):
      for key in ("unchecked", "checked") if i % 2 == 0 else ("checked", "unchecked"):
        times[key].append(median_ms(fns[key], *args, reps=reps))
        cpu[key].append(cpu_ms(fns[key], *args, reps=reps))
    best = {key: min(t) for key, t in times.items()}
    cpu_med = {key: float(np.median(t)) for key, t in cpu.items()}
    print(
      f"  {name:<12} wall without / with {best['unchecked']:7.3f} / {best['checked']:7.3f} ms "
      f"{best['checked'] / best['unchecked']:.3f}x; CPU {cpu_med['unchecked']:7.3f} / {cpu_med['checked']:7.3f} ms "
      f"{cpu_med['checked'] / cpu_med['unchecked']:.3f}x"
    )


def parts(m: int, k: int, n: int, reps: int, rounds: int) -> None:
  """Each pass of w8a8 with float activations on its own, against the raw int8 dot."""
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  xcfg, wcfg = jqat.QatConfig(symmetric=False), jqat.QatConfig(per_channel=True)
  wp = jqat.with_weight_sums(jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg))
  xqp = jqat.qparams_from_array(x, xcfg)
  xi = jqat.quantize(x, xqp, xcfg).values
  acc = lax.dot_general(xi, wp.values, MATMUL, preferred_element_type=jnp.int32)

  def rescale(acc, xqp, wp):
    acc = acc - xqp.zero_point.astype(jnp.int32) * wp.sums
    return acc.astype(jnp.float32) * (xqp.scale * wp.scale)

  passes = {
    "raw int8 dot": (lambda a, b: lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.int32), xi, wp.values),
    "range, finite": (lambda x: jqat.array_range(x, xcfg), x),
    "range, plain": (lambda x: (jnp.min(x), jnp.max(x)), x),
    "NaN/Inf mark": (lambda x: jnp.sum(x - x), x),
    "quantize": (lambda x, qp: qtensor.quantize_finite(x, qp, xcfg).values, x, xqp),
    "rescale": (rescale, acc, xqp, wp),
  }
  times = interleaved({name: (jax.jit(f), *args) for name, (f, *args) in passes.items()}, reps, rounds)
  dot = times["raw int8 dot"]
  print(f"(M, K, N) = ({m}, {k}, {n})")
  for name, t in times.items():
    print(f"  {name:<16} {t:8.3f} ms {t / dot:6.3f}x the raw int8 dot")
  frozen = dot + times["NaN/Inf mark"] + times["quantize"] + times["rescale"]
  sums = {
    "dot + quantize + rescale": dot + times["quantize"] + times["rescale"],
    "frozen (+ mark)": frozen,
    "dynamic (+ finite range)": frozen + times["range, finite"],
  }
  for name, t in sums.items():
    print(f"  sum: {name:<26} {t:8.3f} ms {t / dot:6.3f}x")


def op_medians(f, *args, reps: int, trace_dir: str) -> dict[str, float]:
  """Median duration (microseconds) of each compiled op of ``f`` over ``reps`` traced calls."""
  for _ in range(3):
    jax.block_until_ready(f(*args))
  shutil.rmtree(trace_dir, ignore_errors=True)  # one trace to read
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(reps):
      jax.block_until_ready(f(*args))
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as fh:
    events = json.load(fh)["traceEvents"]
  durations = collections.defaultdict(list)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("end:") and ("fusion" in name or name.startswith(("dot", "wrapped"))):
      durations[name].append(e["dur"])
  return {name: float(np.median(d)) for name, d in durations.items() if len(d) >= reps}


def profile(m: int, k: int, n: int, reps: int, trace_dir: str) -> None:
  """The w8a8 variants' compiled ops, timed one by one in a profile."""
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  xcfg_dyn, xcfg, wcfg = jqat.QatConfig(), jqat.QatConfig(symmetric=False), jqat.QatConfig(per_channel=True)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
  wp = jqat.with_weight_sums(wq)
  xqp = jqat.qparams_from_array(x, xcfg)
  xq = jqat.quantize(x, xqp, xcfg)

  def dynamic(x, wq):
    return jqat.int_matmul(jqat.quantize(x, jqat.qparams_from_array(x, xcfg_dyn), xcfg_dyn), wq)

  def raw(a, b):
    return lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.int32)

  variants = {
    "raw int8": (jax.jit(raw), xq.values, wq.values),
    "w8a8 dyn": (jax.jit(dynamic), x, wq),
    "w8a8 frozen": (jax.jit(lambda x, qp, wp: jqat.int_matmul(jqat.quantize(x, qp, xcfg), wp)), x, xqp, wp),
    "w8a8 int-in": (jax.jit(jqat.int_matmul), xq, wp),
    "w8a8 flax": (*flax_serving(x, w), x),
    "w8a8 floor": (jax.jit(w8a8_floor), x, xqp, wp),
  }
  print(f"(M, K, N) = ({m}, {k}, {n}): median op durations in us over {reps} traced calls")
  for i, (name, (f, *args)) in enumerate(variants.items()):
    text = f.lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY") :].splitlines()
    dots = {line.split("=")[0].split("%")[-1].strip() for line in entry if f"= s32[{m},{n}]" in line}
    ops = op_medians(f, *args, reps=reps, trace_dir=os.path.join(trace_dir, f"{i}"))
    dot = sum(t for op, t in ops.items() if op in dots)
    rest = {op: t for op, t in ops.items() if op not in dots}
    listed = ", ".join(f"{op} {t:.0f}" for op, t in sorted(rest.items(), key=lambda kv: -kv[1]) if t >= 1)
    print(
      f"  {name:<12} dot {dot:7.0f}  others {sum(rest.values()):6.0f} ({sum(rest.values()) / dot:.3f}x its dot)"
      f"{': ' + listed if listed else ''}"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--shapes", type=str, default=None, help="comma-separated MxKxN")
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (best median of each variant)")
  parser.add_argument("--only", type=str, default="", help="comma-separated variants (float and raw int8 always run)")
  parser.add_argument("--nan-check", action="store_true", help="measure the cost of the NaN / Inf check")
  parser.add_argument("--parts", action="store_true", help="time each pass of w8a8 with float inputs on its own")
  parser.add_argument("--profile", type=str, default=None, help="trace directory: per-op times of the w8a8 variants")
  args = parser.parse_args()
  shapes = SHAPES
  if args.shapes:
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  for m, k, n in shapes:
    if args.nan_check:
      nan_check_cost(m, k, n, args.reps, args.rounds)
    elif args.parts:
      parts(m, k, n, args.reps, args.rounds)
    elif args.profile:
      profile(m, k, n, max(args.reps, 10), os.path.join(args.profile, f"{m}x{k}x{n}"))
    else:
      bench_shape(m, k, n, args.reps, args.rounds, tuple(v for v in args.only.split(",") if v))


if __name__ == "__main__":
  main()

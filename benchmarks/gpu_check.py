"""One short run on a GPU: bf16, int8 w8a8 and fp8 (e4m3) serving matmuls, the transformer block's QAT step, fp8 tests.

Run (about 5 minutes on one NVIDIA H200, well under 8)::

  python benchmarks/gpu_check.py --json gpu_check.json

``--smoke`` runs every section on tiny shapes with few repetitions and the fp8 tests of one file only, so that the
script itself can be checked on a CPU in seconds (``tests/test_gpu_check.py`` does).

Sections:

* ``serving``: at (M, K, N) = (8, 8192, 8192) and (4096, 8192, 8192), jitted, median of ``--reps`` calls after a
  warm-up, the variants alternating over ``--rounds`` rounds (best median of each):

  - ``bf16``: ``x @ w`` in bfloat16 (float32 accumulation, bfloat16 result);
  - ``raw int8``: ``lax.dot_general(int8, int8, preferred_element_type=int32)``, the floor for w8a8;
  - ``jqat w8a8``: bfloat16 activations quantized per tensor in the same function (int8, symmetric), the weight
    int8 per channel, ``jqat.int_matmul``;
  - ``raw fp8``: ``lax.dot_general(e4m3, e4m3, preferred_element_type=float32)``;
  - ``jqat fp8``: the same with fp8 e4m3 configs on both sides (activations scaled per tensor in the function).

* ``qat_step``: a pre-LN transformer block (d=512, 8 heads, MLP 2048, sequence 128, batch 16; as in
  ``bench_qat_step.py``), ``loss -> grad -> optax.adam`` jitted, in bfloat16 (``dtype=bfloat16``) with ``nn.Dense``
  against the same block with ``jqat.linen.QatDense`` / ``QatDotGeneral`` in int8 (default configs) and in fp8
  e4m3.

* ``pytest``: ``pytest -k fp8`` over ``tests/`` (the fp8 rounding through ``lax.reduce_precision`` is what XLA:GPU
  could otherwise simplify away); its exit status and summary line.

It prints one Markdown table per section, labelled with the device, and writes every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jqat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_qat_step  # noqa: E402  (the QAT step of the other benchmarks)
from bench_serving import interleaved  # noqa: E402

MATMUL = (((1,), (0,)), ((), ()))
SHAPES = ((8, 8192, 8192), (4096, 8192, 8192))
SMOKE_SHAPES = ((8, 128, 64),)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serving(shapes, reps: int, rounds: int) -> dict:
  bf16 = jnp.bfloat16
  a8 = jqat.QatConfig()  # int8, symmetric, per tensor: the range from the batch
  w8 = jqat.QatConfig(per_channel=True)
  a_fp8 = jqat.QatConfig(bits="fp8_e4m3")
  w_fp8 = jqat.QatConfig(bits="fp8_e4m3", per_channel=True)
  results = {}
  for m, k, n in shapes:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
    xb, wb = x.astype(bf16), w.astype(bf16)
    wq8 = jqat.quantize(w, jqat.qparams_from_array(w, w8), w8)
    wq_fp8 = jqat.quantize(w, jqat.qparams_from_array(w, w_fp8), w_fp8)
    xi = jqat.quantize(x, jqat.qparams_from_array(x, a8), a8).values
    xf8 = jqat.quantize(x, jqat.qparams_from_array(x, a_fp8), a_fp8).values

    def w8a8(x, wq):
      return jqat.int_matmul(jqat.quantize(x, jqat.qparams_from_array(x, a8), a8), wq, out_dtype=bf16)

    def fp8(x, wq):
      return jqat.int_matmul(jqat.quantize(x, jqat.qparams_from_array(x, a_fp8), a_fp8), wq, out_dtype=bf16)

    variants = {
      "bf16": (jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(bf16)), xb, wb),
      "raw int8": (
        jax.jit(lambda a, b: lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.int32)),
        xi,
        wq8.values,
      ),
      "jqat w8a8": (jax.jit(w8a8), xb, wq8),
      "raw fp8": (
        jax.jit(lambda a, b: lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.float32)),
        xf8,
        wq_fp8.values,
      ),
      "jqat fp8": (jax.jit(fp8), xb, wq_fp8),
    }
    best = interleaved(variants, reps, rounds)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    scale = float(np.sqrt(np.mean(ref**2)))
    errors = {}
    for name in ("bf16", "jqat w8a8", "jqat fp8"):
      f, *args = variants[name]
      out = np.asarray(jnp.asarray(f(*args), jnp.float32), np.float64)
      errors[name] = float(np.sqrt(np.mean((out - ref) ** 2)) / scale)  # relative RMS error against float64
    results[f"{m}x{k}x{n}"] = {
      "ms": best,
      "ratio_to_bf16": {name: t / best["bf16"] for name, t in best.items()},
      "ratio_to_raw_int8": {name: t / best["raw int8"] for name, t in best.items()},
      "relative_rms_error": errors,
    }
  return results


class Block(nn.Module):
  """Pre-LN transformer block; ``quant`` None (float), "int8" or "fp8"."""

  quant: str | None = None
  heads: int = 8
  dtype: jnp.dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    if self.quant is None:
      dense, dg = functools.partial(nn.Dense, dtype=self.dtype), None
    else:
      w_cfg, a_cfg = jqat.linen.QatDense.weight_config, jqat.linen.QatDense.activation_config  # the defaults
      if self.quant == "fp8":
        w_cfg, a_cfg = jqat.QatConfig(bits="fp8_e4m3", per_channel=True), jqat.QatConfig(bits="fp8_e4m3")
      dense = functools.partial(jqat.linen.QatDense, dtype=self.dtype, weight_config=w_cfg, activation_config=a_cfg)
      dg = functools.partial(jqat.linen.QatDotGeneral, rhs_config=w_cfg, lhs_config=a_cfg)
    d = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype)(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    attn = nn.MultiHeadDotProductAttention(
      num_heads=self.heads, dtype=self.dtype, qkv_dot_general_cls=dg, out_dot_general_cls=dg
    )
    x = x + attn(h, mask=mask)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    return x + dense(d)(nn.gelu(dense(4 * d)(h)))


def qat_steps(batch: int, seq: int, d: int, reps: int, rounds: int) -> dict:
  opt = optax.adam(1e-4)
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, seq, d), jnp.float32)
  y = jax.random.normal(jax.random.fold_in(key, 1), x.shape, jnp.float32)
  runs = {}
  for name, quant in (("bf16", None), ("jqat int8", "int8"), ("jqat fp8", "fp8")):
    model = Block(quant=quant, heads=max(1, d // 64))
    v = model.init(jax.random.key(1), x)
    params, stats = v["params"], v.get("quant_stats", {})

    step = bench_qat_step.make_step(model, lambda out, y: jnp.mean((out.astype(jnp.float32) - y) ** 2), opt)
    state = (params, stats, opt.init(params))
    runs[name] = (lambda s, x, y, step=step: step(*s, x, y)[3], state, x, y)
  best = interleaved(runs, reps, rounds)
  losses = {name: float(f(*args)) for name, (f, *args) in runs.items()}
  return {
    "shape": [batch, seq, d],
    "ms": best,
    "ratio_to_bf16": {name: t / best["bf16"] for name, t in best.items()},
    "first_loss": losses,
  }


def fp8_tests(smoke: bool, timeout: int, extra=()) -> dict:
  """``pytest -k fp8`` over ``tests/`` (smoke: over ``tests/test_numerics.py``), its exit code and summary line."""
  target = [os.path.join(REPO, "tests", "test_numerics.py")] if smoke else [os.path.join(REPO, "tests")]
  cmd = [sys.executable, "-m", "pytest", "-q", "-k", "fp8", "-p", "no:cacheprovider", *extra, *target]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    code, out = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    code, out = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
  lines = [line for line in out.strip().splitlines() if line.strip()]
  return {
    "command": " ".join(cmd[1:]),
    "exit_code": code,
    "summary": lines[-1] if lines else "",
    "seconds": time.perf_counter() - t0,
    "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:50],
  }


def table(header: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def markdown(results: dict) -> str:
  parts = [
    f"Device: {results['device']} ({results['backend']}); jax {results['versions']['jax']}, "
    f"jaxlib {results['versions']['jaxlib']}, flax {results['versions']['flax']}"
  ]
  if "serving" in results:
    names = ["bf16", "raw int8", "jqat w8a8", "raw fp8", "jqat fp8"]
    rows = []
    for shape, r in results["serving"].items():
      rows.append(
        [shape]
        + [f"{r['ms'][n]:.3f} ms ({r['ratio_to_bf16'][n]:.2f}x)" for n in names]
        + [f"{r['ratio_to_raw_int8']['jqat w8a8']:.2f}x"]
      )
    parts.append(
      "Serving matmul, best median (ratio to bf16)\n\n" + table(["(M, K, N)"] + names + ["w8a8 / raw int8"], rows)
    )
    err_rows = [
      [shape] + [f"{r['relative_rms_error'][n]:.2e}" for n in ("bf16", "jqat w8a8", "jqat fp8")]
      for shape, r in results["serving"].items()
    ]
    parts.append(
      "Relative RMS error against float64\n\n" + table(["(M, K, N)", "bf16", "jqat w8a8", "jqat fp8"], err_rows)
    )
  if "qat_step" in results:
    r = results["qat_step"]
    rows = [[n, f"{r['ms'][n]:.3f}", f"{r['ratio_to_bf16'][n]:.2f}x"] for n in r["ms"]]
    parts.append(
      f"QAT step, transformer block {tuple(r['shape'])} (batch, seq, d)\n\n"
      + table(["step", "ms", "ratio to bf16"], rows)
    )
  if "pytest" in results:
    p = results["pytest"]
    parts.append(f"`{p['command']}`: exit {p['exit_code']}, {p['summary']} ({p['seconds']:.0f} s)")
  return "\n\n".join(parts)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", "--quick", action="store_true", help="tiny shapes, few repetitions (CPU check)")
  parser.add_argument("--json", type=str, default="gpu_check.json", help="where to write the figures")
  parser.add_argument("--reps", type=int, default=None, help="calls per median (default 20; smoke 2)")
  parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; smoke 1)")
  parser.add_argument("--sections", type=str, default="serving,qat_step,pytest")
  parser.add_argument("--pytest-timeout", type=int, default=240)
  args = parser.parse_args(argv)
  reps = args.reps or (2 if args.smoke else 20)
  rounds = args.rounds or (1 if args.smoke else 3)
  sections = set(args.sections.split(","))
  dev = jax.devices()[0]
  results = {
    "device": getattr(dev, "device_kind", str(dev)),
    "backend": jax.default_backend(),
    "smoke": args.smoke,
    "host": platform.node(),
    "versions": {
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
      "flax": flax.__version__,
      "jqat": getattr(jqat, "__version__", ""),
    },
  }
  t0 = time.perf_counter()
  if "serving" in sections:
    results["serving"] = serving(SMOKE_SHAPES if args.smoke else SHAPES, reps, rounds)
  if "qat_step" in sections:
    results["qat_step"] = qat_steps(*((2, 16, 64) if args.smoke else (16, 128, 512)), reps, rounds)
  if "pytest" in sections:
    results["pytest"] = fp8_tests(args.smoke, args.pytest_timeout)
  results["seconds"] = time.perf_counter() - t0
  print(markdown(results))
  with open(args.json, "w") as f:
    json.dump(results, f, indent=2, default=str)
  print(f"\nwrote {args.json} ({results['seconds']:.0f} s)")
  return results


if __name__ == "__main__":
  main()

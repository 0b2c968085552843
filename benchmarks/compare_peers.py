"""jqat side by side with Qwix and AQT: QAT step, compile time, serving, quantization error, accuracy.

Run: ``python benchmarks/compare_peers.py [--quick] [--json PATH] [--sections qat_step,compile] [--rounds N]``
(the peers: ``pip install -e .[bench]``; a peer that is not installed is
reported as skipped).

All libraries run in one process and are interleaved round-robin (the order
rotates every round), so load from other processes hits them alike. Each time
is the median of ``reps`` jitted calls after warm-up; a figure is the best of
``rounds`` such medians.

* **QAT step**: ``loss -> grad -> optax.adam`` of the MLP and the transformer
  block of ``bench_qat_step.py``. float: ``nn.Dense``; jqat: ``QatDense`` and
  ``QatDotGeneral`` (weights int8 per channel, activations int8 per tensor,
  asymmetric by default; "sym. act.": symmetric; "per-token act.": symmetric
  per-token dynamic ranges, Qwix's activation scheme; both injected as
  ``dot_general_cls``);
  Qwix: ``qwix.quantize_model`` with a ``QtProvider`` rule for int8 weights
  and activations on every ``dot_general`` (activations: Qwix's default
  dynamic absmax scales); AQT: ``AqtDotGeneral`` with
  ``config.fully_quantized(fwd_bits=8, bwd_bits=None)`` injected as
  ``dot_general_cls`` into every ``Dense`` / ``DenseGeneral``. The attention
  score and value einsums stay in float everywhere.
* **Compile time**: ``jax.jit(step).lower(...).compile()`` of the same QAT
  steps (tracing included, JAX's caches cleared before each), for the MLP,
  the block and a stack of 12 blocks (``block12``) to show how it grows
  with depth.
* **Serving**: ``x @ w`` for the shapes of ``bench_serving.py``: float32, the
  raw ``int8 x int8 -> int32`` dot, jqat w8a8 (activations quantized in the
  call, per tensor; weights prepared per channel, ``int_matmul``) and
  weight-only (``weight_only_matmul``), Qwix w8a8 (``qwix.quantize`` of the
  activations per token in the call, ``qwix.dot_general`` on a prepared
  per-channel ``QArray``) and weight-only (``qwix.dot_general`` of float
  activations and the ``QArray``).
* **Quantization error**: ``||Q(x) Q(w) - x w||_F / ||x w||_F`` for
  ``x, w`` 512x512, ``x ~ N(0, 1)`` with input channel 7 scaled by 50;
  symmetric absmax (each library's default) per tensor, per channel
  (per token for ``x``, per output feature for ``w``) and per group of 32 /
  128 along the contraction (per channel on the other axis), int8 and int4.
* **Accuracy**: sklearn's digits, the MLP of ``bench_qat_step.py`` trained in
  float, then fine-tuned with each library's QAT (int8 / int4 weights, int8
  activations) with the same optimizer, steps, batches and seed; test
  accuracy of the quantized forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_qat_step  # noqa: E402
import bench_serving  # noqa: E402

import jqat  # noqa: E402

LIBS = ("jqat", "qwix", "aqt")
# The QAT step also times jqat with symmetric activations, the format the peers use.
QAT_LIBS = ("float", "jqat", "jqat-sym", "jqat-tok", "qwix", "aqt")
# Library -> (module to import, distribution whose version is reported).
PEERS = {"qwix": ("qwix", "qwix"), "aqt": ("aqt.jax.v2.flax.aqt_flax", "aqtp")}
MATMUL = (((1,), (0,)), ((), ()))
GRANULARITIES = ("tensor", "channel", "group32", "group128")
SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class Settings:
  reps: int
  rounds: int
  models: tuple[str, ...]
  shapes: tuple[tuple[int, int, int], ...]
  float_steps: int
  qat_steps: int
  accuracy_bits: tuple[int, ...]
  compile_models: tuple[str, ...] = ("mlp", "block", "block12")


SHAPES = bench_serving.SHAPES
QUICK = Settings(
  reps=15, rounds=2, models=("mlp",), shapes=SHAPES, float_steps=100, qat_steps=50, accuracy_bits=(8,),
  compile_models=("mlp",),
)  # fmt: skip
FULL = Settings(
  reps=15, rounds=3, models=("mlp", "block"), shapes=SHAPES, float_steps=400, qat_steps=200, accuracy_bits=(8, 4)
)
SECTIONS = ("qat_step", "compile", "serving", "quant_error", "accuracy")


# --- peers ------------------------------------------------------------------------


def peer_version(module: str, distribution: str | None = None) -> str | None:
  """The installed version of a peer library, or None when it cannot be imported."""
  try:
    importlib.import_module(module)
  except ImportError:
    return None
  try:
    return importlib.metadata.version(distribution or module.split(".")[0])
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def available_libs() -> dict[str, str | None]:
  """{library: version or None} for jqat and the peers."""
  versions = {"jqat": jqat.__version__}
  for name, (module, dist) in PEERS.items():
    versions[name] = peer_version(module, dist)
  return versions


def _qwix_int(bits: int):
  return jnp.int8 if bits == 8 else jnp.int4


def _aqt_config(lhs_bits: int, rhs_bits: int):
  from aqt.jax.v2 import config as aqt_config

  cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=None)
  if (lhs_bits, rhs_bits) != (8, 8):
    aqt_config.set_bits(cfg, lhs_bits, rhs_bits, None, None, None, None)
  return cfg


class WithDotGeneral:
  """A linen model whose ``Dense`` / ``DenseGeneral`` layers get a ``dot_general_cls`` injected.

  The layers are left as they are; a Flax method interceptor sets the field
  on each bound ``Dense`` / ``DenseGeneral`` before its ``__call__`` runs, as
  if the model had been written with ``nn.Dense(..., dot_general_cls=cls)``.
  """

  def __init__(self, model: nn.Module, dot_general_cls: Callable[[], nn.Module]):
    self.model = model
    self.dot_general_cls = dot_general_cls

  def _intercept(self, next_fun, args, kwargs, context):
    m = context.module
    if (
      context.method_name == "__call__"
      and isinstance(m, (nn.Dense, nn.DenseGeneral))
      and m.dot_general is None
      and m.dot_general_cls is None
    ):
      object.__setattr__(m, "dot_general_cls", self.dot_general_cls)
    return next_fun(*args, **kwargs)

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._intercept):
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._intercept):
      return self.model.apply(*args, **kwargs)


def qat_model(lib: str, model: nn.Module, weight_bits: int = 8):
  """``model`` (float layers) made quantization-aware by ``lib``: int8 activations, int``weight_bits`` weights.

  ``"jqat"`` uses jqat's default activation format (asymmetric, per tensor),
  ``"jqat-sym"`` symmetric per-tensor activations, ``"jqat-tok"`` symmetric
  per-token dynamic ones (the scheme of Qwix's default activation rule).
  """
  if lib == "float":
    return model
  if lib in ("jqat", "jqat-sym", "jqat-tok"):
    wcfg = jqat.QatConfig(bits=f"int{weight_bits}", per_channel=True)
    acfg = jqat.QatConfig(symmetric=lib != "jqat", per_channel=lib == "jqat-tok")
    return WithDotGeneral(model, functools.partial(jqat.linen.QatDotGeneral, lhs_config=acfg, rhs_config=wcfg))
  if lib == "qwix":
    import qwix

    rule = qwix.QtRule(
      module_path=".*", op_names=("dot_general",), weight_qtype=_qwix_int(weight_bits), act_qtype=jnp.int8
    )
    return qwix.quantize_model(model, qwix.QtProvider([rule]))
  if lib == "aqt":
    from aqt.jax.v2.flax import aqt_flax

    cfg = _aqt_config(8, weight_bits)
    # prng_name=None: the float backward needs no stochastic-rounding key.
    return WithDotGeneral(model, functools.partial(aqt_flax.AqtDotGeneral, cfg, prng_name=None))
  raise ValueError(f"unknown library {lib!r}")


# --- timing -------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
  """Best over ``rounds`` of each timing function's result, the functions run round-robin."""
  names = list(fns)
  times = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    for n in order:
      times[n].append(fns[n]())
  return {n: min(t) for n, t in times.items()}


def ratio_row(best: dict[str, float], baseline: str) -> dict[str, dict[str, float]]:
  """``{name: {"ms": t, "ratio": t / best[baseline]}}``: every timing against the baseline of the same run."""
  base = best[baseline]
  if not base > 0:
    raise ValueError(f"the baseline {baseline!r} took {base} ms; a ratio needs a positive time")
  return {name: {"ms": t, "ratio": t / base} for name, t in best.items()}


def _loss(name: str):
  if name == "mlp":
    return lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  return lambda out, y: jnp.mean((out - y) ** 2)


def qat_steps(name: str, versions: dict, opt) -> tuple[dict, jax.Array, jax.Array]:
  """{library: (jitted step, state)} for model ``name``, and its batch ``(x, y)``; peers not installed left out.

  float: the stock model; jqat: the model written with jqat's layers
  (``bench_qat_step.setup``); the peers: ``qat_model`` of the stock model.
  """
  float_model = bench_qat_step.float_model(name)
  _, _, x, y = bench_qat_step.setup(name, False, opt)
  steps = {}
  for lib in QAT_LIBS:
    if versions.get(lib, "installed") is None:
      continue
    if lib == "jqat":
      step, state, _, _ = bench_qat_step.setup(name, True, opt)
    else:
      model = qat_model(lib, float_model)
      v = jax.jit(model.init)(jax.random.key(1), x)
      params, stats = v["params"], v.get("quant_stats", {})
      step, state = bench_qat_step.make_step(model, _loss(name), opt), (params, stats, opt.init(params))
    steps[lib] = (step, state)
  return steps, x, y


def bench_qat_steps(settings: Settings, versions: dict) -> dict:
  opt = optax.adam(1e-4)
  results = {}
  for name in settings.models:
    steps, x, y = qat_steps(name, versions, opt)
    runs = {
      lib: functools.partial(bench_qat_step.median_ms, step, state, x, y, settings.reps)
      for lib, (step, state) in steps.items()
    }
    timed = ratio_row(interleaved(runs, settings.rounds), "float")
    results[name] = {lib: timed.get(lib, SKIPPED) for lib in QAT_LIBS}
  return results


def compile_ms(step, state, x, y) -> float:
  """Milliseconds of ``jax.jit(step).lower(...).compile()``, tracing included, with JAX's caches cleared first."""
  jax.clear_caches()
  t0 = time.perf_counter()
  jax.jit(step).lower(*state, x, y).compile()
  return (time.perf_counter() - t0) * 1e3


def bench_compile(settings: Settings, versions: dict) -> dict:
  """Compile time of each library's QAT step, ``{model: ratio_row}`` against float, best of ``rounds``."""
  opt = optax.adam(1e-4)
  results = {}
  for name in settings.compile_models:
    steps, x, y = qat_steps(name, versions, opt)
    runs = {lib: functools.partial(compile_ms, step, state, x, y) for lib, (step, state) in steps.items()}
    timed = ratio_row(interleaved(runs, settings.rounds), "float")
    results[name] = {lib: timed.get(lib, SKIPPED) for lib in QAT_LIBS}
  return results


def bench_serving_shapes(settings: Settings, versions: dict) -> dict:
  results = {}
  for m, k, n in settings.shapes:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
    wcfg = jqat.QatConfig(per_channel=True)
    xcfg = jqat.QatConfig()
    wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
    xi = jqat.quantize(x, jqat.qparams_from_array(x, xcfg), xcfg).values
    wi = wq.values

    def jqat_w8a8(x, wq, xcfg=xcfg):
      return jqat.int_matmul(jqat.quantize(x, jqat.qparams_from_array(x, xcfg), xcfg), wq)

    variants = {
      "float32": (jax.jit(lambda a, b: a @ b), x, w),
      "raw int8 dot": (jax.jit(lambda a, b: lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.int32)), xi, wi),
      "jqat w8a8": (jax.jit(jqat_w8a8), x, wq),
      "jqat weight-only": (jax.jit(jqat.weight_only_matmul), x, wq),
    }
    if versions.get("qwix"):
      import qwix

      qw = qwix.quantize(w, jnp.int8, channelwise_axes=(1,))

      def qwix_w8a8(x, qw):
        return qwix.dot_general(qwix.quantize(x, jnp.int8, channelwise_axes=(0,)), qw, MATMUL)

      variants["qwix w8a8"] = (jax.jit(qwix_w8a8), x, qw)
      variants["qwix weight-only"] = (jax.jit(lambda a, b: qwix.dot_general(a, b, MATMUL)), x, qw)
    runs = {
      name: functools.partial(bench_serving.median_ms, f, *args, reps=settings.reps)
      for name, (f, *args) in variants.items()
    }
    row = ratio_row(interleaved(runs, settings.rounds), "float32")
    if not versions.get("qwix"):
      row["qwix w8a8"] = row["qwix weight-only"] = SKIPPED
    results[f"{m}x{k}x{n}"] = row
  return results


# --- quantization error ---------------------------------------------------------------


def outlier_operands(m: int = 512, k: int = 512, n: int = 512, channel: int = 7, factor: float = 50.0):
  """``x ~ N(0, 1)`` of shape (m, k) with input channel ``channel`` scaled by ``factor``; ``w`` of shape (k, n)."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  x = x.at[:, channel].multiply(factor)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  return x, w


def relative_error(y, ref) -> float:
  """``||y - ref||_F / ||ref||_F`` in float64."""
  y = np.asarray(y, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _group(granularity: str) -> int | None:
  return int(granularity[5:]) if granularity.startswith("group") else None


def quantized_product(lib: str, x: jax.Array, w: jax.Array, bits: int, granularity: str):
  """``Q(x) Q(w)`` with ``lib``'s symmetric absmax quantization, or None where ``lib`` has no such mode.

  Granularity: ``"tensor"``, ``"channel"`` (rows of ``x``, columns of ``w``)
  or ``"groupN"`` (groups of N along the contraction, per channel on the other axis).
  """
  if granularity not in GRANULARITIES and _group(granularity) is None:
    raise ValueError(f"granularity={granularity!r}; allowed: {GRANULARITIES} or 'groupN'")
  group = _group(granularity)
  if lib == "jqat":
    b = f"int{bits}"
    if granularity == "tensor":
      xc, wc = jqat.QatConfig(bits=b), jqat.QatConfig(bits=b)
    elif group is None:
      xc = jqat.QatConfig(bits=b, per_channel=True, channel_axis=0)
      wc = jqat.QatConfig(bits=b, per_channel=True, channel_axis=1)
    else:
      xc = jqat.QatConfig(bits=b, per_channel=True, channel_axis=0, group_size=group, group_axis=1)
      wc = jqat.QatConfig(bits=b, per_channel=True, channel_axis=1, group_size=group, group_axis=0)
    xq = jqat.quantize(x, jqat.qparams_from_array(x, xc), xc)
    wq = jqat.quantize(w, jqat.qparams_from_array(w, wc), wc)
    return jqat.int_matmul(xq, wq)
  if lib == "qwix":
    import qwix

    qt = _qwix_int(bits)
    xa, wa = {}, {}
    if granularity != "tensor":
      xa, wa = {"channelwise_axes": (0,)}, {"channelwise_axes": (1,)}
    if group is not None:
      xa["tiled_axes"], wa["tiled_axes"] = {1: group}, {0: group}
    qx, qw = qwix.quantize(x, qt, **xa), qwix.quantize(w, qt, **wa)
    if bits == 8:
      return qwix.dot_general(qx, qw, MATMUL)
    # XLA:CPU has no int4 dot; the same numbers from the dequantized operands.
    return qwix.dequantize(qx) @ qwix.dequantize(qw)
  if lib == "aqt":
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2 import tiled_dot_general as tdg

    cfg = aqt_config.dot_general_make(lhs_bits=bits, rhs_bits=bits)
    if granularity == "tensor":
      cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
      cfg.fwd.dg_quantizer.rhs.calib_shared_axes = "per_tensor"
    if group is None:
      return cfg(x, w, MATMUL)
    tiling = tdg.Cfg(
      lhs=tdg.TensorTiling(contraction_axes=[tdg.AxisTiling(axis=1, tile_size=group)], remaining_axes=[]),
      rhs=tdg.TensorTiling(contraction_axes=[tdg.AxisTiling(axis=0, tile_size=group)], remaining_axes=[]),
    )
    return tdg.tiled_dot_general(tiling, x, w, MATMUL, dot_general=cfg)
  raise ValueError(f"unknown library {lib!r}")


def quant_errors(versions: dict, libs: Sequence[str] = LIBS, x=None, w=None, granularities=GRANULARITIES) -> dict:
  """{"int8": {granularity: {lib: relative error or "skipped"}}, "int4": ...}."""
  if x is None:
    x, w = outlier_operands()
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  results = {}
  for bits in (8, 4):
    rows = {}
    for gran in granularities:
      row = {}
      for lib in libs:
        if versions.get(lib) is None:
          row[lib] = SKIPPED
          continue
        try:
          y = jax.jit(quantized_product, static_argnums=(0, 3, 4))(lib, x, w, bits, gran)
        except NotImplementedError as e:
          row[lib] = f"{SKIPPED} ({e})"
          continue
        row[lib] = relative_error(y, ref)
      rows[gran] = row
    results[f"int{bits}"] = rows
  return results


# --- accuracy ----------------------------------------------------------------------------


def digits_data():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
  return xtr, xte, ytr.astype(np.int32), yte.astype(np.int32)


def _train(model, variables, data, steps: int, seed: int, lr: float = 1e-3, batch: int = 128):
  xtr, _, ytr, _ = data
  opt = optax.adam(lr)
  loss_fn = _loss("mlp")
  step = bench_qat_step.make_step(model, loss_fn, opt)
  params, stats = variables["params"], variables.get("quant_stats", {})
  opt_state = opt.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.choice(len(xtr), batch, replace=False)
    params, stats, opt_state, _ = step(params, stats, opt_state, xtr[idx], ytr[idx])
  return {"params": params, "quant_stats": stats}


def _accuracy(model, variables, data) -> float:
  _, xte, _, yte = data
  logits = jax.jit(model.apply)(variables, xte)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == yte))


def bench_accuracy(settings: Settings, versions: dict) -> dict:
  data = digits_data()
  float_model = bench_qat_step.Mlp()
  xs = jnp.asarray(data[0][:2])
  v = float_model.init(jax.random.key(0), xs)
  float_vars = _train(float_model, v, data, settings.float_steps, seed=0)
  results = {"float": _accuracy(float_model, {"params": float_vars["params"]}, data)}
  for bits in settings.accuracy_bits:
    row = {}
    for lib in LIBS:
      if versions.get(lib) is None:
        row[lib] = SKIPPED
        continue
      model = qat_model(lib, float_model, weight_bits=bits)
      init = model.init(jax.random.key(0), xs)
      start = {"params": float_vars["params"], "quant_stats": init.get("quant_stats", {})}
      trained = _train(model, start, data, settings.qat_steps, seed=1, lr=1e-4)
      row[lib] = _accuracy(model, trained, data)
    results[f"w{bits}a8"] = row
  return results


# --- report ---------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
  if isinstance(v, str):
    return v
  return format(v, spec)


def _best_marks(values: dict, lower_is_better: bool = True) -> dict:
  nums = {k: v for k, v in values.items() if not isinstance(v, str)}
  if not nums:
    return {}
  best = (min if lower_is_better else max)(nums.values())
  # Values equal to the printed precision tie.
  return {k: format(v, ".4e") == format(best, ".4e") for k, v in nums.items()}


_LABELS = {
  "mlp": "MLP 784-1024-1024-10, batch 256",
  "block": "transformer block d=512, 8 heads, seq 128, batch 16",
  "block12": "12 transformer blocks d=512, seq 128, batch 16",
}


def _qat_lib_rows(rows: dict, divisor: float, fmt: str) -> list[str]:
  """Markdown rows of a ``{model: ratio_row}`` section: float's time, then each library's time and ratio."""
  lines = []
  for name, row in rows.items():
    cells = [_fmt(row["float"]["ms"] / divisor, fmt)]
    for lib in QAT_LIBS[1:]:
      r = row.get(lib, SKIPPED)
      cells.append(r if isinstance(r, str) else f"{r['ms'] / divisor:{fmt}} ({r['ratio']:.2f}x)")
    lines.append(f"| {_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  return lines


def markdown(results: dict) -> str:
  """The README tables for ``results`` (as returned by ``run``); skipped peers show as "skipped"."""
  meta = results.get("meta", {})
  lines = []
  if meta:
    peers = ", ".join(f"{k} {v or SKIPPED + ' (not installed)'}" for k, v in meta.get("versions", {}).items())
    lines += [
      f"Machine: {meta.get('processor') or 'unknown CPU'}, {meta.get('cpu_count')} CPU(s), "
      f"{meta.get('backend')}; jax {meta.get('jax')}; {peers}.",
      f"Command: `{meta.get('command')}`" + (f" ({meta['wall_s']:.0f} s)" if "wall_s" in meta else ""),
      "",
    ]
  if "qat_step" in results:
    lines += [
      "**QAT train step** (ms, ratio to float; median of jitted calls, best of rounds)",
      "",
      "| model | float | jqat int8 | jqat int8, sym. act. | jqat int8, per-token act. | Qwix int8 | AQT int8 |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _qat_lib_rows(results["qat_step"], 1, ".1f")
    lines.append("")
  if "compile" in results:
    lines += [
      "**QAT step compile time** (`jax.jit(step).lower(...).compile()`, tracing included; s, ratio to float; "
      "best of rounds)",
      "",
      "| compiled step | float | jqat int8 | jqat int8, sym. act. | jqat int8, per-token act. | Qwix int8 | AQT int8 |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _qat_lib_rows(results["compile"], 1e3, ".2f")
    lines.append("")
  if "serving" in results:
    variants = [v for v in next(iter(results["serving"].values()))]
    lines += [
      "**Serving matmul** (ms, ratio to float32)",
      "",
      "| (M, K, N) | " + " | ".join(variants) + " |",
      "|---|" + "---:|" * len(variants),
    ]
    for shape, row in results["serving"].items():
      cells = [r if isinstance(r, str) else f"{r['ms']:.3f} ({r['ratio']:.2f}x)" for r in (row[v] for v in variants)]
      lines.append(f"| {shape.replace('x', ', ')} | " + " | ".join(cells) + " |")
    lines.append("")
  if "quant_error" in results:
    lines += [
      "**Quantization error** of a 512x512 @ 512x512 product, input channel 7 x50 "
      "(relative Frobenius error; best in bold)",
      "",
      "| format | granularity | " + " | ".join(LIBS) + " |",
      "|---|---|" + "---:|" * len(LIBS),
    ]
    for fmt, rows in results["quant_error"].items():
      for gran, row in rows.items():
        best = _best_marks(row)
        cells = []
        for lib in LIBS:
          v = row.get(lib, SKIPPED)
          s = _fmt(v, ".4e")
          cells.append(f"**{s}**" if best.get(lib) else s)
        lines.append(f"| {fmt} | {gran} | " + " | ".join(cells) + " |")
    lines.append("")
  if "accuracy" in results:
    acc = results["accuracy"]
    lines += [
      f"**Accuracy** on sklearn digits (test, 360 samples); float MLP: {acc['float']:.4f}",
      "",
      "| QAT | " + " | ".join(LIBS) + " |",
      "|---|" + "---:|" * len(LIBS),
    ]
    for key, row in acc.items():
      if key == "float":
        continue
      cells = [_fmt(row.get(lib, SKIPPED), ".4f") for lib in LIBS]
      lines.append(f"| {key} (int{key[1]} weights, int8 activations) | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def run(settings: Settings, sections: Sequence[str] = SECTIONS) -> dict:
  versions = available_libs()
  results = {
    "meta": {
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "flax": importlib.metadata.version("flax"),
      "versions": versions,
      "settings": dataclasses.asdict(settings),
    }
  }
  t0 = time.perf_counter()
  if "qat_step" in sections:
    results["qat_step"] = bench_qat_steps(settings, versions)
  if "compile" in sections:
    results["compile"] = bench_compile(settings, versions)
  if "serving" in sections:
    results["serving"] = bench_serving_shapes(settings, versions)
  if "quant_error" in sections:
    results["quant_error"] = quant_errors(versions)
  if "accuracy" in sections:
    results["accuracy"] = bench_accuracy(settings, versions)
  results["meta"]["wall_s"] = time.perf_counter() - t0
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="MLP step only, fewer rounds and steps, int8 accuracy only (about a minute)",
  )
  parser.add_argument("--json", type=str, default=None, help="write the results to this file")
  parser.add_argument(
    "--sections", type=str, default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS)
  )
  parser.add_argument("--rounds", type=int, default=None, help="rounds of every timing (default: 3, --quick 2)")
  parser.add_argument("--reps", type=int, default=None, help="calls per timed median (default 15)")
  args = parser.parse_args(argv)
  sections = tuple(args.sections.split(","))
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    parser.error(f"--sections: unknown {unknown}; allowed: {', '.join(SECTIONS)}")
  settings = QUICK if args.quick else FULL
  changes = {k: v for k, v in (("rounds", args.rounds), ("reps", args.reps)) if v is not None}
  settings = dataclasses.replace(settings, **changes)
  results = run(settings, sections)
  results["meta"]["command"] = "python benchmarks/compare_peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
  print(markdown(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()

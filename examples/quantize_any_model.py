"""Quantize a model you did not write: a plain Flax transformer, quantized by rules with ``jqat.linen.quantize_model``.

The model code below (``Block``, ``TransformerLM``) imports nothing from jqat. It is written as flax's own
examples write a language model: ``nn.Embed`` with tied logits (``embed.attend``), attention projections as
``nn.DenseGeneral``, the attention products as ``jnp.einsum``, an ``nn.Dense`` MLP, and ``nn.scan`` over the
layers (one compiled body for all of them, parameters stacked on a leading axis). The corpus is the Python
standard library's own source, read as bytes (as ``examples/char_lm.py`` does), so nothing is downloaded.

One run:

1. trains the float model (and, for comparison, the float model for as many more steps as QAT takes);
2. hands it, unchanged, to ``jqat.linen.quantize_model`` with rules that keep the tied embedding (the input
   table and the output head) float and quantize every other dot to int8 weights (per channel) and int8
   activations; the quantized model takes the float parameters as they are (same tree);
3. prints ``jqat.linen.report``: every matmul-like op, its rule, formats and bytes;
4. fine-tunes with quantization-aware training (QAT), calibrates the activation ranges (99.99th percentile),
   converts to serving variables (int8 kernels) and serves with the integer path;
5. prints the validation loss (nats per byte) at each stage and the bytes served.

Run: python examples/quantize_any_model.py [--steps N] [--qat-steps N] [--small] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jqat  # used below the model code only: the model itself knows nothing of jqat

# --- the model: plain Flax, as another library would write it (no jqat) ------------------------------------


class Block(nn.Module):
  """Pre-norm transformer block, written for ``nn.scan``: ``(carry, _) -> (carry, None)``."""

  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x, _):
    b, t, d = x.shape
    head = d // self.num_heads
    h = nn.LayerNorm()(x)
    q, k, v = (nn.DenseGeneral((self.num_heads, head), name=n)(h) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head).astype(np.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))
    p = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(o)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(4 * d, name="mlp_in")(h)))
    return x, None


class TransformerLM(nn.Module):
  """Decoder-only byte-level language model with tied input and output embeddings."""

  vocab: int
  d_model: int
  num_heads: int
  num_layers: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d_model, name="embed")
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.d_model))
    x = embed(tokens) + pos[: tokens.shape[-1]]
    layers = nn.scan(
      Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.num_layers,
    )
    x, _ = layers(self.d_model, self.num_heads, name="layers")(x, None)
    x = nn.LayerNorm()(x)
    return embed.attend(x)  # tied logits


# --- data: bytes of the standard library's source ------------------------------------------------------------

CORPUS_FILES = (
  "argparse.py",
  "collections/__init__.py",
  "dataclasses.py",
  "enum.py",
  "functools.py",
  "json/decoder.py",
  "json/encoder.py",
  "textwrap.py",
  "tokenize.py",
)
VOCAB = 256


def load_corpus(max_bytes: int | None) -> np.ndarray:
  root = sysconfig.get_paths()["stdlib"]
  parts = []
  for name in CORPUS_FILES:
    path = os.path.join(root, name)
    if os.path.isfile(path):  # a distribution may strip a module; the rest still make a corpus
      with open(path, "rb") as f:
        parts.append(f.read())
  if not parts:
    raise FileNotFoundError(f"none of the corpus files exist under {root!r}")
  data = b"".join(parts)
  return np.frombuffer(data[:max_bytes] if max_bytes else data, np.uint8)


def split(text: np.ndarray, chunk: int = 4096, val_fraction: float = 0.1, seed: int = 0):
  """Train / validation by chunks drawn from all over the corpus."""
  n = len(text) // chunk
  chunks = text[: n * chunk].reshape(n, chunk)
  perm = np.random.default_rng(seed).permutation(n)
  n_val = max(1, int(round(n * val_fraction)))
  return chunks[np.sort(perm[n_val:])].reshape(-1), chunks[np.sort(perm[:n_val])].reshape(-1)


def batch_at(text: np.ndarray, length: int, batch: int, seed: int, step: int) -> np.ndarray:
  rng = np.random.default_rng((seed, step))
  start = rng.integers(0, len(text) - length - 1, size=(batch, 1))
  return text[start + np.arange(length + 1)[None, :]].astype(np.int32)


def windows(text: np.ndarray, length: int, limit: int) -> np.ndarray:
  n = min((len(text) - 1) // length, limit)
  idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
  return text[idx].astype(np.int32)


# --- training and evaluation (the canonical Flax loop) --------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  context: int = 64
  batch: int = 16
  steps: int = 300
  qat_steps: int = 100
  lr: float = 3e-3
  calib_batches: int = 4
  eval_windows: int = 128
  max_corpus_bytes: int | None = None
  seed: int = 0


SMALL = dict(
  d_model=32,
  num_heads=2,
  context=16,
  batch=4,
  steps=4,
  qat_steps=3,
  calib_batches=1,
  eval_windows=8,
  max_corpus_bytes=60_000,
)


def loss_fn(model, variables, batch, mutable=False):
  out = model.apply(variables, batch[:, :-1], mutable=mutable)
  logits, updates = out if mutable else (out, {})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  return loss, updates


def make_step(model, tx, mutable):
  @jax.jit
  def step(variables, opt_state, batch):
    def f(p):
      return loss_fn(model, {**variables, "params": p}, batch, mutable=mutable)

    (loss, updates), grads = jax.value_and_grad(f, has_aux=True)(variables["params"])
    upd, opt_state = tx.update(grads, opt_state, variables["params"])
    return {**variables, **updates, "params": optax.apply_updates(variables["params"], upd)}, opt_state, loss

  return step


_EVAL = {}


def evaluate(model, variables, val: np.ndarray) -> float:
  """Mean validation loss in nats per byte (one jitted function per model, reused across stages)."""
  if id(model) not in _EVAL:
    _EVAL[id(model)] = (model, jax.jit(lambda v, b: loss_fn(model, v, b)[0]))
  return float(_EVAL[id(model)][1](variables, val))


def tree_bytes(tree) -> int:
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def run(s: Settings) -> dict:
  t0 = time.perf_counter()
  train, val_text = split(load_corpus(s.max_corpus_bytes), chunk=max(512, 4 * s.context), seed=s.seed)
  val = windows(val_text, s.context, s.eval_windows)
  model = TransformerLM(VOCAB, s.d_model, s.num_heads, s.num_layers, s.context)
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, max(1, s.steps // 10), s.steps + s.qat_steps)
  tx = optax.adamw(schedule, weight_decay=0.01)

  # 1. float training
  variables = jax.jit(model.init)(jax.random.key(s.seed), jnp.zeros((1, s.context), jnp.int32))
  opt_state = tx.init(variables["params"])
  step = make_step(model, tx, mutable=False)
  for i in range(s.steps):
    variables, opt_state, _ = step(variables, opt_state, batch_at(train, s.context, s.batch, s.seed, i))
  float_loss = evaluate(model, variables, val)
  # The float model trained for as many steps as the QAT run will have seen: the loss to compare QAT with.
  float_vars, float_opt = variables, opt_state
  for i in range(s.steps, s.steps + s.qat_steps):
    float_vars, float_opt, _ = step(float_vars, float_opt, batch_at(train, s.context, s.batch, s.seed, i))
  float_same_steps = evaluate(model, float_vars, val)

  # 2. quantize the model as it is: the embedding (input table and tied head) stays float
  int8_w = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
  int8_a = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)
  rules = [jqat.Rule("embed"), jqat.Rule(".*", weight=int8_w, activation=int8_a)]
  qmodel = jqat.linen.quantize_model(model, rules)
  sample = jnp.asarray(val[:2, :-1])
  qvars = jax.jit(qmodel.init)(jax.random.key(s.seed), sample)
  # The float checkpoint loads unchanged: same parameter tree.
  assert jax.tree.structure(qvars["params"]) == jax.tree.structure(variables["params"])
  qvars = {**qvars, "params": variables["params"]}
  print("\nquantize_model report (one row per matmul-like op):")
  jqat.linen.report(qmodel, qvars, sample)
  before = evaluate(qmodel, qvars, val)

  # 3. QAT fine-tuning, the activation statistics updated as the model trains
  qat_step = make_step(qmodel, tx, mutable=["quant_stats"])
  for i in range(s.steps, s.steps + s.qat_steps):
    qvars, opt_state, _ = qat_step(qvars, opt_state, batch_at(train, s.context, s.batch, s.seed, i))
  qat_loss = evaluate(qmodel, qvars, val)

  # 4. calibrate the activation ranges, convert, serve with the integer path
  calib = [jnp.asarray(batch_at(train, s.context, s.batch, s.seed + 1, i)[:, :-1]) for i in range(s.calib_batches)]
  qvars = jqat.linen.calibrate(qmodel, qvars, calib, method="percentile")
  calibrated_loss = evaluate(qmodel, qvars, val)
  served = jax.jit(lambda v, x: jqat.linen.convert(qmodel, v, x))(qvars, sample)
  served_loss = evaluate(qmodel, served, val)
  predict = jax.jit(lambda v, x: jnp.argmax(qmodel.apply(v, x), -1))
  agree = float(jnp.mean(predict(served, val[:, :-1]) == predict(qvars, val[:, :-1])))

  rows = jqat.linen.report(qmodel, qvars, sample, print_table=False)
  quantized = [r for r in rows if r.weight != "float"]
  results = {
    "float_loss": float_loss,
    "float_loss_same_steps": float_same_steps,
    "quantized_loss_before_qat": before,
    "qat_loss": qat_loss,
    "calibrated_loss": calibrated_loss,
    "served_loss": served_loss,
    "served_matches_qat": agree,
    "float_bytes": tree_bytes(variables["params"]),
    "served_bytes": tree_bytes({k: served[k] for k in ("params", "serving")}),
    "quantized_ops_float_bytes": sum(r.float_bytes for r in quantized),
    "quantized_ops_served_bytes": sum(r.serving_bytes for r in quantized),
    "seconds": time.perf_counter() - t0,
  }
  print(
    f"\nvalidation loss (nats/byte): float after {s.steps} steps {float_loss:.4f}, after {s.steps + s.qat_steps} "
    f"{float_same_steps:.4f} | quantized, before QAT {before:.4f} | after {s.qat_steps} QAT steps {qat_loss:.4f} | "
    f"calibrated {calibrated_loss:.4f} | served int8 {served_loss:.4f}"
  )
  print(f"served predictions equal to the QAT model's: {agree:.2%}")
  print(
    f"bytes: float parameters {results['float_bytes']:,} -> served {results['served_bytes']:,} "
    f"({results['served_bytes'] / results['float_bytes']:.3f}x); quantized ops' weights "
    f"{results['quantized_ops_float_bytes']:,} -> {results['quantized_ops_served_bytes']:,} "
    f"({results['quantized_ops_served_bytes'] / max(1, results['quantized_ops_float_bytes']):.3f}x; "
    "the float embedding is the rest)"
  )
  print(f"{results['seconds']:.0f} s")
  return results


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, help="float training steps")
  parser.add_argument("--qat-steps", type=int, help="QAT fine-tuning steps")
  parser.add_argument("--small", action="store_true", help="a tiny model and corpus, for a quick check")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
  args = parser.parse_args(argv)
  kw = dict(SMALL) if args.small else {}
  kw["seed"] = args.seed
  if args.steps is not None:
    kw["steps"] = args.steps
  if args.qat_steps is not None:
    kw["qat_steps"] = args.qat_steps
  results = run(Settings(**kw))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()

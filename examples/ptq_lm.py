"""Post-training quantization of a byte-level language model: RTN, GPTQ, AWQ, SmoothQuant and QAT compared.

The corpus and its split are ``examples/char_lm.py``'s (Python's own standard-library source, read as bytes).
One run trains a small pre-norm transformer in float, then quantizes it without training
(``jqat.linen.ptq`` with ``method="rtn" | "gptq" | "awq" | "smoothquant"``) and with a short QAT fine-tune,
and reports validation perplexity of each, served through the integer path (``convert``'s layout):

* weight-only int4 per output channel, int4 with groups of 128, int3 with groups of 128: float, RTN,
  GPTQ (activation order), AWQ; QAT at int4 per channel;
* w8a8: int8 per-channel weights, int8 activations with static per-tensor (min-max) ranges, round to nearest,
  with and without SmoothQuant (``alpha=0.5``).

Outlier channels. A trained model this small has no outlier features, and round to nearest loses little. Large
language models do: a few channels of the residual stream and of the normalised activations are 10-100x the
others (Dettmers et al., LLM.int8(), 2022), which is what GPTQ, AWQ and SmoothQuant are built for. After float
training this example puts them in, without changing the float function: in every block, ``OUTLIERS`` channels
of each LayerNorm's output are multiplied by ``OUTLIER_GAIN`` (the norm's scale and bias) and the matching input
rows of the dense layer it feeds are divided by the same factor. The float perplexity is unchanged (to float
rounding); the quantized models face what LLM weights and activations look like.

Quantized: the attention's fused query / key / value projection, its output projection and the MLP
(``jqat.linen.QatDense``); embeddings, norms and the head stay float.

Run: python examples/ptq_lm.py [--steps N] [--qat-steps N] [--small] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import char_lm  # noqa: E402  (the corpus and its split, read-only)

import jqat  # noqa: E402
from jqat import linen as qnn  # noqa: E402

OUTLIERS = 4
OUTLIER_GAIN = 24.0

FORMATS = ("int4pc", "int4g128", "int3g128")
W8 = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
A8 = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)
METHOD_OPTIONS = {"rtn": {}, "gptq": {"act_order": True}, "awq": {}}
KEYS = (
  ["ppl_float", "ppl_qat_int4pc"]
  + [f"ppl_{m}_{f}" for m in ("rtn", "gptq", "awq") for f in FORMATS]
  + ["ppl_w8a8_plain", "ppl_w8a8_smoothquant"]
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  context: int = 64
  batch: int = 32
  steps: int = 500
  qat_steps: int = 150
  lr: float = 3e-3
  calib_batches: int = 4
  eval_windows: int = 256
  max_corpus_bytes: int | None = None
  seed: int = 0


SMALL = dict(
  num_layers=1,
  d_model=32,
  num_heads=2,
  context=16,
  batch=8,
  steps=20,
  qat_steps=4,
  calib_batches=1,
  eval_windows=16,
  max_corpus_bytes=100_000,
)


class Block(nn.Module):
  d_model: int
  num_heads: int
  weight_config: jqat.QatConfig | None
  activation_config: jqat.QatConfig | None

  @nn.compact
  def __call__(self, x):
    def dense(n, name):
      return qnn.QatDense(n, weight_config=self.weight_config, activation_config=self.activation_config, name=name)

    b, t, d = x.shape
    hd = d // self.num_heads
    h = nn.LayerNorm(name="ln_attn")(x)
    q, k, v = jnp.split(dense(3 * d, "qkv")(h).reshape(b, t, 3 * self.num_heads, hd), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + dense(d, "out")(o)
    h = nn.LayerNorm(name="ln_mlp")(x)
    return x + dense(d, "mlp_out")(nn.gelu(dense(4 * d, "mlp_in")(h)))


class LM(nn.Module):
  s: Settings
  weight_config: jqat.QatConfig | None = None
  activation_config: jqat.QatConfig | None = None

  @nn.compact
  def __call__(self, tokens):
    s = self.s
    x = nn.Embed(char_lm.VOCAB, s.d_model, name="embed")(tokens)
    x = x + nn.Embed(s.context, s.d_model, name="pos")(jnp.arange(tokens.shape[-1]))
    for i in range(s.num_layers):
      x = Block(s.d_model, s.num_heads, self.weight_config, self.activation_config, name=f"block_{i}")(x)
    return nn.Dense(char_lm.VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def weight_formats(s: Settings) -> dict:
  """The weight-only formats; groups of 128 input rows (of ``d_model`` when the model is narrower, ``--small``)."""
  g = min(128, s.d_model)
  return {
    "int4pc": jqat.QatConfig(bits="int4", per_channel=True, symmetric=True),
    "int4g128": jqat.QatConfig(bits="int4", per_channel=True, symmetric=True, group_size=g),
    "int3g128": jqat.QatConfig(bits="int3", per_channel=True, symmetric=True, group_size=g),
  }


def add_outliers(params: dict, s: Settings) -> dict:
  """The same float function with ``OUTLIERS`` channels of every norm's output ``OUTLIER_GAIN`` times larger."""
  params = jax.tree.map(lambda a: a, params)
  idx = np.random.default_rng(s.seed).choice(s.d_model, OUTLIERS, replace=False)
  gain = jnp.ones((s.d_model,)).at[idx].set(OUTLIER_GAIN)
  for i in range(s.num_layers):
    blk = dict(params[f"block_{i}"])
    for ln, dense in (("ln_attn", "qkv"), ("ln_mlp", "mlp_in")):
      blk[ln] = {"scale": blk[ln]["scale"] * gain, "bias": blk[ln]["bias"] * gain}
      blk[dense] = {**blk[dense], "kernel": blk[dense]["kernel"] / gain[:, None]}
    params[f"block_{i}"] = blk
  return params


def make_train_step(model, tx):
  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      return char_lm.cross_entropy(model.apply({"params": p}, batch[:, :-1]), batch[:, 1:])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2), end_value=lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=0.01))


def train(model, params, train_text, s: Settings, steps: int, lr: float, seed_offset: int = 0):
  tx = optimizer(lr, steps)
  step = make_train_step(model, tx)
  opt_state = tx.init(params)
  loss = float("nan")
  for i in range(steps):
    batch = jnp.asarray(char_lm.random_batch(train_text, s.context, s.batch, s.seed + seed_offset, i))
    params, opt_state, loss = step(params, opt_state, batch)
  return params, float(loss)


def perplexity(model, variables, val: np.ndarray, batch: int = 64) -> float:
  @jax.jit
  def nll(v, w):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, w[:, :-1]), w[:, 1:]).sum()

  total, count = 0.0, 0
  for i in range(0, len(val), batch):
    w = jnp.asarray(val[i : i + batch])
    total += float(nll(variables, w))
    count += w[:, 1:].size
  return math.exp(total / count)


def gap_recovered(ppl_float: float, ppl_rtn: float, ppl: float) -> float:
  """The fraction of round-to-nearest's perplexity gap to float that a method recovers."""
  return (ppl_rtn - ppl) / (ppl_rtn - ppl_float) if ppl_rtn != ppl_float else float("nan")


def run(s: Settings, variants=None, log=print, keep: dict | None = None) -> dict:
  """The table's perplexities (``KEYS``), or those of ``variants`` (a subset of ``KEYS``).

  ``keep``, a dict, receives the float parameters (``"params"``) and each variant's served variables.
  """
  keep = {} if keep is None else keep
  t0 = time.time()
  data, _ = char_lm.load_corpus(s.max_corpus_bytes)
  train_text, val_text = char_lm.split_corpus(data, 4096 if s.max_corpus_bytes is None else 1024, s.seed)
  val = char_lm.windows(val_text, s.context, s.eval_windows)
  calib = [
    jnp.asarray(char_lm.random_batch(train_text, s.context, s.batch, s.seed + 7, i)[:, :-1])
    for i in range(s.calib_batches)
  ]
  float_model = LM(s)
  params = jax.jit(float_model.init)(jax.random.key(s.seed), jnp.zeros((1, s.context), jnp.int32))["params"]
  params, loss = train(float_model, params, train_text, s, s.steps, s.lr)
  params = add_outliers(params, s)
  keep["params"] = params
  log(f"float model trained: {s.steps} steps, last loss {loss:.3f} ({time.time() - t0:.0f} s)")
  want = set(KEYS if variants is None else variants)
  out = {}

  def record(key, value):
    out[key] = value
    log(f"{key:24s} {value:8.4f}   ({time.time() - t0:.0f} s)")

  record("ppl_float", perplexity(float_model, {"params": params}, val))
  formats = weight_formats(s)
  for fmt, cfg in formats.items():
    model = LM(s, weight_config=cfg)
    for method, opts in METHOD_OPTIONS.items():
      key = f"ppl_{method}_{fmt}"
      if key in want:
        served = keep[key] = qnn.ptq(model, {"params": params}, calib, method=method, **opts)
        record(key, perplexity(model, served, val))
  if "ppl_qat_int4pc" in want:
    model = LM(s, weight_config=formats["int4pc"])
    qat_params, _ = train(model, params, train_text, s, s.qat_steps, s.lr * 0.3, seed_offset=1)
    served = qnn.convert(model, {"params": qat_params}, calib[0])
    record("ppl_qat_int4pc", perplexity(model, served, val))
  model = LM(s, weight_config=W8, activation_config=A8)
  for key, method in (("ppl_w8a8_plain", "rtn"), ("ppl_w8a8_smoothquant", "smoothquant")):
    if key in want:
      served = qnn.ptq(model, {"params": params}, calib, method=method)
      record(key, perplexity(model, served, val))
  return out


def print_table(r: dict) -> None:
  f = r["ppl_float"]
  print(f"\nfloat {f:.3f}")
  print(f"{'format':10s} {'RTN':>8s} {'GPTQ':>8s} {'AWQ':>8s}   GPTQ/AWQ gap recovered")
  for fmt in FORMATS:
    rtn, g, a = (r[f"ppl_{m}_{fmt}"] for m in ("rtn", "gptq", "awq"))
    print(f"{fmt:10s} {rtn:8.3f} {g:8.3f} {a:8.3f}   {gap_recovered(f, rtn, g):5.0%} / {gap_recovered(f, rtn, a):5.0%}")
  print(f"QAT int4 per channel: {r['ppl_qat_int4pc']:.3f}")
  print(f"w8a8 static per-tensor: plain {r['ppl_w8a8_plain']:.3f}, SmoothQuant {r['ppl_w8a8_smoothquant']:.3f}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, help="float training steps")
  parser.add_argument("--qat-steps", type=int, help="QAT fine-tuning steps")
  parser.add_argument("--small", action="store_true", help="a tiny model and corpus, for a quick check")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", metavar="PATH", help="write the perplexities as JSON")
  args = parser.parse_args(argv)
  kw = dict(SMALL) if args.small else {}
  if args.steps is not None:
    kw["steps"] = args.steps
  if args.qat_steps is not None:
    kw["qat_steps"] = args.qat_steps
  s = Settings(seed=args.seed, **kw)
  r = run(s)
  print_table(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=2)
  return r


if __name__ == "__main__":
  main()

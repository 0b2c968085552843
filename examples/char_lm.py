"""A byte-level transformer language model, quantized with jqat: float, PTQ, QAT int8 / int4, integer serving.

The corpus is text that ships with every Python: a fixed list of modules from the standard library's own
source (``sysconfig.get_paths()["stdlib"]``), read as bytes, so nothing is downloaded. One run

1. trains a small decoder-only transformer in float (stock Flax layers: ``nn.Embed``, ``nn.LayerNorm``,
   ``nn.MultiHeadDotProductAttention`` with a causal mask, ``nn.Dense``);
2. quantizes the trained float model to int8 after training (PTQ: ``jqat.linen.calibrate`` freezes the
   activation ranges, 99.99th percentile), with no training at all;
3. trains with quantization-aware training (QAT), int8 weights and activations, starting from the float
   parameters (the quantized model has the very same parameter tree);
4. does the same with int4 weights (per output channel) and int8 activations;
5. converts the int8 QAT model to serving variables (int8 kernels) and decodes greedily with the integer path
   (int8 x int8 -> int32 dot, one rescale), next to the float model decoding the same way;
6. decodes with a KV cache (``jqat.linen.QatAttention(decode=True)``, Flax's decode convention): float, int8
   weights, int8 weights with an int8 KV cache (and int8 q·k and p·v products reading it), int4 weights with
   an int8 KV cache; and scores the validation windows through the cache, one token at a time.

The defaults (4 layers, d=128, 4 heads, context 128, batch 16, about 0.9M parameters) are sized to finish in a
few minutes on two CPU cores; d=256 costs about four times as much per step. The model is far from converged in
that budget, which is why its samples are mostly whitespace: the comparison between number formats is the point.

jqat enters through ``nn.MultiHeadDotProductAttention(qkv_dot_general_cls=..., out_dot_general_cls=...)`` for the
query / key / value / output projections and through ``jqat.linen.QatDense`` for the MLP. In the full-window
forward the attention products themselves (q·k and softmax·v) stay in float, as do the embeddings, the layer
norms and the output head: only the projections and the MLP, which hold almost all the weights and
multiply-adds, are quantized. The int8 KV cache rows also quantize the two attention products.

Two decoding algorithms are timed, each at batch 1 with greedy choice, in one jitted ``lax.scan`` after a
warm-up call. The window re-run (no cache) runs the whole 128-byte context for every new byte. KV-cache
decoding runs one token per step: the step writes its key and value into the cache (fixed length, so one
compiled step serves every position) and attends to the positions written so far. Each cached row is
compared with the window re-run of the same weights. The validation perplexity through the cache must
equal the full forward's to within float rounding for a float cache.

The float model trains for ``--steps`` + ``--qat-steps`` steps. Each QAT variant branches off that run after
``--steps`` (parameters and optimizer state) and trains the last ``--qat-steps`` steps with the same batches and
learning rates (the tail of one cosine schedule), so every row of the table has seen the same data for the same
number of steps and differs from the float row in its number formats alone.

Run: python examples/char_lm.py [--steps N] [--qat-steps N] [--small] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jqat
from jqat import linen as qnn

# Modules present, under these names, in every CPython 3.10+ standard library. Sorted, so that the corpus is
# the same byte string on every run of one Python version.
CORPUS_FILES = tuple(
  sorted(
    (
      "argparse.py",
      "bisect.py",
      "collections/__init__.py",
      "configparser.py",
      "contextlib.py",
      "copy.py",
      "csv.py",
      "dataclasses.py",
      "difflib.py",
      "enum.py",
      "fractions.py",
      "functools.py",
      "heapq.py",
      "json/__init__.py",
      "json/decoder.py",
      "json/encoder.py",
      "json/scanner.py",
      "logging/__init__.py",
      "pprint.py",
      "random.py",
      "shlex.py",
      "statistics.py",
      "textwrap.py",
      "tokenize.py",
    )
  )
)

VOCAB = 256  # bytes

INT8_WEIGHTS = jqat.QatConfig(bits="int8", per_channel=True, symmetric=True)
INT4_WEIGHTS = jqat.QatConfig(bits="int4", per_channel=True, symmetric=True)
INT8_ACTIVATIONS = jqat.QatConfig(bits="int8", per_channel=False, symmetric=False)
# The int8 KV cache: one scale per token and head, stored as bfloat16. With 32 values per head a float32
# scale would add 4 bytes to 32 (0.281x the float32 cache's bytes); a bfloat16 one adds 2 (0.266x).
KV8 = jqat.KVCacheConfig(bits="int8", scale_dtype="bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  context: int = 128
  batch: int = 16
  steps: int = 350
  qat_steps: int = 100
  lr: float = 3e-3
  calib_batches: int = 8
  eval_windows: int = 256
  decode_tokens: int = 128
  max_corpus_bytes: int | None = None
  seed: int = 0


SMALL = dict(
  num_layers=1,
  d_model=32,
  num_heads=1,  # head_dim 32, as in the default model: the same KV cache bytes per value
  context=32,
  batch=8,
  steps=30,
  qat_steps=10,
  calib_batches=2,
  eval_windows=32,
  decode_tokens=16,
  max_corpus_bytes=200_000,
)


# --- data -------------------------------------------------------------------------------------------------


def load_corpus(max_bytes: int | None = None) -> tuple[bytes, int]:
  """The standard-library files of CORPUS_FILES that exist here, concatenated; and how many there were."""
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
  return (data[:max_bytes] if max_bytes else data), len(parts)


def split_corpus(data: bytes, chunk: int, seed: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split by chunks, so that validation text comes from all over the corpus, not from one file."""
  arr = np.frombuffer(data, np.uint8)
  n = len(arr) // chunk
  chunks = arr[: n * chunk].reshape(n, chunk)
  perm = np.random.default_rng(seed).permutation(n)
  n_val = max(1, int(round(n * val_fraction)))
  val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  return chunks[train].reshape(-1), chunks[val].reshape(-1)


def windows(text: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
  """Non-overlapping windows of ``length + 1`` bytes (input and shifted target)."""
  n = (len(text) - 1) // length
  if limit is not None:
    n = min(n, limit)
  idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
  return text[idx].astype(np.int32)


def random_batch(text: np.ndarray, length: int, batch: int, seed: int, step: int) -> np.ndarray:
  """The training batch of ``step``: random windows, a pure function of (seed, step) so runs can replay it."""
  rng = np.random.default_rng((seed, step))
  start = rng.integers(0, len(text) - length - 1, size=(batch, 1))
  return text[start + np.arange(length + 1)[None, :]].astype(np.int32)


# --- model ------------------------------------------------------------------------------------------------


class Block(nn.Module):
  """Pre-norm transformer block. ``quant`` switches jqat on; the parameters are the same either way.

  ``decode`` runs one token per call through the attention's KV cache (``cache_config`` None: float32 cache);
  ``products`` quantizes the attention products q·k and p·v (int8, per token).
  """

  d_model: int
  num_heads: int
  quant: bool = False
  weight_config: jqat.QatConfig | None = INT8_WEIGHTS
  activation_config: jqat.QatConfig | None = INT8_ACTIVATIONS
  decode: bool = False
  cache_config: jqat.KVCacheConfig | None = None
  products: bool = False

  @nn.compact
  def __call__(self, x, mask):
    if self.quant:
      dot_general_cls = functools.partial(
        qnn.QatDotGeneral, lhs_config=self.activation_config, rhs_config=self.weight_config
      )
      dense = functools.partial(
        qnn.QatDense, weight_config=self.weight_config, activation_config=self.activation_config
      )
    else:
      dot_general_cls, dense = None, nn.Dense
    h = nn.LayerNorm()(x)
    attention = dict(
      num_heads=self.num_heads,
      qkv_dot_general_cls=dot_general_cls,
      out_dot_general_cls=dot_general_cls,
      deterministic=True,
      name="attn",
    )
    if self.decode or self.products:
      # jqat's attention: Flax's module with a (quantized) KV cache and quantized products, the same parameters.
      product = qnn.AttentionQuantConfig() if self.products else None
      h = qnn.QatAttention(
        **attention, decode=self.decode, cache_config=self.cache_config, qk_config=product, pv_config=product
      )(h, mask=mask)
    else:
      h = nn.MultiHeadDotProductAttention(**attention)(h, mask=mask)
    x = x + h
    h = nn.LayerNorm()(x)
    # QatDense takes nn.Dense's automatic names (Dense_0, Dense_1): float checkpoints load unchanged.
    h = dense(4 * self.d_model)(h)
    h = nn.gelu(h)
    return x + dense(self.d_model)(h)


class CharTransformer(nn.Module):
  """Decoder-only byte-level transformer with learned positions; float embeddings, norms and head.

  With ``decode``, a call takes one token per sequence, ``tokens`` of shape ``(batch, 1)``, and its
  ``position``; every attention layer keeps its keys and values in the ``cache`` collection (created by
  ``init`` with a full-length input).
  """

  num_layers: int
  d_model: int
  num_heads: int
  context: int
  quant: bool = False
  weight_config: jqat.QatConfig | None = INT8_WEIGHTS
  activation_config: jqat.QatConfig | None = INT8_ACTIVATIONS
  decode: bool = False
  cache_config: jqat.KVCacheConfig | None = None
  products: bool = False

  @nn.compact
  def __call__(self, tokens, position=None):
    length = tokens.shape[-1]
    x = nn.Embed(VOCAB, self.d_model, name="embed")(tokens)
    if position is None:  # the whole window (training, evaluation, and init of the decode cache)
      x = x + nn.Embed(self.context, self.d_model, name="pos")(jnp.arange(length))
      mask = nn.make_causal_mask(tokens)
    else:  # one decoding step: the cache masks the positions not yet written
      x = x + nn.Embed(self.context, self.d_model, name="pos")(jnp.reshape(position, (1,)))
      mask = None
    for _ in range(self.num_layers):
      x = Block(
        self.d_model,
        self.num_heads,
        self.quant,
        self.weight_config,
        self.activation_config,
        self.decode,
        self.cache_config,
        self.products,
      )(x, mask)
    x = nn.LayerNorm()(x)
    return nn.Dense(VOCAB, name="head")(x)


def init_variables(model, key, sample) -> dict:
  """``model.init``, jitted (an eager init compiles every small op on its own)."""
  return jax.jit(model.init)(key, sample)


def make_model(
  s: Settings, weight_config=None, activation_config=None, *, decode=False, cache_config=None, products=False
) -> CharTransformer:
  quant = weight_config is not None or activation_config is not None
  return CharTransformer(
    s.num_layers,
    s.d_model,
    s.num_heads,
    s.context,
    quant=quant,
    weight_config=weight_config,
    activation_config=activation_config,
    decode=decode,
    cache_config=cache_config,
    products=products,
  )


# --- training and evaluation ------------------------------------------------------------------------------


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(s: Settings) -> optax.GradientTransformation:
  total = s.steps + s.qat_steps
  warmup = max(1, total // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(total, warmup + 1), end_value=s.lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.99, weight_decay=0.01))


def make_train_step(model, tx):
  """One jitted AdamW step; the QAT model's activation ranges (``quant_stats``) update with each forward."""

  @jax.jit
  def step(variables, opt_state, batch):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k == "quant_stats"}

    def loss_fn(p):
      logits, new_state = model.apply({"params": p, **state}, batch[:, :-1], mutable=list(state))
      return cross_entropy(logits, batch[:, 1:]), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), **new_state}, opt_state, loss

  return step


def train(step, variables, opt_state, batch_at, steps, *, bar, curve):
  for i in steps:
    variables, opt_state, loss = step(variables, opt_state, batch_at(i))
    curve.append(float(loss))
    bar.set_postfix(loss=f"{curve[-1]:.3f}")
    bar.update(1)
  return variables, opt_state


@functools.cache
def _nll_sum(model):
  # One compiled function per model: PTQ and QAT variables of one model share it.
  @jax.jit
  def nll_sum(variables, w):
    logits = model.apply(variables, w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).sum()

  return nll_sum


def perplexity(model, variables, val, batch=64) -> float:
  """exp(mean next-byte cross entropy) over the validation windows."""
  total, count = 0.0, 0
  for i in range(0, len(val), batch):
    w = val[i : i + batch]
    total += float(_nll_sum(model)(variables, jnp.asarray(w)))
    count += w[:, 1:].size
  return math.exp(total / count)


def decode(model, variables, prompt, new_tokens, repeats=3) -> tuple[np.ndarray, float]:
  """Greedy decoding that re-runs the last ``context`` bytes for each new byte; returns bytes and tokens/s."""

  @jax.jit
  def generate(variables, window):
    def one(window, _):
      logits = model.apply(variables, window[None])[0, -1]
      token = jnp.argmax(logits).astype(window.dtype)
      return jnp.concatenate([window[1:], token[None]]), token

    return jax.lax.scan(one, window, None, length=new_tokens)[1]

  window = jnp.asarray(prompt, jnp.int32)
  generate(variables, window).block_until_ready()  # compile outside the timing
  best = math.inf
  for _ in range(repeats):  # the fastest of a few runs: the least disturbed by other work on the machine
    start = time.perf_counter()
    out = generate(variables, window).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return np.asarray(out), new_tokens / best


def init_cache(model, batch: int, context: int) -> dict:
  """An empty decode cache for ``batch`` sequences of up to ``context`` tokens.

  What ``model.init`` with a full window creates, without running it: zeros, and ones for the scales of a
  quantized cache (positive, so the empty, masked positions stay finite).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((batch, context), jnp.int32))["cache"]

  def empty(path, x):
    fill = jnp.ones if jax.tree_util.keystr(path).endswith("_scale']") else jnp.zeros
    return fill(x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(empty, shapes)


def cache_bytes_per_token(cache: dict, batch: int, context: int) -> float:
  """Bytes the cache holds per token, over all layers: keys, values and their scales (not the index)."""
  leaves = jax.tree_util.tree_leaves_with_path(cache)
  total = sum(x.size * x.dtype.itemsize for path, x in leaves if "cache_index" not in jax.tree_util.keystr(path))
  return total / (batch * context)


def make_step(model):
  """One decoding step: a token per sequence in, next-byte logits and the updated cache out."""

  def step(variables, cache, tokens, position):
    logits, state = model.apply({**variables, "cache": cache}, tokens[:, None], position, mutable=["cache"])
    return logits[:, 0], state["cache"]

  return step


@functools.cache
def _cached_nll_sum(model):
  step = make_step(model)

  @jax.jit
  def nll_sum(variables, cache, w):
    # Teacher forcing through the cache: position t reads the true bytes 0..t, one token per step.
    def one(cache, t):
      logits, cache = step(variables, cache, w[:, t], t)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, w[:, t + 1]).sum()
      return cache, nll

    return jax.lax.scan(one, cache, jnp.arange(w.shape[1] - 1))[1].sum()

  return nll_sum


def cached_perplexity(model, variables, val, context: int, batch=64) -> float:
  """``perplexity`` of the same windows, computed one token at a time through the KV cache."""
  total, count = 0.0, 0
  for i in range(0, len(val), batch):
    w = val[i : i + batch]
    cache = init_cache(model, len(w), context)
    total += float(_cached_nll_sum(model)(variables, cache, jnp.asarray(w)))
    count += w[:, 1:].size
  return math.exp(total / count)


def cached_decode(model, variables, prompt, new_tokens, context: int, repeats=20) -> tuple[np.ndarray, float]:
  """Greedy decoding with the KV cache: the prompt goes in one token per step, then one new byte per step.

  Two jitted loops (``lax.scan``): the prompt (prefill) and the new bytes. Only the second is timed, so the
  bytes/s is the decoding rate at batch 1; each step is one compiled function whatever its position.
  """
  if len(prompt) + new_tokens > context:
    raise ValueError(f"prompt of {len(prompt)} bytes + {new_tokens} new bytes do not fit the cache of {context}")
  step = make_step(model)

  @jax.jit
  def prefill(variables, cache, prompt):
    def one(cache, tp):
      logits, cache = step(variables, cache, tp[0][None], tp[1])
      return cache, logits[0]

    cache, logits = jax.lax.scan(one, cache, (prompt, jnp.arange(prompt.shape[0])))
    return cache, jnp.argmax(logits[-1]).astype(jnp.int32)

  @jax.jit
  def generate(variables, cache, token):
    def one(carry, position):
      cache, token = carry
      logits, cache = step(variables, cache, token[None], position)
      nxt = jnp.argmax(logits[0]).astype(jnp.int32)
      return (cache, nxt), token

    positions = len(prompt) + jnp.arange(new_tokens)
    return jax.lax.scan(one, (cache, token), positions)[1]

  cache0 = init_cache(model, 1, context)
  cache, first = prefill(variables, cache0, jnp.asarray(prompt, jnp.int32))
  generate(variables, cache, first).block_until_ready()  # compile outside the timing
  best = math.inf
  for _ in range(repeats):  # the fastest of a few runs: the least disturbed by other work on the machine
    start = time.perf_counter()
    out = generate(variables, cache, first).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return np.asarray(out), new_tokens / best


# --- the run ----------------------------------------------------------------------------------------------


class Stopwatch:
  """Wall and CPU seconds of each stage since the previous one."""

  def __init__(self):
    self.laps = {}
    self._last = (time.perf_counter(), time.process_time())

  def __call__(self, name: str) -> None:
    now = (time.perf_counter(), time.process_time())
    self.laps[name] = (now[0] - self._last[0], now[1] - self._last[1])
    self._last = now


def run(s: Settings, plot: str | None = None) -> dict:
  t0, cpu0 = time.perf_counter(), time.process_time()
  stage = Stopwatch()
  data, n_files = load_corpus(s.max_corpus_bytes)
  train_text, val_text = split_corpus(data, chunk=16 * s.context, seed=s.seed)
  val = windows(val_text, s.context, limit=s.eval_windows)
  print(
    f"corpus: {n_files} stdlib files, {len(data):,} bytes; train {len(train_text):,}, "
    f"validation {val.size - len(val):,} bytes scored"
  )

  float_model = make_model(s)
  qat8_model = make_model(s, INT8_WEIGHTS, INT8_ACTIVATIONS)
  qat4_model = make_model(s, INT4_WEIGHTS, INT8_ACTIVATIONS)
  sample = jnp.zeros((1, s.context), jnp.int32)
  key = jax.random.key(s.seed)
  float_vars = init_variables(float_model, key, sample)
  # The switch only adds jqat's state, the activation statistics in quant_stats: float parameters load into the
  # QAT models as they are. Both QAT variants quantize activations alike, so they start from the same (empty)
  # statistics.
  quant_stats = init_variables(qat8_model, key, sample)["quant_stats"]
  for model in (qat8_model, qat4_model):
    shapes = jax.eval_shape(model.init, key, sample)
    assert jax.tree.structure(shapes["params"]) == jax.tree.structure(float_vars["params"])
    assert jax.tree.structure(shapes["quant_stats"]) == jax.tree.structure(quant_stats)
  n_params = sum(x.size for x in jax.tree.leaves(float_vars["params"]))
  print(f"model: {s.num_layers} layers, d={s.d_model}, {s.num_heads} heads, context {s.context}, {n_params:,} params")

  # The float model trains for steps + qat_steps. Each QAT variant branches off it at `steps` (parameters and
  # optimizer state) and trains the last qat_steps with the very same batches and learning rates: the rows of
  # the table differ in their number formats alone, not in how long or on what they trained.
  stage("setup")
  tx = make_optimizer(s)
  batch_at = functools.partial(random_batch, train_text, s.context, s.batch, s.seed)
  curves = {}
  total = s.steps + s.qat_steps
  bar = tqdm(total=total + 2 * s.qat_steps, unit="step", dynamic_ncols=True)
  bar.set_description("float")
  float_step = make_train_step(float_model, tx)
  float_vars, opt_state = train(
    float_step,
    float_vars,
    tx.init(float_vars["params"]),
    batch_at,
    range(s.steps),
    bar=bar,
    curve=curves.setdefault("float", []),
  )
  branch = (float_vars, opt_state)
  float_vars, _ = train(
    float_step, float_vars, opt_state, batch_at, range(s.steps, total), bar=bar, curve=curves["float"]
  )
  stage("float training")

  def qat(model, label):
    bar.set_description(label)
    variables = {"params": branch[0]["params"], "quant_stats": quant_stats}
    steps = range(s.steps, total)
    out, _ = train(
      make_train_step(model, tx), variables, branch[1], batch_at, steps, bar=bar, curve=curves.setdefault(label, [])
    )
    stage(label)
    return out

  qat8_vars = qat(qat8_model, "QAT int8")
  qat4_vars = qat(qat4_model, "QAT int4w")
  bar.close()

  # PTQ: the final float parameters, activation ranges calibrated on training windows; no training.
  calib = [jnp.asarray(batch_at(total + i)[:, :-1]) for i in range(s.calib_batches)]
  ptq8_vars = qnn.calibrate(
    qat8_model, {"params": float_vars["params"], "quant_stats": quant_stats}, calib, method="percentile"
  )
  stage("PTQ calibration")

  # Serving: int8 kernels, the QAT model's activation ranges, integer dots.
  # Under jit, so that conversion compiles once instead of dispatching each small op on its own.
  served = jax.jit(functools.partial(qnn.convert, qat8_model))(qat8_vars, sample)
  stage("conversion")

  with tqdm(total=5, desc="evaluate", unit="model", dynamic_ncols=True) as ebar:
    ppl = {}
    for name, model, variables in (
      ("float", float_model, float_vars),
      ("ptq_int8", qat8_model, ptq8_vars),
      ("qat_int8", qat8_model, qat8_vars),
      ("qat_int4w", qat4_model, qat4_vars),
      ("serve_int8", qat8_model, served),
    ):
      ppl[name] = perplexity(model, variables, val)
      ebar.update(1)
  stage("evaluation")

  prompt = val_text[: s.context]
  float_out, float_tps = decode(float_model, float_vars, prompt, s.decode_tokens)
  serve_out, serve_tps = decode(qat8_model, served, prompt, s.decode_tokens)
  served4 = jax.jit(functools.partial(qnn.convert, qat4_model))(qat4_vars, sample)
  _, serve4_tps = decode(qat4_model, served4, prompt, s.decode_tokens)
  stage("window decoding")

  # KV-cache decoding: the same parameters (and serving variables) in models built with decode=True. Each
  # variant's speed-up is against the window re-run of the same weights: the same arithmetic, another algorithm.
  cached = {
    "float": (make_model(s, decode=True), float_vars),
    "int8": (make_model(s, INT8_WEIGHTS, INT8_ACTIVATIONS, decode=True), served),
    "int8_kv8": (make_model(s, INT8_WEIGHTS, INT8_ACTIVATIONS, decode=True, cache_config=KV8, products=True), served),
    "int4_kv8": (make_model(s, INT4_WEIGHTS, INT8_ACTIVATIONS, decode=True, cache_config=KV8, products=True), served4),
  }
  new_tokens = min(s.decode_tokens, s.context * 3 // 4)
  cached_prompt = val_text[: s.context - new_tokens]
  cached_out, cached_bps, cached_ppl, cache_bytes = {}, {}, {}, {}
  for name, (model, variables) in cached.items():
    cached_out[name], cached_bps[name] = cached_decode(model, variables, cached_prompt, new_tokens, s.context)
    cache_bytes[name] = cache_bytes_per_token(init_cache(model, 1, s.context), 1, s.context)
  stage("cached decoding")
  for name in ("float", "int8", "int8_kv8", "int4_kv8"):
    cached_ppl[name] = cached_perplexity(cached[name][0], cached[name][1], val, s.context)
  stage("cached perplexity")
  window_of = {"float": float_tps, "int8": serve_tps, "int8_kv8": serve_tps, "int4_kv8": serve4_tps}

  results = {
    "float_ppl": ppl["float"],
    "ptq_int8_ppl": ppl["ptq_int8"],
    "qat_int8_ppl": ppl["qat_int8"],
    "qat_int4w_ppl": ppl["qat_int4w"],
    "serve_int8_ppl": ppl["serve_int8"],
    "serve_int8_tokens_per_s": serve_tps,
    "float_tokens_per_s": float_tps,
    # Today's decoding, the window re-run of the int8 serving model (as serve_int8_tokens_per_s); the float
    # and int4-weight window re-runs are there too.
    "decode_bytes_per_s_window": serve_tps,
    "decode_bytes_per_s_window_float": float_tps,
    "decode_bytes_per_s_window_int4": serve4_tps,
    **{f"decode_bytes_per_s_{k}": v for k, v in cached_bps.items()},
    "kv_cache_bytes_per_token_float": cache_bytes["float"],
    "kv_cache_bytes_per_token_int8": cache_bytes["int8_kv8"],
    "ppl_cached_float": cached_ppl["float"],
    "ppl_int8_kvfloat": cached_ppl["int8"],
    "ppl_int8_kv8": cached_ppl["int8_kv8"],
    "ppl_int4_kv8": cached_ppl["int4_kv8"],
  }

  rows = (
    ("float", ppl["float"], f"{float_tps:,.0f}"),
    ("PTQ int8 (w8a8)", ppl["ptq_int8"], ""),
    ("QAT int8 (w8a8)", ppl["qat_int8"], ""),
    ("QAT int4 weights (w4a8)", ppl["qat_int4w"], ""),
    ("int8 serving (integer dots)", ppl["serve_int8"], f"{serve_tps:,.0f}"),
  )
  print(f"\n{'variant':<30}{'val ppl':>9}{'vs float':>10}{'decode tok/s':>14}")
  for name, p, tps in rows:
    print(f"{name:<30}{p:>9.4f}{100 * (p / ppl['float'] - 1):>+9.2f}%{tps:>14}")
  print(f"serving vs QAT int8: {100 * (ppl['serve_int8'] / ppl['qat_int8'] - 1):+.3f}%")
  print(f"\nprompt: {bytes(prompt[-60:]).decode('utf-8', 'replace')!r}")
  print(f"float  : {bytes(float_out.astype(np.uint8)).decode('utf-8', 'replace')!r}")
  print(f"int8   : {bytes(serve_out.astype(np.uint8)).decode('utf-8', 'replace')!r}")

  labels = {
    "float": "float, float32 KV cache",
    "int8": "int8 weights, float32 KV",
    "int8_kv8": "int8 weights, int8 KV",
    "int4_kv8": "int4 weights, int8 KV",
  }
  print(
    f"\nKV-cache decoding: batch 1, greedy, {new_tokens} new bytes after a {len(cached_prompt)}-byte prompt "
    "(int8 KV: int8 q·k and p·v)"
  )
  print(f"{'variant':<30}{'bytes/s':>10}{'vs window':>11}{'KV bytes/token':>16}{'val ppl':>10}")
  for label, bps, p in (
    ("window re-run, float", float_tps, ppl["float"]),
    ("window re-run, int8 weights", serve_tps, ppl["serve_int8"]),
    ("window re-run, int4 weights", serve4_tps, None),
  ):
    print(f"{label:<30}{bps:>10,.0f}{'1.0x':>11}{'':>16}{'' if p is None else f'{p:.4f}':>10}")
  for name, label in labels.items():
    print(
      f"{label:<30}{cached_bps[name]:>10,.0f}{cached_bps[name] / window_of[name]:>10.1f}x"
      f"{cache_bytes[name]:>16,.0f}{cached_ppl[name]:>10.4f}"
    )
  print("(vs window: against the window re-run of the same weights; val ppl of the cached rows: through the cache)")
  print(
    f"through the cache vs the full forward: float {100 * (cached_ppl['float'] / ppl['float'] - 1):+.5f}%, "
    f"int8 weights {100 * (cached_ppl['int8'] / ppl['serve_int8'] - 1):+.5f}%; int8 KV vs float KV "
    f"{100 * (cached_ppl['int8_kv8'] / cached_ppl['int8'] - 1):+.3f}%; int8 KV bytes "
    f"{cache_bytes['int8_kv8'] / cache_bytes['float']:.4f}x float32's"
  )
  print(f"\nprompt: {bytes(cached_prompt[-60:]).decode('utf-8', 'replace')!r}")
  for name in labels:
    print(f"{name:<9}: {bytes(cached_out[name].astype(np.uint8)).decode('utf-8', 'replace')!r}")

  if plot:
    save_plot(curves, s.steps, plot)
    print(f"loss curves: {plot}")
  print("time (wall / CPU s): " + ", ".join(f"{k} {w:.0f}/{c:.0f}" for k, (w, c) in stage.laps.items()))
  # CPU time too: on a shared machine it says what the run costs better than wall time does.
  print(f"wall time: {time.perf_counter() - t0:.1f} s, CPU time: {time.process_time() - cpu0:.1f} s")
  return results


def save_plot(curves: dict, float_steps: int, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def smooth(y, k=20):
    y = np.asarray(y)
    k = max(1, min(k, len(y) // 5 or 1))
    return np.convolve(y, np.ones(k) / k, mode="valid"), k

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, first in zip(axes, (0, float_steps)):
    for name, ys in curves.items():
      y, k = smooth(ys)
      x = np.arange(len(y)) + (0 if name == "float" else float_steps) + k - 1
      keep = x >= first
      # Float on top, dashed: the QAT curves lie almost on it and would hide it.
      style = dict(color="k", linestyle="--", linewidth=1, zorder=3) if name == "float" else {}
      ax.plot(x[keep], y[keep], label=name, **style)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("training loss (nats / byte, smoothed)")
  axes[0].set_title("float training; QAT variants branch off it")
  axes[1].set_title("the QAT steps, zoomed in")
  axes[1].legend()
  fig.suptitle("Byte-level transformer on Python standard-library source")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, help="float training steps")
  parser.add_argument("--qat-steps", type=int, help="QAT fine-tuning steps per quantized variant")
  parser.add_argument("--small", action="store_true", help="a tiny model and corpus, for a quick check")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
  parser.add_argument("--plot", metavar="PATH", help="save the loss curves as PNG")
  args = parser.parse_args(argv)
  overrides = dict(SMALL) if args.small else {}
  if args.steps is not None:
    overrides["steps"] = args.steps
  if args.qat_steps is not None:
    overrides["qat_steps"] = args.qat_steps
  results = run(Settings(seed=args.seed, **overrides), plot=args.plot)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()

"""jqat end to end on real data: float training, post-training quantization, QAT, integer serving.

The scikit-learn handwritten digits (8x8 images, shipped with the package) and a 64-256-256-10 MLP:

1. train the float model with stock ``nn.Dense``;
2. post-training quantization (PTQ) to int8: the same MLP with ``QatDense``, the float parameters loaded
   unchanged, activation ranges calibrated on the training set with min-max, percentile, entropy and MSE;
3. quantization-aware training (QAT) from the float model: int8 (w8a8), int4 weights with int8 activations,
   and fp8 e4m3 weights and activations;
4. conversion of the int8 QAT model to integer serving variables, and inference with int8 x int8 -> int32 dots.

Run: python examples/digits_qat.py [--json results.json] [--plot digits_qat.png]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import jqat
from jqat import linen as qnn

CALIB_METHODS = ("minmax", "percentile", "entropy", "mse")
INT8_ACT = jqat.QatConfig(bits="int8", symmetric=False)  # ReLU outputs are one-sided: asymmetric uses all 256 levels
QAT_VARIANTS = {
  # name: (label, weight config, activation config)
  "int8": ("w8a8", jqat.QatConfig(bits="int8", per_channel=True), INT8_ACT),
  "int4": ("w4a8", jqat.QatConfig(bits="int4", per_channel=True), INT8_ACT),
  "fp8_e4m3": ("fp8 e4m3 w+a", jqat.QatConfig(bits="fp8_e4m3", per_channel=True), jqat.QatConfig(bits="fp8_e4m3")),
}
BATCH = 32  # small batches: 44 steps per epoch on the 1437 training images


class Mlp(nn.Module):
  """64-256-256-10 with ReLU. ``dense`` is ``nn.Dense`` or a configured ``QatDense``: same parameter tree."""

  dense: Callable[..., nn.Module] = nn.Dense
  hidden: Sequence[int] = (256, 256)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(self.dense(width)(x))
    return self.dense(self.classes)(x)


def quantized_mlp(weight_config: jqat.QatConfig, activation_config: jqat.QatConfig) -> Mlp:
  return Mlp(dense=functools.partial(qnn.QatDense, weight_config=weight_config, activation_config=activation_config))


def load_data(subset: int | None = None):
  """The fixed stratified 80/20 split, pixels scaled to [0, 1]; ``subset`` keeps the first N training images."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
  if subset is not None:
    x_train, y_train = x_train[:subset], y_train[:subset]
  return x_train, y_train, x_test, y_test


# --- training ---------------------------------------------------------------------


@functools.cache
def _epoch_fn(model: nn.Module, tx: optax.GradientTransformation):
  """One jitted epoch (a ``lax.scan`` over batches): one compile per model and optimizer."""

  def loss_fn(params, state, xb, yb):
    # quant_stats is mutable: QAT layers update their moving-average activation ranges (frozen ranges stay
    # put); the float model has no such collection and returns no updates.
    logits, updates = model.apply({"params": params, **state}, xb, mutable=["quant_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return loss, {**state, **updates}

  def step(carry, batch):
    params, state, opt_state = carry
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), state, opt_state), loss

  @jax.jit
  def epoch(params, state, opt_state, xs, ys):
    (params, state, opt_state), losses = jax.lax.scan(step, (params, state, opt_state), (xs, ys))
    return params, state, opt_state, losses.mean()

  return epoch


def fit(model, variables, x, y, *, epochs: int, lr: float, seed: int, desc: str, verbose: bool = True) -> dict:
  """Adam with cosine decay over ``epochs``; fixed-size shuffled batches so every epoch reuses one compile."""
  batch = min(BATCH, len(x))
  steps = len(x) // batch
  tx = optax.adam(optax.cosine_decay_schedule(lr, max(epochs * steps, 1)))
  epoch = _epoch_fn(model, tx)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  bar = tqdm(range(epochs), desc=desc, disable=not verbose, leave=False)
  for _ in bar:
    idx = rng.permutation(len(x))[: steps * batch].reshape(steps, batch)
    params, state, opt_state, loss = epoch(params, state, opt_state, x[idx], y[idx])
    bar.set_postfix(loss=f"{float(loss):.4f}")
  return {"params": params, **state}


def init_stats(model, sample):
  """A quantized model's fresh ``quant_stats``. Only that collection is returned, so under ``jax.jit`` the
  random parameter initialization, which the float weights replace anyway, is never computed."""
  return jax.jit(lambda x: model.init(jax.random.key(0), x)["quant_stats"])(sample)


@functools.cache
def _convert_fn(model: nn.Module):
  return jax.jit(functools.partial(qnn.convert, model))


def convert(model, variables, sample):
  """``jqat.linen.convert`` under ``jax.jit``: one compile instead of one per operation of an eager run."""
  return _convert_fn(model)(variables, sample)


@functools.cache
def _eval_fn(model: nn.Module):
  def fn(variables, x, y):
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), jnp.argmax(logits, -1)

  return jax.jit(fn)


def evaluate(model, variables, x, y) -> tuple[float, float, np.ndarray]:
  """Test accuracy, mean cross-entropy and the predictions."""
  loss, pred = _eval_fn(model)(variables, x, y)
  pred = np.asarray(pred)
  return float(np.mean(pred == y)), float(loss), pred


# --- bytes and plots ----------------------------------------------------------------


def nbytes(tree) -> int:
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def serving_bytes(served: dict) -> int:
  """What serving needs: the remaining params (biases) and the ``serving`` collection (quantized kernels, their
  scales and column sums, activation scale and zero point). ``quant_stats`` rides along but is not read."""
  return nbytes(served["params"]) + nbytes(served["serving"])


def clip_range(variables: dict, layer: str, config: jqat.QatConfig) -> tuple[float, float]:
  """The float interval an activation's frozen (scale, zero point) represents: ((qmin - zp) s, (qmax - zp) s)."""
  stats = variables["quant_stats"][layer]["quant"]["lhs"]
  scale, zp = float(stats.scale), float(stats.zero_point)
  return (config.qmin - zp) * scale, (config.qmax - zp) * scale


def save_plot(path: str, results: dict, activations: np.ndarray, thresholds: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
  names = [k for k in results if k != "serve_int8_matches_qat"]
  accs = [100 * results[k] for k in names]
  colors = [
    "0.4" if k == "float" else "C0" if k.startswith("ptq") else "C1" if k.startswith("qat") else "C2" for k in names
  ]
  bars = ax0.bar(range(len(names)), accs, color=colors)
  ax0.bar_label(bars, fmt="%.1f", fontsize=8)
  ax0.axhline(accs[0], color="0.4", ls="--", lw=1)
  ax0.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  ax0.set_ylim(max(0.0, min(accs) - 5), 100.5)
  ax0.set_ylabel("test accuracy (%)")
  ax0.set_title("Digits MLP: float, PTQ int8, QAT, integer serving")

  ax1.hist(activations.ravel(), bins=200, color="0.6", log=True)
  for i, (method, upper) in enumerate(thresholds.items()):
    ax1.axvline(upper, color=f"C{i}", ls="-", lw=1.5, label=f"{method}: {upper:.2f}")
  ax1.set_xlabel("input of Dense_1 (float model, training set)")
  ax1.set_ylabel("count (log)")
  ax1.set_title("int8 clipping threshold of each calibration method")
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- the pipeline -------------------------------------------------------------------


def run(
  *,
  epochs: int = 40,
  qat_epochs: int = 8,
  subset: int | None = None,
  seed: int = 0,
  json_path: str | None = None,
  plot_path: str | None = None,
  verbose: bool = True,
) -> dict:
  """Trains, quantizes, fine-tunes and serves every variant; prints the table.

  Args:
    epochs: float training epochs.
    qat_epochs: QAT fine-tuning epochs of each variant.
    subset: use only the first N training images (the test set stays whole).
    seed: of the initialization and the batch order; a rerun with the same seed prints the same table.
    json_path: where to write the returned dict as JSON, if given.
    plot_path: where to save the two-panel PNG, if given.
    verbose: print the table and show progress bars.

  Returns:
    Test accuracies in [0, 1] under ``float``, ``ptq_int8_{minmax,percentile,entropy,mse}``,
    ``qat_{int8,int4,fp8_e4m3}`` and ``serve_int8``, and ``serve_int8_matches_qat``: the fraction of test
    predictions on which the integer serving path and the int8 QAT model agree.
  """
  log = print if verbose else lambda *a, **k: None
  x_train, y_train, x_test, y_test = load_data(subset)
  log(f"digits: {len(x_train)} train / {len(x_test)} test images, 64 pixels, 10 classes")
  results, rows, preds = {}, [], {}

  def record(key, bits, variables, model, size):
    results[key], loss, preds[key] = evaluate(model, variables, x_test, y_test)
    rows.append((key, bits, results[key], loss, size))

  # 1. Float model, stock Flax.
  float_model = Mlp()
  float_vars = jax.jit(float_model.init)(jax.random.key(seed), x_train[:1])  # jit: one compile, not one per op
  float_vars = fit(float_model, float_vars, x_train, y_train, epochs=epochs, lr=1e-3, seed=seed, desc="float")
  float_bytes = nbytes(float_vars["params"])
  record("float", "fp32", float_vars, float_model, float_bytes)

  # 2. PTQ: the float params load unchanged into the QatDense model; only the activation ranges are calibrated.
  # jqat.linen.calibrate(model, variables, batches, method=m) is these two steps in one call: run the training set
  # through the model with quant_calib mutable (the layers compute in float and gather a histogram of each
  # input), then freeze the ranges with method m. One pass of statistics serves every method, so the pass runs
  # once here and is frozen four ways. (One batch: the statistics merge exactly, so batching changes nothing.)
  models = {name: quantized_mlp(wcfg, acfg) for name, (_, wcfg, acfg) in QAT_VARIANTS.items()}
  ptq_model = models["int8"]  # the int8 QAT model itself: its jitted functions compile once for both
  ptq_init = {"params": float_vars["params"]}
  _, calib = jax.jit(functools.partial(ptq_model.apply, mutable=["quant_calib"]))(ptq_init, x_train)
  thresholds, ptq_bytes = {}, None
  for method in CALIB_METHODS:
    ptq_vars = qnn.freeze({**ptq_init, **calib}, method)
    if ptq_bytes is None:  # the serving layout, hence its size, is the same for every calibration method
      ptq_bytes = serving_bytes(convert(ptq_model, ptq_vars, x_train[:1]))
    record(f"ptq_int8_{method}", "w8a8", ptq_vars, ptq_model, ptq_bytes)
    thresholds[method] = clip_range(ptq_vars, "Dense_1", INT8_ACT)[1]

  # 3. QAT from the float weights, with quant_stats mutable: each layer keeps a moving average of its input's
  # range (seeded by the first batch's own range), so the ranges follow the weights as fine-tuning moves them
  # and no calibration pass is needed. Calibrating first (percentile) and fine-tuning with frozen ranges gave
  # the same test accuracy for all three formats here; the moving average is the simpler of the two.
  qat_served = {}
  for name, (bits, _, _) in QAT_VARIANTS.items():
    model = models[name]
    v = {"params": float_vars["params"], "quant_stats": init_stats(model, x_train[:1])}
    v = fit(model, v, x_train, y_train, epochs=qat_epochs, lr=3e-4, seed=seed, desc=f"QAT {name}")
    served = convert(model, v, x_train[:1])
    qat_served[name] = served
    record(f"qat_{name}", bits, v, model, serving_bytes(served))

  # 4. Integer serving of the int8 QAT model: int8 kernels, its activation ranges, int8 x int8 -> int32 dots.
  record("serve_int8", "w8a8 integer", qat_served["int8"], models["int8"], serving_bytes(qat_served["int8"]))
  results["serve_int8_matches_qat"] = float(np.mean(preds["serve_int8"] == preds["qat_int8"]))

  log(f"\n{'variant':<22} {'bits':<14} {'test acc':>9} {'test loss':>10} {'bytes':>9} {'vs fp32':>8}")
  for name, bits, acc, loss, size in rows:
    log(f"{name:<22} {bits:<14} {100 * acc:>8.2f}% {loss:>10.4f} {size:>9,} {float_bytes / size:>7.2f}x")
  log(f"serving predictions identical to QAT int8: {100 * results['serve_int8_matches_qat']:.2f}% of the test set")

  if plot_path:
    # The second layer's float input over the training set: what calibration observed there.
    p = float_vars["params"]["Dense_0"]
    acts = np.asarray(jax.nn.relu(x_train @ p["kernel"] + p["bias"]))
    save_plot(plot_path, results, acts, thresholds)
    log(f"plot: {plot_path}")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(results, f, indent=2)
    log(f"json: {json_path}")
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--epochs", type=int, default=40, help="float training epochs")
  parser.add_argument("--qat-epochs", type=int, default=8, help="QAT fine-tuning epochs per variant")
  parser.add_argument("--subset", type=int, default=None, help="use only the first N training images")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=".", help="directory for the default plot path")
  parser.add_argument("--plot", default=None, help="plot path (default: OUT/digits_qat.png)")
  parser.add_argument("--json", default=None, help="write the accuracies to this JSON file")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  run(
    epochs=args.epochs,
    qat_epochs=args.qat_epochs,
    subset=args.subset,
    seed=args.seed,
    json_path=args.json,
    plot_path=args.plot or os.path.join(args.out, "digits_qat.png"),
  )
  print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()

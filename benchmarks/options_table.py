"""What each QAT option buys: a small conv net on the scikit-learn digits at 4, 3 and 2 bits.

Every row starts from the same float model (one per seed) and gets the same QAT step budget; the metric is test
accuracy. Rows:

* ``ptq``: no training; activation ranges calibrated with the best of minmax / percentile / entropy / mse
  (chosen on the training set), per-channel min-max weights.
* ``qat_ste``: clipped STE, per-channel weights, asymmetric activations, ranges from a moving average seeded by
  the first batch's own range.
* ``qat_lsq``: as ``qat_ste`` with learned step sizes (LSQ, Esser et al. 2020) for weights and activations.
* ``qat_calibrated_start``: as ``qat_ste`` with the activation ranges calibrated (best PTQ method) and frozen
  before QAT, instead of taken from the batch.
* ``qat_sym_act``: as ``qat_ste`` with symmetric activations (ReLU outputs then use half the grid).
* ``qat_group32``: as ``qat_ste`` with weights in groups of 32 input features (the layers whose input has 32k
  features: the second conv and the head; the first conv, with one input channel, stays per-channel).

Columns: ``w4a8``, ``w3a8``, ``w2a8``, ``w4a4``.

Run: python benchmarks/options_table.py [--seeds 3] [--qat-steps 300] [--json options.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jqat
from jqat import linen as qnn

ROWS = ("ptq", "qat_ste", "qat_lsq", "qat_calibrated_start", "qat_sym_act", "qat_group32")
COLUMNS = {"w4a8": ("int4", "int8"), "w3a8": ("int3", "int8"), "w2a8": ("int2", "int8"), "w4a4": ("int4", "int4")}
CALIB_METHODS = ("minmax", "percentile", "entropy", "mse")
BATCH = 64


class Cnn(nn.Module):
  """conv 3x3 (32) - conv 3x3 stride 2 (32) - dense 10, ReLU; ``configs(cin)`` gives (weight, activation) configs."""

  configs: object = None  # None: float layers

  @nn.compact
  def __call__(self, x):
    def conv(features, strides, cin):
      if self.configs is None:
        return nn.Conv(features, (3, 3), strides=strides)
      w, a = self.configs(cin)
      return qnn.QatConv(features, (3, 3), strides=strides, weight_config=w, activation_config=a)

    x = nn.relu(conv(32, 1, 1)(x))
    x = nn.relu(conv(32, 2, 32)(x))
    x = x.reshape(x.shape[0], -1)
    if self.configs is None:
      return nn.Dense(10)(x)
    w, a = self.configs(x.shape[-1])
    return qnn.QatDense(10, weight_config=w, activation_config=a)(x)


def _configs(row: str, wbits: str, abits: str):
  lsq = "lsq" if row == "qat_lsq" else "ste"
  act = jqat.QatConfig(bits=abits, symmetric=row == "qat_sym_act", estimator=lsq)

  def fn(cin):
    if row == "qat_group32" and cin % 32 == 0:
      w = jqat.QatConfig(bits=wbits, per_channel=True, group_size=32)
    else:
      w = jqat.QatConfig(bits=wbits, per_channel=True, estimator=lsq)
    return w, act

  return fn


class _Configs:
  """A hashable stand-in for the closure: Flax modules are compared and hashed by their fields."""

  def __init__(self, row, wbits, abits):
    self.key, self.fn = (row, wbits, abits), _configs(row, wbits, abits)

  def __call__(self, cin):
    return self.fn(cin)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Configs) and self.key == other.key


def load_data():
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)


@functools.cache
def _epoch(model, tx):
  def step(carry, batch):
    params, state, opt_state = carry

    def loss_fn(p):
      logits, upd = model.apply({"params": p, **state}, batch[0], mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), {**state, **upd}

    (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return (optax.apply_updates(params, updates), state, opt_state), loss

  @jax.jit
  def run(params, state, opt_state, xs, ys):
    (params, state, opt_state), losses = jax.lax.scan(step, (params, state, opt_state), (xs, ys))
    return params, state, opt_state, losses

  return run


def fit(model, variables, x, y, *, steps, lr, seed):
  """Adam with cosine decay for exactly ``steps`` steps of ``BATCH`` images, one jitted scan."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  idx = np.random.default_rng(seed).integers(0, len(x), (steps, BATCH))
  params, state, _, losses = _epoch(model, tx)(params, state, tx.init(params), x[idx], y[idx])
  return {"params": params, **state}, np.asarray(losses)


@functools.cache
def _predict(model):
  return jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1))


def accuracy(model, variables, x, y) -> float:
  return float(np.mean(np.asarray(_predict(model)(variables, x)) == y))


def run_cell(row, wbits, abits, float_params, data, *, qat_steps, seed):
  x_train, x_test, y_train, y_test = data
  model = Cnn(configs=_Configs(row, wbits, abits))
  v = jax.jit(model.init)(jax.random.key(seed), x_train[:2])
  # The float weights replace the random ones; LSQ step sizes were initialized from the random ones, so they are
  # set again from the float weights.
  params = {**v["params"]}
  for name, p in float_params.items():
    params[name] = {**params[name], **p}
  if row == "qat_lsq":
    params = _lsq_init(params, wbits)
  v = {**v, "params": params}
  if row in ("ptq", "qat_calibrated_start"):
    best = None
    for method in CALIB_METHODS:
      frozen = qnn.calibrate(model, v, [x_train], method=method)
      acc = accuracy(model, frozen, x_train, y_train)
      if best is None or acc > best[0]:
        best = (acc, frozen)
    v = best[1]
    if row == "ptq":
      return accuracy(model, v, x_test, y_test)
  v, _ = fit(model, v, x_train, y_train, steps=qat_steps, lr=1e-3, seed=seed)
  return accuracy(model, v, x_test, y_test)


def _lsq_init(params, wbits):
  """LSQ weight step sizes started where the STE's per-channel min-max scale starts: ``max|w| / qmax`` of the
  float kernel, so the two rows differ only in whether the step size is learned."""
  flat = flax.traverse_util.flatten_dict(params)
  for path, value in list(flat.items()):
    if path[-1] == "rhs_scale":
      layer = path[0]
      kernel = flat[(layer, "kernel")]
      amax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
      qmax = jqat.QatConfig(bits=wbits).qmax
      flat[path] = jnp.maximum(amax / qmax, jqat.MIN_SCALE).reshape(value.shape)
  return flax.traverse_util.unflatten_dict(flat)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--float-steps", type=int, default=600)
  parser.add_argument("--qat-steps", type=int, default=300)
  parser.add_argument("--columns", default=",".join(COLUMNS))
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  data = load_data()
  x_train, x_test, y_train, y_test = data
  table = {r: {c: [] for c in args.columns.split(",")} for r in args.rows.split(",")}
  floats = []
  for seed in range(args.seeds):
    fm = Cnn()
    fv = jax.jit(fm.init)(jax.random.key(seed), x_train[:2])
    fv, _ = fit(fm, fv, x_train, y_train, steps=args.float_steps, lr=3e-3, seed=seed)
    floats.append(accuracy(fm, fv, x_test, y_test))
    for row in table:
      for col in table[row]:
        wbits, abits = COLUMNS[col]
        acc = run_cell(row, wbits, abits, fv["params"], data, qat_steps=args.qat_steps, seed=seed)
        table[row][col].append(acc)
        print(f"seed {seed} {row:<22} {col}: {acc:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
  print(f"\nfloat: {np.mean(floats):.4f} ± {np.std(floats):.4f}  (test accuracy, {args.seeds} seeds)")
  print("| row | " + " | ".join(next(iter(table.values()))) + " |")
  for row, cols in table.items():
    cells = [f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}" for v in cols.values()]
    print(f"| {row} | " + " | ".join(cells) + " |")
  wall = time.perf_counter() - start
  print(f"wall time: {wall:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"options_table": table, "metric": "accuracy", "float": floats, "wall_s": wall}, f, indent=2)


if __name__ == "__main__":
  main()

"""Quantization-aware training, calibration and integer serving on a 4 x 2 (data x model) mesh.

An MLP on the digits data set with int4 weights and int8 activations: the first layer is column-parallel (its
kernel split over ``model`` by output features), the second row-parallel (split by input features), written with
Flax logical axis names. Batches are split over ``data``. Everything runs under ``jax.jit`` on global arrays;
XLA inserts the collectives. On a machine without accelerators, eight CPU devices are simulated.

Run: python examples/sharded_training.py
"""

import os

# Eight simulated CPU devices; must be set before JAX starts. Real devices are used as they are.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jqat  # noqa: E402
from jqat import linen as qnn  # noqa: E402

# Logical axis names -> mesh axes. Hidden features ("mlp") are split over "model".
RULES = (("embed", None), ("mlp", "model"), ("classes", None))
WEIGHTS = jqat.QatConfig(bits="int4", per_channel=True)
ACTIVATIONS = jqat.QatConfig(bits="int8", symmetric=False)


class Mlp(nn.Module):
  hidden: int = 256
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    def dense(features, axes):
      return qnn.QatDense(
        features,
        weight_config=WEIGHTS,
        activation_config=ACTIVATIONS,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      )

    x = nn.relu(dense(self.hidden, ("embed", "mlp"))(x))  # column-parallel
    return dense(self.classes, ("mlp", "classes"))(x)  # row-parallel: partial sums all-reduced over "model"


def spec(a) -> str:
  return str(a.sharding.spec) if isinstance(a.sharding, NamedSharding) else str(a.sharding)


def main():
  start = time.time()
  n_data, n_model = 4, 2
  devices = jax.devices()
  mesh = jax.make_mesh((n_data, n_model), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices[:8])
  print(f"{len(devices)} devices ({devices[0].platform}); mesh {dict(mesh.shape)}")

  digits = load_digits()
  perm = np.random.default_rng(0).permutation(len(digits.target))
  x_all = (digits.data[perm] / 16.0).astype(np.float32)
  y_all = digits.target[perm].astype(np.int32)
  x_train, y_train, x_test, y_test = x_all[:1536], y_all[:1536], x_all[1536:1792], y_all[1536:1792]
  batch = NamedSharding(mesh, P("data"))  # split the batch over "data", replicate over "model"

  model = Mlp()
  # Parameters are created directly in their shardings: the logical names from nn.with_logical_partitioning
  # become mesh axes through RULES.
  abstract = jax.eval_shape(model.init, jax.random.key(0), x_train[:8])
  logical_specs = nn.get_partition_spec(abstract)
  variables = jax.jit(model.init, out_shardings=nn.logical_to_mesh_sharding(logical_specs, mesh, RULES))(
    jax.random.key(0), x_train[:8]
  )
  variables = nn.meta.unbox(variables)
  params, stats = variables["params"], variables["quant_stats"]

  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, stats, opt_state, xb, yb):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "quant_stats": stats}, xb, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["quant_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  @jax.jit
  def accuracy(variables, xb, yb):
    return jnp.mean(jnp.argmax(model.apply(variables, xb), -1) == yb)

  x_test_s, y_test_s = jax.device_put(x_test, batch), jax.device_put(y_test, batch)
  steps, bs = 200, 128
  rng = np.random.default_rng(1)
  for step in range(steps + 1):
    idx = rng.integers(0, len(x_train), bs)
    xb, yb = jax.device_put(x_train[idx], batch), jax.device_put(y_train[idx], batch)
    params, stats, opt_state, loss = train_step(params, stats, opt_state, xb, yb)
    if step % 50 == 0:
      print(f"step {step:4d}  QAT loss {float(loss):.4f}")
  qat = {"params": params, "quant_stats": stats}
  print(f"QAT accuracy (test): {float(accuracy(qat, x_test_s, y_test_s)):.4f}")
  # min / max over a batch-sharded array are global reductions: one range, the same on every device.
  lhs = stats["Dense_1"]["quant"]["lhs"].ema
  print(f"activation range of layer 2 (moving average): [{float(lhs.min):.4f}, {float(lhs.max):.4f}], {spec(lhs.max)}")

  # Calibration on sharded batches: statistics reduce across the data axis inside the jitted step.
  calib_batches = [jax.device_put(x_train[i : i + 256], batch) for i in range(0, 1024, 256)]
  qat = qnn.calibrate(model, qat, calib_batches, method="percentile")
  print(f"calibrated QAT accuracy (test): {float(accuracy(qat, x_test_s, y_test_s)):.4f}")

  # Conversion to integer serving variables, straight into their shardings: the quantized kernels take the
  # float kernels' specs, scales and column sums follow the output axis. Under jit, convert checks when it runs
  # that every activation has a range (calibrated above); a model without one fails here instead of serving.
  def convert(v, xb):
    return qnn.convert(model, v, xb)

  serving_specs = jqat.serving_partition_specs(
    jax.eval_shape(convert, qat, x_test_s), logical_specs, mesh=mesh, rules=RULES
  )
  served = jax.jit(convert, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), serving_specs))(qat, x_test_s)
  print(f"served accuracy (test, integer dots): {float(accuracy(served, x_test_s, y_test_s)):.4f}")

  print("shardings:")
  for name, a in [
    ("params/Dense_0/kernel (QAT, float)", params["Dense_0"]["kernel"]),
    ("params/Dense_1/kernel (QAT, float)", params["Dense_1"]["kernel"]),
    ("serving/Dense_0/quant/rhs/values", served["serving"]["Dense_0"]["quant"]["rhs"]["values"]),
    ("serving/Dense_0/quant/rhs/scale", served["serving"]["Dense_0"]["quant"]["rhs"]["scale"]),
    ("serving/Dense_1/quant/rhs/values", served["serving"]["Dense_1"]["quant"]["rhs"]["values"]),
    ("serving/Dense_1/quant/rhs/scale", served["serving"]["Dense_1"]["quant"]["rhs"]["scale"]),
    ("serving/Dense_1/quant/rhs/sums", served["serving"]["Dense_1"]["quant"]["rhs"]["sums"]),
    ("test batch", x_test_s),
  ]:
    shard = a.addressable_shards[0].data.shape
    print(f"  {name:<36} {a.dtype!s:<8} {a.shape!s:<10} {spec(a):<20} shard {shard}")
  print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
  main()

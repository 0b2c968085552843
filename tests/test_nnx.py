"""Flax NNX layers: drop-in parameters, training, statistics, modes, calibration, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import jqat


def _digits(n=None):
  d = load_digits()
  # A fixed shuffle: the file is ordered by writer, so its tail is not a fair test set.
  perm = np.random.default_rng(0).permutation(len(d.target))
  x = (d.data[perm] / 16.0).astype(np.float32)
  y = d.target[perm].astype(np.int32)
  return (x[:n], y[:n]) if n else (x, y)


class Mlp(nnx.Module):
  def __init__(self, dense, *, rngs):
    self.l1 = dense(64, 64, rngs=rngs)
    self.l2 = dense(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_same_parameters_as_linear():
  a = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  b = jqat.nnx.QatDense(5, 3, rngs=nnx.Rngs(0))
  pa = nnx.state(a, nnx.Param)
  pb = nnx.state(b, nnx.Param)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for u, w in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(u, w)
  stats = nnx.state(b, jqat.nnx.QuantStat)
  assert len(jax.tree.leaves(stats)) > 0


def test_statistics_follow_use_running_average():
  layer = jqat.nnx.QatDense(3, 2, rngs=nnx.Rngs(0))
  x = jnp.array([[-1.0, 2.0, 0.5]])
  assert int(layer.dot_general.lhs_stats.get_value().ema.count) == 0
  layer(x)
  assert int(layer.dot_general.lhs_stats.get_value().ema.count) == 3  # finite elements seen
  layer.eval()
  layer(x)
  assert int(layer.dot_general.lhs_stats.get_value().ema.count) == 3
  layer.train()
  layer(x)
  assert int(layer.dot_general.lhs_stats.get_value().ema.count) == 6


def test_modes_float_and_qat():
  x, _ = _digits(32)
  model = Mlp(jqat.nnx.QatDense, rngs=nnx.Rngs(0))
  ref = Mlp(nnx.Linear, rngs=nnx.Rngs(0))
  jqat.nnx.set_mode(model, "float")
  np.testing.assert_array_equal(model(x), ref(x))
  jqat.nnx.set_mode(model, "qat")
  y = model(x)
  rel = float(jnp.linalg.norm(y - ref(x)) / jnp.linalg.norm(ref(x)))
  assert 0 < rel < 0.03
  with pytest.raises(ValueError, match="mode='int4'"):
    jqat.nnx.set_mode(model, "int4")


def test_training_with_optax_learns_digits():
  x, y = _digits()
  xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
  model = Mlp(jqat.nnx.QatDense, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, xb, yb):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

    loss, g = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, g)
    return loss

  rng = np.random.default_rng(0)
  for _ in range(300):
    idx = rng.integers(0, len(xtr), 128)
    step(model, opt, xtr[idx], ytr[idx])
  model.eval()
  acc = float(jnp.mean(jnp.argmax(model(xte), -1) == yte))
  assert acc > 0.95, acc  # the float model reaches 0.975 with this loop


def test_calibrate_and_freeze():
  x, _ = _digits(512)
  model = Mlp(jqat.nnx.QatDense, rngs=nnx.Rngs(0))
  jqat.nnx.calibrate(model, [x[:256], x[256:]], method="minmax")
  st = model.l1.dot_general.lhs_stats.get_value()
  assert bool(st.frozen)
  np.testing.assert_allclose(float(st.scale), 1.0 / 255, rtol=1e-6)
  assert model.l1.dot_general.mode == "qat"
  model(x * 3)
  np.testing.assert_allclose(float(model.l1.dot_general.lhs_stats.get_value().scale), 1.0 / 255, rtol=1e-6)


def test_wrong_input_shape_is_a_clear_error():
  layer = jqat.nnx.QatDense(4, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"in_features=4.*\(3, 5\)"):
    layer(jnp.ones((3, 5)))


def test_conv_and_injected_dot_general():
  conv = jqat.nnx.QatConv(1, 4, (3, 3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
  ref = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
  rel = float(jnp.linalg.norm(conv(x) - ref(x)) / jnp.linalg.norm(ref(x)))
  assert 0 < rel < 0.03
  lin = nnx.LinearGeneral(6, (2, 3), dot_general=jqat.nnx.QatDotGeneral(), rngs=nnx.Rngs(0))
  g = nnx.grad(lambda m: jnp.sum(m(x[..., 0]) ** 2))(lin)
  assert float(jnp.abs(g["kernel"][...]).sum()) > 0


@pytest.mark.parametrize(
  "wcfg,acfg",
  [
    (jqat.QatConfig(per_channel=True), jqat.QatConfig(symmetric=False)),
    (jqat.QatConfig(bits="int4", per_channel=True), jqat.QatConfig(symmetric=False)),
    (jqat.QatConfig(per_channel=True), None),
  ],
  ids=["w8a8", "w4a8", "weight_only"],
)
def test_convert_serves_the_qat_forward(wcfg, acfg):
  x, _ = _digits(256)

  def dense(i, o, *, rngs):
    return jqat.nnx.QatDense(i, o, weight_config=wcfg, activation_config=acfg, rngs=rngs)

  model = Mlp(dense, rngs=nnx.Rngs(0))
  for i in range(3):
    model(x[i * 64 : (i + 1) * 64])
  model.eval()
  y_qat = model(x)
  jqat.nnx.convert(model)
  assert model.l1.kernel is None
  values = model.l1.dot_general.rhs_serving.get_value()["values"]
  assert values.dtype == wcfg.bits.storage_dtype
  y_serve = nnx.jit(lambda m, v: m(v))(model, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-4, atol=1e-4)
  assert float(jnp.mean(jnp.argmax(y_serve, -1) == jnp.argmax(y_qat, -1))) >= 0.998
  assert not any(isinstance(v, nnx.Param) and v.shape == (64, 64) for _, v in nnx.iter_graph(model))

"""Flax linen layers: drop-in parameters, training, statistics, calibration, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from flax.training import train_state
from sklearn.datasets import load_digits

import jqat
from jqat import linen as qnn


def _digits(n=None):
  d = load_digits()
  # A fixed shuffle: the file is ordered by writer, so its tail is not a fair test set.
  perm = np.random.default_rng(0).permutation(len(d.target))
  x = (d.data[perm] / 16.0).astype(np.float32)
  y = d.target[perm].astype(np.int32)
  return (x[:n], y[:n]) if n else (x, y)


class Mlp(nn.Module):
  dense: type = nn.Dense
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.dense(self.hidden)(x))
    return self.dense(10)(x)


def test_param_trees_identical_to_dense():
  x = jnp.ones((4, 64))
  float_vars = Mlp().init(jax.random.key(0), x)
  qat_vars = Mlp(dense=qnn.QatDense).init(jax.random.key(0), x)
  assert jax.tree.structure(float_vars["params"]) == jax.tree.structure(qat_vars["params"])
  # Same initializers, same key: the very same values.
  for a, b in zip(jax.tree.leaves(float_vars["params"]), jax.tree.leaves(qat_vars["params"])):
    np.testing.assert_array_equal(a, b)
  assert set(qat_vars) == {"params", "quant_stats"}


def test_fresh_model_is_float_plus_quantization_noise():
  x, _ = _digits(128)
  v = Mlp(dense=qnn.QatDense).init(jax.random.key(1), x)
  y_float = Mlp().apply({"params": v["params"]}, x)
  y_qat = Mlp(dense=qnn.QatDense).apply(v, x)
  # int8 on both operands of two layers: relative error of a few 1/127 steps.
  rel = float(jnp.linalg.norm(y_qat - y_float) / jnp.linalg.norm(y_float))
  assert 0 < rel < 0.03


def test_float_mode_is_exactly_float():
  x, _ = _digits(16)
  v = Mlp(dense=qnn.QatDense).init(jax.random.key(1), x)
  dense = functools.partial(qnn.QatDense, mode="float")
  np.testing.assert_array_equal(Mlp(dense=dense).apply(v, x), Mlp().apply({"params": v["params"]}, x))


def test_statistics_update_only_when_mutable_and_not_initializing():
  layer = qnn.QatDense(3)
  x = jnp.array([[-1.0, 2.0, 0.5]])
  v = layer.init(jax.random.key(0), x)
  assert int(v["quant_stats"]["quant"]["lhs"].ema.count) == 0
  layer.apply(v, x)  # not mutable: nothing to update, and no error
  _, upd = layer.apply(v, x, mutable=["quant_stats"])
  ema = upd["quant_stats"]["quant"]["lhs"].ema
  assert int(ema.count) == 3  # finite elements seen
  np.testing.assert_allclose([float(ema.min), float(ema.max)], [-1.0, 2.0])
  _, upd2 = layer.apply({**v, **upd}, 2 * x, mutable=["quant_stats"])
  ema2 = upd2["quant_stats"]["quant"]["lhs"].ema
  assert int(ema2.count) == 6
  # moving average with momentum 0.9: 0.9 * 2 + 0.1 * 4
  np.testing.assert_allclose(float(ema2.max), 0.9 * 2.0 + 0.1 * 4.0, rtol=1e-6)


def test_gradients_finite_and_reach_kernels():
  x, y = _digits(64)
  model = Mlp(dense=qnn.QatDense)
  v = model.init(jax.random.key(0), x)

  def loss(p):
    logits, _ = model.apply({**v, "params": p}, x, mutable=["quant_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  g = jax.grad(loss)(v["params"])
  for name in ("Dense_0", "Dense_1"):
    k = g[name]["kernel"]
    assert bool(jnp.all(jnp.isfinite(k)))
    assert float(jnp.abs(k).sum()) > 0


def _numpy_fake_quant(x, scale, zero_point, qmin, qmax):
  """(fake-quantized x, in-range mask): q = round_half_even(x * (1/s)) + z, clipped; (q - z) s. NumPy float32."""
  x = np.asarray(x, np.float32)
  s, z = np.float32(scale), np.float32(zero_point)
  q = np.round(x * (np.float32(1) / s)) + z  # np.round is half to even
  mask = (q >= qmin) & (q <= qmax)
  return ((np.clip(q, qmin, qmax) - z) * s).astype(np.float32), mask


def test_ste_gradient_of_layer_matches_masked_float_gradient():
  # y = fq(x) @ fq(W) with x's range frozen by calibration on data half as wide as x: about half of x lies outside
  # the frozen range and is clipped. The clipped STE (Bengio et al. 2013) passes dL/dx = (g fq(W)^T) * mask, with
  # mask the exact elementwise in-range indicator of x on the frozen grid; dL/dW = fq(x)^T g, where fq(x) holds
  # the clipped values. W's per-channel min-max scale covers W, so its mask is all ones.
  layer = qnn.QatDense(5, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (8, 6))
  v = layer.init(jax.random.key(1), x)
  v = qnn.calibrate(layer, v, [0.5 * x], method="minmax")
  lhs = v["quant_stats"]["quant"]["lhs"]
  assert bool(lhs.frozen)
  w = v["params"]["kernel"]
  gy = jax.random.normal(jax.random.key(2), (8, 5))
  gx, gw = jax.grad(lambda x, w: jnp.sum(layer.apply({**v, "params": {"kernel": w}}, x) * gy), argnums=(0, 1))(x, w)
  xq, mask = _numpy_fake_quant(x, lhs.scale, lhs.zero_point, -128, 127)
  assert 0.2 < mask.mean() < 0.8, mask.mean()  # the frozen range really clips, on both sides
  assert (~mask & (np.asarray(x) > 0)).any() and (~mask & (np.asarray(x) < 0)).any()
  wcfg = jqat.QatConfig(per_channel=True)
  wq = jqat.fake_quant(w, jqat.qparams_from_array(w, wcfg), wcfg)
  # Clipped inputs get exactly zero gradient, the others the float product's.
  np.testing.assert_array_equal(np.asarray(gx)[~mask], 0.0)
  np.testing.assert_allclose(gx, (np.asarray(gy) @ np.asarray(wq).T) * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, xq.T @ np.asarray(gy), rtol=1e-5, atol=1e-6)


def _train(model, x, y, steps, lr=3e-3, seed=0):
  v = model.init(jax.random.key(seed), x[:8])
  state = train_state.TrainState.create(apply_fn=model.apply, params=v["params"], tx=optax.adam(lr))
  stats = v.get("quant_stats", {})

  @jax.jit
  def step(state, stats, xb, yb):
    def loss_fn(p):
      logits, upd = state.apply_fn({"params": p, "quant_stats": stats}, xb, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["quant_stats"]

    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=g), stats, loss

  rng = np.random.default_rng(seed)
  losses, compiles = [], []
  for _ in range(steps):
    idx = rng.integers(0, len(x), 128)
    state, stats, loss = step(state, stats, x[idx], y[idx])
    losses.append(float(loss))
    compiles.append(step._cache_size())
  return state, stats, losses, compiles


def test_optax_training_learns_digits_without_recompiling():
  x, y = _digits()
  xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
  model = Mlp(dense=qnn.QatDense)
  state, stats, losses, compiles = _train(model, xtr, ytr, steps=300)
  # TrainState.create starts with step=0, a Python int: the first call traces
  # once for it. After that, 299 steps reuse one compilation.
  assert compiles[1] == compiles[-1] <= 2
  logits = model.apply({"params": state.params, "quant_stats": stats}, xte)
  acc = float(jnp.mean(jnp.argmax(logits, -1) == yte))
  assert acc > 0.95, acc  # the float model reaches 0.975 with this loop
  assert losses[-1] < losses[0] / 5


def test_attention_with_injected_qat_dot_general_trains():
  dg = qnn.QatDotGeneral
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, qkv_dot_general_cls=dg, out_dot_general_cls=dg)
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  target = jnp.roll(x, 1, axis=1)
  v = attn.init(jax.random.key(1), x)
  assert "quant_stats" in v
  params, stats = v["params"], v["quant_stats"]
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      out, upd = attn.apply({"params": p, "quant_stats": stats}, x, mutable=["quant_stats"])
      return jnp.mean((out - target) ** 2), upd["quant_stats"]

    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss, g

  losses = []
  for _ in range(60):
    params, stats, opt_state, loss, g = step(params, stats, opt_state)
    losses.append(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
  assert float(jnp.abs(g["query"]["kernel"]).sum()) > 0
  assert losses[-1] < 0.7 * losses[0]


def test_wrong_input_shape_names_the_layer():
  model = Mlp(dense=qnn.QatDense)
  v = model.init(jax.random.key(0), jnp.ones((2, 64)))
  with pytest.raises(ValueError, match=r"QatDense at '/Dense_0'.*\(2, 63\).*\(64, 64\)"):
    model.apply(v, jnp.ones((2, 63)))
  dims = (((1,), (0,)), ((), ()))
  with pytest.raises(ValueError, match=r"QatDotGeneral at '/'.*\(2, 5\).*\(3, 4\)"):
    qnn.QatDotGeneral().init(jax.random.key(0), jnp.ones((2, 5)), jnp.ones((3, 4)), dims)


def test_invalid_mode_is_rejected():
  with pytest.raises(ValueError, match="mode='int8'.*allowed"):
    qnn.QatDense(3, mode="int8").init(jax.random.key(0), jnp.ones((1, 2)))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibrate_freezes_ranges(method):
  x, _ = _digits(512)
  model = Mlp(dense=qnn.QatDense)
  v = model.init(jax.random.key(0), x[:8])
  frozen = qnn.calibrate(model, v, [x[:256], x[256:]], method=method)
  assert "quant_calib" not in frozen
  lhs0 = frozen["quant_stats"]["Dense_0"]["quant"]["lhs"]
  assert bool(lhs0.frozen)
  # Pixels lie in [0, 1]: every method's range covers part of it, asymmetric
  # int8 starting at 0 (zero point -128).
  assert 0 < float(lhs0.scale) <= 1.0 / 255 + 1e-7
  assert float(lhs0.zero_point) == -128.0
  if method == "minmax":
    np.testing.assert_allclose(float(lhs0.scale), 1.0 / 255, rtol=1e-6)
  # Frozen ranges do not move during further QAT steps.
  _, upd = model.apply(frozen, x[:64] * 3, mutable=["quant_stats"])
  np.testing.assert_array_equal(upd["quant_stats"]["Dense_0"]["quant"]["lhs"].scale, lhs0.scale)


def test_bfloat16_compute_dtype():
  model = Mlp(dense=functools.partial(qnn.QatDense, dtype=jnp.bfloat16))
  x, y = _digits(64)
  v = model.init(jax.random.key(0), x)
  out, _ = model.apply(v, x, mutable=["quant_stats"])
  assert out.dtype == jnp.bfloat16
  g = jax.grad(lambda p: model.apply({**v, "params": p}, x).astype(jnp.float32).sum())(v["params"])
  assert g["Dense_0"]["kernel"].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(g["Dense_0"]["kernel"])))


def test_serialization_round_trip_of_params_and_stats():
  x, y = _digits(256)
  model = Mlp(dense=qnn.QatDense)
  state, stats, _, _ = _train(model, x, y, steps=3)
  blob = serialization.to_bytes({"params": state.params, "quant_stats": stats})
  template = model.init(jax.random.key(5), x[:8])
  restored = serialization.from_bytes(template, blob)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": state.params, "quant_stats": stats})):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    model.apply(restored, x), model.apply({"params": state.params, "quant_stats": stats}, x)
  )


def test_lsq_scales_are_parameters_and_train():
  cfg_w = jqat.QatConfig(bits="int4", per_channel=True, estimator="lsq")
  cfg_a = jqat.QatConfig(symmetric=False, estimator="lsq")
  layer = qnn.QatDense(4, weight_config=cfg_w, activation_config=cfg_a)
  x = jax.random.normal(jax.random.key(0), (64, 8))
  target = x @ jax.random.normal(jax.random.key(3), (8, 4))
  v = layer.init(jax.random.key(1), x)
  q = v["params"]["quant"]
  assert set(q) == {"lhs_scale", "lhs_zero_point", "rhs_scale"}
  assert q["rhs_scale"].shape == (1, 4)
  loss_fn = jax.jit(lambda p: jnp.mean((layer.apply({**v, "params": p}, x) - target) ** 2))
  g = jax.grad(loss_fn)(v["params"])
  assert float(jnp.abs(g["quant"]["rhs_scale"]).sum()) > 0
  assert float(jnp.abs(g["quant"]["lhs_scale"]).sum()) > 0
  tx = optax.adam(3e-2)
  params, opt_state = v["params"], tx.init(v["params"])

  @jax.jit
  def step(params, opt_state):
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(80):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  # A random init fits a linear target: the loss falls by an order of magnitude in 80 Adam steps (about 50x here).
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
  # The step sizes are trained, not just given gradients: both moved well away from their initial values.
  for name in ("rhs_scale", "lhs_scale"):
    moved = float(jnp.max(jnp.abs(params["quant"][name] / q[name] - 1)))
    assert moved > 0.05, (name, moved)


def test_conv_trains_on_digits():
  class Cnn(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(qnn.QatConv(8, (3, 3))(x))
      x = x.reshape(x.shape[0], -1)
      return qnn.QatDense(10)(x)

  x, y = _digits(1024)
  x = x.reshape(-1, 8, 8, 1)
  model = Cnn()
  v = model.init(jax.random.key(0), x[:2])
  assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 1, 8)
  state, stats, losses, _ = _train(model, x, y, steps=60, lr=1e-2)
  assert losses[-1] < losses[0] / 3
  # The conv's kernel is quantized per output channel: 8 scales.
  conv_stats = stats["Conv_0"]["QatConvGeneralDilated_0"]["lhs"]
  assert int(conv_stats.ema.count) == 60 * 128 * 64

"""Conversion to serving variables and the integer serving path of the Flax layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from sklearn.datasets import load_digits

import jqat
from jqat import linen as qnn


def _digits(n):
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  return (d.data[perm][:n] / 16.0).astype(np.float32)


class Mlp(nn.Module):
  weight_config: jqat.QatConfig | None = jqat.QatConfig(bits="int8", per_channel=True)
  activation_config: jqat.QatConfig | None = jqat.QatConfig(bits="int8", symmetric=False)

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(qnn.QatDense, weight_config=self.weight_config, activation_config=self.activation_config)
    x = nn.relu(dense(128)(x))
    x = nn.relu(dense(64)(x))
    return dense(10)(x)


def _qat_variables(model, x):
  v = model.init(jax.random.key(0), x[:8])
  # A few forward passes so the activation ranges have moving averages.
  for i in range(3):
    _, upd = model.apply(v, x[i * 64 : (i + 1) * 64], mutable=["quant_stats"])
    v = {**v, **upd}
  return v


CONFIGS = {
  "w8a8": (jqat.QatConfig(per_channel=True), jqat.QatConfig(symmetric=False)),
  "w4a8": (jqat.QatConfig(bits="int4", per_channel=True), jqat.QatConfig(symmetric=False)),
  "w8a8_symmetric": (jqat.QatConfig(per_channel=True), jqat.QatConfig()),
  "w8_asym_a8": (jqat.QatConfig(per_channel=True, symmetric=False), jqat.QatConfig(symmetric=False)),
  "w8a8_per_token": (jqat.QatConfig(per_channel=True), jqat.QatConfig(per_channel=True, symmetric=False)),
  "fp8": (jqat.QatConfig(bits="fp8_e4m3", per_channel=True), jqat.QatConfig(bits="fp8_e4m3")),
  "w8_weight_only": (jqat.QatConfig(per_channel=True), None),
  "w4_weight_only": (jqat.QatConfig(bits="int4", per_channel=True), None),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_serving_matches_qat_forward(name):
  wcfg, acfg = CONFIGS[name]
  model = Mlp(weight_config=wcfg, activation_config=acfg)
  x = _digits(512)
  v = _qat_variables(model, x)
  served = qnn.convert(model, v, x[:8])
  for layer in ("Dense_0", "Dense_1", "Dense_2"):
    assert "kernel" not in served["params"][layer]  # the float kernel is gone
    values = served["serving"][layer]["quant"]["rhs"]["values"]
    assert values.dtype == wcfg.bits.storage_dtype
  y_qat = model.apply(v, x)
  y_serve = jax.jit(model.apply)(served, x)
  # Both run the same quantized arithmetic; they differ by float rounding of
  # the rescale (and, for fp8 or weight-only, of the float accumulation).
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-4, atol=1e-4)
  agree = float(jnp.mean(jnp.argmax(y_serve, -1) == jnp.argmax(y_qat, -1)))
  assert agree >= 0.998, agree


def test_int4_kernel_is_packed_two_per_byte():
  model = Mlp(weight_config=jqat.QatConfig(bits="int4", per_channel=True))
  x = _digits(256)
  served = qnn.convert(model, _qat_variables(model, x), x[:8])
  values = served["serving"]["Dense_0"]["quant"]["rhs"]["values"]
  assert values.dtype == jnp.uint8 and values.shape == (32, 128)  # kernel (64, 128)


def test_serving_hlo_has_integer_dot_with_int32_result():
  model = Mlp()
  x = _digits(256)
  served = qnn.convert(model, _qat_variables(model, x), x[:8])
  hlo = jax.jit(model.apply).lower(served, x[:4]).as_text()
  assert "xi8>" in hlo and "-> tensor<4x128xi32>" in hlo, hlo[:2000]


@functools.cache
def _served_dense(m=64, k=64, n=40):
  layer = qnn.QatDense(n, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (m, k))
  v = layer.init(jax.random.key(1), x)
  _, upd = layer.apply(v, x, mutable=["quant_stats"])
  return layer, qnn.convert(layer, {**v, **upd}, x), x


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fusion layout is XLA:CPU's")
def test_serving_writes_the_output_once_after_the_int8_dot():
  # Float activations in: the range reduction's NaN / Inf row mark, the quantize, the int8 dot and ONE
  # elementwise pass (zero-point correction, int32 -> float32, scale, mark) that writes the (M, N) output; no
  # float (M, N) intermediate written out and read back.
  layer, served, x = _served_dense()
  hlo = jax.jit(layer.apply).lower(served, x).compile().as_text()
  body = hlo[hlo.index("\nENTRY") :].splitlines()[1:]
  written = [line.split("=")[0].strip() for line in body if "= f32[64,40]" in line and "parameter(" not in line]
  assert len(written) == 1, written
  dots = [line for line in body if "= s32[64,40]" in line]
  assert len(dots) == 1, dots


def test_serving_marks_exactly_the_rows_that_held_nan_or_inf():
  layer, served, x = _served_dense()
  bad = x.at[3, 5].set(jnp.nan).at[10, 0].set(jnp.inf).at[20, 63].set(-jnp.inf)
  y = np.asarray(jax.jit(layer.apply)(served, bad))
  rows = [3, 10, 20]
  assert np.isnan(y[rows]).all()
  # The other rows: exactly what the same layer gives for them alone (the range is frozen, so rows are independent).
  alone = jax.jit(layer.apply)(served, np.delete(bad, rows, axis=0))
  np.testing.assert_array_equal(np.delete(y, rows, axis=0), np.asarray(alone))


def test_save_and_load_round_trip_keeps_integer_dtypes_and_size():
  x = _digits(256)
  sizes = {}
  for bits in ("int8", "int4"):
    model = Mlp(weight_config=jqat.QatConfig(bits=bits, per_channel=True))
    v = _qat_variables(model, x)
    served = qnn.convert(model, v, x[:8])
    blob = serialization.to_bytes(served)
    # Restore into a zero-filled template: only its structure is used.
    template = jax.tree.map(jnp.zeros_like, served)
    restored = serialization.from_bytes(template, blob)
    for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(restored)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.apply(restored, x), model.apply(served, x))
    kernels = sum(v["params"][k]["kernel"].nbytes for k in ("Dense_0", "Dense_1", "Dense_2"))
    values = sum(served["serving"][k]["quant"]["rhs"]["values"].nbytes for k in ("Dense_0", "Dense_1", "Dense_2"))
    sizes[bits] = values / kernels
  assert sizes["int8"] == 0.25 and sizes["int4"] == 0.125


def test_convert_without_activation_statistics_is_an_error():
  model = Mlp()
  x = _digits(16)
  v = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="no activation range"):
    qnn.convert(model, v, x)


def test_convert_after_calibration_uses_frozen_ranges():
  model = Mlp()
  x = _digits(512)
  v = model.init(jax.random.key(0), x[:8])
  frozen = qnn.calibrate(model, v, [x[:256], x[256:]], method="percentile")
  served = qnn.convert(model, frozen, x[:8])
  lhs = served["serving"]["Dense_0"]["quant"]["lhs"]
  np.testing.assert_array_equal(lhs["scale"], frozen["quant_stats"]["Dense_0"]["quant"]["lhs"].scale)
  np.testing.assert_allclose(model.apply(served, x), model.apply(frozen, x), rtol=1e-4, atol=1e-4)


def test_injected_dot_general_in_stock_dense_serves_from_quantized_copy():
  layer = nn.Dense(6, dot_general_cls=qnn.QatDotGeneral)
  x = jax.random.normal(jax.random.key(0), (16, 5))
  v = layer.init(jax.random.key(1), x)
  _, upd = layer.apply(v, x, mutable=["quant_stats"])
  v = {**v, **upd}
  served = qnn.convert(layer, v, x)
  assert "kernel" in served["params"]  # nn.Dense creates it itself
  assert served["serving"]["QatDotGeneral_0"]["rhs"]["values"].dtype == jnp.int8
  np.testing.assert_allclose(layer.apply(served, x), layer.apply(v, x), rtol=1e-5, atol=1e-5)


def test_conv_serves_with_an_integer_convolution():
  # Asymmetric weights and activations: both are centred on their zero points.
  wcfg = jqat.QatConfig(per_channel=True, symmetric=False)

  class Cnn(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(qnn.QatConv(8, (3, 3), weight_config=wcfg)(x))
      return qnn.QatConv(4, (3, 3), strides=2, padding="VALID", weight_config=wcfg)(x)

  model = Cnn()
  x = _digits(192).reshape(-1, 8, 8, 1)
  v = _qat_variables(model, x)
  served = qnn.convert(model, v, x[:4])
  assert served["serving"]["Conv_0"]["QatConvGeneralDilated_0"]["rhs"]["values"].dtype == jnp.int8
  # Zero padding (SAME) and strides: the integer convolution equals conv(fake_quant(x), fake_quant(w)).
  np.testing.assert_allclose(jax.jit(model.apply)(served, x), model.apply(v, x), rtol=1e-4, atol=1e-5)
  hlo = jax.jit(model.apply).lower(served, x[:2]).as_text()
  assert "convolution" in hlo and "xi16>" in hlo and "xi32>" in hlo

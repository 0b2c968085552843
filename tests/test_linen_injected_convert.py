"""convert drops the float kernels of stock Flax layers with jqat's ops injected, and they still serve."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

import jqat
from jqat import linen as qnn
from jqat._src.flax.linen import ConvertedParam


def _dot(bits):
  return qnn.QatDotGeneral if bits == 8 else functools.partial(qnn.QatDotGeneral, rhs_config=f"int{bits}")


def _layers(bits):
  dot = _dot(bits)
  return {
    "dense": (nn.Dense(256, dot_general_cls=dot), (2, 256)),
    "dense_general": (nn.DenseGeneral((4, 64), axis=(-2, -1), dot_general_cls=dot), (2, 8, 32)),
    "attention": (
      nn.MultiHeadDotProductAttention(2, qkv_features=256, qkv_dot_general_cls=dot, out_dot_general_cls=dot),
      (2, 3, 256),
    ),
  }


def _kernels(params) -> dict:
  flat = traverse_util.flatten_dict(dict(params))
  return {p: w for p, w in flat.items() if p[-1] == "kernel"}


def _nbytes(tree) -> int:
  return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def _trained(model, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  v = model.init(jax.random.key(0), x)
  _, stats = model.apply(v, x, mutable=["quant_stats"])
  return x, {**v, **stats}


def _check_served(model, x, qat, ratio, jit=False):
  served = qnn.convert(model, qat, x)
  kernels = _kernels(served["params"])
  assert kernels and len(kernels) == len(_kernels(qat["params"]))
  for path, k in kernels.items():
    assert isinstance(k, ConvertedParam), path
    assert _nbytes(k) == 0, path
    assert k.shape == jnp.shape(_kernels(qat["params"])[path]), path
  float_bytes = _nbytes(qat["params"])
  served_bytes = _nbytes(served["params"]) + _nbytes(served["serving"])
  assert served_bytes <= ratio * float_bytes, (served_bytes, float_bytes)
  y_qat, y_served = model.apply(qat, x), model.apply(served, x)
  np.testing.assert_allclose(y_served, y_qat, rtol=1e-4, atol=1e-4)
  if jit:  # the zero stand-ins are dead code under jit; the result is the same
    np.testing.assert_allclose(jax.jit(model.apply)(served, x), y_qat, rtol=1e-4, atol=1e-4)

  again = qnn.convert(model, served, x)
  assert jax.tree.structure(again) == jax.tree.structure(served)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(served), strict=True):
    np.testing.assert_array_equal(a, b)

  restored = serialization.from_bytes(served, serialization.to_bytes(served))
  np.testing.assert_array_equal(model.apply(restored, x), y_served)
  return served


@pytest.mark.parametrize("name", ["dense", "dense_general", "attention"])
@pytest.mark.parametrize(("bits", "ratio"), [(8, 0.27), (4, 0.15)])
def test_injected_dot_general_drops_its_kernel(name, bits, ratio):
  model, shape = _layers(bits)[name]
  x, qat = _trained(model, shape)
  _check_served(model, x, qat, ratio, jit=name == "dense" and bits == 8)


def test_injected_conv_drops_its_kernel():
  model = nn.Conv(64, (3, 3), conv_general_dilated_cls=qnn.QatConvGeneralDilated)
  x, qat = _trained(model, (1, 6, 6, 64))
  _check_served(model, x, qat, 0.27)


def test_kernel_cast_by_the_layer_stays_and_serves():
  # The op receives a bfloat16 copy, not the parameter itself: nothing to drop.
  model = nn.Dense(8, dtype=jnp.bfloat16, dot_general_cls=qnn.QatDotGeneral)
  x, qat = _trained(model, (2, 4))
  served = qnn.convert(model, qat, x)
  np.testing.assert_array_equal(served["params"]["kernel"], qat["params"]["kernel"])
  np.testing.assert_allclose(np.float32(model.apply(served, x)), np.float32(model.apply(qat, x)), rtol=2e-2, atol=2e-2)


def test_quantize_model_keeps_injected_kernels_as_before():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, dot_general_cls=qnn.QatDotGeneral)(x)

  qm = jqat.linen.quantize_model(Net())
  x, qat = _trained(qm, (2, 3))
  served = qnn.convert(qm, qat, x)
  for k in _kernels(served["params"]).values():
    assert not isinstance(k, ConvertedParam)
  np.testing.assert_allclose(qm.apply(served, x), qm.apply(qat, x), rtol=1e-4, atol=1e-4)

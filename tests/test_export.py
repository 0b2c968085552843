"""``jqat.export``: the integer serving function as a ``jax.export`` artifact.

The round trip deserializes the artifacts in a fresh Python process that imports only ``jax`` and ``numpy`` and
compares its outputs bit for bit with the served outputs of the model in this process.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqat
from jqat import linen as qnn

IN, HIDDEN, OUT, BATCH = 12, 16, 4, 8
# (lhs, rhs) -> out of every stablehlo.dot_general in a module's text.
_DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\(tensor<([^>]*)>, tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>")


class Mlp(nn.Module):
  bits: str = "int8"
  symmetric_activations: bool = False

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(
      qnn.QatDense,
      weight_config=jqat.QatConfig(bits=self.bits, per_channel=True),
      activation_config=jqat.QatConfig(bits="int8", symmetric=self.symmetric_activations),
    )
    hidden = dense(HIDDEN)(x)  # built first: Dense_0
    return dense(OUT)(nn.relu(hidden))


def _x(seed=1, batch=BATCH):
  return jax.random.normal(jax.random.key(seed), (batch, IN))


def _qat(model, x):
  # Under jit: one compiled program instead of the layers' ops one by one.
  v = jax.jit(model.init)(jax.random.key(0), x)
  _, stats = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats"]))(v, x)
  return {**v, **stats}


def _convert(model, qat, x):
  return jax.jit(lambda v, x: qnn.convert(model, v, x))(qat, x)


@functools.cache
def _linen(bits: str):
  model, x = Mlp(bits), _x()
  qat = _qat(model, x)
  return model, qat, _convert(model, qat, x)


def _nnx_model(convert=False):
  def build():
    model = nnx.Sequential(
      jqat.nnx.QatDense(IN, HIDDEN, rngs=nnx.Rngs(0)), nnx.relu, jqat.nnx.QatDense(HIDDEN, OUT, rngs=nnx.Rngs(1))
    )
    model(_x())  # moving-average activation ranges
    if convert:
      jqat.nnx.convert(model)
    return model

  return nnx.jit(build)()  # one compiled program instead of the layers' ops one by one


def _served(model, served, x):
  return jax.jit(lambda x: model.apply(served, x))(x)


def _dots(exported) -> list[tuple[str, str, str]]:
  return _DOT.findall(exported.mlir_module())


# --- the artifact ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_stablehlo_has_the_int8_dot(bits):
  model, _, served = _linen(bits)
  dots = _dots(jqat.export(model, served, _x()))
  # One dot per layer, each int8 x int8 -> int32 (int4 kernels unpack to int8 in the graph).
  assert dots == [(f"{BATCH}x{IN}xi8", f"{IN}x{HIDDEN}xi8", f"{BATCH}x{HIDDEN}xi32"),
                  (f"{BATCH}x{HIDDEN}xi8", f"{HIDDEN}x{OUT}xi8", f"{BATCH}x{OUT}xi32")]  # fmt: skip


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8_e4m3"])
def test_outputs_equal_the_served_outputs(bits):
  model, qat, served = _linen(bits)
  x = _x(seed=2)
  exported = jqat.export(model, served, x)
  y = np.asarray(exported.call(x))
  assert y.tobytes() == np.asarray(_served(model, served, x)).tobytes()  # bit for bit: the same program
  # ... and it is the integer path: within float rounding of the QAT forward, not the float model.
  np.testing.assert_allclose(y, jax.jit(model.apply)(qat, x), atol=1e-5)


def test_variables_are_baked_in_as_constants():
  model, _, served = _linen("int4")
  exported = jqat.export(model, served, _x())
  assert [a.shape for a in exported.in_avals] == [(BATCH, IN)]  # the inputs only
  assert exported.nr_devices == 1 and exported.platforms == ("cpu",)
  # The packed kernel is a constant of the module: its bytes appear in its text as a dense uint8 constant.
  assert f"tensor<{(IN + 1) // 2}x{HIDDEN}xui8>" in exported.mlir_module()


def test_fp8_kernel_is_an_fp8_constant():
  model, _, served = _linen("fp8_e4m3")
  exported = jqat.export(model, served, _x())
  assert f"tensor<{IN}x{HIDDEN}xf8E4M3FN>" in exported.mlir_module()  # one byte per weight in the artifact
  assert [d[1] for d in _dots(exported)] == [f"{IN}x{HIDDEN}xf32", f"{HIDDEN}x{OUT}xf32"]  # cast in the graph


def test_lowers_for_cpu_cuda_and_tpu():
  # Lowering for a platform needs no device of it: this checks that every op has a lowering for each platform
  # and that the artifact carries all three; compiling and running on CUDA or TPU is not checked here.
  model, _, served = _linen("int8")
  x = _x()
  exported = jqat.export(model, served, x, platforms=("cpu", "cuda", "tpu"))
  assert exported.platforms == ("cpu", "cuda", "tpu")
  assert all(d[0].endswith("xi8") and d[1].endswith("xi8") and d[2].endswith("xi32") for d in _dots(exported))
  restored = jax.export.deserialize(exported.serialize())
  assert restored.platforms == ("cpu", "cuda", "tpu")
  assert np.asarray(restored.call(x)).tobytes() == np.asarray(_served(model, served, x)).tobytes()


def test_nnx_module():
  model = _nnx_model()
  x = _x(seed=3)
  y_qat = nnx.jit(lambda m, x: m(x))(model, x)
  jqat.nnx.convert(model)
  before = jax.tree.map(np.asarray, nnx.state(model))
  exported = jqat.export(model, x)  # the module holds its variables: the example inputs follow it
  assert [a.shape for a in exported.in_avals] == [(BATCH, IN)]
  y = np.asarray(exported.call(x))
  assert y.tobytes() == np.asarray(nnx.jit(lambda m, x: m(x))(model, x)).tobytes()
  np.testing.assert_allclose(y, y_qat, atol=1e-5)
  assert len(_dots(exported)) == 2 and all(d[2].endswith("xi32") for d in _dots(exported))
  after = jax.tree.map(np.asarray, nnx.state(model))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))  # exporting leaves the module as it was


def test_apply_kwargs_are_baked_in():
  class WithFlag(nn.Module):
    @nn.compact
    def __call__(self, x, negate: bool = False):
      y = qnn.QatDense(OUT)(x)
      return -y if negate else y

  model, x = WithFlag(), _x()
  served = _convert(model, _qat(model, x), x)
  y = jqat.export(model, served, x, negate=True).call(x)
  assert np.asarray(y).tobytes() == np.asarray(-_served(model, served, x)).tobytes()


# --- bad input ---------------------------------------------------------------------------------


def test_qat_variables_are_refused():
  model, qat, _ = _linen("int8")
  with pytest.raises(ValueError, match=r"no quantized kernel .*'params', 'quant_stats'.*jqat\.linen\.convert"):
    jqat.export(model, qat, _x())


def test_unconverted_nnx_module_is_refused():
  with pytest.raises(ValueError, match=r"not converted \(its 2 jqat ops hold float kernels\).*jqat\.nnx\.convert"):
    jqat.export(_nnx_model(), _x())
  with pytest.raises(ValueError, match="it has no jqat layer"):
    jqat.export(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), _x())


def test_other_inputs_are_refused():
  model, _, served = _linen("int8")
  with pytest.raises(TypeError, match="expected a linen nn.Module .* or a converted nnx.Module"):
    jqat.export(lambda x: x, served, _x())
  with pytest.raises(TypeError, match="needs its serving variables"):
    jqat.export(model, [served], _x())
  with pytest.raises(ValueError, match=r"platforms='cpu' is invalid"):
    jqat.export(model, served, _x(), platforms="cpu")
  with pytest.raises(TypeError, match="example argument 0 is a str"):
    jqat.export(model, served, "x")
  (b,) = jax.export.symbolic_shape("b")
  with pytest.raises(ValueError, match=r"example argument 0 has the symbolic shape \(b, 12\)"):
    jqat.export(model, served, jax.ShapeDtypeStruct((b, IN), jnp.float32))


def test_variables_of_another_config_name_the_layer():
  model, _, served = _linen("int8")
  with pytest.raises(ValueError, match=r"at '/Dense_0/quant': .*hold int8 symmetric per-channel kernel.*expects int4"):
    jqat.export(Mlp("int4"), served, _x())


def test_corrupt_artifacts_raise_and_run_nothing(tmp_path):
  model, _, served = _linen("int8")
  data = jqat.export(model, served, _x()).serialize()
  with pytest.raises(Exception):  # noqa: B017, PT011 (the flatbuffer reader's own error)
    jax.export.deserialize(bytearray(data[: len(data) // 2]))
  # A pickle that would write a file if it were unpickled: deserialize reads a flatbuffer, never a pickle.
  marker = tmp_path / "ran"
  payload = pickle.dumps(_WritesFile(str(marker)))
  with pytest.raises(Exception):  # noqa: B017, PT011
    jax.export.deserialize(bytearray(payload))
  assert not marker.exists()


class _WritesFile:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


# --- a fresh process with jax alone -------------------------------------------------------------


def test_round_trip_in_a_process_without_jqat_or_flax(tmp_path):
  x = _x(seed=4)
  cases = {}
  for bits in ("int8", "int4", "fp8_e4m3"):
    model, _, served = _linen(bits)
    cases[f"linen_{bits}"] = (jqat.export(model, served, x), _served(model, served, x))
  nnx_model = _nnx_model(convert=True)
  cases["nnx_int8"] = (jqat.export(nnx_model, x), nnx.jit(lambda m, x: m(x))(nnx_model, x))
  np.save(tmp_path / "x.npy", np.asarray(x))
  for name, (exported, y) in cases.items():
    (tmp_path / f"{name}.bin").write_bytes(exported.serialize())
    np.save(tmp_path / f"{name}.npy", np.asarray(y))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("PYTHONPATH", None)  # nothing of the project on the path
  proc = subprocess.run(
    [sys.executable, "-c", _LOADER, str(tmp_path), *cases],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  assert result["imported"] == []  # no jqat, flax, optax or orbax module was loaded
  assert result["equal"] == dict.fromkeys(cases, True)


# Runs in the fresh process: jax and numpy only.
_LOADER = """
import json, os, sys
import jax
import numpy as np

folder, names = sys.argv[1], sys.argv[2:]
x = np.load(os.path.join(folder, "x.npy"))
equal = {}
for name in names:
  with open(os.path.join(folder, name + ".bin"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  want = np.load(os.path.join(folder, name + ".npy"))
  got = np.asarray(exported.call(x))
  equal[name] = got.dtype == want.dtype and got.tobytes() == want.tobytes()
imported = sorted({m.split(".")[0] for m in sys.modules} & {"jqat", "flax", "optax", "orbax"})
print(json.dumps({"equal": equal, "imported": imported}))
"""

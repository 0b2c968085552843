"""NNX layers on eight simulated devices: a row-parallel layer on a mesh with Explicit axes honours out_sharding.

As in test_sharding.py, the eight-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts, so they run once in a subprocess (this file run as a script) that prints one JSON line.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest

BATCH, IN, OUT = 16, 24, 12
# QatDense; nnx.Linear with a QatDotGeneral put in by quantize_model; QatEinsum (its output sharding permuted).
VARIANTS = ("qat_dense", "quantize_model", "qat_einsum")


def _run_eight_devices() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1])


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
  # Under pytest-xdist the first worker to take the lock runs the subprocess; the others read its result.
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  result = shared / "nnx_eight_devices.json"
  with open(shared / "nnx_eight_devices.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not result.exists():
      result.write_text(json.dumps(_run_eight_devices()))
  return json.loads(result.read_text())


def test_stock_layer_needs_out_sharding(sharded):
  assert sharded["devices"] == 8
  assert sharded["stock_without"] == "Contracting dimensions are sharded"
  assert sharded["stock_spec"] == ["data", None]


@pytest.mark.parametrize("how", VARIANTS)
def test_row_parallel_on_an_explicit_mesh(sharded, how):
  r = sharded[how]
  assert r["without"] == "Contracting dimensions are sharded"  # as the stock layer
  assert r["kernel_spec"] == ["model", None]
  assert r["quantized"] > 1e-3  # the layer quantizes: its output is not the float one
  assert r["spec"] == ["data", None] and r["serve_spec"] == ["data", None]
  # The same integer sums on every split; the rescale and the order of the partial sums differ by rounding.
  assert r["qat_diff"] <= 1e-5
  assert r["grad_rel_diff"] <= 1e-5
  assert r["serve_diff"] <= 1e-5


# --- the subprocess --------------------------------------------------------------------------


def _variant(name, rngs):
  from flax import nnx

  import jqat

  if name == "qat_dense":
    return jqat.nnx.QatDense(IN, OUT, rngs=rngs)
  if name == "quantize_model":
    return jqat.nnx.quantize_model(nnx.Linear(IN, OUT, rngs=rngs))
  return jqat.nnx.QatEinsum("bi,io->bo", (IN, OUT), (OUT,), rngs=rngs)


def _first_error(f) -> str:
  try:
    f()
  except Exception as e:  # noqa: BLE001 - the message is what is compared
    return "Contracting dimensions are sharded" if "Contracting dimensions are sharded" in str(e) else repr(e)[:300]
  return "no error"


def _main():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jqat

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  out = P("data", None)
  h = np.random.default_rng(0).normal(size=(BATCH, IN)).astype(np.float32)

  def place(model):
    # Kernel rows (the contraction) over "model", everything else replicated.
    state = nnx.state(model)
    specs = jax.tree_util.tree_map_with_path(
      lambda path, a: P("model", None) if "kernel" in jax.tree_util.keystr(path) and a.ndim == 2 else P(), state
    )
    nnx.update(model, jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), state, specs))

  def loss(m, x, **kw):
    return jnp.sum(m(x, **kw) ** 2)

  results = {"devices": len(jax.devices())}
  with jax.set_mesh(mesh):
    hs = jax.device_put(h, NamedSharding(mesh, P("data", "model")))
    stock = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    place(stock)
    results["stock_without"] = _first_error(lambda: nnx.jit(lambda m, x: m(x))(stock, hs))
    results["stock_spec"] = list(nnx.jit(lambda m, x: m(x, out_sharding=out))(stock, hs).sharding.spec)

  for name in VARIANTS:
    one = _variant(name, nnx.Rngs(0))
    kernel, bias = np.asarray(one.kernel[...]), np.asarray(one.bias[...])
    y_float = h @ kernel + bias
    one(h)  # statistics from one batch, on one device
    one.eval()
    y_one = one(h)
    g_one = nnx.state(nnx.grad(loss)(one, h), nnx.Param)
    layer = _variant(name, nnx.Rngs(0))
    nnx.update(layer, nnx.state(one))
    layer.eval()
    jqat.nnx.convert(one)
    s_one = one(h)
    with jax.set_mesh(mesh):
      place(layer)
      hs = jax.device_put(h, NamedSharding(mesh, P("data", "model")))
      without = _first_error(lambda layer=layer, hs=hs: nnx.jit(lambda m, x: m(x))(layer, hs))
      kernel_spec = list(layer.kernel[...].sharding.spec)
      y = nnx.jit(lambda m, x: m(x, out_sharding=out))(layer, hs)
      g = nnx.state(nnx.jit(nnx.grad(lambda m, x: loss(m, x, out_sharding=out)))(layer, hs), nnx.Param)
      jqat.nnx.convert(layer)
      s = nnx.jit(lambda m, x: m(x, out_sharding=out))(layer, hs)
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(g_one))
    results[name] = {
      "without": without,
      "kernel_spec": kernel_spec,
      "quantized": float(np.max(np.abs(np.asarray(y_one) - y_float))),
      "spec": list(y.sharding.spec),
      "qat_diff": float(np.max(np.abs(np.asarray(y) - np.asarray(y_one)))),
      "grad_rel_diff": max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_one))
      )
      / scale,
      "serve_diff": float(np.max(np.abs(np.asarray(s) - np.asarray(s_one)))),
      "serve_spec": list(s.sharding.spec),
    }
  print(json.dumps(results))


if __name__ == "__main__":
  _main()

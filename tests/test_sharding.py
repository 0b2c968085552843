"""Sharding: the spec helpers, and QAT, calibration and serving on eight simulated devices.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, while the
rest of the suite runs on one device, so they run once, all together, in a subprocess (this file run as a script),
which prints one JSON line of results; the tests below assert on it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jqat
from jqat import linen as qnn

MESH = {"data": 4, "model": 2}
RULES = (("batch", "data"), ("embed", None), ("mlp", "model"), ("classes", None))
# Distinct sizes, so that a gathered kernel cannot be mistaken for an activation in the HLO.
BATCH, IN, HIDDEN, OUT = 64, 20, 48, 12


class Mlp(nn.Module):
  """Column-parallel then row-parallel (Megatron style), with Flax logical axis names."""

  weight_config: jqat.QatConfig = jqat.QatConfig(bits="int8", per_channel=True)
  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, x):
    def dense(features, axes):
      return qnn.QatDense(
        features,
        weight_config=self.weight_config,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      )

    x = nn.relu(dense(self.hidden, ("embed", "mlp"))(x))
    return dense(OUT, ("mlp", "classes"))(x)


# --- spec helpers: no devices needed -----------------------------------------------


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8_e4m3"])
def test_column_parallel_scales_follow_output_axis(bits):
  cfg = jqat.QatConfig(bits=bits, per_channel=True)
  s = jqat.qtensor_partition_spec(P(None, "model"), cfg, (64, 32), mesh=MESH)
  assert (s.values, s.scale, s.zero_point) == (P(None, "model"),) * 3
  assert (s.config, s.shape) == (cfg, (64, 32))


@pytest.mark.parametrize("bits", ["int8", "int4", "int2"])
def test_row_parallel_scales_replicated(bits):
  cfg = jqat.QatConfig(bits=bits, per_channel=True)
  s = jqat.qtensor_partition_spec(P("model"), cfg, (64, 32), mesh=MESH)
  assert s.values == P("model", None)
  assert s.scale == s.zero_point == P(None, None)


def test_per_tensor_scale_replicated():
  s = jqat.qtensor_partition_spec(P("data", "model"), jqat.QatConfig(), (64, 32), mesh=MESH)
  assert s.values == P("data", "model") and s.scale == s.zero_point == P()  # per-tensor parameters have shape ()


def test_per_group_scales_follow_contraction_when_groups_divide():
  cfg = jqat.QatConfig(bits="int4", per_channel=True, group_size=8)
  # 64 rows -> 8 groups over 2 shards: each shard holds 4 whole groups.
  s = jqat.qtensor_partition_spec(P("model", None), cfg, (64, 32), mesh=MESH)
  assert s.scale == P("model", None)
  # 16 rows -> 2 groups over 4 shards: a group spans shards, its scale is replicated.
  s = jqat.qtensor_partition_spec(P("data", None), cfg.replace(group_size=8), (16, 32), mesh=MESH)
  assert s.values == P("data", None) and s.scale == P(None, None)


def test_spec_tree_maps_to_shardings():
  s = jqat.qtensor_partition_spec(P(None, "model"), jqat.QatConfig(per_channel=True), (8, 4), mesh=MESH)
  assert jax.tree.leaves(s) == [P(None, "model")] * 3
  t = jax.tree.map(lambda p: p, s)  # a PyTree of specs, config and shape static
  assert jax.tree.structure(t) == jax.tree.structure(s) and jax.tree.leaves(t) == jax.tree.leaves(s)


@pytest.mark.parametrize("rows, entry", [(6, "model"), (12, ("data", "model")), (7, "model")])
def test_packed_shards_must_hold_whole_bytes(rows, entry):
  cfg = jqat.QatConfig(bits="int4", per_channel=True)
  with pytest.raises(ValueError, match="even number of rows"):
    jqat.qtensor_partition_spec(P(entry, None), cfg, (rows, 32), mesh=MESH)
  # int8 has no bytes to split; neither does an unsharded row axis.
  jqat.qtensor_partition_spec(P(entry, None), cfg.replace(bits="int8"), (rows * 8, 32), mesh=MESH)
  jqat.qtensor_partition_spec(P(None, "model"), cfg, (rows, 32), mesh=MESH)


def test_packed_needs_a_mesh_to_check():
  cfg = jqat.QatConfig(bits="int4")
  with pytest.raises(ValueError, match="pass mesh="):
    jqat.qtensor_partition_spec(P("model"), cfg, (8, 4))
  mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
  assert jqat.qtensor_partition_spec(P("model"), cfg, (8, 4), mesh=mesh).values == P("model", None)


def test_spec_errors_name_the_problem():
  cfg = jqat.QatConfig()
  with pytest.raises(ValueError, match="more entries"):
    jqat.qtensor_partition_spec(P("data", "model", None), cfg, (8, 4), mesh=MESH)
  with pytest.raises(ValueError, match="'tensor' is not in the mesh axes"):
    jqat.qtensor_partition_spec(P("tensor"), cfg.replace(per_channel=True, channel_axis=0), (8, 4), mesh=MESH)


def _abstract_serving(weight_config, hidden=HIDDEN):
  model = Mlp(weight_config=weight_config, hidden=hidden)
  x = jnp.ones((BATCH, IN))
  qat = jax.eval_shape(model.init, jax.random.key(0), x)
  specs = nn.get_partition_spec(qat)
  served = jax.eval_shape(lambda v: qnn.convert(model, v, x), nn.meta.unbox(qat))
  return served, specs


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_serving_specs_follow_float_kernels(bits):
  served, specs = _abstract_serving(jqat.QatConfig(bits=bits, per_channel=True))
  out = jqat.serving_partition_specs(served, specs, mesh=MESH, rules=RULES)
  assert jax.tree.structure(out, is_leaf=lambda s: isinstance(s, P)) == jax.tree.structure(served)
  col, row = out["serving"]["Dense_0"]["quant"], out["serving"]["Dense_1"]["quant"]
  # The format record and the contracting axes are small replicated vectors.
  assert col["rhs"] == {
    **{k: P(None, "model") for k in ("values", "scale", "zero_point", "sums")},
    "layout": P(),
    "contracting": P(),
  }
  assert row["rhs"] == {
    "values": P("model", None),
    "scale": P(None, None),
    "zero_point": P(None, None),
    "sums": P(None, None),
    "layout": P(),  # the format record: a small replicated vector
    "contracting": P(),
  }
  assert col["lhs"] == row["lhs"] == {"scale": P(), "zero_point": P(), "layout": P()}
  assert out["params"] == {"Dense_0": {"bias": P("model")}, "Dense_1": {"bias": P(None)}}
  assert all(s == P() for s in jax.tree.leaves(out["quant_stats"]))


def test_serving_specs_packed_odd_shard_raises():
  # 50 hidden rows: 25 bytes of two rows cannot split evenly over 2 model shards.
  served, specs = _abstract_serving(jqat.QatConfig(bits="int4", per_channel=True), hidden=50)
  with pytest.raises(ValueError, match="Dense_1/quant/rhs/values.*even number of rows"):
    jqat.serving_partition_specs(served, specs, mesh=MESH, rules=RULES)
  served, specs = _abstract_serving(jqat.QatConfig(bits="int8", per_channel=True), hidden=50)
  jqat.serving_partition_specs(served, specs, mesh=MESH, rules=RULES)  # int8: no bytes to split


def test_serving_specs_need_the_float_kernel():
  served, specs = _abstract_serving(jqat.QatConfig(per_channel=True))
  del specs["params"]["Dense_1"]["kernel"]
  with pytest.raises(ValueError, match="no float kernel spec at /params/Dense_1/kernel"):
    jqat.serving_partition_specs(served, specs, mesh=MESH, rules=RULES)


def test_serving_specs_with_mesh_axis_specs():
  served, specs = _abstract_serving(jqat.QatConfig(per_channel=True))
  mesh_specs = nn.logical_to_mesh(specs, RULES)
  assert jqat.serving_partition_specs(served, mesh_specs, mesh=MESH) == jqat.serving_partition_specs(
    served, specs, mesh=MESH, rules=RULES
  )


# --- eight simulated devices, in one subprocess ------------------------------------------


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
  # Under pytest-xdist every worker has its own session; the first to take the
  # lock runs the subprocess and leaves its result for the others in the run's
  # shared temporary directory.
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  result = shared / "eight_devices.json"
  with open(shared / "eight_devices.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not result.exists():
      result.write_text(json.dumps(_run_eight_devices()))
  return json.loads(result.read_text())


def test_eight_devices(sharded):
  assert sharded["devices"] == 8


@pytest.mark.parametrize("how", ["shard_map", "jit"])
@pytest.mark.parametrize("method", ["minmax", "minmax_per_channel", "histogram"])
def test_sharded_calibration_is_bit_identical(sharded, how, method):
  assert sharded["calibration"][f"{how}/{method}"] == {"state": True, "qparams": True}


def test_sharded_model_calibration(sharded):
  r = sharded["model_calibration"]
  assert r["frozen"] and r["first_layer_equal"]
  # The second layer observes relu(x @ w) computed in float on shards: at most a rounding apart.
  assert r["second_layer_scale_rel_diff"] <= 1e-6


def test_sharded_train_step_matches_one_device(sharded):
  r = sharded["train"]
  assert r["param_specs"] == {"Dense_0/bias": ["model"], "Dense_0/kernel": [None, "model"], "Dense_1/bias": [None],
                              "Dense_1/kernel": ["model", None]}  # fmt: skip
  assert r["loss_diff"] <= 1e-6  # float32 reductions in another order
  assert r["param_diff"] <= 1e-6  # gradients: float dots split across devices, ~1e-8 in practice
  # Activation ranges are min / max over the global batch: the same bits on every replica and as on one device.
  assert r["stats_equal"] is True
  assert r["stats_replicated"] is True


def test_train_step_collectives(sharded):
  hlo = sharded["train"]["hlo"]
  assert hlo["all-reduce"] >= 1  # gradients over data, row-parallel partial sums over model
  assert hlo["gathered_kernels"] == []


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_sharded_serving_matches_one_device(sharded, bits):
  r = sharded["serve"][bits]
  assert r["convert_equal"] is True  # jit(convert) with out_shardings gives the same bits
  assert r["specs_ok"] is True  # every serving array sits where serving_partition_specs says
  # The integer sums are exact on every split; the float rescale is the same per element.
  assert r["max_diff"] <= 1e-6
  assert r["hlo"]["int32_all_reduce"] >= 1  # row-parallel int32 partial sums reduced over the model axis
  assert r["hlo"]["gathered_kernels"] == []


def test_int4_shards_split_on_whole_bytes(sharded):
  assert sharded["int4_shards"] == {"ok": True, "shard_rows": [24, 24]}


@pytest.mark.parametrize("how", ["stock_dense_injected", "qat_dense"])
def test_row_parallel_on_an_explicit_mesh_honours_out_sharding(sharded, how):
  r = sharded["explicit"]
  # Without out_sharding the stock dot and the quantized one refuse alike: a contracting axis is sharded.
  assert r["stock_without"] == r["qat_without"] == "Contracting dimensions are sharded"
  assert r["stock_spec"] == ["data", None]
  q = r[how]
  assert q["spec"] == ["data", None]  # placed as out_sharding says, as the stock layer's output
  # The same integer sums on every split; the float rescale and the partial sums' order differ by rounding.
  assert q["qat_diff"] <= 1e-5
  assert q["grad_rel_diff"] <= 1e-5  # float32 backward dots, split over "model" on the mesh
  assert q["serve_diff"] <= 1e-5
  assert q["serve_spec"] == ["data", None]


# --- the subprocess --------------------------------------------------------------------------


def _collectives(hlo: str, kernel_shapes) -> dict:
  ops = re.findall(
    r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", hlo
  )
  out = {name: 0 for name in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")}
  gathered, int32_reduce = [], 0
  for result, op in ops:
    out[op] += 1
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", result)
    if op == "all-reduce" and any(t == "s32" for t, _ in shapes):
      int32_reduce += 1
    if op == "all-gather":
      gathered += [f"{t}[{d}]" for t, d in shapes if tuple(int(v) for v in d.split(",") if v) in kernel_shapes]
  out["gathered_kernels"] = gathered
  out["int32_all_reduce"] = int32_reduce
  return out


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
    for x, y in zip(la, lb)
  )


def _max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _calibration(mesh, x) -> dict:

  all_axes = ("data", "model")
  xs = jax.device_put(x, NamedSharding(mesh, P(all_axes)))
  results = {}
  # One HistogramState serves percentile, entropy and MSE; finalizing runs on host copies of the states, so equal
  # states give equal QParams, which is checked for one method per kind of state.
  for name, method, per_channel in [
    ("minmax", "minmax", False),
    ("minmax_per_channel", "minmax", True),
    ("histogram", "percentile", False),
  ]:
    cfg = jqat.QatConfig(per_channel=per_channel, symmetric=False)
    init = jqat.init_stats(x.shape, cfg, method)
    one = jax.jit(jqat.update_stats)(init, x)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(all_axes)), out_specs=P())
    def per_device(state, xb):
      return jqat.all_reduce_stats(jqat.update_stats(state, xb), all_axes)

    finalize = jax.jit(functools.partial(jqat.finalize_stats, config=cfg, method=method))
    ref_qp = finalize(one)
    for how, state in (("shard_map", jax.jit(per_device)(init, xs)), ("jit", jax.jit(jqat.update_stats)(init, xs))):
      state = jax.device_get(state)
      results[f"{how}/{name}"] = {"state": _same(state, one), "qparams": _same(finalize(state), ref_qp)}
  return results


def _train(mesh, model, x, y, variables):

  tx = optax.sgd(0.1)

  def loss_fn(params, stats, xb, yb):
    logits, upd = model.apply({"params": params, "quant_stats": stats}, xb, mutable=["quant_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["quant_stats"]

  def step(params, stats, opt, xb, yb):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, xb, yb)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  host = jax.device_get(variables)
  one = jax.jit(step)(host["params"], host["quant_stats"], tx.init(host["params"]), x, y)

  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  params, stats = variables["params"], variables["quant_stats"]
  args = (params, stats, tx.init(params), xs, ys)
  compiled = jax.jit(step).lower(*args).compile()
  new_params, new_stats, _, loss = compiled(*args)
  kernel_shapes = {tuple(k.shape) for k in (params["Dense_0"]["kernel"], params["Dense_1"]["kernel"])}
  specs = {
    f"{layer}/{name}": list(v.sharding.spec) + [None] * (v.ndim - len(v.sharding.spec))
    for layer, d in new_params.items()
    for name, v in d.items()
  }
  result = {
    "param_specs": specs,
    "loss_diff": float(abs(loss - one[3])),
    "param_diff": _max_diff(new_params, one[0]),
    "stats_equal": _same(new_stats, one[1]),
    "stats_replicated": all(s.sharding.is_fully_replicated for s in jax.tree.leaves(new_stats)),
    "hlo": _collectives(compiled.as_text(), kernel_shapes),
  }
  return result, {**variables, "params": new_params, "quant_stats": new_stats}


def _serve(mesh, bits, variables, host, boxed, x):
  """Converts the same QAT variables with ``bits`` weights, sharded (jit + out_shardings) and on one device."""

  model = Mlp(weight_config=jqat.QatConfig(bits=bits, per_channel=True))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  convert = lambda v, xb: qnn.convert(model, v, xb)
  specs = jqat.serving_partition_specs(
    jax.eval_shape(convert, variables, x), nn.get_partition_spec(boxed), mesh=mesh, rules=RULES
  )
  out_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  served = jax.jit(convert, out_shardings=out_shardings)(variables, xs)
  served_one = jax.jit(convert)(host, x)
  specs_ok = all(
    a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(served), jax.tree.leaves(out_shardings))
  )
  forward = jax.jit(model.apply).lower(served, xs).compile()
  y_sharded = forward(served, xs)
  y_one = jax.jit(model.apply)(served_one, x)
  kernel_shapes = {(IN, HIDDEN), (HIDDEN, OUT)}
  if bits == "int4":
    kernel_shapes |= {(IN // 2, HIDDEN), (HIDDEN // 2, OUT)}
  result = {
    "convert_equal": _same(jax.device_get(served), served_one),
    "specs_ok": specs_ok,
    "max_diff": float(np.max(np.abs(np.asarray(y_sharded) - np.asarray(y_one)))),
    "hlo": _collectives(forward.as_text(), kernel_shapes),
  }
  return result, served, served_one


def _int4_shards(served, served_one) -> dict:
  values = served["serving"]["Dense_1"]["quant"]["rhs"]["values"]  # row-parallel: rows split over "model"
  logical = np.asarray(jqat.unpack_int4(served_one["serving"]["Dense_1"]["quant"]["rhs"]["values"], HIDDEN))
  ok, rows = True, set()
  for shard in values.addressable_shards:
    data = jnp.asarray(np.asarray(shard.data))
    block = shard.index[0]
    n = 2 * data.shape[0]
    rows.add(n)
    ok &= bool(np.array_equal(np.asarray(jqat.unpack_int4(data, n)), logical[2 * block.start : 2 * block.stop]))
  return {"ok": ok, "shard_rows": sorted(rows) * 2}


def _explicit(x) -> dict:
  """A row-parallel layer on a mesh with Explicit axes: the input's features and the kernel's rows over "model"."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  h = np.maximum(x @ np.random.default_rng(1).normal(size=(IN, HIDDEN)).astype(np.float32), 0)
  out = P("data", None)
  stock_without = nn.Dense(OUT)
  stock = nn.Dense(OUT, dot_general=functools.partial(jax.lax.dot_general, out_sharding=out))
  # Each layer with out_sharding, and the same layer without it for the one-device reference.
  variants = {
    "stock_dense_injected": (
      nn.Dense(OUT, dot_general_cls=functools.partial(qnn.QatDotGeneral, out_sharding=out)),
      {},
      nn.Dense(OUT, dot_general_cls=qnn.QatDotGeneral),
    ),
    "qat_dense": (qnn.QatDense(OUT), {"out_sharding": out}, qnn.QatDense(OUT)),
  }
  host = stock_without.init(jax.random.key(0), h)

  def place(v):
    return jax.tree_util.tree_map_with_path(
      lambda path, a: jax.device_put(
        a, NamedSharding(mesh, P("model", None) if _names_of(path)[-1] == "kernel" else P())
      ),
      v,
    )

  def first_error(f):
    try:
      f()
    except Exception as e:  # noqa: BLE001 - the message is what is compared
      return "Contracting dimensions are sharded" if "Contracting dimensions are sharded" in str(e) else repr(e)[:300]
    return "no error"

  result = {}
  with jax.set_mesh(mesh):
    hs = jax.device_put(h, NamedSharding(mesh, P("data", "model")))
    result["stock_without"] = first_error(lambda: jax.jit(stock_without.apply)(place(host), hs))
    result["stock_spec"] = list(jax.jit(stock.apply)(place(host), hs).sharding.spec)
    layer = variants["qat_dense"][0]
    result["qat_without"] = first_error(lambda: jax.jit(layer.apply)(place(layer.init(jax.random.key(0), h)), hs))
  for name, (layer, kwargs, reference) in variants.items():
    result[name] = _explicit_variant(mesh, place, layer, kwargs, reference, h)
  return result


def _explicit_variant(mesh, place, layer, kwargs, reference, h) -> dict:
  """One row-parallel layer's gradient, forward and serving on the Explicit mesh, against one device."""
  apply = lambda v, xb: layer.apply(v, xb, **kwargs)
  loss = lambda p, v, xb: jnp.sum(apply({**v, "params": p}, xb) ** 2)
  ref_loss = lambda p, v, xb: jnp.sum(reference.apply({**v, "params": p}, xb) ** 2)
  v = reference.init(jax.random.key(0), h)
  _, stats = reference.apply(v, h, mutable=["quant_stats"])
  v = {**v, **stats}
  y_one, g_one = reference.apply(v, h), jax.grad(ref_loss)(v["params"], v, h)
  s_one = reference.apply(qnn.convert(reference, v, h), h)
  with jax.set_mesh(mesh):
    hs = jax.device_put(h, NamedSharding(mesh, P("data", "model")))
    vs = place(v)
    y = jax.jit(apply)(vs, hs)
    g = jax.jit(jax.grad(loss))(vs["params"], vs, hs)
    s = jax.jit(apply)(qnn.convert(layer, vs, hs, **kwargs), hs)
  return {
    "spec": list(y.sharding.spec),
    "qat_diff": float(np.max(np.abs(np.asarray(y) - np.asarray(y_one)))),
    "grad_rel_diff": _max_diff(jax.device_get(g), g_one)
    / max(float(np.max(np.abs(a))) for a in jax.tree.leaves(g_one)),
    "serve_diff": float(np.max(np.abs(np.asarray(s) - np.asarray(s_one)))),
    "serve_spec": list(s.sharding.spec),
  }


def _names_of(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def _main():

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, IN)).astype(np.float32)
  x[3, 5] = 9.0  # an outlier for the histogram
  y = rng.integers(0, OUT, size=BATCH).astype(np.int32)
  results = {"devices": len(jax.devices()), "calibration": _calibration(mesh, x)}

  model = Mlp()
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
  variables = nn.meta.unbox(jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x))
  results["train"], variables = _train(mesh, model, x, y, variables)

  # Calibration of the whole model on a batch-sharded input, against one device. The first layer sees the input
  # itself: the same bits. The second sees a float dot, which a sharded computation may round differently.
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  variables = qnn.calibrate(model, variables, [xs], method="percentile")
  host = jax.device_get(variables)
  one = qnn.calibrate(model, host, [x], method="percentile")["quant_stats"]
  sharded = host["quant_stats"]
  results["model_calibration"] = {
    "first_layer_equal": _same(sharded["Dense_0"], one["Dense_0"]),
    "second_layer_scale_rel_diff": float(
      abs(sharded["Dense_1"]["quant"]["lhs"].scale / one["Dense_1"]["quant"]["lhs"].scale - 1)
    ),
    "frozen": bool(all(s["quant"]["lhs"].frozen for s in sharded.values())),
  }

  results["serve"] = {}
  for bits in ("int8", "int4"):
    results["serve"][bits], served, served_one = _serve(mesh, bits, variables, host, boxed, x)
  results["int4_shards"] = _int4_shards(served, served_one)
  results["explicit"] = _explicit(x)
  print(json.dumps(results))


if __name__ == "__main__":
  _main()

"""Orbax checkpoints of serving variables and of a QAT training state.

Round trips in fresh processes (this file run as a script): ``restore`` restores checkpoints saved here and reports
each array's dtype and bytes; ``resume`` resumes an interrupted QAT run from a ``CheckpointManager`` checkpoint;
``sharded`` restores serving variables onto eight simulated devices.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jqat
from jqat import linen as qnn
from jqat._src import checkpoint
from jqat._src.flax.linen import ConvertedParam

IN, HIDDEN, OUT, BATCH = 12, 16, 4, 8
TOTAL, INTERRUPT = 6, 3  # QAT steps, and the step after which the run is interrupted


class Mlp(nn.Module):
  bits: str = "int8"
  hidden: int = HIDDEN
  symmetric_weights: bool = True
  symmetric_activations: bool = False

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(
      qnn.QatDense,
      weight_config=jqat.QatConfig(bits=self.bits, per_channel=True, symmetric=self.symmetric_weights),
      activation_config=jqat.QatConfig(bits="int8", symmetric=self.symmetric_activations),
    )
    hidden = dense(self.hidden)(x)  # built first: Dense_0
    return dense(OUT)(nn.relu(hidden))


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (BATCH, IN))


# Each model is initialized, observed and converted under jit, once: compiling one program per step is far
# cheaper than running the layers eagerly op by op.
@functools.cache
def _qat(model):
  v = jax.jit(model.init)(jax.random.key(0), _x())
  _, stats = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats"]))(v, _x())
  return {**v, **stats}


@functools.cache
def _served(model):
  return jax.jit(lambda v, x: qnn.convert(model, v, x))(_qat(model), _x())


@functools.cache
def _abstract(model):
  return jax.eval_shape(lambda v: qnn.convert(model, v, _x()), _qat(model))


@functools.cache
def _apply(model):
  return jax.jit(model.apply)


def _key(path) -> str:
  # A path by names alone: a NamedTuple restored without a target comes back as a dict of its fields.
  return "/" + "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _bits(tree) -> dict:
  # dtype and bytes of each array, by path: what must survive.
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key(p): (np.asarray(x).dtype.name, np.asarray(x).tobytes()) for p, x in flat}


def _digest(tree) -> dict:
  return {k: (d, hashlib.sha256(b).hexdigest()) for k, (d, b) in _bits(tree).items()}


def _save(path, tree):
  jqat.save_checkpoint(path, tree)
  return path


# --- QAT: params, quant_stats and an optax state ---------------------------------------------


_TX = optax.adam(1e-2)


def _train_setup():
  model, tx = Mlp(), _TX
  variables = jax.jit(model.init)(jax.random.key(0), _x())
  return model, tx, {"variables": variables, "opt_state": tx.init(variables["params"]), "step": jnp.int32(0)}


def _batch(step):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(7), step), (BATCH, IN))
  return x, jnp.sin(x[:, :OUT])


@functools.cache
def _train_step(model, tx):
  @jax.jit
  def step(state, x, y):
    v = state["variables"]

    def loss(params):
      out, upd = model.apply({**v, "params": params}, x, mutable=["quant_stats"])
      return jnp.mean((out - y) ** 2), upd

    grads, upd = jax.grad(loss, has_aux=True)(v["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], v["params"])
    params = optax.apply_updates(v["params"], updates)
    return {"variables": {**v, **upd, "params": params}, "opt_state": opt_state, "step": state["step"] + 1}

  return step


def _train(model, tx, state, until):
  step = _train_step(model, tx)
  while int(state["step"]) < until:
    state = step(state, *_batch(int(state["step"])))
  return state


def _manager(directory):
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _save_step(directory, state):
  with _manager(directory) as manager:
    saved, metadata = jqat.checkpoint_state(state)
    manager.save(int(state["step"]), args=ocp.args.StandardSave(saved), custom_metadata=metadata)
    manager.wait_until_finished()


def _resume(directory, model, tx, fresh):
  # What a restarted job does: build the state's shape from the model, restore the latest step, train on.
  with _manager(directory) as manager:
    step = manager.latest_step()
    target = jax.eval_shape(lambda: fresh)
    restored = manager.restore(step, args=ocp.args.StandardRestore(jqat.checkpoint_state(target)[0]))
    state = jqat.restored_state(restored, manager.metadata(step).custom_metadata)
  return _train(model, tx, state, TOTAL)


def test_interrupted_qat_run_resumes_to_the_same_parameters(tmp_path):
  model, tx, fresh = _train_setup()
  straight = _train(model, tx, fresh, TOTAL)
  _save_step(tmp_path, _train(model, tx, fresh, INTERRUPT))
  resumed = _resume(tmp_path, model, tx, fresh)
  assert set(straight["variables"]) == {"params", "quant_stats"}
  assert isinstance(resumed["opt_state"][0], optax.ScaleByAdamState)  # the optax state's own types come back
  assert int(resumed["opt_state"][0].count) == TOTAL
  assert _bits(resumed) == _bits(straight)  # params, quant_stats and adam's moments, bit for bit
  # The run did move: the restored step is not the start.
  assert _bits(straight["variables"]["params"]) != _bits(fresh["variables"]["params"])


# --- serving variables ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_serving_variables_round_trip_bit_for_bit(tmp_path, bits):
  model = Mlp(bits)
  served = _served(model)
  values = served["serving"]["Dense_0"]["quant"]["rhs"]["values"]
  assert values.dtype == jqat.QuantBits(bits).storage_dtype  # int8, uint8 (packed int4), float8
  assert "sums" in served["serving"]["Dense_0"]["quant"]["rhs"] or bits.startswith("fp8")
  restored = jqat.restore_checkpoint(_save(tmp_path / "ckpt", served), _abstract(model))
  assert _bits(restored) == _bits(served)
  x = _x(seed=5)
  assert np.asarray(_apply(model)(restored, x)).tobytes() == np.asarray(_apply(model)(served, x)).tobytes()


def test_plain_orbax_restores_the_same_bits(tmp_path):
  # The standard checkpointer needs nothing from jqat for these variables; jqat adds the checks below.
  served = _served(Mlp("int4"))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", served)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", _abstract(Mlp("int4")))
  assert _bits(restored) == _bits(served)


def test_zero_size_arrays_round_trip(tmp_path):
  # quantize_model's conversion leaves plain zero-size markers (serving/.../replaced/<param>); Orbax cannot save
  # zero-size arrays, so they travel as a record of shape and dtype, with and without a target.
  tree = {"replaced": {"w": jnp.zeros((4, 3, 0), jnp.float32), "t": jnp.zeros((0,), jnp.bfloat16)},
          "values": jnp.array([1, -2], jnp.int8)}
  jqat.save_checkpoint(tmp_path / "ckpt", tree)
  for target in (None, tree, jax.eval_shape(lambda: tree)):
    restored = jqat.restore_checkpoint(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    kinds = [(x.shape, x.dtype) for x in jax.tree.leaves(restored)]
    assert kinds == [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
  with pytest.raises(ValueError, match=r"/replaced/w: .* placeholder of shape \(4, 3, 0\).*expects \(4, 5, 0\)"):
    jqat.restore_checkpoint(tmp_path / "ckpt", {**tree, "replaced": {**tree["replaced"], "w": jnp.zeros((4, 5, 0))}})


def test_stock_layer_with_injected_op_round_trips(tmp_path):
  model = nn.Dense(OUT, dot_general_cls=qnn.QatDotGeneral)
  served = _served(model)
  box = served["params"]["kernel"]
  assert isinstance(box, ConvertedParam)
  with ocp.StandardCheckpointer() as checkpointer, pytest.raises(ValueError, match="zero size"):
    checkpointer.save(tmp_path / "plain", served)  # why jqat saves the box as a record
  path = _save(tmp_path / "ckpt", served)
  for target in (None, _abstract(model)):
    restored = jqat.restore_checkpoint(path, target)
    assert isinstance(restored["params"]["kernel"], ConvertedParam) and restored["params"]["kernel"].shape == (
      IN,
      OUT,
    )
    x = _x(seed=6)
    assert np.asarray(_apply(model)(restored, x)).tobytes() == np.asarray(_apply(model)(served, x)).tobytes()


def _nnx_served(bits, abstract=False):
  from flax import nnx

  def build():
    model = nnx.Sequential(
      jqat.nnx.QatDense(IN, HIDDEN, rngs=nnx.Rngs(0)),
      nnx.relu,
      jqat.nnx.QatDense(HIDDEN, OUT, weight_config=jqat.QatConfig(bits=bits, per_channel=True), rngs=nnx.Rngs(1)),
    )
    model(_x())
    jqat.nnx.convert(model)
    return model

  # Built under nnx.jit (one program, not op by op), or only its shapes.
  return nnx.eval_shape(build) if abstract else nnx.jit(build)()


def test_nnx_state_round_trips_into_a_converted_model(tmp_path):
  from flax import nnx

  model = _nnx_served("int4")
  path = _save(tmp_path / "ckpt", nnx.state(model))
  target = _nnx_served("int4", abstract=True)  # the shapes of a converted model of the same configs
  restored = jqat.restore_checkpoint(path, nnx.state(target))
  assert _bits(restored) == _bits(nnx.state(model))
  nnx.update(target, restored)
  assert _bits(nnx.state(target)) == _bits(nnx.state(model))
  with pytest.raises(ValueError, match=r"/2/dot_general/rhs_serving/value/values: the checkpoint holds uint8 \(8, 4\)"):
    jqat.restore_checkpoint(path, nnx.state(_nnx_served("int8", abstract=True)))


# --- bad input --------------------------------------------------------------------------------


def test_shapes_that_do_not_match_the_model_name_the_variable(tmp_path):
  path = _save(tmp_path / "ckpt", _served(Mlp(hidden=HIDDEN)))
  with pytest.raises(
    ValueError, match=r"/params/Dense_0/bias: the checkpoint holds float32 \(16,\), the target expects"
  ):
    jqat.restore_checkpoint(path, _abstract(Mlp(hidden=2 * HIDDEN)))


def test_other_formats_do_not_load_silently(tmp_path):
  path = _save(tmp_path / "ckpt", _served(Mlp("int8")))
  # int8 values into an int4 model (Orbax alone says that (6, 16) is not (12, 16), naming no variable).
  held = r"/serving/Dense_0/quant/rhs/values: the checkpoint holds int8 \(12, 16\), the target expects uint8 \(6, 16\)"
  with pytest.raises(ValueError, match=held + r" \(converted with other quantization configs"):
    jqat.restore_checkpoint(path, _abstract(Mlp("int4")))
  # Asymmetric weights: the same names, shapes and dtypes; only the recorded layout tells them apart.
  other = Mlp(symmetric_weights=False)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), _abstract(other)) == jax.tree.map(
    lambda a: (a.shape, a.dtype), _abstract(Mlp())
  )
  held = r"/serving/Dense_0/quant/rhs: the checkpoint holds int8 symmetric per-channel kernel of shape \(12, 16\)"
  with pytest.raises(ValueError, match=held + r", but the model expects int8 asymmetric per-channel kernel"):
    jqat.restore_checkpoint(path, _served(other))  # a concrete target: its layouts are compared on restore
  restored = jqat.restore_checkpoint(path, _abstract(other))  # an abstract one: the model refuses to serve them
  with pytest.raises(ValueError, match=r"at '/Dense_\d/quant': the serving variables hold int8 symmetric"):
    other.apply(restored, _x())
  # Under jit the layout is a traced value: the mismatch makes the output NaN instead.
  assert bool(jnp.isnan(_apply(other)(restored, _x())).all())


def test_plain_orbax_cast_is_caught_by_the_record(tmp_path):
  served = _served(Mlp("int8"))
  state, metadata = jqat.checkpoint_state(served)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", state, custom_metadata=metadata)
    checkpointer.wait_until_finished()
    wrong = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32 if a.dtype == jnp.int8 else a.dtype),
                         _abstract(Mlp("int8")))  # fmt: skip
    cast = checkpointer.restore(tmp_path / "ckpt", wrong)
    meta = checkpointer.metadata(tmp_path / "ckpt").custom_metadata
  assert cast["serving"]["Dense_0"]["quant"]["rhs"]["values"].dtype == jnp.float32  # Orbax casts without a word
  with pytest.raises(
    ValueError, match=r"/values: the checkpoint holds int8 \(12, 16\), but it was restored as float32"
  ):
    jqat.restored_state(cast, meta)


def _copy_with(path, dst, name, data):
  shutil.copytree(path, dst)
  (dst / name).write_bytes(bytes(data))
  return dst


# A failed TensorStore read leaves Orbax's pending reads to be collected with an error; collected here, not in a
# later test.
_ORBAX_READ_ERRORS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_READ_ERRORS
def test_corrupt_or_truncated_checkpoints_raise(tmp_path):
  # Kernels over 1 KiB: Orbax keeps smaller arrays inline in its index, whose nodes carry a CRC.
  model = Mlp(hidden=256)
  served = _served(model)
  path = _save(tmp_path / "ckpt", served)
  largest = max((p for p in path.rglob("*") if p.parent.name == "d"), key=lambda p: p.stat().st_size)
  name, data = largest.relative_to(path), largest.read_bytes()
  # Flipped bits in the largest data file: Orbax restores some of them as they are; jqat's checksums catch them.
  silent = 0
  for i, at in enumerate(range(len(data) // 8, len(data), len(data) // 4)):
    flipped = _copy_with(path, tmp_path / f"flipped{i}", name, data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        plain = _bits(checkpointer.restore(flipped, _abstract(model)))
    except Exception:  # noqa: BLE001 (Orbax noticed this one itself)
      plain = None
    if plain is None:
      with pytest.raises(Exception):  # noqa: B017, PT011
        jqat.restore_checkpoint(flipped, _abstract(model))
    elif plain != _bits(served):
      silent += 1
      with pytest.raises(ValueError, match=r"/serving/Dense_\d/quant/rhs/values: its bits differ from those saved"):
        jqat.restore_checkpoint(flipped, _abstract(model))
    else:  # a byte that holds no value (e.g. padding)
      assert _bits(jqat.restore_checkpoint(flipped, _abstract(model))) == _bits(served)
  assert silent >= 1  # why the checksums are there
  # The file cut short: Orbax's own error.
  truncated = _copy_with(path, tmp_path / "truncated", name, data[: len(data) // 2])
  with pytest.raises(Exception, match="read|Read"):  # noqa: PT011 (TensorStore's error type)
    jqat.restore_checkpoint(truncated, _abstract(model))
  # The record damaged, or metadata that is not JSON.
  meta = (path / "_CHECKPOINT_METADATA").read_text().replace('"checksum"', '"checksun"', 1)
  damaged = _copy_with(path, tmp_path / "damaged", "_CHECKPOINT_METADATA", meta.encode())
  with pytest.raises(ValueError, match="the checkpoint's jqat record is damaged at '/params/Dense_0/bias'"):
    jqat.restore_checkpoint(damaged, _abstract(model))
  garbled = _copy_with(path, tmp_path / "garbled", "_CHECKPOINT_METADATA", b"\x00\xff not json")
  with pytest.raises(Exception):  # noqa: B017, PT011 (Orbax's error)
    jqat.restore_checkpoint(garbled, _abstract(model))
  gc.collect()


def test_checkpoint_without_a_record_is_refused(tmp_path):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"a": jnp.ones(3)})
    checkpointer.wait_until_finished()
  with pytest.raises(ValueError, match="no jqat record .* written by Orbax directly"):
    jqat.restore_checkpoint(tmp_path / "ckpt")


class _WritesFile:
  # A pickle of this writes a file when it is loaded.
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


@_ORBAX_READ_ERRORS
def test_loading_runs_no_code_from_the_checkpoint(tmp_path):
  path = _save(tmp_path / "ckpt", _served(Mlp()))
  marker = tmp_path / "ran"
  for name in ("_CHECKPOINT_METADATA", "_METADATA", "_sharding"):
    planted = tmp_path / name
    shutil.copytree(path, planted)
    (planted / name).write_bytes(pickle.dumps(_WritesFile(str(marker))))
    with pytest.raises(Exception):  # noqa: B017, PT011 (they are JSON files: a pickle is unreadable, never loaded)
      jqat.restore_checkpoint(planted, _abstract(Mlp()))
    assert not marker.exists(), name
  gc.collect()


# --- fresh processes ---------------------------------------------------------------------------


def _script(*args, devices=1, timeout=240):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), *map(str, args)],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_round_trip_and_resume_in_a_fresh_process(tmp_path):
  trees = {bits: _served(Mlp(bits)) for bits in ("int8", "int4", "fp8_e4m3")}
  for bits, tree in trees.items():
    _save(tmp_path / bits, tree)
  model, tx, fresh = _train_setup()
  _save_step(tmp_path / "qat", _train(model, tx, fresh, INTERRUPT))
  result = _script("fresh", tmp_path, *trees)
  for bits, tree in trees.items():
    assert result["restored"][bits] == {k: list(v) for k, v in _digest(tree).items()}, bits
  assert result["resumed"] == {k: list(v) for k, v in _digest(_train(model, tx, fresh, TOTAL)).items()}
  assert result["unpickled"] == []  # no pickle was loaded while restoring


def test_restore_onto_eight_devices_is_sharded(tmp_path):
  result = _script("sharded", tmp_path, devices=8)
  assert result["devices"] == 8
  for name, entry in result["arrays"].items():
    assert entry["same_bits"], name
    assert entry["sharding"] == entry["expected"], name
    assert entry["shard_shape"] == entry["expected_shard_shape"], name
  # The column-parallel kernel arrives split on its output axis, the row-parallel one on its input (packed) axis.
  assert result["arrays"]["/serving/Dense_0/quant/rhs/values"]["shard_shape"] == [(IN + 1) // 2, HIDDEN // 2]
  assert result["arrays"]["/serving/Dense_1/quant/rhs/values"]["shard_shape"] == [HIDDEN // 2 // 2, OUT]
  assert result["checksum_gathers"] is False and result["checksum_paths_agree"] is True
  assert result["served_equal"] is True


def _fresh(folder, names):
  # Restores what the test saved, watching for any unpickling, and resumes the QAT run.
  unpickled = []
  sys.addaudithook(lambda event, args: unpickled.append(str(args)) if event == "pickle.find_class" else None)
  restored = {name: _digest(jqat.restore_checkpoint(os.path.join(folder, name))) for name in names}
  model, tx, fresh = _train_setup()
  resumed = _digest(_resume(os.path.join(folder, "qat"), model, tx, fresh))
  return {"restored": restored, "resumed": resumed, "unpickled": unpickled}


def _sharded(folder):
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  # Megatron style: the first kernel split on its output axis, the second on its input axis; int4 packs rows.
  model = Mlp("int4")
  served = _served(model)
  specs = {"params": {"Dense_0": {"kernel": P(None, "model"), "bias": P("model")}, "Dense_1": {"kernel": P("model")}}}
  path = _save(os.path.join(folder, "ckpt"), served)
  serving_specs = jqat.serving_partition_specs(_abstract(model), specs, mesh=mesh)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
    _abstract(model),
    serving_specs,
  )
  restored = jqat.restore_checkpoint(path, target)
  arrays = {}
  flat_specs = {_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(serving_specs)[0]}
  saved = {_key(p): a for p, a in jax.tree_util.tree_flatten_with_path(served)[0]}
  for p, a in jax.tree_util.tree_flatten_with_path(restored)[0]:
    name = _key(p)
    want = NamedSharding(mesh, flat_specs[name])
    arrays[name] = {
      "same_bits": np.asarray(a).tobytes() == np.asarray(saved[name]).tobytes() and a.dtype == saved[name].dtype,
      "sharding": str(a.sharding.spec),
      "expected": str(want.spec),
      "shard_shape": list(a.addressable_shards[0].data.shape),
      "expected_shard_shape": list(want.shard_shape(a.shape)),
    }
  values = restored["serving"]["Dense_1"]["quant"]["rhs"]["values"]
  # Across hosts the checksum runs as one XLA computation: it must sum shard by shard, not gather.
  hlo = checkpoint._checksum_words.lower(values).compile().as_text()
  paths_agree = checkpoint._checksum(values) == [int(c) for c in np.asarray(checkpoint._checksum_words(values))]
  x = jax.device_put(_x(seed=8), NamedSharding(mesh, P("data")))
  served_equal = np.asarray(_apply(model)(restored, x)).tobytes() == np.asarray(_apply(model)(served, x)).tobytes()
  return {
    "devices": jax.device_count(),
    "arrays": arrays,
    "checksum_gathers": "all-gather" in hlo,
    "checksum_paths_agree": paths_agree,
    "served_equal": bool(served_equal),
  }


if __name__ == "__main__":
  what, folder, *rest = sys.argv[1:]
  result = _fresh(folder, rest) if what == "fresh" else _sharded(folder)
  print(json.dumps(result))

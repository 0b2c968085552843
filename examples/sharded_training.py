"""Quantization-aware training, calibration, integer serving and checkpoints on a data x model mesh, in one
process or across many.

An MLP on the digits data set with int4 weights and int8 activations: the first layer is column-parallel (its
kernel split over ``model`` by output features), the second row-parallel (split by input features), written with
Flax logical axis names. Batches are split over ``data``. Everything runs under ``jax.jit`` on global arrays;
XLA inserts the collectives. The flow:

1. QAT training (optax Adam) on the mesh;
2. calibration: every device gathers histogram statistics of its own rows (``shard_map``), merged across all
   devices, and so across processes, with ``jqat.all_reduce_stats``; then ``jqat.linen.freeze``;
3. ``jqat.linen.convert`` straight into sharded int4 / int8 serving variables (``jqat.serving_partition_specs``);
4. serving with integer dots;
5. an Orbax checkpoint of the training state and of the serving variables, written by all processes together
   and restored onto the same mesh.

Run:
  python examples/sharded_training.py                    # one process, 8 simulated CPU devices (4 x 2 mesh)
  python examples/sharded_training.py --num-processes 2  # 2 local processes x 2 CPU devices, over 127.0.0.1

With ``--num-processes N`` the script first runs the same flow in one process on N x 2 devices (same global data
and seeds) as the reference, then starts N processes that join with ``jax.distributed.initialize`` and compare
their own shards with it. Under a cluster's launcher (SLURM, Open MPI, a TPU pod: one copy of this script per host,
no ``--num-processes``), the script calls ``jax.distributed.initialize()`` with no arguments and the environment
names the job; ``--cluster`` forces that.

Every process loads only its own rows of each batch and builds the global batch with
``jax.make_array_from_process_local_data``. Every wait is bounded (``--timeout``, per stage): a process that dies
or hangs makes the others fail with an error naming the stage, and the local launcher ends the group.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import _multihost

# Real devices are used as they are; on CPU, simulate devices. Must be set before JAX creates its backend.
if "--process-id" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jqat  # noqa: E402
from jqat import linen as qnn  # noqa: E402

# Logical axis names -> mesh axes. Hidden features ("mlp") are split over "model".
RULES = (("embed", None), ("mlp", "model"), ("classes", None))
WEIGHTS = jqat.QatConfig(bits="int4", per_channel=True)
ACTIVATIONS = jqat.QatConfig(bits="int8", symmetric=False)
N_MODEL = 2
# Float32 gradients are all-reduced over "data"; across processes (gloo) the terms may be added in another order
# than within one, so trained parameters are compared to this absolute tolerance (the run reports the largest gap).
# Measured: 0 with 2 data shards (a sum of two terms has one order), 3.6e-5 after 50 steps with 4.
QAT_TOLERANCE = 1e-4


class Mlp(nn.Module):
  hidden: int = 256
  classes: int = 10
  weight_config: jqat.QatConfig = WEIGHTS

  @nn.compact
  def __call__(self, x):
    def dense(features, axes):
      return qnn.QatDense(
        features,
        weight_config=self.weight_config,
        activation_config=ACTIVATIONS,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      )

    x = nn.relu(dense(self.hidden, ("embed", "mlp"))(x))  # column-parallel
    return dense(self.classes, ("mlp", "classes"))(x)  # row-parallel: partial sums all-reduced over "model"


def spec(a) -> str:
  return str(a.sharding.spec) if isinstance(a.sharding, NamedSharding) else str(a.sharding)


def scalar(a) -> float:
  """A replicated scalar's value, read from this process's own copy (works on any number of processes)."""
  return float(np.asarray(a.addressable_data(0)))


def flat(tree, prefix: str) -> dict:
  """``{"prefix/a/b": leaf}`` for every array leaf (NamedTuple fields by name)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


class Data:
  """The digits data set, read row by row: a process takes only the rows its devices hold."""

  def __init__(self):
    digits = load_digits()
    self._order = np.random.default_rng(0).permutation(len(digits.target))
    self._x, self._y = digits.data, digits.target

  def rows(self, index: np.ndarray):
    i = self._order[index]
    return (self._x[i] / 16.0).astype(np.float32), self._y[i].astype(np.int32)


def global_batch(data: Data, index: np.ndarray, sharding: NamedSharding):
  """The global batch of rows ``index`` split over ``data``, built from this process's rows only."""
  n = len(index)
  # Which global rows this process's devices hold (replicas over "model" share them): one contiguous block.
  held = sorted({s[0].indices(n)[:2] for s in sharding.addressable_devices_indices_map((n, 64)).values()})
  local = np.concatenate([np.arange(a, b) for a, b in held])
  if not np.array_equal(local, np.arange(local[0], local[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds rows {held}, not one block; arrange the mesh by process")
  x, y = data.rows(index[local])
  return (
    jax.make_array_from_process_local_data(sharding, x, (n, x.shape[1])),
    jax.make_array_from_process_local_data(sharding, y, (n,)),
  )


def compare(arrays: dict, reference, exact: bool) -> float:
  """Compares this process's shards of ``arrays`` with the same slices of the reference run's global arrays.

  Returns 0.0 when all are bit-identical (``exact``), or the largest absolute difference; inf for a missing
  array or a shape that differs.
  """
  worst = 0.0
  for name, a in arrays.items():
    if name not in reference.files:
      return float("inf")
    ref = reference[name]
    if ref.shape != a.shape:
      return float("inf")
    for shard in a.addressable_shards:
      mine, theirs = np.asarray(shard.data), ref[shard.index]
      if exact:
        worst = max(worst, 0.0 if mine.tobytes() == theirs.tobytes() else float("inf"))
      else:
        worst = max(worst, float(np.max(np.abs(mine.astype(np.float64) - theirs), initial=0.0)))
  return worst


def from_reference(tree, reference, prefix: str):
  """``tree`` with every array replaced by the reference run's, in the same sharding; each process reads its shards."""
  arrays = [
    jax.make_array_from_callback(a.shape, a.sharding, lambda index, name=name: reference[name][index])
    for name, a in flat(tree, prefix).items()
  ]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), arrays)


def abstract(tree):
  """Shapes, dtypes and shardings of ``tree``: Orbax restores each array straight into its sharding."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def run(args, watchdog) -> dict:
  me, n_proc = jax.process_index(), jax.process_count()
  say = lambda *a: print(f"[process {me}]", *a, flush=True)
  lead = lambda *a: print(*a, flush=True) if me == 0 else None
  stage = lambda name: (watchdog.stage(name), _multihost.barrier(name, args.timeout))
  start, times = time.time(), {}

  devices = jax.devices()  # ordered by process: each process's devices form whole rows of the mesh
  if len(devices) % N_MODEL:
    raise ValueError(f"the mesh needs a multiple of {N_MODEL} devices, got {len(devices)}")
  mesh = Mesh(np.array(devices).reshape(-1, N_MODEL), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  lead(f"{n_proc} process(es), {len(devices)} devices ({devices[0].platform}); mesh {dict(mesh.shape)}")

  weights = WEIGHTS
  if args.fault == "mismatch" and me == args.fault_process:
    weights = jqat.QatConfig(bits="int8", per_channel=True)
  model = Mlp(weight_config=weights)
  sample = np.zeros((8, 64), np.float32)
  abstract_init = jax.eval_shape(model.init, jax.random.key(0), sample)
  shapes = {k: list(v.shape) for k, v in flat(nn.meta.unbox(abstract_init["params"]), "params/").items()}
  # The same program must run everywhere: compare configs and parameter shapes before any collective of the flow.
  watchdog.stage("agreement", timeout=3 * startup_timeout(args))
  _multihost.check_agreement(
    {"weight_config": repr(weights), "activation_config": repr(ACTIVATIONS), "param_shapes": shapes,
     "jqat": jqat.__version__, "mesh": dict(mesh.shape)},
    startup_timeout(args),
  )

  if args.fault in ("die", "hang") and me == args.fault_process:
    if args.fault == "die":
      say("fault injected: exiting before training")
      os._exit(17)
    say("fault injected: never reaching the training stage")
    watchdog.stage("hang (injected)", timeout=20 * args.timeout)
    time.sleep(20 * args.timeout)
  stage("train")

  batch = NamedSharding(mesh, P("data"))  # split the batch over "data", replicate over "model"
  data = Data()
  logical_specs = nn.get_partition_spec(abstract_init)
  variables = jax.jit(model.init, out_shardings=nn.logical_to_mesh_sharding(logical_specs, mesh, RULES))(
    jax.random.key(0), sample
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
  def predict(variables, xb):
    return model.apply(variables, xb)

  def accuracy(variables, xb, yb):
    return scalar(jnp.mean(jnp.argmax(predict(variables, xb), -1) == yb))

  x_test, y_test = global_batch(data, np.arange(1536, 1792), batch)
  rng = np.random.default_rng(1)
  losses = []
  for step in range(args.steps):
    # Every process draws the same global row numbers; each then reads only the rows it holds.
    xb, yb = global_batch(data, rng.integers(0, 1536, args.batch), batch)
    params, stats, opt_state, loss = train_step(params, stats, opt_state, xb, yb)
    # One step in flight at a time: with several processes on CPU (gloo), steps queued ahead have been seen to
    # deadlock with 4 processes x 2 devices.
    jax.block_until_ready(params)
    losses.append(loss)
    if step % 50 == 0 or step == args.steps - 1:
      lead(f"step {step:4d}  QAT loss {scalar(loss):.4f}")
  qat = {"params": params, "quant_stats": stats}
  qat_accuracy = accuracy(qat, x_test, y_test)
  lead(f"QAT accuracy (test): {qat_accuracy:.4f}")
  times["train_s"] = time.time() - start
  losses = jnp.stack(losses)
  reference = np.load(args.reference) if args.reference else None
  if reference is not None:
    qat_diffs = np.array([compare(flat(params, "params/"), reference, exact=False),
                          compare({"loss": losses}, reference, exact=False)])
    # From here on, the reference run's training state (read shard by shard): calibration, conversion, serving
    # and the checkpoint then start from the same numbers as in the reference run and must match it bit for bit.
    state = {"params": params, "quant_stats": stats, "opt_state": opt_state}
    state = from_reference(state, reference, "restored/train/")
    params, stats, opt_state = state["params"], state["quant_stats"], state["opt_state"]
    qat = {"params": params, "quant_stats": stats}

  stage("calibrate")

  # Calibration: each device observes its own rows; all_reduce_stats merges the statistics over "data", across
  # processes. Batches are merged one by one (merge_stats is exact), then freeze picks the ranges.
  def is_stats(node):
    return isinstance(node, jqat.HistogramState)

  @jax.jit
  def calib_batch(variables, xb):
    def local(v, x):
      _, upd = model.apply(v, x, mutable=["quant_calib"])
      return jax.tree.map(
        lambda s: jqat.all_reduce_stats(s, "data") if is_stats(s) else s, upd["quant_calib"], is_leaf=is_stats
      )

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())(variables, xb)

  @jax.jit
  def calib_global(variables, xb):  # the same statistics in one pass over the global batch, for comparison
    return model.apply(variables, xb, mutable=["quant_calib"])[1]["quant_calib"]

  merge = lambda a, b: jax.tree.map(lambda s, t: jqat.merge_stats(s, t) if is_stats(s) else s, a, b, is_leaf=is_stats)
  calib = calib_one_pass = None
  for i in range(0, 1024, 256):
    xb, _ = global_batch(data, np.arange(i, i + 256), batch)
    c = calib_batch(qat, xb)
    calib = c if calib is None else merge(calib, c)
    g = calib_global({**qat, **({} if calib_one_pass is None else {"quant_calib": calib_one_pass})}, xb)
    calib_one_pass = g
  same_as_one_pass = all(
    jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), calib, calib_one_pass))
  )
  lead(f"calibration statistics merged across devices equal one pass over the data: {same_as_one_pass}")
  calibrated = qnn.freeze({**qat, "quant_calib": calib}, "percentile")
  calibrated_accuracy = accuracy(calibrated, x_test, y_test)
  lead(f"calibrated QAT accuracy (test): {calibrated_accuracy:.4f}")

  stage("convert")
  # Conversion to integer serving variables, straight into their shardings: the quantized kernels take the
  # float kernels' specs, scales and column sums follow the output axis.
  def convert(v, xb):
    return qnn.convert(model, v, xb)

  serving_specs = jqat.serving_partition_specs(
    jax.eval_shape(convert, calibrated, x_test), logical_specs, mesh=mesh, rules=RULES
  )
  served = jax.jit(convert, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), serving_specs))(
    calibrated, x_test
  )
  served_logits = predict(served, x_test)
  served_accuracy = scalar(jnp.mean(jnp.argmax(served_logits, -1) == y_test))
  lead(f"served accuracy (test, integer dots): {served_accuracy:.4f}")
  times["serve_s"] = time.time() - start

  stage("checkpoint")
  # One checkpoint of both trees, written by every process together (each writes the shards it owns) and
  # committed atomically: a step directory appears under its final name only once complete.
  train_state = {"params": params, "quant_stats": stats, "opt_state": opt_state}
  manager = ocp.CheckpointManager(
    pathlib.Path(args.checkpoint_dir).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  )
  manager.save(args.steps, args=ocp.args.Composite(
    train=ocp.args.StandardSave(train_state), serving=ocp.args.StandardSave(served)
  ))
  manager.wait_until_finished()
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
    train=ocp.args.StandardRestore(abstract(train_state)), serving=ocp.args.StandardRestore(abstract(served))
  ))
  manager.close()
  restored_flat = {**flat(restored["train"], "restored/train/"), **flat(restored["serving"], "restored/serving/")}
  saved_flat = {**flat(train_state, "restored/train/"), **flat(served, "restored/serving/")}
  same_as_saved = all(
    np.asarray(a.addressable_data(0)).tobytes() == np.asarray(restored_flat[k].addressable_data(0)).tobytes()
    and a.sharding == restored_flat[k].sharding
    for k, a in saved_flat.items()
  )
  restored_logits = predict(restored["serving"], x_test)
  lead(f"checkpoint step {manager.latest_step()} restored onto the mesh, equal to what was saved: {same_as_saved}")
  times["checkpoint_s"] = time.time() - start

  # This process's own shards: which rows / columns of each array its devices hold.
  for name, a in [
    ("params/Dense_0/kernel (QAT, float)", params["Dense_0"]["kernel"]),
    ("serving/Dense_0/quant/rhs/values", served["serving"]["Dense_0"]["quant"]["rhs"]["values"]),
    ("serving/Dense_1/quant/rhs/values", served["serving"]["Dense_1"]["quant"]["rhs"]["values"]),
    ("serving/Dense_1/quant/rhs/sums", served["serving"]["Dense_1"]["quant"]["rhs"]["sums"]),
    ("test batch", x_test),
  ]:
    held = ", ".join(
      f"dev{s.device.id}{tuple((i.start or 0, i.stop if i.stop is not None else n) for i, n in zip(s.index, a.shape))}"
      for s in a.addressable_shards
    )
    say(f"{name:<36} {a.dtype!s:<8} {a.shape!s:<10} {spec(a):<20} my shards: {held}")

  records = {
    "loss": losses,
    **flat(params, "params/"),
    **flat(calib, "calib/"),
    "served_logits": served_logits,
    "restored_logits": restored_logits,
    **restored_flat,
  }
  result = {
    "processes": n_proc,
    "devices": len(devices),
    "mesh": dict(mesh.shape),
    "steps": args.steps,
    "qat_accuracy": qat_accuracy,
    "calibrated_accuracy": calibrated_accuracy,
    "served_accuracy": served_accuracy,
    "calib_equals_one_pass": same_as_one_pass,
    "checkpoint_equals_saved": same_as_saved,
    "orbax_checkpoint": ocp.__version__ if hasattr(ocp, "__version__") else None,
    "jax": jax.__version__,
  }
  if args.save_reference:
    # One process holds every array whole: the reference a multi-process run compares its shards with.
    np.savez(args.save_reference, **{k: np.asarray(v) for k, v in records.items()})
  if reference is not None:
    with reference as ref:
      mine = np.array([
        compare(flat(calib, "calib/"), ref, exact=True),
        compare({"served_logits": served_logits}, ref, exact=True),
        compare({**restored_flat, "restored_logits": restored_logits}, ref, exact=True),
        *qat_diffs,
      ])
    # Each process checked its own shards; the verdict takes the worst over all processes.
    from jax.experimental import multihost_utils

    worst = np.max(np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine)), axis=0)
    result.update(
      calib_bit_identical=bool(worst[0] == 0),
      served_bit_identical=bool(worst[1] == 0),
      checkpoint_bit_identical=bool(worst[2] == 0),
      qat_max_param_diff=float(worst[3]),
      qat_max_loss_diff=float(worst[4]),
      qat_tolerance=QAT_TOLERANCE,
    )
    lead(
      "agreement with one process: calibration statistics bit-identical {calib_bit_identical}, served outputs "
      "bit-identical {served_bit_identical}, restored checkpoint bit-identical {checkpoint_bit_identical}, "
      "QAT parameters max |diff| {qat_max_param_diff:.3g} (tolerance {qat_tolerance:g}), "
      "loss max |diff| {qat_max_loss_diff:.3g}".format(**result)
    )
  result["seconds"] = round(time.time() - start, 1)
  result.update({k: round(v, 1) for k, v in times.items()})
  lead(f"done in {result['seconds']:.1f} s")
  return result


def startup_timeout(args) -> int:
  """Start-up waits for the slowest process to import and connect: at least a minute, whatever --timeout says."""
  return max(60, args.timeout)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--num-processes", type=int, help="start this many local processes (1 x 127.0.0.1)")
  p.add_argument("--devices-per-process", type=int, default=2, help="simulated CPU devices per local process")
  p.add_argument("--cluster", action="store_true", help="join a cluster job: jax.distributed.initialize()")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--json", help="write the results here (process 0)")
  p.add_argument("--checkpoint-dir", help="shared by all processes (default: a new temporary directory)")
  p.add_argument("--timeout", type=int, default=300,
                 help="seconds a process waits for the others at a stage's start (and 3x for a whole stage)")
  p.add_argument("--no-reference", action="store_true", help="skip the one-process run and the comparison")
  p.add_argument("--fault", choices=["die", "hang", "mismatch"], help="inject a fault into one process (testing)")
  p.add_argument("--fault-process", type=int, default=1, help="the process that --fault applies to")
  # Set by the local launcher for each process it starts, or for the one-process reference run.
  p.add_argument("--coordinator", help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  p.add_argument("--reference", help=argparse.SUPPRESS)
  p.add_argument("--save-reference", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def launch(args, argv) -> int:
  """The local launcher: the one-process reference run, then ``--num-processes`` processes compared with it."""
  n, d = args.num_processes, args.devices_per_process
  work = pathlib.Path(tempfile.mkdtemp(prefix="jqat_multihost_"))
  keep = [a for a in argv if a not in ("--no-reference",)]
  keep = _drop_option(_drop_option(keep, "--num-processes"), "--checkpoint-dir")
  ckpt = args.checkpoint_dir or str(work / "checkpoint")
  # After a failure the others get long enough to fail on their own (their barrier or watchdog), then are killed.
  bounds = dict(timeout=20 * args.timeout, grace=4 * args.timeout)
  extra = []
  if not args.no_reference and args.fault is None:  # with a fault injected the run never gets to the comparison
    ref = str(work / "reference.npz")
    ref_cmd = [sys.executable, __file__, *_drop_option(keep, "--json"), "--save-reference", ref, "--checkpoint-dir",
               str(work / "reference_checkpoint")]
    print(f"launcher: the one-process reference run ({n * d} devices)", flush=True)
    code = _multihost.run_group([ref_cmd], _multihost.child_env(n * d), label="reference", **bounds)
    if code:
      return code
    extra = ["--reference", ref]
  return _multihost.launch(__file__, keep + extra + ["--checkpoint-dir", ckpt], num_processes=n, devices=d,
                           **bounds)


def _drop_option(argv, name):
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == name:
      skip = True
    elif not a.startswith(name + "="):
      out.append(a)
  return out


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  if args.num_processes and args.num_processes > 1 and args.process_id is None:
    sys.exit(launch(args, argv))
  me = args.process_id or 0
  # A stage's barrier waits at most --timeout for the others; the stage as a whole (its work, its collectives) gets
  # three times that before the watchdog ends the process.
  watchdog = _multihost.Watchdog(3 * args.timeout, f"process {me}")
  distributed = args.process_id is not None or args.cluster or _multihost.cluster_env()
  try:
    if distributed:
      watchdog.stage("start-up", timeout=3 * startup_timeout(args))
      _multihost.initialize(
        args.coordinator, args.num_processes, args.process_id,
        startup_timeout=startup_timeout(args), heartbeat_timeout=max(5, args.timeout // 3),
      )
    if args.checkpoint_dir is None:
      if jax.process_count() > 1:
        raise ValueError("--checkpoint-dir is required with several processes: a directory all of them can reach")
      args.checkpoint_dir = tempfile.mkdtemp(prefix="jqat_checkpoint_")
    result = run(args, watchdog)
  except (_multihost.StageTimeout, ValueError) as e:
    # os._exit: an orderly shutdown would wait for the processes that are gone.
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(2)
  if args.json and jax.process_index() == 0:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
  if distributed:
    watchdog.stage("shutdown")
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()

"""The sharded example across real JAX processes (``jax.distributed`` over 127.0.0.1), its faults, and Orbax's
atomic commit.

Every run is a separate process group on the loopback interface, on a free port; every wait has a deadline, and
each group is killed on the way out, whether the test passed or not.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sharded_training.py"
# The flow takes about 70 s on a loaded 2-core machine (a one-process reference run, then 2 processes); a fault
# run about 15-30 s. The limits leave about 3x that.
FLOW_LIMIT_S = 240
STAGE_TIMEOUT_S = 15  # --timeout of the fault runs: how long a process waits for a peer at a stage before failing
FAULT_LIMIT_S = 120

pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ)
  # Small programs compiled a dozen times: XLA's backend optimizations would cost more than they save.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["JAX_PLATFORMS"] = "cpu"
  return env


class Run:
  """The example in its own process group, output to a file; ``finish`` waits at most ``limit`` seconds."""

  def __init__(self, tmp: pathlib.Path, *args: str):
    self.log_path = tmp / "log.txt"
    self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in finish)
    self.start = time.monotonic()
    self.proc = subprocess.Popen(
      [sys.executable, str(EXAMPLE), *args],
      stdout=self._log,
      stderr=subprocess.STDOUT,
      env=_env(),
      cwd=tmp,
      start_new_session=True,  # the launcher and the processes it starts: one group to kill
    )

  def finish(self, limit: float) -> tuple[int, str, float]:
    try:
      code = self.proc.wait(timeout=max(1.0, limit - (time.monotonic() - self.start)))
    except subprocess.TimeoutExpired:
      code = None
    finally:
      self.kill()
    log = self.log_path.read_text()
    assert code is not None, f"the run did not end within {limit} s:\n{log[-3000:]}"
    return code, log, time.monotonic() - self.start

  def kill(self):
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait(timeout=30)
    self._log.close()


def test_two_processes_agree_with_one(tmp_path):
  run = Run(tmp_path, "--num-processes", "2", "--devices-per-process", "2", "--steps", "12", "--batch", "64",
            "--timeout", "120", "--json", str(tmp_path / "out.json"))
  code, log, _ = run.finish(FLOW_LIMIT_S)
  assert code == 0, log[-4000:]
  out = json.loads((tmp_path / "out.json").read_text())
  assert (out["processes"], out["devices"], out["mesh"]) == (2, 4, {"data": 2, "model": 2})
  assert out["calib_bit_identical"] and out["served_bit_identical"] and out["checkpoint_bit_identical"], out
  assert out["calib_equals_one_pass"] and out["checkpoint_equals_saved"], out
  assert 0 <= out["qat_max_param_diff"] <= out["qat_tolerance"] == 1e-4 and out["qat_max_loss_diff"] <= 1e-4, out
  # 12 Adam steps on digits: far above chance (0.1); integer serving close to the QAT model.
  assert out["qat_accuracy"] > 0.6 and out["calibrated_accuracy"] > 0.6, out
  assert abs(out["served_accuracy"] - out["calibrated_accuracy"]) <= 0.05, out
  # Each process printed its own shards only: process 1 holds the second half of the test batch.
  assert "[process 1] test batch" in log and "my shards: dev2048((128, 256)" in log.split("[process 1] test batch")[1]


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
  """The three fault runs, started together (they mostly wait), each in its own directory."""
  runs = {}
  try:
    for fault in ("die", "hang", "mismatch"):
      tmp = tmp_path_factory.mktemp(fault)
      runs[fault] = Run(tmp, "--num-processes", "2", "--steps", "2", "--batch", "64", "--timeout",
                        str(STAGE_TIMEOUT_S), "--fault", fault)
    yield runs
  finally:
    for run in runs.values():
      if not run._log.closed:
        run.kill()


def test_a_process_that_dies_fails_the_others_in_bounded_time(fault_runs):
  code, log, seconds = fault_runs["die"].finish(FAULT_LIMIT_S)
  assert code == 17, log[-3000:]  # the launcher returns the first failure: the process that died
  assert "launcher: process 1 exited with code 17" in log
  # The survivor fails by itself before the launcher would kill it: naming the stage it was waiting in, or, when
  # JAX's own error polling wins the race after the dead process's missed heartbeats, by the distributed
  # service's termination, which names the unhealthy task.
  own = "error: process 0: stage 'train'" in log and "one of them died or hangs" in log
  jax_side = "detected fatal errors" in log and "stopped sending heartbeats" in log
  assert own or jax_side, log[-3000:]
  assert "launcher: killing" not in log
  assert seconds < FAULT_LIMIT_S


def test_a_process_that_hangs_fails_the_others_in_bounded_time(fault_runs):
  code, log, seconds = fault_runs["hang"].finish(FAULT_LIMIT_S)
  assert code == 2, log[-3000:]
  assert "[process 1] fault injected: never reaching the training stage" in log
  assert f"error: process 0: stage 'train': waited at most {STAGE_TIMEOUT_S} s for all 2 processes" in log, log[-3000:]
  assert seconds >= STAGE_TIMEOUT_S  # it did wait for the peer, as long as allowed


def test_processes_that_disagree_on_the_config_fail_at_start_up(fault_runs):
  code, log, _ = fault_runs["mismatch"].finish(FAULT_LIMIT_S)
  assert code == 2, log[-3000:]
  line = next(ln for ln in log.splitlines() if "disagree" in ln)
  assert "on 'weight_config': process 0 has QatConfig(bits=<QuantBits.INT4" in line, line
  assert "process 1 has QatConfig(bits=<QuantBits.INT8" in line, line
  assert "step " not in log  # no training started


INTERRUPTED_SAVE = """
import os, sys
import numpy as np
import orbax.checkpoint as ocp
manager = ocp.CheckpointManager(sys.argv[1], options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True))
manager.save(1, args=ocp.args.StandardSave({"w": np.full((4,), 1.0, np.float32)}))
manager.wait_until_finished()
# Step 2 is big enough that its background write is still running when the process dies.
manager.save(2, args=ocp.args.StandardSave({"w": np.full((4,), 2.0, np.float32),
                                            "big": np.ones((4096, 4096), np.float32)}))
os._exit(9)
"""


def test_an_interrupted_checkpoint_is_never_restored(tmp_path):
  import numpy as np
  import orbax.checkpoint as ocp

  directory = tmp_path / "ckpt"
  proc = subprocess.run(
    [sys.executable, "-c", INTERRUPTED_SAVE, str(directory)], env=_env(), capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 9, proc.stderr[-3000:]
  names = sorted(p.name for p in directory.iterdir())
  # The interrupted write left its temporary directory behind, never a directory named "2".
  assert "1" in names and "2" not in names and any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names
  manager = ocp.CheckpointManager(directory)
  assert manager.all_steps() == [1] and manager.latest_step() == 1
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore({"w": np.zeros((4,), np.float32)}))
  manager.close()
  np.testing.assert_array_equal(restored["w"], np.full((4,), 1.0, np.float32))

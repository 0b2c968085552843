"""Running one script as several JAX processes: a local launcher, bounded barriers, a watchdog, start-up agreement.

Only the standard library is imported at module level, so that the launcher starts no JAX of its own.

- ``launch`` starts N copies of a script on this machine, all talking over the loopback interface (127.0.0.1) on a
  free port, and ends the whole group when one of them fails or the time is up: no run waits forever.
- ``initialize`` joins a job: with a coordinator address (the local launcher), or with no arguments under a cluster's
  launcher (SLURM, Open MPI, TPU pods, ...), where ``jax.distributed.initialize()`` reads the environment.
- ``barrier`` waits for every process with a deadline and says which stage did not complete.
- ``Watchdog`` ends a process whose current stage runs past its deadline (a peer that hangs inside a collective).
- ``check_agreement`` compares a summary (configs, parameter shapes) across processes at start-up.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  """A TCP port free on the loopback interface (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int) -> dict:
  """The environment of one local process: ``devices`` simulated CPU devices, the rest inherited."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass


def run_group(commands, env, *, timeout: float, grace: float, label: str = "process") -> int:
  """Runs ``commands`` side by side; returns 0 when all succeed, else the first failure's exit code.

  When one process fails, the others get ``grace`` seconds to fail on their own (their own error messages say
  why); then the launcher kills them. The whole group is killed after ``timeout`` seconds. Every child is killed
  on the way out, whatever happens (``try / finally``).
  """
  procs = []
  # A launcher told to stop (SIGTERM) still runs the ``finally`` below, so its processes go with it.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:
    for cmd in commands:
      procs.append(subprocess.Popen(cmd, env=env))
    start = time.monotonic()
    failed_at = None
    first_failure = 0
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        break
      for i, c in enumerate(codes):
        if c not in (None, 0) and failed_at is None:
          failed_at = time.monotonic()
          first_failure = c
          print(f"launcher: {label} {i} exited with code {c}; the others get {grace:.0f} s to stop", flush=True)
      now = time.monotonic()
      if failed_at is not None and now - failed_at > grace:
        alive = [i for i, c in enumerate(codes) if c is None]
        print(f"launcher: killing {label}es {alive}, still running {grace:.0f} s after a failure", flush=True)
        return first_failure
      if now - start > timeout:
        alive = [i for i, c in enumerate(codes) if c is None]
        print(f"launcher: killing {label}es {alive}, still running after the time limit of {timeout:.0f} s", flush=True)
        return first_failure or 124
      time.sleep(0.2)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    return first_failure or (bad[0][1] if bad else 0)
  finally:
    _kill(procs)


def launch(script: str, argv: list, *, num_processes: int, devices: int, timeout: float, grace: float) -> int:
  """Starts ``num_processes`` copies of ``script`` with ``argv``, each told its id and the coordinator's address."""
  address = f"127.0.0.1:{free_port()}"
  print(f"launcher: {num_processes} processes x {devices} CPU devices, coordinator {address}", flush=True)
  commands = [
    [sys.executable, script, *argv, "--coordinator", address, "--process-id", str(i), "--num-processes",
     str(num_processes)]
    for i in range(num_processes)
  ]
  return run_group(commands, child_env(devices), timeout=timeout, grace=grace)


def cluster_env() -> bool:
  """Whether a cluster launcher set up this process (JAX's auto-detection then finds the job)."""
  size = os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE")
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (size is not None and int(size) > 1)


def initialize(coordinator, num_processes, process_id, *, startup_timeout: int, heartbeat_timeout: int) -> None:
  """Joins the job; start-up and failure detection are bounded.

  ``startup_timeout``: how long to wait for every process to connect (and, at the end, to shut down).
  ``heartbeat_timeout``: a process that stops answering (killed, machine lost) is declared dead after this long,
  and the others stop.
  """
  import jax

  # CPU collectives across processes go through gloo over TCP (here: loopback).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  bounds = dict(
    initialization_timeout=startup_timeout,
    heartbeat_timeout_seconds=heartbeat_timeout,
    shutdown_timeout_seconds=startup_timeout,
  )
  if coordinator is None:
    jax.distributed.initialize(**bounds)  # a cluster launcher: the environment names the job
  else:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id, **bounds)


class StageTimeout(RuntimeError):
  pass


def barrier(name: str, timeout: float) -> None:
  """Waits until every process reaches ``name``, at most ``timeout`` seconds.

  Goes through the coordination service (no device collective), so a process that died or hangs before the
  barrier makes the others fail with this stage's name instead of blocking forever.
  """
  import jax
  import orbax.checkpoint as ocp

  if jax.process_count() == 1:
    return
  try:
    ocp.multihost.sync_global_processes(
      f"jqat_{name}", timeout=max(1, int(timeout)), processes=set(range(jax.process_count()))
    )
  except Exception as e:  # the coordination service's error: DEADLINE_EXCEEDED, a task that went away, ...
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise StageTimeout(
      f"process {jax.process_index()}: stage {name!r}: waited at most {timeout:.0f} s for all "
      f"{jax.process_count()} processes, and not all arrived: one of them died or hangs ({first})"
    ) from None


class Watchdog:
  """Ends this process when a stage runs longer than its deadline (for example, a peer hangs in a collective).

  A collective whose peer never arrives blocks its thread in native code, where no Python exception can reach
  it; this thread prints which stage was stuck and exits the process, so that the launcher sees a failure.
  """

  def __init__(self, timeout: float, who: str):
    self.timeout, self.who = timeout, who
    self._stage, self._since, self._limit = "start-up", time.monotonic(), timeout
    threading.Thread(target=self._watch, daemon=True).start()

  def stage(self, name: str, timeout: float | None = None) -> None:
    """Starts stage ``name``, to complete within ``timeout`` seconds (by default the watchdog's)."""
    self._stage, self._since, self._limit = name, time.monotonic(), timeout or self.timeout

  def _watch(self) -> None:
    while True:
      time.sleep(0.5)
      if time.monotonic() - self._since > self._limit:
        print(
          f"{self.who}: stage {self._stage!r} did not complete within {self._limit:.0f} s "
          "(a peer died or hangs); exiting",
          file=sys.stderr,
          flush=True,
        )
        os._exit(3)


def check_agreement(summary: dict, timeout: float) -> None:
  """Raises when the processes' summaries differ, naming the field and both sides' values.

  Every process all-gathers every other's summary (a JSON text, sent as bytes through
  ``multihost_utils.process_allgather``) and compares it with process 0's.
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  barrier("agreement", timeout)
  text = json.dumps(summary, sort_keys=True).encode()
  lengths = multihost_utils.process_allgather(np.array([len(text)], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: len(text)] = np.frombuffer(text, np.uint8)
  texts = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
  lengths = np.asarray(lengths).reshape(-1)
  theirs = [json.loads(bytes(t[:n]).decode()) for t, n in zip(texts, lengths)]
  for p, other in enumerate(theirs[1:], start=1):
    for key in sorted(set(theirs[0]) | set(other)):
      if theirs[0].get(key) != other.get(key):
        raise ValueError(
          f"process {jax.process_index()}: the processes disagree on {key!r}: process 0 has {theirs[0].get(key)}, "
          f"process {p} has {other.get(key)}; every process must run the same jqat configs and model"
        )

"""Multi-process jobs: `jax.distributed.initialize` for the trainer, and a local launcher.

Several processes form one JAX job (one global mesh over every process's devices; each process
feeds its own data shard and writes its own part of every checkpoint). How a process learns
its place, checked by `initialize(mode)` before anything touches a device:

  explicit  the environment names the job: ENGRAM_COORDINATOR (host:port of process 0),
            ENGRAM_NUM_PROCESSES, ENGRAM_PROCESS_ID; `launch_local` sets them. Used whenever
            ENGRAM_COORDINATOR is set.
  'cluster' (`train.distributed='cluster'`): `jax.distributed.initialize()` without arguments,
            i.e. JAX's own cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes
            ...); it raises if it finds no cluster.
  ''        neither: one process.

CPU processes talk through gloo (`jax_cpu_collectives_implementation`), set before the
initialisation; accelerators use their own collectives. `run(fn)` makes an error in one
process end it at once, so that its peers (and `launch_local`) see it.

`launch_local(N, K, args)` runs `python -m experiments.train args` as N local CPU processes of
K fake devices each, so a pod layout (e.g. 2 hosts x 4 chips) is tested on one machine: every
line a process prints is forwarded with a `[p<i>]` prefix, and as soon as one process fails
the others are killed and the launcher exits with that process's status (a process whose
peer died would otherwise wait in a collective forever).

Dimension legend: none (no arrays).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Optional, Sequence

import jax

ENV_COORDINATOR = "ENGRAM_COORDINATOR"
ENV_NUM_PROCESSES = "ENGRAM_NUM_PROCESSES"
ENV_PROCESS_ID = "ENGRAM_PROCESS_ID"
MODES = ("", "cluster")


def initialize(mode: str = "") -> None:
  """Joins the multi-process job described by the environment or `mode` (see module doc);
  nothing when this process already joined one (`train_and_evaluate` calls it too)."""
  if mode not in MODES:
    raise ValueError(f"train.distributed must be one of {MODES}, got {mode!r}")
  coordinator = os.environ.get(ENV_COORDINATOR)
  if (coordinator is None and not mode) or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    jax.distributed.initialize()
    return
  try:
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
    process_id = int(os.environ[ENV_PROCESS_ID])
  except (KeyError, ValueError) as e:
    raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} is set, so {ENV_NUM_PROCESSES} and "
                     f"{ENV_PROCESS_ID} must be integers: {e}") from e
  if not 0 <= process_id < num_processes:
    raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}="
                     f"{num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def run(fn, *args):
  """`fn(*args)`; in a multi-process job an exception ends this process at once (traceback
  printed, exit status 1) instead of waiting at JAX's shutdown barrier for peers that will
  never arrive."""
  try:
    return fn(*args)
  except BaseException:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env(process_id: int, num_processes: int, devices: int, port: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
    out.flush()
  stream.close()


def launch_local(num_processes: int, devices_per_process: int, args: Sequence[str], *,
                 module: str = "experiments.train", port: Optional[int] = None,
                 out=None) -> int:
  """Runs `python -m module args` as one job of local CPU processes; returns the exit status
  (0 when all succeed; else a failed process's, preferring one killed by a signal s, which gives
  -s, over one whose collectives failed after it)."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"--num_processes and --devices_per_process must be >= 1, got "
                     f"{num_processes} and {devices_per_process}")
  out = out or sys.stdout
  port = port or free_port()
  procs, threads = [], []
  try:
    for i in range(num_processes):
      p = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env=_child_env(i, num_processes, devices_per_process, port))
      procs.append(p)
      t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}]", out), daemon=True)
      t.start()
      threads.append(t)
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        # Every process found failed in this poll is named (also when all have ended by now):
        # when one dies its peers' collectives fail too, possibly before this poll, and which
        # exited first is then unknown. A process killed by a signal is taken as the cause.
        for i in failed:
          out.write(f"[launch_local] process {i} exited with {codes[i]}\n")
        signalled = [codes[i] for i in failed if codes[i] < 0]
        status = (signalled or [codes[failed[0]]])[0]
        if any(c is None for c in codes):
          out.write("[launch_local] stopping the others\n")
        break
      if all(c is not None for c in codes):
        status = 0
        break
      time.sleep(0.1)
    return status
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
    for t in threads:
      t.join(timeout=5)

"""Test setup, before jax is imported: eight fake CPU devices for mesh tests, and one JAX
compilation cache for the whole run.

The suite compiles the same programs many times (the tiny models' steps in many tests, and in
the `experiments.*` commands the tests run as subprocesses). One persistent compilation cache
(`JAX_COMPILATION_CACHE_DIR`, inherited by the xdist workers and every subprocess) compiles
each once: a fresh temporary directory per run, removed at its end, or `ENGRAM_TEST_CACHE=DIR`
to keep one across runs. A cached executable is the one the compiler would produce, so no
result depends on it.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if not os.environ.get("ENGRAM_TEST_GPU"):
  # CPU by default so a machine with an accelerator still runs the CPU suite as CI does.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

if not os.environ.get("ENGRAM_TEST_CACHE"):
  os.environ["ENGRAM_TEST_CACHE"] = tempfile.mkdtemp(prefix="engram-jax-jit-cache-")
  atexit.register(shutil.rmtree, os.environ["ENGRAM_TEST_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ENGRAM_TEST_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Runs the modules that hold `slow` tests first, and skips tests marked `gpu` unless a GPU
  backend is present.

  pytest.ini's `--dist loadfile` gives each xdist worker whole modules (so a module-scoped
  fixture, e.g. a training run shared by a module's tests, is computed once) in collection
  order: the long modules first leave the short ones to even out the workers at the end."""
  slow = {item.module.__name__ for item in items if "slow" in item.keywords}
  items.sort(key=lambda item: item.module.__name__ not in slow)   # stable: order kept within
  try:
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    has_gpu = False
  skip = pytest.mark.skip(reason="needs a GPU (set ENGRAM_TEST_GPU=1 on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)

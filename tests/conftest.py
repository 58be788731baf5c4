"""Test setup: eight fake CPU devices for mesh tests, set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if not os.environ.get("ENGRAM_TEST_GPU"):
  # CPU by default so a machine with an accelerator still runs the CPU suite as CI does.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Skips tests marked `gpu` unless a GPU backend is present."""
  try:
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    has_gpu = False
  skip = pytest.mark.skip(reason="needs a GPU (set ENGRAM_TEST_GPU=1 on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)

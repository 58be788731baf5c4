"""The Engram-layer demo runs end to end on the shipped tokenizer and text."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_demo_layer_runs_and_checks_device_hash_against_host():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.demo_layer", "--seq_len=64", "--batch=1",
       "--hidden=64", "--hc_mult=2", "--repeats=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "identical: True" in out.stdout
  assert "gradients finite: True" in out.stdout
  assert "out (1, 64, 2, 64)" in out.stdout

"""`pip install .` gives working packages outside the clone (pyproject.toml).

The distribution is built from a copy of the files it ships (pyproject.toml, README.md and the
three packages) and installed with `pip install --no-deps --no-build-isolation --target DIR`:
no network, the running interpreter's dependencies (requirements.txt, which includes the
setuptools build backend). Everything else runs in a subprocess from an empty directory with
PYTHONPATH=DIR only, so nothing can be imported from the repository.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("pyproject.toml", "README.md", "engram_jax", "pallas_kernels", "experiments")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(site, cwd): the directory the packages were installed into and an empty directory."""
  assert importlib.util.find_spec("setuptools") is not None, (
      "setuptools (the build backend) is missing: pip install -r requirements.txt")
  root = tmp_path_factory.mktemp("packaging")
  src, site, cwd = root / "src", root / "site", root / "cwd"
  src.mkdir()
  cwd.mkdir()
  for name in SHIPPED:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                      "--no-build-isolation", "--no-compile", "--target", str(site), str(src)],
                     cwd=cwd, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  return site, cwd


def _run(installed, args, timeout):
  site, cwd = installed
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


_PROBE = """
import json, os
import engram_jax, pallas_kernels, experiments
from engram_jax import data, tokenizer
from pallas_kernels.engram_lookup import api
from experiments.configs import tiny_test
print(json.dumps({
    "modules": [m.__file__ for m in (engram_jax, pallas_kernels, experiments, api, tiny_test)],
    "data": data.default_corpus_paths()["train"] + data.default_corpus_paths()["valid"]
            + [tokenizer.default_tokenizer_path()],
    "vocab": tokenizer.load_tokenizer(tokenizer.default_tokenizer_path()).get_vocab_size(),
}))
"""


def test_installed_packages_import_from_another_directory(installed):
  site, _ = installed
  r = _run(installed, ["-c", _PROBE], timeout=120)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for path in out["modules"] + out["data"]:
    assert path.startswith(str(site) + os.sep), path  # the installed copy, not the clone
    assert os.path.isfile(path), path
  assert out["vocab"] == 8192
  # Only the three packages are installed (benchmarks/ and tests/ run from a clone).
  tops = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
  assert tops == {"engram_jax", "pallas_kernels", "experiments"}


@pytest.mark.slow
def test_installed_package_trains_tiny_config(installed, tmp_path):
  """A few steps of experiments/configs/tiny_test.py on the installed corpus and tokenizer.

  The corpus's small validation split serves as training and evaluation data, so the run
  spends its time compiling rather than tokenising the full training split.
  """
  site, _ = installed
  valid = site / "engram_jax" / "assets" / "corpus" / "valid.txt.gz"
  workdir = tmp_path / "run"
  r = _run(installed, [
      "-m", "experiments.train", f"--config={site / 'experiments/configs/tiny_test.py'}",
      f"--workdir={workdir}", "--config.train.num_steps=2", "--config.train.checkpoint_every=2",
      f"--config.data.train_files=('{valid}',)", f"--config.data.eval_files=('{valid}',)",
      "--config.train.num_eval_batches=1"], timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["steps"] == 2
  assert 0 < final["train_loss"] < 20 and 0 < final["eval_loss"] < 20, final
  assert (workdir / "checkpoints").is_dir()

"""Every experiment config loads, passes its invariants and builds under jax.eval_shape; bad
flags and bad data paths fail with clear errors."""

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from engram_jax import experiment_config
from engram_jax import param_count
from engram_jax.model import EngramLM
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(REPO, "experiments/configs/*.py"))
                      if not f.endswith("__init__.py"))


def _load(path, arg=None):
  name = os.path.splitext(os.path.basename(path))[0]
  module = __import__(f"experiments.configs.{name}", fromlist=["get_config"])
  return module.get_config(arg)


def test_all_configs_are_found():
  names = {os.path.basename(f) for f in CONFIG_FILES}
  assert {"base.py", "quickstart.py", "quickstart_moe.py", "small_gpu.py",
          "small_gpu_moe.py", "tiny_test.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_locked_documented_and_builds(path):
  config = _load(path)
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked
  with open(path) as f:
    header = f.read().split('"""')[1]
  assert "python -m experiments." in header, "header must give the exact command"
  exp = experiment_config.resolve(config)
  model = EngramLM(exp.model)
  b, t = 2, 16
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  engram_inputs = None
  if exp.model.engram is not None:
    h = exp.model.engram.num_heads
    if exp.sparse_tables:
      u = b * t * h
      engram_inputs = {l: PrefetchedRows(jax.ShapeDtypeStruct((u, exp.model.engram.head_dim),
                                                              jnp.float32),
                                         jax.ShapeDtypeStruct((b, t, h), jnp.int32),
                                         jax.ShapeDtypeStruct((u,), jnp.int32))
                       for l in exp.model.engram.layer_ids}
    else:
      engram_inputs = {l: jax.ShapeDtypeStruct((b, t, h), jnp.int32)
                       for l in exp.model.engram.layer_ids}
  variables = jax.eval_shape(
      lambda x, e: model.init(jax.random.PRNGKey(0), x, engram_inputs=e), tokens, engram_inputs)
  n = param_count.tree_param_count(variables["params"])
  counted = param_count.count_params(exp.model)
  # External tables are not in the param tree; the counter includes them.
  expected = counted["total"] - (counted["engram"] if exp.sparse_tables else 0)
  assert n == expected


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_drop_no_token(path):
  # Capacity dispatch (which drops pairs over capacity) is an explicit option, never shipped.
  moe = experiment_config.model_config(_load(path), 1000).moe
  assert moe is None or moe.dispatch == "ragged"


def test_moe_baselines_match_total_params():
  for engram_name, moe_name in (("quickstart", "quickstart_moe"), ("small_gpu", "small_gpu_moe")):
    a = experiment_config.resolve(_load(os.path.join(REPO, f"experiments/configs/{engram_name}.py")))
    b = experiment_config.resolve(_load(os.path.join(REPO, f"experiments/configs/{moe_name}.py")))
    assert b.model.engram is None and a.model.engram is not None
    report = param_count.iso_param_report(a.model, b.model)
    assert abs(report["total_rel_diff"]) < 0.02, report


def test_invariants_checked_at_load_time():
  from experiments.configs import quickstart
  config = quickstart.get_config()
  config.engram.layer_ids = (7,)
  with pytest.raises(ValueError, match="engram.layer_ids"):
    experiment_config.check_config(config)
  config = quickstart.get_config()
  config.optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule must be one of"):
    experiment_config.check_config(config)
  config = quickstart.get_config()
  config.table_optim.kind = "sgd"
  with pytest.raises(ValueError, match="table_optim.kind must be one of"):
    experiment_config.check_config(config)
  config = quickstart.get_config()
  with pytest.raises(AttributeError):
    config.train.no_such_field = 1  # locked: typos fail


def test_missing_data_file_is_named():
  from experiments.configs import tiny_test
  config = tiny_test.get_config()
  config.data.train_files = ("/nonexistent/corpus.txt",)
  with pytest.raises(FileNotFoundError, match="/nonexistent/corpus.txt"):
    experiment_config.resolve(config)


def _run_train(*flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.train", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_flag_and_bad_data_path(tmp_path):
  cfg = "--config=experiments/configs/tiny_test.py"
  r = _run_train(cfg, f"--workdir={tmp_path}", "--config.train.no_such_field=3")
  assert r.returncode != 0 and "no_such_field" in r.stderr
  r = _run_train(cfg, f"--workdir={tmp_path}", "--config.data.train_files=('/no/such.txt',)")
  assert r.returncode != 0 and "/no/such.txt" in r.stderr and "not found" in r.stderr
  r = _run_train(f"--workdir={tmp_path}")
  assert r.returncode != 0 and "config" in r.stderr

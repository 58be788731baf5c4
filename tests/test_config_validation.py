"""Load-time validation of every config field: a bad value is refused in one line that names
its field path and allowed range, on the library path and at the command line, and a refused run
leaves no workdir behind.

Dimension legend: none (configs only).
"""

import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from engram_jax import experiment_config
from engram_jax.experiment_config import ConfigError
from experiments.configs import base, tiny_test
from experiments.paper.configs import paper, paper_moe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Checked together (at most one -1) and with the batch size in `_check_mesh`, not by a field
# rule of their own.
CHECKED_WITH_OTHER_FIELDS = {"train.mesh.data", "train.mesh.fsdp", "train.mesh.tensor",
                             "train.mesh.expert"}


def _override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  return experiment_config.apply_overrides(config, overrides.items())


# (overrides, the field path the error must name, a piece of the allowed range it must give).
BAD_VALUES = [
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints", ">= 1"),
    ({"train.num_eval_batches": -1}, "train.num_eval_batches", ">= 0"),
    ({"train.eval_every": -1}, "train.eval_every", ">= 0"),
    ({"engram.layer_ids": ()}, "engram.layer_ids", "non-empty"),
    ({"engram.seed": -1}, "engram.seed", "[0, 2147483647]"),
    ({"seed": -1}, "seed", "[0, 2147483647]"),
    ({"data.shuffle_seed": -3}, "data.shuffle_seed", "[0, 2147483647]"),
    ({"optim.learning_rate": 1e39}, "optim.learning_rate", "finite and > 0 in float32"),
    ({"optim.learning_rate": float("inf")}, "optim.learning_rate", "finite"),
    ({"optim.learning_rate": float("nan")}, "optim.learning_rate", "finite"),
    ({"optim.learning_rate": 1e-50}, "optim.learning_rate", "> 0 in float32"),
    # Finite in float32 (max 3.40e38), inf in bfloat16 (max 3.39e38).
    ({"model.param_dtype": "bfloat16", "optim.learning_rate": 3.4e38}, "optim.learning_rate",
     "model.param_dtype='bfloat16'"),
    ({"table_optim.lr_multiplier": 1e39}, "table_optim.lr_multiplier", "finite"),
    ({"optim.learning_rate": 1e20, "table_optim.lr_multiplier": 1e20},
     "optim.learning_rate * table_optim.lr_multiplier", "finite and > 0 in float32"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate", "> 0"),
    ({"data.seq_len": 1}, "data.seq_len", ">= 2"),
    ({"data.batch_size": 0}, "data.batch_size", ">= 1"),
    ({"model.hidden_size": 0}, "model.hidden_size", ">= 1"),
    ({"model.num_layers": -2}, "model.num_layers", ">= 1"),
    ({"model.vocab_size": -1}, "model.vocab_size", "[0, 2147483648]"),
    ({"model.moe.num_experts": 0}, "model.moe.num_experts", ">= 1"),
    ({"model.moe.capacity_factor": float("nan")}, "model.moe.capacity_factor", "finite"),
    ({"engram.n_embed_per_ngram": 0}, "engram.n_embed_per_ngram", ">= 1"),
    ({"train.peak_flops": -1.0}, "train.peak_flops", ">= 0"),
    ({"train.inject_nan_at_step": -1}, "train.inject_nan_at_step", ">= 0"),
    ({"optim.b1": 1.0}, "optim.b1", "[0, 1)"),
    ({"optim.b2": -0.1}, "optim.b2", "[0, 1)"),
    ({"optim.min_lr_ratio": 1.5}, "optim.min_lr_ratio", "[0, 1]"),
    ({"optim.decay_factor": 0.0}, "optim.decay_factor", "(0, 1]"),
    ({"optim.decay_boundaries": (0.9, 0.8)}, "optim.decay_boundaries", "increasing"),
    ({"table_optim.b1": 1.0}, "table_optim.b1", "[0, 1)"),
    ({"model.dtype": "float16"}, "model.dtype", "one of ('float32', 'bfloat16')"),
    ({"engram.placement": "hbm"}, "engram.placement", "one of ('device', 'pinned_host')"),
    # Cross-field rules of the dataclasses, reported under the config path.
    ({"model.moe.top_k": 5}, "model.moe.top_k", "num_experts=4"),
    ({"engram.n_embed_per_ngram": 15}, "engram.n_embed_per_ngram", "multiple of"),
    ({"engram.layer_ids": (1, 1)}, "engram.layer_ids", "duplicates"),
    ({"optim.warmup_steps": 21}, "optim.warmup_steps", "num_steps=20"),
]


@pytest.mark.parametrize("overrides, path, allowed", BAD_VALUES,
                         ids=[f"{p}={list(o.values())[-1]}" for o, p, _ in BAD_VALUES])
def test_bad_value_is_refused_in_one_line_naming_the_field(overrides, path, allowed):
  config = _override(tiny_test.get_config(), overrides)
  with pytest.raises(ConfigError) as e:
    experiment_config.check_config(config)
  message = str(e.value)
  assert "\n" not in message
  assert re.search(rf"(^|[\s']){re.escape(path)}\b", message), message
  assert allowed in message, message


def test_resolve_and_lock_refuse_too():
  with pytest.raises(ConfigError, match="train.keep_checkpoints"):
    experiment_config.resolve(_override(tiny_test.get_config(), {"train.keep_checkpoints": 0}),
                              check_data=False)
  config = base.get_config()
  config.unlock()
  with pytest.raises(ConfigError, match="engram.seed"):
    base.lock(_override(config, {"engram.seed": -1}))


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, path + ".")
    else:
      yield path


def test_every_base_field_has_a_rule_and_every_rule_a_field():
  fields = set(_leaves(base.get_config()))
  assert fields - set(experiment_config.FIELD_RULES) == CHECKED_WITH_OTHER_FIELDS
  assert set(experiment_config.FIELD_RULES) <= fields


@pytest.mark.parametrize("module, arg", [(paper, None), (paper, "tiny"), (paper_moe, None),
                                         (paper_moe, "tiny")])
def test_paper_configs_pass(module, arg):
  experiment_config.check_config(module.get_config(arg))


def test_a_config_lacking_fields_is_refused_naming_them():
  config = ml_collections.ConfigDict(tiny_test.get_config().to_dict())
  del config.engram["placement"]
  del config.train.mesh["expert"]
  with pytest.raises(ConfigError, match=r"missing fields engram\.placement, "
                                        r"train\.mesh\.expert"):
    experiment_config.check_config(config)


def test_a_workdir_config_lacking_a_field_is_refused_naming_the_file(tmp_path):
  from engram_jax import evaluate  # noqa: PLC0415
  as_dict = tiny_test.get_config().to_dict()
  del as_dict["engram"]["gate"]
  (tmp_path / "config.json").write_text(json.dumps(as_dict))
  with pytest.raises(ConfigError, match=r"config\.json: .*missing field engram\.gate"):
    evaluate.load_workdir_config(str(tmp_path))
  as_dict["engram"]["gate"] = "multi"
  (tmp_path / "config.json").write_text(json.dumps(as_dict))
  assert evaluate.load_workdir_config(str(tmp_path)).engram.gate == "multi"


def test_unknown_key_names_the_full_path():
  config = tiny_test.get_config()
  assert experiment_config.unknown_key(config, "train.num_steps") is None
  message = experiment_config.unknown_key(config, "train.foo")
  assert "'train.foo'" in message and "keep_checkpoints" in message
  assert "is a value" in experiment_config.unknown_key(config, "train.num_steps.x")


def _run(module, *flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def _one_line(r) -> str:
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
  return lines[0]


@pytest.mark.parametrize("flag, named", [
    ("--config.train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("--config.train.foo=1", "'train.foo'"),
    ("--config.data.train_files=('/no/such.txt',)", "/no/such.txt"),
])
def test_train_cli_prints_one_line_and_creates_no_workdir(tmp_path, flag, named):
  workdir = tmp_path / "run"
  line = _one_line(_run("experiments.train", "--config=experiments/configs/tiny_test.py",
                        f"--workdir={workdir}", flag))
  assert named in line, line
  assert not workdir.exists()


def test_missing_config_file_is_one_line(tmp_path):
  line = _one_line(_run("experiments.train", "--config=no/such/config.py",
                        f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=3"))
  assert "no/such/config.py" in line and not (tmp_path / "run").exists()


def test_quickstart_checks_both_configs_before_any_workdir(tmp_path):
  # 5 steps is shorter than the warmup (30): refused before the Engram model trains.
  line = _one_line(_run("experiments.quickstart", f"--workdir={tmp_path / 'qs'}",
                        "--num_steps=5"))
  assert "optim.warmup_steps" in line
  assert not (tmp_path / "qs").exists()


def test_eval_cli_prints_one_line(tmp_path):
  line = _one_line(_run("experiments.eval", f"--workdir={tmp_path}", "--data=README.md"))
  assert "no config.json" in line

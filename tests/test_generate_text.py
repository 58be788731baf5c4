"""Text from a training workdir: `generate.TextDecoder` / `generate_text` and
`python -m experiments.generate` on a tiny run trained for a few steps (CPU).

The decoder's tokens must be the windowed oracle's (tests/windowed_decoder.py) over the model
and tables that the trainer itself restores, for tables in the train state, in the params
('dense_adam'), in pinned host memory, and without Engram layers.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import evaluate
from engram_jax import experiment_config
from engram_jax import generate
from engram_jax import tokenizer as tokenizer_lib
from engram_jax import train
from experiments.configs import tiny_test
from tests.windowed_decoder import WindowedDecoder


PROMPT = "The history of the"


def _train(workdir, **overrides):
  c = tiny_test.get_config(overrides.pop("table_optim.kind", None))
  valid = data_lib.default_corpus_paths()["valid"]
  c.data.train_files = tuple(valid)   # the small file: tokenised in well under a second
  c.data.eval_files = tuple(valid)
  c.train.num_steps = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.num_eval_batches = 1
  experiment_config.apply_overrides(c, overrides.items())
  train.train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("generate")))


@pytest.fixture(scope="module")
def text_decoder(workdir):
  return generate.TextDecoder.load(workdir)


def _oracle(workdir):
  """The windowed decoder over the model, variables and tables the trainer restores."""
  trainer, _, state, _ = train.restore_latest(evaluate.load_workdir_config(workdir), workdir)
  exp = trainer.exp
  variables = {"params": state.params, **state.model_state}
  if exp.hashing is None:
    tables = {}
  elif exp.table_placement == "pinned_host":
    tables = dict(trainer.host.tables)
  elif exp.sparse_tables:
    tables = {int(k): t for k, t in state.tables.items()}
  else:
    tables = {}   # 'dense_adam': the model looks its hash ids up in its own params

  def logits_fn(tokens_BxT, rows):
    if exp.hashing is None or tables:
      inputs = rows
    else:
      inputs = exp.hashing.hash(jnp.asarray(exp.compressor.lookup_table)[tokens_BxT])
    return trainer.model.apply(variables, tokens_BxT, engram_inputs=inputs)[0]
  return WindowedDecoder(logits_fn, tables, exp.hashing if tables else None,
                         exp.compressor.lookup_table if tables else None)


def _prompt_ids(text_decoder):
  return np.asarray([text_decoder.tokenizer.encode(PROMPT, add_special_tokens=False).ids],
                    np.int32)


def test_text_decodes_through_the_run_tokenizer_and_equals_the_oracle(workdir, text_decoder):
  new = 8
  ids = text_decoder.continuation_ids(PROMPT, max_new_tokens=new)
  text = text_decoder(PROMPT, max_new_tokens=new)
  tok = tokenizer_lib.load_tokenizer(evaluate.load_workdir_config(workdir).data.tokenizer_path
                                     or None)
  assert text == tok.decode(ids.tolist(), skip_special_tokens=True)
  prompt = _prompt_ids(text_decoder)
  want = _oracle(workdir)(prompt, new)[0, prompt.shape[1]:]
  eos = np.flatnonzero(want == tokenizer_lib.EOS_ID)
  np.testing.assert_array_equal(ids, want[:eos[0]] if eos.size else want)
  assert text_decoder.step == 2


def test_greedy_and_seeded_sampling_are_deterministic(text_decoder):
  greedy = text_decoder(PROMPT, max_new_tokens=8)
  assert greedy == text_decoder(PROMPT, max_new_tokens=8, seed=7)  # greedy ignores the seed
  sampled = [text_decoder(PROMPT, max_new_tokens=8, temperature=1.0, seed=s) for s in (0, 0, 1)]
  assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
  assert text_decoder(PROMPT, max_new_tokens=8, temperature=3.0, top_k=1, seed=3) == greedy
  top_k = [text_decoder(PROMPT, max_new_tokens=8, temperature=0.8, top_k=20, seed=4)
           for _ in range(2)]
  assert top_k[0] == top_k[1]


def test_clear_errors(workdir, text_decoder, tmp_path):
  with pytest.raises(ValueError, match="prompt is empty"):
    text_decoder("", max_new_tokens=2)
  with pytest.raises(ValueError, match=r"the model decodes at most 32 \(data.seq_len"):
    text_decoder("word " * 40, max_new_tokens=2)
  with pytest.raises(ValueError, match="use max_new_tokens <= "):
    text_decoder(PROMPT, max_new_tokens=32)
  empty = tmp_path / "no_checkpoint"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    generate.TextDecoder.load(str(empty))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    generate.TextDecoder.load(str(tmp_path))


def test_command_prints_the_continuation(workdir, text_decoder, capsys, tmp_path):
  from absl import flags
  from experiments import generate as command
  want = text_decoder(PROMPT, max_new_tokens=8, temperature=0.8, top_k=20, seed=4)
  argv = ["generate", f"--workdir={workdir}", f"--prompt={PROMPT}", "--max_new_tokens=8",
          "--temperature=0.8", "--top_k=20", "--seed=4"]
  try:
    flags.FLAGS(argv)
    command.main(argv[:1])
    assert capsys.readouterr().out.endswith(want + "\n")
    flags.FLAGS(["generate", f"--workdir={tmp_path}"])
    with pytest.raises(SystemExit, match="^generate: no config.json in workdir"):
      command.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()


@pytest.mark.slow
@pytest.mark.parametrize("run", ["pinned_host", "dense_adam", "no_engram"])
def test_every_kind_of_workdir_decodes_as_the_oracle(run, tmp_path):
  """Host tables, tables in the params, and an MoE baseline without Engram layers."""
  overrides = {"pinned_host": {"engram.placement": "pinned_host"},
               "dense_adam": {"table_optim.kind": "dense_adam"},
               "no_engram": {"engram.enabled": False}}[run]
  workdir = _train(str(tmp_path), **overrides)
  text_decoder = generate.TextDecoder.load(workdir)
  assert sorted(text_decoder.decoder.placements.values()) == (
      {"pinned_host": ["pinned_host"], "dense_adam": ["device"], "no_engram": []}[run])
  prompt, oracle = _prompt_ids(text_decoder), _oracle(workdir)
  for kw in (dict(), dict(temperature=1.0, seed=2)):
    np.testing.assert_array_equal(text_decoder.decoder(prompt, 6, **kw), oracle(prompt, 6, **kw))

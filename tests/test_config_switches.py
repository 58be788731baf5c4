"""The Engram ablation switches at the config boundary: validation, the identity compression,
parameter counts of every variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import experiment_config
from engram_jax import param_count
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.compression import CompressedTokenizer
from engram_jax.config import EngramConfig
from engram_jax.model import EngramLM
from experiments.configs import tiny_test


def test_switch_defaults_are_the_demo_layer():
  cfg = EngramConfig()
  assert (cfg.gate, cfg.use_short_conv, cfg.compress_tokenizer) == ("multi", True, True)
  assert cfg.gate_streams == cfg.hc_mult
  assert cfg.replace(gate="shared").gate_streams == 1
  assert cfg.replace(gate="none").gate_streams == 0


@pytest.mark.parametrize("field, value", [
    ("gate", "per_head"), ("gate", None), ("use_short_conv", 1), ("compress_tokenizer", "no"),
])
def test_bad_switch_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"EngramConfig.{field}"):
    EngramConfig(**{field: value})


def test_identity_compression_maps_every_id_to_itself():
  tok = tokenizer_lib.load_tokenizer()
  vocab = tok.get_vocab_size(with_added_tokens=True)
  identity = CompressedTokenizer(tok, compress=False)
  compressed = CompressedTokenizer(tok)
  assert len(identity) == identity.raw_vocab_size == vocab > len(compressed)
  np.testing.assert_array_equal(identity.lookup_table, np.arange(vocab))
  ids = np.array([[0, 5, vocab - 1, -1]])
  np.testing.assert_array_equal(identity(ids), ids)
  assert identity.compress_pad_id(tokenizer_lib.PAD_ID) == tokenizer_lib.PAD_ID
  assert identity.keys[7] == tok.id_to_token(7)
  assert identity.fingerprint() != compressed.fingerprint()


def test_compress_tokenizer_off_hashes_raw_ids_and_changes_the_fingerprint():
  on = experiment_config.resolve(tiny_test.get_config())
  config = tiny_test.get_config()
  config.engram.compress_tokenizer = False
  off = experiment_config.resolve(config)
  vocab = tokenizer_lib.load_tokenizer().get_vocab_size(with_added_tokens=True)
  assert off.hashing.tokenizer_vocab_size == vocab > on.hashing.tokenizer_vocab_size
  np.testing.assert_array_equal(off.compressor.lookup_table, np.arange(vocab))
  assert off.fingerprint()["compression"] != on.fingerprint()["compression"]
  # The other switches do not change the ids, so they leave the fingerprint alone.
  config = tiny_test.get_config()
  config.engram.gate, config.engram.use_short_conv = "none", False
  assert experiment_config.resolve(config).fingerprint() == on.fingerprint()


@pytest.mark.parametrize("overrides", [
    {}, {"gate": "shared"}, {"gate": "none"}, {"use_short_conv": False},
    {"gate": "none", "use_short_conv": False}, {"max_ngram_size": 4,
                                                "engram_vocab_size": (331, 331, 331)},
])
def test_param_count_of_every_variant_matches_the_model(overrides):
  config = tiny_test.get_config("dense_adam")  # tables in the param tree: one count covers all
  for key, value in overrides.items():
    config.engram[key] = value
  exp = experiment_config.resolve(config)
  h = exp.model.engram.num_heads
  variables = jax.eval_shape(
      lambda x, e: EngramLM(exp.model).init(jax.random.PRNGKey(0), x, engram_inputs=e),
      jax.ShapeDtypeStruct((2, 8), jnp.int32),
      {l: jax.ShapeDtypeStruct((2, 8, h), jnp.int32) for l in exp.model.engram.layer_ids})
  assert param_count.tree_param_count(variables["params"]) == \
      param_count.count_params(exp.model)["total"]

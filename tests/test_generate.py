"""Generation with the EngramLM decode caches (`CachedGenerator` + `engram_lm_decoder`).

The cached path (prompt once, then one token per step through the KV caches and ShortConv
histories, rows of each new position fetched from HBM or pinned_host tables) must sample the
same tokens as the windowed `Generator`, which recomputes the full causal forward every step.

Dimension legend: B batch, P prompt length, T tokens, V vocab.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import offload
from engram_jax.generate import CachedGenerator, Generator, engram_lm_decoder
from engram_jax.hashing import NgramHashMapping
from engram_jax.memory import head_offsets
from engram_jax.model import EngramLM
from pallas_kernels.engram_lookup import prefetch_rows
from tests.test_model import ENGRAM, V, tiny_cfg

B, P, NEW = 2, 4, 6


def _setup(placement):
  cfg = tiny_cfg(engram_table_placement="external",
                 engram=ENGRAM.replace(zero_init_conv=False))  # the conv history must matter
  mapping = NgramHashMapping.from_config(cfg.engram, V, 0)
  tables = {l: offload.create_table(mapping.num_rows(l), cfg.engram.head_dim, jnp.float32,
                                    placement, seed=l) for l in cfg.engram.layer_ids}
  x = jax.random.randint(jax.random.key(0), (B, P + NEW), 0, V)
  ids = {l: jnp.asarray(v, jnp.int32) for l, v in mapping.hash_numpy(np.asarray(x)).items()}
  init_tables = {l: offload.create_table(mapping.num_rows(l), cfg.engram.head_dim, jnp.float32,
                                         "device", seed=l) for l in cfg.engram.layer_ids}
  rows = {l: prefetch_rows(init_tables[l], ids[l],
                           jnp.asarray(head_offsets(cfg.engram_head_sizes_for(l))))
          for l in cfg.engram.layer_ids}
  variables = EngramLM(cfg).init(jax.random.key(1), x, engram_inputs=rows)
  variables = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, variables,
                           is_leaf=lambda a: hasattr(a, "value"))
  return cfg, mapping, tables, variables


@pytest.mark.parametrize("fetch_in_step", [True, False])
@pytest.mark.parametrize("placement", ["pinned_host", "device"])
def test_cached_generation_equals_windowed_generation(placement, fetch_in_step):
  cfg, mapping, tables, variables = _setup(placement)
  model = EngramLM(cfg)

  def logits_fn(tokens_BxT, rows):
    return model.apply(variables, tokens_BxT, engram_inputs=rows)[0]

  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  windowed = Generator(logits_fn, tables, mapping)(prompt, NEW)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  gen = CachedGenerator(decode_fn, init_cache, variables, tables, mapping,
                        fetch_in_step=fetch_in_step)
  with jax.transfer_guard("disallow"):
    cached = gen(prompt, NEW)
  np.testing.assert_array_equal(cached, windowed)
  assert cached.shape == (B, P + NEW)
  assert len(set(cached[:, P:].ravel().tolist())) > 1       # not a degenerate constant run


def test_decoder_refuses_tables_inside_the_params():
  with pytest.raises(ValueError, match="external"):
    engram_lm_decoder(tiny_cfg())


def test_in_step_fetch_keeps_host_tables_on_the_host():
  """The decode program that gathers a token's rows takes the pinned_host tables as operands in
  host memory (S(5)) and no instruction copies a table-sized value (the CPU backend may elide a
  memory-space move inside a program, so that second check bites on a GPU)."""
  import re
  cfg, mapping, tables, variables = _setup("pinned_host")
  init_cache, decode_fn = engram_lm_decoder(cfg)
  gen = CachedGenerator(decode_fn, init_cache, variables, tables, mapping)
  seen = []
  jitted = gen._decode_fetching

  def record(*args):
    seen.append(args)
    return jitted(*args)
  gen._decode_fetching = record
  gen(np.zeros((B, P), np.int32), 3)
  assert seen, "the in-step fetch path did not run"
  text = jitted.lower(*seen[0]).compile().as_text()
  header = text.splitlines()[0]
  layout = header[header.index("entry_computation_layout="):]
  for l, table in tables.items():
    shape = f"f32[{table.shape[0]},{table.shape[1]}]"
    found = re.findall(re.escape(shape) + r"\{[^}]*\}", layout)
    assert found and all(":S(5)" in f for f in found), (shape, found)
    copies = [line for line in text.splitlines()
              if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} (copy|copy-start|copy-done)\(",
                           line)]
    assert not copies, copies

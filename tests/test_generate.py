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

from engram_jax import host_memory
from engram_jax.generate import (CachedGenerator, Generator, ThreadedGenerator, engram_lm_decoder,
                                 engram_lm_stages)
from engram_jax.hashing import NgramHashMapping
from engram_jax.memory import head_offsets
from engram_jax.model import EngramLM
from pallas_kernels.engram_lookup import prefetch_rows
from tests.test_model import ENGRAM, V, tiny_cfg

B, P, NEW = 2, 4, 6


def _setup(placement, layer_ids=ENGRAM.layer_ids):
  cfg = tiny_cfg(engram_table_placement="external",  # the conv history must matter:
                 engram=ENGRAM.replace(zero_init_conv=False, layer_ids=layer_ids))
  mapping = NgramHashMapping.from_config(cfg.engram, V, 0)
  tables = {l: host_memory.create_table(mapping.num_rows(l), cfg.engram.head_dim, jnp.float32,
                                    placement, seed=l) for l in cfg.engram.layer_ids}
  x = jax.random.randint(jax.random.key(0), (B, P + NEW), 0, V)
  ids = {l: jnp.asarray(v, jnp.int32) for l, v in mapping.hash_numpy(np.asarray(x)).items()}
  init_tables = {l: host_memory.create_table(mapping.num_rows(l), cfg.engram.head_dim, jnp.float32,
                                         "device", seed=l) for l in cfg.engram.layer_ids}
  rows = {l: prefetch_rows(init_tables[l], ids[l],
                           jnp.asarray(head_offsets(cfg.engram_head_sizes_for(l))))
          for l in cfg.engram.layer_ids}
  variables = EngramLM(cfg).init(jax.random.key(1), x, engram_inputs=rows)
  variables = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, variables,
                           is_leaf=lambda a: hasattr(a, "value"))
  return cfg, mapping, tables, variables


INTERPRET = jax.default_backend() == "cpu"   # fetch='direct''s GPU kernel, interpreted on CPU


@pytest.mark.parametrize("placement,fetch", [  # 'program' differs from 'step' only on the host
    ("pinned_host", "direct"), ("pinned_host", "step"), ("pinned_host", "program"),
    ("device", "direct"), ("device", "step")])
def test_cached_generation_equals_windowed_generation(placement, fetch):
  cfg, mapping, tables, variables = _setup(placement)
  model = EngramLM(cfg)

  def logits_fn(tokens_BxT, rows):
    return model.apply(variables, tokens_BxT, engram_inputs=rows)[0]

  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  windowed = Generator(logits_fn, tables, mapping)(prompt, NEW)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  gen = CachedGenerator(decode_fn, init_cache, variables, tables, mapping, fetch=fetch,
                        interpret=INTERPRET)
  assert gen.fetch == fetch
  with jax.transfer_guard("disallow"):
    cached = gen(prompt, NEW)
  np.testing.assert_array_equal(cached, windowed)
  assert cached.shape == (B, P + NEW)
  assert len(set(cached[:, P:].ravel().tolist())) > 1       # not a degenerate constant run


def test_decoder_refuses_tables_inside_the_params():
  with pytest.raises(ValueError, match="external"):
    engram_lm_decoder(tiny_cfg())


def _decode_program_arguments(fetch, program):
  """(the argument layouts of the generator's compiled per-token program `program`, tables,
  mapping) after a short decode with `fetch`; asserts the pinned_host tables
  are operands in host memory (S(5)) and that no instruction copies a table-sized value (the CPU
  backend may elide a memory-space move inside a program, so that second check bites on a GPU)."""
  import re
  cfg, mapping, tables, variables = _setup("pinned_host")
  init_cache, decode_fn = engram_lm_decoder(cfg)
  gen = CachedGenerator(decode_fn, init_cache, variables, tables, mapping, fetch=fetch,
                        interpret=INTERPRET)
  seen = []
  jitted = getattr(gen, program)

  def record(*args):
    seen.append(args)
    return jitted(*args)
  setattr(gen, program, record)
  gen(np.zeros((B, P), np.int32), 3)
  assert seen, f"{program} did not run"
  text = jitted.lower(*seen[0]).compile().as_text()
  header = text.splitlines()[0]
  arguments = header[header.index("entry_computation_layout="):].split("->")[0]
  for table in tables.values():
    shape = f"f32[{table.shape[0]},{table.shape[1]}]"
    found = re.findall(re.escape(shape) + r"\{[^}]*\}", arguments)
    assert found and all(":S(5)" in f for f in found), (shape, found)
    copies = [line for line in text.splitlines()
              if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} (copy|copy-start|copy-done)\(",
                           line)]
    assert not copies, copies
  return arguments, tables, mapping


def test_in_step_fetch_keeps_host_tables_on_the_host():
  """fetch='step': the tables stay host operands, and the row ids arrive in host memory too,
  moved by a transfer before the program: on the H200, a host gather that read ids copied to
  the host inside the same program decoded different tokens from one call to the next
  (bench_offload, 32 GB tables)."""
  import re
  arguments, tables, mapping = _decode_program_arguments("step", "_decode_fetching")
  ids = f"s32[{B * mapping.num_heads}]"
  found = re.findall(re.escape(ids) + r"\{[^}]*\}", arguments)
  assert len(found) == len(tables) and all(":S(5)" in f for f in found), (ids, found)


def test_direct_fetch_reads_host_tables_in_place_from_device_ids():
  """fetch='direct': the tables stay host operands and the row ids are device operands: they
  never go to the host (the GPU kernel reads the host rows itself)."""
  import re
  arguments, tables, mapping = _decode_program_arguments("direct", "_decode_direct")
  ids = f"s32[{B},1,{mapping.num_heads}]"
  found = re.findall(re.escape(ids) + r"\{[^}]*\}", arguments)
  assert len(found) == len(tables) and not any(":S(5)" in f for f in found), (ids, found)


def test_fetch_auto_and_refusals():
  cfg = tiny_cfg(engram_table_placement="external")
  mapping = NgramHashMapping.from_config(cfg.engram, V, 0)
  tables = {l: host_memory.create_table(mapping.num_rows(l), cfg.engram.head_dim, jnp.float32,
                                    "pinned_host", seed=l) for l in cfg.engram.layer_ids}
  make = lambda t, **kw: CachedGenerator(None, None, None, t, mapping, **kw)  # noqa: E731
  on_gpu = jax.default_backend() == "gpu"
  assert make(tables).fetch == ("direct" if on_gpu else "step")
  device_tables = {l: jax.device_put(t, host_memory.placement_sharding("device"))
                   for l, t in tables.items()}
  assert make(device_tables).fetch == "direct"
  with pytest.raises(ValueError, match="fetch must be"):
    make(tables, fetch="host")
  if not on_gpu:
    with pytest.raises(ValueError, match="GPU kernel"):
      make(tables, fetch="direct")


def _device_array_constants(obj, names, run):
  """Runs `run()` with `obj`'s jitted methods `names` traced at their first call; returns
  {name: number of jax.Array constants its program closes over}. A closed-over device array
  becomes a program constant that XLA reads back from the device: on a GPU a device-to-host
  copy, refused under jax.transfer_guard("disallow") (the CPU backend copies nothing, so the
  guard alone cannot catch it here)."""
  found = {}
  for name in names:
    fn = getattr(obj, name)

    def recording(*args, _name=name, _fn=fn, **kw):
      if _name not in found:      # traced before the call: donated arguments die in it
        consts = _fn.trace(*args, **kw).jaxpr.consts
        found[_name] = sum(isinstance(c, jax.Array) for c in consts)
      return _fn(*args, **kw)
    setattr(obj, name, recording)
  run()
  return found


def test_generator_programs_close_over_no_device_arrays():
  """Found on the H200: the generators' offsets and compression table were device arrays that
  their jitted steps closed over, and generation under transfer_guard("disallow") failed."""
  cfg, mapping, tables, variables = _setup("pinned_host")
  model = EngramLM(cfg)
  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  compression = np.arange(V, dtype=np.int32)[::-1].copy() % V
  # The windowed Generator takes no variables argument: its logits_fn closes over NumPy copies
  # (constants of the program either way; NumPy ones need no read-back).
  np_variables = jax.tree.map(np.asarray, variables)
  windowed = Generator(lambda tok, rows: model.apply(np_variables, tok, engram_inputs=rows)[0],
                       tables, mapping, compression)
  found = _device_array_constants(windowed, ["_step", "_write"], lambda: windowed(prompt, 3))
  assert found == {"_step": 0, "_write": 0}
  init_cache, decode_fn = engram_lm_decoder(cfg)
  for fetch, decode in [("direct", "_decode_direct"), ("step", "_decode_fetching"),
                        ("program", "_decode")]:
    cached = CachedGenerator(decode_fn, init_cache, variables, tables, mapping, compression,
                             fetch=fetch, interpret=INTERPRET)
    found = _device_array_constants(cached, ["_prefill", decode], lambda: cached(prompt, 3))
    assert found == {"_prefill": 0, decode: 0}, fetch


@pytest.mark.parametrize("layer_ids", [(1,), (1, 2, 3)])
def test_threaded_generation_equals_cached_generation(layer_ids):
  """NumPy threads gather each token's rows from the pinned_host tables while the stages before
  each Engram layer run: the same tokens as the in-program fetch (greedy and sampled), and the
  same as the windowed reference; no program closes over a device array."""
  cfg, mapping, tables, variables = _setup("pinned_host", layer_ids)
  prompt = np.random.default_rng(4).integers(0, V, (B, P)).astype(np.int32)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  cached = CachedGenerator(decode_fn, init_cache, variables, tables, mapping)
  threaded = ThreadedGenerator(*engram_lm_stages(cfg)[::-1], variables, tables, mapping, threads=2)
  threaded._worker.MIN_CHUNK_ROWS = 2    # the prompt's B*P*H rows in several chunks
  with jax.transfer_guard("disallow"):
    got = threaded(prompt, NEW)
  np.testing.assert_array_equal(got, cached(prompt, NEW))
  model = EngramLM(cfg)
  windowed = Generator(lambda tok, rows: model.apply(variables, tok, engram_inputs=rows)[0],
                       tables, mapping)
  np.testing.assert_array_equal(got, windowed(prompt, NEW))
  assert len(set(got[:, P:].ravel().tolist())) > 1
  assert set(threaded.host_us_per_token) == {"gather", "rows callback waited"}
  assert threaded.host_us_per_token["gather"] > 0
  assert not threaded._pending, "every handed-over gather was taken or dropped"
  sampled = threaded(prompt, NEW, temperature=1.0, seed=5)
  np.testing.assert_array_equal(sampled, cached(prompt, NEW, temperature=1.0, seed=5))
  assert not np.array_equal(sampled, got)
  names = ["_prefill_gathering", "_decode_gathering"]
  found = _device_array_constants(threaded, names, lambda: threaded(prompt, 3))
  assert found == dict.fromkeys(names, 0)
  threaded.close()


def test_threaded_generator_reads_the_tables_as_they_are_now():
  """Rows are gathered from views of the tables' buffers at each call: a table changed in place
  (as a threaded training step writes it) changes the next generation."""
  cfg, mapping, tables, variables = _setup("pinned_host")
  prompt = np.random.default_rng(4).integers(0, V, (B, P)).astype(np.int32)
  gen = ThreadedGenerator(*engram_lm_stages(cfg)[::-1], variables, tables, mapping)
  before = gen(prompt, NEW)
  for t in tables.values():
    view = host_memory.host_view(t)
    view[:] = np.random.default_rng(9).normal(size=view.shape).astype(view.dtype) * 30
  after = gen(prompt, NEW)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  np.testing.assert_array_equal(
      after, CachedGenerator(decode_fn, init_cache, variables, tables, mapping)(prompt, NEW))
  assert not np.array_equal(before, after)


def test_threaded_generator_errors():
  cfg, mapping, tables, variables = _setup("device")
  with pytest.raises(ValueError, match="pinned_host"):
    ThreadedGenerator(*engram_lm_stages(cfg)[::-1], variables, tables, mapping)
  with pytest.raises(ValueError, match="block 0"):
    engram_lm_stages(tiny_cfg(engram_table_placement="external",
                              engram=ENGRAM.replace(layer_ids=(0,))))

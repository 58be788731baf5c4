"""Decoding with the EngramLM decode caches (`Decoder` + `engram_lm_decoder`).

The decoder (prompt once, then one token per step through the KV caches, ShortConv histories
and n-gram history, rows of each new position fetched from HBM or pinned_host tables) must
sample the same tokens as the windowed oracle (tests/windowed_decoder.py), which hashes and
recomputes the full causal forward every step.

Dimension legend: B batch, P prompt length, T tokens, V vocab.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import host_memory
from engram_jax.generate import Decoder, engram_lm_decoder
from engram_jax.hashing import NgramHashMapping
from engram_jax.memory import head_offsets
from engram_jax.model import EngramLM
from pallas_kernels.engram_lookup import prefetch_rows
from tests.test_model import ENGRAM, V, fast_jit, tiny_cfg
from tests.windowed_decoder import WindowedDecoder

pytestmark = pytest.mark.slow

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
  variables = _init(cfg, x, rows)
  return cfg, mapping, tables, variables


def _init(cfg, x, rows=None):
  """Unboxed variables of EngramLM(cfg), initialised in one program (op by op, the init
  compiles hundreds of small programs)."""
  return nn.unbox(fast_jit(lambda k, x, r: EngramLM(cfg).init(k, x, engram_inputs=r))(
      jax.random.key(1), x, rows))


INTERPRET = jax.default_backend() == "cpu"   # fetch='direct''s GPU kernel, interpreted on CPU


@pytest.mark.parametrize("placement,fetch", [
    ("pinned_host", "direct"), ("pinned_host", "step"), ("device", "direct"), ("device", "step")])
def test_cached_generation_equals_windowed_generation(placement, fetch):
  cfg, mapping, tables, variables = _setup(placement)
  model = EngramLM(cfg)

  def logits_fn(tokens_BxT, rows):
    return model.apply(variables, tokens_BxT, engram_inputs=rows)[0]

  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  windowed = WindowedDecoder(logits_fn, tables, mapping)(prompt, NEW)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  gen = Decoder(decode_fn, init_cache, variables, tables, mapping, fetch=fetch,
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
  gen = Decoder(decode_fn, init_cache, variables, tables, mapping, fetch=fetch,
                interpret=INTERPRET)
  seen = []
  jitted = getattr(gen, program)

  def record(*args, **kw):
    seen.append((args, kw))
    return jitted(*args, **kw)
  setattr(gen, program, record)
  gen(np.zeros((B, P), np.int32), 3)
  assert seen, f"{program} did not run"
  text = jitted.lower(*seen[0][0], **seen[0][1]).compile().as_text()
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
  arguments, tables, mapping = _decode_program_arguments("step", "_decode_step")
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
  make = lambda t, **kw: Decoder(None, None, None, t, mapping, **kw)  # noqa: E731
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
  """The decoders' offsets and compression table are NumPy: a device array that a jitted step
  closes over is read back from the device, which a GPU refuses under
  transfer_guard("disallow")."""
  cfg, mapping, tables, variables = _setup("pinned_host")
  model = EngramLM(cfg)
  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  compression = np.arange(V, dtype=np.int32)[::-1].copy() % V
  # The windowed oracle takes no variables argument: its logits_fn closes over NumPy copies
  # (constants of the program either way; NumPy ones need no read-back).
  np_variables = jax.tree.map(np.asarray, variables)
  windowed = WindowedDecoder(
      lambda tok, rows: model.apply(np_variables, tok, engram_inputs=rows)[0], tables, mapping,
      compression)
  found = _device_array_constants(windowed, ["_step", "_ids"], lambda: windowed(prompt, 3))
  assert found == {"_step": 0, "_ids": 0}
  init_cache, decode_fn = engram_lm_decoder(cfg)
  for fetch, decode in [("direct", "_decode_direct"), ("step", "_decode_step")]:
    cached = Decoder(decode_fn, init_cache, variables, tables, mapping, compression,
                     fetch=fetch, interpret=INTERPRET)
    found = _device_array_constants(cached, ["_prefill", decode], lambda: cached(prompt, 3))
    assert found == {"_prefill": 0, decode: 0}, fetch


def _decoders(placement="device"):
  """(windowed oracle, Decoder) of one tiny model."""
  cfg, mapping, tables, variables = _setup(placement)
  model = EngramLM(cfg)
  windowed = WindowedDecoder(lambda tok, rows: model.apply(variables, tok, engram_inputs=rows)[0],
                             tables, mapping)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  return windowed, Decoder(decode_fn, init_cache, variables, tables, mapping,
                           interpret=INTERPRET)


def test_sampling_equals_the_oracle_and_depends_only_on_the_seed():
  """Temperature and top-k sampling draw the oracle's tokens; the same seed the same tokens,
  another seed others; top_k=1 is greedy at any temperature."""
  windowed, decoder = _decoders()
  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  for kw in (dict(temperature=1.0, seed=5), dict(temperature=0.7, top_k=3, seed=2)):
    got = decoder(prompt, NEW, **kw)
    np.testing.assert_array_equal(got, windowed(prompt, NEW, **kw))
    np.testing.assert_array_equal(got, decoder(prompt, NEW, **kw))
    assert not np.array_equal(got, decoder(prompt, NEW, **dict(kw, seed=kw["seed"] + 1)))
  np.testing.assert_array_equal(decoder(prompt, NEW, temperature=5.0, top_k=1, seed=1),
                                decoder(prompt, NEW))
  with pytest.raises(ValueError, match="top_k"):
    decoder(prompt, NEW, top_k=-1)


def test_decoder_without_engram_layers_equals_the_oracle():
  """A model without Engram layers (an MoE baseline) decodes with no tables and no mapping."""
  cfg = tiny_cfg(engram=None)
  x = jnp.zeros((B, P + NEW), jnp.int32)
  variables = _init(cfg, x)
  model = EngramLM(cfg)
  prompt = np.random.default_rng(3).integers(0, V, (B, P)).astype(np.int32)
  windowed = WindowedDecoder(lambda tok, rows: model.apply(variables, tok)[0], {}, None)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  decoder = Decoder(decode_fn, init_cache, variables, {}, None)
  assert decoder.layers == () and decoder.fetch == "direct"
  for kw in (dict(), dict(temperature=1.0, seed=4)):
    got = decoder(prompt, NEW, **kw)
    np.testing.assert_array_equal(got, windowed(prompt, NEW, **kw))
  assert len(set(got[:, P:].ravel().tolist())) > 1


@pytest.mark.parametrize("layer_ids", [(1,), (1, 2, 3)])
def test_host_table_decoding_equals_the_oracle_greedy_and_sampled(layer_ids):
  """pinned_host tables under the automatic fetch, one or several Engram layers."""
  cfg, mapping, tables, variables = _setup("pinned_host", layer_ids)
  prompt = np.random.default_rng(4).integers(0, V, (B, P)).astype(np.int32)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  decoder = Decoder(decode_fn, init_cache, variables, tables, mapping)
  model = EngramLM(cfg)
  windowed = WindowedDecoder(lambda tok, rows: model.apply(variables, tok, engram_inputs=rows)[0],
                             tables, mapping)
  with jax.transfer_guard("disallow"):
    got = decoder(prompt, NEW)
    sampled = decoder(prompt, NEW, temperature=1.0, seed=5)
  np.testing.assert_array_equal(got, windowed(prompt, NEW))
  np.testing.assert_array_equal(sampled, windowed(prompt, NEW, temperature=1.0, seed=5))
  assert len(set(got[:, P:].ravel().tolist())) > 1
  assert not np.array_equal(sampled, got)


def test_decoder_reads_the_tables_as_they_are_now():
  """The tables are arguments of every program, not copies: a table changed in place (as the
  threaded host-table step writes it) changes the next decoding."""
  cfg, mapping, tables, variables = _setup("pinned_host")
  prompt = np.random.default_rng(4).integers(0, V, (B, P)).astype(np.int32)
  init_cache, decode_fn = engram_lm_decoder(cfg)
  decoder = Decoder(decode_fn, init_cache, variables, tables, mapping)
  before = decoder(prompt, NEW)
  for t in tables.values():
    view = host_memory.host_view(t)
    view[:] = np.random.default_rng(9).normal(size=view.shape).astype(view.dtype) * 30
  after = decoder(prompt, NEW)
  np.testing.assert_array_equal(
      after, Decoder(decode_fn, init_cache, variables, tables, mapping)(prompt, NEW))
  assert not np.array_equal(before, after)

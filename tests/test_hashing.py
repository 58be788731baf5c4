"""N-gram hashing: parity with the reference formulas, device == host, segments, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.hashing import (NgramHashMapping, _floor_mod_i64, _mul_u32_by_const,
                                is_prime)
from tests import numpy_reference as ref

# (engram_vocab_size, N, K, layer_ids, seed, V', pad_id)
CONFIGS = {
    "bigram": ((500,), 2, 3, (0,), 0, 1000, 7),
    "demo": ((646400, 646400), 3, 8, (1, 15), 0, 99092, 2),
    "4gram_shared_search": ((1000, 1000, 1000), 4, 2, (2, 5, 7), 17, 129280, 129279),
    "vocab_2pow30": ((2**30, 2**30 + 100), 3, 2, (3,), 5, 2**30 + 3, 0),
    "vocab_2pow31": ((2**31 - 2**20,), 2, 2, (0, 1), 1, 2**31, 2**31 - 1),
    "tiny_primes": ((2, 2), 3, 1, (0,), 3, 1, 0),
}


def _mapping(name):
  evs, n, k, layers, seed, vocab, pad = CONFIGS[name]
  return NgramHashMapping(evs, n, k, layers, pad, seed, vocab)


def _ref_kwargs(mapping):
  return dict(engram_vocab_size=mapping.engram_vocab_size, max_ngram_size=mapping.max_ngram_size,
              n_head_per_ngram=mapping.n_head_per_ngram, layer_ids=mapping.layer_ids,
              pad_id=mapping.pad_id, seed=mapping.seed,
              tokenizer_vocab_size=mapping.tokenizer_vocab_size)


def _edge_ids(vocab, shape, seed):
  """Random ids with the vocabulary edges and the pad id mixed in."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=shape, dtype=np.int64)
  edges = np.array([0, vocab - 1, max(vocab - 2, 0), vocab // 2], dtype=np.int64)
  mask = rng.random(shape) < 0.4
  ids[mask] = rng.choice(edges, size=int(mask.sum()))
  return ids


def test_demo_primes_and_rows():
  mapping = _mapping("demo")
  assert mapping.head_sizes(1)[:3] == (646403, 646411, 646421)
  assert mapping.num_rows(1) == 10_344_164
  expected = ref.reference_primes((646400, 646400), 3, 8, (1, 15))
  for layer in (1, 15):
    assert mapping.head_sizes(layer) == tuple(p for order in expected[layer] for p in order)
  all_primes = mapping.head_sizes(1) + mapping.head_sizes(15)
  assert len(set(all_primes)) == 32


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_multipliers_and_primes_match_reference(name):
  mapping = _mapping(name)
  expected = ref.reference_primes(mapping.engram_vocab_size, mapping.max_ngram_size,
                                  mapping.n_head_per_ngram, mapping.layer_ids)
  for layer in mapping.layer_ids:
    np.testing.assert_array_equal(
        mapping.multipliers[layer],
        ref.reference_multipliers(mapping.seed, layer, mapping.max_ngram_size,
                                  mapping.tokenizer_vocab_size))
    assert mapping.head_sizes(layer) == tuple(p for order in expected[layer] for p in order)
    sizes = np.asarray(mapping.head_sizes(layer), np.int64)
    np.testing.assert_array_equal(mapping.offsets(layer),
                                  np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    assert mapping.offsets(layer).dtype == np.int64
    assert mapping.num_rows(layer) == int(sizes.sum())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_host_and_device_match_reference(name):
  mapping = _mapping(name)
  ids = _edge_ids(mapping.tokenizer_vocab_size, (3, 17), seed=len(name))
  expected = ref.reference_hashes(ids, **_ref_kwargs(mapping))
  host = mapping.hash_numpy(ids)
  device = jax.jit(mapping.hash)(jnp.asarray(ids, dtype=jnp.int32))
  assert set(host) == set(device) == set(mapping.layer_ids)
  for layer in mapping.layer_ids:
    assert host[layer].dtype == np.int64 and device[layer].dtype == jnp.int32
    assert host[layer].shape == (3, 17, mapping.num_heads)
    np.testing.assert_array_equal(host[layer], expected[layer])
    np.testing.assert_array_equal(np.asarray(device[layer]), expected[layer])


@pytest.mark.parametrize("name", ["demo", "4gram_shared_search"])
def test_matches_python_integer_reference(name):
  mapping = _mapping(name)
  ids = _edge_ids(mapping.tokenizer_vocab_size, (2, 6), seed=3)
  expected = ref.reference_hashes_scalar(ids, None, **_ref_kwargs(mapping))
  host = mapping.hash_numpy(ids)
  for layer in mapping.layer_ids:
    np.testing.assert_array_equal(host[layer], expected[layer])


@pytest.mark.parametrize("T", [1, 2, 3])
def test_sequences_shorter_than_the_ngram(T):
  mapping = _mapping("4gram_shared_search")
  ids = _edge_ids(mapping.tokenizer_vocab_size, (2, T), seed=T)
  seg = np.arange(2 * T).reshape(2, T) // 2
  expected = ref.reference_hashes_scalar(ids, seg, **_ref_kwargs(mapping))
  host, device = mapping.hash_numpy(ids, seg), mapping.hash(ids.astype(np.int32), seg)
  for layer in mapping.layer_ids:
    np.testing.assert_array_equal(host[layer], expected[layer])
    np.testing.assert_array_equal(np.asarray(device[layer]), expected[layer])


def test_uint32_emulation_of_int64_arithmetic():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2**32, size=512, dtype=np.uint64)
  x[:4] = [0, 1, 2**31 - 1, 2**32 - 1]
  x_u32 = jnp.asarray(x.astype(np.uint32))
  for m in [1, 3, 2**32 - 1, 2**32 + 1, 2**62 + 12345, 2**64 - 1,
            int(rng.integers(0, 2**62)) * 2 + 1]:
    hi, lo = _mul_u32_by_const(x_u32, m)
    got = (np.asarray(hi).astype(object) << 32) | np.asarray(lo).astype(object)
    want = np.array([(int(v) * m) % 2**64 for v in x], dtype=object)
    np.testing.assert_array_equal(got, want)

  primes = [2, 3, 65537, 646403, 1073741827, 2147483647]
  u = rng.integers(0, 2**64, size=(256, 1), dtype=np.uint64)
  u[:3, 0] = [0, 2**63, 2**64 - 1]  # includes the most negative and -1 as int64
  hi = jnp.asarray(np.broadcast_to(u >> 32, (256, len(primes))).astype(np.uint32))
  lo = jnp.asarray(np.broadcast_to(u & 0xFFFFFFFF, (256, len(primes))).astype(np.uint32))
  got = np.asarray(_floor_mod_i64(hi, lo, primes))
  signed = u.view(np.int64)
  want = signed % np.asarray(primes, np.int64)  # NumPy floor-mod on int64, as the reference
  np.testing.assert_array_equal(got.astype(np.int64), want)


def test_segments_restart_from_padding():
  mapping = _mapping("demo")
  doc_a = _edge_ids(mapping.tokenizer_vocab_size, (2, 5), seed=1)
  doc_b = _edge_ids(mapping.tokenizer_vocab_size, (2, 7), seed=2)
  packed = np.concatenate([doc_a, doc_b], axis=1)
  seg = np.concatenate([np.full((2, 5), 1), np.full((2, 7), 2)], axis=1)
  alone_a, alone_b = mapping.hash_numpy(doc_a), mapping.hash_numpy(doc_b)
  plain = mapping.hash_numpy(packed)
  for path in (mapping.hash_numpy, jax.jit(mapping.hash)):
    reset = path(packed, seg)
    for layer in mapping.layer_ids:
      got = np.asarray(reset[layer])
      np.testing.assert_array_equal(got[:, :5], alone_a[layer])
      np.testing.assert_array_equal(got[:, 5:], alone_b[layer])
      # Without segments the first tokens of doc_b see doc_a: the reset must change them.
      assert not np.array_equal(got[:, 5:7], plain[layer][:, 5:7])
      np.testing.assert_array_equal(got[:, 7:], plain[layer][:, 7:])


def test_segments_match_scalar_reference_and_constant_segments_are_noop():
  mapping = _mapping("4gram_shared_search")
  rng = np.random.default_rng(4)
  ids = _edge_ids(mapping.tokenizer_vocab_size, (3, 9), seed=5)
  seg = np.cumsum(rng.random((3, 9)) < 0.3, axis=1)
  expected = ref.reference_hashes_scalar(ids, seg, **_ref_kwargs(mapping))
  host = mapping.hash_numpy(ids, seg)
  device = jax.jit(mapping.hash)(jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32))
  plain = mapping.hash_numpy(ids)
  same = mapping.hash_numpy(ids, np.full((3, 9), 4))
  for layer in mapping.layer_ids:
    np.testing.assert_array_equal(host[layer], expected[layer])
    np.testing.assert_array_equal(np.asarray(device[layer]), expected[layer])
    np.testing.assert_array_equal(same[layer], plain[layer])


def test_long_sequences_match_host():
  mapping = _mapping("demo")
  ids = _edge_ids(mapping.tokenizer_vocab_size, (4, 4096), seed=9).astype(np.int32)
  fn = jax.jit(mapping.hash)
  jax.block_until_ready(fn(ids))
  for layer, rows in fn(ids).items():
    np.testing.assert_array_equal(np.asarray(rows), mapping.hash_numpy(ids)[layer])


@pytest.mark.parametrize("path", ["hash_numpy", "hash"])
def test_invalid_ids_raise(path):
  mapping = _mapping("bigram")
  fn = getattr(mapping, path)
  with pytest.raises(ValueError, match="ids: id 1000 >= tokenizer_vocab_size"):
    fn(np.array([[1, 1000]]))
  with pytest.raises(ValueError, match="ids: negative"):
    fn(np.array([[1, -1]]))
  with pytest.raises(TypeError, match="ids: expected integer"):
    fn(np.array([[1.0, 2.0]]))
  with pytest.raises(ValueError, match="ids: expected rank 2"):
    fn(np.array([1, 2]))
  with pytest.raises(ValueError, match="segment_ids: shape"):
    fn(np.array([[1, 2]]), np.array([[1, 2, 3]]))
  with pytest.raises(TypeError, match="segment_ids: expected integers"):
    fn(np.array([[1, 2]]), np.array([[1.0, 2.0]]))


def test_hash_checks_concrete_device_ids_and_trusts_traced_ones():
  mapping = _mapping("bigram")
  with pytest.raises(ValueError, match="ids: id 1000 >= tokenizer_vocab_size"):
    mapping.hash(jnp.array([[1, 1000]], jnp.int32))
  with pytest.raises(ValueError, match="ids: negative id -1"):
    mapping.hash(jnp.array([[1, -1]], jnp.int32))
  good = jnp.array([[1, 2, 3]], jnp.int32)
  for layer, r in mapping.hash(good).items():
    np.testing.assert_array_equal(np.asarray(r), mapping.hash_numpy(np.asarray(good))[layer])
  # Under jit the ids are traced: no check, in-range rows.
  traced = jax.jit(mapping.hash)(jnp.array([[1, 1000]], jnp.int32))
  for layer, r in traced.items():
    assert ((np.asarray(r) >= 0) & (np.asarray(r) < np.asarray(mapping.head_sizes(layer)))).all()


def test_invalid_construction_raises():
  good = dict(engram_vocab_size=(100, 100), max_ngram_size=3, n_head_per_ngram=2,
              layer_ids=(0,), pad_id=0, seed=0, tokenizer_vocab_size=50)
  for vocab in (0, 2**31 + 1, 2**40):
    with pytest.raises(ValueError, match="tokenizer_vocab_size"):
      NgramHashMapping(**{**good, "tokenizer_vocab_size": vocab})
  for pad in (-1, 50):
    with pytest.raises(ValueError, match="pad_id"):
      NgramHashMapping(**{**good, "pad_id": pad})
  with pytest.raises(ValueError, match="engram_vocab_size"):
    NgramHashMapping(**{**good, "engram_vocab_size": (100,)})
  with pytest.raises(ValueError, match="engram_vocab_size"):
    NgramHashMapping(**{**good, "engram_vocab_size": (100, 2**31 - 2)})
  with pytest.raises(ValueError, match="layer_ids"):
    NgramHashMapping(**{**good, "layer_ids": (1, 1)})
  with pytest.raises(ValueError, match="layer_id: 3"):
    NgramHashMapping(**good).head_sizes(3)


def test_is_prime_agrees_with_trial_division():
  for n in list(range(200)) + list(range(2**31 - 200, 2**31 + 50)):
    assert is_prime(n) == ref.is_prime_trial_division(n), n
  assert is_prime(2**61 - 1) and not is_prime(3215031751)  # a strong pseudoprime to 2, 3, 5, 7


def test_fingerprint_roundtrip_and_mismatch():
  cfg = EngramConfig(engram_vocab_size=(1000, 1000), n_head_per_ngram=2, layer_ids=(1, 4),
                     seed=3)
  mapping = NgramHashMapping.from_config(cfg, tokenizer_vocab_size=800, compressed_pad_id=5)
  direct = NgramHashMapping((1000, 1000), 3, 2, (1, 4), 5, 3, 800)
  assert mapping.fingerprint() == direct.fingerprint()
  saved = json.loads(json.dumps(mapping.fingerprint()))
  assert mapping.matches(saved)
  mapping.check_fingerprint(saved)
  assert saved["multipliers"]["4"] == [int(m) for m in mapping.multipliers[4]]
  other = NgramHashMapping((1000, 1000), 3, 2, (1, 4), 5, 4, 800)
  assert not other.matches(saved)
  with pytest.raises(ValueError, match="seed"):
    other.check_fingerprint(saved)
  smaller = NgramHashMapping((1000, 1000), 3, 2, (1, 4), 5, 3, 799)
  with pytest.raises(ValueError, match="tokenizer_vocab_size"):
    smaller.check_fingerprint(saved)

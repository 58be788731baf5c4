"""Test oracle: a plain restatement of the official demo's compression and hashing.

Written from REFERENCE.md §1 and `engram_demo_v1.py`, deliberately without importing
`engram_jax`, and with different algorithms where the library has a choice (trial division
instead of Miller-Rabin, one id at a time decoding, Python big integers for the scalar hash), so
that a shared mistake is unlikely. Slow on purpose: use tiny shapes.

Dimension legend:
  B batch, T sequence length, N max n-gram order, K heads per order, H = (N-1)*K, V' vocab.
"""

import numpy as np
from tokenizers import Regex, normalizers


def reference_lookup_table(tokenizer):
  """(lookup int64[V], V') exactly as the demo's `_build_lookup_table`."""
  norm = normalizers.Sequence([
      normalizers.NFKC(),
      normalizers.NFD(),
      normalizers.StripAccents(),
      normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), "\uE000"),
      normalizers.Strip(),
      normalizers.Replace("\uE000", " "),
  ])
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  key_to_new = {}
  lookup = np.empty(vocab_size, dtype=np.int64)
  for tid in range(vocab_size):
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if "\ufffd" in text:
      key = tokenizer.id_to_token(tid)
    else:
      normalized = norm.normalize_str(text)
      key = normalized if normalized else text
    if key not in key_to_new:
      key_to_new[key] = len(key_to_new)
    lookup[tid] = key_to_new[key]
  return lookup, len(key_to_new)


def is_prime_trial_division(n):
  if n < 2:
    return False
  if n % 2 == 0:
    return n == 2
  d = 3
  while d * d <= n:
    if n % d == 0:
      return False
    d += 2
  return True


def reference_multipliers(seed, layer_id, max_ngram_size, tokenizer_vocab_size):
  max_long = np.iinfo(np.int64).max
  half_bound = max(1, int(max_long // tokenizer_vocab_size) // 2)
  g = np.random.default_rng(int(seed + 10007 * int(layer_id)))
  r = g.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
  return r * 2 + 1


def reference_primes(engram_vocab_size, max_ngram_size, n_head_per_ngram, layer_ids):
  """{layer_id: [[K primes of order 2], [K primes of order 3], ...]}."""
  seen = set()
  result = {}
  for layer_id in layer_ids:
    per_order = []
    for ngram in range(2, max_ngram_size + 1):
      start = engram_vocab_size[ngram - 2] - 1
      sizes = []
      for _ in range(n_head_per_ngram):
        candidate = start + 1
        while not (is_prime_trial_division(candidate) and candidate not in seen):
          candidate += 1
        seen.add(candidate)
        sizes.append(candidate)
        start = candidate
      per_order.append(sizes)
    result[layer_id] = per_order
  return result


def reference_hashes(ids, engram_vocab_size, max_ngram_size, n_head_per_ngram, layer_ids,
                     pad_id, seed, tokenizer_vocab_size):
  """{layer_id: int64[B, T, H]} as the demo's `_get_ngram_hashes` (no segment reset)."""
  x = np.asarray(ids, dtype=np.int64)
  B, T = x.shape
  primes = reference_primes(engram_vocab_size, max_ngram_size, n_head_per_ngram, layer_ids)
  out = {}
  for layer_id in layer_ids:
    m = reference_multipliers(seed, layer_id, max_ngram_size, tokenizer_vocab_size)
    shifts = [x] + [
        np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :T]
        for k in range(1, max_ngram_size)
    ]
    heads = []
    for n in range(2, max_ngram_size + 1):
      mix = shifts[0] * m[0]
      for k in range(1, n):
        mix = np.bitwise_xor(mix, shifts[k] * m[k])
      for p in primes[layer_id][n - 2]:
        heads.append(mix % int(p))
    out[layer_id] = np.stack(heads, axis=2)
  return out


def reference_hashes_scalar(ids, segment_ids, engram_vocab_size, max_ngram_size,
                            n_head_per_ngram, layer_ids, pad_id, seed, tokenizer_vocab_size):
  """Same ids one position at a time with Python integers, plus the segment-reset rule.

  With `segment_ids`, the token k steps back counts only if it lies in the same segment as the
  current position; otherwise pad_id stands in for it (as if the document began there).
  """
  x = np.asarray(ids).tolist()
  seg = None if segment_ids is None else np.asarray(segment_ids).tolist()
  primes = reference_primes(engram_vocab_size, max_ngram_size, n_head_per_ngram, layer_ids)
  out = {}
  for layer_id in layer_ids:
    m = [int(v) for v in reference_multipliers(seed, layer_id, max_ngram_size,
                                               tokenizer_vocab_size)]
    H = (max_ngram_size - 1) * n_head_per_ngram
    res = np.zeros((len(x), len(x[0]) if x else 0, H), dtype=np.int64)
    for b, row in enumerate(x):
      for t in range(len(row)):
        grams = []
        for k in range(max_ngram_size):
          if t - k >= 0 and (seg is None or seg[b][t - k] == seg[b][t]):
            grams.append(int(row[t - k]))
          else:
            grams.append(int(pad_id))
        h = 0
        for n in range(2, max_ngram_size + 1):
          mix = 0
          for k in range(n):
            mix ^= grams[k] * m[k]
          for p in primes[layer_id][n - 2]:
            res[b, t, h] = mix % p
            h += 1
    out[layer_id] = res
  return out

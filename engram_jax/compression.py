"""Tokenizer compression: merge raw token ids whose text differs only superficially.

Engram hashes n-grams of *compressed* ids. Following the official demo, every raw id is decoded
on its own and keyed by a normalised form of its text (NFKC, accents stripped, lower case,
whitespace runs collapsed, surrounding whitespace stripped except for a token that is only
whitespace, which becomes a single space). Ids with equal keys share one compressed id; new ids
are handed out in first-seen order of the raw ids, so the table is deterministic.

Two details of the reference are kept on purpose:
  * a token whose lone decoding contains U+FFFD (a byte-level piece of a multi-byte character)
    is keyed by its raw vocabulary string, so distinct partial-byte tokens never merge;
  * a token whose normalised text is empty (e.g. a lone combining accent) is keyed by its
    unnormalised text instead of collapsing into one "empty" id.

The demo sizes the table with `len(tokenizer)` of a `transformers` tokenizer, which counts added
tokens; here that is `get_vocab_size(with_added_tokens=True)`. `transformers`' optional
`clean_up_tokenization_spaces` post-processing is not applied (DeepSeek-V3 disables it).

`CompressedTokenizer(tokenizer, compress=False)` is the identity mapping (compressed id = raw id,
V' = V, keys = the raw token strings): the "without tokenizer compression" ablation. Its
fingerprint differs from the compressed table's, so checkpoints of the two never mix.

Dimension legend:
  V  raw tokenizer vocabulary size (added tokens included),
  V' compressed vocabulary size (number of distinct keys), V' <= V.
"""

from __future__ import annotations

import hashlib
import os
from typing import Union

import numpy as np
import tokenizers
from tokenizers import Regex, normalizers

# Private-use code point: marks a whitespace-only token so that Strip does not erase it.
_SENTINEL = "\uE000"
_REPLACEMENT_CHAR = "\uFFFD"


def engram_normalizer() -> normalizers.Normalizer:
  """The reference key normaliser (order matters: the sentinel must survive Strip)."""
  return normalizers.Sequence([
      normalizers.NFKC(),
      normalizers.NFD(),
      normalizers.StripAccents(),
      normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), _SENTINEL),
      normalizers.Strip(),
      normalizers.Replace(_SENTINEL, " "),
  ])


def _build_lookup_table(tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, tuple[str, ...]]:
  """Returns (lookup_V int64, keys_V') following the reference key rule."""
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  normalizer = engram_normalizer()
  # One batched call decodes every id on its own (same result as V single-id decodes, but
  # done in Rust); normalising stays per token because keys depend on each text alone.
  texts_V = tokenizer.decode_batch([[tid] for tid in range(vocab_size)],
                                   skip_special_tokens=False)
  key_to_new: dict[str, int] = {}
  lookup_V = np.empty(vocab_size, dtype=np.int64)
  for tid, text in enumerate(texts_V):
    if _REPLACEMENT_CHAR in text:
      key = tokenizer.id_to_token(tid)
      if key is None:
        raise ValueError(f"tokenizer: id {tid} decodes to U+FFFD but has no token string")
    else:
      key = normalizer.normalize_str(text) or text
    lookup_V[tid] = key_to_new.setdefault(key, len(key_to_new))
  return lookup_V, tuple(key_to_new)


def _identity_lookup_table(tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, tuple[str, ...]]:
  """Returns (arange(V) int64, the V raw token strings): every id is its own key."""
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  keys = tuple(tokenizer.id_to_token(tid) for tid in range(vocab_size))
  missing = [tid for tid, key in enumerate(keys) if key is None]
  if missing:
    raise ValueError(f"tokenizer: ids {missing[:5]} have no token string")
  return np.arange(vocab_size, dtype=np.int64), keys


class CompressedTokenizer:
  """Maps raw token ids to compressed ids (numpy in, numpy out).

  Build with `CompressedTokenizer(tokenizers.Tokenizer)` or `CompressedTokenizer.from_file(path)`
  for a Hugging Face `tokenizer.json`; `compress=False` gives the identity mapping.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, compress: bool = True):
    if not isinstance(tokenizer, tokenizers.Tokenizer):
      raise TypeError(
          f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.get_vocab_size(with_added_tokens=True) < 1:
      raise ValueError("tokenizer: vocabulary is empty")
    lookup_V, keys = (_build_lookup_table(tokenizer) if compress
                      else _identity_lookup_table(tokenizer))
    lookup_V.setflags(write=False)
    self._lookup_V = lookup_V
    self._keys = keys

  @classmethod
  def from_file(cls, path: Union[str, os.PathLike],
                compress: bool = True) -> "CompressedTokenizer":
    """Builds the table from a local Hugging Face `tokenizers` JSON file."""
    if not os.path.isfile(path):
      raise ValueError(f"path: no tokenizer file at {os.fspath(path)!r}")
    return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), compress)

  @property
  def lookup_table(self) -> np.ndarray:
    """int64[V]: compressed id of every raw id (read-only)."""
    return self._lookup_V

  @property
  def keys(self) -> tuple[str, ...]:
    """The V' normalised keys, indexed by compressed id."""
    return self._keys

  @property
  def raw_vocab_size(self) -> int:
    """V, the raw vocabulary size including added tokens."""
    return int(self._lookup_V.shape[0])

  def __len__(self) -> int:
    """V', the compressed vocabulary size."""
    return len(self._keys)

  def __call__(self, ids) -> np.ndarray:
    """Compresses raw ids of any shape; negative ids (padding markers) pass through unchanged."""
    ids_arr = np.asarray(ids)
    if ids_arr.size == 0 and not isinstance(ids, np.ndarray):
      ids_arr = ids_arr.astype(np.int64)  # an empty Python list comes out as float64
    if ids_arr.dtype == np.bool_ or not np.issubdtype(ids_arr.dtype, np.integer):
      raise TypeError(f"ids: expected an integer array, got dtype {ids_arr.dtype}")
    ids_arr = ids_arr.astype(np.int64)
    if ids_arr.size and ids_arr.max() >= self.raw_vocab_size:
      raise ValueError(
          f"ids: max id {int(ids_arr.max())} is outside the raw vocabulary "
          f"(size {self.raw_vocab_size})")
    valid = ids_arr >= 0
    out = ids_arr.copy()
    out[valid] = self._lookup_V[ids_arr[valid]]
    return out

  def compress_pad_id(self, raw_pad_id: int) -> int:
    """The compressed id that fills the left of shifted sequences."""
    raw_pad_id = int(raw_pad_id)
    if not 0 <= raw_pad_id < self.raw_vocab_size:
      raise ValueError(
          f"raw_pad_id: {raw_pad_id} is outside [0, {self.raw_vocab_size})")
    return int(self._lookup_V[raw_pad_id])

  def fingerprint(self) -> str:
    """sha256 hex digest of the lookup table and V'; stored in checkpoints."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(self._lookup_V, dtype="<i8").tobytes())
    digest.update(f"|V'={len(self)}".encode())
    return digest.hexdigest()

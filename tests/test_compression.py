"""Tokenizer compression: the reference key rule on crafted and trained tokenizers."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_jax.compression import CompressedTokenizer
from tests import numpy_reference as ref

_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _piece(text):
  """The byte-level vocabulary string whose decoding is `text`."""
  (piece, _), = _BYTE_LEVEL.pre_tokenize_str(text)
  return piece


# (vocabulary piece, compressed id worked out by hand from the rule, why)
CRAFTED = [
    ("Hello", 0, "first key 'hello'"),
    ("hello", 0, "lower case"),
    ("HELLO", 0, "lower case"),
    (_piece(" Hello"), 0, "leading space stripped"),
    (_piece("café"), 1, "accent stripped: 'cafe'"),
    ("cafe", 1, "same key"),
    (_piece("  "), 2, "whitespace run -> single space, kept"),
    (_piece(" "), 2, "lone space kept"),
    (_piece("\n\t"), 2, "newline + tab -> single space"),
    ("Ã", 3, "byte 0xC3 alone decodes to U+FFFD: keyed by its raw string"),
    ("Â", 4, "also U+FFFD, different raw string: not merged with the previous"),
    (_piece("\u0301"), 5, "combining accent normalises to '': keyed by its text"),
    (_piece("\u0300"), 6, "another empty normalisation, kept apart"),
    (_piece("ﬁ"), 7, "NFKC ligature -> 'fi'"),
    ("fi", 7, "same key"),
    (_piece("Ａ"), 8, "full-width A -> 'a'"),
    ("a", 8, "same key"),
    ("[UNK]", 9, "'[unk]'"),
    (_piece(" world "), 10, "both sides stripped"),
]
ADDED = [("<pad>", 11), ("<PAD>", 11)]


def _crafted_tokenizer():
  vocab = {piece: i for i, (piece, _, _) in enumerate(CRAFTED)}
  assert len(vocab) == len(CRAFTED)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([t for t, _ in ADDED])
  return tok


def _trained_bpe(vocab_size=400):
  text = ("The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! "
          "Café, cafe, CAFE and naïve naive. Hello hello HELLO, world World.\n"
          "Zürich zurich; déjà vu deja vu. Ünïcödé tëxt wïth äccents, ÄCCENTS.\t")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<pad>"])
  tok.train_from_iterator([text] * 20, trainer=trainer)
  return tok


def test_crafted_vocabulary_follows_the_rule():
  tok = _crafted_tokenizer()
  comp = CompressedTokenizer(tok)
  expected = [new for _, new, _ in CRAFTED] + [new for _, new in ADDED]
  assert comp.raw_vocab_size == len(CRAFTED) + len(ADDED)
  assert len(comp) == 12
  assert comp.lookup_table.dtype == np.int64
  for tid, want in enumerate(expected):
    why = CRAFTED[tid][2] if tid < len(CRAFTED) else "added token"
    assert comp.lookup_table[tid] == want, f"id {tid} ({why})"
  assert comp.keys[3] == "Ã" and comp.keys[2] == " " and comp.keys[5] == "\u0301"
  lookup, num_new = ref.reference_lookup_table(tok)
  np.testing.assert_array_equal(comp.lookup_table, lookup)
  assert num_new == len(comp)


def test_trained_bpe_compresses_and_matches_reference(tmp_path):
  tok = _trained_bpe()
  comp = CompressedTokenizer(tok)
  lookup, num_new = ref.reference_lookup_table(tok)
  np.testing.assert_array_equal(comp.lookup_table, lookup)
  assert len(comp) == num_new < comp.raw_vocab_size == tok.get_vocab_size(True)
  # First-seen order: compressed ids appear in increasing order of their first raw id.
  _, first = np.unique(comp.lookup_table, return_index=True)
  assert np.all(np.diff(first) > 0)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  from_file = CompressedTokenizer.from_file(path)
  np.testing.assert_array_equal(from_file.lookup_table, comp.lookup_table)
  assert from_file.fingerprint() == comp.fingerprint()


def test_call_compresses_passes_negatives_and_rejects_bad_ids():
  comp = CompressedTokenizer(_crafted_tokenizer())
  ids = np.array([[0, 1, -1, 20], [-5, 4, 9, 10]], dtype=np.int32)
  out = comp(ids)
  assert out.dtype == np.int64 and out.shape == ids.shape
  np.testing.assert_array_equal(out, [[0, 0, -1, 11], [-5, 1, 3, 4]])
  np.testing.assert_array_equal(comp([2, 3]), [0, 0])
  assert comp([]).shape == (0,)
  with pytest.raises(ValueError, match="ids: max id 21"):
    comp(np.array([0, 21]))
  with pytest.raises(TypeError, match="ids: expected an integer"):
    comp(np.array([0.0, 1.0]))
  with pytest.raises(TypeError, match="ids: expected an integer"):
    comp(np.array([True]))


def test_pad_id_and_fingerprint():
  comp = CompressedTokenizer(_crafted_tokenizer())
  assert comp.compress_pad_id(20) == 11 and comp.compress_pad_id(1) == 0
  for bad in (-1, 21):
    with pytest.raises(ValueError, match="raw_pad_id"):
      comp.compress_pad_id(bad)
  fp = comp.fingerprint()
  assert len(fp) == 64 and fp == CompressedTokenizer(_crafted_tokenizer()).fingerprint()
  assert fp != CompressedTokenizer(_trained_bpe()).fingerprint()
  with pytest.raises(ValueError, match="path"):
    CompressedTokenizer.from_file("/nonexistent/tokenizer.json")
  with pytest.raises(TypeError, match="tokenizer"):
    CompressedTokenizer("not a tokenizer")

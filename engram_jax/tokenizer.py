"""Byte-level BPE tokenizer: training, loading, and the shipped default.

The tokenizer is a Hugging Face `tokenizers` JSON file. Special tokens come first so their ids are
stable whatever the corpus: `<pad>` = 0, `<bos>` = 1, `<eos>` = 2. Byte-level BPE never produces
an unknown token, so any UTF-8 text round-trips through encode/decode.

The Engram compression table (`compression.py`) is built from this tokenizer's vocabulary, and
the hash mapping maps the raw `<pad>` id through it, so changing the tokenizer changes every
Engram row id: checkpoints record the compression table's fingerprint
(`CompressedTokenizer.fingerprint`).

Dimension legend: V tokenizer vocabulary size.
"""

from __future__ import annotations

import os
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def default_tokenizer_path() -> str:
  """The BPE tokenizer (V = 8192) trained on the embedded corpus, shipped with the package."""
  return os.path.join(_ASSETS, "tokenizer.json")


def train_tokenizer_from_iterator(texts: Iterable[str], vocab_size: int,
                                  out_path: str | None = None) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE on an iterable of documents; saves it to `out_path` if given.

  Corpus files are read into documents by `engram_jax.data.read_documents`.
  """
  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (special tokens + the "
                     f"256 byte symbols), got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  # GPT-2 style: split on spaces/punctuation, then map bytes to printable symbols; no
  # add_prefix_space so decode(encode(s)) == s exactly.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  _check_special_ids(tok, "<trained tokenizer>")
  if out_path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(out_path)
  return tok


def load_tokenizer(path: str | None = None) -> tokenizers.Tokenizer:
  """Loads a tokenizer JSON (default: the shipped one) and checks the special-token ids."""
  path = default_tokenizer_path() if path is None else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path!r}")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    raise ValueError(f"could not parse tokenizer file {path!r}: {e}") from e
  _check_special_ids(tok, path)
  return tok


def _check_special_ids(tok: tokenizers.Tokenizer, where: str) -> None:
  for name, want in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID)):
    got = tok.token_to_id(name)
    if got != want:
      raise ValueError(f"tokenizer {where}: special token {name} must have id {want}, got {got}")

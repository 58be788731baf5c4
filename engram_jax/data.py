"""Input pipeline: text files -> tokens -> packed, sharded, checkpointable batches (grain).

Sources are lists of files, each one of:
  * `.txt` / `.txt.gz`: plain UTF-8 text, documents separated by one or more blank lines (a single
    newline stays inside a document);
  * `.jsonl` / `.jsonl.gz`: one JSON object per line with a string field `"text"` (one document).

Every document is tokenised once per process (`encode_batch`, cached in memory per file and
tokenizer) with `<eos>` appended. Documents are the unit of shuffling and of sharding across
processes. Rows are filled by concat-then-split packing (`grain.experimental.ConcatThenSplitIterDataset`):
documents are laid end to end and cut every T tokens, so training rows carry no padding; a document
cut at a row end continues in the next row as a new piece (a new segment whose positions restart
at 0: every row is a self-contained sequence for attention and position encodings).

Batch contract (DESIGN.md), all [B, T]:
  inputs       int32  token ids
  targets      int32  the next token of the same document (0 where there is none)
  segment_ids  int32  1, 2, ... per document piece within a row; 0 = padding
  positions    int32  position within the piece (0 at every document start and row start)
  weights      f32    1 where the target is a real next token of the same document; 0 for padding,
                      for the last token of every piece (its next token is another document or
                      lies in the next row) and therefore for every `<eos>`
  engram_ids   optional {layer_id: int32[B, T, H]} from `engram_hash_fn(inputs, segment_ids)`

Resumption: the training iterator is a `grain.DatasetIterator`; `get_state()` / `set_state()`
round-trip its exact position (the trainer checkpoints the state with the model).

Dimension legend: B batch (per process), T sequence length, H Engram hash heads per layer,
N documents, L tokens of one document (with its `<eos>`).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from typing import Callable, Iterator, Mapping, Optional, Sequence

import grain
import numpy as np

from engram_jax import tokenizer as tokenizer_lib

EngramHashFn = Callable[[np.ndarray, np.ndarray], Mapping[int, np.ndarray]]

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n\s*")
_TEXT_SUFFIXES = (".txt", ".txt.gz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def default_corpus_paths() -> dict[str, list[str]]:
  """The embedded public-domain corpus shipped with the package (see assets/README.md)."""
  corpus = os.path.join(_ASSETS, "corpus")
  return {"train": [os.path.join(corpus, "train.txt.gz")],
          "valid": [os.path.join(corpus, "valid.txt.gz")]}


# --------------------------------------------------------------------------------------------
# Reading and tokenising.


def read_documents(path: str) -> list[str]:
  """Reads one corpus file into its documents; every error names the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus file not found: {path!r}")
  if not path.endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES):
    raise ValueError(f"corpus file {path!r}: unknown format; expected one of "
                     f"{_TEXT_SUFFIXES + _JSONL_SUFFIXES}")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      content = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"corpus file {path!r} could not be read as UTF-8 text: {e}") from e
  if path.endswith(_TEXT_SUFFIXES):
    docs = [d.strip() for d in _BLANK_LINES.split(content.replace("\r\n", "\n"))]
  else:
    docs = []
    for line_no, line in enumerate(content.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"corpus file {path!r} line {line_no}: invalid JSON: {e}") from e
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"corpus file {path!r} line {line_no}: expected an object with a "
                         f"string field 'text', got {line[:80]!r}")
      docs.append(record["text"].strip())
  docs = [d for d in docs if d]
  if not docs:
    raise ValueError(f"corpus file {path!r} contains no documents")
  return docs


@functools.lru_cache(maxsize=32)
def _tokenize_file_cached(path: str, mtime_ns: int, size: int,
                          tokenizer_path: str) -> tuple[np.ndarray, np.ndarray]:
  del mtime_ns, size  # only part of the cache key: an edited file is tokenised again
  tok = _load_tokenizer_cached(tokenizer_path)
  docs = read_documents(path)
  # encode_batch_fast skips offset tracking; the Rust side parallelises over documents.
  encodings = tok.encode_batch_fast(docs, add_special_tokens=False)
  lengths_N = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
  offsets = np.zeros(len(docs) + 1, np.int64)
  np.cumsum(lengths_N, out=offsets[1:])
  tokens = np.empty(offsets[-1], np.int32)
  for i, e in enumerate(encodings):
    tokens[offsets[i]:offsets[i + 1] - 1] = e.ids
    tokens[offsets[i + 1] - 1] = tokenizer_lib.EOS_ID
  tokens.setflags(write=False)
  offsets.setflags(write=False)
  return tokens, offsets


@functools.lru_cache(maxsize=4)
def _load_tokenizer_cached(tokenizer_path: str):
  return tokenizer_lib.load_tokenizer(tokenizer_path)


def tokenize_file(path: str, tokenizer_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (tokens int32[sum L], offsets int64[N+1]); document i is tokens[off[i]:off[i+1]],
  ending with `<eos>`. Cached in memory per (file, tokenizer)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus file not found: {path!r}")
  st = os.stat(path)
  return _tokenize_file_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size,
                               os.path.abspath(tokenizer_path))


class TokenizedCorpus:
  """All documents of a list of files, concatenated: `corpus[i]` is document i's token ids."""

  def __init__(self, paths: Sequence[str], tokenizer_path: str):
    if isinstance(paths, str) or not paths:
      raise ValueError(f"paths must be a non-empty list of files, got {paths!r}")
    parts = [tokenize_file(p, tokenizer_path) for p in paths]
    self.tokens = np.concatenate([t for t, _ in parts])
    starts = np.cumsum([0] + [len(t) for t, _ in parts[:-1]])
    self.offsets = np.concatenate(
        [o[:-1] + s for (_, o), s in zip(parts, starts)] + [np.array([len(self.tokens)])])

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)


# --------------------------------------------------------------------------------------------
# Packing and batching.


def _shard_indices(num_docs: int, process_index: int, process_count: int) -> np.ndarray:
  """Documents of this process: a strided slice, truncated so every process gets as many
  documents (unequal counts would let one host stop an eval pass before the others)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  per_process = num_docs // process_count
  if per_process == 0:
    raise ValueError(f"{num_docs} documents cannot be shared by {process_count} processes")
  return np.arange(process_index, per_process * process_count, process_count)


def finalize_batch(packed: Mapping[str, np.ndarray],
                   engram_hash_fn: Optional[EngramHashFn] = None) -> dict:
  """Packed `tokens` (+ segment ids, positions) [B, T] -> the batch contract of the module doc."""
  inputs_BxT = np.asarray(packed["tokens"], np.int32)
  segment_ids_BxT = np.asarray(packed["tokens_segment_ids"], np.int32)
  positions_BxT = np.asarray(packed["tokens_positions"], np.int32)
  next_segment_BxT = np.zeros_like(segment_ids_BxT)
  next_segment_BxT[:, :-1] = segment_ids_BxT[:, 1:]
  has_target_BxT = (segment_ids_BxT > 0) & (next_segment_BxT == segment_ids_BxT)
  targets_BxT = np.zeros_like(inputs_BxT)
  targets_BxT[:, :-1] = inputs_BxT[:, 1:]
  batch = {
      "inputs": inputs_BxT,
      "targets": np.where(has_target_BxT, targets_BxT, 0).astype(np.int32),
      "segment_ids": segment_ids_BxT,
      "positions": np.where(segment_ids_BxT > 0, positions_BxT, 0).astype(np.int32),
      "weights": has_target_BxT.astype(np.float32),
  }
  if engram_hash_fn is not None:
    batch["engram_ids"] = _check_engram_ids(engram_hash_fn(inputs_BxT, segment_ids_BxT),
                                            inputs_BxT.shape)
  return batch


def _check_engram_ids(ids: Mapping[int, np.ndarray], shape_BxT: tuple[int, int]) -> dict:
  if not isinstance(ids, Mapping) or not ids:
    raise TypeError(f"engram_hash_fn must return a non-empty {{layer_id: ids}} dict, got "
                    f"{type(ids).__name__}")
  out = {}
  for layer_id, ids_BxTxH in ids.items():
    ids_BxTxH = np.asarray(ids_BxTxH)
    if ids_BxTxH.ndim != 3 or ids_BxTxH.shape[:2] != shape_BxT:
      raise ValueError(f"engram_hash_fn: layer {layer_id} ids have shape {ids_BxTxH.shape}, "
                       f"expected {shape_BxT + ('H',)}")
    if not np.issubdtype(ids_BxTxH.dtype, np.integer):
      raise TypeError(f"engram_hash_fn: layer {layer_id} ids must be integers, got "
                      f"{ids_BxTxH.dtype}")
    if ids_BxTxH.size and (ids_BxTxH.min() < 0 or ids_BxTxH.max() >= 2**31):
      raise ValueError(f"engram_hash_fn: layer {layer_id} ids do not fit in int32 "
                       f"(range [{ids_BxTxH.min()}, {ids_BxTxH.max()}])")
    out[int(layer_id)] = ids_BxTxH.astype(np.int32)
  return out


def _pad_rows(packed: Mapping[str, np.ndarray], batch_size: int) -> dict:
  """The last eval batch may be short: pad it with all-padding rows so shapes stay static."""
  rows = len(packed["tokens"])
  if rows == batch_size:
    return dict(packed)
  return {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)])
          for k, v in packed.items()}


def make_dataset(corpus: TokenizedCorpus, *, seq_len: int, batch_size: int, seed: int = 0,
                 train: bool = True, process_index: int = 0, process_count: int = 1,
                 engram_hash_fn: Optional[EngramHashFn] = None,
                 prefetch: int = 0) -> grain.IterDataset:
  """A grain IterDataset of batches (per process) over `corpus`.

  train=True: documents shuffled by `seed`, reshuffled every epoch, repeated forever.
  train=False: one ordered pass; the last batch is padded with rows of weight 0.
  prefetch > 0: that many batches are prepared ahead on a background thread (packing and the
  hash hook overlap the train step); the iterator state still records the consumer's position.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  doc_ids = _shard_indices(len(corpus), process_index, process_count)
  ds = grain.MapDataset.source(doc_ids.tolist())
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(lambda i: {"tokens": corpus[i]})
  it = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": seq_len})
  it = it.batch(batch_size, drop_remainder=train)
  if not train:
    it = it.map(functools.partial(_pad_rows, batch_size=batch_size))
  it = it.map(functools.partial(finalize_batch, engram_hash_fn=engram_hash_fn))
  if prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
  return it


def make_datasets(train_paths: Sequence[str], eval_paths: Sequence[str], *, tokenizer_path: str,
                  seq_len: int, batch_size: int, seed: int = 0,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  engram_hash_fn: Optional[EngramHashFn] = None, prefetch: int = 2,
                  ) -> tuple[grain.DatasetIterator, Callable[[], Iterator[dict]]]:
  """What the trainer calls: (train iterator with get_state/set_state, eval_batches_fn).

  `batch_size` is per process. `eval_batches_fn()` starts a fresh single pass each call.
  Process index/count default to jax's; pass them explicitly in tests.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  common = dict(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count, engram_hash_fn=engram_hash_fn)
  train_ds = make_dataset(TokenizedCorpus(train_paths, tokenizer_path), seed=seed, train=True,
                          prefetch=prefetch, **common)
  eval_ds = make_dataset(TokenizedCorpus(eval_paths, tokenizer_path), train=False, **common)
  return iter(train_ds), lambda: iter(eval_ds)

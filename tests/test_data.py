"""Tests for the input pipeline (data.py), the tokenizer helpers and the shipped assets.

Dimension legend: B batch, T sequence length, H hash heads.
"""

import gzip
import json
import os

import numpy as np
import pytest

from engram_jax import data
from engram_jax import tokenizer as tokenizer_lib

TOK = tokenizer_lib.default_tokenizer_path()
EOS = tokenizer_lib.EOS_ID

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wise men of the east count "
          "their silver coins beneath an old oak tree").split()


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=rng.integers(2, 40))).capitalize() + "."
          for _ in range(n)]


def _write_jsonl(path, docs):
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  return str(path)


def _write_txt_gz(path, docs):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n\n".join(docs) + "\n")
  return str(path)


def _expected_tokens(docs):
  tok = tokenizer_lib.load_tokenizer(TOK)
  return [tok.encode(d, add_special_tokens=False).ids + [EOS] for d in docs]


def _documents_from_batches(batches):
  """Rebuilds the document token lists from ordered batches: the non-padding tokens of all rows,
  concatenated, split after every `<eos>` (a document cut at a row end continues in the next)."""
  stream = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches]).tolist()
  docs, current = [], []
  for t in stream:
    current.append(t)
    if t == EOS:
      docs.append(current)
      current = []
  assert not current, "the stream must end with <eos>"
  return docs


def _dataset(paths, train, seq_len=16, batch_size=2, seed=0, index=0, count=1, fn=None,
             prefetch=0):
  corpus = data.TokenizedCorpus(paths, TOK)
  return data.make_dataset(corpus, seq_len=seq_len, batch_size=batch_size, seed=seed, train=train,
                           process_index=index, process_count=count, engram_hash_fn=fn,
                           prefetch=prefetch)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_packing_contract(tmp_path):
  docs = _docs(30)
  path = _write_jsonl(tmp_path / "c.jsonl", docs)
  batches = list(_dataset([path], train=False, seq_len=16, batch_size=3))
  for b in batches:
    assert b["inputs"].shape == (3, 16)
    for k in ("inputs", "targets", "segment_ids", "positions"):
      assert b[k].dtype == np.int32, k
    assert b["weights"].dtype == np.float32
    seg, w = b["segment_ids"], b["weights"]
    # A weighted target is the next input of the same document piece.
    np.testing.assert_array_equal(b["targets"][:, :-1][w[:, :-1] > 0],
                                  b["inputs"][:, 1:][w[:, :-1] > 0])
    assert np.all(seg[:, 1:][w[:, :-1] > 0] == seg[:, :-1][w[:, :-1] > 0])
    assert np.all(w[:, -1] == 0) and np.all(w[seg == 0] == 0)
    assert np.all(w[b["inputs"] == EOS] == 0)  # eos -> next document's first token never trains
    assert np.all(b["targets"][w == 0] == 0)
    # Segment ids count 1, 2, ... along a row, padding only at the end; positions restart at 0
    # in every piece; a piece after the first in a row starts a document (the previous one
    # ended with <eos>).
    for inputs_T, seg_T, pos_T in zip(b["inputs"], seg, b["positions"]):
      n = int((seg_T > 0).sum())
      assert np.all(seg_T[n:] == 0) and np.all(pos_T[n:] == 0)
      assert seg_T[0] in (0, 1) and np.all(np.diff(seg_T[:n]) >= 0)
      assert np.all(np.diff(seg_T[:n]) <= 1)
      for s in range(1, seg_T.max() + 1):
        np.testing.assert_array_equal(pos_T[seg_T == s], np.arange((seg_T == s).sum()))
        if s > 1:
          assert inputs_T[seg_T == s - 1][-1] == EOS
  # Nothing lost, nothing duplicated, documents in order on a single eval pass.
  assert _documents_from_batches(batches) == _expected_tokens(docs)
  # Every within-document next-token pair trains except those cut by a row end.
  n_tokens = sum(len(t) for t in _expected_tokens(docs))
  n_pieces = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
  assert sum(b["weights"].sum() for b in batches) == n_tokens - n_pieces


def test_training_determinism_and_epochs(tmp_path):
  path = _write_jsonl(tmp_path / "c.jsonl", _docs(12))
  a = _take(iter(_dataset([path], train=True, seed=3)), 20)  # several epochs of 12 short docs
  b = _take(iter(_dataset([path], train=True, seed=3)), 20)
  c = _take(iter(_dataset([path], train=True, seed=4)), 20)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
  assert all(x["weights"].sum() > 0 for x in a)  # the training stream never runs dry


def test_process_sharding_partitions_documents(tmp_path):
  docs = _docs(20)
  path = _write_jsonl(tmp_path / "c.jsonl", docs)
  shards = [_documents_from_batches(_dataset([path], train=False, index=i, count=2))
            for i in range(2)]
  expected = _expected_tokens(docs)
  assert shards[0] == expected[0::2] and shards[1] == expected[1::2]
  with pytest.raises(ValueError, match="process_index"):
    _dataset([path], train=False, index=2, count=2)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_iterator_state_round_trip(tmp_path, prefetch):
  path = _write_jsonl(tmp_path / "c.jsonl", _docs(25))
  it = iter(_dataset([path], train=True, seed=1, prefetch=prefetch))
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 8)
  fresh = iter(_dataset([path], train=True, seed=1, prefetch=prefetch))
  # Through JSON, as grain's checkpoint handler stores it next to the model checkpoint.
  fresh.set_state(json.loads(json.dumps(state)))
  _assert_batches_equal(_take(fresh, 8), expected)


def test_txt_and_jsonl_sources_agree(tmp_path):
  docs = _docs(9) + ["Line one\nline two of the same document."]
  txt = _write_txt_gz(tmp_path / "c.txt.gz", docs)
  jsonl = _write_jsonl(tmp_path / "c.jsonl", docs)
  assert data.read_documents(txt) == docs == data.read_documents(jsonl)
  plain = tmp_path / "c.txt"
  plain.write_text("First doc.\n\n\n  \nSecond doc\nstill second.\n")
  assert data.read_documents(str(plain)) == ["First doc.", "Second doc\nstill second."]
  _assert_batches_equal(list(_dataset([txt], train=False)), list(_dataset([jsonl], train=False)))


def test_clear_errors(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    data.read_documents(missing)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    data.TokenizedCorpus([missing], TOK)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(ValueError, match="empty.txt.*no documents"):
    data.read_documents(str(empty))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match="bad.jsonl.*line 2.*invalid JSON"):
    data.read_documents(str(bad))
  notext = tmp_path / "notext.jsonl"
  notext.write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match="notext.jsonl.*'text'"):
    data.read_documents(str(notext))
  csv = tmp_path / "c.csv"
  csv.write_text("a,b\n")
  with pytest.raises(ValueError, match="c.csv.*unknown format"):
    data.read_documents(str(csv))
  with pytest.raises(FileNotFoundError, match="missing_tok.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing_tok.json"))
  with pytest.raises(ValueError, match="list of files"):
    data.TokenizedCorpus(str(csv), TOK)


def test_engram_hash_hook(tmp_path):
  path = _write_jsonl(tmp_path / "c.jsonl", _docs(10))
  heads = np.array([1, 7, 13], np.int64)

  def fake_hash(inputs_BxT, segment_ids_BxT):
    return {3: (inputs_BxT[..., None] * heads + segment_ids_BxT[..., None]).astype(np.int64),
            9: np.zeros(inputs_BxT.shape + (2,), np.int64)}

  b = next(iter(_dataset([path], train=True, fn=fake_hash)))
  assert set(b["engram_ids"]) == {3, 9}
  assert b["engram_ids"][3].dtype == np.int32 and b["engram_ids"][3].shape == (2, 16, 3)
  np.testing.assert_array_equal(
      b["engram_ids"][3], b["inputs"][..., None] * heads + b["segment_ids"][..., None])

  with pytest.raises(ValueError, match="layer 5 ids have shape"):
    next(iter(_dataset([path], train=True, fn=lambda x, s: {5: x})))


def test_train_tokenizer(tmp_path):
  path = _write_txt_gz(tmp_path / "c.txt.gz", _docs(50))
  out = str(tmp_path / "tok" / "tokenizer.json")
  tokenizer_lib.train_tokenizer_from_iterator(data.read_documents(path), vocab_size=300,
                                              out_path=out)
  tok = tokenizer_lib.load_tokenizer(out)
  assert tok.get_vocab_size() <= 300
  assert [tok.token_to_id(t) for t in tokenizer_lib.SPECIAL_TOKENS] == [0, 1, 2]
  text = "Seven wise men — naïve café!\n\tOK"
  assert tok.decode(tok.encode(text).ids) == text
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer_from_iterator(data.read_documents(path), vocab_size=10,
                                                out_path=out)


def test_shipped_tokenizer_round_trips():
  tok = tokenizer_lib.load_tokenizer()
  assert tok.get_vocab_size() == 8192
  assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "<bos>", "<eos>"]
  text = "In the beginning, God created the heavens and the earth.\n  Ünïcödé 123 <eos>"
  ids = tok.encode(text).ids
  assert tok.decode(ids, skip_special_tokens=False) == text
  assert len(ids) < len(text) / 2  # a trained BPE merges common English words


def test_shipped_corpus_loads():
  paths = data.default_corpus_paths()
  for split in ("train", "valid"):
    assert all(os.path.isfile(p) for p in paths[split]), paths[split]
  valid_docs = data.read_documents(paths["valid"][0])
  assert len(valid_docs) > 100 and sum(map(len, valid_docs)) > 200_000
  # The valid split is small: use it for both streams to keep this test fast.
  train_it, eval_fn = data.make_datasets(paths["valid"], paths["valid"], tokenizer_path=TOK,
                                         seq_len=64, batch_size=4, seed=0,
                                         process_index=0, process_count=1)
  b = next(train_it)
  assert b["inputs"].shape == (4, 64) and b["weights"].mean() > 0.9  # packed rows, no padding
  first_eval = next(eval_fn())
  np.testing.assert_array_equal(first_eval["inputs"], next(eval_fn())["inputs"])

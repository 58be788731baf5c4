"""The data files of the paper sweeps: where they are, how they are described, the tiny set.

A data directory (experiments/paper/prepare_data.py) holds train.jsonl.gz, valid.jsonl.gz,
ood.jsonl.gz and tokenizer.json. `tiny_data` writes the CPU stand-in the sweeps' --tiny mode
trains on: slices of the shipped held-out file (200 documents to train on, the rest held out)
and engram_jax/assets/README.md as the out-of-domain text, small enough to tokenise in a
second.

Dimension legend: none.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from engram_jax import data as data_lib
from engram_jax import tokenizer as tokenizer_lib

DATA_FILES = {"train": "train.jsonl.gz", "valid": "valid.jsonl.gz", "ood": "ood.jsonl.gz",
              "tokenizer": "tokenizer.json"}


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def data_paths(data_dir: str) -> dict:
  """{train, valid, ood, tokenizer: path} of a data directory; names any missing file."""
  paths = {k: os.path.join(data_dir, f) for k, f in DATA_FILES.items()}
  missing = [p for p in paths.values() if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"--data_dir: missing {missing}; build them with python -m "
                            "experiments.paper.prepare_data --data_dir=DIR")
  return paths


def tiny_data(out: str) -> dict:
  """Writes the --tiny data set into OUT/tiny_data; returns its paths as `data_paths` does."""
  d = os.path.join(out, "tiny_data")
  os.makedirs(d, exist_ok=True)
  docs = data_lib.read_documents(data_lib.default_corpus_paths()["valid"][0])
  paths = {"train": os.path.join(d, "train.txt"), "valid": os.path.join(d, "valid.txt"),
           "ood": os.path.join(d, "ood.txt"),
           "tokenizer": tokenizer_lib.default_tokenizer_path()}
  for key, part in (("train", docs[:200]), ("valid", docs[200:])):
    with open(paths[key], "w", encoding="utf-8") as f:
      f.write("\n\n".join(part) + "\n")
  shutil.copyfile(os.path.join(os.path.dirname(paths["tokenizer"]), "README.md"), paths["ood"])
  return paths


def describe(paths: dict) -> str:
  """One line naming every file with its size and sha256 prefix (printed with the results)."""
  return "; ".join(f"{os.path.basename(p)} {os.path.getsize(p) / 1e6:.2f} MB sha256 "
                   f"{sha256(p)[:12]}" for p in paths.values())

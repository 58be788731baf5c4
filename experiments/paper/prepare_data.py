r"""Data of the paper sweeps: the large Debian corpus, its tokenizer, and an out-of-domain text.

  python -m experiments.paper.prepare_data --data_dir=runs/paper_data

Writes four files into --data_dir (about 22 MB, small enough to carry to a GPU machine):
  train.jsonl.gz, valid.jsonl.gz  experiments/build_corpus --preset=large (Bibles, commentaries,
                                  dictionaries; split by document CRC32), gzip-compressed
  tokenizer.json                  its byte-level BPE (vocab 8192), trained on train.jsonl
  ood.jsonl.gz                    the Debian GNU/Linux FAQ (Debian package `debian-faq`,
                                  `debian-faq.en.txt.gz`, verbatim-copying licence): one
                                  document per numbered question. Operating-system prose from
                                  2021, a domain none of the training sources covers; the
                                  script checks that no FAQ document occurs in train.jsonl.
and prints every file's size, sha256, documents and tokens. Needs `apt-get download`
(Debian bookworm); about 3 minutes on 2 CPU cores. The raw build stays in --build_dir.

Dimension legend: none.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

from absl import app
from absl import flags

from engram_jax import data as data_lib
from experiments import build_corpus
from experiments.paper import data_files

# experiments.build_corpus defines --download_dir (the .deb cache), used here too.
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the four data files are written "
                                "(the sweep's --data_dir).")
_BUILD_DIR = flags.DEFINE_string("build_dir", "/tmp/engram_paper_build",
                                 "Scratch directory of the uncompressed large corpus.")

OOD_PACKAGE = "debian-faq"
OOD_FILE = "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
# Body headings ("1.2.\u00a0What is Debian GNU/Linux?") put a no-break space after the number.
_QUESTION = re.compile(r"^\d+\.\d+\.[ \u00a0]", re.M)


def faq_documents(text: str) -> list[str]:
  """The FAQ's numbered questions (heading + answer), indentation removed; the front matter
  and table of contents before the first question are dropped."""
  # Table-of-contents entries are indented; only the body's headings start a line.
  starts = [m.start() for m in _QUESTION.finditer(text)]
  docs = []
  for begin, end in zip(starts, starts[1:] + [len(text)]):
    lines = [line.replace("\u00a0", " ").strip() for line in text[begin:end].splitlines()]
    doc = re.sub(r"\n{2,}", "\n", "\n".join(lines)).strip()
    if len(doc) > 80:
      docs.append(doc)
  return docs


def _write_jsonl_gz(path: str, docs: list[str], source: str) -> None:
  payload = "".join(json.dumps({"text": d, "source": source}) + "\n" for d in docs)
  with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    f.write(payload.encode("utf-8"))


def _gzip(src: str, dst: str) -> None:
  with open(src, "rb") as f_in, open(dst, "wb") as raw, \
      gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f_out:
    shutil.copyfileobj(f_in, f_out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  out, build, debs = _DATA_DIR.value, _BUILD_DIR.value, flags.FLAGS.download_dir
  os.makedirs(out, exist_ok=True)
  subprocess.run([sys.executable, "-m", "experiments.build_corpus", "--preset=large",
                  f"--out_dir={build}", f"--download_dir={debs}"], check=True)
  for split in ("train", "valid"):
    _gzip(os.path.join(build, f"{split}.jsonl"), os.path.join(out, f"{split}.jsonl.gz"))
  shutil.copyfile(os.path.join(build, "tokenizer.json"), os.path.join(out, "tokenizer.json"))

  root = build_corpus.fetch_package(OOD_PACKAGE, debs)
  with gzip.open(os.path.join(root, OOD_FILE), "rt", encoding="utf-8") as f:
    ood = faq_documents(f.read())
  with open(os.path.join(build, "train.jsonl"), encoding="utf-8") as f:
    train_text = "\n".join(json.loads(line)["text"] for line in f)
  leaked = [d[:60] for d in ood if d[:200] in train_text]
  if leaked:
    raise ValueError(f"ood: {len(leaked)} FAQ documents occur in train.jsonl: {leaked[:3]}")
  _write_jsonl_gz(os.path.join(out, "ood.jsonl.gz"), ood, OOD_PACKAGE)

  tokenizer = os.path.join(out, "tokenizer.json")
  for name in data_files.DATA_FILES.values():
    path = os.path.join(out, name)
    line = f"{name:16s} {os.path.getsize(path) / 1e6:7.2f} MB sha256 {data_files.sha256(path)[:16]}"
    if name.endswith(".jsonl.gz"):
      tokens, offsets = data_lib.tokenize_file(path, tokenizer)
      line += f" {len(offsets) - 1:7d} docs {len(tokens):10,d} tokens"
    print(line)


if __name__ == "__main__":
  flags.mark_flags_as_required(["data_dir"])
  app.run(main)

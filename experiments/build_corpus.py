r"""Builds a real English text corpus from Debian packages, plus a BPE tokenizer trained on it.

Nothing here reaches the web: every text comes from a Debian package fetched with
`apt-get download` (the only registries reachable on the project's machines are PyPI, Debian and
npm) and unpacked with `dpkg-deb -x`. Sources, all checked against each package's
`debian/copyright` and SWORD `.conf`:

  package (Debian bookworm)        work                                        licence
  sword-text-web 426.0-1           World English Bible (2015, with Deuterocanon) public domain
  sword-text-kjv 14.3-1            King James Version (1769)                    public domain (UK: Crown patent)
  sword-comm-mhcc 2.0-1            Matthew Henry's Concise Commentary (1706)    public domain
  sword-comm-tdavid 2.1-1          C. H. Spurgeon, The Treasury of David (1885) public domain
  sword-comm-scofield 2.1-1        Scofield Reference Notes (1917)              public domain
  sword-dict-naves 3.0-1           Nave's Topical Bible (1896)                  public domain
  dict-devil 1.0-13.1              Ambrose Bierce, The Devil's Dictionary (1911) public domain
  dict-jargon 4.4.7-3.1            The Jargon File 4.4.7                        public domain
  dict-gcide 0.48.5+nmu2           GNU Collaborative International Dictionary  GPL-2+
                                   of English (Webster's 1913 + additions)

Presets:
  embedded  WEB + MHCC + Devil's Dictionary + Jargon File (~11 MB raw). Writes
            `corpus/train.txt.gz`/`corpus/valid.txt.gz` (documents separated by a blank line) and
            `tokenizer.json` (vocab 8192): this is how `engram_jax/assets/` was produced.
  large     every source above: 62.7 MB of cleaned text, 132k documents (61.1 MB train,
            1.6 MB valid; GCIDE 28.8 MB, Treasury of David 11.8 MB, the two Bibles 9.1 MB,
            commentaries and lexicons 7.4 MB, Devil's Dictionary + Jargon File 1.7 MB). Writes
            `train.jsonl`/`valid.jsonl` (`{"text": ..., "source": ...}` per line) and
            `tokenizer.json`. About 20 s of CPU plus the downloads (~40 MB of .deb files).

Documents: a Bible chapter, one commentary entry, one dictionary entry. The train/valid split is
by document, decided by a CRC32 of the document text (stable across runs and machines).

  .venv/bin/python -m experiments.build_corpus --preset=large --out_dir=/tmp/engram_corpus
  .venv/bin/python -m experiments.build_corpus --preset=embedded --out_dir=engram_jax/assets

The embedded preset rebuilds the shipped files byte for byte. Not run in CI (needs apt).
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import struct
import subprocess
import zlib

from absl import app
from absl import flags
from absl import logging

from engram_jax import data as data_lib
from engram_jax import tokenizer as tokenizer_lib

_PRESET = flags.DEFINE_enum("preset", "large", ["embedded", "large"], "Which sources to use.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the corpus and tokenizer are written.")
_DOWNLOAD_DIR = flags.DEFINE_string("download_dir", "/tmp/engram_corpus_debs",
                                    "Cache for the downloaded and unpacked .deb files.")
_VALID_PERCENT = flags.DEFINE_float("valid_percent", 3.0, "Share of documents held out.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Tokenizer vocabulary size.")

# (package, kind, module path inside the package, SWORD index format or dict name).
_SWORD = "usr/share/sword/modules"
_SOURCES = {
    "web": ("sword-text-web", "sword_bible", f"{_SWORD}/texts/ztext/engWEB2015eb", "bz"),
    "kjv": ("sword-text-kjv", "sword_bible", f"{_SWORD}/texts/ztext/engKJV2006eb", "bz"),
    "mhcc": ("sword-comm-mhcc", "sword_comm", f"{_SWORD}/comments/zcom/mhcc", "bz"),
    "tdavid": ("sword-comm-tdavid", "sword_comm", f"{_SWORD}/comments/zcom/tdavid", "cz"),
    "scofield": ("sword-comm-scofield", "sword_comm", f"{_SWORD}/comments/zcom/scofield", "bz"),
    "naves": ("sword-dict-naves", "sword_lexicon", f"{_SWORD}/lexdict/zld/nave/nave", ""),
    "devil": ("dict-devil", "dictd", "usr/share/dictd/devil", ""),
    "jargon": ("dict-jargon", "dictd", "usr/share/dictd/jargon", ""),
    "gcide": ("dict-gcide", "dictd", "usr/share/dictd/gcide", ""),
}
_PRESETS = {
    "embedded": ("web", "mhcc", "devil", "jargon"),
    "large": tuple(_SOURCES),
}

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_BREAK = re.compile(r"<(?:div|p|lb|l|title|lg|item|list|br)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]+>")
_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=")
# dictd plain-text conventions: `\Pro*nun"ci*a*tion\` headers, `{cross references}` and source
# tags such as `[1913 Webster]` are markup, not prose.
_DICT_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_DICT_SOURCE_TAG = re.compile(r"\[(?:[^\]\n]*(?:Webster|WordNet|PJC|Century|Dict\.)[^\]\n]*)\]")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_NEWLINES = re.compile(r" *\n[ \n]*")


def clean_markup(text: str) -> str:
  """OSIS/ThML/GCIDE markup -> plain prose: footnotes dropped, tags removed, blank lines folded."""
  text = _NOTE.sub("", text)
  text = _BREAK.sub("\n", text)
  text = _TAG.sub("", text)
  text = html.unescape(text)
  text = _SPACES.sub(" ", text)
  # A single newline survives inside a document; a blank line would split it in a .txt corpus.
  return _NEWLINES.sub("\n", text).strip()


def fetch_package(package: str, download_dir: str) -> str:
  """apt-get download + dpkg-deb -x; returns the unpacked root. Cached across runs."""
  root = os.path.join(download_dir, package)
  if os.path.isdir(root):
    return root
  os.makedirs(download_dir, exist_ok=True)
  subprocess.run(["apt-get", "download", package], cwd=download_dir, check=True)
  debs = [f for f in os.listdir(download_dir) if f.startswith(package + "_") and f.endswith(".deb")]
  if not debs:
    raise FileNotFoundError(f"apt-get download {package} left no .deb in {download_dir}")
  subprocess.run(["dpkg-deb", "-x", os.path.join(download_dir, debs[0]), root], check=True)
  return root


def _sword_entries(mod_dir: str, prefix: str):
  """Yields (raw entry markup) of a SWORD zText/zCom(4) module in canonical order, deduplicated.

  Layout: `{ot,nt}.{prefix}s` = per block (offset u32, size u32, raw size u32) into the
  zlib-compressed `.{prefix}z`; `.{prefix}v` = per verse (block u32, offset u32, size u16 for
  zText/zCom, u32 for zCom4). Commentaries point many verses at one entry, hence the dedup.
  """
  verse_fmt = "<IIH" if prefix == "bz" else "<III"
  step = struct.calcsize(verse_fmt)
  for testament in ("ot", "nt"):
    blocks_path = os.path.join(mod_dir, f"{testament}.{prefix}s")
    if not os.path.exists(blocks_path):
      raise FileNotFoundError(f"SWORD block index missing: {blocks_path}")
    with open(blocks_path, "rb") as f:
      index = f.read()
    with open(os.path.join(mod_dir, f"{testament}.{prefix}z"), "rb") as f:
      data = f.read()
    with open(os.path.join(mod_dir, f"{testament}.{prefix}v"), "rb") as f:
      verses = f.read()
    blocks = {}
    seen = set()
    for i in range(len(verses) // step):
      block, offset, size = struct.unpack_from(verse_fmt, verses, i * step)
      if size == 0 or (block, offset) in seen:
        continue
      seen.add((block, offset))
      if block not in blocks:
        start, length, _ = struct.unpack_from("<III", index, block * 12)
        blocks[block] = zlib.decompress(data[start:start + length])
      yield blocks[block][offset:offset + size].decode("utf-8", "replace")


def sword_bible_documents(mod_dir: str, prefix: str) -> list[str]:
  """One document per chapter (a `<chapter sID=...>` marker starts a new one)."""
  docs, current = [], []
  for raw in _sword_entries(mod_dir, prefix):
    if _CHAPTER_START.search(raw) and current:
      docs.append("\n".join(current))
      current = []
    text = clean_markup(raw)
    if text:
      current.append(text)
  if current:
    docs.append("\n".join(current))
  return docs


def sword_comm_documents(mod_dir: str, prefix: str) -> list[str]:
  return [t for t in (clean_markup(raw) for raw in _sword_entries(mod_dir, prefix)) if t]


def sword_lexicon_documents(base: str) -> list[str]:
  """zLD lexicon: `.idx` (key offset u32, size u32) into `.dat` = key, CRLF, (block u32, entry
  u32); `.zdx` (offset, size) into zlib blocks `.zdt` = count u32, (offset, size) pairs, texts."""
  with open(base + ".idx", "rb") as f:
    idx = f.read()
  with open(base + ".dat", "rb") as f:
    dat = f.read()
  with open(base + ".zdx", "rb") as f:
    zdx = f.read()
  with open(base + ".zdt", "rb") as f:
    zdt = f.read()
  blocks, docs = {}, []
  for i in range(len(idx) // 8):
    off, size = struct.unpack_from("<II", idx, i * 8)
    rec = dat[off:off + size]
    key, _, rest = rec.partition(b"\r\n")
    if len(rest) < 8:
      continue
    block, entry = struct.unpack_from("<II", rest)
    if block not in blocks:
      start, length = struct.unpack_from("<II", zdx, block * 8)
      blocks[block] = zlib.decompress(zdt[start:start + length])
    raw = blocks[block]
    e_off, e_size = struct.unpack_from("<II", raw, 4 + entry * 8)
    text = clean_markup(raw[e_off:e_off + e_size].rstrip(b"\0").decode("utf-8", "replace"))
    if text:
      docs.append(f"{key.decode('utf-8', 'replace').title()}\n{text}")
  return docs


def _b64_number(s: str) -> int:
  alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  value = 0
  for ch in s:
    value = value * 64 + alphabet.index(ch)
  return value


def dictd_documents(base: str, strip_dict_markup: bool = False) -> list[str]:
  """dictd database: `.dict.dz` is gzip-compatible; `.index` lines are word, offset, length in
  dictd's base64 digits. One document per entry; the `00-database-*` headers are dropped.

  strip_dict_markup removes GCIDE's pronunciation headers, braces and source tags; it is off for
  the embedded sources so that the shipped corpus stays byte-identical to its first build."""
  with gzip.open(base + ".dict.dz", "rb") as f:
    body = f.read()
  docs, seen = [], set()
  with open(base + ".index", encoding="utf-8", errors="replace") as f:
    for line in f:
      parts = line.rstrip("\n").split("\t")
      if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
        continue
      span = (_b64_number(parts[1]), _b64_number(parts[2]))
      if span in seen:
        continue
      seen.add(span)
      text = body[span[0]:span[0] + span[1]].decode("utf-8", "replace")
      if strip_dict_markup:
        text = _DICT_SOURCE_TAG.sub("", _DICT_PRONUNCIATION.sub("", text))
        text = text.replace("{", "").replace("}", "")
      text = clean_markup(text.replace("\n\n", "\n"))
      if len(text) > 40:  # bare cross-references carry no prose
        docs.append(text)
  return docs


def load_source(name: str, download_dir: str) -> list[str]:
  package, kind, rel, prefix = _SOURCES[name]
  path = os.path.join(fetch_package(package, download_dir), rel)
  if kind == "sword_bible":
    return sword_bible_documents(path, prefix)
  if kind == "sword_comm":
    return sword_comm_documents(path, prefix)
  if kind == "sword_lexicon":
    return sword_lexicon_documents(path)
  return dictd_documents(path, strip_dict_markup=(name == "gcide"))


def is_valid_document(text: str, valid_percent: float) -> bool:
  return zlib.crc32(text.encode("utf-8")) % 10000 < valid_percent * 100


def _write(path: str, docs: list[tuple[str, str]]) -> int:
  if path.endswith(".jsonl"):
    payload = "".join(json.dumps({"text": t, "source": s}) + "\n" for s, t in docs)
  else:
    payload = "\n\n".join(t for _, t in docs) + "\n"
  data = payload.encode("utf-8")
  if path.endswith(".gz"):
    # mtime=0 keeps the shipped .gz files byte-identical across rebuilds.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return len(data)


def main(argv):
  del argv
  if not _OUT_DIR.value:
    raise app.UsageError("--out_dir is required")
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  train, valid = [], []
  for name in _PRESETS[_PRESET.value]:
    docs = load_source(name, _DOWNLOAD_DIR.value)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"{name:10s} {_SOURCES[name][0]:22s} {len(docs):8d} docs {n_bytes / 1e6:8.2f} MB")
    for d in docs:
      (valid if is_valid_document(d, _VALID_PERCENT.value) else train).append((name, d))
  embedded = _PRESET.value == "embedded"
  # The embedded layout mirrors engram_jax/assets: corpus/{train,valid}.txt.gz + tokenizer.json.
  corpus_dir = os.path.join(_OUT_DIR.value, "corpus") if embedded else _OUT_DIR.value
  os.makedirs(corpus_dir, exist_ok=True)
  ext = ".txt.gz" if embedded else ".jsonl"
  paths = {split: os.path.join(corpus_dir, split + ext) for split in ("train", "valid")}
  sizes = {split: _write(paths[split], docs)
           for split, docs in (("train", train), ("valid", valid))}
  for split, path in paths.items():
    print(f"{split}: {path} {sizes[split] / 1e6:.2f} MB raw, {os.path.getsize(path) / 1e6:.2f} MB "
          f"on disk, {len(train if split == 'train' else valid)} docs")
  tok_path = os.path.join(_OUT_DIR.value, "tokenizer.json")
  logging.info("training tokenizer on %s", paths["train"])
  tokenizer_lib.train_tokenizer_from_iterator(data_lib.read_documents(paths["train"]),
                                              _VOCAB_SIZE.value, tok_path)
  print(f"tokenizer: {tok_path} (vocab {_VOCAB_SIZE.value})")


if __name__ == "__main__":
  app.run(main)

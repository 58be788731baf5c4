"""How much of a step's host traffic an HBM cache of the most frequent rows could serve.

  python -m benchmarks.hot_rows [--tokens=corpus|zipf] [--table_gb=32] [--cache=0.001,0.01,0.1]

A hybrid placement (the most frequently hit rows in an HBM cache, the rest in pinned_host) is
worth building only if it can remove a large share of the host traffic. This bounds that share,
on the CPU, with bench_offload's hashing (N=3, K=8: 16 heads per layer, tables sized to
`--table_gb` for two layers; one layer is counted):

  1. row frequencies from the first `--train_frac` of the token stream (the cache is chosen
     once, from data seen before);
  2. for each later step of B x T tokens: the unique rows it reads (what the host trainer moves
     per step) and how many of them, and of its B*T*H lookup slots, fall in the top
     `--cache` fraction of the table's rows.

Training moves each step's unique rows, so "unique rows cached" is the fraction of host
gather/scatter traffic a cache would remove; decoding fetches every slot of every token, so
"slots cached" is the fraction of per-token fetches it would serve from HBM. `--tokens=corpus`:
the shipped corpus (real n-gram repetition, but a small sample of a language);
`--tokens=zipf`: bench_offload's Zipf(1.1) tokens over its vocabulary.

Dimension legend: B batch, T time, H hash heads, R table rows.
"""

from absl import flags
import numpy as np

from benchmarks import bench_offload
from benchmarks import common

FLAGS = flags.FlagValues()
flags.DEFINE_enum("tokens", "corpus", ["corpus", "zipf"], "token stream", flag_values=FLAGS)
flags.DEFINE_float("table_gb", 32.0, "GB of both layers' tables", flag_values=FLAGS)
flags.DEFINE_list("cache", ["0.001", "0.01", "0.1"], "cache sizes, fractions of the rows",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "B", flag_values=FLAGS)
flags.DEFINE_integer("seq", 2048, "T", flag_values=FLAGS)
flags.DEFINE_float("train_frac", 0.8, "share of the stream that ranks the rows",
                   flag_values=FLAGS)


def stream(tokens: str, n: int, seed: int = 0) -> np.ndarray:
  if tokens == "corpus":
    return np.asarray(common.corpus_tokens(), np.int64)
  rng = np.random.default_rng(seed)
  return (rng.zipf(1.1, size=n) - 1) % bench_offload.VOCAB


def global_rows(mapping, layer, toks_BxT) -> np.ndarray:
  ids_BxTxH = mapping.hash_numpy(toks_BxT)[layer]
  return (ids_BxTxH + np.asarray(mapping.offsets(layer))).reshape(toks_BxT.shape[0], -1)


def analyse(tokens="corpus", table_gb=32.0, caches=(0.001, 0.01, 0.1), batch=8, seq=2048,
            train_frac=0.8, zipf_tokens=2_500_000, chunk=256):
  mapping = bench_offload.mapping_for(table_gb)
  layer = bench_offload.LAYERS[0]
  num_rows = mapping.num_rows(layer)
  text = stream(tokens, zipf_tokens)
  windows = text[:text.size // seq * seq].reshape(-1, seq)
  n_train = int(train_frac * windows.shape[0])
  counts = np.zeros(num_rows, np.int64)
  for i in range(0, n_train, chunk):                       # frequencies, in chunks of windows
    counts += np.bincount(global_rows(mapping, layer, windows[i:min(i + chunk, n_train)])
                          .ravel(), minlength=num_rows)
  order = np.argsort(-counts, kind="stable")
  steps = [windows[i:i + batch] for i in range(n_train, windows.shape[0] - batch + 1, batch)]
  if not steps:
    raise SystemExit("too few tokens after the training part for one step")
  result = {"tokens": tokens, "num_rows": num_rows, "rows_seen": int((counts > 0).sum()),
            "train_tokens": n_train * seq, "steps": len(steps), "per_cache": {}}
  step_rows = [global_rows(mapping, layer, s) for s in steps]
  result["unique_per_step"] = float(np.mean([np.unique(r).size for r in step_rows]))
  result["slots_per_step"] = int(step_rows[0].size)
  for frac in caches:
    hot = np.zeros(num_rows, bool)
    hot[order[:int(frac * num_rows)]] = True
    uniq_hit = np.mean([hot[np.unique(r)].mean() for r in step_rows])
    slot_hit = np.mean([hot[r].mean() for r in step_rows])
    result["per_cache"][frac] = (int(frac * num_rows), float(uniq_hit), float(slot_hit))
  return result


def main():
  args = common.parse_flags(FLAGS, __doc__)
  r = analyse(args.tokens, args.table_gb, tuple(float(c) for c in args.cache), args.batch,
              args.seq, args.train_frac)
  print(f"{r['tokens']} tokens; one layer's table: {r['num_rows']:,} rows "
        f"({args.table_gb:g} GB for two layers); frequencies from {r['train_tokens']:,} tokens "
        f"({r['rows_seen']:,} rows seen); {r['steps']} later steps of B={args.batch} "
        f"T={args.seq}: {r['unique_per_step']:,.0f} unique rows of {r['slots_per_step']:,} slots "
        "per step")
  print(common.format_table(
      ["cache rows", "of table", "unique rows cached", "slots cached"],
      [(f"{rows:,}", f"{100 * frac:.2f}%", f"{100 * uniq_hit:.1f}%", f"{100 * slot_hit:.1f}%")
       for frac, (rows, uniq_hit, slot_hit) in r["per_cache"].items()]))


if __name__ == "__main__":
  main()

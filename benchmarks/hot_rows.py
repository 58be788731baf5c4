"""How much of a step's host traffic an HBM cache of the most frequent rows could serve.

  python -m benchmarks.hot_rows [--tokens corpus|zipf] [--table_gb 32] [--cache 0.001,0.01,0.1]

Issue 6 asks for a hybrid placement (the most frequently hit rows in an HBM cache, the rest in
pinned_host) only if it measures better. Before building one, this bounds what it could save,
on the CPU, with bench_offload's hashing (N=3, K=8: 16 heads per layer, tables sized to
`--table_gb` for two layers; one layer is counted):

  1. row frequencies from the first `--train_frac` of the token stream (the cache is chosen
     once, from data seen before);
  2. for each later step of B x T tokens: the unique rows it reads (what the host trainer moves
     per step) and how many of them, and of its B*T*H lookup slots, fall in the top
     `--cache` fraction of the table's rows.

Training moves each step's unique rows, so "unique rows cached" is the fraction of host
gather/scatter traffic a cache would remove; decoding fetches every slot of every token, so
"slots cached" is the fraction of per-token fetches it would serve from HBM. `--tokens corpus`:
the shipped corpus (2.55M tokens, 8k-token tokenizer: real n-gram repetition, but a small
sample of a language); `--tokens zipf`: bench_offload's Zipf(1.1) tokens over 32k ids.

Dimension legend: B batch, T time, H hash heads, R table rows.
"""

import argparse

import numpy as np

from benchmarks import bench_offload


def stream(tokens: str, n: int, seed: int = 0) -> np.ndarray:
  if tokens == "corpus":
    return np.asarray(bench_offload._corpus_tokens(), np.int64)
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
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", default="corpus", choices=["corpus", "zipf"])
  p.add_argument("--table_gb", type=float, default=32.0)
  p.add_argument("--cache", default="0.001,0.01,0.1", help="cache sizes, fractions of the rows")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--train_frac", type=float, default=0.8)
  args = p.parse_args()
  r = analyse(args.tokens, args.table_gb, tuple(float(c) for c in args.cache.split(",")),
              args.batch, args.seq, args.train_frac)
  print(f"{r['tokens']} tokens; one layer's table: {r['num_rows']:,} rows "
        f"({args.table_gb:g} GB for two layers); frequencies from {r['train_tokens']:,} tokens "
        f"({r['rows_seen']:,} rows seen); {r['steps']} later steps of B={args.batch} "
        f"T={args.seq}: {r['unique_per_step']:,.0f} unique rows of {r['slots_per_step']:,} slots "
        "per step")
  print(f"  {'cache rows':>12} {'of table':>8} {'unique rows cached':>19} {'slots cached':>13}")
  for frac, (rows, uniq_hit, slot_hit) in r["per_cache"].items():
    print(f"  {rows:12,} {100 * frac:7.2f}% {100 * uniq_hit:18.1f}% {100 * slot_hit:12.1f}%")


if __name__ == "__main__":
  main()

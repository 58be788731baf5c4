"""Small pieces of the benchmark scripts that decide what they measure."""

import sys

import pytest

from benchmarks import common


def test_config_overrides_go_through_config_flags(monkeypatch):
  from benchmarks import bench_train_step
  monkeypatch.setattr(sys, "argv", [
      "bench_train_step", "--step=trainer", "--config=experiments/configs/quickstart.py",
      "--config.model.moe.top_k=1", "--config.data.batch_size=3", "--kinds=adagrad"])
  args = common.parse_flags(bench_train_step.FLAGS, bench_train_step.__doc__)
  assert args.step == "trainer" and args.kinds == ["adagrad"]
  assert args.config.model.moe.top_k == 1 and args.config.data.batch_size == 3
  assert common.config_overrides(args) == "--config.model.moe.top_k=1 --config.data.batch_size=3"
  # Each measured size: the overrides stay, the tables are resized, the optimiser switched.
  config = common.TrainerSteps(args.config).sized_config("adagrad", 80_000)
  assert config.model.moe.top_k == 1 and config.table_optim.kind == "adagrad"
  assert config.engram.engram_vocab_size == (10_000, 10_000)  # 2 orders x 4 heads
  assert args.config.table_optim.kind == "lazy_adam"            # the flag's config is a copy
  assert args.config.engram.engram_vocab_size == (5_000, 5_000)
  # A second parse starts from the defaults; an unknown field or flag is named.
  monkeypatch.setattr(sys, "argv", ["bench_train_step"])
  args = common.parse_flags(bench_train_step.FLAGS, bench_train_step.__doc__)
  assert args.step == "standalone" and args.config is None and len(args.kinds) == 3
  for bad in ("--config.model.moe.no_such_field=1", "--no_such_flag=1"):
    monkeypatch.setattr(sys, "argv", [
        "bench_train_step", "--config=experiments/configs/quickstart.py", bad])
    with pytest.raises((AttributeError, SystemExit), match="no_such_"):
      common.parse_flags(bench_train_step.FLAGS, bench_train_step.__doc__)


def test_profile_step_attributes_device_time_to_model_parts():
  from benchmarks import profile_step
  from experiments.configs import tiny_test
  ms, _, parts, per_op, total, names, table_rows = profile_step.profile(
      tiny_test.get_config(), "lazy_adam", rows=4096, steps=1)
  assert ms > 0 and total > 0 and table_rows
  # tiny_test has Engram layers, MoE blocks with a shared expert, attention and mHC streams.
  for part in ("Engram layer", "MoE routed experts", "MoE shared expert", "attention",
               "mHC mixing", "embedding + logits", common.OUTSIDE):
    assert part in parts and sum(parts[part]) > 0, part
    assert parts[part][1] >= 0
  assert sum(parts["Engram layer"]) < total
  assert abs(sum(sum(v) for v in parts.values()) - total) < 1e-6 * max(total, 1)
  assert sum(per_op.values()) == pytest.approx(total)


def test_bench_offload_bf16_tables_match_hbm(tmp_path, monkeypatch, capsys):
  import json
  import sys
  from benchmarks import bench_offload
  monkeypatch.setattr(sys, "argv", [
      "bench_offload", "--sizes_gb=0.001", "--batch=2", "--seq=32", "--d=32", "--blocks=1",
      "--steps=2", "--modes=hbm,threads", "--optimizer=adagrad", "--table_dtype=bfloat16",
      f"--out={tmp_path}"])
  bench_offload.main()
  from engram_jax import table_optim
  cfg = table_optim.TableOptimizerConfig(kind="adagrad")
  per_param = table_optim.bytes_per_table_param(cfg, "bfloat16", row_width=64)
  assert per_param == table_optim.bytes_per_table_param(cfg, "float32", row_width=64) - 2
  assert f"bfloat16 adagrad ({per_param:.2f} bytes/param)" in capsys.readouterr().out
  (rec,) = json.load(open(tmp_path / "bench_offload.json"))
  # Same arithmetic on the same bf16 tables in HBM and in host memory.
  assert rec["threads_loss_maxdiff"] == 0 and rec["threads_rows_maxdiff"] == 0


def test_profiler_lines_busy_time_and_summary():
  import jax
  import jax.numpy as jnp
  # Nested and overlapping events count once; a gap does not count.
  assert common._union_ns([(0, 10), (2, 5), (8, 14), (20, 25)]) == 19
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  outs, rows, wall_ms = common.traced(lambda: [f(x).block_until_ready() for _ in range(3)])
  assert len(outs) == 3                                        # fn's result is passed through
  assert wall_ms > 0 and rows and all(r["busy_ns"] > 0 and r["events"] > 0 for r in rows)
  assert rows == sorted(rows, key=lambda r: -r["busy_ns"])
  assert "per step" in common.format_rows(rows, wall_ms, steps=3)


def test_part_of_reads_module_paths_and_the_backward():
  assert common.part_of("jit(train_step)/transpose(jvp(EngramLM))/layer_1/engram/x") == (
      "Engram layer", True)
  assert common.part_of("jit(train_step)/jvp(EngramLM)/layer_2/moe/experts/dot") == (
      "MoE routed experts", False)
  assert common.part_of("jit(train_step)/add")[0] == common.OUTSIDE
  assert common.part_of("jit(train_step)/jvp(EngramLM)/layers_7_12/layers_7_12._sublayer/"
                              "btij,btjd->btid/dot_general")[0] == "mHC mixing"


def test_bench_offload_runs_and_host_training_matches_hbm(tmp_path, monkeypatch, capsys):
  import json
  import sys
  from benchmarks import bench_offload
  monkeypatch.setattr(sys, "argv", [
      "bench_offload", "--sizes_gb=0.002", "--batch=2", "--seq=32", "--d=64", "--blocks=2",
      "--steps=2", "--modes=hbm,threads,gen", "--optimizer=adagrad", "--gen_batch=2",
      "--gen_prompt=6", "--gen_new=8", "--remat", "--tokens=corpus", "--trace_steps=1",
      f"--out={tmp_path}"])
  bench_offload.main()
  printed = capsys.readouterr().out
  for mode in ("hbm", "host threads"):  # one traced step each
    assert f"{mode}: 1 traced steps\n  wall " in printed
  for where in ("HBM", "host, GPU reads the rows", "host, fetch in step"):  # traced
    assert f"generate ({where}): 1 traced call, per new token\n  wall " in printed
  (rec,) = json.load(open(tmp_path / "bench_offload.json"))
  assert rec["hbm_ms"] > 0 and rec["threads_ms"] > 0
  # Same batches and arithmetic in both placements: the last losses agree ...
  assert rec["threads_loss"] == pytest.approx(rec["hbm_loss"], rel=1e-5)
  # ... at every step, and the rows updated by the host step equal the HBM table's.
  assert rec["threads_loss_maxdiff"] < 1e-5 and rec["threads_rows_maxdiff"] < 1e-6
  # Decoding from HBM and from pinned_host tables samples the same tokens.
  assert rec["same_tokens"] is True and rec["host_tok_s"] > 0
  assert rec["host_dir_tok_s"] > 0 and "gen_dir_overhead_pct" in rec


def test_bench_mhc_variants_agree_with_the_baseline():
  from benchmarks import bench_mhc
  times, agreement = bench_mhc.run(batch=2, seq=8, streams=4, width=16, iters=5, reps=1)
  assert set(times) == {"baseline", "einsum", "elementwise"}
  assert all(ms > 0 for ms in times.values())
  for name, (loss_diff, grad_diff, stream_grad_diff) in agreement.items():
    # bf16 streams: outputs round to bf16 (relative 2^-8), f32 sums differ in order only.
    assert loss_diff < 1e-3 and grad_diff < 1e-2 and stream_grad_diff < 2e-2, (name, agreement)


def test_hot_rows_bounds_what_a_cache_could_serve():
  from benchmarks import hot_rows
  r = hot_rows.analyse("zipf", table_gb=0.002, caches=(0.0, 0.01, 0.1, 1.0), batch=2, seq=64,
                       zipf_tokens=20_000)
  hits = [r["per_cache"][c][1:] for c in (0.0, 0.01, 0.1, 1.0)]
  assert hits[0] == (0.0, 0.0) and hits[-1] == (1.0, 1.0)        # no cache / the whole table
  assert hits[1] <= hits[2] and 0 < hits[2][0] < 1               # grows with the cache
  # Slots repeat hot rows, so a cache serves a larger share of slots than of unique rows.
  assert hits[2][1] >= hits[2][0]
  assert 0 < r["unique_per_step"] <= r["slots_per_step"] == 2 * 64 * 16


def test_bench_moe_times_every_dispatch_in_one_run(monkeypatch, capsys):
  import sys
  from benchmarks import bench_moe
  monkeypatch.setattr(sys, "argv", ["bench_moe", "--tokens=64", "--d=64", "--experts=4",
                                    "--expert_width=64", "--reps=1", "--sweep"])
  bench_moe.main()
  table = capsys.readouterr().out.split("variant")[-1]
  assert "dropless, Mosaic GPU kernels        not run" in table  # CPU: no Hopper kernels
  for name in ("dropless, XLA ragged_dot", "capacity cf=1.25", "capacity cf=2.0",
               "dense SwiGLU width 192 (floor)"):
    (line,) = [l for l in table.splitlines() if l.startswith(name)]
    ms, _, dropped = map(float, line[len(name):].split())
    assert ms > 0 and 0.0 <= dropped < 1.0, line
  assert "--sweep: not run" in table


@pytest.mark.slow  # two configs, each compiled twice (init and step): ~1-2 min on 2 cores
def test_bench_throughput_prints_parts_and_summary(monkeypatch, capsys):
  from benchmarks import bench_throughput
  monkeypatch.setattr(sys, "argv", [
      "bench_throughput", "--configs=experiments/configs/tiny_test.py", "--moe_baselines",
      "--rounds=2", "--steps=1", "--warmup=1", "--profile_steps=1"])
  bench_throughput.main()
  printed = capsys.readouterr().out
  parts, summary = printed.split("per-part device time")[1].split("\nsummary")
  header = parts.splitlines()[1]
  assert "tiny_test.py ms" in header and "tiny_test.py (MoE baseline) ms" in header
  for part in ("Engram layer", "MoE routed experts", "attention", "mHC mixing", "norms",
               common.OUTSIDE, "summed events"):
    assert any(line.startswith(part) for line in parts.splitlines()), part
  lines = summary.splitlines()
  assert lines[1].split() == ["config", "step", "ms", "tokens/s", "MFU", "dropped",
                              "Engram", "slowdown/token"]
  (engram,) = [l for l in lines if l.startswith("tiny_test.py ") and "(MoE" not in l[:28]]
  (moe,) = [l for l in lines if l.startswith("tiny_test.py (MoE baseline)")]
  # CPU without --peak_flops: no MFU; dropless dispatch drops nothing; the Engram row is
  # compared with its baseline, the baseline with nothing.
  assert "unknown" in engram and "0 (dropless)" in engram and "0 (dropless)" in moe
  assert "% vs tiny_test.py (MoE baseline)" in engram and moe.rstrip().endswith("-")

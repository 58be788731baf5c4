"""End-to-end training on a tiny config (CPU): learning, resumption, divergence stop, table
modes, on-device hashing, data parallelism and evaluation of a workdir.

All runs share one reference run (lazy_adam, 20 steps, per-step metrics) and compare with it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from engram_jax import checkpoint
from engram_jax import data as data_lib
from engram_jax import experiment_config
from engram_jax import evaluate
from engram_jax import train
from engram_jax import workdir as workdir_lib
from experiments.configs import tiny_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STEPS = 20


def _config(kind="lazy_adam", **overrides):
  c = tiny_test.get_config(kind)
  valid = data_lib.default_corpus_paths()["valid"]
  c.data.train_files = tuple(valid)  # the small file: tokenised in well under a second
  c.data.eval_files = tuple(valid)
  c.train.num_steps = STEPS
  c.train.log_every = 1
  c.train.checkpoint_every = 10
  return experiment_config.apply_overrides(c, overrides.items())


def _losses(workdir):
  """Train losses and their steps, the last record of each step (a resumed run appends)."""
  records = workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"), splits=["train"])
  return np.array([r["loss"] for r in records]), [r["step"] for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  final = train.train_and_evaluate(_config(), workdir)
  losses, steps = _losses(workdir)
  return {"workdir": workdir, "final": final, "losses": losses, "steps": steps}


def test_twenty_steps_lower_the_loss(reference):
  losses = reference["losses"]
  assert reference["steps"] == list(range(1, STEPS + 1))
  assert np.all(np.isfinite(losses))
  # Uniform prediction over V=8192 is ln(8192) = 9.01; 20 steps at lr 1e-2 learn unigrams.
  assert losses[:3].mean() > 8.5
  assert losses[-3:].mean() < losses[:3].mean() - 1.0
  assert reference["final"]["eval_loss"] < losses[0] - 1.0


def _saved_state(workdir, step):
  """{path: array} of the orbax state saved at `step` (host arrays, no model needed)."""
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _start_trainer(workdir, **overrides):
  """`train_and_evaluate(_config(**overrides), workdir)` in a subprocess; (process, its lines)."""
  code = ("import json, sys; from tests.test_train import _config; from engram_jax import train; "
          "train.train_and_evaluate(_config(**json.loads(sys.argv[2])), sys.argv[1])")
  proc = subprocess.Popen([sys.executable, "-c", code, workdir, json.dumps(overrides)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
  return proc, lines


def _kill_at_a_random_moment(proc, lines, workdir, rng):
  """kill -9 during the save of a random checkpoint step (inside orbax's write, or between it
  and the checksums), or, if that moment is missed, right after that step's log line."""
  target = int(rng.choice([12, 14, 16, 18]))
  mode = str(rng.choice(["orbax write", "before checksums"]))
  ckpts = os.path.join(workdir, "checkpoints")
  while proc.poll() is None:
    names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
    if mode == "orbax write" and any(n.startswith(f"{target}.orbax-checkpoint-tmp") for n in names):
      break
    if mode == "before checksums" and str(target) in names and not os.path.exists(
        os.path.join(ckpts, str(target), checkpoint.CHECKSUMS)):
      break
    if any(f"step {target + 1}/" in l for l in lines):
      mode = "after its step"
      break
    time.sleep(0.0005)
  assert proc.poll() is None, "the trainer finished before it could be killed:\n" + "".join(lines)
  proc.kill()  # SIGKILL
  proc.wait()
  return target, mode


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(reference, tmp_path, capsys):
  workdir = str(tmp_path)
  # "Kill": a NaN injected at step 13 stops the run; the checkpoint of step 10 survives.
  with pytest.raises(train.TrainingDivergedError,
                     match=r"non-finite loss at step 13.*last good checkpoint is step 10"):
    train.train_and_evaluate(_config(**{"train.inject_nan_at_step": 13}), workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint={},
                                 save_every=1, keep=5)
  assert ckpt.latest_step() == 10
  ckpt.close()
  # A real kill -9 of a resumed run (checkpoints every 2 steps) at a random moment of a save.
  # While it runs, a second trainer on the workdir is refused at once, naming it.
  proc, lines = _start_trainer(workdir, **{"train.checkpoint_every": 2})
  lock_path = os.path.join(workdir, workdir_lib.LOCK_NAME)
  while proc.poll() is None and not (os.path.exists(lock_path) and
                                     f'"pid": {proc.pid}' in open(lock_path).read()):
    time.sleep(0.01)
  with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"in use by pid {proc.pid} on host"):
    train.train_and_evaluate(_config(), workdir)
  rng = np.random.default_rng(0)
  target, mode = _kill_at_a_random_moment(proc, lines, workdir, rng)
  # A second resumed run takes over the dead trainer's lock, and is killed at a random moment
  # after it compiled (if it has not finished by then).
  proc2, lines2 = _start_trainer(workdir)
  while proc2.poll() is None and not any("compiled in" in l for l in lines2):
    time.sleep(0.01)
  time.sleep(float(rng.uniform(0.0, 1.0)))
  killed2 = proc2.poll() is None
  proc2.kill()
  proc2.wait()
  assert any(f"taking over the stale lock of {workdir}: held by pid {proc.pid}" in l
             for l in lines2), "".join(lines2)
  # Restart with the same config: resumes from the newest intact checkpoint (state, data
  # position and RNG).
  capsys.readouterr()
  train.train_and_evaluate(_config(), workdir)
  out = capsys.readouterr().out
  if killed2:
    assert f"taking over the stale lock of {workdir}: held by pid {proc2.pid}" in out
  records = workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  starts = [r for r in records if r["split"] == "start"]
  assert [s["resumed_from"] for s in starts[:2]] == [None, 10]
  assert len(starts) == 4 and all(s["resumed_from"] >= 10 for s in starts[1:])
  resumed = [r for r in records if r["split"] == "train" and r["step"] > 10]
  assert [r["step"] for r in resumed] == list(range(11, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in resumed], reference["losses"][10:],
                             rtol=1e-6, atol=0)
  # Bit-identical final state (every array of the step-20 checkpoint).
  got, want = _saved_state(workdir, STEPS), _saved_state(reference["workdir"], STEPS)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} ({target}, {mode})")


def _copy(reference, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference["workdir"], workdir)
  return workdir


def _snapshot(workdir):
  return {os.path.relpath(os.path.join(r, n), workdir): open(os.path.join(r, n), "rb").read()
          for r, _, ns in os.walk(workdir) for n in ns}


def test_nonfinite_state_is_never_saved(reference, tmp_path):
  # Checkpoint 20 rewritten with a negative Adam second moment: finite, but step 21's update
  # (sqrt of it) is NaN while its loss and gradient norm, computed before the update, are
  # finite. (An inf learning rate did this; the config check now refuses one at load time.)
  workdir = _copy(reference, tmp_path)
  config = _config()
  exp, _, abstract = train.setup(config, check_data=False)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 fingerprint=exp.fingerprint(), save_every=1, keep=5,
                                 async_save=False)
  train_iter, _ = data_lib.make_datasets(
      list(exp.train_files), list(exp.eval_files), tokenizer_path=exp.tokenizer_path,
      seq_len=config.data.seq_len, batch_size=config.data.batch_size,
      seed=config.data.shuffle_seed, engram_hash_fn=train.engram_hash_fn(exp, False))
  state = ckpt.restore(STEPS, abstract, train_iter)
  poisoned = jax.tree_util.tree_map_with_path(
      lambda p, x: -jnp.ones_like(x) if ".nu" in jax.tree_util.keystr(p) else x,
      state.opt_state)
  assert checkpoint.nonfinite_leaves(poisoned) == []
  ckpt.set_aside([STEPS], "original")
  ckpt.save(STEPS, state.replace(opt_state=poisoned), train_iter, force=True)
  ckpt.close()
  with pytest.raises(train.TrainingDivergedError,
                     match=r"non-finite train state after step 21 \(\['params'\].*not saving it"
                           r".*last good checkpoint is step 20"):
    train.train_and_evaluate(_config(**{"train.num_steps": 22, "train.checkpoint_every": 1}),
                             workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "10", "20", checkpoint.CHECKSUMS_MARKER]


def test_refused_resume_leaves_the_workdir_untouched(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.ConfigChangedError) as e:
    train.train_and_evaluate(_config(**{"data.batch_size": 8, "engram.segment_reset": False,
                                        "model.ffn_hidden_size": 96}), workdir)
  for field in ("data.batch_size: 4 -> 8", "engram.segment_reset: true -> false",
                "model.ffn_hidden_size: 64 -> 96"):
    assert field in str(e.value)
  assert _snapshot(workdir) == before  # config.json, configs/, metrics.jsonl, lock: unchanged


def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(reference, tmp_path, capsys):
  workdir = _copy(reference, tmp_path)
  data_dir = os.path.join(workdir, "checkpoints", str(STEPS), "state", "d")
  victim = max((os.path.join(data_dir, n) for n in os.listdir(data_dir)), key=os.path.getsize)
  with open(victim, "r+b") as f:  # 8 bytes overwritten inside an array file
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\x00\xc0\x7f\xff" * 2)
  train.train_and_evaluate(_config(), workdir)
  warnings = [l for l in capsys.readouterr().out.splitlines() if "WARNING" in l]
  assert len(warnings) == 1
  assert f"checkpoint step {STEPS} is damaged, resuming from step 10 instead" in warnings[0]
  assert victim in warnings[0]
  records = workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  start = [r for r in records if r["split"] == "start"][-1]
  assert start["resumed_from"] == 10 and start["config"] == os.path.join("configs",
                                                                          "config_1.json")
  assert list(start["set_aside"]) == [str(STEPS)]
  assert os.path.isdir(os.path.join(workdir, checkpoint.SET_ASIDE_DIR, f"{STEPS}_damaged"))
  resumed = [r["loss"] for r in records if r["split"] == "train" and r["step"] > 10]
  np.testing.assert_allclose(resumed, reference["losses"][10:], rtol=1e-6, atol=0)
  got, want = _saved_state(workdir, STEPS), _saved_state(reference["workdir"], STEPS)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_eval_refuses_nonfinite_parameters(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  config = evaluate.load_workdir_config(workdir)
  exp, _, abstract = train.setup(config, check_data=False)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 fingerprint=exp.fingerprint(), save_every=1, keep=5,
                                 async_save=False)
  state = ckpt.restore(STEPS, abstract)
  ckpt.save(STEPS + 1, state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)),
            force=True)
  ckpt.close()
  valid = data_lib.default_corpus_paths()["valid"]
  r = subprocess.run([sys.executable, "-m", "experiments.eval", f"--workdir={workdir}",
                      f"--data={valid[0]}", "--num_batches=1"], cwd=REPO, capture_output=True,
                     text=True)
  assert r.returncode != 0
  assert re.search(rf"checkpoint step {STEPS + 1} in .* holds non-finite parameters "
                   r"\(\['params'\]", r.stderr), r.stderr[-2000:]


def test_restoring_with_a_different_hash_is_refused(reference, tmp_path):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference["workdir"], workdir)
  with pytest.raises(checkpoint.FingerprintMismatchError, match=r"hash\.multipliers|hash\.seed"):
    train.train_and_evaluate(_config(**{"engram.seed": 1}), workdir)


def test_dense_adam_tables_track_lazy_adam(reference, tmp_path):
  train.train_and_evaluate(_config("dense_adam"), str(tmp_path))
  dense, _ = _losses(str(tmp_path))
  lazy = reference["losses"]
  # Step 1 is identical (same init, same rows touched, both bias-corrected with t=1); step 2
  # differs only through float summation order. Later, dense Adam keeps moving rows not in
  # the batch with their stale momentum and lazy Adam does not, so curves drift apart slowly.
  np.testing.assert_allclose(dense[:2], lazy[:2], rtol=1e-5)
  np.testing.assert_allclose(dense, lazy, rtol=0.05)


def test_hash_on_device_equals_pipeline_hashing(reference, tmp_path):
  train.train_and_evaluate(_config(**{"engram.hash_on_device": True, "train.num_steps": 5}),
                           str(tmp_path))
  on_device, _ = _losses(str(tmp_path))
  np.testing.assert_allclose(on_device, reference["losses"][:5], rtol=1e-5)


def test_two_device_data_mesh_matches_one_device(reference, tmp_path):
  train.train_and_evaluate(_config(**{"train.mesh.data": 2, "train.num_steps": 5}),
                           str(tmp_path))
  dp, _ = _losses(str(tmp_path))
  np.testing.assert_allclose(dp, reference["losses"][:5], rtol=1e-4)


def test_eval_cli_library_matches_final_eval(reference):
  valid = data_lib.default_corpus_paths()["valid"]
  m = train.evaluate_workdir(reference["workdir"], valid, num_batches=2)
  assert m["step"] == STEPS
  np.testing.assert_allclose(m["eval_loss"], reference["final"]["eval_loss"], rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="no/such/file.txt"):
    train.evaluate_workdir(reference["workdir"], ["no/such/file.txt"])


def test_checkpoint_holds_moved_router_biases_and_sparse_table_state(reference):
  config = evaluate.load_workdir_config(reference["workdir"])
  _, state, step = train.restore_for_eval(config, reference["workdir"])
  assert step == STEPS and int(state.step) == STEPS
  biases = [np.asarray(x) for x in jax.tree.leaves(state.model_state)]
  assert biases and any(np.abs(b).max() > 0 for b in biases)  # aux-free balancing moved them
  (table_opt,) = state.table_opt.values()
  # Lazy Adam touched some rows (count > 0) and not others (count == 0).
  counts = np.asarray(table_opt.count_R)
  assert counts.max() > 0 and (counts == 0).any()


# ---- compiled train step: table-sized work is only in-place row scatters and row gathers ------

# Opcodes that may produce or consume a table-sized [R, ...] value in the compiled sparse step.
# gather: U rows out of a table (output is not R-sized); scatter: in place into a donated table;
# fusion: only as a wrapper of those (its computation is checked too, and an R-sized fusion
# output must be a scatter's); the rest only pass buffers through.
_ROW_SIZED_OK = {"parameter", "gather", "scatter", "fusion", "tuple", "get-tuple-element",
                 "bitcast"}


def _hlo_computations(text):
  """{name: [instruction dict]} of an HLO module's text (shapes, opcode, operands, callees)."""
  comps, current = {}, None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$", line)
    if head:
      current = comps.setdefault(head.group(1), [])
      continue
    m = re.match(r"^\s*(ROOT )?%(\S+) = (.*)$", line)
    if current is None or not m:
      continue
    rest, depth = m.group(3), 0
    if rest.startswith("("):  # tuple shape
      for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
          shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
          break
    else:
      shape, rest = rest.split(" ", 1)
    opcode = re.match(r"([\w-]+)\(", rest).group(1)
    for i, ch in enumerate(rest[len(opcode):], len(opcode)):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    current.append(dict(root=bool(m.group(1)), name=m.group(2), shape=shape, opcode=opcode,
                        operands=re.findall(r"%([\w.\-]+)", rest[len(opcode):i + 1]),
                        calls=re.findall(r"calls=%([\w.\-]+)", rest[i:]), line=line.strip()))
  return comps


def _row_sized(shape, sizes):
  return any(int(d) in sizes for dims in re.findall(r"[a-z]\w*\[([\d,]+)\]", shape)
             for d in dims.split(","))


def _row_sized_violations(hlo_text, sizes):
  """Instructions of any computation that produce or read a value with a dimension in `sizes`
  other than gathers of rows, in-place scatters and buffer plumbing (see _ROW_SIZED_OK)."""
  comps = _hlo_computations(hlo_text)
  bad = []
  for instrs in comps.values():
    shapes = {x["name"]: x["shape"] for x in instrs}
    for x in instrs:
      out_r = _row_sized(x["shape"], sizes)
      in_r = [o for o in x["operands"] if _row_sized(shapes.get(o, ""), sizes)]
      if not (out_r or in_r):
        continue
      if x["opcode"] not in _ROW_SIZED_OK:
        bad.append(x["line"])
      elif x["opcode"] == "gather" and (out_r or x["operands"][0] not in in_r):
        bad.append(x["line"])  # a gather must read rows of a table and return U rows
      elif x["opcode"] == "scatter" and x["operands"][0] not in in_r:
        bad.append(x["line"])
      elif x["opcode"] == "fusion" and out_r:
        roots = [y for c in x["calls"] for y in comps[c] if y["root"]]
        if not roots or any(y["opcode"] != "scatter" for y in roots):
          bad.append(x["line"])
  return bad


def _compiled_train_step(kind, **overrides):
  # ~16M rows per table (only compiled, never allocated): R and R*E collide with no other
  # dimension of the tiny model, and one table's smallest state array (the int32 per-row
  # counts, 64 MB) is larger than all of the step's temporaries together.
  config = _config(kind, **{"engram.engram_vocab_size": (4_000_037, 4_000_037), **overrides})
  exp, trainer, abstract = train.setup(config, check_data=False)
  train_c, _, _ = trainer.compile(abstract, trainer.shapes)
  return exp, abstract, train_c


@pytest.mark.parametrize("kind,overrides", [
    ("lazy_adam", {}),
    ("adagrad", {}),
    ("lazy_adam", {"table_optim.moment_dtype": "bfloat16", "table_optim.weight_decay": 0.1,
                   "table_optim.bias_correction": "global", "engram.hash_on_device": True}),
])
def test_sparse_train_step_touches_tables_only_in_place(kind, overrides):
  # A sparse step's cost must not grow with the table: no copy, reduce, broadcast, select,
  # full-table update, sort... of a table, its moments or its per-row counts; only the gathers
  # of the batch's rows and the scatters that write them back, in place into donated buffers.
  exp, abstract, train_c = _compiled_train_step(kind, **overrides)
  (num_rows,) = {exp.hashing.num_rows(l) for l in exp.model.engram.layer_ids}
  width = exp.model.engram.head_dim
  sizes = {num_rows, num_rows * width}
  others = [x.shape for x in jax.tree.leaves((abstract.params, abstract.opt_state))]
  assert not any(d in sizes for shape in others for d in shape)
  hlo = train_c.as_text()
  assert _row_sized_violations(hlo, sizes) == []
  comps = _hlo_computations(hlo)
  scatters = [x for c in comps.values() for x in c
              if x["opcode"] == "scatter" and _row_sized(x["shape"], sizes)]
  table_leaves = jax.tree.leaves((abstract.tables, abstract.table_opt))
  assert len(scatters) == len(table_leaves)  # one row scatter per table / state array
  # Donation: every state buffer, tables and optimiser state included, is aliased to its output
  # (an unaliased table would be copied whole every step).
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  stats = train_c.memory_analysis()
  assert stats.alias_size_in_bytes == state_bytes
  header = hlo.splitlines()[0]
  entry = comps[re.search(r"^ENTRY %(\S+) ", hlo, re.M).group(1)]
  row_params = [int(re.search(r"parameter\((\d+)\)", x["line"]).group(1)) for x in entry
                if x["opcode"] == "parameter" and _row_sized(x["shape"], sizes)]
  assert len(row_params) == len(table_leaves)
  for p in row_params:
    assert re.search(rf"\}}: \({p}, \{{\}}, may-alias\)", header), f"parameter {p} not aliased"
  assert stats.temp_size_in_bytes < min(x.size * x.dtype.itemsize for x in table_leaves)


def test_row_sized_check_flags_dense_adam_tables():
  # The check above is not vacuous: dense Adam on a table in the params reads and rewrites it.
  exp, _, train_c = _compiled_train_step("dense_adam")
  (num_rows,) = {exp.hashing.num_rows(l) for l in exp.model.engram.layer_ids}
  bad = _row_sized_violations(train_c.as_text(),
                              {num_rows, num_rows * exp.model.engram.head_dim})
  assert any(re.search(r" (multiply|add|sqrt|divide|broadcast)\(", line) for line in bad)


def test_capacity_dispatch_trains_and_logs_dropped_pairs(tmp_path):
  # A capacity factor of 0.5 cannot hold every routed pair, so the log must report drops.
  c = _config(**{"model.moe.dispatch": "capacity", "model.moe.capacity_factor": 0.5,
                 "train.num_steps": 3, "train.checkpoint_every": 3})
  train.train_and_evaluate(c, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  dropped = [r["router/dropped_fraction"] for r in recs if r["split"] == "train"]
  assert len(dropped) == 3
  assert all(0.0 < d < 1.0 for d in dropped)
  assert all(np.isfinite(r["loss"]) for r in recs if r["split"] == "train")

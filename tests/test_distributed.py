"""`distributed.launch_local` reports a failed job: the process killed by a signal is named and
gives the exit status, also when its peer fails right after it (its collectives broke) and both
have ended before the launcher looks; a job whose processes all succeed exits 0."""

import io
import os
import sys
import textwrap

from engram_jax import distributed

# Process 1 kills itself; process 0 waits until it is gone, then fails as a broken peer would.
_JOB = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["ENGRAM_PROCESS_ID"])
    mark = os.path.join(sys.argv[1], "p1_started")
    if sys.argv[2] == "ok":
        print(f"rank {rank} done")
        sys.exit(0)
    if rank == 1:
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    while not os.path.exists(mark):
        time.sleep(0.01)
    time.sleep(0.05)
    print("peer lost", flush=True)
    sys.exit(1)
""")


def _launch(tmp_path, mode, monkeypatch):
  (tmp_path / "fake_job.py").write_text(_JOB)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = io.StringIO()
  status = distributed.launch_local(2, 1, [str(tmp_path), mode], module="fake_job", out=out)
  return status, out.getvalue()


def test_the_signalled_process_is_named_and_gives_the_status(tmp_path, monkeypatch):
  for _ in range(3):  # the peer's exit races the launcher's poll; every order must report it
    for f in tmp_path.glob("p1_started"):
      f.unlink()
    status, out = _launch(tmp_path, "fail", monkeypatch)
    assert status == -9, out
    assert "[launch_local] process 1 exited with -9" in out, out


def test_a_job_that_succeeds_exits_zero_with_prefixed_output(tmp_path, monkeypatch):
  status, out = _launch(tmp_path, "ok", monkeypatch)
  assert status == 0, out
  assert "[p0] rank 0 done" in out and "[p1] rank 1 done" in out, out
  assert "[launch_local]" not in out, out

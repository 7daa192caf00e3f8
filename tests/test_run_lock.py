"""One run at a time in a run folder: a live run holds its lock, a killed one does not, and taking the lock
sweeps the temporary files that killed writers left behind."""
import os
import signal
import subprocess
import sys
import time

import pytest

from cllm.run_folder import RunFolderBusy, hold

pytestmark = pytest.mark.timeout(120)

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
ARGS = ["--tokenizer", "char", "--dim", "16", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size",
        "4", "--eval-every", "1000", "--eval-batches", "1", "--threads", "1", "--no-progress"]


def train_model(corpus, out, *args, **popen):
    return subprocess.Popen([sys.executable, "-m", "cllm.tools.train_model", str(corpus), "--out", str(out), *ARGS,
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_the_lock_names_its_holder_and_keeps_a_second_holder_out(tmp_path):
    with hold(tmp_path / "run"):
        assert (tmp_path / "run" / "lock").read_text().startswith(f"process {os.getpid()} on ")
        with pytest.raises(RunFolderBusy, match=rf"run is in use by another training run \(process {os.getpid()} "):
            with hold(tmp_path / "run"):
                pass
    with hold(tmp_path / "run"):  # released when its holder leaves
        pass


def test_a_live_run_keeps_a_second_one_out_and_a_killed_one_does_not(tmp_path):
    corpus, out = tmp_path / "text.txt", tmp_path / "run"
    corpus.write_text(TEXT)
    # The live run hangs in step 2 until it is killed: its step deadline is far away. Its 2 spheres both have rows
    # (of 4 rows cut 12 ways, sphere 0 would have none, and its fault would never fire).
    live = train_model(corpus, out, "--steps", 50, "--step-timeout", 600, "--spheres", 2,
                       env={**os.environ, "CLLM_FAULT": "stall:0:2"})
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert live.poll() is None, live.communicate()
            assert time.monotonic() < deadline, "the live run made no progress"
            time.sleep(0.05)
        second = train_model(corpus, out, "--steps", 2)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "Traceback" not in err, err
        assert err.strip().splitlines() == [f"train_model: error: {out} is in use by another training run "
                                            f"(process {live.pid} on {os.uname().nodename}): let it finish, stop "
                                            f"it, or choose another --out"]
    finally:
        live.send_signal(signal.SIGKILL)
        live.communicate(timeout=30)
    after = train_model(corpus, out, "--steps", 2)  # the kernel released the killed run's lock
    _, err = after.communicate(timeout=60)
    assert after.returncode == 0, err


def test_taking_the_folder_sweeps_temporaries_whose_writers_are_gone(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "notes").mkdir()
    stale = [run / "model.cllm.tmp-4242-0badf00d", run / "data" / "train.tokens.tmp-4242-cafe0123",
             run / "metrics.jsonl.tmp-17"]
    kept = [run / "notes" / "draft.tmp-1-00000000", run / "model.cllm"]  # not a run folder's own, not a temporary
    for path in stale + kept:
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in stale + kept:
        os.utime(path, (an_hour_ago, an_hour_ago))
    with hold(run):
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in kept)

"""Stalls raise, nothing hangs; signals stop at a step boundary with a checkpoint; any thread count, same bits.

Every test here runs under a hard timeout, so a hang fails instead of blocking the suite.
"""
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import anyio
import numpy as np
import pytest

from cllm.checkpoint import load_model
from cllm.data import prepare
from cllm.model import GPT, ModelConfig
from cllm.spheres import Fault, SphereFailedError, SphereStalledError, Spheres, default_spheres, parse_faults
from cllm.threads import busy_daemon_threads
from cllm.trainer import StepDeadline, Trainer, TrainSettings

pytestmark = pytest.mark.timeout(120)

CFG = ModelConfig(vocab_size=30, context_length=16, dim=16, n_layers=2, n_heads=2)
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


def batch(B=12, seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, 17)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def wait_for_no_workers(limit=5.0):
    """How many worker calls still run after up to `limit` seconds (0 once every abandoned one has ended)."""
    deadline = time.monotonic() + limit
    while busy_daemon_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return busy_daemon_threads()


@pytest.mark.parametrize("threads,sphere,step", [(1, 0, 1), (1, 7, 3), (2, 3, 2), (2, 11, 1), (8, 5, 4)])
def test_stall_raises_within_the_deadline(threads, sphere, step):
    model = GPT(CFG)
    x, y = batch()
    timeout = 1.0
    with Spheres(model, spheres=12, threads=threads, faults=[Fault("stall", sphere, step)]) as sp:

        async def steps():
            for s in range(1, step + 1):
                await sp.step(x, y, step=s, timeout=timeout)

        started = time.monotonic()
        with pytest.raises(SphereStalledError) as info:
            anyio.run(steps)
        elapsed = time.monotonic() - started
    assert elapsed < timeout * step + 2.0
    message = str(info.value)
    assert f"step {step} " in message and f"sphere {sphere} " in message and "heartbeat: forward" in message
    assert wait_for_no_workers() == 0  # the stalled worker saw the stop flag and ended


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_worker_exception_names_the_sphere(threads):
    model = GPT(CFG)
    with Spheres(model, spheres=4, threads=threads, faults=[Fault("raise", 2, 1)]) as sp:
        with pytest.raises(SphereFailedError, match=r"sphere 2 \(batch rows 6:9\) failed at step 1: RuntimeError"):
            anyio.run(partial(sp.step, *batch(), step=1, timeout=30))
    assert wait_for_no_workers() == 0


def test_a_real_error_in_a_worker_propagates():
    model = GPT(CFG)
    x, y = batch()
    x[7, 3] = CFG.vocab_size  # out of range: the embedding kernel's boundary check raises in sphere 7
    with Spheres(model, spheres=12, threads=3) as sp:
        with pytest.raises(SphereFailedError, match=r"sphere 7 .*ValueError: token id 30"):
            anyio.run(partial(sp.step, x, y, step=1))


HUNG_SPHERE = """
import sys, anyio, numpy as np
from cllm.model import GPT, ModelConfig
from cllm.spheres import Fault, SphereStalledError, Spheres
model = GPT(ModelConfig(vocab_size=30, context_length=16, dim=16, n_layers=2, n_heads=2))
ids = np.random.default_rng(0).integers(0, 30, (4, 17)).astype(np.int32)
with Spheres(model, spheres=4, threads=2, faults=[Fault("hang", 1, 1)]) as spheres:
    try:
        anyio.run(lambda: spheres.step(ids[:, :-1], ids[:, 1:], step=1, timeout=2))
    except SphereStalledError as e:
        print(e, flush=True)
        sys.exit(1)
"""


def test_a_sphere_hung_in_native_code_does_not_keep_the_process_alive():
    # The hang fault blocks forever without the GIL and never looks at the stop flag, as a deadlocked kernel
    # would. The step is given up at its deadline, and the process must then be able to exit.
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", HUNG_SPHERE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "step 1 missed its 2 s deadline: sphere 1" in r.stdout
    assert time.monotonic() - started < 30


def test_a_stall_retires_the_buffers_its_workers_may_still_write():
    model = GPT(CFG)
    x, y = batch()
    with Spheres(model, spheres=4, threads=2, faults=[Fault("hang", 2, 1)]) as sp:
        with pytest.raises(SphereStalledError):
            anyio.run(partial(sp.step, x, y, step=1, timeout=1))
        assert sp.retired == 1
        # The hung worker still holds step 1's buffers; step 2 runs on new ones and gives the right gradient.
        loss = anyio.run(partial(sp.step, x, y, step=2, timeout=30))
    reference = GPT(CFG)
    assert np.isclose(loss, reference.forward(x, y), rtol=1e-5)
    reference.backward()
    np.testing.assert_allclose(model.grads, reference.grads, rtol=1e-4, atol=1e-6)


def test_fault_spec():
    assert parse_faults("stall:3:5, raise:0:2, hang:1:1") == [Fault("stall", 3, 5), Fault("raise", 0, 2), Fault("hang", 1, 1)]
    # The serving engine's entries share the variable, and are left to it.
    assert parse_faults("hang:embed:1, stall:0:2, raise:decode:3") == [Fault("stall", 0, 2)]
    for bad in ["stall:3", "freeze:1:1", "stall:x:1"]:
        with pytest.raises(ValueError, match="bad fault"):
            parse_faults(bad)


@pytest.mark.parametrize("batch,seq,spheres", [(12, 64, 2), (8, 256, 4), (4, 256, 2), (16, 128, 4), (1, 1024, 1),
                                               (12, 16, 1), (6, 1024, 2), (64, 1024, 64)])
def test_default_spheres_are_the_most_equal_shards_of_enough_tokens(batch, seq, spheres):
    assert default_spheres(batch, seq) == spheres
    assert batch % spheres == 0 and spheres & (spheres - 1) == 0


def test_deadline_policy():
    assert StepDeadline(5.0).seconds == 5.0
    auto = StepDeadline()
    assert auto.seconds == StepDeadline.FIRST
    for _ in range(5):
        auto.record(0.1)
    assert auto.seconds == StepDeadline.FLOOR
    for _ in range(20):
        auto.record(4.0)
    assert auto.seconds == 100.0


# ------------------------------------------------------------------------------------- determinism end to end


def run_training(tmp_path, threads, steps=6, *, batch_size=12, context=16, spheres=12):
    (tmp_path / "text.txt").write_text(TEXT)
    prepared = prepare(tmp_path / "text.txt", tmp_path / "data", tokenizer="char", log=lambda *a: None)
    cfg = ModelConfig(vocab_size=prepared.tokenizer.vocab_size, context_length=context, dim=16, n_layers=2,
                      n_heads=2)
    model = GPT(cfg, seed=3)
    settings = TrainSettings(steps=steps, batch_size=batch_size, warmup=2, eval_every=3, eval_batches=2,
                             checkpoint_every=100, threads=threads, spheres=spheres)
    run_dir = tmp_path / f"run{threads}"
    anyio.run(Trainer(model, prepared.tokenizer, prepared.train, prepared.val, settings, run_dir,
                      progress=False).run)
    losses = [(r["loss"], r.get("val_loss")) for r in map(json.loads, (run_dir / "metrics.jsonl").open())]
    return losses, model.params.copy()


def test_training_is_bit_identical_for_any_thread_count(tmp_path):
    base_losses, base_params = run_training(tmp_path, 1)
    for threads in (2, 3, 8, 12):
        losses, params = run_training(tmp_path, threads)
        assert losses == base_losses and np.array_equal(params, base_params), threads


def test_the_default_sharding_is_bit_identical_for_any_thread_count(tmp_path):
    # 8 rows of 96 tokens: the default cuts 2 spheres, whatever the thread count.
    assert default_spheres(8, 96) == 2
    run = partial(run_training, tmp_path, batch_size=8, context=96, spheres=None, steps=4)
    base_losses, base_params = run(1)
    for threads in (2, 3, 8, 64):
        losses, params = run(threads)
        assert losses == base_losses and np.array_equal(params, base_params), threads


# ------------------------------------------------------------------------------- the real tool, as a process

# 12 spheres of one row each: the faults below name spheres that must have rows (the default would cut 1).
TRAIN_ARGS = ["--tokenizer", "char", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "32",
              "--batch-size", "12", "--spheres", "12", "--eval-every", "1000", "--eval-batches", "1", "--threads", "2",
              "--no-progress"]


def start_training(corpus, out, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "cllm.tools.train_model", str(corpus), "--out", str(out),
                             *TRAIN_ARGS, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def wait_for_steps(out, n, proc, limit=60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training made no progress")


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_then_resume_is_bit_exact(tmp_path, sig, status):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    steps = 400  # far more than will run before the signal
    proc = start_training(corpus, tmp_path / "a", "--steps", steps, "--checkpoint-every", 1000)
    wait_for_steps(tmp_path / "a", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "checkpoint written" in err and "Traceback" not in err
    stopped_at = int(load_model_step(tmp_path / "a"))
    assert stopped_at >= 3
    # Resume to a few steps past the stop, and compare with a straight run to the same step.
    target = stopped_at + 3
    for out_dir, extra in [(tmp_path / "a", ["--resume"]), (tmp_path / "b", [])]:
        r = subprocess.run([sys.executable, "-m", "cllm.tools.train_model", str(corpus), "--out", str(out_dir),
                            *TRAIN_ARGS, "--steps", str(steps), "--stop-after", str(target), *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    a, _ = load_model(tmp_path / "a" / "model.cllm")
    b, _ = load_model(tmp_path / "b" / "model.cllm")
    assert np.array_equal(a.params, b.params)


def load_model_step(run_dir):
    from cllm.checkpoint import read_metadata
    return read_metadata(run_dir / "model.cllm")["step"]


def test_second_interrupt_exits_at_once_and_keeps_the_checkpoint(tmp_path):
    corpus, out = tmp_path / "text.txt", tmp_path / "run"
    corpus.write_text(TEXT)
    # Step 4 stalls until its 600 s deadline, so the first signal's stop at the next step boundary cannot come:
    # only a second signal that ends the process at once can end it within the minute waited for below.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cllm.tools.train_model", str(corpus), "--out", str(out),
                                 *TRAIN_ARGS, "--steps", "100", "--checkpoint-every", "2", "--step-timeout", "600"],
                                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "CLLM_FAULT": "stall:0:4"})
    try:
        wait_for_steps(out, 3, proc)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30  # two signals sent at once could be handled as one
        while "stopping after this step" not in (tmp_path / "stderr.txt").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the first SIGINT was not noticed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err
    assert "checkpoint written" not in err  # it did not wait for the step to end
    assert load_model_step(out) == "2"  # the last checkpoint is whole
    load_model(out / "model.cllm")


@pytest.mark.parametrize("kind", ["stall", "hang"])
def test_stalled_tool_exits_soon_with_the_checkpoint_intact(tmp_path, kind):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cllm.tools.train_model", str(corpus), "--out", str(tmp_path),
                        *TRAIN_ARGS, "--steps", "50", "--checkpoint-every", "2", "--step-timeout", "3"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "CLLM_FAULT": f"{kind}:4:5"})
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - started < 30
    assert "step 5 missed its 3 s deadline: sphere 4" in r.stderr and "Traceback" not in r.stderr
    assert load_model_step(tmp_path) == "4"
    load_model(tmp_path / "model.cllm")

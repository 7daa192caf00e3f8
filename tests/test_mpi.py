"""Scale-out over MPI: 2 ranks x 6 spheres give the bits of 1 rank x 12; a failing rank ends the whole job.

Runs real `mpiexec -n 2` jobs on localhost under `python -m mpi4py`; skipped where mpi4py or mpiexec is missing
(`pip install -e '.[mpi]'` brings both).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cllm.checkpoint import load_model, read_metadata

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or shutil.which("mpiexec") is None,
                       reason="needs mpi4py and mpiexec (pip install -e '.[mpi]')"),
]

TEXT = "".join(f"{i}: the rain in spain stays mainly in the plain, said the professor.\n" for i in range(300))
ARGS = ["--tokenizer", "char", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "32", "--batch-size",
        "12", "--eval-every", "3", "--eval-batches", "2", "--threads", "1", "--spheres", "12", "--no-progress"]


def train(tmp_path, out, ranks, *extra, env=None, args=ARGS):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    command = [sys.executable, "-m", "cllm.tools.train_model", str(corpus), "--out", str(tmp_path / out), *args,
               *extra]
    if ranks:
        command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py", *command[1:], "--distributed", "mpi"]
    return subprocess.run(command, capture_output=True, text=True, timeout=150, env={**os.environ, **(env or {})})


def test_two_ranks_give_the_bits_of_one(tmp_path):
    one = train(tmp_path, "one", 0, "--steps", "8")
    two = train(tmp_path, "two", 2, "--steps", "8")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, _ = load_model(tmp_path / "one" / "model.cllm")
    b, _ = load_model(tmp_path / "two" / "model.cllm")
    assert np.array_equal(a.params, b.params)
    assert (tmp_path / "one" / "metrics.jsonl").read_text().count("val_loss") == 3
    strip = lambda p: [line.split(', "tokens_per_s"')[0] for line in p.read_text().splitlines()]
    assert strip(tmp_path / "one" / "metrics.jsonl") == strip(tmp_path / "two" / "metrics.jsonl")
    assert "distributed: 2 ranks x 6 spheres" in two.stdout and two.stdout.count("sample:") == 1


@pytest.mark.parametrize("arch, extra", [("llama", []), ("qwen3", ["--head-dim", "8"])])
def test_a_llama_family_model_on_two_ranks_gives_the_bits_of_one(tmp_path, arch, extra):
    args = [*ARGS, "--arch", arch, "--kv-heads", "1", *extra]
    one = train(tmp_path, "one", 0, "--steps", "4", args=args)
    two = train(tmp_path, "two", 2, "--steps", "4", args=args)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, _ = load_model(tmp_path / "one" / "model.cllm")
    b, _ = load_model(tmp_path / "two" / "model.cllm")
    assert a.config.arch == arch and np.array_equal(a.params, b.params)


def test_two_ranks_share_the_default_sharding_bit_for_bit(tmp_path):
    # No --spheres: 12 rows of 64 tokens are cut into 2 spheres (spheres.default_spheres), one per rank.
    args = list(ARGS)
    del args[args.index("--spheres"):args.index("--spheres") + 2]
    args[args.index("--context") + 1] = "64"
    one = train(tmp_path, "one", 0, "--steps", "4", args=args)
    two = train(tmp_path, "two", 2, "--steps", "4", args=args)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "distributed: 2 ranks x 1 spheres" in two.stdout
    a, _ = load_model(tmp_path / "one" / "model.cllm")
    b, _ = load_model(tmp_path / "two" / "model.cllm")
    assert np.array_equal(a.params, b.params)


def test_resume_across_ranks(tmp_path):
    assert train(tmp_path, "a", 2, "--steps", "8", "--stop-after", "4").returncode == 0
    resumed = train(tmp_path, "a", 2, "--steps", "8", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = train(tmp_path, "b", 0, "--steps", "8")
    assert straight.returncode == 0
    a, _ = load_model(tmp_path / "a" / "model.cllm")
    b, _ = load_model(tmp_path / "b" / "model.cllm")
    assert np.array_equal(a.params, b.params)


@pytest.mark.parametrize("fault,message", [("raise:7:3", "rank 1: sphere 7"), ("stall:2:3", "rank 0: step 3"),
                                           ("hang:2:3", "rank 0: step 3")])
def test_one_failing_rank_ends_the_job(tmp_path, fault, message):
    started = time.monotonic()
    r = train(tmp_path, "run", 2, "--steps", "50", "--checkpoint-every", "2", "--step-timeout", "4",
              env={"CLLM_FAULT": fault})
    assert r.returncode != 0
    assert time.monotonic() - started < 60
    assert message in r.stderr
    assert read_metadata(tmp_path / "run" / "model.cllm")["step"] == "2"  # the last checkpoint is whole


def test_rank_count_must_split_the_tree(tmp_path):
    r = train(tmp_path, "run", 3, "--steps", "2")
    assert r.returncode != 0 and "power of two" in r.stderr


def two_ranks(tmp_path, rank0_args, rank1_args):
    """An MPMD job: rank 0 and rank 1 run train_model with different arguments. Neither mpiexec's cleanup nor
    mpi4py's (`python -m mpi4py` aborts on an uncaught exit) is there to end the job: cllm itself must."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    command = ["mpiexec", "-disable-auto-cleanup"]
    for args in (rank0_args, rank1_args):
        command += ["-n", "1", sys.executable, "-m", "cllm.tools.train_model", *args,
                    "--out", str(tmp_path / "run"), *ARGS, "--distributed", "mpi", ":"]
    return subprocess.run(command[:-1], capture_output=True, text=True, timeout=90)


def test_a_rank_that_fails_before_the_first_step_ends_the_job(tmp_path):
    # Rank 1's DATA is missing (as on a machine without the file): it must not leave rank 0 at the barrier.
    started = time.monotonic()
    r = two_ranks(tmp_path, [str(tmp_path / "text.txt"), "--steps", "4", "--step-timeout", "100"],
                  [str(tmp_path / "missing.txt"), "--steps", "4", "--step-timeout", "100"])
    assert r.returncode != 0
    assert "no such file or folder" in r.stderr and "missing.txt" in r.stderr
    assert time.monotonic() - started < 60  # rank 0 would otherwise wait out its 200 s collective deadline


def test_ranks_that_disagree_refuse_to_train(tmp_path):
    corpus = str(tmp_path / "text.txt")
    r = two_ranks(tmp_path, [corpus, "--steps", "4", "--lr", "0.001"], [corpus, "--steps", "4", "--lr", "0.002"])
    assert r.returncode != 0
    assert "rank 1 disagrees with rank 0 about the training settings" in r.stderr
    assert not (tmp_path / "run" / "model.cllm").exists()  # not a single step was taken


def resume_on_two_ranks(tmp_path, folder0, folder1):
    """A 2-rank --resume in which each rank reads its own copy of the run folder."""
    command = ["mpiexec"]
    for folder in (folder0, folder1):
        command += ["-n", "1", sys.executable, "-m", "mpi4py", "-m", "cllm.tools.train_model", "--out", str(folder),
                    "--resume", "--threads", "1", "--no-progress", "--distributed", "mpi", ":"]
    return subprocess.run(command[:-1], capture_output=True, text=True, timeout=150)


def test_every_rank_resumes_from_rank_0s_whole_training_state(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    assert train(tmp_path, "a", 0, "--steps", "8", "--stop-after", "4").returncode == 0
    shutil.copytree(tmp_path / "a", tmp_path / "stale")
    # Rank 1's copy has lost its AdamW moments: were they not taken from rank 0, its updates would differ.
    state = tmp_path / "stale" / "train_state.safetensors"
    with safe_open(state, "np") as f:
        meta = f.metadata()
    tensors = load_file(state)
    save_file({**tensors, "adamw.m": np.zeros_like(tensors["adamw.m"])}, state, metadata=meta)
    resumed = resume_on_two_ranks(tmp_path, tmp_path / "a", tmp_path / "stale")
    assert resumed.returncode == 0, resumed.stderr
    assert train(tmp_path, "b", 0, "--steps", "8").returncode == 0
    a, _ = load_model(tmp_path / "a" / "model.cllm")
    b, _ = load_model(tmp_path / "b" / "model.cllm")
    assert np.array_equal(a.params, b.params)


def test_ranks_resuming_at_different_steps_refuse_to_train(tmp_path):
    assert train(tmp_path, "a", 0, "--steps", "8", "--stop-after", "4").returncode == 0
    shutil.copytree(tmp_path / "a", tmp_path / "behind")
    assert train(tmp_path, "a", 0, "--steps", "8", "--stop-after", "6", "--resume").returncode == 0
    r = resume_on_two_ranks(tmp_path, tmp_path / "a", tmp_path / "behind")
    assert r.returncode != 0 and "rank 1 disagrees with rank 0 about the step to resume at" in r.stderr


def test_fine_tuning_on_two_ranks_gives_the_bits_of_one(tmp_path):
    base = train(tmp_path, "base", 0, "--steps", "2")
    assert base.returncode == 0, base.stderr
    tune = ["--init-from", str(tmp_path / "base" / "model.cllm"), "--batch-size", "12", "--eval-every", "3",
            "--eval-batches", "2", "--threads", "1", "--spheres", "12", "--no-progress"]
    one = train(tmp_path, "one", 0, "--steps", "4", args=tune)
    two = train(tmp_path, "two", 2, "--steps", "4", args=tune)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, _ = load_model(tmp_path / "one" / "model.cllm")
    b, _ = load_model(tmp_path / "two" / "model.cllm")
    assert np.array_equal(a.params, b.params)
    assert "fine-tuning" in two.stdout

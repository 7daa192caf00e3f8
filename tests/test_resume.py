"""The run folder is the record of its run: `--out R --resume` alone continues it exactly, on its own tokenizer and
token files, and refuses what would change it."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from cllm import data, run_folder
from cllm.checkpoint import read_metadata
from cllm.errors import UsageError
from cllm.tokenizer import Tokenizer
from cllm.tools.train_model import main

pytestmark = pytest.mark.timeout(120)

TEXT = "".join(f"the {w} sat on the mat number {i}.\n" for i, w in enumerate(["cat", "dog", "bird", "fox"] * 60))
ARGS = ["--tokenizer", "char", "--dim", "16", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--steps", "8", "--lr", "3e-3", "--warmup", "2", "--eval-every", "4", "--eval-batches", "1",
        "--checkpoint-every", "4", "--threads", "2", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def train(*args):
    return main([str(a) for a in args])


def losses(run):
    """Each step's record without its timing, which differs between runs."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_model(a, b):
    ta, tb = load_file(a / "model.cllm"), load_file(b / "model.cllm")
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


@pytest.fixture
def straight(corpus, tmp_path):
    """The run done without interruption."""
    assert train(corpus, "--out", tmp_path / "straight", *ARGS) == 0
    return tmp_path / "straight"


@pytest.fixture
def stopped(corpus, tmp_path):
    """The same run, stopped after step 4 with a checkpoint."""
    assert train(corpus, "--out", tmp_path / "stopped", *ARGS, "--stop-after", 4) == 0
    return tmp_path / "stopped"


def test_the_run_folder_records_what_the_run_was_started_with(corpus, stopped):
    record = json.loads((stopped / "run.json").read_text())
    assert record["data"]["paths"] == [str(corpus.resolve())] and len(record["data"]["fingerprint"]) == 64
    assert record["val_data"] is None
    assert record["tokenizer"] == {"kind": "char", "vocab_size": 4096}
    assert record["model"] == {"vocab_size": record["model"]["vocab_size"], "context_length": 16, "dim": 16,
                               "n_layers": 1, "n_heads": 2, "mlp_ratio": 4}
    assert record["training"] == {
        "steps": 8, "batch_size": 4, "seq_len": None, "lr": 3e-3, "min_lr": 1e-4, "beta2": 0.99, "warmup": 2,
        "weight_decay": 0.1, "grad_clip": 1.0, "grad_accum": 1, "eval_every": 4, "eval_batches": 1, "checkpoint_every": 4, "seed": 1337,
        # The default cut, as it was chosen for 4 rows of 16 tokens: a later rule cannot change a resumed run.
        "threads": 2, "spheres": 1, "step_timeout": None, "stats": False, "keep_checkpoints": 0}


def test_resume_alone_continues_bit_identically(straight, stopped):
    assert train("--out", stopped, "--resume") == 0
    assert_same_model(straight, stopped)
    assert losses(straight) == losses(stopped)


def test_a_record_from_before_seq_len_and_keep_checkpoints_resumes_as_it_ran(straight, stopped):
    record = json.loads((stopped / "run.json").read_text())
    del record["training"]["seq_len"], record["training"]["keep_checkpoints"]
    (stopped / "run.json").write_text(json.dumps(record))
    assert train("--out", stopped, "--resume") == 0
    assert_same_model(straight, stopped)


def test_shorter_windows_than_the_context_are_recorded_and_refused_past_it(corpus, tmp_path, capsys):
    assert train(corpus, "--out", tmp_path / "short", *ARGS, "--seq-len", 8) == 0
    record = json.loads((tmp_path / "short" / "run.json").read_text())
    assert record["training"]["seq_len"] == 8 and record["model"]["context_length"] == 16
    assert json.loads((tmp_path / "short" / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
    with pytest.raises(UsageError, match="--seq-len 32 is longer than the model's context"):
        train(corpus, "--out", tmp_path / "long", *ARGS, "--seq-len", 32)
    assert not (tmp_path / "long").exists()  # refused before the corpus is read


def test_resume_uses_the_runs_own_tokenizer_and_tokens_and_never_reads_the_corpus(corpus, straight, stopped,
                                                                                  monkeypatch, capsys):
    prepared = {p.name: p.read_bytes() for p in (stopped / "data").iterdir()}
    with open(corpus, "a") as f:
        f.write("Zebras quickly vex jolly kings: 0123456789 #@!\n")  # new characters: a new tokenizer would differ
    fail = lambda *a, **k: pytest.fail("resume looked at the corpus")
    monkeypatch.setattr(data, "scan", fail)
    monkeypatch.setattr(run_folder, "scan", fail)
    monkeypatch.setattr(Tokenizer, "train", fail)
    capsys.readouterr()
    assert train("--out", stopped, "--resume") == 0
    assert "corpus:" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (stopped / "data").iterdir()} == prepared
    assert_same_model(straight, stopped)


def test_a_run_stopped_before_its_first_checkpoint_starts_over(straight, stopped):
    for name in ("model.cllm", "train_state.safetensors"):  # as if killed before step 4's checkpoint
        (stopped / name).unlink()
    assert train("--out", stopped, "--resume") == 0
    assert_same_model(straight, stopped)
    assert losses(straight) == losses(stopped)


def test_a_torn_last_metrics_line_does_not_block_the_resume(straight, stopped):
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1, "lr"')  # a kill in the middle of writing step 5's line
    assert train("--out", stopped, "--resume") == 0
    assert losses(straight) == losses(stopped)


@pytest.mark.parametrize("flags", [
    ["--batch-size", "6"], ["--tokenizer", "bpe"], ["--vocab-size", "20"], ["--dim", "32"], ["--layers", "2"],
    ["--context", "32"], ["--lr", "0.01"], ["--seed", "1"], ["--spheres", "4"], ["--eval-every", "2"]])
def test_resume_refuses_a_flag_that_would_change_the_run(stopped, flags):
    with pytest.raises(UsageError, match=f"^{flags[0]} {flags[1]} would change the run in .*, which was started "
                                         f"with "):
        train("--out", stopped, "--resume", *flags)
    assert losses(stopped)[-1]["step"] == 4  # nothing was trained


def test_a_refused_flag_is_one_line_and_exit_status_2(stopped):
    r = subprocess.run([sys.executable, "-m", "cllm.tools.train_model", "--out", str(stopped), "--resume",
                        "--batch-size", "6"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--batch-size 6" in r.stderr


def test_resume_accepts_the_runs_own_values_and_the_documented_overrides(corpus, straight, stopped):
    # DATA and every flag as the run was started: nothing changes, so nothing is refused.
    assert train(corpus, "--out", stopped, *ARGS, "--resume", "--stop-after", 6) == 0
    assert train("--out", stopped, "--resume", "--threads", 1, "--step-timeout", 60, "--stats", "--no-progress") == 0
    assert_same_model(straight, stopped)
    assert train("--out", stopped, "--resume", "--steps", 12, "--stop-after", 10) == 0  # train longer
    assert train("--out", stopped, "--resume") == 0  # the run now goes to step 12
    assert [r["step"] for r in losses(stopped)] == list(range(1, 13))
    assert json.loads((stopped / "run.json").read_text())["training"]["steps"] == 12


def test_resume_refuses_other_or_changed_data(corpus, stopped, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(TEXT)
    with pytest.raises(UsageError, match="^DATA .*other.txt is not the text the run in .* was started with"):
        train(other, "--out", stopped, "--resume")
    with pytest.raises(UsageError, match="^--val-data would change the run"):
        train("--out", stopped, "--resume", "--val-data", other)
    with open(corpus, "a") as f:
        f.write("one more line\n")
    with pytest.raises(UsageError, match="corpus.txt has changed since the run in .* started"):
        train(corpus, "--out", stopped, "--resume")


def test_resuming_a_finished_run_says_so(straight, capsys):
    capsys.readouterr()
    assert train("--out", straight, "--resume") == 0
    out = capsys.readouterr().out
    assert f"the run in {straight} finished at step 8 of 8; pass --steps N to train longer" in out
    assert "nan" not in out and "done:" not in out


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(UsageError, match="holds no run to resume"):
        train("--out", tmp_path / "nothing", "--resume")


def test_a_new_run_replaces_the_one_in_its_folder(corpus, straight, capsys):
    capsys.readouterr()
    assert train(corpus, "--out", straight, *ARGS, "--stop-after", 2) == 0
    assert f"a new run replaces the one in {straight}" in capsys.readouterr().out
    assert [r["step"] for r in losses(straight)] == [1, 2]  # not appended to the earlier run's log


def test_best_cllm_holds_the_lowest_validation_loss_and_checkpoints_keep_the_last_n(corpus, tmp_path):
    run = tmp_path / "run"
    assert train(corpus, "--out", run, *ARGS, "--eval-every", 2, "--checkpoint-every", 2, "--keep-checkpoints", 2) == 0
    evaluated = [(m["step"], m["val_loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "val_loss" in m]
    step, val_loss = min(evaluated, key=lambda sv: sv[1])
    best = read_metadata(run / "best.cllm")
    assert (int(best["step"]), float(best["val_loss"])) == (step, val_loss)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006.cllm", "step-0000008.cllm"]
    latest, kept = load_file(run / "model.cllm"), load_file(run / "checkpoints" / "step-0000008.cllm")
    assert all(np.array_equal(latest[k], kept[k]) for k in latest)
    # A new run in the folder drops the earlier run's best model and kept checkpoints: its best is its own.
    assert train(corpus, "--out", run, *ARGS, "--steps", 1, "--eval-every", 1000) == 0
    assert read_metadata(run / "best.cllm")["step"] == "1"
    assert not list((run / "checkpoints").iterdir())

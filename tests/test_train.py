"""Text to trained model: the training loop, resume, and the command-line tools end to end."""
import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial

import anyio
import numpy as np
import pytest

from cllm import threads
from cllm.checkpoint import load_model, read_metadata
from cllm.data import prepare
from cllm.errors import UsageError
from cllm.model import GPT, ModelConfig
from cllm.optim import AdamW
from cllm.plot import read_metrics, write_loss_plot
from cllm.tools import train_model
from cllm.trainer import StopSignals, Trainer, TrainSettings

TEXT = "".join(f"the {w} sat on the mat number {i}.\n" for i, w in enumerate(["cat", "dog", "bird", "fox"] * 60))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def small_settings(**kw):
    base = dict(steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=4, eval_batches=2,
                checkpoint_every=4, seed=7, threads=2, spheres=4)
    return TrainSettings(**{**base, **kw})


def train(corpus, run_dir, settings, *, resume=False, until=None):
    prepared = prepare(corpus, run_dir / "data", tokenizer="char", log=lambda *a: None)
    if resume:
        model, tokenizer = load_model(run_dir / "model.cllm")
    else:
        tokenizer = prepared.tokenizer
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, dim=16, n_layers=2, n_heads=2)
        model = GPT(cfg, seed=settings.seed)
    trainer = Trainer(model, tokenizer, prepared.train, prepared.val, settings, run_dir, progress=False)
    if resume:
        trainer.resume()
    anyio.run(partial(trainer.run, until=until))
    return model


def test_resume_is_bit_identical(corpus, tmp_path):
    straight = train(corpus, tmp_path / "a", small_settings(steps=8))
    train(corpus, tmp_path / "b", small_settings(steps=8), until=4)
    resumed = train(corpus, tmp_path / "b", small_settings(steps=8), resume=True)
    assert np.array_equal(straight.params, resumed.params)
    a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]
    assert strip(a) == strip(b)  # one continuous log, the same losses


def test_metrics_and_learning(corpus, tmp_path):
    train(corpus, tmp_path, small_settings(steps=40, eval_every=10, lr=1e-2, min_lr=1e-3))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30, 40]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it learned more than the character frequencies
    assert records[-1]["val_loss"] < records[9]["val_loss"]


def test_resume_refuses_a_different_batch_layout(corpus, tmp_path):
    train(corpus, tmp_path, small_settings(steps=4))
    with pytest.raises(UsageError, match="batch-size"):
        train(corpus, tmp_path, small_settings(steps=8, batch_size=6), resume=True)


def test_default_threads_are_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert TrainSettings().threads == 64  # a 96-core server: the most that --threads takes, not a refusal
    TrainSettings().validate()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    assert TrainSettings().threads == 3  # taskset or a container's cpuset: the CPUs we may run on
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: 1.5)
    assert TrainSettings().threads == 2  # a CPU quota of 1.5 CPUs


def test_the_signal_handler_writes_only_to_file_descriptor_2(capfd, monkeypatch):
    class Unwritable:
        def write(self, text):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

        flush = write

    monkeypatch.setattr(sys, "stderr", Unwritable())
    signals = StopSignals()
    signals._handle(signal.SIGINT, None)  # as if it had interrupted a write to sys.stderr
    monkeypatch.undo()
    assert signals.received == signal.SIGINT
    assert "SIGINT: stopping after this step with a checkpoint (again to quit at once)" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------ the CLIs


def cli(tool, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", f"cllm.tools.{tool}", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=240)


def assert_usage_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr


def test_cli_train_then_generate(corpus, tmp_path):
    out = tmp_path / "run"
    r = cli("train_model", corpus, "--out", out, "--tokenizer", "char", "--dim", 16, "--layers", 1, "--heads", 2,
            "--context", 16, "--batch-size", 4, "--steps", 6, "--eval-every", 3, "--eval-batches", 1,
            "--threads", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (out / "model.cllm").exists() and "sample:" in r.stdout
    # The closing hints name the commands this install has, and the playground's address
    generate = "cllm-generate" if shutil.which("cllm-generate") else "python -m cllm.tools.inference"
    assert f"generate more: {generate} {out / 'model.cllm'} -p" in r.stdout
    assert "open its playground at http://127.0.0.1:8000/" in r.stdout
    greedy = [cli("inference", out / "model.cllm", "-p", "the cat", "-n", 12, "--temperature", 0) for _ in "ab"]
    assert greedy[0].returncode == 0, greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("the cat")
    assert_usage_error(cli("inference", out / "model.cllm", "-p", "the cat " * 10), "context")


TOOL_ARGS = ["--tokenizer", "char", "--dim", 16, "--layers", 1, "--heads", 2, "--context", 16, "--batch-size", 4,
             "--eval-every", 1000, "--eval-batches", 1, "--threads", 2, "--no-progress"]


def train_model_main(*args):
    return train_model.main([str(a) for a in args])


def test_a_diverging_step_is_one_line_and_the_checkpoint_stays(corpus, tmp_path, monkeypatch, capsys):
    norm = AdamW.grad_norm
    monkeypatch.setattr(AdamW, "grad_norm", lambda self: float("nan") if self.step_count == 2 else norm(self))
    status = train_model_main(corpus, "--out", tmp_path, *TOOL_ARGS, "--steps", 6, "--checkpoint-every", 2)
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train_model: error: step 3 diverged: gradient norm is nan (a lower --lr may help); the last checkpoint "
        f"in {tmp_path} is intact")
    assert read_metadata(tmp_path / "model.cllm")["step"] == "2"
    load_model(tmp_path / "model.cllm")


def test_a_run_folder_inside_data_is_not_read_as_data(tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "story.txt").write_text(TEXT)
    for _ in range(2):  # the second run finds the first one's metrics, record and checkpoints in texts/run
        assert train_model_main(texts, "--out", texts / "run", *TOOL_ARGS, "--steps", 2) == 0
    out = capsys.readouterr().out
    assert out.count("corpus: 1 file,") == 2
    assert "reusing the tokenizer and tokens" in out  # nothing the run wrote changed the corpus


def test_vocab_size_caps_a_char_vocabulary_too(corpus, tmp_path):
    assert train_model_main(corpus, "--out", tmp_path, *TOOL_ARGS, "--steps", 1, "--vocab-size", 10) == 0
    _, tokenizer = load_model(tmp_path / "model.cllm")
    assert tokenizer.vocab_size == 10  # <|endoftext|>, <unk> and the 8 most frequent characters
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the <unk>at"  # " ", "a", "e", "h", "t" are frequent


def test_fine_tuning_starts_from_the_model_and_keeps_its_tokenizer_and_shape(corpus, tmp_path, capsys):
    assert train_model_main(corpus, "--out", tmp_path / "base", *TOOL_ARGS, "--steps", 2) == 0
    base, base_tokenizer = load_model(tmp_path / "base" / "model.cllm")
    other = tmp_path / "other.txt"
    other.write_text("".join(f"a mat and a cat, {i}.\n" for i in range(300)))
    tuned_args = ["--batch-size", 4, "--eval-every", 1000, "--eval-batches", 1, "--threads", 2, "--no-progress"]
    assert train_model_main(other, "--out", tmp_path / "tuned", "--init-from", tmp_path / "base" / "model.cllm",
                            *tuned_args, "--steps", 4, "--lr", 1e-7, "--min-lr", 1e-7, "--weight-decay", 0) == 0
    assert "fine-tuning" in capsys.readouterr().out
    tuned, tokenizer = load_model(tmp_path / "tuned" / "model.cllm")
    assert tokenizer.to_json() == base_tokenizer.to_json() and tuned.config == base.config
    # Four steps of 1e-7 move no weight by more than 4e-7: they are the base model's, not a fresh init's.
    np.testing.assert_allclose(tuned.params, base.params, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "tuned" / "run.json").read_text())["init_from"] == \
        str((tmp_path / "base" / "model.cllm").resolve())
    # A real fine-tune moves them, and resumes like any run.
    assert train_model_main(other, "--out", tmp_path / "moved", "--init-from", tmp_path / "base" / "model.cllm",
                            *tuned_args, "--steps", 4, "--stop-after", 2) == 0
    assert train_model_main("--out", tmp_path / "moved", "--resume", "--no-progress") == 0
    moved, _ = load_model(tmp_path / "moved" / "model.cllm")
    assert not np.array_equal(moved.params, base.params)
    assert read_metadata(tmp_path / "moved" / "model.cllm")["step"] == "4"


def test_fine_tuning_refuses_flags_that_change_the_model(corpus, tmp_path):
    assert train_model_main(corpus, "--out", tmp_path / "base", *TOOL_ARGS, "--steps", 1) == 0
    for flag, value in [("--dim", 32), ("--tokenizer", "bpe"), ("--context", 8)]:
        assert_usage_error(cli("train_model", corpus, "--out", tmp_path / "t", "--init-from",
                               tmp_path / "base" / "model.cllm", flag, value), flag)


def test_cli_usage_errors(tmp_path):
    assert_usage_error(cli("train_model", "--no-such-flag"), "unrecognized arguments")
    assert_usage_error(cli("train_model", tmp_path / "missing", "--out", tmp_path), "missing")
    assert_usage_error(cli("train_model", "x", "--steps", "0"), "positive")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(cli("train_model", empty, "--out", tmp_path / "r"), "no files")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "blob.dat").write_bytes(bytes(range(256)) * 10)
    assert_usage_error(cli("prepare", binary, "--out", tmp_path / "r"), "binary")
    bad_model = tmp_path / "bad.cllm"
    bad_model.write_bytes(b"\x00" * 100)
    assert_usage_error(cli("inference", bad_model, "-p", "x"), "bad.cllm")
    assert_usage_error(cli("inference", tmp_path / "none.cllm"), "none.cllm")
    assert_usage_error(cli("inference", bad_model, "--top-p", "2"), "top-p")
    assert_usage_error(cli("inference", bad_model, "--temperature", "3"), "--temperature: must be a number in [0.0, 2.0]")
    assert_usage_error(cli("plot", tmp_path), "metrics")


def test_plot_tool(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5, "val_loss": 2.7}\n')
    r = cli("plot", tmp_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert_usage_error(r, "pip install")
    else:
        assert r.returncode == 0 and (tmp_path / "loss.png").stat().st_size > 1000


def test_a_failing_render_leaves_the_old_plot_and_no_temporary(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (tmp_path / "loss.png").write_bytes(b"the old plot")

    def half_then_fail(self, target, **kwargs):
        (target if hasattr(target, "write") else open(target, "wb")).write(b"half a png")
        raise RuntimeError("render failed")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(RuntimeError, match="render failed"):
        write_loss_plot(tmp_path)
    assert (tmp_path / "loss.png").read_bytes() == b"the old plot"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl"]


def test_metrics_reading_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 3.0}\nnot json\n{"step": 3, "loss": 2.5}\n')
    with pytest.raises(UsageError, match="metrics.jsonl:2 is not JSON"):
        read_metrics(tmp_path)


def test_inference_reads_its_prompt_from_a_file_or_stdin_and_draws_several_samples(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_model_main(corpus, "--out", out, *TOOL_ARGS, "--steps", 2) == 0
    model = out / "model.cllm"
    (tmp_path / "prompt.txt").write_text("the cat", encoding="utf-8")
    greedy = ["-n", 8, "--temperature", 0]
    from_flag = cli("inference", model, "-p", "the cat", *greedy)
    from_file = cli("inference", model, "-f", tmp_path / "prompt.txt", *greedy)
    from_stdin = subprocess.run([sys.executable, "-m", "cllm.tools.inference", str(model), "-f", "-", "-n", "8",
                                 "--temperature", "0"], input="the cat", capture_output=True, text=True, timeout=120)
    assert from_flag.returncode == 0, from_flag.stderr
    assert from_flag.stdout == from_file.stdout == from_stdin.stdout and from_flag.stdout.startswith("the cat")
    sampled = cli("inference", model, "-p", "the", "-n", 12, "--num-samples", 3, "--seed", 1)
    samples = sampled.stdout.split("--- sample ")[1:]
    assert sampled.returncode == 0 and [s[:6] for s in samples] == ["1 of 3", "2 of 3", "3 of 3"]
    assert len(set(samples[i].split("\n", 1)[1] for i in range(3))) > 1  # seeds 1, 2, 3 draw differently
    again = cli("inference", model, "-p", "the", "-n", 12, "--num-samples", 3, "--seed", 1)
    assert again.stdout == sampled.stdout  # and reproducibly
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_usage_error(cli("inference", model, "-f", tmp_path / "latin1.txt"), "not UTF-8")
    assert_usage_error(cli("inference", model, "-p", "x", "-f", tmp_path / "prompt.txt"), "not allowed with")

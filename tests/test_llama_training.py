"""train_model --arch llama (and qwen2, qwen3) end to end: the run, its record and model file, resume, fine-tuning, the flags."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from cllm.checkpoint import load_model
from cllm.tools.train_model import main

pytestmark = pytest.mark.timeout(240)

TEXT = "".join(f"the {w} sat on the mat number {i}.\n" for i, w in enumerate(["cat", "dog", "bird", "fox"] * 60))
LLAMA = ["--arch", "llama", "--heads", "4", "--kv-heads", "2", "--dim", "32", "--intermediate-size", "48",
         "--rope-theta", "5000"]
# the Qwen blocks from scratch: qwen2's q, k, v biases; qwen3's head norms, on heads set apart from the width
FAMILY = {"llama": LLAMA, "qwen2": ["--arch", "qwen2", *LLAMA[2:]], "qwen3": ["--arch", "qwen3", *LLAMA[2:],
                                                                          "--head-dim", "12"]}
ARGS = ["--tokenizer", "char", "--layers", "2", "--context", "16", "--batch-size", "4", "--steps", "8", "--lr",
        "3e-3", "--warmup", "2", "--eval-every", "4", "--eval-batches", "1", "--checkpoint-every", "4",
        "--threads", "2", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def train(*args):
    return main([str(a) for a in args])


def cli(tool, *args):
    return subprocess.run([sys.executable, "-m", f"cllm.tools.{tool}", *map(str, args)], capture_output=True,
                          text=True, timeout=200)


@pytest.mark.parametrize("arch", list(FAMILY))
def test_a_llama_family_run_records_its_shape_learns_and_generates(corpus, tmp_path, capsys, arch):
    assert train(corpus, "--out", tmp_path / "run", *FAMILY[arch], *ARGS) == 0
    out = capsys.readouterr().out
    assert f"{arch}, 2 layers, dim 32, 4 heads over 2 kv heads" in out and "sample:" in out
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["model"]
    assert {k: recorded[k] for k in ("arch", "n_kv_heads", "intermediate_size", "rope_theta")} == \
        {"arch": arch, "n_kv_heads": 2, "intermediate_size": 48, "rope_theta": 5000.0}
    assert recorded.get("head_dim") == (12 if arch == "qwen3" else None)
    model, _ = load_model(tmp_path / "run" / "model.cllm")
    assert model.config.arch == arch and model.config.intermediate_size == 48 and "wpe" not in model.p
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.25  # it learns (3.5 to 3.1 in 8 steps here)
    greedy = [cli("inference", tmp_path / "run" / "model.cllm", "-p", "the cat", "-n", 10, "--temperature", 0)
              for _ in "ab"]
    assert greedy[0].returncode == 0, greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("the cat")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_stopped_llama_family_run_resumes_bit_identically(corpus, tmp_path, arch):
    assert train(corpus, "--out", tmp_path / "straight", *FAMILY[arch], *ARGS) == 0
    assert train(corpus, "--out", tmp_path / "stopped", *FAMILY[arch], *ARGS, "--stop-after", 4) == 0
    assert train("--out", tmp_path / "stopped", "--resume", "--no-progress") == 0
    a, b = (load_file(tmp_path / run / "model.cllm") for run in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_llama_model_fine_tunes_with_its_shape(corpus, tmp_path):
    assert train(corpus, "--out", tmp_path / "base", *LLAMA, *ARGS) == 0
    base, _ = load_model(tmp_path / "base" / "model.cllm")
    assert train(corpus, "--out", tmp_path / "tuned", "--init-from", tmp_path / "base" / "model.cllm",
                 "--batch-size", 4, "--steps", 2, "--eval-batches", 1, "--no-progress") == 0
    tuned, _ = load_model(tmp_path / "tuned" / "model.cllm")
    assert tuned.config == base.config and not np.array_equal(tuned.params, base.params)


@pytest.mark.parametrize("flags, message", [
    (["--kv-heads", "2"], "--kv-heads is a setting of the llama family"),
    (["--rope-theta", "500"], "--rope-theta is a setting of the llama family"),
    (["--head-dim", "16"], "--head-dim is a setting of the llama family"),
    (["--arch", "qwen3", "--head-dim", "7"], "must be even"),
    (["--arch", "llama", "--heads", "4", "--kv-heads", "3"], "n_kv_heads (3) must divide n_heads (4)"),
    (["--arch", "mamba"], "invalid choice"),
])
def test_bad_shape_flags_are_one_line_and_status_2_before_the_corpus_is_read(corpus, tmp_path, flags, message):
    result = cli("train_model", corpus, "--out", tmp_path / "run", *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "run").exists()

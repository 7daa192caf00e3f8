"""The evaluate tool: loss, perplexity and bits per byte of a model on a text, against a float64 computation from
the model's own logits."""
import math
import re

import numpy as np
import pytest

from cllm.checkpoint import save_model
from cllm.data import CorpusError
from cllm.errors import UsageError
from cllm.model import GPT, ModelConfig
from cllm.tokenizer import Tokenizer
from cllm.tools import evaluate

TEXT = "".join(f"the {w} sat on the mat, number {i}.\n" for i, w in enumerate(["cat", "dog", "ému"] * 12))


@pytest.fixture
def files(tmp_path):
    tokenizer = Tokenizer.train("char", [TEXT])
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, dim=16, n_layers=1, n_heads=2,
                            arch="llama"), seed=1)
    save_model(tmp_path / "m.cllm", model, tokenizer)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path / "m.cllm", tmp_path / "text.txt", model, tokenizer


def reported(capsys) -> dict[str, float]:
    out = capsys.readouterr().out
    found = re.search(r"loss ([\d.]+) nats/token, perplexity ([\d.]+), bits per byte ([\d.]+)", out)
    predicted = int(re.search(r"([\d,]+) tokens predicted", out).group(1).replace(",", ""))
    return {"loss": float(found.group(1)), "perplexity": float(found.group(2)), "bpb": float(found.group(3)),
            "predicted": predicted}


@pytest.mark.parametrize("seq_len", [None, 10])
def test_the_figures_are_the_models_own_log_likelihood(files, capsys, seq_len):
    model_path, text_path, model, tokenizer = files
    extra = [] if seq_len is None else ["--seq-len", str(seq_len)]
    assert evaluate.main([str(model_path), str(text_path), "--batch-size", "3", "--no-progress", *extra]) == 0
    got = reported(capsys)
    # float64 log-softmax of the model's logits, window by window
    tokens = np.append(tokenizer.encode(TEXT), tokenizer.separator_id)
    seq, total = seq_len or 32, 0.0
    for start in range(0, tokens.size - 1, seq):
        window = tokens[start:start + seq + 1]
        logits = model.logits(window[None, :-1])[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(window.size - 1), window[1:]].sum()
    assert got["predicted"] == tokens.size - 1
    loss = total / (tokens.size - 1)
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-3)
    assert got["bpb"] == pytest.approx(total / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-3)


def test_bad_input_is_one_clear_error(files, tmp_path):
    model_path, text_path, _, _ = files
    with pytest.raises(UsageError, match="--seq-len 64 is longer than the model's context"):
        evaluate.main([str(model_path), str(text_path), "--seq-len", "64"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no files"):
        evaluate.main([str(model_path), str(tmp_path / "empty")])

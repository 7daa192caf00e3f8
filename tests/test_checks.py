"""One rule for whole-number settings (cllm.checks.require_int), used by every API that takes one, and the server's
request schema in agreement with Sampling on every range the two share."""
from __future__ import annotations

import numpy as np
import pydantic
import pytest

import cllm
from cllm.checks import require_int
from cllm.errors import UsageError
from cllm.generate import MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MAX_TOP_K, Sampling, complete
from cllm.model import GPT, ModelConfig
from cllm.schemas import CompletionRequest
from cllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def parts():
    tokenizer = Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, dim=16, n_layers=1, n_heads=2)
    return GPT(config, seed=0), tokenizer


def test_the_rule():
    assert require_int("n", 3) == 3 and type(require_int("n", np.int64(3))) is int
    assert require_int("seed", 0, minimum=0) == 0 and require_int("seed", None, minimum=0, optional=True) is None
    for value in (True, 0, -1, 2.0, "3", None):
        with pytest.raises(UsageError, match=f"^n must be a positive integer, got {value!r}$"):
            require_int("n", value)
    with pytest.raises(UsageError, match="^seed must be a non-negative integer or None, got False$"):
        require_int("seed", False, minimum=0, optional=True)
    with pytest.raises(UsageError, match="^logprobs must be an integer from 0 to 20, got 21$"):
        require_int("logprobs", 21, minimum=0, maximum=20)


def test_a_bool_is_no_count_anywhere(parts):
    """check_generation took max_new_tokens=True as 1 where AsyncModel.stream_choices refused it; Model took
    threads=True and batch_size=True."""
    model, tokenizer = parts
    with pytest.raises(UsageError, match="max_new_tokens must be a non-negative integer, got True"):
        complete(model, tokenizer, "the", max_new_tokens=True)
    with pytest.raises(UsageError, match="threads must be a positive integer, got True"):
        cllm.Model(model, tokenizer, threads=True)
    with pytest.raises(UsageError, match="batch_size must be a positive integer, got True"):
        cllm.Model(model, tokenizer, threads=1).encode(["the fox"], batch_size=True)
    with pytest.raises(UsageError, match="max_streams must be a positive integer, got True"):
        cllm.AsyncModel(model, tokenizer, max_streams=True)
    with pytest.raises(UsageError, match="top_k must be an integer from 1 to"):
        Sampling(top_k=True)


# Each range the schema and Sampling share, at its edge and just past it.
EDGES = [("temperature", MAX_TEMPERATURE, MAX_TEMPERATURE + 0.5), ("temperature", 0.0, -1e-9),
         ("top_k", MAX_TOP_K, MAX_TOP_K + 1), ("top_k", 1, 0),
         ("repetition_penalty", MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY * 2), ("repetition_penalty", 1e-9, 0.0),
         ("frequency_penalty", MAX_PENALTY, MAX_PENALTY + 0.5), ("frequency_penalty", -MAX_PENALTY, -MAX_PENALTY - 0.5),
         ("presence_penalty", MAX_PENALTY, MAX_PENALTY + 0.5), ("presence_penalty", -MAX_PENALTY, -MAX_PENALTY - 0.5),
         ("top_p", 1.0, 1.5), ("min_p", 1.0, 1.5)]


def schema_takes(field: str, value) -> bool:
    try:
        CompletionRequest.model_validate({"model": "m", field: value})
    except pydantic.ValidationError:
        return False
    return True


def sampling_takes(field: str, value) -> bool:
    try:
        Sampling(**{field: value})
    except UsageError:
        return False
    return True


@pytest.mark.parametrize("field, edge, past", EDGES, ids=[f"{f}={past}" for f, _, past in EDGES])
def test_the_schema_and_sampling_agree_on_every_range(field, edge, past):
    """A temperature of 2.5 was refused by the server's schema and taken by Sampling (its range had no top)."""
    assert schema_takes(field, edge) and sampling_takes(field, edge)
    assert not schema_takes(field, past) and not sampling_takes(field, past)

"""lm-evaluation-harness's own `local-completions` model scores a small multiple-choice task against cllm-serve, and
each choice's log-likelihood is the one cllm computes directly from the model's forward pass.

The harness scores a choice by encoding context + continuation with its own tokenizer, sending the ids to
/v1/completions (a list of id lists, `batch_size` of them a request) with echo=true, max_tokens=1 and logprobs=1,
and reading the echoed prompt back: the continuation's log-likelihood is the sum of token_logprobs[ctxlen:-1], and
the choice is greedy when each of those tokens' logprob is the largest of its top_logprobs. This checks, for every
choice, that the ids it sent are the pair its own _encode_pair gives, that sum and that flag against log-softmax
(float64) of cllm's logits on the same ids, and that the accuracy it reports is the one the direct log-likelihoods
imply; and, per token, the echoed logprobs it relies on. The model is trained here for a moment on the lines the
questions come from, so that each question's answer is the model's greedy continuation and the flag is exercised
both ways; the gold answers are right for some questions and wrong for others, so accuracy is neither 0 nor 1.

Everything is local and offline: a GPT-2 and a BPE trained here, saved as a Hugging Face folder that both the
server and the harness's tokenizer (tokenizer_backend=huggingface: transformers' AutoTokenizer) read, and a task
whose YAML and JSON lines are written to a temporary folder (dataset_path: json with data_files, the datasets cache
in that folder too), loaded by a TaskManager without the harness's built-in tasks. Needs lm_eval[api] (the interop
extra)."""
from __future__ import annotations

import json

import numpy as np
import pytest

REASON = "needs lm-evaluation-harness's API models: pip install -e \".[interop]\""
lm_eval = pytest.importorskip("lm_eval", reason=REASON)
for module in ("transformers", "aiohttp", "requests", "tenacity"):  # its tokenizer backend, its [api] extra
    pytest.importorskip(module, reason=REASON)

from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from cllm.checkpoint import load_model  # noqa: E402
from cllm.formats.hf import save_hf  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.optim import AdamW  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402
from cllm.tools.serve import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NAME = "tiny"
TASK = "cllm_choices"
CONTEXT = 64
BATCH = 5  # prompts in one request: the 16 choices go as three lists of 5 and a list of one
TOLERANCE = 1e-4  # float32 logits, log-softmax and sums in float64 here; a few tokens a choice
LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die: to sleep;", "No more; and by a sleep to say we end"]
# (question, choices, gold): the lines' own continuation is the first choice; gold is it for three questions.
QUESTIONS = [
    ("To be, or not to be, that is the", ["question", "sea of troubles", "mind"], 0),
    ("Whether 'tis nobler in the mind to", ["suffer", "sleep", "take arms"], 2),
    ("The slings and arrows of", ["outrageous fortune", "troubles", "the question", "a sea"], 0),
    ("Or to take arms against a", ["sea of troubles", "mind to suffer", "fortune"], 1),
    ("And by opposing end them. To die: to", ["sleep", "be", "suffer the slings"], 0),
]


def trained(tokenizer: Tokenizer, steps: int = 300) -> GPT:
    """A small GPT-2 that has learnt the lines by heart (its loss falls below 0.1 within a second)."""
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, dim=32, n_layers=2, n_heads=4))
    text = np.concatenate([np.append(tokenizer.encode(line), tokenizer.separator_id) for line in LINES] * 4)
    rng = np.random.default_rng(0)
    optimizer = AdamW(model, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        batch = np.stack([text[s:s + 33] for s in rng.integers(0, len(text) - 33, 8)]).astype(np.int32)
        model.zero_grad()
        model.forward(batch[:, :-1], batch[:, 1:])
        model.backward()
        optimizer.step(max_grad_norm=1.0)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The model and its BPE as a Hugging Face folder: what the server serves and the harness's tokenizer."""
    tokenizer = Tokenizer.train("bpe", LINES * 20, vocab_size=400)
    path = tmp_path_factory.mktemp("lm_eval") / "model"
    save_hf(path, trained(tokenizer), tokenizer)
    return path


@pytest.fixture(scope="module")
def model(folder):
    """The model as cllm reads the folder the server serves."""
    model, _ = load_model(folder)
    return model


@pytest.fixture(scope="module")
def server(folder):
    with BackgroundServer(folder, model_name=NAME) as server:
        yield server


@pytest.fixture(scope="module")
def harness(server, folder):
    """The harness's registered local-completions model, and a record of each request's prompts and response."""
    lm = get_model("local-completions")(model=NAME, base_url=f"{server.url}/v1/completions",
                                        tokenizer_backend="huggingface", tokenizer=str(folder), batch_size=BATCH,
                                        max_length=CONTEXT, max_retries=1, timeout=60)
    calls = []
    call = lm.model_call

    def recorded(messages, **kwargs):
        response = call(messages, **kwargs)
        calls.append((messages, response))
        return response

    lm.model_call = recorded
    return lm, calls


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    with open(folder / "questions.jsonl", "w", encoding="utf-8") as f:
        for question, choices, gold in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": gold}) + "\n")
    dataset = {"data_files": {"test": str(folder / "questions.jsonl")}, "cache_dir": str(folder / "cache")}
    (folder / f"{TASK}.yaml").write_text("\n".join([
        f"task: {TASK}",
        "dataset_path: json",
        f"dataset_kwargs: {json.dumps(dataset)}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{question}}"',
        "doc_to_choice: choices",
        "doc_to_target: answer",
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true},"
        " {metric: acc_norm, aggregation: mean, higher_is_better: true}]",
        "metadata: {version: 1}",
        ""]), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def evaluation(harness, task_folder):
    """The harness's run of the task: its results, and per sample the (log-likelihood, is_greedy) of each choice."""
    lm, _ = harness
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(task_folder), include_defaults=False))
    return results["results"][TASK], sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def next_token_logprobs(model: GPT, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab): row i holds the log-probabilities of the token after ids[:i + 1], from cllm's forward."""
    return log_softmax(model.logits(np.array([ids], np.int32))[0, :, :model.config.vocab_size])


def direct(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The continuation's log-likelihood after the context, and whether greedy decoding gives it."""
    rows = next_token_logprobs(model, context + continuation)[len(context) - 1:-1]
    return (float(rows[np.arange(len(continuation)), continuation].sum()),
            bool((rows.argmax(axis=-1) == continuation).all()))


# ---------------------------------------------------------------------------------------------------------------


def test_the_harness_sent_each_choice_as_the_token_ids_it_encodes(evaluation, harness):
    lm, calls = harness
    _, samples = evaluation
    sent = [prompt for prompts, _ in calls for prompt in prompts]
    assert [len(prompts) for prompts, _ in calls] == [5, 5, 5, 1]
    pairs = [lm._encode_pair(*arguments) for sample in samples for arguments in sample["arguments"]]
    assert len(pairs) == sum(len(choices) for _, choices, _ in QUESTIONS)
    assert sorted(context + continuation for context, continuation in pairs) == sorted(sent)
    for (question, choices, _), sample in zip(QUESTIONS, samples, strict=True):  # the target delimiter's space
        assert [tuple(arguments) for arguments in sample["arguments"]] == [(question, f" {c}") for c in choices]


def test_each_choices_loglikelihood_and_greediness_are_cllms_own(evaluation, harness, model):
    lm, _ = harness
    _, samples = evaluation
    flags = []
    for sample in samples:
        assert len(sample["filtered_resps"]) == len(sample["arguments"])
        for arguments, (loglikelihood, is_greedy) in zip(sample["arguments"], sample["filtered_resps"], strict=True):
            expected, greedy = direct(model, *lm._encode_pair(*arguments))
            assert loglikelihood == pytest.approx(expected, abs=TOLERANCE), arguments
            assert is_greedy == greedy, arguments
            flags.append(greedy)
    assert any(flags) and not all(flags)  # both ways: each line's own continuation is the greedy one


def test_the_reported_accuracy_is_the_one_the_direct_loglikelihoods_imply(evaluation, harness, model):
    lm, _ = harness
    results, samples = evaluation
    right, right_norm = [], []
    for (_, choices, gold), sample in zip(QUESTIONS, samples, strict=True):
        scores = np.array([direct(model, *lm._encode_pair(*arguments))[0] for arguments in sample["arguments"]])
        right.append(int(np.argmax(scores)) == gold)
        # acc_norm: the log-likelihood per character of the choice
        right_norm.append(int(np.argmax(scores / [len(choice) for choice in choices])) == gold)
    assert results["acc,none"] == pytest.approx(np.mean(right))
    assert results["acc_norm,none"] == pytest.approx(np.mean(right_norm))
    assert 0 < results["acc,none"] < 1


def test_the_echoed_prompt_logprobs_are_the_models_own(evaluation, harness, model):
    """What the harness reads from each echoed choice: one logprob per prompt token after the first (which has
    none), then the one generated token's, and at each position a top logprob that is the largest there."""
    _, calls = harness
    for prompts, response in calls:
        choices = sorted(response["choices"], key=lambda choice: choice["index"])
        assert [choice["index"] for choice in choices] == list(range(len(prompts)))
        for prompt, choice in zip(prompts, choices, strict=True):
            logprobs = choice["logprobs"]
            rows = next_token_logprobs(model, prompt)
            assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(prompt) + 1
            assert logprobs["token_logprobs"][0] is None
            np.testing.assert_allclose(logprobs["token_logprobs"][1:-1], rows[np.arange(len(prompt) - 1), prompt[1:]],
                                       rtol=0, atol=TOLERANCE)
            # the generated token is the greedy one (temperature 0), and its logprob is the last
            assert logprobs["token_logprobs"][-1] == pytest.approx(rows[-1].max(), abs=TOLERANCE)
            for top, row in zip(logprobs["top_logprobs"][1:], rows, strict=True):
                assert max(top.values()) == pytest.approx(row.max(), abs=TOLERANCE)

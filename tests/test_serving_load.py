"""What keeps an embeddings server cheap per request under load, checked for behaviour, never for speed:
cllm.server.responses.json_bytes writes the numbers of json.dumps(vector.tolist()) (with orjson and without), and
AsyncModel.tokenize shares worker-thread rounds between concurrent calls and gives each the ids that
Tokenizer.encode gives, its own error included."""
from __future__ import annotations

import json
import math
import threading

import anyio
import numpy as np
import pytest

from cllm import AsyncModel, serving
from cllm.server import responses
from cllm.model import GPT, ModelConfig
from cllm.server.responses import json_bytes
from cllm.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"


def float32_samples() -> np.ndarray:
    """Unit-vector components, and float32 values of every magnitude: subnormals, the extremes, signed zeros."""
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((64, 96)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    wide = (rng.standard_normal(20000) * 10.0 ** rng.integers(-45, 39, 20000)).astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 1e-5,
                        1.2345e-5, 0.0001, 1e16, 1e17], np.float32)
    values = np.concatenate([unit.ravel(), wide, special])
    return values[np.isfinite(values)]


@pytest.fixture(params=["orjson", "json"])
def encoder(request, monkeypatch):
    if request.param == "json":
        monkeypatch.setattr(responses, "orjson", None)
    elif responses.orjson is None:
        pytest.skip("orjson is not installed")
    return request.param


def test_json_bytes_writes_the_numbers_that_tolist_and_json_write(encoder):
    values = float32_samples()
    vectors = values[: 64 * 96].reshape(64, 96)
    document = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": vector}
                                           for i, vector in enumerate(vectors)],
                "model": "modèle", "usage": {"prompt_tokens": 3, "total_tokens": 3}, "wide": values}
    expected = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": vector.tolist()}
                                           for i, vector in enumerate(vectors)],
                "model": "modèle", "usage": {"prompt_tokens": 3, "total_tokens": 3}, "wide": values.tolist()}
    got = json.loads(json_bytes(document))
    assert got == expected  # floats compared as float64: exactly today's values
    parsed = np.array(got["wide"], np.float64)
    assert np.array_equal(parsed, values.astype(np.float64))
    assert np.array_equal(np.signbit(parsed), np.signbit(values))  # -0.0 stays -0.0
    assert np.array_equal(parsed.astype(np.float32), values)  # and each is its float32 exactly
    # A 2-D array (TEI's /embed answers a bare list of vectors) and a slice of one (a 'dimensions' cut).
    assert json.loads(json_bytes(vectors)) == vectors.tolist()
    assert json.loads(json_bytes(vectors[:, :7])) == vectors[:, :7].tolist()


def test_json_bytes_without_orjson_is_what_starlette_writes(monkeypatch):
    starlette = pytest.importorskip("starlette.responses")
    monkeypatch.setattr(responses, "orjson", None)
    vectors = float32_samples()[:300].reshape(3, 100)
    document = {"data": [{"embedding": vector.tolist(), "index": i} for i, vector in enumerate(vectors)],
                "model": "modèle"}
    with_arrays = {"data": [{"embedding": vector, "index": i} for i, vector in enumerate(vectors)],
                   "model": "modèle"}
    assert json_bytes(with_arrays) == starlette.JSONResponse(document).body


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_json_bytes_refuses_what_json_refuses(encoder, bad):
    vector = np.array([0.5, bad, 0.25], np.float32)
    with pytest.raises(ValueError):
        json_bytes({"embedding": vector})
    with pytest.raises(TypeError):
        json_bytes({"what": object()})


# --------------------------------------------------------------------------------------------------------------
# tokenize: rounds shared by concurrent calls


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", [CORPUS])


@pytest.fixture(scope="module")
def model(tokenizer):
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, dim=16, n_layers=1, n_heads=2))


class HeldEncoder:
    """Wraps a tokenizer's encode: counts the worker threads that call it, and holds the first call until
    released, so that calls made meanwhile line up for the next round."""

    def __init__(self, tokenizer: Tokenizer, *, fail_on: str | None = None):
        self.original = tokenizer.encode
        self.fail_on = fail_on
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, text: str) -> np.ndarray:
        if not self.entered.is_set():
            self.entered.set()
            self.released.wait(timeout=30)
        self.threads.append(threading.get_ident())
        if text == self.fail_on:
            raise ValueError(f"cannot encode {text!r}")
        return self.original(text)


@pytest.mark.anyio
async def test_concurrent_tokenize_calls_share_rounds_and_get_their_own_ids(model, tokenizer, monkeypatch):
    encoder = HeldEncoder(tokenizer)
    rounds = []
    encode_jobs = serving._encode_jobs

    def counted(tokenizer, jobs):
        rounds.append(sum(len(job.texts) for job in jobs))
        return encode_jobs(tokenizer, jobs)

    monkeypatch.setattr(serving, "_encode_jobs", counted)
    async with AsyncModel(model, tokenizer) as m:
        monkeypatch.setattr(tokenizer, "encode", encoder)
        texts = [CORPUS[i:i + 1 + i % 7] for i in range(24)]
        results: dict[int, list[np.ndarray]] = {}

        async def call(i: int) -> None:
            results[i] = await m.tokenize([texts[i], texts[-1 - i]])

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await anyio.to_thread.run_sync(encoder.entered.wait)  # the first round holds its thread
            for i in range(1, len(texts)):
                tg.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            encoder.released.set()
        assert await m.tokenize([]) == []
    monkeypatch.undo()
    for i, ids in results.items():
        assert [a.tolist() for a in ids] == [tokenizer.encode(texts[i]).tolist(),
                                             tokenizer.encode(texts[-1 - i]).tolist()]
        assert all(a.dtype == np.int32 for a in ids)
    # The first call's round, then one round for the 23 calls that came while it ran.
    assert rounds == [2, 46]


@pytest.mark.anyio
async def test_a_failing_text_fails_its_own_call_only(model, tokenizer, monkeypatch):
    encoder = HeldEncoder(tokenizer, fail_on="bad")
    outcomes = {}
    async with AsyncModel(model, tokenizer) as m:
        monkeypatch.setattr(tokenizer, "encode", encoder)

        async def call(name: str, texts: list[str]) -> None:
            try:
                outcomes[name] = await m.tokenize(texts)
            except ValueError as error:
                outcomes[name] = error

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "first", ["the"])
            await anyio.to_thread.run_sync(encoder.entered.wait)
            tg.start_soon(call, "bad", ["fox", "bad"])
            tg.start_soon(call, "good", ["dog"])
            await anyio.wait_all_tasks_blocked()
            encoder.released.set()
    monkeypatch.undo()
    assert isinstance(outcomes["bad"], ValueError)
    assert [a.tolist() for a in outcomes["first"]] == [tokenizer.encode("the").tolist()]
    assert [a.tolist() for a in outcomes["good"]] == [tokenizer.encode("dog").tolist()]


@pytest.mark.anyio
async def test_cancelled_callers_leave_the_rounds_to_the_others(model, tokenizer, monkeypatch):
    encoder = HeldEncoder(tokenizer)
    got, scopes = {}, {}
    async with AsyncModel(model, tokenizer) as m:
        monkeypatch.setattr(tokenizer, "encode", encoder)

        async def call(name: str, text: str) -> None:
            with anyio.CancelScope() as scopes[name]:
                got[name] = await m.tokenize([text])

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "leader", "the")  # its round runs, held
            await anyio.to_thread.run_sync(encoder.entered.wait)
            tg.start_soon(call, "waiter", "fox")
            tg.start_soon(call, "later", "dog")
            await anyio.wait_all_tasks_blocked()
            scopes["leader"].cancel()  # shielded while its round runs: the others' texts may be in it
            scopes["waiter"].cancel()  # gone before its round
            await anyio.wait_all_tasks_blocked()
            encoder.released.set()
        # Rounds go on for later calls.
        assert [a.tolist() for a in await m.tokenize(["lazy"])] == [tokenizer.encode("lazy").tolist()]
    monkeypatch.undo()
    assert [a.tolist() for a in got["later"]] == [tokenizer.encode("dog").tolist()]
    assert "waiter" not in got

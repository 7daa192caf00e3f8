"""The async serving API (cllm.serving): embeddings and their micro-batching, generation by continuous batching,
streaming, backpressure, cancellation and shutdown, each on asyncio and on trio.

The model is tiny and random, with weights scaled up from GPT-2's init so that logits differ clearly between
tokens, and the separator's embedding row zeroed so that greedy decoding never ends a document early.
Requests are lined up deterministically by holding forward passes or decoding steps in their worker thread
(see Gate), never by sleeping and hoping. Tests that line requests up with anyio.wait_all_tasks_blocked() pass
token ids rather than text: tokenizing happens in a worker thread, and a task waiting for a thread counts as
blocked before its request is queued.
"""
from __future__ import annotations

import functools

import json
import threading
import time

import anyio
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from cllm import AsyncModel, EngineStalled, Overloaded
from cllm.checkpoint import save_model
from cllm.errors import UsageError
from cllm.generate import Decoder, complete, generate
from cllm.model import GPT, ModelConfig, Workspace
from cllm.pooling import length_batches
from cllm.serving import Completion, ServingFault, parse_serving_faults
from cllm.threads import blas_limit, current_blas_limit
from cllm.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
CONTEXT = 32
TEXTS = ["the fox", "a lazy dog jumps", "pack my box", "q", "five dozen liquor jugs!", "over the", "brown",
         "the quick brown fox jumps over", "dog", "jugs", "my box with", "lazy", "a", "quick fox", "the the", "x y"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", [CORPUS])


@pytest.fixture(scope="module")
def model(tokenizer):
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, dim=16, n_layers=2,
                            n_heads=2))
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    model.p["wte"][tokenizer.separator_id] = 0.0
    return model


class Gate:
    """Replaces owner.<name> with a wrapper that records record(*args, **kwargs) for each call and, while held,
    makes the call wait in its worker thread until open(): a test can then line requests up behind it."""

    def __init__(self, monkeypatch, owner, name: str, record, *, held: bool = False):
        self.calls = []
        self.entered = threading.Event()
        self._opened = threading.Event()
        if not held:
            self._opened.set()
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls.append(record(*args, **kwargs))
            self.entered.set()
            self._opened.wait(timeout=30)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def open(self) -> None:
        self._opened.set()

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await anyio.sleep(0.002)


def forward_passes(model, monkeypatch, *, held=False) -> Gate:
    """The model's forward passes (embedding batches and prefills), each recorded as (batch, seq, logits)."""
    return Gate(monkeypatch, model, "forward_ws",
                lambda ws, tokens, targets, **kwargs: (ws.batch, ws.seq, kwargs.get("logits", True)), held=held)


def embedding_passes(passes: Gate) -> list[tuple[int, int]]:
    return [(batch, seq) for batch, seq, logits in passes.calls if not logits]


def decoding_steps(monkeypatch, *, held=False) -> Gate:
    """Every Decoder's steps, each recorded as the number of rows it advances."""
    return Gate(monkeypatch, Decoder, "step",
                lambda decoder, tokens, active=None: decoder.batch if active is None else int(np.count_nonzero(active)),
                held=held)


def pooled(model, tokenizer, text):
    """The unnormalised embedding, from one unpadded forward pass."""
    ids = tokenizer.encode(text)
    ws = Workspace(model.config, 1, ids.size)
    model.forward_ws(ws, ids[None], None, logits=False)
    return ws.a["lnf"].astype(np.float64).mean(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# embeddings


@pytest.mark.anyio
async def test_embeddings_are_pooled_hidden_states_of_unit_length(model, tokenizer):
    async with AsyncModel(model, tokenizer) as m:
        one = await m.embed("the fox")
        many = await m.embed(["the fox", "a lazy dog"])
        raw = await m.embed(["the fox", "a lazy dog"], normalize=False)
        none = await m.embed([])
    assert one.shape == (16,) and one.dtype == np.float32
    assert many.shape == (2, 16) and many.dtype == np.float32 and none.shape == (0, 16)
    assert np.allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-6)
    assert np.allclose(raw[0], pooled(model, tokenizer, "the fox"), atol=1e-5)
    assert np.allclose(raw[1], pooled(model, tokenizer, "a lazy dog"), atol=1e-5)
    assert np.allclose(many, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert np.allclose(one, many[0], atol=1e-6)


@pytest.mark.anyio
async def test_concurrent_embeddings_are_batched_and_equal_to_embedding_alone(model, tokenizer, monkeypatch):
    async with AsyncModel(model, tokenizer, max_wait_ms=0) as m:
        alone = [await m.embed(text) for text in TEXTS]
    passes = forward_passes(model, monkeypatch)
    together = [None] * len(TEXTS)

    async def embed(m, i):
        together[i] = await m.embed(TEXTS[i])

    async with AsyncModel(model, tokenizer, max_wait_ms=200) as m:
        async with anyio.create_task_group() as tg:
            for i in range(len(TEXTS)):
                tg.start_soon(embed, m, i)
    # Gathered together, the 16 texts are cut into passes by length as one set: the 3 long ones, then the rest.
    lengths = [ids.size for ids in tokenizer.encode_for_embedding(TEXTS)]
    planned = [(len(p), max(lengths[i] for i in p)) for p in length_batches(lengths, max_tokens=m.max_batch_tokens)]
    assert sorted(embedding_passes(passes)) == sorted(planned) == [(3, 30), (13, 11)]
    assert np.abs(np.stack(together) - np.stack(alone)).max() <= 1e-5


@pytest.mark.anyio
async def test_batches_keep_within_max_batch_tokens(model, tokenizer, monkeypatch):
    passes = forward_passes(model, monkeypatch)
    async with AsyncModel(model, tokenizer, max_batch_tokens=64, max_wait_ms=0) as m:
        vectors = await m.embed(TEXTS)  # one call, many texts: split over passes of at most 64 padded tokens
        alone = np.stack([await m.embed(text) for text in TEXTS])
    shapes = embedding_passes(passes)[:-len(TEXTS)]
    assert len(shapes) > 1 and all(batch * seq <= 64 for batch, seq in shapes)
    assert sum(batch for batch, _ in shapes) == len(TEXTS)
    assert np.abs(vectors - alone).max() <= 1e-5


@pytest.mark.anyio
async def test_texts_share_a_pass_with_texts_of_about_their_length(model, tokenizer, monkeypatch):
    rng = np.random.default_rng(0)
    lengths = rng.permutation([*rng.integers(30, 33, 64), *rng.integers(15, 18, 64)])
    texts = [rng.integers(0, tokenizer.vocab_size, n).tolist() for n in lengths]
    async with AsyncModel(model, tokenizer, max_wait_ms=0) as m:
        alone = np.stack([(await m.embed([ids]))[0] for ids in texts])
        passes = forward_passes(model, monkeypatch)
        together = await m.embed(texts)  # once one pass of 128 x 32 tokens (a power of two) for their 3,016
    padded = sum(batch * seq for batch, seq in embedding_passes(passes))
    assert padded <= 1.1 * sum(lengths), embedding_passes(passes)
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-7)  # in the texts' order, as computed alone


# ---------------------------------------------------------------------------------------------------------------
# generation


def expected(model, tokenizer, prompt, **settings) -> Completion:
    generation = generate(model, tokenizer, prompt, **settings)
    for _ in generation:
        pass
    return Completion(generation.text, generation.finish_reason, len(generation.prompt_ids),
                      len(generation.token_ids))


@pytest.fixture(scope="module")
def requests(model, tokenizer):
    """(prompt, settings) of varied generations, one ending on a stop string that greedy decoding produces."""
    greedy, _ = complete(model, tokenizer, "lazy", max_new_tokens=12, temperature=0)
    return [("the fox", dict(max_new_tokens=10, temperature=0)),
            ("the fox", dict(max_new_tokens=10, temperature=1.0, seed=7)),
            ("a", dict(max_new_tokens=20, temperature=0.8, top_k=5, seed=3)),
            ("pack my box", dict(max_new_tokens=6, top_p=0.9, seed=11)),
            ("lazy", dict(max_new_tokens=12, temperature=0, stop=greedy[4:6])),
            ("", dict(max_new_tokens=5, temperature=1.3, seed=0)),
            ("quick", dict(max_new_tokens=40, temperature=0.5, top_k=3, top_p=0.8, seed=5)),
            ("o" * (CONTEXT - 2), dict(max_new_tokens=9, temperature=0)),
            ("dog", dict(max_new_tokens=15, seed=42))]


@pytest.mark.anyio
async def test_generation_matches_complete(model, tokenizer, requests):
    async with AsyncModel(model, tokenizer) as m:
        for prompt, settings in requests:
            assert await m.generate(prompt, **settings) == expected(model, tokenizer, prompt, **settings)
        # A prompt that fills the context goes on past it (a context shift at its first new token).
        full = await m.generate("o" * CONTEXT, max_new_tokens=2 * CONTEXT, temperature=0)
        assert full == expected(model, tokenizer, "o" * CONTEXT, max_new_tokens=2 * CONTEXT, temperature=0)
        assert full.finish_reason == "length" and full.completion_tokens == 2 * CONTEXT
    reasons = {expected(model, tokenizer, prompt, **settings).finish_reason for prompt, settings in requests}
    assert reasons == {"stop", "length"}


@pytest.mark.anyio
async def test_concurrent_generations_each_match_their_sequential_result(model, tokenizer, requests, monkeypatch):
    steps = decoding_steps(monkeypatch)
    results = [None] * len(requests)

    async def run(i, m):
        prompt, settings = requests[i]
        results[i] = await m.generate(prompt, **settings)

    async with AsyncModel(model, tokenizer, max_streams=4) as m:  # fewer rows than requests: some wait
        async with anyio.create_task_group() as tg:
            for i in range(len(requests)):
                tg.start_soon(run, i, m)
    for (prompt, settings), result in zip(requests, results):
        assert result == expected(model, tokenizer, prompt, **settings), (prompt, settings)
    assert max(steps.calls) == 4, "requests should have been decoded together"


@pytest.mark.anyio
async def test_stream_pieces_join_to_the_completion(model, tokenizer, requests):
    async with AsyncModel(model, tokenizer) as m:
        for prompt, settings in requests:
            pieces = [piece async for piece in m.stream(prompt, **settings)]
            assert "".join(pieces) == (await m.generate(prompt, **settings)).text
            assert all(pieces)
        pieces = [piece async for piece in m.stream("the fox", max_new_tokens=10, temperature=0)]
    assert len(pieces) > 1


@pytest.mark.anyio
async def test_a_row_that_shifts_its_context_leaves_the_others_as_they_were(model, tokenizer, monkeypatch):
    long_prompt, short_prompt = tokenizer.encode("o" * (CONTEXT - 2)), tokenizer.encode("the fox")
    long_run = dict(max_new_tokens=2 * CONTEXT, temperature=0.8, seed=4)  # its context fills, and shifts, 4 times
    short_run = dict(max_new_tokens=20, temperature=0)  # 7 + 20 tokens: never full
    async with AsyncModel(model, tokenizer, max_streams=2) as m:
        alone = await m.generate(short_prompt, **short_run)
        prefills = Gate(monkeypatch, Decoder, "prefill_rows",
                        lambda decoder, rows, prompts, **_: (list(rows), [len(p) for p in prompts]))
        steps = decoding_steps(monkeypatch, held=True)
        results = {}

        async def run(name, prompt, settings):
            results[name] = await m.generate(prompt, **settings)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "long", long_prompt, long_run)
            await steps.wait_entered()  # the long one is prefilled and its first step held ...
            tg.start_soon(run, "short", short_prompt, short_run)
            await anyio.wait_all_tasks_blocked()  # ... while the short one waits to join the next
            steps.open()
    # The long one's row (0) is prefilled afresh with the last half of its context whenever it is full; the
    # short one (row 1) steps alone meanwhile and gets what it gets alone.
    assert prefills.calls[:3] == [([0], [CONTEXT - 2]), ([1], [7]), ([0], [CONTEXT // 2])]
    assert prefills.calls[3:] == [([0], [CONTEXT // 2])] * 3
    assert steps.calls[:3] == [1, 2, 1]
    assert results["short"] == alone == expected(model, tokenizer, "the fox", **short_run)
    assert results["long"] == expected(model, tokenizer, long_prompt.tolist(), **long_run)
    assert results["long"].completion_tokens == 2 * CONTEXT and results["long"].finish_reason == "length"


# ---------------------------------------------------------------------------------------------------------------
# backpressure and cancellation


@pytest.mark.anyio
@pytest.mark.parametrize("queue_timeout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["embed", "generate"])
async def test_a_full_queue_raises_overloaded(model, tokenizer, monkeypatch, kind, queue_timeout):
    passes = forward_passes(model, monkeypatch, held=True)
    results = []
    async with AsyncModel(model, tokenizer, max_queue=2, max_wait_ms=0, max_streams=1,
                          queue_timeout=queue_timeout) as m:
        def call(text):
            ids = tokenizer.encode(text)
            return m.embed([ids]) if kind == "embed" else m.generate(ids, max_new_tokens=3, temperature=0)

        async def request(text):
            results.append(await call(text))

        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "the fox")
            await passes.wait_entered()  # the model is busy with the first request ...
            tg.start_soon(request, "a dog")
            tg.start_soon(request, "lazy")
            await anyio.wait_all_tasks_blocked()  # ... and the next two fill the queue
            started = anyio.current_time()
            with pytest.raises(Overloaded):
                await call("one too many")
            waited = anyio.current_time() - started
            passes.open()
    assert len(results) == 3
    if queue_timeout == 0:
        assert waited < 0.1
    else:
        assert queue_timeout - 0.01 <= waited < queue_timeout + 1


@pytest.mark.anyio
async def test_a_cancelled_embedding_caller_does_not_break_its_batch(model, tokenizer, monkeypatch):
    alone = {text: pooled(model, tokenizer, text) for text in TEXTS[:4]}
    passes = forward_passes(model, monkeypatch, held=True)
    scopes, results = {}, {}

    async def embed(text):
        with anyio.CancelScope() as scopes[text]:
            results[text] = (await m.embed([tokenizer.encode(text)], normalize=False))[0]

    async with AsyncModel(model, tokenizer, max_wait_ms=100) as m:
        async with anyio.create_task_group() as tg:
            for text in TEXTS[:4]:
                tg.start_soon(embed, text)
            await passes.wait_entered()  # all four are in the batch now running
            tg.start_soon(embed, TEXTS[4])  # queued behind it
            await anyio.wait_all_tasks_blocked()
            scopes[TEXTS[1]].cancel()
            scopes[TEXTS[4]].cancel()
            await anyio.wait_all_tasks_blocked()
            passes.open()
    assert sorted(results) == sorted([TEXTS[0], TEXTS[2], TEXTS[3]])
    for text, vector in results.items():
        assert np.allclose(vector, alone[text], atol=1e-5)
    assert embedding_passes(passes) == [(4, 16)], "the cancelled queued text must not be embedded"


@pytest.mark.anyio
async def test_a_cancelled_generation_frees_its_row_and_spares_its_batch(model, tokenizer, monkeypatch):
    steps = decoding_steps(monkeypatch, held=True)
    long_run = dict(max_new_tokens=CONTEXT - 8, temperature=0)  # within the context: every token is a step
    scope, streamed, results = anyio.CancelScope(), [], {}

    async def stream(prompt):
        with scope:
            async for piece in m.stream(tokenizer.encode(prompt), **long_run):
                streamed.append(piece)

    async def run(prompt):
        results[prompt] = await m.generate(tokenizer.encode(prompt), **long_run)

    async with AsyncModel(model, tokenizer, max_streams=2) as m:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream, "a")
            tg.start_soon(run, "the fox")
            await steps.wait_entered()  # both are prefilled and their first step is held
            tg.start_soon(run, "lazy")  # waits for a free row
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            steps.open()
    served_steps = list(steps.calls)  # before expected() decodes too
    assert streamed == [], "a cancelled caller gets nothing"
    for prompt in ("the fox", "lazy"):
        assert results[prompt] == expected(model, tokenizer, prompt, **long_run)
    # "a" took part in one step only: its row went to "lazy" at once, not after its 24 tokens.
    assert sum(served_steps) == 1 + sum(results[p].completion_tokens - 1 for p in ("the fox", "lazy"))
    assert served_steps[:2] == [2, 2], "lazy should join at the step right after the cancellation"


@pytest.mark.anyio
async def test_health_counts_the_decoder_rows_in_use_as_slots(model, tokenizer, monkeypatch):
    steps = decoding_steps(monkeypatch, held=True)
    async with AsyncModel(model, tokenizer, max_streams=3) as m:
        async with anyio.create_task_group() as tg:
            for prompt in ("a", "the fox"):
                tg.start_soon(functools.partial(m.generate, tokenizer.encode(prompt), max_new_tokens=3, temperature=0))
            await steps.wait_entered()  # both are prefilled and their first step is held
            during = m.health()
            steps.open()
        assert (during["slots_processing"], during["slots_idle"]) == (2, 1)
        assert (m.health()["slots_processing"], m.health()["slots_idle"]) == (0, 3)


# ---------------------------------------------------------------------------------------------------------------
# lifecycle, errors, files


def test_leaving_the_context_fails_pending_calls_and_leaves_no_threads(model, tokenizer, monkeypatch,
                                                                      anyio_backend):
    def anyio_workers():
        return {t for t in threading.enumerate() if t.name.startswith("AnyIO worker")}

    before = anyio_workers()
    passes = forward_passes(model, monkeypatch, held=True)
    outcomes = {}

    async def call(name, request):
        try:
            outcomes[name] = await request()
        except RuntimeError as e:
            outcomes[name] = e

    async def main():
        async with anyio.create_task_group() as callers:
            async with AsyncModel(model, tokenizer, max_wait_ms=0) as m:
                callers.start_soon(call, "running", lambda: m.embed("the fox"))
                await passes.wait_entered()
                callers.start_soon(call, "queued", lambda: m.embed("lazy dog"))
                callers.start_soon(call, "generating", lambda: m.generate("the", temperature=0))
                await anyio.wait_all_tasks_blocked()
                passes.open()
        with pytest.raises(RuntimeError, match="not running"):
            await m.embed("too late")
        with pytest.raises(RuntimeError, match="not running"):
            m.stream("too late")

    anyio.run(main, backend=anyio_backend)
    for name in ("queued", "generating"):
        assert isinstance(outcomes[name], RuntimeError) and "closed" in str(outcomes[name])
    assert isinstance(outcomes["running"], (np.ndarray, RuntimeError))
    deadline = threading.Event()
    for _ in range(100):
        if not anyio_workers() - before:
            break
        deadline.wait(0.02)
    assert not anyio_workers() - before, "worker threads outlived the event loop"


@pytest.mark.anyio
async def test_calls_outside_the_context_raise(model, tokenizer):
    m = AsyncModel(model, tokenizer)
    with pytest.raises(RuntimeError, match="not running"):
        await m.embed("the fox")
    with pytest.raises(RuntimeError, match="not running"):
        await m.generate("the fox")
    async with m:
        with pytest.raises(RuntimeError, match="already running"):
            await m.__aenter__()
        assert (await m.embed("the fox")).shape == (16,)


@pytest.mark.anyio
@pytest.mark.parametrize("call, message", [
    (lambda m: m.embed(""), "empty"),
    (lambda m: m.embed(["the fox", ""]), r"texts\[1\] is empty"),
    (lambda m: m.embed("o" * (CONTEXT + 1)), f"33 tokens long but the model's context holds only {CONTEXT}"),
    (lambda m: m.embed([b"bytes"]), "must be a string"),
    (lambda m: m.generate("o" * (CONTEXT + 1)), "prompt is 33 tokens long"),
    (lambda m: m.generate("a", max_new_tokens=-1), "max_new_tokens"),
    (lambda m: m.generate("a", temperature=-1.0), "temperature"),
    (lambda m: m.generate("a", top_k=0), "top_k"),
    (lambda m: m.generate("a", top_p=1.5), "top_p"),
    (lambda m: m.generate("a", seed=-1), "seed"),
    (lambda m: m.generate("a", stop=[""]), "stop"),
    (lambda m: m.generate([1, 10**6]), "token ids outside"),
    (lambda m: m.embed([[1, -1]]), r"texts\[0\] holds token ids outside"),
    (lambda m: m.embed([[]]), "empty"),
])
async def test_bad_input_raises_usage_error(model, tokenizer, call, message):
    async with AsyncModel(model, tokenizer) as m:
        with pytest.raises(UsageError, match=message):
            await call(m)
        with pytest.raises(UsageError, match="top_k"):
            m.stream("a", top_k=-3)  # checked at the call, before any iteration
        assert (await m.embed("still serving")).shape == (16,)


@pytest.mark.parametrize("setting", [dict(max_queue=0), dict(max_streams=0), dict(threads=0),
                                     dict(max_batch_tokens=-1), dict(max_wait_ms=-1.0),
                                     dict(queue_timeout=float("inf")), dict(batch_timeout=0)])
def test_bad_settings_raise_usage_error(model, tokenizer, setting):
    with pytest.raises(UsageError, match=next(iter(setting))):
        AsyncModel(model, tokenizer, **setting)


@pytest.mark.anyio
async def test_open_a_model_file_and_describe_it(model, tokenizer, tmp_path):
    save_model(tmp_path / "model.cllm", model, tokenizer)
    async with AsyncModel.open(tmp_path / "model.cllm", max_streams=2) as m:
        info = json.loads(json.dumps(m.info()))
        assert info["config"] == model.config.to_dict() and info["limits"]["max_streams"] == 2
        assert info["embedding_dim"] == 16 and info["context_length"] == CONTEXT
        assert m.count_tokens("the fox") == 7 and m.config == model.config
        assert await m.generate("the", max_new_tokens=5, temperature=0) == expected(
            model, tokenizer, "the", max_new_tokens=5, temperature=0)


# ---------------------------------------------------------------------------------------------------------------
# failing and stalled batches


def test_serving_faults_come_from_cllm_fault_beside_the_spheres_ones():
    assert parse_serving_faults("hang:3:5, raise:embed:2,hang:decode:1") == [
        ServingFault("raise", "embed", 2), ServingFault("hang", "decode", 1)]
    with pytest.raises(UsageError, match="KIND is hang or raise"):
        parse_serving_faults("stall:embed:1")
    with pytest.raises(UsageError, match="KIND:WORK:N"):
        parse_serving_faults("hang:embed:first")


@pytest.mark.anyio
async def test_a_failing_batch_fails_only_its_own_requests(model, tokenizer, monkeypatch):
    monkeypatch.setenv("CLLM_FAULT", "raise:embed:1,raise:decode:1")  # the first batch of each kind raises
    async with AsyncModel(model, tokenizer) as m:
        with pytest.raises(RuntimeError, match="injected fault: this embedding batch raised"):
            await m.embed("the fox")
        assert np.allclose(await m.embed("the fox", normalize=False), pooled(model, tokenizer, "the fox"),
                           atol=1e-5)
        with pytest.raises(RuntimeError, match="injected fault: this decoding step raised"):
            await m.generate("the fox", max_new_tokens=5, temperature=0)
        settings = dict(max_new_tokens=5, temperature=0)
        assert await m.generate("the fox", **settings) == expected(model, tokenizer, "the fox", **settings)
        assert m.health() == {"status": "ok", "queued": {"embed": 0, "generate": 0}, "slots_idle": 8,
                              "slots_processing": 0}


@pytest.mark.anyio
@pytest.mark.parametrize("work", ["embed", "decode"])
async def test_a_stalled_batch_fails_its_requests_at_its_deadline_and_later_ones_are_served(
        model, tokenizer, work):
    settings = dict(max_new_tokens=6, temperature=0)
    m = AsyncModel(model, tokenizer, batch_timeout=0.5, faults=[ServingFault("hang", work, 1)])
    async with m:
        call = (lambda: m.embed("the fox")) if work == "embed" else (lambda: m.generate("the fox", **settings))
        started = time.monotonic()
        with pytest.raises(EngineStalled, match="did not finish within its 0.5 s deadline"):
            await call()
        assert time.monotonic() - started < 0.5 + 20  # the deadline, not the stall (which never ends)
        health = m.health()
        what = "embedding batch" if work == "embed" else "decoding step"
        assert health["status"] == "stalled" and f"the oldest, a {what}" in health["reason"]
        # Served on, by another thread and with new buffers; the stuck thread keeps the old ones.
        assert np.allclose(await m.embed("lazy dog", normalize=False), pooled(model, tokenizer, "lazy dog"),
                           atol=1e-5)
        assert await m.generate("lazy", **settings) == expected(model, tokenizer, "lazy", **settings)
    # Leaving did not wait for the stuck thread: this test's timeout would have ended it.
    assert m.health()["status"] == "stopped"


@pytest.mark.anyio
async def test_a_stalled_batchs_buffers_are_never_used_again(model, tokenizer, monkeypatch):
    """A kernel stuck inside a forward pass or a decoding step may write its workspace or KV cache at any time:
    the batches after it must get buffers of their own."""
    release, stuck, buffers, decoders = threading.Event(), [], [], []
    forward_ws, step = model.forward_ws, Decoder.step

    def forward_stuck_once(ws, *args, **kwargs):
        buffers.append(ws.buffer.ctypes.data)
        if len(buffers) == 1:
            stuck.append(ws)
            release.wait(30)  # stuck, until the test ends
        return forward_ws(ws, *args, **kwargs)

    def step_stuck_once(decoder, *args, **kwargs):
        decoders.append(decoder.k_cache.ctypes.data)
        if len(decoders) == 1:
            release.wait(30)
        return step(decoder, *args, **kwargs)

    monkeypatch.setattr(model, "forward_ws", forward_stuck_once)
    monkeypatch.setattr(Decoder, "step", step_stuck_once)
    try:
        async with AsyncModel(model, tokenizer, batch_timeout=0.5) as m:
            with pytest.raises(EngineStalled):
                await m.embed(["the fox", "lazy"])
            await m.embed(["a dog", "quick"])  # the same shape
            with pytest.raises(EngineStalled):
                await m.generate("the", max_new_tokens=4, temperature=0)
            await m.generate("the", max_new_tokens=4, temperature=0)
    finally:
        release.set()
    embedding_buffers = buffers[:2]  # the prefills' passes come after
    assert embedding_buffers[0] != embedding_buffers[1]
    assert decoders[0] not in decoders[1:]


def test_leaving_the_context_does_not_wait_for_a_stuck_call(model, tokenizer, monkeypatch, anyio_backend):
    passes = forward_passes(model, monkeypatch, held=True)  # held until the test ends: a stuck kernel
    outcome = []

    async def main():
        async with anyio.create_task_group() as callers:
            async with AsyncModel(model, tokenizer, batch_timeout=3600) as m:
                async def call():
                    try:
                        await m.embed("the fox")
                    except RuntimeError as e:
                        outcome.append(e)

                callers.start_soon(call)
                await passes.wait_entered()

    try:
        anyio.run(main, backend=anyio_backend)  # returns, though the call in flight does not
    finally:
        passes.open()
    assert len(outcome) == 1 and "closed" in str(outcome[0])


# ---------------------------------------------------------------------------------------------------------------
# threads


def blas_threads() -> int:
    return min(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


def kernel_and_blas_threads(model, monkeypatch) -> list:
    """Records, for each forward pass (embedding batches and prefills), in its worker thread: the threads the
    kernels were given, the BLAS threads in force, and cllm's BLAS limit."""
    seen = []
    forward_ws = model.forward_ws

    def observed(ws, tokens, targets, **kwargs):
        seen.append((kwargs["threads"], blas_threads(), current_blas_limit()))
        return forward_ws(ws, tokens, targets, **kwargs)

    monkeypatch.setattr(model, "forward_ws", observed)
    return seen


@pytest.mark.anyio
async def test_the_kernels_and_blas_have_the_threads(model, tokenizer, monkeypatch):
    seen = kernel_and_blas_threads(model, monkeypatch)
    async with AsyncModel(model, tokenizer, threads=2) as m:
        await m.embed(["the fox", "lazy"])
        await m.generate("the", max_new_tokens=3, temperature=0)
    # The kernels (cllm's GEMM included) run on the budget; BLAS, held at it too, computes only one-row products,
    # never from inside the kernels' threads.
    assert len(seen) == 2 and set(seen) == {(2, 2, 2)}
    assert current_blas_limit() is None


@pytest.mark.anyio
async def test_the_blas_limit_nests_with_other_holders(model, tokenizer, monkeypatch):
    seen = kernel_and_blas_threads(model, monkeypatch)
    with blas_limit(1):  # a trainer in the same process, say
        async with AsyncModel(model, tokenizer, threads=2) as m:
            await m.embed("the fox")
        assert current_blas_limit() == 1 and blas_threads() == 1  # the outer holder's limit is still in force
    # BLAS is on one thread (the smaller limit); the kernels use the two.
    assert seen == [(2, 1, 1)]


@pytest.mark.anyio
async def test_tokenizing_happens_in_a_worker_thread(model, tokenizer, monkeypatch):
    threads = []
    encode, encode_for_embedding = tokenizer.encode, tokenizer.encode_for_embedding

    def recorded(text):
        threads.append(threading.get_ident())
        return encode(text)

    def recorded_for_embedding(texts):
        texts = list(texts)
        threads.extend([threading.get_ident()] * len(texts))
        return encode_for_embedding(texts)

    monkeypatch.setattr(tokenizer, "encode", recorded)
    monkeypatch.setattr(tokenizer, "encode_for_embedding", recorded_for_embedding)
    async with AsyncModel(model, tokenizer) as m:
        await m.embed(["the fox", "lazy"])
        await m.generate("the", max_new_tokens=2, temperature=0)
        async for _ in m.stream("a", max_new_tokens=2, temperature=0):
            pass
        ids = await m.tokenize(["pack my box"])
        assert await m.embed(ids) == pytest.approx(await m.embed(["pack my box"]), abs=1e-6)
    assert len(threads) == 6 and threading.get_ident() not in threads

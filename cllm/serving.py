"""The async serving API: one model shared by many concurrent callers, on asyncio or trio (through anyio).

    async with AsyncModel.open("model.cllm") as model:
        vectors = await model.embed(["first text", "second text"])        # (2, dim) float32, unit length
        completion = await model.generate("Once upon a time", max_new_tokens=50, temperature=0)
        async for piece in model.stream("def ", temperature=0.8, seed=1):
            print(piece, end="")

Embeddings are the final hidden states (after the final norm) averaged over the text's own tokens (pooling
"mean", masked: padding never counts) or the last token's (pooling "last"), then scaled to unit L2 norm unless
normalize=False (cllm.pooling). The model is causal, so padding after a text does not change its hidden states:
a text's embedding is the same alone or batched with others, up to float32 rounding. An embedding model's declared
defaults (cllm.embedding_config: a sentence-transformers folder's) are the engine's: its pooling (unless the
constructor's pooling says otherwise) and normalization, and its prompts, one of which embed() puts before each
text when asked by name (prompt_name="query"), or its default one; prompt="..." gives one whole. A text to embed is
tokenized with every token the tokenizer adds around it (Tokenizer.encode_for_embedding: Qwen3-Embedding's
appended <|endoftext|>, which its last-token pooling pools), and truncation keeps those.

Text or token ids. Every call takes text, or token ids instead (`await model.tokenize(texts)` gives them): a
server that counts a request's tokens against its limits tokenizes once and hands the ids on. Tokenizing runs
in a worker thread, never on the event loop.

Chat. encode_chat(messages) renders them with the model's chat template on daemon threads of its own (at most
RENDER_THREADS at once), never on the worker threads that tokenization shares: a template comes with the model, and
a slow one must not hold up every route that tokenizes. A render ends itself at cllm.template_sandbox's
RENDER_SECONDS; one still running at RENDER_TIMEOUT (stuck in a single long call) fails its request with
TemplateLimitExceeded, its thread is abandoned, and health() reports the engine as degraded until it ends. The
rendered text's ids come from the tokenization rounds, with the other requests' texts.

Batching. Concurrent embed() calls are queued, and one batcher task gathers their texts, waiting for more at most
max_wait_ms after the oldest was queued, and cuts the texts gathered into passes by length as Model.encode does
(cllm.pooling.length_batches: texts of about the same length together, each pass padded to its longest text, of
at most max_batch_tokens padded tokens); it runs the pass that holds the oldest text, and gathers again. A single
text longer than that budget runs alone. Generations share one Decoder of max_streams rows (continuous
batching): a request joins at the next decoding step (its prompt prefilled into a free row, and scored in the
same forward pass if it asks for its prompt's logprobs), decodes with its own sampling settings and seeded
generator, and leaves when it ends or its caller goes, freeing the row for the next in the queue. A generation
gets the tokens that cllm.generate.complete gets with the same settings: bit for bit when it decodes alone, and
up to float32 rounding of its logits when batched with others (which can only change a token at a near-tie).
That includes the context shift (cllm.generate's module notes): a row whose cache is full when it needs another
token is prefilled afresh, within the same decoding step, with the last context_length // 2 tokens of its prompt
and generation, while the other rows step as usual; a generation is bounded by its max_new_tokens, not by the
context.

Threads. Model work runs on daemon worker threads (cllm.threads.run_sync_daemon), one call at a time (an
embedding batch and a decoding step would only compete for the same cores), so the event loop never waits for
it. The kernels run on `threads` OpenMP threads, their products included (cllm's own GEMM); BLAS is held at
`threads` too (cllm.threads.blas_limit, which nests with other holders such as a trainer) for the one-row
products it computes, which never run inside a kernel's own threads.

Failures. A batch (an embedding forward pass, or a decoding step with the prefills of the rows that join it)
that raises fails its own requests with that exception, and the next batch is served as usual. A batch that
runs past batch_timeout seconds fails its requests with EngineStalled at once; its thread, which nothing can
interrupt, is abandoned, and the buffers it may still be writing (workspaces, the decoder's KV cache) are never
used again: later batches get new ones. health() reports the engine as stalled while an abandoned call is still
running.

Backpressure. Each queue (embeddings, generations) holds at most max_queue waiting requests. A request that
finds its queue full raises Overloaded at once, or, with queue_timeout > 0, after waiting that many seconds
for room.

Cancellation. A cancelled caller gets nothing and costs nothing more: its texts are dropped from the batches
not yet run, its generation's row is freed before the next step, and the requests it was batched with carry
on unaffected. Leaving `async with` does not wait for the model call in flight (it runs on, its result
dropped), stops the batcher tasks, and fails every pending call with RuntimeError.

Testing. `faults` (or the environment variable CLLM_FAULT) makes chosen batches hang or raise in their worker
thread, as a deadlocked kernel or a bug would: ServingFault("hang", "embed", 1) blocks the first embedding
batch forever in native code without the GIL (cllm._kernels.fault.hang), "raise:decode:3" makes the third
decoding step raise. CLLM_FAULT is a comma-separated list of KIND:WORK:N; its entries for the trainer's spheres
(KIND:SPHERE:STEP) are left to them.
"""
from __future__ import annotations

import functools
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._kernels.fault import hang
from .chat import RenderedChat
from .checkpoint import load_model
from .checks import require_int
from .embedding_config import EmbeddingConfig
from .errors import UsageError
from .generate import (
    Completion,
    Continuation,
    Decoder,
    Sampling,
    TokenLogprob,
    check_generation,
    feed,
    prefill,
    token_ids,
)
from .model import GPT, ForwardWorkspaces, ModelConfig
from .pooling import check_pooling, embed_batch, fit_to_context, length_batches
from .template_sandbox import RENDER_SECONDS, TemplateLimitExceeded
from .threads import blas_limit, run_sync_daemon
from .tokenizer import Tokenizer

NOT_RUNNING = "the model is not running: use it inside `async with AsyncModel(...) as model:`"
CLOSED_WHILE_PENDING = "the model was closed before this request finished"
DEFAULT_BATCH_TIMEOUT = 60.0  # seconds; a batch takes milliseconds, so only a stuck one comes near
RENDER_THREADS = 4  # chat renders at once: a render takes a millisecond or two
RENDER_TIMEOUT = 2 * RENDER_SECONDS  # a render past this is stuck in one call that its own deadline cannot stop
DEFAULT_MAX_QUEUE = 512  # requests waiting in each queue: as many as the server lets in (ServerLimits)


class Overloaded(Exception):
    """The request queue is full; try again later (HTTP 429)."""


class EngineStalled(Exception):
    """The batch this request was in missed its deadline, and its worker thread was abandoned (HTTP 503)."""


@dataclass(frozen=True)
class ServingFault:
    """A fault to inject, for tests: the n-th call (from 1) of one kind of model work hangs or raises."""
    kind: str  # "hang" (block forever in native code, as a deadlocked kernel) or "raise"
    work: str  # "embed" (an embedding batch) or "decode" (a decoding step, prefills included)
    n: int

    def __post_init__(self):
        if self.kind not in ("hang", "raise") or self.work not in ("embed", "decode") or self.n < 1:
            raise UsageError(f"bad serving fault {self}: KIND is hang or raise, WORK embed or decode, N from 1")


def parse_serving_faults(spec: str) -> list[ServingFault]:
    """The serving faults of a CLLM_FAULT value (KIND:WORK:N entries; the spheres' KIND:SPHERE:STEP are not ours)."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        if len(parts) == 3 and parts[1] in ("embed", "decode"):
            if not parts[2].isdigit():
                raise UsageError(f"bad fault {item!r}: expected KIND:WORK:N, e.g. hang:embed:1")
            faults.append(ServingFault(parts[0], parts[1], int(parts[2])))
    return faults


@dataclass(eq=False)
class _EmbeddingRequest:
    """One embed() call, as the batcher sees it."""
    texts: list[np.ndarray]  # token ids
    normalize: bool
    pooling: str  # one of pooling.POOLINGS
    queued_at: float  # anyio.current_time()
    results: MemoryObjectSendStream[np.ndarray]  # receives `vectors` once every text is done
    vectors: np.ndarray  # (len(texts), dim), filled in batch by batch
    done: int = 0
    error: BaseException | None = None  # why a batch holding one of its texts failed

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.results.close()

    def gone(self) -> bool:
        """Nothing more to do for it: its caller stopped listening, or it has failed."""
        return self.error is not None or _abandoned(self.results)


@dataclass(eq=False)
class _GenerationRequest:
    """One choice of a generate() or stream() call, as the decoding loop sees it."""
    continuation: Continuation
    # (index, text, tokens generated so far, finish reason or None) per settled piece, and one last time when the
    # continuation ends; the stream may be shared by the call's choices, each closing its own clone.
    results: MemoryObjectSendStream[tuple[int, str, int, str | None]]
    index: int = 0  # which of the call's choices
    completed: bool = False  # every piece was delivered (the stream was not closed by a shutdown)
    error: BaseException | None = None  # why a decoding step it was in failed

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.results.close()

    def deliver(self, piece: str) -> None:
        """Sends what the continuation's last advance settled, and closes the results once it has ended."""
        continuation = self.continuation
        if (piece or continuation.finished) and not _abandoned(self.results):
            # Never blocks: the stream is unbounded.
            self.results.send_nowait((self.index, piece, len(continuation.token_ids), continuation.finish_reason))
        if continuation.finished:
            self.completed = True
            self.results.close()


class Delta(NamedTuple):
    """What one choice of a CompletionStream settled: text (maybe ""), the logprobs of the tokens generated since
    its previous delta (empty unless asked for; on its first delta, led by its prompt's when prompt_logprobs were
    asked for), and on its last delta, its finish reason."""
    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


class CompletionStream(AsyncIterator[str]):
    """The continuations of one call as they are decoded: one choice (stream()), or several (stream_choices()).

    Iterate a single-choice stream for its text pieces, or any stream with next_delta() for Deltas, which say
    which choice they belong to and carry logprobs and finish reasons. A choice's Completion is in `completions`
    once its last delta has come, and `completion` is the first choice's once the stream has ended (None until
    then).

    The request is queued by `await start()`, or by the first iteration: a prompt the model cannot take
    (UsageError) or a full queue (Overloaded) is raised there, and then none of its choices is queued. A caller
    cancelled while it waits is gone, and its decoder rows are freed; `wait(seconds)` waits for the next delta
    without that, for a server that has something to do meanwhile (a keep-alive). aclose() frees the rows too.
    """

    def __init__(self, model: AsyncModel, prompts: Sequence[str | Sequence[int]], settings: Sequence[dict]):
        self._model, self._prompts, self._settings = model, prompts, settings
        self._requests: list[_GenerationRequest] = []
        self._deltas: MemoryObjectReceiveStream[tuple[int, str, int, str | None]] | None = None
        self._next: tuple | object | None = None  # received by wait() and not yet taken, or _END
        self._texts: list[list[str]] = [[] for _ in settings]
        self._tokens = [0] * len(settings)  # per choice, the tokens its deltas so far cover
        self._closed = self._ended = False
        self.completions: list[Completion | None] = [None] * len(settings)

    @property
    def completion(self) -> Completion | None:
        return self.completions[0] if self._ended else None

    async def start(self) -> None:
        """Queues every choice, once."""
        if self._requests or self._closed:
            return
        continuations = [await self._model._continuation(prompt, settings)
                         for prompt, settings in zip(self._prompts, self._settings)]
        # Unbounded, so that the decoding loop never waits for a slow reader; a choice sends at most
        # max_new_tokens + 1 items.
        results, deltas = anyio.create_memory_object_stream[tuple[int, str, int, str | None]](math.inf)
        requests = [_GenerationRequest(c, results.clone(), index) for index, c in enumerate(continuations)]
        results.close()  # the choices' clones keep it open until each has ended
        queued = 0
        try:
            for request in requests:
                await self._model._submit(self._model._generations, request)
                queued += 1
        except BaseException:
            deltas.close()  # the choices already queued see that nobody listens, and are dropped
            for request in requests[queued:]:
                request.results.close()
            raise
        self._requests, self._deltas = requests, deltas

    async def wait(self, seconds: float) -> bool:
        """Whether the next delta (or the end) has come, waiting for it at most `seconds`; starts the request."""
        await self.start()
        if self._next is None and not self._closed:
            with anyio.move_on_after(seconds):
                try:
                    self._next = await self._deltas.receive()  # cancelled, it loses nothing
                except anyio.EndOfStream:
                    self._next = _END
        return self._next is not None or self._closed

    async def next_delta(self) -> Delta | None:
        """The next Delta of any choice, or None once every choice has ended."""
        try:
            await self.wait(math.inf)
        except anyio.get_cancelled_exc_class():
            self._close()  # the caller has gone: its rows are freed before the next step
            raise
        if self._closed:
            return None
        if self._next is _END:
            self._finish()
            return None
        (index, piece, tokens, finish_reason), self._next = self._next, None
        c = self._requests[index].continuation
        # In before it was sent; the last delta's run to the end, the end token's included (Continuation.logprobs).
        logprobs = [] if c.logprobs is None else c.logprobs[self._tokens[index]:None if finish_reason else tokens]
        if c.prompt_logprobs is not None and not self._texts[index]:  # its first delta, after the prefill
            logprobs = c.prompt_logprobs + logprobs
        self._tokens[index] = tokens
        self._texts[index].append(piece)
        if finish_reason is not None:
            self.completions[index] = Completion("".join(self._texts[index]), finish_reason, len(c.prompt_ids),
                                                 len(c.token_ids), c.logprobs, c.prompt_logprobs)
        return Delta(index, piece, logprobs, finish_reason)

    async def __anext__(self) -> str:
        while (delta := await self.next_delta()) is not None:
            if delta.text:
                return delta.text
        raise StopAsyncIteration

    def _finish(self) -> None:
        for request in self._requests:
            if request.error is not None:
                raise request.error
        if not all(request.completed for request in self._requests):
            raise RuntimeError(CLOSED_WHILE_PENDING)
        self._ended = True

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self._deltas is not None:
            self._deltas.close()  # the decoding loop sees that nobody listens, and frees the rows


_END = object()  # the end of a CompletionStream's pieces


class _ModelCall:
    """One call into the model on a worker thread: what it is, when it started, whether it still runs (set by
    the worker thread, read by health()), and the fault to inject into it, if any."""

    def __init__(self, what: str, fault: str | None):
        self.what, self.fault = what, fault
        self.started = time.monotonic()
        self.running = True

    def run(self, fn, *args):
        try:
            if self.fault == "hang":
                hang()
            if self.fault == "raise":
                raise RuntimeError(f"injected fault: this {self.what} raised")
            return fn(*args)
        finally:
            self.running = False


class AsyncModel:
    """A model and its tokenizer, serving concurrent embed, generate and stream calls (see the module notes).

    Use it as `async with AsyncModel(model, tokenizer) as m:` (or AsyncModel.open(path)): the context runs the
    batcher tasks, and calls outside it raise RuntimeError.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, threads: int = 1, max_batch_tokens: int = 4096,
                 max_wait_ms: float = 5.0, max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout: float = 0.0,
                 max_streams: int = 8, batch_timeout: float = DEFAULT_BATCH_TIMEOUT, pooling: str | None = None,
                 faults: Sequence[ServingFault] | None = None):
        for name, value in dict(threads=threads, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                                max_streams=max_streams).items():
            require_int(name, value)
        for name, value in dict(max_wait_ms=max_wait_ms, queue_timeout=queue_timeout).items():
            if not isinstance(value, Real) or not math.isfinite(value) or value < 0:
                raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(batch_timeout, Real) or not math.isfinite(batch_timeout) or batch_timeout <= 0:
            raise UsageError(f"batch_timeout must be a finite number > 0, got {batch_timeout!r}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.threads, self.max_batch_tokens, self.max_streams = int(threads), int(max_batch_tokens), int(max_streams)
        self.max_wait_ms, self.max_queue, self.queue_timeout = float(max_wait_ms), int(max_queue), float(queue_timeout)
        self.batch_timeout = float(batch_timeout)
        self.embedding = tokenizer.embedding or EmbeddingConfig()  # the model's declared defaults, or cllm's
        self.pooling = self.embedding.pooling if pooling is None else check_pooling(pooling)  # embed()'s default
        self.faults = parse_serving_faults(os.environ.get("CLLM_FAULT", "")) if faults is None else list(faults)
        self._calls_made = {"embed": 0, "decode": 0}  # counted for the faults
        self._decoding: dict = {}  # the decoding loop's rows in use
        self._abandoned: list[_ModelCall] = []  # calls that missed their deadline
        self._abandoned_renders: list[_ModelCall] = []  # chat renders that missed RENDER_TIMEOUT
        # Called as observer(work, size) after each batch that ran: ("embed", texts in it) or ("decode",
        # sequences it stepped). What a metrics exporter watches.
        self.observers: list[Callable[[str, int], None]] = []
        self._running: AsyncExitStack | None = None
        self._tokenize_jobs: list[_TokenizeJob] = []  # tokenize() calls waiting for the next round
        self._tokenize_round: anyio.Event | None = None  # set when the round in flight ends

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs) -> "AsyncModel":
        """Loads a .cllm model file, a GGUF file or a Hugging Face GPT-2, Llama or Qwen folder (ModelFileError if
        it is bad); kwargs as for the constructor."""
        model, tokenizer = load_model(path, threads=kwargs.get("threads", 1))
        return cls(model, tokenizer, **kwargs)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def info(self) -> dict:
        """What a client may want to know: the model's shape, the tokenizer, the serving limits, and how many
        embedding batches and decoding steps have run."""
        return {"config": self.config.to_dict(), "tokenizer": self.tokenizer.kind,
                "vocab_size": self.tokenizer.vocab_size, "embedding_dim": self.config.dim,
                "context_length": self.config.context_length,
                "limits": {"threads": self.threads, "max_batch_tokens": self.max_batch_tokens,
                           "max_wait_ms": self.max_wait_ms, "max_queue": self.max_queue,
                           "queue_timeout": self.queue_timeout, "max_streams": self.max_streams,
                           "batch_timeout": self.batch_timeout}, "pooling": self.pooling,
                "normalize": self.embedding.normalize, "prompt_names": list(self.embedding.prompts),
                "batches_run": dict(self._calls_made)}

    def health(self) -> dict:
        """{"status": "ok", "queued": requests waiting per queue, "slots_idle", "slots_processing": decoder rows
        free and in use, as llama.cpp's server counts its slots}; or "stalled" while a call that missed its
        deadline still runs in its abandoned thread (a stuck kernel never ends: the process should be restarted),
        or "stopped" outside `async with`; with a "reason". "degraded" (with the counts of "ok", and a "reason")
        while a chat render that missed RENDER_TIMEOUT still runs: everything is served, chats included."""
        if self._running is None:
            return {"status": "stopped", "reason": "the model is not running"}
        stuck = [call for call in self._abandoned if call.running]
        if stuck:
            oldest = stuck[0]
            return {"status": "stalled",
                    "reason": f"{len(stuck)} model call(s) missed the {self.batch_timeout:g} s batch deadline and "
                              f"still run in abandoned threads (the oldest, a {oldest.what}, started "
                              f"{time.monotonic() - oldest.started:.0f} s ago)"}
        # Ready, and how busy: the requests waiting, and the decoder rows in use.
        busy = len(self._decoding)
        health = {"status": "ok", "queued": self.queued(), "slots_idle": self.max_streams - busy,
                  "slots_processing": busy}
        self._abandoned_renders = [render for render in self._abandoned_renders if render.running]
        if self._abandoned_renders:  # the model serves, but the template holds threads it cannot give back
            health |= {"status": "degraded",
                       "reason": f"{len(self._abandoned_renders)} chat template render(s) missed the "
                                 f"{RENDER_TIMEOUT:g} s deadline and still run in abandoned threads"}
        return health

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    async def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The token ids of each text, computed in a worker thread. Concurrent calls share worker-thread calls
        (rounds): a call that comes while a round runs has its texts encoded in the next one, together with those
        of every call that came meanwhile. One thread hop per request cost the event loop more than the encoding
        itself, and under load kept dozens of threads fighting over the GIL."""
        return await self._encode_in_rounds(texts)

    async def tokenize_for_embedding(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The token ids of each text to embed (Tokenizer.encode_for_embedding), computed as tokenize()'s are."""
        return await self._encode_in_rounds(texts, for_embedding=True)

    async def _encode_in_rounds(self, texts: Sequence[str | RenderedChat], *,
                                for_embedding: bool = False) -> list[np.ndarray]:
        """tokenize(), for texts, texts to embed and rendered chats alike."""
        job = _TokenizeJob(list(texts), for_embedding)
        if not job.texts:
            return []
        self._tokenize_jobs.append(job)
        while not job.finished:
            if self._tokenize_round is None:
                await self._tokenize_next_round()
            else:
                await self._tokenize_round.wait()  # then ours is in the next round, if not in this one
        if job.error is not None:
            raise job.error
        return job.ids

    async def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                          tools: Sequence[dict] | None = None, chat_template_kwargs: dict | None = None,
                          reply_start: str = "") -> np.ndarray:
        """The prompt ids of a chat, as Tokenizer.encode_chat gives them (the tools offered, the caller's template
        arguments, what the reply is made to begin with): rendered on the render threads, encoded in a
        tokenization round (module notes). UsageError for a model without a template or messages it refuses,
        TemplateLimitExceeded for a render past its limits."""
        self._check_running()
        render = None
        with anyio.move_on_after(RENDER_TIMEOUT) as deadline:  # waiting for a render thread counts too
            async with self._render_limiter:
                render = _ModelCall("chat template render", None)
                rendered = await run_sync_daemon(render.run, functools.partial(
                    self.tokenizer.render_chat, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                    chat_template_kwargs=chat_template_kwargs, reply_start=reply_start))
        if deadline.cancelled_caught:
            if render is not None and render.running:
                self._abandoned_renders.append(render)
            raise TemplateLimitExceeded(f"the model's chat template did not render within {RENDER_TIMEOUT:g} s "
                                        "(limit: cllm.serving.RENDER_TIMEOUT)")
        [ids] = await self._encode_in_rounds([rendered])
        return ids

    async def _tokenize_next_round(self) -> None:
        """Encodes the texts of every call waiting, in one worker-thread call."""
        jobs, self._tokenize_jobs = self._tokenize_jobs, []
        self._tokenize_round = done = anyio.Event()
        try:
            # Shielded: the other callers' texts ride on this call, and it never takes long.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_encode_jobs, self.tokenizer, jobs)
        finally:
            for job in jobs:
                if not job.finished:  # the thread never ran
                    job.error = RuntimeError("tokenization did not run")
            self._tokenize_round = None
            done.set()

    # ----------------------------------------------------------------------------------------------------------
    # running

    async def __aenter__(self) -> "AsyncModel":
        if self._running is not None:
            raise RuntimeError("this AsyncModel is already running")
        # Each step is undone by the stack, last first, if a later one fails; pop_all() keeps them for __aexit__.
        async with AsyncExitStack() as stack:
            # BLAS gets exactly our thread budget while we run: its default (every core) next to the event loop
            # oversubscribes the machine, which made small forward passes 10-100x slower.
            stack.enter_context(blas_limit(self.threads))
            self._limiter = anyio.CapacityLimiter(1)
            self._render_limiter = anyio.CapacityLimiter(RENDER_THREADS)
            self._embeddings, embedding_queue = anyio.create_memory_object_stream[_EmbeddingRequest](self.max_queue)
            self._generations, generation_queue = anyio.create_memory_object_stream[_GenerationRequest](
                self.max_queue)
            # Closed only once the loops have ended: closed while they still ran, their queues would end instead
            # of being cancelled.
            stack.callback(self._generations.close)
            stack.callback(self._embeddings.close)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            task_group.start_soon(self._batch_embeddings, embedding_queue)
            task_group.start_soon(self._decode_generations, generation_queue)
            stack.callback(task_group.cancel_scope.cancel)  # leaving stops the loops rather than waiting for them
            self._running = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        running, self._running = self._running, None
        return await running.__aexit__(*exc_info)

    def queued(self) -> dict[str, int]:
        """Requests waiting in each queue for the model to take them: "embed" and "generate"."""
        if self._running is None:
            return {"embed": 0, "generate": 0}
        return {"embed": self._embeddings.statistics().current_buffer_used,
                "generate": self._generations.statistics().current_buffer_used}

    def _observe(self, work: str, size: int) -> None:
        for observer in self.observers:
            observer(work, size)

    def _check_running(self) -> None:
        if self._running is None:
            raise RuntimeError(NOT_RUNNING)

    async def _submit(self, queue: MemoryObjectSendStream, request) -> None:
        """Puts request in queue; raises Overloaded if the queue is full (for queue_timeout seconds)."""
        queued = False
        try:
            if self.queue_timeout == 0:
                queue.send_nowait(request)
                queued = True
            else:
                with anyio.move_on_after(self.queue_timeout):
                    await queue.send(request)
                    queued = True
        except anyio.WouldBlock:
            pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):  # the loop or the model has closed
            raise RuntimeError(CLOSED_WHILE_PENDING) from None
        finally:
            if not queued:  # nobody will ever send results
                request.results.close()
        if not queued:
            raise Overloaded(f"the request queue is full ({self.max_queue} requests waiting)")

    async def _run_model(self, work: str, what: str, fn, *args):
        """fn(*args) on a daemon worker thread, one call at a time, under the batch deadline. A call that misses
        it is abandoned (nothing can interrupt a thread in native code) and raises EngineStalled."""
        # A free model is taken at once (acquire_nowait): `async with` would go round the event loop first, behind
        # every response that the last batch woke, while the model idles. Waiting for the other loop's call is not
        # part of the deadline.
        try:
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self._limiter.acquire()
        try:
            self._calls_made[work] += 1
            fault = next((f.kind for f in self.faults if f.work == work and f.n == self._calls_made[work]), None)
            call = _ModelCall(what, fault)
            with anyio.move_on_after(self.batch_timeout):
                return await run_sync_daemon(call.run, fn, *args)
            self._abandoned.append(call)
            raise EngineStalled(f"the model's {what} did not finish within its {self.batch_timeout:g} s deadline; "
                                f"its worker thread was abandoned")
        finally:
            self._limiter.release()

    # ----------------------------------------------------------------------------------------------------------
    # embeddings

    async def embed(self, texts: str | Sequence[str | Sequence[int]], *, normalize: bool | None = None,
                    pooling: str | None = None, truncate: bool = False, prompt_name: str | None = None,
                    prompt: str | None = None) -> np.ndarray:
        """Embeddings (n, dim) float32 of the texts (strings, or token ids, taken as they are), or (dim,) for a
        single string: pooled "mean" or "last" (cllm.pooling; default: the engine's `pooling`), of unit length if
        normalize (default: as the model declares). The prompt named prompt_name, or prompt itself, is put before
        each string (neither: the model's default prompt, if any; not both). A text longer than the context is an
        error, or with truncate=True cut to context_length tokens, losing its end."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        names = ["the text"] if single else [f"texts[{i}]" for i in range(len(texts))]
        pooling = self.pooling if pooling is None else check_pooling(pooling)
        normalize = self.embedding.normalize if normalize is None else normalize
        prefix = self.embedding.prompt_text(prompt_name, prompt)
        if (prompt_name is not None or prompt is not None) and not all(isinstance(t, str) for t in texts):
            raise UsageError("a prompt goes before texts, not token ids: give the texts, or put the prompt's ids "
                             "in yours")
        self._check_running()
        ids = await self._token_ids([prefix + t if isinstance(t, str) else t for t in texts], names,
                                    truncate=truncate)
        if not ids:
            return np.zeros((0, self.config.dim), np.float32)
        results, receive = anyio.create_memory_object_stream[np.ndarray](1)
        request = _EmbeddingRequest(ids, bool(normalize), pooling, anyio.current_time(), results,
                                    np.empty((len(ids), self.config.dim), np.float32))
        with receive:  # closing it on the way out (cancelled too) tells the batcher that this caller has gone
            await self._submit(self._embeddings, request)
            try:
                vectors = await receive.receive()
            except anyio.EndOfStream:
                if request.error is not None:
                    raise request.error from None
                raise RuntimeError(CLOSED_WHILE_PENDING) from None
        return vectors[0] if single else vectors

    async def _token_ids(self, texts: list, names: list[str], *, truncate: bool = False) -> list[np.ndarray]:
        """Each text's token ids (strings are tokenized together, in one worker-thread call), checked: not empty,
        and within the context (or cut to it, if truncate: keeping the tokens the tokenizer added around a
        string)."""
        ids = [None if isinstance(text, str) else token_ids(text, self.tokenizer.vocab_size, name)
               for text, name in zip(texts, names)]
        strings = [i for i, text in enumerate(texts) if isinstance(text, str)]
        if strings:
            for i, encoded in zip(strings, await self.tokenize_for_embedding([texts[i] for i in strings])):
                ids[i] = encoded
        return [fit_to_context(text_ids, self.config.context_length, truncate=truncate, name=name,
                               ends=self.tokenizer.added_around_text if isinstance(text, str) else (0, 0))
                for name, text, text_ids in zip(names, texts, ids)]

    async def _batch_embeddings(self, queue: MemoryObjectReceiveStream[_EmbeddingRequest]) -> None:
        """The batcher task: gathers queued texts into forward passes until cancelled."""
        waiting: deque[tuple[_EmbeddingRequest, int]] = deque()  # (request, index of one of its texts), oldest first
        batch: list[tuple[_EmbeddingRequest, int]] = []
        workspaces = ForwardWorkspaces(self.config)
        try:
            while True:
                if not waiting:
                    _enqueue_texts(waiting, await _receive(queue))
                deadline = waiting[0][0].queued_at + self.max_wait_ms / 1000
                while sum(r.texts[i].size for r, i in waiting) < self.max_batch_tokens:  # a pass's worth
                    request = await _receive_before(queue, deadline)
                    if request is None:
                        break
                    _enqueue_texts(waiting, request)
                waiting = _drop_gone(waiting)
                batch = self._take_batch(waiting)
                if not batch:
                    continue
                try:
                    vectors = await self._run_model("embed", "embedding batch", self._embed_batch, workspaces, batch)
                except Exception as error:  # this batch's requests fail; the next batch is served as usual
                    if isinstance(error, EngineStalled):
                        workspaces = ForwardWorkspaces(self.config)  # the abandoned thread may still write the old ones
                    for request, _ in batch:
                        request.fail(error)
                    batch = []
                    continue
                self._observe("embed", len(batch))
                for (request, i), vector in zip(batch, vectors):
                    if request.gone():
                        request.results.close()
                        continue
                    request.vectors[i] = vector
                    request.done += 1
                    if request.done == len(request.texts):
                        request.results.send_nowait(request.vectors)
                        request.results.close()
                batch = []
        finally:
            for request, _ in (*waiting, *batch):
                request.results.close()
            _refuse_queued(queue)

    def _take_batch(self, waiting: deque) -> list[tuple[_EmbeddingRequest, int]]:
        """Takes out of waiting the texts of the pass that holds the oldest one, when length_batches cuts them all
        into passes of at most max_batch_tokens (none if waiting is empty). The texts left wait for the next pass,
        and new ones may join them: the oldest text is always in the next pass, so none waits for ever."""
        if not waiting:
            return []
        passes = length_batches([r.texts[i].size for r, i in waiting], max_tokens=self.max_batch_tokens)
        taken = set(next(p for p in passes if 0 in p).tolist())
        batch = [text for k, text in enumerate(waiting) if k in taken]
        left = [text for k, text in enumerate(waiting) if k not in taken]
        waiting.clear()
        waiting.extend(left)
        return batch

    def _embed_batch(self, workspaces: ForwardWorkspaces, batch: list[tuple[_EmbeddingRequest, int]]) -> np.ndarray:
        """In the worker thread: one forward pass over the batch's texts, padded to the longest, each pooled as its
        request asks. The workspaces keep their MAX_VIEWS latest shapes in one buffer, so the many shapes that exact
        lengths make cost no memory."""
        texts = [r.texts[i] for r, i in batch]
        return embed_batch(self.model, workspaces, texts, seq=max(t.size for t in texts),
                           normalize=[r.normalize for r, _ in batch], pooling=[r.pooling for r, _ in batch],
                           threads=self.threads)

    # ----------------------------------------------------------------------------------------------------------
    # generation

    async def generate(self, prompt: str | Sequence[int], **settings) -> Completion:
        """The continuation of prompt (text, or token ids), whole. Settings as for stream()."""
        stream = self.stream(prompt, **settings)
        async with aclosing(stream):
            async for _ in stream:
                pass
        return stream.completion

    def stream(self, prompt: str | Sequence[int], **settings) -> CompletionStream:
        """The continuation of prompt (text, or token ids) as text pieces, as they are decoded; settings as for
        stream_choices().

        Settings are checked now (UsageError); the prompt is tokenized and the request queued when iteration
        starts, or at `await stream.start()` (UsageError for a prompt longer than the context, Overloaded then).
        Once the iteration ends, the stream's `completion` holds what generate() returns. Leaving the iteration
        early frees the request's decoder row once the stream is closed: use `contextlib.aclosing` to have that
        happen at once.
        """
        return self.stream_choices([prompt], **settings)

    def stream_choices(self, prompts: Sequence[str | Sequence[int]], *, n: int = 1, max_new_tokens: int = 128,
                       seed: int | None = None, stop: str | Sequence[str] = (), logprobs: int | None = None,
                       prompt_logprobs: int | None = None, end_ids: Sequence[int] = (),
                       **sampling) -> CompletionStream:
        """n continuations of each prompt, decoded together: choice i * n + j continues prompts[i], with seed
        seed + i * n + j if a seed is given (so choices differ, and each is reproducible). Read them with the
        stream's next_delta().

        Settings: max_new_tokens (0: nothing generated), seed, stop strings, logprobs (None, or 0 to 20 alternatives
        per token), prompt_logprobs (as many, for each prompt token, computed in the prefill's forward pass: a
        choice's Completion and its first Delta have them, with max_new_tokens=0 too) and end_ids (tokens that end a
        continuation besides the separator, a chat's end of turn), and cllm.generate.Sampling's: temperature (0 is
        greedy), top_k, top_p, min_p, repetition_penalty, frequency_penalty and presence_penalty.
        """
        require_int("n", n)
        if not prompts:
            raise UsageError("stream_choices needs at least one prompt")
        Sampling(**sampling)  # checked here, before anything is queued
        check_generation(max_new_tokens=max_new_tokens, seed=seed, stop=stop, logprobs=logprobs,
                         prompt_logprobs=prompt_logprobs)
        prompts = [prompt if isinstance(prompt, str) else token_ids(prompt, self.tokenizer.vocab_size, "the prompt")
                   for prompt in prompts]
        self._check_running()
        settings = [dict(max_new_tokens=max_new_tokens, seed=None if seed is None else seed + index, stop=stop,
                         logprobs=logprobs, prompt_logprobs=prompt_logprobs, end_ids=tuple(end_ids), **sampling)
                    for index in range(len(prompts) * n)]
        return CompletionStream(self, [prompt for prompt in prompts for _ in range(n)], settings)

    async def _continuation(self, prompt: str | np.ndarray, settings: dict) -> Continuation:
        if isinstance(prompt, str):
            [prompt] = await self.tokenize([prompt])
        return Continuation(self.tokenizer, prompt, context_length=self.config.context_length, **settings)

    async def _decode_generations(self, queue: MemoryObjectReceiveStream[_GenerationRequest]) -> None:
        """The decoding loop: admits queued generations into free decoder rows and steps them all together,
        until cancelled."""
        decoder = Decoder(self.model, batch=self.max_streams)
        rows: dict[int, _GenerationRequest] = {}
        self._decoding = rows  # read by health()
        try:
            while True:
                for row, request in list(rows.items()):
                    if _abandoned(request.results):
                        request.results.close()
                        del rows[row]
                joining = []
                while len(rows) < self.max_streams:
                    if rows:
                        try:
                            request = queue.receive_nowait()
                        except anyio.WouldBlock:
                            break
                    else:
                        request = await queue.receive()  # idle: nothing to step until a request comes
                    if _abandoned(request.results):
                        request.results.close()
                    elif not request.continuation.needs_prefill:  # max_new_tokens=0, and no prompt to score
                        request.deliver("")
                    else:
                        row = min(set(range(self.max_streams)) - rows.keys())
                        rows[row] = request
                        joining.append(row)
                continuations = {row: request.continuation for row, request in rows.items()}
                try:
                    pieces = await self._run_model("decode", "decoding step", self._decode_step, decoder,
                                                   continuations, joining)
                except Exception as error:  # this step's requests fail; the next ones are served as usual
                    if isinstance(error, EngineStalled):
                        # The abandoned thread may still write this KV cache: never touch it again.
                        decoder = Decoder(self.model, batch=self.max_streams)
                    for request in rows.values():
                        request.fail(error)
                    rows.clear()
                    continue
                self._observe("decode", len(continuations))
                for row, piece in pieces.items():
                    rows[row].deliver(piece)
                    if rows[row].completed:
                        del rows[row]
        finally:
            self._decoding = {}
            for request in rows.values():
                request.results.close()
            _refuse_queued(queue)

    def _decode_step(self, decoder: Decoder, continuations: dict[int, Continuation],
                     joining: list[int]) -> dict[int, str]:
        """In the worker thread: prefills the rows that join (scoring their prompts, if asked), draws every row's
        next token from its logits (none for a row that joined only to be scored: max_new_tokens=0), then gives the
        model the tokens of the rows that go on (one step for them all, a context shift for a row whose cache is
        full: cllm.generate.feed). Returns each row's new text."""
        decoder.threads = self.threads  # for the forward passes of prefills and context shifts
        if joining:
            prefill(decoder, {row: continuations[row] for row in joining})
        pieces = {row: "" if continuation.finished else continuation.advance(decoder.logits[row])
                  for row, continuation in continuations.items()}
        feed(decoder, continuations)
        return pieces


def _abandoned(results: MemoryObjectSendStream) -> bool:
    """The caller stopped listening: it was cancelled, or closed its stream early."""
    return results.statistics().open_receive_streams == 0


async def _receive(queue: MemoryObjectReceiveStream):
    """The next item in queue: at once if one is there (receive() goes round the event loop first, and the
    batcher would then start the next batch only after every response that the last one woke), else when it
    comes."""
    try:
        return queue.receive_nowait()
    except anyio.WouldBlock:
        return await queue.receive()


@dataclass(eq=False)
class _TokenizeJob:
    """One tokenize() call, as a tokenization round sees it."""
    texts: list[str | RenderedChat]
    for_embedding: bool  # texts to embed (Tokenizer.encode_for_embedding), not prompts
    ids: list[np.ndarray] | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.ids is not None or self.error is not None


def _encode_jobs(tokenizer: Tokenizer, jobs: list[_TokenizeJob]) -> None:
    """In a worker thread: each job's token ids, or the error that encoding one of its texts raised."""
    for job in jobs:
        try:
            if job.for_embedding:
                job.ids = tokenizer.encode_for_embedding(job.texts)
                continue
            job.ids = [tokenizer.encode(text) if isinstance(text, str) else tokenizer.encode_rendered_chat(text)
                       for text in job.texts]
        except Exception as error:
            job.error = error


def _enqueue_texts(waiting: deque, request: _EmbeddingRequest) -> None:
    waiting.extend((request, i) for i in range(len(request.texts)))


def _drop_gone(waiting: deque) -> deque:
    """The texts in waiting whose requests still want them."""
    kept = deque()
    for request, i in waiting:
        if request.gone():
            request.results.close()
        else:
            kept.append((request, i))
    return kept


async def _receive_before(queue: MemoryObjectReceiveStream, deadline: float):
    """The next request in queue, or None if none comes before deadline (on anyio.current_time()'s clock)."""
    try:
        return queue.receive_nowait()  # what is queued already counts, even past the deadline
    except anyio.WouldBlock:
        pass
    if anyio.current_time() >= deadline:
        return None  # at once: a scope past its deadline would still go round the event loop
    with anyio.CancelScope(deadline=deadline):
        return await queue.receive()
    return None


def _refuse_queued(queue: MemoryObjectReceiveStream) -> None:
    """Closes a loop's queue: every request still in it (or waiting to get in) learns that the model closed."""
    while True:
        try:
            queue.receive_nowait().results.close()
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    queue.close()

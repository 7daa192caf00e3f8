"""The async serving API: one model shared by many concurrent callers, on asyncio or trio (through anyio).

    async with AsyncModel.open("model.cllm") as model:
        vectors = await model.embed(["first text", "second text"])        # (2, dim) float32, unit length
        completion = await model.generate("Once upon a time", max_new_tokens=50, temperature=0)
        async for piece in model.stream("def ", temperature=0.8, seed=1):
            print(piece, end="")

Embeddings are the final hidden states (after the final LayerNorm) averaged over the text's own tokens
(masked mean pooling: padding never counts), then scaled to unit L2 norm unless normalize=False, as TEI and
llama.cpp do for a model without a pooling head of its own. The model is causal, so padding after a text does
not change its hidden states: a text's embedding is the same alone or batched with others, up to float32
rounding.

Batching. Concurrent embed() calls are queued, and one batcher task gathers their texts, oldest first, into one
forward pass of at most max_batch_tokens padded tokens (texts x the longest, rounded up to a power of two so
that few activation shapes exist), waiting for more at most max_wait_ms after the oldest was queued. A single
text longer than that budget runs alone. Generations share one Decoder of max_streams rows (continuous
batching): a request joins at the next decoding step (its prompt prefilled into a free row), decodes with its
own sampling settings and seeded generator, and leaves when it ends or its caller goes, freeing the row for the
next in the queue. A generation gets the tokens that cllm.generate.complete gets with the same settings: bit
for bit when it decodes alone, and up to float32 rounding of its logits when batched with others (which can
only change a token at a near-tie).

Threads. BLAS is held at `threads` while the model runs. Model work runs in anyio worker threads, one call at a time (a limiter of its own, of 1: an
embedding batch and a decoding step would only compete for the same cores), so the event loop never waits
for it. Tokenizing happens in the caller's task.

Backpressure. Each queue (embeddings, generations) holds at most max_queue waiting requests. A request that
finds its queue full raises Overloaded at once, or, with queue_timeout > 0, after waiting that many seconds
for room.

Cancellation. A cancelled caller gets nothing and costs nothing more: its texts are dropped from the batches
not yet run, its generation's row is freed before the next step, and the requests it was batched with carry
on unaffected. Leaving `async with` waits for the model call in flight (one batch or one step), stops the
batcher tasks, and fails every pending call with RuntimeError.
"""
from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from threadpoolctl import threadpool_limits

from .buffers import aligned_zeros
from .checkpoint import load_model
from .generate import Continuation, Decoder
from .model import GPT, ModelConfig, Workspace
from .tokenizer import Tokenizer

NOT_RUNNING = "the model is not running: use it inside `async with AsyncModel(...) as model:`"
CLOSED_WHILE_PENDING = "the model was closed before this request finished"


class Overloaded(Exception):
    """The request queue is full; try again later (HTTP 429)."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (the end of a document, or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # stop string included


class CompletionStream(AsyncIterator[str]):
    """Text pieces as they are decoded; after the last one, `completion` has the finish reason and the token
    counts (None until then)."""

    def __init__(self, pieces: AsyncIterator[str], continuation: Continuation):
        self._pieces, self._continuation = pieces, continuation
        self._text: list[str] = []
        self.completion: Completion | None = None

    async def __anext__(self) -> str:
        try:
            piece = await self._pieces.__anext__()
        except StopAsyncIteration:
            c = self._continuation
            self.completion = Completion("".join(self._text), c.finish_reason, len(c.prompt_ids), len(c.token_ids))
            raise
        self._text.append(piece)
        return piece

    async def aclose(self) -> None:
        await self._pieces.aclose()


@dataclass(eq=False)
class _EmbeddingRequest:
    """One embed() call, as the batcher sees it."""
    texts: list[np.ndarray]  # token ids
    normalize: bool
    queued_at: float  # anyio.current_time()
    results: MemoryObjectSendStream[np.ndarray]  # receives `vectors` once every text is done
    vectors: np.ndarray  # (len(texts), dim), filled in batch by batch
    done: int = 0


@dataclass(eq=False)
class _GenerationRequest:
    """One generate() or stream() call, as the decoding loop sees it."""
    continuation: Continuation
    results: MemoryObjectSendStream[str]  # text pieces; closed at the end
    completed: bool = False  # every piece was delivered (the stream was not closed by a shutdown)


class AsyncModel:
    """A model and its tokenizer, serving concurrent embed, generate and stream calls (see the module notes).

    Use it as `async with AsyncModel(model, tokenizer) as m:` (or AsyncModel.open(path)): the context runs the
    batcher tasks, and calls outside it raise RuntimeError.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, threads: int = 1, max_batch_tokens: int = 4096,
                 max_wait_ms: float = 5.0, max_queue: int = 256, queue_timeout: float = 0.0,
                 max_streams: int = 8):
        for name, value in dict(threads=threads, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                                max_streams=max_streams).items():
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in dict(max_wait_ms=max_wait_ms, queue_timeout=queue_timeout).items():
            if not isinstance(value, Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.threads, self.max_batch_tokens, self.max_streams = int(threads), int(max_batch_tokens), int(max_streams)
        self.max_wait_ms, self.max_queue, self.queue_timeout = float(max_wait_ms), int(max_queue), float(queue_timeout)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._workspaces: dict[tuple[int, int], Workspace] = {}  # views into _workspace_buffer, by shape
        self._workspace_buffer = aligned_zeros(0)

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs) -> "AsyncModel":
        """Loads a .cllm model file (ModelFileError if it is bad); kwargs as for the constructor."""
        model, tokenizer = load_model(path, threads=kwargs.get("threads", 1))
        return cls(model, tokenizer, **kwargs)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def info(self) -> dict:
        """What a client may want to know: the model's shape, the tokenizer, and the serving limits."""
        return {"config": self.config.to_dict(), "tokenizer": self.tokenizer.kind,
                "vocab_size": self.tokenizer.vocab_size, "embedding_dim": self.config.dim,
                "context_length": self.config.context_length,
                "limits": {"threads": self.threads, "max_batch_tokens": self.max_batch_tokens,
                           "max_wait_ms": self.max_wait_ms, "max_queue": self.max_queue,
                           "queue_timeout": self.queue_timeout, "max_streams": self.max_streams}}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # ----------------------------------------------------------------------------------------------------------
    # running

    async def __aenter__(self) -> "AsyncModel":
        if self._task_group is not None:
            raise RuntimeError("this AsyncModel is already running")
        self._limiter = anyio.CapacityLimiter(1)
        self._embeddings, embedding_queue = anyio.create_memory_object_stream[_EmbeddingRequest](self.max_queue)
        self._generations, generation_queue = anyio.create_memory_object_stream[_GenerationRequest](
            self.max_queue)
        # BLAS gets exactly our thread budget while we run: its default (every core) next to the kernels' OpenMP
        # threads and the event loop oversubscribes the machine, which made small forward passes 10-100x slower.
        self._blas_limit = threadpool_limits(limits=self.threads, user_api="blas")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        task_group.start_soon(self._batch_embeddings, embedding_queue)
        task_group.start_soon(self._decode_generations, generation_queue)
        self._task_group = task_group
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        task_group, self._task_group = self._task_group, None
        task_group.cancel_scope.cancel()
        try:
            return await task_group.__aexit__(*exc_info)
        finally:
            # Only now: closed while the loops still ran, their queues would end instead of being cancelled.
            self._embeddings.close()
            self._generations.close()
            self._blas_limit.restore_original_limits()

    def _check_running(self) -> None:
        if self._task_group is None:
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

    # ----------------------------------------------------------------------------------------------------------
    # embeddings

    async def embed(self, texts: str | Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """Embeddings (n, dim) float32 of the texts, or (dim,) for a single string; see the module notes."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = [self._embedding_ids(text, "the text" if single else f"texts[{i}]") for i, text in enumerate(texts)]
        self._check_running()
        if not ids:
            return np.zeros((0, self.config.dim), np.float32)
        results, receive = anyio.create_memory_object_stream[np.ndarray](1)
        request = _EmbeddingRequest(ids, bool(normalize), anyio.current_time(), results,
                                    np.empty((len(ids), self.config.dim), np.float32))
        with receive:  # closing it on the way out (cancelled too) tells the batcher that this caller has gone
            await self._submit(self._embeddings, request)
            try:
                vectors = await receive.receive()
            except anyio.EndOfStream:
                raise RuntimeError(CLOSED_WHILE_PENDING) from None
        return vectors[0] if single else vectors

    def _embedding_ids(self, text: str, what: str) -> np.ndarray:
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text)
        context = self.config.context_length
        if ids.size == 0:
            raise ValueError(f"{what} is empty: there is nothing to embed")
        if ids.size > context:
            raise ValueError(f"{what} is {ids.size} tokens long but the model's context holds only {context}")
        return ids

    async def _batch_embeddings(self, queue: MemoryObjectReceiveStream[_EmbeddingRequest]) -> None:
        """The batcher task: gathers queued texts into forward passes until cancelled."""
        waiting: deque[tuple[_EmbeddingRequest, int]] = deque()  # (request, index of one of its texts), oldest first
        batch: list[tuple[_EmbeddingRequest, int]] = []
        try:
            while True:
                if not waiting:
                    _enqueue_texts(waiting, await queue.receive())
                deadline = waiting[0][0].queued_at + self.max_wait_ms / 1000
                while self._padded_tokens(waiting) < self.max_batch_tokens:
                    request = await _receive_before(queue, deadline)
                    if request is None:
                        break
                    _enqueue_texts(waiting, request)
                waiting = _drop_abandoned(waiting)
                batch = self._take_batch(waiting)
                if not batch:
                    continue
                vectors = await anyio.to_thread.run_sync(
                    self._embed_batch, [r.texts[i] for r, i in batch], [r.normalize for r, _ in batch],
                    limiter=self._limiter)
                for (request, i), vector in zip(batch, vectors):
                    request.vectors[i] = vector
                    request.done += 1
                    if request.done == len(request.texts):
                        if not _abandoned(request.results):
                            request.results.send_nowait(request.vectors)
                        request.results.close()
                batch = []
        finally:
            for request, _ in (*waiting, *batch):
                request.results.close()
            _refuse_queued(queue)

    def _padded_length(self, length: int) -> int:
        """The sequence length a text of `length` tokens is padded to: the next power of two, within the
        context. Few distinct shapes keep the workspaces reusable; padding costs at most twice the work."""
        return min(1 << (length - 1).bit_length(), self.config.context_length)

    def _padded_tokens(self, texts: Sequence[tuple[_EmbeddingRequest, int]]) -> int:
        if not texts:
            return 0
        return len(texts) * self._padded_length(max(r.texts[i].size for r, i in texts))

    def _take_batch(self, waiting: deque) -> list[tuple[_EmbeddingRequest, int]]:
        """Takes the oldest texts that fit in max_batch_tokens together (at least one) out of waiting."""
        batch, longest = [], 0
        while waiting:
            request, i = waiting[0]
            longer = max(longest, request.texts[i].size)
            if batch and (len(batch) + 1) * self._padded_length(longer) > self.max_batch_tokens:
                break
            batch.append(waiting.popleft())
            longest = longer
        return batch

    def _embed_batch(self, texts: list[np.ndarray], normalize: list[bool]) -> np.ndarray:
        """In the worker thread: one forward pass over the texts right-padded to a common length; their
        masked mean-pooled final hidden states, (n, dim) float32, normalised where asked."""
        lengths = [ids.size for ids in texts]
        ws = self._workspace(len(texts), self._padded_length(max(lengths)))
        tokens = np.zeros((ws.batch, ws.seq), np.int32)  # the padding's ids do not matter: nothing attends to it
        for row, ids in enumerate(texts):
            tokens[row, :ids.size] = ids
        self.model.forward_ws(ws, tokens, None, threads=self.threads, logits=False)
        hidden = ws.a["lnf"].reshape(ws.batch, ws.seq, -1)
        vectors = np.stack([hidden[row, :n].mean(axis=0, dtype=np.float64) for row, n in enumerate(lengths)])
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors / np.maximum(norms, np.finfo(np.float64).tiny)
        return np.where(np.array(normalize)[:, None], unit, vectors).astype(np.float32)

    def _workspace(self, batch: int, seq: int) -> Workspace:
        """A workspace for this batch shape, carved out of one buffer that every shape shares (batches run one
        at a time): batches of many sizes then cost no new allocation, only new views."""
        key = (batch, seq)
        if key not in self._workspaces:
            size = Workspace.size(self.config, batch, seq)
            if self._workspace_buffer.size < size:
                self._workspace_buffer = aligned_zeros(size)
                self._workspaces.clear()  # their views are into the buffer just replaced
            self._workspaces[key] = Workspace(self.config, batch, seq, buffer=self._workspace_buffer)
        return self._workspaces[key]

    # ----------------------------------------------------------------------------------------------------------
    # generation

    async def generate(self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       stop: str | Sequence[str] = ()) -> Completion:
        """The continuation of prompt, whole. Settings as for cllm.generate.generate (temperature 0 is greedy;
        seed makes sampling reproducible); max_new_tokens must be at least 1."""
        continuation = self._continuation(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        self._check_running()
        request, pieces = _generation_request(continuation)
        with pieces:
            await self._submit(self._generations, request)
            text = "".join([piece async for piece in pieces])
        if not request.completed:
            raise RuntimeError(CLOSED_WHILE_PENDING)
        return Completion(text, continuation.finish_reason, len(continuation.prompt_ids),
                          len(continuation.token_ids))

    def stream(self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] = ()) -> "CompletionStream":
        """The continuation of prompt as text pieces, as they are decoded; settings as for generate().

        Settings are checked now (ValueError); the request is queued when iteration starts (Overloaded then).
        Once the iteration ends, the stream's `completion` holds what generate() would return. Leaving the
        iteration early frees the request's decoder row once the stream is closed: use `contextlib.aclosing`
        to have that happen at once.
        """
        continuation = self._continuation(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        self._check_running()
        return CompletionStream(self._stream(continuation), continuation)

    async def _stream(self, continuation: Continuation) -> AsyncIterator[str]:
        request, pieces = _generation_request(continuation)
        with pieces:
            await self._submit(self._generations, request)
            async for piece in pieces:
                yield piece
        if not request.completed:
            raise RuntimeError(CLOSED_WHILE_PENDING)

    def _continuation(self, prompt: str, *, max_new_tokens: int, **settings) -> Continuation:
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(max_new_tokens, Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        return Continuation(self.tokenizer, prompt, context_length=self.config.context_length,
                            max_new_tokens=max_new_tokens, **settings)

    async def _decode_generations(self, queue: MemoryObjectReceiveStream[_GenerationRequest]) -> None:
        """The decoding loop: admits queued generations into free decoder rows and steps them all together,
        until cancelled."""
        decoder = Decoder(self.model, batch=self.max_streams, threads=self.threads)
        rows: dict[int, _GenerationRequest] = {}
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
                    elif request.continuation.finished:  # its prompt fills the context: nothing to decode
                        request.completed = True
                        request.results.close()
                    else:
                        row = min(set(range(self.max_streams)) - rows.keys())
                        rows[row] = request
                        joining.append(row)
                continuations = {row: request.continuation for row, request in rows.items()}
                pieces = await anyio.to_thread.run_sync(_decode_step, decoder, continuations, joining,
                                                        limiter=self._limiter)
                for row, piece in pieces.items():
                    request = rows[row]
                    if piece and not _abandoned(request.results):
                        request.results.send_nowait(piece)  # never blocks: the stream is unbounded
                    if request.continuation.finished:
                        request.completed = True
                        request.results.close()
                        del rows[row]
        finally:
            for request in rows.values():
                request.results.close()
            _refuse_queued(queue)


def _decode_step(decoder: Decoder, continuations: dict[int, Continuation], joining: list[int]) -> dict[int, str]:
    """In the worker thread: prefills the rows that join, draws every row's next token from its logits, then
    runs the tokens of the rows that go on through the model. Returns each row's new text."""
    if joining:
        decoder.prefill_rows(joining, [continuations[row].prompt_ids for row in joining])
    pieces = {row: continuation.advance(decoder.logits[row]) for row, continuation in continuations.items()}
    tokens = np.zeros(decoder.batch, np.int32)
    going_on = np.zeros(decoder.batch, bool)
    for row, continuation in continuations.items():
        if not continuation.finished:
            tokens[row], going_on[row] = continuation.token_ids[-1], True
    if going_on.any():
        decoder.step(tokens, active=going_on)
    return pieces


def _generation_request(continuation: Continuation) -> tuple[_GenerationRequest, MemoryObjectReceiveStream[str]]:
    # Unbounded, so that the decoding loop never waits for a slow reader; a continuation is at most one
    # context of pieces.
    results, pieces = anyio.create_memory_object_stream[str](math.inf)
    return _GenerationRequest(continuation, results), pieces


def _abandoned(results: MemoryObjectSendStream) -> bool:
    """The caller stopped listening: it was cancelled, or closed its stream early."""
    return results.statistics().open_receive_streams == 0


def _enqueue_texts(waiting: deque, request: _EmbeddingRequest) -> None:
    waiting.extend((request, i) for i in range(len(request.texts)))


def _drop_abandoned(waiting: deque) -> deque:
    kept = deque()
    for request, i in waiting:
        if _abandoned(request.results):
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

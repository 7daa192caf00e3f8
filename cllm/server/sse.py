"""A streamed generation as server-sent events.

A stream can only fail with one of the statuses of cllm.server.errors until it is queued. Then its 200 is sent, and an error
becomes one last event, `data: {"error": {...}}`, with no `[DONE]` after it (OpenAI's clients raise it). While
a stream has nothing to send for KEEP_ALIVE_SECONDS (waiting in the queue for its first token, mostly), it sends
an SSE comment, `: keep-alive`, which clients ignore but which keeps proxies and client timeouts from giving up
on a quiet connection.

Each choice of a stream ends with a chunk that carries its finish reason, and the usage comes in one more chunk if
stream_options.include_usage asks for it (cllm.openai_format writes the chunks).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from ..generate import Completion
from ..metrics import ServerMetrics
from ..openai_format import ResponseForm, usage
from ..serving import CompletionStream, EngineStalled
from .errors import SERVER_ERROR, stalled
from .request_ids import current_request_id

logger = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 15.0  # a quiet stream sends an SSE comment this often


def count_tokens(metrics: ServerMetrics, completions: Sequence[Completion], n: int) -> None:
    counts = usage(completions, n)
    metrics.count_tokens(prompt=counts["prompt_tokens"], generated=counts["completion_tokens"])


def server_sent_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


KEEP_ALIVE_COMMENT = ": keep-alive\n\n"  # an SSE comment: clients skip it, idle timeouts see traffic


async def generation_events(stream: CompletionStream, form: ResponseForm, n: int, logprobs: bool,
                            include_usage: bool, keep_alive_interval: float, metrics: ServerMetrics,
                            started: float) -> AsyncIterator[str]:
    """The SSE body of a streamed generation, in the route's form: per choice, its opening chunk (if the form has
    one), the chunks of each settled piece, and those that close it with its finish reason; then the usage if asked
    for, then [DONE];
    a keep-alive comment whenever the stream has been quiet for keep_alive_interval seconds. Closing it early (the
    client went away) frees the model's decoder rows."""
    first_piece = True
    async with aclosing(stream):
        try:
            for index in range(len(stream.completions)):
                if (opening := form.opening(index)) is not None:
                    yield server_sent_event(form.chunk(opening))
            while True:
                if not await stream.wait(keep_alive_interval):
                    yield KEEP_ALIVE_COMMENT
                    continue
                delta = await stream.next_delta()
                if delta is None:
                    break
                if first_piece and delta.text:
                    metrics.first_token.observe(time.perf_counter() - started)
                    first_piece = False
                for choice in form.deltas(delta.index, delta.text, delta.logprobs if logprobs else None):
                    yield server_sent_event(form.chunk(choice))
                if delta.finish_reason is not None:
                    for choice in form.closing(delta.index, delta.finish_reason):
                        yield server_sent_event(form.chunk(choice))
        except EngineStalled as e:
            logger.error("request %s: %s", current_request_id.get(), e)
            yield server_sent_event(stalled(e).body())
            return
        except Exception:
            # The 200 is already sent, and the model refuses requests (UsageError, Overloaded) only before they
            # are queued: whatever this is, it is the server's fault, and all that is left is to say so.
            logger.exception("request %s: a streamed completion failed", current_request_id.get())
            yield server_sent_event(SERVER_ERROR.body())
            return
    count_tokens(metrics, stream.completions, n)
    if include_usage:
        yield server_sent_event(form.usage_chunk(stream.completions, n))
    yield server_sent_event("[DONE]")

"""What generated text looks like in OpenAI's API: the choices of a completion and of a chat completion, their
streamed chunks, logprobs and usage. cllm.server sends these; the model's CompletionStream makes what goes in.

Both forms share one shape of work: a response holds one choice per continuation (n per prompt; choice
i * n + j continues prompt i), and a stream sends, per choice, an opening chunk (chat only: the assistant's
role), a chunk per settled piece of text (with the logprobs of the tokens it settles), and a closing chunk with
the finish reason; then, if asked, a chunk with the usage and no choices.

A chat whose request lets the model call tools has its replies read for calls (cllm.tool_calls): a message holds
them as `tool_calls` (its content null when it says nothing else), and a stream sends, for each call once it is
read, a delta that opens it (its index among the choice's calls, id, type and name, with empty arguments) and one
with its arguments whole, as OpenAI streams calls. Text that may still turn out to be part of a call is held back
meanwhile; logprobs are sent as their tokens come, with an empty content delta when no text goes with them.

Logprobs are the model's own log-probabilities (before penalties and temperature: cllm.generate.TokenLogprob),
with each token written as its text. A token that ends in the middle of a multi-byte character has no text of
its own: it is written with U+FFFD, and chat's `bytes` are that text's UTF-8, not the token's raw bytes. A legacy
{token: log-probability} dict of alternatives also holds the token itself when it is not among them, as OpenAI's
legacy completions hold it ("up to logprobs + 1" entries; chat lists the alternatives alone); of tokens written
alike (several such tokens), it keeps the most likely's.
A completion that ended on the separator lists the separator's logprob last, as vLLM does, though its text stops
before it; a chat leaves out its end of turn, the template's markup, as OpenAI's chat does.

A completion may echo its prompt, as OpenAI's legacy completions do: each choice's text is its prompt's (as the
client gave it, or its token ids decoded) followed by the continuation, and its logprobs cover the prompt's
tokens (those the model was given: an empty prompt's separator) before the generated ones: the first with a null
logprob and null alternatives (nothing predicts it), each other's computed from the logits at the position before
it, in the prefill's forward pass (cllm.generate.Continuation's prompt_logprobs), with as many alternatives as a
generated token's. A stream sends the prompt with its logprobs in each choice's first chunk, with the first
generated text.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from .generate import Completion, TokenLogprob
from .tool_calls import ToolCalling, ToolCallReader, finish_reason


def usage(completions: Sequence[Completion], n: int) -> dict:
    """Every choice's generated tokens, and each prompt's tokens once (not once per choice)."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class ResponseForm:
    """One route's way of writing choices; `header` opens every response and chunk."""

    object = chunk_object = id_prefix = ""

    def __init__(self, tokenizer, model_name: str):
        self.tokenizer = tokenizer
        self.header = {"id": f"{self.id_prefix}{uuid.uuid4().hex}", "object": self.object,
                       "created": int(time.time()), "model": model_name}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def response(self, completions: Sequence[Completion], n: int) -> dict:
        return self.header | {"choices": [self.choice(i, c) for i, c in enumerate(completions)],
                              "usage": usage(completions, n)}

    def chunk(self, choice: dict) -> dict:
        return self.header | {"object": self.chunk_object, "choices": [choice]}

    def usage_chunk(self, completions: Sequence[Completion], n: int) -> dict:
        return self.header | {"object": self.chunk_object, "choices": [], "usage": usage(completions, n)}

    def choice(self, index: int, completion: Completion) -> dict:
        raise NotImplementedError

    def opening(self, index: int) -> dict | None:
        """The chunk that opens a choice's stream, if the form has one."""
        return None

    def deltas(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]:
        """The chunks for a piece of a choice's stream: one, unless it settles neither text nor tokens."""
        return [self.delta(index, text, logprobs)] if text or logprobs else []

    def closing(self, index: int, finish_reason: str) -> list[dict]:
        """The chunks that end a choice's stream: its finish reason's."""
        return [self.finish(index, finish_reason)]

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError

    def finish(self, index: int, finish_reason: str) -> dict:
        raise NotImplementedError


class TextCompletionForm(ResponseForm):
    """/v1/completions: choices of text, with logprobs in the legacy form (token strings, their log-probabilities,
    a {token: log-probability} dict of the alternatives, and each token's offset in the choice's text). `echo`,
    if given, holds per choice the text it begins with, its prompt's; a choice's Completion then holds its
    prompt's logprobs, if it has logprobs at all (see the module notes)."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, tokenizer, model_name: str, echo: Sequence[str] | None = None):
        super().__init__(tokenizer, model_name)
        self.echo = echo
        self._offsets: dict[int, int] = {}  # per streamed choice, the text its tokens so far cover
        self._echoed: set[int] = set()  # the streamed choices whose prompt has been sent

    def choice(self, index: int, completion: Completion) -> dict:
        logprobs = completion.logprobs
        if logprobs is not None:
            logprobs = [*(completion.prompt_logprobs or ()), *logprobs]
        return {"text": ("" if self.echo is None else self.echo[index]) + completion.text, "index": index,
                "finish_reason": completion.finish_reason, "logprobs": self.logprobs(logprobs, 0)}

    def deltas(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]:
        # A choice's first delta brings its prompt's logprobs (serving.Delta), and its prompt goes before its text.
        if self.echo is not None and index not in self._echoed:
            self._echoed.add(index)
            text = self.echo[index] + text
        return super().deltas(index, text, logprobs)

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> dict:
        offset = self._offsets.get(index, 0)
        written = self.logprobs(logprobs, offset)
        if written is not None:
            self._offsets[index] = offset + sum(map(len, written["tokens"]))
        return {"text": text, "index": index, "finish_reason": None, "logprobs": written}

    def finish(self, index: int, finish_reason: str) -> dict:
        return {"text": "", "index": index, "finish_reason": finish_reason, "logprobs": None}

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int) -> dict | None:
        if entries is None:
            return None
        tokens = [self.token_text(e.id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.top is None else self.alternatives(e) for e in entries],
                "text_offset": offsets}

    def alternatives(self, entry: TokenLogprob) -> dict[str, float]:
        """{token: log-probability} of the alternatives, most likely first, then the token itself if it is not
        among them; tokens written alike keep the most likely's log-probability, which a client comparing a
        token's with the best alternative's (lm-evaluation-harness) needs to find."""
        written: dict[str, float] = {}
        for token_id, logprob in (*entry.top, (entry.id, entry.logprob)):
            written.setdefault(self.token_text(token_id), logprob)
        return written


class ChatCompletionForm(ResponseForm):
    """/v1/chat/completions: the assistant's message per choice, with its tool calls read as `calling` says, and
    logprobs as {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, tokenizer, model_name: str, calling: ToolCalling = ToolCalling()):
        super().__init__(tokenizer, model_name)
        self.calling = calling
        self._end_ids = {tokenizer.separator_id, *tokenizer.end_of_turn_ids}  # what ends a reply
        self._readers: dict[int, ToolCallReader] = {}  # per streamed choice, when calls are read
        self._calls_sent: dict[int, int] = {}

    def choice(self, index: int, completion: Completion) -> dict:
        reply = self.calling.reply(completion)
        message = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            message |= {"content": reply.text or None, "tool_calls": list(reply.tool_calls)}
        return {"index": index, "message": message, "logprobs": self.logprobs(self._said(completion.logprobs)),
                "finish_reason": reply.finish_reason}

    def opening(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def deltas(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[dict]:
        logprobs = self._said(logprobs)
        if self.calling.callable is None:
            return self._settled(index, [text] if text else [], logprobs)
        return self._settled(index, self._reader(index).push(text), logprobs)

    def closing(self, index: int, reason: str) -> list[dict]:
        if self.calling.callable is None:
            return super().closing(index, reason)
        reader = self._reader(index)
        return self._settled(index, reader.finish(), None) + [self.finish(index, finish_reason(reason,
                                                                                               reader.calls))]

    def _said(self, entries: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
        """The entries of the reply's own tokens: a continuation lists the end of turn that ended it last
        (cllm.generate.Continuation), but that is the template's markup, which OpenAI's chat logprobs never show."""
        return None if entries is None else [e for e in entries if e.id not in self._end_ids]

    def _reader(self, index: int) -> ToolCallReader:
        if index not in self._readers:
            self._readers[index] = self.calling.reader()
        return self._readers[index]

    def _settled(self, index: int, settled: list[str | dict], logprobs: list[TokenLogprob] | None) -> list[dict]:
        """The deltas of what a reader settled: text, and two for each call (OpenAI's opening, and the arguments);
        the logprobs go with the first, or with an empty text if nothing settled."""
        deltas = []
        for item in settled:
            if isinstance(item, str):
                deltas.append({"content": item})
                continue
            call = self._calls_sent.get(index, 0)
            self._calls_sent[index] = call + 1
            function = item["function"]
            deltas += [{"tool_calls": [{"index": call, "id": item["id"], "type": "function",
                                        "function": {"name": function["name"], "arguments": ""}}]},
                       {"tool_calls": [{"index": call, "function": {"arguments": function["arguments"]}}]}]
        if logprobs and not deltas:
            deltas.append({"content": ""})
        return [{"index": index, "delta": delta, "logprobs": self.logprobs(logprobs) if i == 0 else None,
                 "finish_reason": None} for i, delta in enumerate(deltas)]

    def finish(self, index: int, finish_reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None

        def token(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [token(e.id, e.logprob) | {"top_logprobs": [token(i, lp) for i, lp in e.top]}
                            for e in entries]}

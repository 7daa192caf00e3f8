"""Tool calls: what a chat request lets the model call (tools, tool_choice), and the calls read from its reply.

Chat models that call tools in the Hermes form, as Qwen2.5 and Qwen3 do, write each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly several, possibly after some text (Qwen3's <think>...</think> block, say). A reply is read into OpenAI's
form: each call {"id": "call_...", "type": "function", "function": {"name", "arguments": a JSON string}}, and the
content, the text outside the calls, less the whitespace around them (what stood before a run of calls stays
between the texts on either side of it). A block that is no call stays in the content as the text it is: JSON that
does not parse, no name, a function the request does not let the model call, or no closing tag (the reply ended
first). A reply that holds calls and ended by itself finishes with "tool_calls"; one cut at max_tokens keeps
"length".

tool_choice, as OpenAI defines it:
- "none": the template is given no tools (as vLLM renders it), and no call is read;
- "auto", the default when there are tools: the template offers them, and calls to any of them are read;
- "required": the tools are offered and the reply is made to begin with "<tool_call>" (written after the
  generation prompt, as if the model had), so that it opens with a call; calls are read as for "auto";
- {"type": "function", "function": {"name": N}}: the tools are offered, the reply is made to begin with
  `<tool_call>\n{"name": N, "arguments":`, and only calls to N are read: a call to another function stays text.
What the reply is made to begin with is part of it as read. Nothing constrains what the model writes after that: a
call it does not finish stays text.

Streaming (ToolCallReader). Text is passed on as it comes, but for what may still turn out to belong to a call: a
tail that could begin "<tool_call>" and the whitespace before it, and a block from "<tool_call>" on until its
closing tag, when it becomes a call or, if it is none, text again. A whole reply is read by the same reader fed
once, so that a stream's pieces add up to the whole reply's message.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .errors import UsageError
from .generate import Completion, partial_match_length

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ChatCompletion(Completion):
    """A chat reply: a Completion whose text is the content (the text outside its tool calls), with the calls read
    from it in OpenAI's form."""
    tool_calls: tuple[dict, ...] = ()


@dataclass(frozen=True)
class ToolCalling:
    """How one request's tools are used: those the template offers (None: none), the functions whose calls are
    read from the reply (None: no call is read), and what the reply is made to begin with."""
    tools: list[Mapping] | None = None
    callable: frozenset[str] | None = None
    reply_start: str = ""

    def reader(self) -> ToolCallReader:
        """A reader for one streamed reply; only when calls are read."""
        return ToolCallReader(self.callable, start=self.reply_start)

    def reply(self, completion: Completion) -> ChatCompletion:
        """The whole reply with its calls read, if any are."""
        if self.callable is None:
            return ChatCompletion(**vars(completion))
        reader = self.reader()
        settled = reader.push(completion.text) + reader.finish()
        return ChatCompletion(**{**vars(completion), "text": "".join(s for s in settled if isinstance(s, str)),
                                 "finish_reason": finish_reason(completion.finish_reason, reader.calls),
                                 "tool_calls": tuple(s for s in settled if isinstance(s, dict))})


def finish_reason(reason: str, calls: int) -> str:
    """A reply's finish reason once its calls are read: "tool_calls" if it called any and ended by itself."""
    return "tool_calls" if calls and reason == "stop" else reason


def tool_calling(tools: Sequence[Mapping] | None, tool_choice: str | Mapping | None = None) -> ToolCalling:
    """What a request's tools and tool_choice (OpenAI's forms) mean (module notes). UsageError for tools that are
    not OpenAI's function tools, two of one name, or a tool_choice they cannot meet."""
    names = [_function_name(tool, f"tools[{i}]") for i, tool in enumerate(tools or ())]
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise UsageError(f"tools name the function {twice!r} twice")
    if tool_choice is None:
        tool_choice = "auto" if names else "none"
    if tool_choice == "none":
        return ToolCalling()
    if isinstance(tool_choice, str) and tool_choice not in TOOL_CHOICES:
        raise UsageError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function, got "
                         f"{tool_choice!r}")
    if not names:
        raise UsageError("tool_choice needs tools to choose from")
    if tool_choice == "auto":
        return ToolCalling(list(tools), frozenset(names))
    if tool_choice == "required":
        return ToolCalling(list(tools), frozenset(names), OPEN)
    name = _function_name(tool_choice, "tool_choice")
    if name not in names:
        raise UsageError(f"tool_choice names the function {name!r}, which is not among the tools")
    opening = f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments":'
    return ToolCalling(list(tools), frozenset({name}), opening)


def _function_name(value, where: str) -> str:
    """The name of a function tool, or of a named tool_choice: {"type": "function", "function": {"name": ...}}."""
    function = value.get("function") if isinstance(value, Mapping) and value.get("type") == "function" else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise UsageError(f'{where} must be {{"type": "function", "function": {{"name": ...}}}}')
    return function["name"]


class ToolCallReader:
    """Reads a reply's calls as its text comes (module notes): push() each piece, then finish(). Each returns what
    it settles, in order: text (a str) and calls (dicts in OpenAI's form). `calls` counts the calls read."""

    def __init__(self, names: Collection[str], *, start: str = ""):
        self.names = names  # the functions it may call
        self.calls = 0
        self._pending = start  # text not settled yet
        self._in_block = False  # _pending follows a "<tool_call>" not closed yet
        self._gap = ""  # the whitespace before the open block: the content's, unless the block is a call
        self._after_call = False  # whitespace that comes now separates a call from the content
        # The whitespace before the calls since the content's last text, which goes between that text and the
        # next (None: no call since); and whether the content has any text yet.
        self._separator: str | None = None
        self._said = False

    def push(self, text: str) -> list[str | dict]:
        self._pending += text
        return self._settle(final=False)

    def finish(self) -> list[str | dict]:
        """The rest, once the reply has ended: an open block is text."""
        return self._settle(final=True)

    def _settle(self, final: bool) -> list[str | dict]:
        settled: list[str | dict] = []
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE)
                if end < 0:
                    if final:
                        settled.append(self._content(self._gap + OPEN + self._pending))
                        self._pending, self._in_block = "", False
                    break
                block, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                call = self._call(block)
                if call is None:
                    settled.append(self._content(self._gap + OPEN + block + CLOSE))
                else:
                    settled.append(call)
                    self._separator = self._gap if self._separator is None else self._separator
                self._in_block, self._after_call, self._gap = False, call is not None, ""
                continue
            if self._after_call:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    break
                self._after_call = False
            start = self._pending.find(OPEN)
            if start >= 0:
                text = self._pending[:start].rstrip()
                self._gap = self._pending[len(text):start]
                settled.append(self._content(text))
                self._pending, self._in_block = self._pending[start + len(OPEN):], True
                continue
            if final:
                settled.append(self._content(self._pending))
                self._pending = ""
                break
            # Held back: a tail that may begin a call, and the whitespace before it, which a call would drop.
            text = self._pending[:len(self._pending) - partial_match_length(self._pending, (OPEN,))].rstrip()
            settled.append(self._content(text))
            self._pending = self._pending[len(text):]
            break
        return _joined(settled)

    def _content(self, text: str) -> str:
        """text as the content goes on with it: after calls, with the whitespace that stood before them, unless
        the content has no text yet."""
        if not text:
            return ""
        if self._separator is not None:
            text = (self._separator if self._said else "") + text
            self._separator = None
        self._said = True
        return text

    def _call(self, block: str) -> dict | None:
        """The call a block holds, or None if it holds none this request lets the model make."""
        try:
            value = json.loads(block, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict):
            return None
        name, arguments = value.get("name"), value.get("arguments", {})
        if not isinstance(name, str) or name not in self.names or not isinstance(arguments, dict):
            return None
        self.calls += 1
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity, which no other parser takes


def _joined(settled: list[str | dict]) -> list[str | dict]:
    """settled with neighbouring texts joined and empty ones left out."""
    joined: list[str | dict] = []
    for item in settled:
        if isinstance(item, str) and joined and isinstance(joined[-1], str):
            joined[-1] += item
        elif item != "":
            joined.append(item)
    return joined

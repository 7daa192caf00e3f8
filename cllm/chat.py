"""Chat templates: a list of messages rendered into the one prompt text a chat model was trained on.

A chat model's tokenizer carries a Jinja template (Hugging Face's `chat_template`, in tokenizer_config.json or
chat_template.jinja), imported with the model and kept in the .cllm file's tokenizer. It is rendered as
`transformers`' apply_chat_template renders it, so that a prompt is the same text in both: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, loop controls, a `tojson` filter that keeps non-ASCII text,
`raise_exception(message)` and `strftime_now(format)`, and the variables `messages`, `tools` (None unless given),
`add_generation_prompt`, `bos_token` and `eos_token`, and the caller's own template arguments
(`chat_template_kwargs`, as transformers' `**kwargs`: Qwen3's `enable_thinking`), which may set none of those names
nor the environment's globals (RESERVED_NAMES). Templates written for training masks use `{% generation %}` blocks;
here those render their body.

Tools. `tools` are OpenAI's tool definitions as given ({"type": "function", "function": {"name", ...}}), which
tool-calling templates (Qwen2.5's, Qwen3's) print with tojson. An assistant's message may carry OpenAI's
`tool_calls` (its content then may be null: it is rendered as "", as vLLM renders it), and a `tool` message answers
one. A call's `function.arguments` is a JSON string in OpenAI's form; the template is given the object it encodes,
as vLLM gives it and as transformers documents tool calls: Qwen2.5's template prints arguments with tojson, which
would turn a string into a quoted string the model never saw. Arguments that hold no JSON object stay a string.

What a message says is text. The rendered text holds the template's special tokens as text ("<|im_start|>"), and
is encoded with those parsed as the tokens they name and nothing added, as transformers tokenizes a chat; but only
the template's own markup becomes tokens. A message's strings (its content, its name, its tool calls' arguments,
any other field but its role), the tools' and the template arguments' strings may hold the same text,
"hi<|im_end|>\n<|im_start|>system\n...", and that stays literal text, as a prompt does: render_quoting renders
with each such occurrence replaced by a marker, then puts the text back and says where it landed (`quoted`), so
that the tokenizer parses markup everywhere else (Tokenizer.encode_chat). A chat that holds no markup renders in
one pass and gives exactly transformers' ids. Occurrences are replaced whole: what a template makes of a marker it
cuts or changes stays literal text too, so a message's markup is never parsed, though the text then differs from
transformers'.

Limits. A template is the model's code: it renders in a bounded sandbox (cllm.template_sandbox), and a
template or a render past one of its limits is refused with TemplateLimitExceeded, a UsageError naming the limit.
What a caller hands the template is bounded by the same limits wherever the template uses it, and may nest at
most MAX_NESTING levels deep (quoting walks it).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import jinja2

from .errors import UsageError
from .template_sandbox import (
    MAX_RENDERED_CHARS,
    MAX_TEMPLATE_CHARS,
    BoundedEnvironment,
    TemplateLimitExceeded,
    exceeded,
    render_budget,
)

ROLES = ("system", "user", "assistant", "developer", "tool")
# What a render sets itself, as transformers' apply_chat_template sets it, and the environment's globals: names a
# caller's template argument may not take.
RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                            "bos_token", "eos_token"}) | frozenset(BoundedEnvironment().globals)
MAX_NESTING = 64  # levels of lists and objects in what a caller hands a template (a tool's schema needs a dozen)

__all__ = ["MAX_NESTING", "RESERVED_NAMES", "ROLES", "ChatTemplate", "RenderedChat", "TemplateLimitExceeded",
           "message_text", "normalized_message", "template_kwargs"]


class RenderedChat(NamedTuple):
    """A rendered prompt, and the spans start:stop of it where a message's own strings held markup: text that must
    stay text (render_quoting)."""
    text: str
    quoted: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may name. It compiles when it is made: UsageError for a template
    that is not valid Jinja, TemplateLimitExceeded for one too long or too deep to compile."""

    source: str
    bos_token: str = ""
    eos_token: str = ""  # the token that ends an assistant's turn, which also ends a chat generation

    def __post_init__(self):
        self.template  # noqa: B018 (compiles it now, so that a model with a broken template is refused at load)

    def to_dict(self) -> dict:
        return {"source": self.source, "bos_token": self.bos_token, "eos_token": self.eos_token}

    @classmethod
    def from_dict(cls, d) -> "ChatTemplate":
        if not isinstance(d, dict) or not all(isinstance(d.get(k, ""), str) for k in ("source", "bos_token",
                                                                                      "eos_token")):
            raise UsageError("the tokenizer's chat template is malformed (want source, bos_token and eos_token "
                             "strings)")
        return cls(d.get("source", ""), d.get("bos_token", ""), d.get("eos_token", ""))

    @cached_property
    def template(self) -> jinja2.Template:
        if len(self.source) > MAX_TEMPLATE_CHARS:
            raise exceeded(f"is {len(self.source):,} characters long, more than {MAX_TEMPLATE_CHARS:,}",
                            "MAX_TEMPLATE_CHARS")
        try:
            with render_budget():  # the compiler folds constant expressions, through the same hooks
                return BoundedEnvironment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise UsageError(f"the model's chat template is not valid Jinja: {e}") from None
        except RecursionError:
            raise exceeded("nests too deeply to compile", "Python's recursion limit") from None

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, chat_template_kwargs: Mapping | None = None) -> str:
        """The prompt for messages ({"role", "content"} each), offering the tools, with the caller's template
        arguments; with add_generation_prompt, it ends where the assistant's reply begins. UsageError for messages
        the template refuses (roles out of order, ...) or arguments it may not take, TemplateLimitExceeded for a
        render past the limits (module notes)."""
        return self._render(_arguments(messages, tools, chat_template_kwargs), add_generation_prompt)

    def render_quoting(self, messages: Sequence[Mapping], markup: Collection[str], *,
                       add_generation_prompt: bool = True, tools: Sequence[Mapping] | None = None,
                       chat_template_kwargs: Mapping | None = None) -> RenderedChat:
        """The prompt for messages, as render() makes it, and where in it the caller's strings (the messages', the
        tools', the template arguments') hold one of the markup strings (the tokenizer's special tokens): those
        spans are text, never markup (module notes)."""
        arguments = _arguments(messages, tools, chat_template_kwargs)
        quoting = _Quoting(markup)
        escaped = quoting.escaped(arguments)
        if escaped == arguments:  # no markup in them: one render, as transformers'
            return RenderedChat(self._render(arguments, add_generation_prompt), ())
        return quoting.restored(self._render(escaped, add_generation_prompt))

    def _render(self, arguments: dict, add_generation_prompt: bool) -> str:
        pieces, size = [], 0
        with render_budget():
            try:
                for piece in self.template.generate(**arguments, add_generation_prompt=add_generation_prompt,
                                                    bos_token=self.bos_token, eos_token=self.eos_token):
                    size += len(piece)
                    if size > MAX_RENDERED_CHARS:
                        raise exceeded(f"renders more than {MAX_RENDERED_CHARS:,} characters",
                                        "MAX_RENDERED_CHARS")
                    pieces.append(piece)
            except UsageError:
                raise
            except jinja2.TemplateError as e:  # raise_exception's messages are written for users ("roles must ...")
                raise UsageError(f"the model's chat template refused the messages: {e}") from None
            except RecursionError:
                raise exceeded("recurses too deeply", "Python's recursion limit") from None
            except Exception as e:  # the template is the model's code: whatever it raises refuses these messages
                raise UsageError(f"the model's chat template failed on these messages: {type(e).__name__}: "
                                 f"{e}") from None
        return "".join(pieces)


def _arguments(messages: Sequence[Mapping], tools: Sequence[Mapping] | None,
               chat_template_kwargs: Mapping | None) -> dict:
    """What a render hands the template besides add_generation_prompt and the special tokens, checked: the
    messages as templates expect them, the tools, and the caller's template arguments."""
    messages = [normalized_message(m, i) for i, m in enumerate(messages)]
    if not messages:
        raise UsageError("a chat needs at least one message")
    if tools is not None and (isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence)
                              or not all(isinstance(tool, Mapping) for tool in tools)):
        raise UsageError("tools must be a list of objects ({\"type\": \"function\", \"function\": {...}})")
    arguments = {"messages": messages, "tools": None if tools is None else list(tools),
                 **template_kwargs(chat_template_kwargs)}
    for name, value in arguments.items():
        _check_nesting(value, name)
    return arguments


def template_kwargs(kwargs: Mapping | None) -> dict:
    """A caller's template arguments (chat_template_kwargs), checked: named values, none of them a name the render
    sets itself (RESERVED_NAMES)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(name, str) for name in kwargs):
        raise UsageError("chat_template_kwargs must be an object of named values")
    taken = sorted(RESERVED_NAMES.intersection(kwargs))
    if taken:
        raise UsageError(f"chat_template_kwargs cannot set '{taken[0]}': the renderer sets it itself")
    return dict(kwargs)


def _check_nesting(value, name: str) -> None:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, (list, tuple)) else ()
        if children and depth >= MAX_NESTING:
            raise UsageError(f"{name} nests lists and objects more than {MAX_NESTING} levels deep")
        pending.extend((child, depth + 1) for child in children)


def normalized_message(message: Mapping, index: int) -> dict:
    """A message as templates expect it: a role, a string content (message_text), and its tool calls' arguments
    as objects (module notes)."""
    if not isinstance(message, Mapping):
        raise UsageError(f"messages[{index}] must be an object with a role and a content")
    role = message.get("role")
    if role not in ROLES:
        raise UsageError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
    tool_calls, content = message.get("tool_calls"), message.get("content")
    if content is None and role == "assistant" and tool_calls:
        content = ""  # an assistant's message that only calls tools says nothing
    try:
        content = message_text(content)
    except UsageError as e:
        raise UsageError(f"messages[{index}].content {e}") from None
    normalized = {**message, "role": role, "content": content}
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(isinstance(call, Mapping) for call in tool_calls):
            raise UsageError(f"messages[{index}].tool_calls must be a list of objects")
        normalized["tool_calls"] = [_with_decoded_arguments(call) for call in tool_calls]
    return normalized


def _with_decoded_arguments(call: Mapping) -> Mapping:
    """The call with its function's arguments, a JSON string, as the object it encodes, if it encodes one."""
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        return call
    return {**call, "function": {**function, "arguments": arguments}} if isinstance(arguments, dict) else call


def message_text(content) -> str:
    """A message's content as one string: a string, or OpenAI's content parts of type text, joined with newlines
    (as vLLM joins them). Any other part (an image, audio) is refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, Mapping) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "\n".join(part["text"] for part in content)
    raise UsageError("must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...}); only "
                     "text parts are supported")


# ---------------------------------------------------------------------------------------------------------------
# quoting: the markup a caller's strings hold stays text

# A marker is OPEN, the index of what it stands for, CLOSE: private-use characters, which no filter changes (case,
# trimming, JSON with non-ASCII kept). OPEN is quoted too wherever a caller's string holds it, so every marker in a
# render is one of ours.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")


class _Quoting:
    """Replaces each occurrence of a markup string in a caller's strings by a marker, and puts them back."""

    def __init__(self, markup: Collection[str]):
        # Longest first, so that an occurrence is matched as a tokenizer matches it (leftmost, then longest).
        self.quoted = sorted({m for m in markup if m} | {_OPEN}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, self.quoted)))
        self.index = {m: i for i, m in enumerate(self.quoted)}

    def escaped(self, arguments: dict) -> dict:
        """The render's arguments with every string in their values escaped, keys included, but the messages'
        roles: one of ROLES, which templates compare. The arguments' own names are the template's variables."""
        escape = functools.partial(_replaced_strings, replace=self._escape)
        messages = [{escape(k): v if k == "role" else escape(v) for k, v in message.items()}
                    for message in arguments["messages"]]
        return {name: messages if name == "messages" else escape(value) for name, value in arguments.items()}

    def _escape(self, s: str) -> str:
        return self.pattern.sub(lambda m: f"{_OPEN}{self.index[m[0]]}{_CLOSE}", s)

    def restored(self, rendered: str) -> RenderedChat:
        pieces, quoted, position, length = [], [], 0, 0
        for marker in _MARKER.finditer(rendered):
            index = int(marker[1])
            if index >= len(self.quoted):
                continue  # not one of ours: the template's own text
            pieces.append(rendered[position:marker.start()])
            length += marker.start() - position
            pieces.append(self.quoted[index])
            quoted.append((length, length + len(self.quoted[index])))
            length += len(self.quoted[index])
            position = marker.end()
        pieces.append(rendered[position:])
        return RenderedChat("".join(pieces), tuple(quoted))


def _replaced_strings(value, replace):
    """value with replace applied to every string in it, keys included."""
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, Mapping):
        return {_replaced_strings(k, replace): _replaced_strings(v, replace) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_replaced_strings(v, replace) for v in value)
    return value

"""Chat templates: a list of messages rendered into the one prompt text a chat model was trained on.

A chat model's tokenizer carries a Jinja template (Hugging Face's `chat_template`, in tokenizer_config.json or
chat_template.jinja), imported with the model and kept in the .cllm file's tokenizer. It is rendered as
`transformers`' apply_chat_template renders it, so that a prompt is the same text in both: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, loop controls, a `tojson` filter that keeps non-ASCII text,
`raise_exception(message)` and `strftime_now(format)`, and the variables `messages`, `add_generation_prompt`,
`bos_token` and `eos_token`. Templates written for training masks use `{% generation %}` blocks; here those
render their body.

What a message says is text. The rendered text holds the template's special tokens as text ("<|im_start|>"), and
is encoded with those parsed as the tokens they name and nothing added, as transformers tokenizes a chat; but only
the template's own markup becomes tokens. A message's strings (its content, its name, any other field but its
role) may hold the same text, "hi<|im_end|>\n<|im_start|>system\n...", and that stays literal text, as a prompt
does: render_quoting renders the messages with each such occurrence replaced by a marker, then puts the text back
and says where it landed (`quoted`), so that the tokenizer parses markup everywhere else (Tokenizer.encode_chat).
A conversation that holds no markup renders in one pass and gives exactly transformers' ids. Occurrences are
replaced whole: what a template makes of a marker it cuts or changes stays literal text too, so a message's markup
is never parsed, though the text then differs from transformers'.

Limits. A template is the model's code: it renders in a bounded sandbox (cllm.template_sandbox), and a
template or a render past one of its limits is refused with TemplateLimitExceeded, a UsageError naming the limit.
"""
from __future__ import annotations

import functools
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

__all__ = ["ROLES", "ChatTemplate", "RenderedChat", "TemplateLimitExceeded", "message_text",
           "normalized_message"]


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

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
        """The prompt for messages ({"role", "content"} each); with add_generation_prompt, it ends where the
        assistant's reply begins. UsageError for messages the template refuses (roles out of order, ...),
        TemplateLimitExceeded for a render past the limits (module notes)."""
        return self._render(_normalized(messages), add_generation_prompt)

    def render_quoting(self, messages: Sequence[Mapping], markup: Collection[str], *,
                       add_generation_prompt: bool = True) -> RenderedChat:
        """The prompt for messages, as render() makes it, and where in it the messages' own strings hold one of the
        markup strings (the tokenizer's special tokens): those spans are text, never markup (module notes)."""
        messages = _normalized(messages)
        quoting = _Quoting(markup)
        escaped = [quoting.escaped(m) for m in messages]
        if escaped == messages:  # no markup in them: one render, as transformers'
            return RenderedChat(self._render(messages, add_generation_prompt), ())
        return quoting.restored(self._render(escaped, add_generation_prompt))

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        pieces, size = [], 0
        with render_budget():
            try:
                for piece in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
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


def _normalized(messages: Sequence[Mapping]) -> list[dict]:
    messages = [normalized_message(m, i) for i, m in enumerate(messages)]
    if not messages:
        raise UsageError("a chat needs at least one message")
    return messages


def normalized_message(message: Mapping, index: int) -> dict:
    """A message as templates expect it: a role and a string content (message_text)."""
    if not isinstance(message, Mapping):
        raise UsageError(f"messages[{index}] must be an object with a role and a content")
    role = message.get("role")
    if role not in ROLES:
        raise UsageError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
    try:
        content = message_text(message.get("content"))
    except UsageError as e:
        raise UsageError(f"messages[{index}].content {e}") from None
    return {**message, "role": role, "content": content}


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
# quoting: the markup a message holds stays text

# A marker is OPEN, the index of what it stands for, CLOSE: private-use characters, which no filter changes (case,
# trimming, JSON with non-ASCII kept). OPEN is quoted too wherever a message holds it, so every marker in a render
# is one of ours.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")


class _Quoting:
    """Replaces each occurrence of a markup string in a message's strings by a marker, and puts them back."""

    def __init__(self, markup: Collection[str]):
        # Longest first, so that an occurrence is matched as a tokenizer matches it (leftmost, then longest).
        self.quoted = sorted({m for m in markup if m} | {_OPEN}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, self.quoted)))
        self.index = {m: i for i, m in enumerate(self.quoted)}

    def escaped(self, message: dict) -> dict:
        """The message with its strings escaped, keys included, but its role: one of ROLES, which templates compare."""
        escape = functools.partial(_replaced_strings, replace=self._escape)
        return {escape(k): v if k == "role" else escape(v) for k, v in message.items()}

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

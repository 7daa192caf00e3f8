"""Chat templates: a list of messages rendered into the one prompt text a chat model was trained on.

A chat model's tokenizer carries a Jinja template (Hugging Face's `chat_template`, in tokenizer_config.json or
chat_template.jinja), imported with the model and kept in the .cllm file's tokenizer. It is rendered as
`transformers`' apply_chat_template renders it, so that a prompt is the same text in both: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, loop controls, a `tojson` filter that keeps non-ASCII text,
`raise_exception(message)` and `strftime_now(format)`, and the variables `messages`, `add_generation_prompt`,
`bos_token` and `eos_token`. Templates written for training masks use `{% generation %}` blocks; here those
render their body.

The rendered text holds the template's special tokens as text ("<|im_start|>"): it is encoded with those parsed
as tokens and nothing added (Tokenizer.encode_rendered), as transformers does when it tokenizes a chat.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UsageError

ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may name."""

    source: str
    bos_token: str = ""
    eos_token: str = ""  # the token that ends an assistant's turn, which also ends a chat generation

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
        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise UsageError(f"the model's chat template is not valid Jinja: {e}") from None

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
        """The prompt for messages ({"role", "content"} each); with add_generation_prompt, it ends where the
        assistant's reply begins. UsageError for messages the template refuses (roles out of order, ...)."""
        messages = [normalized_message(m, i) for i, m in enumerate(messages)]
        if not messages:
            raise UsageError("a chat needs at least one message")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:  # raise_exception's messages are written for users ("roles must ...")
            raise UsageError(f"the model's chat template refused the messages: {e}") from None


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


class _GenerationBlocks(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} (marks the assistant's text for training masks): its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env

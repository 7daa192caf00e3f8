"""How a model says it is to be used for embeddings, as its makers declared it in the sentence-transformers files of
its folder (cllm.formats.sentence_transformers): the pooling of its hidden states ("last" for Qwen3-Embedding,
cllm.pooling), whether the pooled vector is scaled to unit length (a Normalize module), and its named prompts, the
instructions put before a text ("query": "Instruct: ...\\nQuery:"), with the name of the one used when none is
asked for.

It travels with the tokenizer, as the chat template does (cllm.tokenizer): both say how text is to be put to the
model, and every path a model takes (a .cllm file, a Hugging Face folder, fine-tuning) carries its tokenizer. In a
.cllm file it is the "embedding" section of the tokenizer JSON; earlier cllm versions ignore it, and embed with
their own defaults. A model that declares nothing embeds with EmbeddingConfig(): mean pooling, unit length, no
prompts.

A model file is hostile input: from_dict refuses any field it does not know and checks every type, and the prompts
are bounded (MAX_PROMPTS of them, names of at most MAX_PROMPT_NAME_CHARS characters, MAX_PROMPTS_CHARS characters
of prompts in all), so that a file cannot make a server hold or echo megabytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import UsageError
from .model_file_errors import few_names
from .pooling import POOLINGS

MAX_PROMPTS = 1024
MAX_PROMPT_NAME_CHARS = 256
MAX_PROMPTS_CHARS = 1 << 20
FIELDS = ("pooling", "normalize", "prompts", "default_prompt_name")


@dataclass(frozen=True)
class EmbeddingConfig:
    """A model's embedding defaults; checked when made (UsageError naming what is wrong)."""

    pooling: str = "mean"
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise UsageError(f"the embedding pooling must be one of {', '.join(POOLINGS)}, got "
                             f"{_short(self.pooling)}")
        if not isinstance(self.normalize, bool):
            raise UsageError(f"the embedding normalize must be true or false, got {_short(self.normalize)}")
        _check_prompts(self.prompts)
        if self.default_prompt_name is not None and (not isinstance(self.default_prompt_name, str)
                                                     or self.default_prompt_name not in self.prompts):
            raise UsageError(f"the default prompt name {_short(self.default_prompt_name)} is not one of the "
                             f"prompts ({self.prompt_names()})")

    def to_dict(self) -> dict:
        return {"pooling": self.pooling, "normalize": self.normalize, "prompts": dict(self.prompts),
                "default_prompt_name": self.default_prompt_name}

    @classmethod
    def from_dict(cls, d) -> "EmbeddingConfig":
        if not isinstance(d, dict):
            raise UsageError(f"the embedding section must be a JSON object, got {_short(d)}")
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise UsageError(f"the embedding section has fields this cllm does not know: {few_names(unknown)}")
        return cls(**d)

    def prompt_names(self) -> str:
        """The prompts' names, for a message: the first few, and how many more."""
        return few_names(list(map(json.dumps, self.prompts))) if self.prompts else "it names none"

    def prompt_text(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The text to put before each text to embed, as sentence-transformers' encode() chooses it: prompt as it
        is, or the prompt named prompt_name, or with neither the default prompt ("" if the model names none).
        UsageError for both, or for a name the model does not have."""
        if prompt is not None and prompt_name is not None:
            raise UsageError("give a prompt or a prompt_name, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise UsageError(f"prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt_name is None:
            return "" if self.default_prompt_name is None else self.prompts[self.default_prompt_name]
        if prompt_name not in self.prompts:
            raise UsageError(f"prompt_name {_short(prompt_name)} is not one of this model's prompts "
                             f"({self.prompt_names()})")
        return self.prompts[prompt_name]


def _check_prompts(prompts) -> None:
    if not isinstance(prompts, dict):
        raise UsageError(f"the embedding prompts must be an object of names and prompts, got {_short(prompts)}")
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"the embedding prompts are {len(prompts):,}, more than {MAX_PROMPTS:,}")
    for name, text in prompts.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_PROMPT_NAME_CHARS:
            raise UsageError(f"a prompt's name must be a string of 1 to {MAX_PROMPT_NAME_CHARS} characters, got "
                             f"{_short(name)}")
        if not isinstance(text, str):
            raise UsageError(f"the prompt {_short(name)} must be a string, got {_short(text)}")
    chars = sum(len(text) for text in prompts.values())
    if chars > MAX_PROMPTS_CHARS:
        raise UsageError(f"the embedding prompts hold {chars:,} characters, more than {MAX_PROMPTS_CHARS:,}")


def _short(value) -> str:
    """A value from a file, as JSON cut short: a message must not echo a megabyte back."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."

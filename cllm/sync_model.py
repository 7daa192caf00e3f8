"""The synchronous model API, for offline jobs that have no event loop: embedding a corpus, generating text.

    model = cllm.Model.open("model.cllm")                       # or a GGUF file, or a Hugging Face folder
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)   # (n, dim) float32
    completion = model.generate("Once upon a time", max_new_tokens=50, temperature=0)   # .text, .finish_reason
    reply = model.chat([{"role": "user", "content": "Hello!"}], max_new_tokens=50)   # with the model's template
    reply = model.chat(messages, tools=[weather_tool])           # .tool_calls, in OpenAI's form

encode() takes sentence-transformers' arguments and returns what it returns: a float32 array, (n, dim) for a list
and (dim,) for a single string. An embedding model's declared defaults (cllm.embedding_config) apply as there: its
pooling and normalization, its named prompts (prompt_name="query") and its default prompt; prompt="..." gives one
whole. Texts are tokenized with every token the tokenizer adds (Tokenizer.encode_for_embedding) and batched by
length (cllm.pooling.length_batches: sorted, then cut where the work, padding included, is least, at most
batch_size texts a batch), so a batch pads its texts to nearly the same length, and the vectors come back in the
order of the texts. Embeddings are cllm.pooling's, the same as AsyncModel.embed's up to float32 rounding.

Threads: the kernels run on `threads`, and BLAS (one-row products) is held at it, as in AsyncModel (cllm.threads).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .checkpoint import load_model
from .checks import require_int
from .embedding_config import EmbeddingConfig
from .errors import UsageError
from .generate import Completion, generate
from .model import GPT, ForwardWorkspaces
from .pooling import check_pooling, embed_batch, fit_to_context, length_batches
from .threads import available_cpus, blas_limit
from .tokenizer import Tokenizer
from .tool_calls import ChatCompletion, tool_calling


class Model:
    """A model and its tokenizer, called synchronously: the counterpart of AsyncModel."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, threads: int | None = None):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.embedding = tokenizer.embedding or EmbeddingConfig()  # the model's declared defaults, or cllm's
        self.threads = require_int("threads", available_cpus() if threads is None else threads)
        self._workspaces = ForwardWorkspaces(model.config)

    @classmethod
    def open(cls, path: str | os.PathLike, *, threads: int | None = None) -> "Model":
        """Loads a .cllm model file, a GGUF file or a Hugging Face GPT-2, Llama or Qwen folder (ModelFileError if
        it is bad)."""
        model, tokenizer = load_model(path)
        return cls(model, tokenizer, threads=threads)

    @property
    def config(self):
        return self.model.config

    def encode(self, texts: str | Sequence[str], batch_size: int = 32, normalize_embeddings: bool | None = None, *,
               prompt_name: str | None = None, prompt: str | None = None, pooling: str | None = None,
               truncate: bool = False, show_progress_bar: bool = False) -> np.ndarray:
        """Embeddings of the texts: (n, dim) float32, or (dim,) for one string. pooling is "mean" or "last", and
        normalize_embeddings whether to scale to unit length (None: as the model declares; cllm's defaults, mean and
        unit length, for one that declares nothing). prompt_name names one of the model's prompts, prompt gives one
        (not both; neither: the model's default prompt, if any): it is put before each text. A text longer than the
        context is an error, or with truncate=True cut to context_length tokens, losing its end."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        require_int("batch_size", batch_size)
        pooling = self.embedding.pooling if pooling is None else check_pooling(pooling)
        normalize = self.embedding.normalize if normalize_embeddings is None else bool(normalize_embeddings)
        prompt = self.embedding.prompt_text(prompt_name, prompt)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UsageError(f"texts[{i}] is {type(text).__name__}, not a string")
        ids = [fit_to_context(encoded, self.config.context_length, truncate=truncate,
                              name="the text" if single else f"texts[{i}]", ends=self.tokenizer.added_around_text)
               for i, encoded in enumerate(self.tokenizer.encode_for_embedding(prompt + text for text in texts))]
        vectors = np.empty((len(texts), self.config.dim), np.float32)
        batches = length_batches([t.size for t in ids], max_texts=batch_size)
        with blas_limit(self.threads):
            for batch in tqdm(batches, desc="encode", unit="batch", disable=not show_progress_bar):
                texts_in_batch = [ids[i] for i in batch]
                vectors[batch] = embed_batch(self.model, self._workspaces, texts_in_batch,
                                             seq=max(t.size for t in texts_in_batch),
                                             normalize=[normalize] * len(batch),
                                             pooling=[pooling] * len(batch), threads=self.threads)
        return vectors[0] if single else vectors

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256, seed: int | None = None,
                 stop: str | Sequence[str] = (), **settings) -> Completion:
        """The continuation of prompt (text, or token ids), whole, as AsyncModel.generate gives it (settings as
        for cllm.generate.generate)."""
        generation = generate(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed,
                              stop=stop, **settings)
        with blas_limit(self.threads):
            for _ in generation:
                pass
        return Completion(generation.text, generation.finish_reason, len(generation.prompt_ids),
                          len(generation.token_ids), generation.logprobs, generation.prompt_logprobs)

    def chat(self, messages: Sequence[dict], *, max_new_tokens: int = 256, tools: Sequence[dict] | None = None,
             tool_choice: str | dict | None = None, chat_template_kwargs: dict | None = None,
             **settings) -> ChatCompletion:
        """The assistant's reply to messages (OpenAI's: {"role", "content"} each, an assistant's with its
        tool_calls, a tool's with its tool_call_id), rendered with the model's chat template and the template
        arguments chat_template_kwargs (Qwen3's {"enable_thinking": False}); it ends at the template's end-of-turn
        token. With tools (OpenAI's function tools) and tool_choice, the calls it makes are read as the server
        reads them (cllm.tool_calls): its `tool_calls`, in OpenAI's form, and its text the content outside them.
        UsageError for a model without a template."""
        calling = tool_calling(tools, tool_choice)
        ids = self.tokenizer.encode_chat(messages, tools=calling.tools, chat_template_kwargs=chat_template_kwargs,
                                         reply_start=calling.reply_start)
        return calling.reply(self.generate(ids, max_new_tokens=max_new_tokens,
                                           end_ids=self.tokenizer.end_of_turn_ids, **settings))

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256, seed: int | None = None,
               stop: str | Sequence[str] = (), **settings) -> Iterator[str]:
        """The continuation of prompt as text pieces, as they are decoded."""
        generation = generate(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed,
                              stop=stop, **settings)
        with blas_limit(self.threads):
            yield from generation

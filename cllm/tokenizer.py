"""Tokenizers on HF `tokenizers`, trained locally and offline, saved as one JSON string inside the model file.

Three kinds:
- "bpe" (default): byte-level BPE, GPT-2 style. Every unicode string round-trips: decode(encode(s)) == s.
- "char": one token per character seen in training, plus <unk> for characters it never saw. Round-trips any
  text made of seen characters, whitespace included.
- "word": the C prototype's tokenizer. Lower-cased words split on whitespace, the most frequent ones kept.
  Lossy by design: decode joins words with single spaces, so case, line breaks and runs of spaces are lost.

Text is always encoded literally: "<|endoftext|>" typed in a document is text, never the separator. The
separator only enters a token stream when data preparation appends `separator_id` after each document, and
generation stops when the model draws it.

A tokenizer read from a Hugging Face folder (cllm.formats.hf) is kind "bpe" and its tokenizer.json as it is:
GPT-2's or SmolLM2's byte-level BPE, or Llama's BPE with byte fallback. Its separator is the model's end-of-text
token, which may not be "<|endoftext|>" (Llama's is "</s>"); to_json then records it. Its chat template, if it
has one (cllm.chat), comes along, and so do the embedding defaults an embedding model declares
(cllm.embedding_config); to_json records both (earlier cllm versions ignore them).

The tokens a tokenizer.json puts around every text (its post-processor: tokens_around_text) are put before a text
but never after it when it is a prompt or a document (encode): Llama's leading <s> starts a prompt as the model was
trained, but the <|endoftext|> that Qwen3-Embedding's tokenizer appends would end the prompt before its
continuation, and end every piece of a training document. A text to embed gets them all (encode_for_embedding), as
transformers and sentence-transformers tokenize it: an embedding model that pools its last token pools that one.
"""
from __future__ import annotations

import bisect
import json
from collections import Counter
from functools import cached_property
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from .chat import ChatTemplate, RenderedChat
from .embedding_config import EmbeddingConfig
from .errors import UsageError

JSON_FORMAT = "cllm-tokenizer"
# Version 2 records a separator other than the kind's own. A tokenizer without one is written as version 1, which
# earlier cllm versions read; they refuse version 2 rather than end documents at the wrong token.
JSON_VERSION, JSON_VERSION_WITH_SEPARATOR = 1, 2

ENDOFTEXT, UNK = "<|endoftext|>", "<unk>"
WORD_SPECIALS = ["<pad>", UNK, "<bos>", "<eos>"]  # ids 0..3, as in the prototype
SEPARATOR = {"bpe": ENDOFTEXT, "char": ENDOFTEXT, "word": "<eos>"}
SPECIALS = {"bpe": [ENDOFTEXT], "char": [ENDOFTEXT, UNK], "word": WORD_SPECIALS}
DEFAULT_VOCAB_SIZE = {"bpe": 4096, "char": None, "word": 8192}  # char: every character seen
KINDS = tuple(SEPARATOR)
BYTE_ALPHABET = 256


def check_settings(kind: str, vocab_size: int | None) -> None:
    """Raises ValueError for an unknown kind or a vocab_size too small to hold the kind's fixed tokens."""
    if kind not in KINDS:
        raise UsageError(f"unknown tokenizer {kind!r}: choose one of {', '.join(KINDS)}")
    if vocab_size is None:
        return
    fixed = len(SPECIALS[kind]) + (BYTE_ALPHABET if kind == "bpe" else 0)
    if vocab_size <= fixed:
        what = "256 bytes + 1 special token" if kind == "bpe" else f"{fixed} special tokens"
        raise UsageError(f"{kind} vocab_size must be more than {fixed} ({what}), got {vocab_size}")


class Piece(NamedTuple):
    """One token of a text (Tokenizer.pieces): its id, the text it stands for, whether it is a special token that
    the tokenizer added, and the characters start:stop of the input it covers (None for an added token)."""
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class Tokenizer:
    """A trained tokenizer of one kind. Build it with train() or from_json(), not the constructor."""

    def __init__(self, kind: str, hf: HFTokenizer, *, separator: str | None = None,
                 chat_template: ChatTemplate | None = None, embedding: EmbeddingConfig | None = None):
        """separator: the token that ends a document, if not the kind's own (SEPARATOR). chat_template: how a chat
        model's messages become its prompt (cllm.chat). embedding: what an embedding model declares about its
        use (cllm.embedding_config)."""
        check_settings(kind, None)
        self.kind = kind
        self._hf = hf
        # Without this, HF would turn "<|endoftext|>" typed in a document into the separator token.
        self._hf.encode_special_tokens = True
        self._hf_markup: HFTokenizer | None = None  # a copy that parses special tokens (encode_chat)
        self.chat_template = chat_template
        self.embedding = embedding
        self.separator: str = separator or SEPARATOR[kind]
        separator_id = hf.token_to_id(self.separator)
        if separator_id is None:
            raise UsageError(f"{kind} tokenizer has no separator token {self.separator}")
        self.separator_id: int = separator_id

    @classmethod
    def train(cls, kind: str, texts: Iterable[str], vocab_size: int | None = None) -> "Tokenizer":
        """Trains on texts, streamed: an iterator is consumed once and never held in memory.

        vocab_size is the whole vocabulary, special tokens included; None takes DEFAULT_VOCAB_SIZE[kind].
        Deterministic: the same texts and settings give the same to_json().
        """
        check_settings(kind, vocab_size)
        if vocab_size is None:
            vocab_size = DEFAULT_VOCAB_SIZE[kind]
        return cls(kind, _TRAINERS[kind](iter(texts), vocab_size))

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        """The inverse of to_json(); raises ValueError on anything malformed."""
        try:
            doc = json.loads(s)
        except (json.JSONDecodeError, TypeError) as e:
            raise UsageError(f"tokenizer JSON is malformed: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise UsageError("not a cllm tokenizer (no \"format\": \"cllm-tokenizer\" field)")
        if doc.get("version") not in (JSON_VERSION, JSON_VERSION_WITH_SEPARATOR):
            raise UsageError(f"unsupported cllm tokenizer version {doc.get('version')!r} (this cllm reads "
                             f"{JSON_VERSION} and {JSON_VERSION_WITH_SEPARATOR})")
        kind = doc.get("kind")
        if kind not in KINDS:
            raise UsageError(f"unknown tokenizer kind {kind!r} in tokenizer JSON")
        try:
            hf = HFTokenizer.from_str(json.dumps(doc.get("hf")))
        except Exception as e:  # HF raises a bare Exception for any parse or schema error
            raise UsageError(f"tokenizer JSON has an invalid HF tokenizer: {e}") from None
        separator = doc.get("separator")
        if separator is not None and not isinstance(separator, str):
            raise UsageError(f"tokenizer JSON has a separator that is not a string: {separator!r}")
        chat, embedding = doc.get("chat_template"), doc.get("embedding")
        return cls(kind, hf, separator=separator, chat_template=None if chat is None else ChatTemplate.from_dict(chat),
                   embedding=None if embedding is None else EmbeddingConfig.from_dict(embedding))

    def to_json(self) -> str:
        """The separator is recorded only when it is not the kind's own, so a trained tokenizer's JSON is what it
        was before separators could differ."""
        hf = json.loads(self._hf.to_str())
        own = self.separator == SEPARATOR[self.kind]
        head = ({"version": JSON_VERSION} if own
                else {"version": JSON_VERSION_WITH_SEPARATOR, "separator": self.separator})
        chat = {} if self.chat_template is None else {"chat_template": self.chat_template.to_dict()}
        embedding = {} if self.embedding is None else {"embedding": self.embedding.to_dict()}
        return json.dumps({"format": JSON_FORMAT, **head, "kind": self.kind, "hf": hf, **chat, **embedding},
                          ensure_ascii=False)

    def hf_json(self) -> str:
        """The HF `tokenizers` JSON alone: a tokenizer.json that HF's libraries load."""
        return self._hf.to_str()

    def vocab(self) -> dict[str, int]:
        """Token -> id, special tokens included."""
        return self._hf.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """A prompt's or a document's ids: the tokens the tokenizer puts before every text, then the text's (see
        the module notes)."""
        return self._without_appended(self._hf.encode(text).ids)

    def encode_for_embedding(self, texts: Iterable[str]) -> list[np.ndarray]:
        """The ids of texts to embed, with every token the tokenizer puts around a text, as transformers'
        tokenizer(text) gives them; encoded at once, on HF's Rust threads."""
        return [np.array(e.ids, dtype=np.int32) for e in self._hf.encode_batch_fast(list(texts))]

    @cached_property
    def added_around_text(self) -> tuple[int, int]:
        """How many tokens this tokenizer puts before and after every text it encodes (tokens_around_text)."""
        post_processor = self._hf.post_processor
        return tokens_around_text(None if post_processor is None else json.loads(post_processor.__getstate__()))

    def _without_appended(self, ids: list[int]) -> np.ndarray:
        appended = self.added_around_text[1]
        return np.array(ids[:len(ids) - appended], dtype=np.int32)

    def encode_chat(self, messages, *, add_generation_prompt: bool = True, tools=None, chat_template_kwargs=None,
                    reply_start: str = "") -> np.ndarray:
        """The prompt ids of a chat (a list of {"role", "content"} messages), rendered with the chat template
        (cllm.chat) offering the tools, with the caller's template arguments; with add_generation_prompt, it ends
        where the assistant's reply begins, and reply_start after that. UsageError if this tokenizer has no
        template. render_chat, then encode_rendered_chat: a server runs the two apart."""
        return self.encode_rendered_chat(self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                                          tools=tools, chat_template_kwargs=chat_template_kwargs,
                                                          reply_start=reply_start))

    def render_chat(self, messages, *, add_generation_prompt: bool = True, tools=None, chat_template_kwargs=None,
                    reply_start: str = "") -> RenderedChat:
        """The chat's prompt text, with the spans of it where the caller's strings hold markup. reply_start is what
        the assistant's reply is made to begin with (a forced tool call's opening, cllm.tool_calls): the caller's
        markup, not a message's, so its special tokens are parsed."""
        if self.chat_template is None:
            raise UsageError("this model has no chat template, so it cannot take chat messages: give it a prompt "
                             "to continue instead, or attach a template (cllm-convert MODEL OUT --chat-template "
                             "FILE)")
        rendered = self.chat_template.render_quoting(messages, self._special_ids,
                                                     add_generation_prompt=add_generation_prompt, tools=tools,
                                                     chat_template_kwargs=chat_template_kwargs)
        return rendered._replace(text=rendered.text + reply_start)

    def encode_rendered_chat(self, rendered: RenderedChat) -> np.ndarray:
        """The ids of a rendered chat. The template's special tokens ("<|im_start|>") are parsed as the tokens they
        name, and none are added (the template wrote those it wants), as transformers tokenizes a chat; but what
        the messages say is text: a special token's text in a message's own strings is encoded as encode() encodes
        it (cllm.chat's notes)."""
        if self._hf_markup is None:
            self._hf_markup = HFTokenizer.from_str(self._hf.to_str())
            self._hf_markup.encode_special_tokens = False
        encoding = self._hf_markup.encode(rendered.text, add_special_tokens=False)
        if not rendered.quoted:
            return np.array(encoding.ids, dtype=np.int32)
        return np.array(self._markup_outside(rendered, encoding, set(self._special_ids.values())), dtype=np.int32)

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        """The special tokens' texts and ids: what a chat's markup is made of."""
        return {token.content: i for i, token in self._hf.get_added_tokens_decoder().items() if token.special}

    def _markup_outside(self, rendered, encoding, special_ids: set[int]) -> list[int]:
        """encoding's ids, but where it parsed a special token that overlaps a quoted span (a message's own text),
        the text from the template's special token before it to the one after it is encoded literally instead.
        Elsewhere the ids are the parse's own: what lies between two of the template's special tokens is encoded
        apart from the rest in both."""
        quoted_stops = [stop for _, stop in rendered.quoted]
        ids, taken, text_start, literal = [], 0, 0, False
        for i, (token, (start, stop)) in enumerate(zip(encoding.ids, encoding.offsets)):
            if token not in special_ids:
                continue
            q = bisect.bisect_right(quoted_stops, start)  # the first quoted span that ends after this token starts
            if q < len(rendered.quoted) and rendered.quoted[q][0] < stop:
                literal = True
                continue
            ids += self._literal(rendered.text[text_start:start]) if literal else encoding.ids[taken:i]
            ids.append(token)
            taken, text_start, literal = i + 1, stop, False
        return ids + (self._literal(rendered.text[text_start:]) if literal else encoding.ids[taken:])

    def _literal(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """The tokens that end an assistant's turn in a chat (the template's eos_token), besides the separator."""
        if self.chat_template is None:
            return ()
        token_id = self._hf.token_to_id(self.chat_template.eos_token) if self.chat_template.eos_token else None
        return () if token_id is None or token_id == self.separator_id else (token_id,)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        """Encodes many texts at once as encode() encodes one, in parallel on HF's Rust threads."""
        # The _fast variant skips computing character offsets, which nothing here uses.
        return [self._without_appended(e.ids) for e in self._hf.encode_batch_fast(list(texts))]

    def pieces(self, text: str, *, add_special_tokens: bool = True) -> list[Piece]:
        """The tokens of text with what each stands for (what a /tokenize route shows): the span of text it
        covers, or, for a special token the tokenizer adds (Llama's leading <s>), its own name and no span: the
        ids encode_for_embedding() gives, or with add_special_tokens=False, the text's alone."""
        encoding = self._hf.encode(text, add_special_tokens=add_special_tokens)
        return [Piece(i, token, True, None, None) if special else Piece(i, text[start:stop], False, start, stop)
                for i, token, special, (start, stop)
                in zip(encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets)]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Special tokens are rendered as their text (e.g. "<unk>"), so decoding never drops a token silently,
        unless skip_special_tokens."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UsageError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return self._hf.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)


def tokens_around_text(post_processor: dict | None) -> tuple[int, int]:
    """How many tokens a tokenizer.json post-processor puts before and after every single text: those of its
    template (TemplateProcessing: Llama's <s> before, Qwen3-Embedding's <|endoftext|> after), BERT's and RoBERTa's
    one on each side, those of a Sequence of processors added up; none for any other (ByteLevel's adds none)."""
    kind = (post_processor or {}).get("type")
    if kind == "TemplateProcessing":
        template = post_processor["single"]
        text_at = next((i for i, piece in enumerate(template) if "Sequence" in piece), len(template))

        def count(pieces) -> int:
            return sum(len(post_processor["special_tokens"][piece["SpecialToken"]["id"]]["ids"]) for piece in pieces)

        return count(template[:text_at]), count(template[text_at + 1:])
    if kind in ("BertProcessing", "RobertaProcessing"):
        return 1, 1
    if kind == "Sequence":
        around = [tokens_around_text(processor) for processor in post_processor["processors"]]
        return sum(before for before, _ in around), sum(after for _, after in around)
    return 0, 0


def _train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    # Seeding all 256 bytes means any string can be encoded, even characters training never saw.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS["bpe"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def _train_char(texts: Iterator[str], vocab_size: int | None) -> HFTokenizer:
    counts = Counter()
    for text in texts:
        counts.update(text)
    kept = counts.most_common(None if vocab_size is None else vocab_size - len(SPECIALS["char"]))
    # Ids in code-point order, as in nanoGPT's char model: readable, and independent of frequencies.
    chars = sorted(ch for ch, _ in kept)
    vocab = {token: i for i, token in enumerate(SPECIALS["char"] + chars)}
    # A BPE model with no merges is exactly a character lookup table, and HF's fastest one: with no
    # pre-tokenizer every text is one "word" split into characters, so whitespace survives as tokens.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    hf.add_special_tokens(SPECIALS["char"])
    hf.decoder = decoders.Fuse()  # concatenate the characters back, no separator between them
    return hf


def _train_word(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    hf = HFTokenizer(models.WordLevel(unk_token=UNK))
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: HF then joins tokens with single spaces, which is this kind's (lossy) decoding.
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=WORD_SPECIALS, show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf


_TRAINERS: dict[str, Callable[[Iterator[str], int | None], HFTokenizer]] = {
    "bpe": _train_bpe, "char": _train_char, "word": _train_word}

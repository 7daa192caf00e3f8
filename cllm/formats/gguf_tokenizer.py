"""The tokenizer that a GGUF file's metadata describes (tokenizer.ggml.*), read as a cllm Tokenizer that gives
llama.cpp's token ids: an HF `tokenizers` object built to split and merge as llama.cpp's src/llama-vocab.cpp does.

Two of llama.cpp's tokenizer models (tokenizer.ggml.model) are read:

- "gpt2", byte-level BPE. tokenizer.ggml.tokens are spelled in GPT-2's bytes-to-unicode alphabet, and
  tokenizer.ggml.merges are the merge rules ("a b") in rank order. llama.cpp first splits the text with the
  regular expressions of the pre-tokenizer that tokenizer.ggml.pre names (PRE_TOKENIZERS: each expression splits
  the pieces the one before it left, and what it does not match stays a piece of its own, as HF's "isolated"
  Split does), then merges within each piece. Some pre-tokenizers (Llama 3's) also take a piece that is a token
  whole before merging it (llama.cpp's ignore_merges). A file without tokenizer.ggml.pre is read as "default",
  as llama.cpp reads it, and some of llama.cpp's other names for the same splitting are read as that
  (PRE_TOKENIZER_NAMES); any other name is refused rather than split otherwise. The regexes run on HF's engine
  (Oniguruma's Unicode tables, where llama.cpp has its own): tools/check_gguf.py compares the ids with llama.cpp's.
- "llama", sentencepiece's BPE. It has no merges: of all adjacent pairs of pieces whose concatenation is a token,
  llama.cpp merges the one whose token has the highest tokenizer.ggml.scores, and a piece that is no token falls
  back to the <0xNN> tokens of its bytes. As an HF BPE, the merges are every split of every normal token into two
  normal tokens, ranked by that token's score, with byte fallback. Every space becomes "▁", and so does the start
  of the text and of each run of text after a special token, unless tokenizer.ggml.add_space_prefix says not to.

Token types (tokenizer.ggml.token_type). Control and unknown tokens become special tokens: parsed in a chat's
markup, never in what encode() is given, since cllm keeps user text literal. User-defined tokens become added
tokens that are not special: llama.cpp matches them in any text, parsed or not, and so does HF. Byte and unused
tokens stay plain entries of the vocabulary, which only byte fallback (byte tokens) or nothing (unused) reaches
(an unused token decodes to its text, where llama.cpp renders nothing). Token i keeps id i, so the tokenizer has a
token for every row of the model's embedding.

Special tokens: the separator (the token that ends a document, and generation) is the eos token. The bos token
is put before every text when tokenizer.ggml.add_bos_token says so (by default for "llama" and for Llama 3's
pre-tokenizer, as in llama.cpp), and the eos token after it for add_eos_token. The chat template
(tokenizer.chat_template) comes with the bos token's text and its end of turn, ChatTemplate.eos_token, where cllm
ends a chat reply besides the separator, as llama.cpp ends one at its eot token: tokenizer.ggml.eot_token_id, or
else the token llama.cpp recognizes as the eot by its text (END_OF_TURN_TEXTS) if the template writes it, or else
the eos token. (cllm renders a template's eos_token as that end of turn, where llama.cpp renders the eos token's
text: the two differ only for a template that writes eos_token in a file whose eot is not its eos.)

Anything this cannot read as llama.cpp reads it (another tokenizer model or pre-tokenizer, arrays of different
lengths, a duplicate token, an id outside the vocabulary, merges of tokens the vocabulary lacks) raises
ModelFileError naming the file and the key.
"""
from __future__ import annotations

import os

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..chat import ChatTemplate
from ..errors import UsageError
from ..model_file_errors import ModelFileError, one_line
from ..tokenizer import Tokenizer

KEY = gguf.Keys.Tokenizer
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
    gguf.TokenType.UNUSED, gguf.TokenType.BYTE)
SPACE_MARK = "\u2581"  # sentencepiece's visible space

# llama.cpp's pre-tokenizers (llm_tokenizer_bpe in src/llama-vocab.cpp) as HF's: its regexes applied in turn, then
# the pieces' bytes spelled in the byte-level alphabet. GPT-2's regex is ByteLevel's own, whose extra "|\s+" only
# takes what llama.cpp's leaves unmatched (a lone whitespace before a non-space), a piece of its own there too; and
# Digits splits off each character that \p{N} matches. "gpt-2" and "smollm" take these forms because they are the
# ones cllm's exporter writes as those names, so a file that is read writes back. Llama 3's and Qwen2's
# contractions are spelled case by case, as llama.cpp spells them: (?i:) would also match "ſ", which folds to "s".
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _regexes(*patterns: str) -> list:
    return [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in patterns] + [
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]


def _gpt2(*before) -> list:
    return [*before, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


PRE_TOKENIZERS = {
    "default": lambda: _regexes(r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": lambda: _gpt2(),
    "smollm": lambda: _gpt2(pre_tokenizers.Digits(individual_digits=True)),  # llama.cpp's \p{N}, then GPT-2's
    "llama-bpe": lambda: _regexes(_LLAMA3),
    "qwen2": lambda: _regexes(QWEN2_REGEX),
}
# Other names llama.cpp gives the same splitting, merging and bos (its load(): one branch for each).
PRE_TOKENIZER_NAMES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe",
                       "deepseek-r1-qwen": "qwen2"}
# Pre-tokenizers under which llama.cpp takes a piece that is a token as that token, and adds bos by default.
WHOLE_PIECES = ADDS_BOS = frozenset({"llama-bpe"})
# The texts by which llama.cpp recognizes a vocabulary's end-of-turn token when the file names none (its
# special_eot_id), in its order.
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                     "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
# llama.cpp's default ids for a sentencepiece vocabulary that does not name them (old Llama files).
SENTENCEPIECE_DEFAULT_IDS = {KEY.BOS_ID: 1, KEY.EOS_ID: 2, KEY.UNK_ID: 0}

_INTEGERS = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT16,
             gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64,
             gguf.GGUFValueType.INT64}
_MISSING = object()


def read_gguf_tokenizer(reader: gguf.GGUFReader, path: str | os.PathLike) -> Tokenizer:
    """The file's tokenizer as a cllm Tokenizer (kind "bpe", an HF `tokenizers` object inside, built from the
    file's metadata), with its separator (the eos token), and its chat template (tokenizer.chat_template, with
    bos/eos texts, as cllm.chat.ChatTemplate) if the file has one. Raises ModelFileError naming the path and the
    key for anything it cannot read faithfully."""
    metadata = _Metadata(reader, path)
    tokenizer_model = metadata.string(KEY.MODEL)
    if tokenizer_model not in _MODELS:
        raise metadata.error(KEY.MODEL, f"{tokenizer_model!r} is not a tokenizer cllm reads (it reads "
                                        f"{' and '.join(map(repr, _MODELS))})")
    tokens = _tokens(metadata)
    types = _token_types(metadata, len(tokens))
    ids = _special_ids(metadata, tokenizer_model, len(tokens))
    if KEY.EOS_ID not in ids:
        raise metadata.error(KEY.EOS_ID, "is missing: the file names no token that ends a text")
    hf = _MODELS[tokenizer_model](metadata, tokens, types, ids)
    _add_special_tokens(hf, tokens, types)
    return Tokenizer("bpe", hf, separator=tokens[ids[KEY.EOS_ID]],
                     chat_template=_chat_template(metadata, tokens, ids))


class _Metadata:
    """The file's key-value metadata, read with its types checked: ModelFileError naming the path and the key."""

    def __init__(self, reader: gguf.GGUFReader, path):
        self.fields = reader.fields
        self.path = path

    def error(self, key: str, reason: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {key} {reason}")

    def _field(self, key: str, kinds: set, array: bool, default):
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise self.error(key, "is missing")
            return default
        is_array, kind = field.types[0] == gguf.GGUFValueType.ARRAY, field.types[-1]
        if is_array != array or kind not in kinds:
            found = f"an array of {kind.name}" if is_array else kind.name
            wanted = ("an array of " if array else "") + "/".join(sorted(k.name for k in kinds))
            raise self.error(key, f"is {found}, not {wanted}")
        try:
            return field.contents()
        except UnicodeDecodeError as e:
            raise self.error(key, f"is not UTF-8 ({e})") from None

    def string(self, key: str, default=_MISSING) -> str | None:
        return self._field(key, {gguf.GGUFValueType.STRING}, False, default)

    def strings(self, key: str, default=_MISSING) -> list[str] | None:
        return self._field(key, {gguf.GGUFValueType.STRING}, True, default)

    def integer(self, key: str, default=_MISSING) -> int | None:
        return self._field(key, _INTEGERS, False, default)

    def int32s(self, key: str, default=_MISSING) -> list[int] | None:
        return self._field(key, {gguf.GGUFValueType.INT32}, True, default)

    def numbers(self, key: str, default=_MISSING) -> list[float] | None:
        return self._field(key, {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.INT32}, True, default)

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._field(key, {gguf.GGUFValueType.BOOL}, False, default))


def _tokens(metadata: _Metadata) -> list[str]:
    tokens = metadata.strings(KEY.LIST)
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if not token:  # llama.cpp names an empty token so, rather than refuse the file
            tokens[i] = token = f"[EMPTY_{i}]"
        if token in seen:
            raise metadata.error(KEY.LIST, f"holds {token!r} twice (ids {seen[token]} and {i})")
        seen[token] = i
    return tokens


def _token_types(metadata: _Metadata, n_tokens: int) -> list[int]:
    types = metadata.int32s(KEY.TOKEN_TYPE, None)
    if types is None:  # llama.cpp takes every token as normal then
        return [NORMAL] * n_tokens
    if len(types) != n_tokens:
        raise metadata.error(KEY.TOKEN_TYPE, f"has {len(types)} entries for {n_tokens} tokens")
    known = {int(t) for t in gguf.TokenType}
    unknown = next((i for i, t in enumerate(types) if t not in known), None)
    if unknown is not None:
        names = ", ".join(f"{t.value} {t.name}" for t in gguf.TokenType)
        raise metadata.error(KEY.TOKEN_TYPE, f"gives token {unknown} the type {types[unknown]}, which is none of "
                                             f"llama.cpp's ({names})")
    return types


def _special_ids(metadata: _Metadata, tokenizer_model: str, n_tokens: int) -> dict[str, int]:
    """The ids of bos, eos, unk, pad and eot that the file names (a sentencepiece vocabulary's bos, eos and unk
    default to llama.cpp's), each checked to be a token."""
    defaults = SENTENCEPIECE_DEFAULT_IDS if tokenizer_model == "llama" else {}
    ids = {}
    for key in (KEY.BOS_ID, KEY.EOS_ID, KEY.UNK_ID, KEY.PAD_ID, KEY.EOT_ID):
        token_id = metadata.integer(key, defaults.get(key))
        if token_id is None:
            continue
        if not 0 <= token_id < n_tokens:
            raise metadata.error(key, f"is {token_id}, not a token of the {n_tokens} in {KEY.LIST}")
        ids[key] = token_id
    return ids


# --------------------------------------------------------------------------------------------------------------
# the two tokenizer models


def _byte_level_bpe(metadata: _Metadata, tokens: list[str], types: list[int], ids: dict[str, int]) -> HFTokenizer:
    name = metadata.string(KEY.PRE, "default")
    pre = PRE_TOKENIZER_NAMES.get(name, name)
    if pre not in PRE_TOKENIZERS:
        raise metadata.error(KEY.PRE, f"{name!r} is a pre-tokenizer cllm does not split as llama.cpp does (it "
                                      f"reads {', '.join([*PRE_TOKENIZERS, *PRE_TOKENIZER_NAMES])})")
    merges = []
    for rule in metadata.strings(KEY.MERGES):
        cut = rule.find(" ", 1)  # where llama.cpp cuts it: a merge's first part may be a space
        if cut < 0:
            raise metadata.error(KEY.MERGES, f"holds {rule!r}, which is not two tokens apart by a space")
        merges.append((rule[:cut], rule[cut + 1:]))
    hf = _bpe(metadata, KEY.MERGES, tokens, merges, ignore_merges=pre in WHOLE_PIECES)
    steps = PRE_TOKENIZERS[pre]()
    hf.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    _add_bos_eos(metadata, hf, tokens, ids, add_bos_default=pre in ADDS_BOS)
    return hf


def _sentencepiece_bpe(metadata: _Metadata, tokens: list[str], types: list[int], ids: dict[str, int]) -> HFTokenizer:
    scores = metadata.numbers(KEY.SCORES)
    if len(scores) != len(tokens):
        raise metadata.error(KEY.SCORES, f"has {len(scores)} entries for {len(tokens)} tokens")
    unk = tokens[ids[KEY.UNK_ID]] if KEY.UNK_ID in ids else None
    hf = _bpe(metadata, KEY.SCORES, tokens, _merges_by_score(tokens, types, scores), unk_token=unk, fuse_unk=True,
              byte_fallback=True)
    space_prefix = metadata.boolean(KEY.ADD_PREFIX, True)
    spaces = normalizers.Replace(" ", SPACE_MARK)
    # HF normalizes each run of text between added tokens apart, so the mark goes where llama.cpp puts it: at the
    # start of the text and after each special token.
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_MARK), spaces]) if space_prefix else spaces
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    _add_bos_eos(metadata, hf, tokens, ids, add_bos_default=True)
    return hf


def _merges_by_score(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """sentencepiece's merging as BPE merges: each way of cutting a normal token into two normal tokens, the
    higher the token's score the earlier. (Where two cuts of one token compete, llama.cpp takes the leftmost and
    BPE the one ranked first, here the one with the longer left part: it only differs for overlapping pairs
    that make the same token, as "ab"+"a" and "a"+"ba" in "ab a ba".)"""
    normal = {token for token, kind in zip(tokens, types) if kind == NORMAL}
    ranked = []
    for i, token in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, len(token) - cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe(metadata: _Metadata, key: str, tokens: list[str], merges: list[tuple[str, str]], **options) -> HFTokenizer:
    """An HF BPE of the file's tokens, each with its id, and merges read from key."""
    try:
        return HFTokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges, **options))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of tokens it does not have
        raise metadata.error(key, f"does not make a tokenizer: {one_line(e)}") from None


def _add_bos_eos(metadata: _Metadata, hf: HFTokenizer, tokens: list[str], ids: dict[str, int], *,
                 add_bos_default: bool) -> None:
    """The tokens put around every text, as tokenizer.ggml.add_bos_token and add_eos_token say."""
    add_bos, add_eos = metadata.boolean(KEY.ADD_BOS, add_bos_default), metadata.boolean(KEY.ADD_EOS, False)
    if add_bos and KEY.BOS_ID not in ids:
        raise metadata.error(KEY.ADD_BOS, f"is true, but {KEY.BOS_ID} is not set")
    around = sorted({ids[key] for key, add in ((KEY.BOS_ID, add_bos), (KEY.EOS_ID, add_eos)) if add})
    if around:
        hf.post_processor = processors.TemplateProcessing(
            single=[tokens[ids[KEY.BOS_ID]]] * add_bos + ["$A"] + [tokens[ids[KEY.EOS_ID]]] * add_eos,
            special_tokens=[(tokens[i], i) for i in around])


def _add_special_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens as special tokens, user-defined ones as added tokens that are not (module
    notes); each keeps its id, since the model's vocabulary already holds it."""
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False)
                           for token, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN)])
    hf.add_tokens([AddedToken(token, special=False, normalized=False)
                   for token, kind in zip(tokens, types) if kind == USER_DEFINED])


_MODELS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


# --------------------------------------------------------------------------------------------------------------
# the chat template


def _chat_template(metadata: _Metadata, tokens: list[str], ids: dict[str, int]) -> ChatTemplate | None:
    source = metadata.string(KEY.CHAT_TEMPLATE, None)
    if source is None:
        return None
    bos = tokens[ids[KEY.BOS_ID]] if KEY.BOS_ID in ids else ""
    if KEY.EOT_ID in ids:
        end_of_turn = tokens[ids[KEY.EOT_ID]]
    else:
        named = set(tokens)
        end_of_turn = next((text for text in END_OF_TURN_TEXTS if text in source and text in named),
                           tokens[ids[KEY.EOS_ID]])
    try:
        return ChatTemplate(source, bos_token=bos, eos_token=end_of_turn)
    except UsageError as e:  # not valid Jinja, or past cllm's limits
        raise metadata.error(KEY.CHAT_TEMPLATE, one_line(e)) from None

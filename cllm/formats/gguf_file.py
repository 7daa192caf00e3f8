"""GGUF export, for llama.cpp and the tools built on it (Ollama, LM Studio), written with the `gguf` package.

The file is what llama.cpp's own converter makes of the Hugging Face folder that cllm.formats.hf writes, for
each architecture: the tensors under GGUF's names (gguf.TensorNameMap of the Hugging Face names), every matrix
(out, in) as GGML lays it out, the hyper-parameters llama.cpp reads, and the tokenizer. A tied model has no output
matrix: llama.cpp then uses the token embedding, as cllm does.

- "gpt2": GPT-2's four Conv1D matrices are transposed from their (in, out) layout.
- "llama": the Hugging Face (out, in) layout as it is, but for the rows of q and k. llama.cpp's llama RoPE rotates
  adjacent pairs of a head's channels, (x[2j], x[2j+1]), where cllm's and Hugging Face's rotate its two halves,
  (x[j], x[j + head_dim/2]); so each head's rows of q_proj and k_proj are interleaved, row j of its first half to
  2j and row j of its second half to 2j + 1, as llama.cpp's converter does. Attention scores are the same.
- "qwen2" and "qwen3": the Hugging Face layout as it is, q and k too: llama.cpp runs these architectures with
  NEOX RoPE, which rotates halves as cllm does, and its converter leaves their rows in place. qwen2's biases on q,
  k and v are the attn_q/attn_k/attn_v .bias vectors; qwen3's per-head norms attn_q_norm and attn_k_norm.
  llama.cpp sizes a qwen2 model's queries and attention output by embedding_length, so heads set apart from
  dim / n_heads (ModelConfig.head_dim) are written for llama and qwen3 only (attention.key_length and
  value_length, which Qwen3's converted files always carry) and refused for qwen2.

Types: f32 keeps every tensor; f16 converts the matrices; q8_0, q4_0 and q4_k_m are llama.cpp's file types of
those names, each matrix typed as llama-quantize types it (cllm.formats.quantize.tensor_type: Q4_K_M's Q6_K head,
attn_v and ffn_down layers, the Q5_0 and Q8_0 fallbacks for rows that are not whole 256s, F16 for rows that are
not whole 32s) and quantized by cllm's own quantizer, which writes llama.cpp's blocks. Vectors (norms, biases)
and the position embedding stay f32, as llama.cpp keeps them. A model held quantized (`model.q`) writes its
blocks as they are where a tensor's type is its part's, and otherwise widens them and quantizes again. Tensors are
converted and written one at a time, so exporting needs the model's memory and one tensor more.

`matrix_parts` names the GGUF tensors that make up each of cllm's matrices (a Llama's q | k | v, gate | up), and
`quantize_model` quantizes a model in memory by the same rule: what a .cllm file of quantized blocks holds.

Tokenizers (_Vocabulary) are written in the form llama.cpp tokenizes the same way: a byte-level BPE (cllm's own,
GPT-2's, SmolLM2's, Qwen2's) as model "gpt2" with its merges, and the pre-tokenizer that matches its splitting;
Llama's BPE with byte fallback (TinyLlama's) as model "llama", sentencepiece's, which merges by score: each token
scores minus the rank of the merge that makes it. A tokenizer with no faithful form (char, word, another
pre-tokenizer) is refused rather than written as something that tokenizes differently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import gguf
import numpy as np

from ..atomic import atomic_write_file
from ..embedding_config import EmbeddingConfig
from ..errors import UsageError
from ..model import GPT, VOCABULARY_TABLES, ModelConfig, parameter_shapes
from ..quantized import KERNEL_TYPES, QuantizedMatrix, QuantizedRows, quantize_rows
from ..tokenizer import Tokenizer
from . import quantize
from .gguf_tokenizer import QWEN2_REGEX
from .hf import hf_tensors, leading_special_token, trailing_special_token

TYPES = quantize.FLOAT_FILE_TYPES | quantize.FILE_TYPES  # each file type's default tensor type
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
ARCHITECTURES = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                 "qwen3": gguf.MODEL_ARCH.QWEN3}
# The architectures whose q and k rows llama.cpp's RoPE takes in adjacent pairs (its "norm" RoPE type); the rest of
# the llama family it runs with NEOX RoPE, on halves, as cllm does.
PAIRED_ROPE = ("llama",)
# An embedding model's pooling (cllm.embedding_config) as {arch}.pooling_type; GGUF holds no prompts, and llama.cpp
# scales every pooled embedding to unit length.
POOLING_TYPES = {"mean": gguf.PoolingType.MEAN, "last": gguf.PoolingType.LAST}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2's (in, out)


def save_gguf(path: str | os.PathLike, model: GPT, tokenizer: Tokenizer, *, tensor_type: str = "f32",
              name: str | None = None) -> Path:
    """Writes model and tokenizer as a GGUF file of tensor_type (TYPES: f32, f16, or a llama.cpp file type),
    atomically."""
    if tensor_type not in TYPES:
        raise UsageError(f"unknown GGUF type {tensor_type!r}: choose one of {', '.join(TYPES)}")
    if model.config.arch == "gpt2" and model.config.activation != "gelu_tanh":
        raise UsageError(f"llama.cpp's gpt2 architecture computes GELU's tanh form; this model uses "
                         f"{model.config.activation}, so a GGUF file would run a different model")
    if model.config.arch == "qwen2" and model.config.head_dim is not None:
        raise UsageError(f"llama.cpp's qwen2 architecture has heads of embedding_length / head_count channels; this "
                         f"model's are {model.config.head_dim} wide (head_dim), so llama.cpp could not load its file")
    vocabulary = _Vocabulary.of(tokenizer, model.config.vocab_size)
    path = Path(path)
    atomic_write_file(path, partial(_write, model=model, vocabulary=vocabulary, tensor_type=tensor_type,
                                    name=name or path.stem, embedding=tokenizer.embedding))
    return path


def _write(tmp: Path, *, model: GPT, vocabulary: _Vocabulary, tensor_type: str, name: str,
           embedding: EmbeddingConfig | None) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[cfg.arch]])
    try:
        writer.add_name(name)
        _add_hyperparameters(writer, cfg)
        if embedding is not None:  # what llama.cpp's converter writes from an embedding model's 1_Pooling/
            writer.add_pooling_type(POOLING_TYPES[embedding.pooling])
        writer.add_file_type(FILE_TYPES[tensor_type])
        if tensor_type in quantize.FILE_TYPES:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocabulary.add_to(writer)
        type_of = partial(_tensor_type, file_type=tensor_type, config=cfg)
        # Two passes over the tensors: their descriptions go in the header, then their data, each tensor
        # converted only as it is written.
        for gguf_name, source in _ggml_sources(model):
            shape = _shape(source)
            qtype = type_of(gguf_name, shape)
            nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, source in _ggml_sources(model):
            writer.write_tensor_data(_encode(source, type_of(gguf_name, _shape(source))))
    finally:
        writer.close()


def _shape(source: np.ndarray | QuantizedRows) -> tuple[int, ...]:
    return (source.rows, source.cols) if isinstance(source, QuantizedRows) else source.shape


def _encode(source: np.ndarray | QuantizedRows, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A tensor's data as qtype: quantized blocks of that type as they are, anything else quantized from floats."""
    if isinstance(source, QuantizedRows):
        if source.ggml_type == qtype:
            return source.data
        source = source.dequantize()
    if source.ndim == 1:
        return source
    return quantize.quantize(source, qtype)


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    if cfg.arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.head_dim is not None or cfg.arch == "qwen3":  # Qwen3's config.json always names its head_dim
        writer.add_key_length(cfg.head_size)
        writer.add_value_length(cfg.head_size)
    if cfg.arch == "llama":  # what llama.cpp's converter adds for llama alone
        writer.add_rope_dimension_count(cfg.head_size)
        writer.add_vocab_size(cfg.vocab_size)


def _ggml_tensors(model: GPT) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor under its GGUF name, as a view (or, for q and k, a copy; for a quantized part, its values)
    laid out as GGML reads it."""
    for gguf_name, source in _ggml_sources(model):
        yield gguf_name, source.dequantize() if isinstance(source, QuantizedRows) else source


def _ggml_sources(model: GPT) -> Iterator[tuple[str, np.ndarray | QuantizedRows]]:
    """Every tensor under its GGUF name laid out as GGML reads it: a float32 view (or, for q and k, a copy), or
    the quantized part of model.q that holds it (q and k's rows reordered likewise)."""
    cfg = model.config
    names = _tensor_names(cfg)
    parts = {gguf_name: (name, i) for name, matrix in matrix_parts(cfg).items()
             for i, (gguf_name, _) in enumerate(matrix)}
    for hf_name, tensor in hf_tensors(model).items():
        gguf_name = names(hf_name)
        name, i = parts.get(gguf_name, (None, 0))
        if name in model.q:
            tensor = model.q[name].parts[i]
        elif cfg.arch == "gpt2" and hf_name.endswith(CONV1D):
            tensor = tensor.T
        heads = paired_rope_heads(cfg, hf_name)
        if heads is not None and isinstance(tensor, QuantizedRows):  # whole rows of blocks move as rows of values
            tensor = QuantizedRows(tensor.ggml_type, interleave_rotary_pairs(tensor.data, heads), tensor.cols)
        elif heads is not None:
            tensor = interleave_rotary_pairs(tensor, heads)
        yield gguf_name, tensor


@lru_cache(maxsize=8)
def tensor_name_map(arch: str, n_layers: int) -> gguf.TensorNameMap:
    """gguf's names for an architecture of n_layers layers (building one takes ~7 ms; a load needs it thrice)."""
    return gguf.TensorNameMap(ARCHITECTURES[arch], n_layers)


def _tensor_names(cfg: ModelConfig):
    """hf_name -> its GGUF name, as gguf.TensorNameMap names it."""
    names = tensor_name_map(cfg.arch, cfg.n_layers)

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"no GGUF name for {hf_name}")
        return name
    return gguf_name


def matrix_parts(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Every matrix that cllm may hold quantized (GPT.q's names: the vocabulary tables and the blocks' matrices) and
    the GGUF tensors that are its row parts in order, each with its rows: a Llama's c_attn is attn_q, attn_k,
    attn_v. Found by which of the model's parameters each Hugging Face tensor views (hf_tensors), on a stand-in
    model whose every parameter is a zero-stride view of a float of its own."""
    shapes, _ = parameter_shapes(config)
    cells = {name: np.zeros((), np.float32) for name, shape in shapes.items() if len(shape) == 2 and name != "wpe"}
    stand_in = SimpleNamespace(config=config, p={name: np.broadcast_to(cells.get(name, np.float32(0)), shape)
                                                 for name, shape in shapes.items()})
    names = _tensor_names(config)
    parts = {name: [] for name in cells}
    for hf_name, view in hf_tensors(stand_in).items():
        owner = next((name for name, cell in cells.items() if np.shares_memory(view, cell)), None)
        if owner is not None:  # (out, in) in GGUF: a Conv1D's is its transpose, the rest are so already
            rows = view.shape[1] if config.arch == "gpt2" and hf_name.endswith(CONV1D) else view.shape[0]
            parts[owner].append((names(hf_name), rows))
    return parts


def quantize_model(model: GPT, file_type: str) -> None:
    """Holds the model's matrices quantized (model.q) as a GGUF file of file_type (one of
    cllm.formats.quantize.FILE_TYPES) types them: each part by tensor_type, a matrix whose parts are not all of a
    type cllm's kernels compute (F16, for rows that are not whole 32s) staying float32. Their float32 views are
    zeroed."""
    cfg = model.config
    for name, parts in matrix_parts(cfg).items():
        view = model.p[name]
        matrix = view if name in VOCABULARY_TABLES else view.T  # GGML's (out, in)
        types = [_tensor_type(gguf_name, (rows, matrix.shape[1]), file_type, cfg) for gguf_name, rows in parts]
        if not all(qtype in KERNEL_TYPES for qtype in types):
            continue
        starts = np.cumsum([0] + [rows for _, rows in parts])
        model.q[name] = QuantizedMatrix(tuple(quantize_rows(matrix[start:end], qtype)
                                              for start, end, qtype in zip(starts, starts[1:], types)))
        view[...] = 0.0


def paired_rope_heads(config: ModelConfig, hf_name: str) -> int | None:
    """The heads of the Hugging Face tensor hf_name if the file holds its rows interleaved for llama.cpp's
    adjacent-pair RoPE (q_proj and k_proj of a PAIRED_ROPE architecture), else None."""
    if config.arch not in PAIRED_ROPE:
        return None
    return config.n_heads if hf_name.endswith("q_proj.weight") else \
        config.n_kv_heads if hf_name.endswith("k_proj.weight") else None


def interleave_rotary_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """q_proj or k_proj (heads * head_dim, dim) with each head's rows reordered from the rotate-halves order to
    llama.cpp's rotate-adjacent-pairs order: row j of a head's first half goes to 2j, row j of its second half to
    2j + 1."""
    halves = rows.reshape(heads, 2, rows.shape[0] // heads // 2, rows.shape[1])  # head, half, j, column
    return halves.swapaxes(1, 2).reshape(rows.shape)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], file_type: str,
                 config: ModelConfig) -> gguf.GGMLQuantizationType:
    """The type llama.cpp's quantizer gives the tensor in a file of file_type; a cllm export of a tied model has no
    output tensor."""
    return quantize.tensor_type(gguf_name, shape, file_type, n_layers=config.n_layers, tied=config.tied_head)


# --------------------------------------------------------------------------------------------------------------
# the tokenizer


# Byte-level BPE pre-tokenizers, as Hugging Face's tokenizer.json writes them, and the llama.cpp pre-tokenizer
# that splits text the same way: GPT-2's regex, alone or after splitting off every digit (SmolLM2's); or Qwen2's
# regex, then the bytes spelled with no more splitting, in either spelling of its contractions: Qwen's
# tokenizer.json's (?i:'s|...), or case by case as llama.cpp and a tokenizer read from a qwen2 GGUF file have them
# (the two part only on "ſ", which (?i:) folds to "s").
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
QWEN2_TOKENIZER_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _isolated(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL_PRE_TOKENIZERS = {  # each name's forms, any of which
    "gpt-2": ([_BYTE_LEVEL],),
    "smollm": ([{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],),
    "qwen2": ([_isolated(QWEN2_TOKENIZER_REGEX), _BYTES_ONLY], [_isolated(QWEN2_REGEX), _BYTES_ONLY]),
}
# The normalizer a pre-tokenizer's tokenizer.json may name although llama.cpp applies none: Qwen's names NFC,
# which changes only text not in NFC already, and llama.cpp's converter writes these files as qwen2 all the same.
IGNORED_NORMALIZERS = {"qwen2": {"type": "NFC"}}
# Llama's BPE with byte fallback (TinyLlama's tokenizer.json) marks every space, and the text's start, with "▁",
# as llama.cpp's sentencepiece tokenizer does. (A Metaspace pre-tokenizer, as later conversions write, does not
# mark the start of a text that begins with a space, which llama.cpp does: it is refused.)
SPACE_MARK = "\u2581"
SENTENCEPIECE_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SPACE_MARK}, {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}]}
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass(frozen=True)
class _Vocabulary:
    """A tokenizer in its GGUF form: tokenizer.ggml.* of llama.cpp's "gpt2" or "llama" tokenizer model."""
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] | None  # "gpt2": merge rules, in rank order
    scores: list[float] | None  # "llama": sentencepiece merges the adjacent pair whose token scores highest
    bos_id: int
    eos_id: int
    add_bos: bool
    unk_id: int | None
    chat_template: str | None = None
    eot_id: int | None = None  # a chat template's end of turn, where it is not the eos token
    add_eos: bool = False  # the eos token after every text to embed (Qwen3-Embedding's)

    @classmethod
    def of(cls, tokenizer: Tokenizer, vocab_size: int) -> "_Vocabulary":
        """The GGUF form of tokenizer for a model of vocab_size rows; UsageError if it has none."""
        if tokenizer.kind != "bpe":
            raise UsageError(f"a {tokenizer.kind} tokenizer has no faithful GGUF form (llama.cpp's tokenizers are "
                             f"BPE): train with --tokenizer bpe to export to GGUF")
        vocabulary = cls._of(tokenizer, vocab_size)
        appended = trailing_special_token(json.loads(tokenizer.hf_json()))
        if appended is not None:
            # llama.cpp appends its eos token where add_eos_token says so, and (as cllm) to a text it embeds only
            if appended != tokenizer.separator:
                raise UsageError(f"this tokenizer ends every text with {appended}, not with its end-of-text token "
                                 f"{tokenizer.separator}, which llama.cpp would append instead")
            vocabulary = dataclasses.replace(vocabulary, add_eos=True)
        chat = tokenizer.chat_template
        if chat is None:
            return vocabulary
        # llama.cpp renders the template with the bos token's text, and ends a reply at the eot token: they are the
        # template's own, where the bos token is not one that every text starts with.
        bos_id = vocabulary.bos_id if vocabulary.add_bos else tokenizer.vocab().get(chat.bos_token, vocabulary.bos_id)
        end_of_turn = tokenizer.end_of_turn_ids
        return dataclasses.replace(vocabulary, chat_template=chat.source, bos_id=bos_id,
                                   eot_id=end_of_turn[0] if end_of_turn else None)

    @classmethod
    def _of(cls, tokenizer: Tokenizer, vocab_size: int) -> "_Vocabulary":
        hf = json.loads(tokenizer.hf_json())
        tokens: list[str | None] = [None] * vocab_size
        for token, token_id in tokenizer.vocab().items():
            tokens[token_id] = token
        added = {t["id"]: t for t in hf.get("added_tokens", [])}
        types = [gguf.TokenType.NORMAL] * vocab_size
        for i in range(vocab_size):
            if i in added:
                types[i] = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            elif tokens[i] is None:  # rows of the embedding beyond the tokenizer's vocabulary: never produced
                tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
        merges = [m.split(" ") if isinstance(m, str) else m for m in hf["model"].get("merges", [])]
        separator = tokenizer.separator_id
        pre = _byte_level_pre_tokenizer(hf)
        if pre is not None:  # GPT-2 starts a prompt with no special token, and so do byte-level BPEs here
            return cls("gpt2", pre, tokens, types, [" ".join(m) for m in merges], None, separator, separator, False,
                       None)
        if _is_sentencepiece_bpe(hf):
            return cls._sentencepiece(hf, tokens, types, merges, separator)
        raise UsageError("this tokenizer has no faithful GGUF form: cllm writes byte-level BPE whose "
                         f"pre-tokenizer is one of llama.cpp's ({', '.join(BYTE_LEVEL_PRE_TOKENIZERS)}), or Llama's "
                         "BPE with byte fallback as TinyLlama's tokenizer.json has it")

    @classmethod
    def _sentencepiece(cls, hf: dict, tokens: list[str], types: list[int], merges: list[list[str]],
                       separator: int) -> "_Vocabulary":
        """Llama's form: scores ranking tokens as the merges that make them are ranked, byte tokens marked, and
        the beginning-of-text token that the tokenizer's post-processor puts before every text, if any."""
        # A token that no merge makes (a single character, a byte, a special token) scores below every merge, as
        # sentencepiece's own models rank them: llama.cpp then never prefers a pair that Hugging Face never merges.
        scores = [-float(len(merges) + 1)] * len(tokens)
        made = set()
        ids = {token: i for i, token in enumerate(tokens)}
        for rank, merge in enumerate(merges):
            token = "".join(merge)
            if token in ids and token not in made:  # the first merge that makes a token ranks it
                scores[ids[token]] = -float(rank)
                made.add(token)
        for i, token in enumerate(tokens):
            if types[i] == gguf.TokenType.NORMAL and BYTE_TOKEN.fullmatch(token):
                types[i] = gguf.TokenType.BYTE
        unk_id = ids.get(hf["model"].get("unk_token"))
        if unk_id is not None:
            types[unk_id] = gguf.TokenType.UNKNOWN
        bos = leading_special_token(hf)
        return cls("llama", "default", tokens, types, None, scores, ids.get(bos, separator), separator,
                   bos is not None, unk_id)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(self.add_bos)
        if self.add_eos:
            writer.add_add_eos_token(True)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        if self.eot_id is not None:
            writer.add_eot_token_id(self.eot_id)


def _byte_level_pre_tokenizer(hf: dict) -> str | None:
    """The llama.cpp pre-tokenizer of a byte-level BPE that splits as this one does, or None."""
    if hf["model"].get("type") != "BPE" or hf.get("pre_tokenizer") is None:
        return None
    pre = hf["pre_tokenizer"]
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    normalizer = hf.get("normalizer")
    return next((name for name, forms in BYTE_LEVEL_PRE_TOKENIZERS.items()
                 if any(_matches(steps, form) for form in forms)
                 and (normalizer is None or _matches(normalizer, IGNORED_NORMALIZERS.get(name)))), None)


def _is_sentencepiece_bpe(hf: dict) -> bool:
    """Whether hf is Llama's BPE with byte fallback, which llama.cpp's sentencepiece tokenizer reproduces."""
    model = hf["model"]
    return model.get("type") == "BPE" and model.get("byte_fallback") is True and hf.get("pre_tokenizer") is None \
        and _matches(hf.get("normalizer"), SENTENCEPIECE_NORMALIZER)


def _matches(found, expected) -> bool:
    """Whether found has every key of expected with the same value, recursively (extra keys are allowed)."""
    if isinstance(expected, dict):
        return isinstance(found, dict) and all(_matches(found.get(k), v) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(found, (list, tuple)) and len(found) == len(expected) and all(
            _matches(f, e) for f, e in zip(found, expected))
    return found == expected


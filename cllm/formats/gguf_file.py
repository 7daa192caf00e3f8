"""GGUF export, for llama.cpp and the tools built on it (Ollama, LM Studio), written with the `gguf` package.

The file is what llama.cpp's own converter makes of a Hugging Face GPT-2 (architecture "gpt2"): the tensors under
GGUF's names (gguf.TensorNameMap), the four projection matrices transposed from cllm's (in, out) to GGML's
(out, in), no output matrix (llama.cpp then ties it to the token embedding, as cllm does), and GPT-2's byte-level
BPE tokenizer (model "gpt2", pre-tokenizer "gpt-2", its merges, <|endoftext|> as bos and eos).

Types: f32 keeps every tensor; f16 and q8_0 convert the matrices (q8_0 rows must be a multiple of its block of 32,
else that matrix stays f16), while vectors (norms, biases) and the position embedding stay f32, as llama.cpp's
converter keeps them.

Only the byte-level BPE tokenizer has a faithful GGUF form: llama.cpp's "gpt2" tokenizer model is that one.
A char or word tokenizer is refused rather than written as something that tokenizes differently.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import gguf
import numpy as np

from ..atomic import atomic_write_file
from ..errors import UsageError
from ..model import GPT
from ..tokenizer import Tokenizer
from .hf import LAYER_NORM_EPS, hf_name

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def save_gguf(path: str | os.PathLike, model: GPT, tokenizer: Tokenizer, *, tensor_type: str = "f32",
              name: str | None = None) -> Path:
    """Writes model and tokenizer as a GGUF file whose matrices are f32, f16 or q8_0, atomically."""
    if tensor_type not in TYPES:
        raise UsageError(f"unknown GGUF type {tensor_type!r}: choose one of {', '.join(TYPES)}")
    if tokenizer.kind != "bpe":
        raise UsageError(f"a {tokenizer.kind} tokenizer has no faithful GGUF form (llama.cpp's GPT-2 tokenizer is "
                         f"byte-level BPE): train with --tokenizer bpe to export to GGUF")
    if model.config.activation != "gelu_tanh":
        raise UsageError(f"llama.cpp's gpt2 architecture computes GELU's tanh form; this model uses "
                         f"{model.config.activation}, so a GGUF file would run a different model")
    path = Path(path)
    atomic_write_file(path, partial(_write, model=model, tokenizer=tokenizer, tensor_type=tensor_type,
                                    name=name or path.stem))
    return path


def _write(tmp: Path, *, model: GPT, tokenizer: Tokenizer, tensor_type: str, name: str) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    try:
        writer.add_name(name)
        writer.add_block_count(cfg.n_layers)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.dim)
        writer.add_feed_forward_length(cfg.hidden_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(FILE_TYPES[tensor_type])
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
        names = gguf.TensorNameMap(gguf.MODEL_ARCH.GPT2, cfg.n_layers)
        for cllm_name, tensor in model.p.items():
            gguf_name = names.get_name(hf_name(cllm_name), try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise RuntimeError(f"no GGUF name for {cllm_name}")
            if cllm_name.endswith(TRANSPOSED):
                tensor = tensor.T
            _add_tensor(writer, gguf_name, np.ascontiguousarray(tensor), tensor_type,
                        is_position=cllm_name == "wpe")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: np.ndarray, tensor_type: str, *,
                is_position: bool) -> None:
    qtype = TYPES[tensor_type]
    if tensor.ndim == 1 or is_position:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, tensor)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, tensor.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)  # its shape is in bytes


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    hf = json.loads(tokenizer.hf_json())
    vocab = tokenizer.vocab()
    tokens = [None] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id] = token
    special = {t["id"] for t in hf.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    for i in range(vocab_size):  # rows of the embedding beyond the tokenizer's vocabulary: never produced
        if tokens[i] is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"].get("merges", [])]
    separator = tokenizer.separator_id
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(separator)
    writer.add_eos_token_id(separator)
    writer.add_add_bos_token(False)  # GPT-2 starts a prompt with no special token

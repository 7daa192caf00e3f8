"""Hugging Face folders: read GPT-2, Llama, Qwen2 (Qwen2.5) and Qwen3 models as cllm models, and write cllm models
as them.

A folder is `config.json` (GPT2Config, LlamaConfig, Qwen2Config or Qwen3Config), `model.safetensors` (or shards
listed in `model.safetensors.index.json`), and the tokenizer (`tokenizer.json`, or GPT-2's `vocab.json` +
`merges.txt`). config.json's model_type is cllm's architecture ("gpt2", "llama", "qwen2" or "qwen3",
cllm.model.ARCHITECTURES). A checkpoint of the base model alone (Qwen3-Embedding's Qwen3Model, whose names have no
`model.` and which has no head) reads as a tied model.

Each architecture's tensors map onto cllm's parameters by `hf_tensors`, which gives every tensor of the Hugging
Face checkpoint as a view into the model's parameter buffer, in Hugging Face's layout: loading reads each tensor
straight into its view (cllm.tensor_files), and saving writes the views. GPT-2's map name for name, with no
transposes: cllm keeps GPT-2's names and its (in, out) Conv1D layout. Llama's nn.Linear weights are (out, in), so
each is a transposed view, and q, k, v (and gate, up) are column blocks of cllm's packed matrix. HF's RoPE rotates
the two halves of each head, as cllm's does, so q_proj and k_proj need no reordering. Qwen2's q, k and v biases are
the blocks of cllm's packed c_attn bias, and Qwen3's q_norm and k_norm map name for name.

Reading refuses, with one line naming it, any config setting that would change the arithmetic from what cllm
computes, rather than run a different model silently. It never unpickles: a folder holding only
`pytorch_model.bin` is refused with the command that converts it. Weights may be float32, float16 or bfloat16
(widened exactly to cllm's float32).

Nothing is allocated on config.json's word alone. Its sizes all become the model's buffer before a tensor is
read, so the weight files' headers must first hold as many parameters as the config describes; and the context
length (n_positions, max_position_embeddings), which sizes the RoPE table and the KV cache while no tensor holds
it for Llama, may be at most cllm.model.MAX_CONTEXT_LENGTH (2^20) positions.

Writing gives a folder that `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load
offline, and that reads back into the same tensors bit for bit.

A chat model's template (tokenizer_config.json's chat_template, or the chat_template.jinja file that newer
transformers versions write) comes along with its bos_token and eos_token (cllm.chat), and is written back to
tokenizer_config.json. Its end-of-turn token is written into config.json's and generation_config.json's
eos_token_id too, after the separator, so that transformers' generate() ends a reply where cllm does.

An embedding model's sentence-transformers files (modules.json, 1_Pooling/, config_sentence_transformers.json) are
read into the tokenizer's embedding config and written back from it (cllm.formats.sentence_transformers).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .. import tensor_files
from ..atomic import atomic_write_bytes, atomic_write_file
from ..chat import ChatTemplate
from ..checks import require_int
from ..errors import UsageError
from ..model import GPT, MAX_CONTEXT_LENGTH, ModelConfig, parameter_shapes
from ..model_file_errors import ModelFileError, few_names, one_line
from ..tokenizer import ENDOFTEXT, Tokenizer
from .sentence_transformers import padding_settings, read_embedding_config, save_embedding_config

CONFIG, WEIGHTS, WEIGHTS_INDEX, TOKENIZER, TOKENIZER_CONFIG = \
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
READABLE_DTYPES = tuple(tensor_files.DTYPES)  # F32, and F16 and BF16 (widened on reading)
# The prefix of the base model's tensors inside the causal-LM checkpoint (GPT2LMHeadModel's transformer.,
# LlamaForCausalLM's model.); a checkpoint of the base model alone (GPT2Model, LlamaModel) has none.
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "qwen3": "model."}
# Buffers that some checkpoints hold beside the parameters: GPT-2's causal masks, Llama's RoPE frequencies (from
# transformers before 4.31; cllm computes them from rope_theta, and any scaling of them is refused in config.json).
IGNORED_TENSORS = {"gpt2": (".attn.bias", ".attn.masked_bias")} | {
    arch: (".rotary_emb.inv_freq",) for arch in ("llama", "qwen2", "qwen3")}
LM_HEAD = "lm_head.weight"  # an untied head; a tied model's is its token embedding, whether or not the file repeats it

# GPT-2
# HF's activation names -> cllm's (cllm.model.ACTIVATIONS): GELU's tanh form under its two names, and the exact one.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}
LAYER_NORM_EPS = 1e-5  # GPT-2's, where config.json does not say
# Settings that change GPT-2's arithmetic, with the value under which cllm computes the same thing.
SAME_ARITHMETIC = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "reorder_and_upcast_attn": False, "add_cross_attention": False}
EMBEDDINGS = ("wte", "wpe")  # GPT-2 calls them wte.weight and wpe.weight; every other name is the same

# Llama. LlamaConfig's defaults, for the keys a config.json may leave out.
LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "tie_word_embeddings": False, "hidden_act": "silu"}
# Settings that change Llama's arithmetic, with the value under which cllm computes the same thing. rope_interleaved
# (SmolLM2's configs name it) would rotate adjacent pairs rather than halves.
LLAMA_SAME_ARITHMETIC = {"rope_scaling": None, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                         "rope_interleaved": False}
# Qwen2's and Qwen3's: a sliding window over the upper layers (off in every released model) would mask attention
# differently; Qwen3's attention_bias would add biases to every projection of the attention.
QWEN_SAME_ARITHMETIC = {"qwen2": {"rope_scaling": None, "use_sliding_window": False},
                        "qwen3": {"rope_scaling": None, "use_sliding_window": False, "attention_bias": False}}
# The names config.json's architectures gives each, for writing
CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class HFFolderError(ModelFileError):
    """A Hugging Face folder that cllm cannot read faithfully; the message names the file and the reason."""


def hf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Every tensor of the model's Hugging Face checkpoint, by its full name, as a view into the model's
    parameters laid out as Hugging Face lays it out: where loading reads each tensor, and what saving writes."""
    return _TENSORS[model.config.arch](model)


def _gpt2_tensors(model: GPT) -> dict[str, np.ndarray]:
    """cllm's names, after transformer., with .weight after the two embeddings; the same layout. An untied head
    (an imported file's) is GPT2LMHeadModel's lm_head.weight."""
    return {LM_HEAD if name == "lm_head" else f"transformer.{name}.weight" if name in EMBEDDINGS
            else f"transformer.{name}": view for name, view in model.p.items()}


def _llama_tensors(model: GPT) -> dict[str, np.ndarray]:
    """nn.Linear weights are (out, in), cllm's (in, out): each is a transposed view, and q, k, v and gate, up are
    column blocks of cllm's packed c_attn and c_fc (as Qwen2's q, k, v biases are of its c_attn bias)."""
    cfg, p = model.config, model.p
    Q, KV, I = cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
    tensors = {"model.embed_tokens.weight": p["wte"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"h.{i}.", f"model.layers.{i}."
        qkv, gate_up = p[ours + "attn.c_attn.weight"], p[ours + "mlp.c_fc.weight"]
        tensors |= {theirs + "input_layernorm.weight": p[ours + "ln_1.weight"],
                    theirs + "self_attn.q_proj.weight": qkv[:, :Q].T,
                    theirs + "self_attn.k_proj.weight": qkv[:, Q:Q + KV].T,
                    theirs + "self_attn.v_proj.weight": qkv[:, Q + KV:].T}
        if cfg.qkv_bias:
            bias = p[ours + "attn.c_attn.bias"]
            tensors |= {theirs + "self_attn.q_proj.bias": bias[:Q], theirs + "self_attn.k_proj.bias": bias[Q:Q + KV],
                        theirs + "self_attn.v_proj.bias": bias[Q + KV:]}
        if cfg.qk_norm:
            tensors |= {theirs + f"self_attn.{name}.weight": p[ours + f"attn.{name}.weight"]
                        for name in ("q_norm", "k_norm")}
        tensors |= {theirs + "self_attn.o_proj.weight": p[ours + "attn.c_proj.weight"].T,
                    theirs + "post_attention_layernorm.weight": p[ours + "ln_2.weight"],
                    theirs + "mlp.gate_proj.weight": gate_up[:, :I].T,
                    theirs + "mlp.up_proj.weight": gate_up[:, I:].T,
                    theirs + "mlp.down_proj.weight": p[ours + "mlp.c_proj.weight"].T}
    tensors["model.norm.weight"] = p["ln_f.weight"]
    if not cfg.tied_head:
        tensors[LM_HEAD] = p["lm_head"]
    return tensors


_TENSORS = {"gpt2": _gpt2_tensors, "llama": _llama_tensors, "qwen2": _llama_tensors, "qwen3": _llama_tensors}


# --------------------------------------------------------------------------------------------------------------
# reading


def load_hf(folder: str | os.PathLike, *, threads: int = 1) -> tuple[GPT, Tokenizer]:
    """A GPT-2, Llama, Qwen2 or Qwen3 folder as a cllm model and its tokenizer."""
    folder = Path(folder)
    hf_config = read_config_json(folder)
    config = read_config(folder / CONFIG, hf_config)
    tokenizer = read_tokenizer(folder, hf_config.get("eos_token_id"))
    tokenizer.embedding = read_embedding_config(folder, config.dim)
    if tokenizer.vocab_size > config.vocab_size:
        raise HFFolderError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{config.vocab_size}")
    weight_files = _weight_files(folder)
    _check_weights_hold(folder, weight_files, config)
    model = GPT(config, threads=threads, init=False)
    _read_weights(folder, weight_files, model)
    return model, tokenizer


def read_config_json(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise HFFolderError(f"{folder}: not a model folder (no {CONFIG})")
    return _read_json(path)


def read_config(path: Path, hf: dict) -> ModelConfig:
    """config.json's settings (hf, read from path) as cllm's ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in _CONFIG_READERS:
        raise HFFolderError(f"{path}: model_type {model_type!r} is not supported (cllm reads "
                            f"{' and '.join(map(json.dumps, _CONFIG_READERS))} models)")
    return _CONFIG_READERS[model_type](path, hf)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFolderError(f"{path}: unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise HFFolderError(f"{path}: not a JSON object")
    return obj


def _refuse_other_arithmetic(path: Path, hf: dict, same_arithmetic: dict, arch: str) -> None:
    for key, same in same_arithmetic.items():
        if hf.get(key, same) != same:
            raise HFFolderError(f"{path}: {key}={json.dumps(hf[key])} changes {arch}'s arithmetic, which cllm does "
                                f"not implement (it computes {key}={json.dumps(same)})")


def _model_config(path: Path, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except UsageError as e:
        raise HFFolderError(f"{path}: {e}") from None


def _gpt2_config(path: Path, hf: dict) -> ModelConfig:
    _refuse_other_arithmetic(path, hf, SAME_ARITHMETIC, "GPT-2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise HFFolderError(f"{path}: activation_function {activation!r} is not supported "
                            f"(cllm has {', '.join(ACTIVATIONS)})")
    n_embd = hf.get("n_embd")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise HFFolderError(f"{path}: n_inner={n_inner} is not supported (cllm's MLP is 4 * n_embd wide)")
    return _model_config(path, vocab_size=hf.get("vocab_size"), context_length=_context_length(path, hf, "n_positions"),
                         dim=n_embd, n_layers=hf.get("n_layer"), n_heads=hf.get("n_head"),
                         activation=ACTIVATIONS[activation], tied_head=hf.get("tie_word_embeddings", True),
                         norm_eps=hf.get("layer_norm_epsilon", LAYER_NORM_EPS))


def _llama_config(path: Path, hf: dict, arch: str = "llama") -> ModelConfig:
    """A llama-family config.json: Llama's, or Qwen2's and Qwen3's, which name the same settings alike."""
    if arch == "llama":
        _refuse_other_arithmetic(path, hf, LLAMA_SAME_ARITHMETIC, "Llama")
    else:
        _refuse_other_arithmetic(path, hf, QWEN_SAME_ARITHMETIC[arch], arch.capitalize())
        sliding = [kind for kind in hf.get("layer_types") or () if kind != "full_attention"]
        if sliding:
            raise HFFolderError(f"{path}: layer_types has {json.dumps(sliding[0])} layers, which cllm does not "
                                f"implement (it computes full_attention in every layer)")
    hf = LLAMA_DEFAULTS | hf
    if hf["hidden_act"] != "silu":
        raise HFFolderError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (cllm's Llama MLP is "
                            f"SwiGLU, hidden_act \"silu\")")
    return _model_config(
        path, arch=arch, vocab_size=hf.get("vocab_size"),
        context_length=_context_length(path, hf, "max_position_embeddings"),
        dim=hf.get("hidden_size"), n_layers=hf.get("num_hidden_layers"), n_heads=hf.get("num_attention_heads"),
        n_kv_heads=hf.get("num_key_value_heads"), intermediate_size=hf.get("intermediate_size"),
        head_dim=hf.get("head_dim"), rope_theta=_rope_theta(path, hf), norm_eps=hf["rms_norm_eps"],
        tied_head=hf["tie_word_embeddings"])


def _context_length(path: Path, hf: dict, key: str) -> int:
    """config.json's context length, under the key the architecture gives it, within MAX_CONTEXT_LENGTH: checked
    here, where the refusal can name the key as the folder writes it, before anything is sized by it."""
    try:
        return require_int(key, hf.get(key), maximum=MAX_CONTEXT_LENGTH)
    except UsageError as e:
        raise HFFolderError(f"{path}: {e}") from None


def _rope_theta(path: Path, hf: dict) -> float:
    """RoPE's base: transformers 5 writes rope_parameters ({"rope_type": "default", "rope_theta": ...}), earlier
    versions rope_theta (and rope_scaling, refused unless null). Any other rope_type scales the rotations."""
    rope = hf.get("rope_parameters")
    if rope is None:
        return hf["rope_theta"]
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" \
            or set(rope) - {"rope_type", "rope_theta"}:
        raise HFFolderError(f"{path}: rope_parameters={json.dumps(rope)} changes RoPE, which cllm does not implement "
                            f"(it computes rope_type \"default\", given only rope_theta)")
    return rope.get("rope_theta", hf["rope_theta"])


_CONFIG_READERS = {"gpt2": _gpt2_config, "llama": _llama_config, "qwen2": partial(_llama_config, arch="qwen2"),
                   "qwen3": partial(_llama_config, arch="qwen3")}


def read_tokenizer(folder: Path, eos_token_id=None) -> Tokenizer:
    """tokenizer.json as it is (or GPT-2's byte-level BPE from vocab.json and merges.txt), with the model's
    end-of-text token as its separator (_separator). eos_token_id is config.json's."""
    hf = _hf_tokenizer(folder)
    separator = _separator(folder, hf, eos_token_id)
    # An added special token stays whole when decoding; GPT-2's vocab.json only lists <|endoftext|>.
    hf.add_special_tokens([separator])
    return Tokenizer("bpe", hf, separator=separator, chat_template=_chat_template(folder, separator))


def _chat_template(folder: Path, separator: str) -> ChatTemplate | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a string, or
    named templates of which "default" is the one transformers uses), with the special tokens it names."""
    path = folder / TOKENIZER_CONFIG
    tokenizer_config = _read_json(path) if path.is_file() else {}
    source = tokenizer_config.get("chat_template")
    if (folder / CHAT_TEMPLATE).is_file():
        path = folder / CHAT_TEMPLATE
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HFFolderError(f"{path}: unreadable ({e})") from None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise HFFolderError(f"{path}: chat_template is not a string (or named templates with a default)")

    def token(name: str, default: str) -> str:
        value = tokenizer_config.get(name)
        value = value.get("content") if isinstance(value, dict) else value  # an AddedToken, as some versions write
        return value if isinstance(value, str) else default

    return ChatTemplate(source, bos_token=token("bos_token", ""), eos_token=token("eos_token", separator))


def _hf_tokenizer(folder: Path) -> HFTokenizer:
    path = folder / TOKENIZER
    try:
        if path.is_file():
            return HFTokenizer.from_file(str(path))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            hf = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            return hf
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise HFFolderError(f"{folder}: unreadable tokenizer ({one_line(e)})") from None
    raise HFFolderError(f"{folder}: no tokenizer ({TOKENIZER}, or vocab.json with merges.txt)")


def _separator(folder: Path, hf: HFTokenizer, eos_id) -> str:
    """The token that ends a document, as the folder names it: config.json's eos_token_id (eos_id; the first, if
    it lists several), else tokenizer_config.json's eos_token, else GPT-2's <|endoftext|>."""
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if eos_id is not None:
        token = hf.id_to_token(eos_id) if isinstance(eos_id, int) and eos_id >= 0 else None
        if token is None:
            raise HFFolderError(f"{folder / CONFIG}: eos_token_id={eos_id} is not a token of the tokenizer")
        return token
    tokenizer_config = folder / TOKENIZER_CONFIG
    eos = _read_json(tokenizer_config).get("eos_token") if tokenizer_config.is_file() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos  # an AddedToken, as some versions write it
    if eos is not None:
        if not isinstance(eos, str) or hf.token_to_id(eos) is None:
            raise HFFolderError(f"{tokenizer_config}: eos_token={json.dumps(eos)} is not a token of the tokenizer")
        return eos
    if hf.token_to_id(ENDOFTEXT) is None:
        raise HFFolderError(f"{folder}: names no end-of-text token ({CONFIG}'s eos_token_id), and the tokenizer has "
                            f"no {ENDOFTEXT}, GPT-2's")
    return ENDOFTEXT


def leading_special_token(hf_tokenizer: dict) -> str | None:
    """The special token that a tokenizer.json's post-processor puts before every single text (Llama's <s>), or
    None."""
    template = _single_template(hf_tokenizer)
    return (template[0].get("SpecialToken") or {}).get("id") if template else None


def trailing_special_token(hf_tokenizer: dict) -> str | None:
    """The special token that a tokenizer.json's post-processor puts after every single text (Qwen3-Embedding's
    <|endoftext|>), or None."""
    template = _single_template(hf_tokenizer)
    return (template[-1].get("SpecialToken") or {}).get("id") if template else None


def _single_template(hf_tokenizer: dict) -> list[dict] | None:
    post = hf_tokenizer.get("post_processor") or {}
    return post.get("single") if post.get("type") == "TemplateProcessing" else None


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS, folder / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFFolderError(f"{index}: unreadable index ({e!r})") from None
        for shard in shards:
            if Path(shard).name != shard or not (folder / shard).is_file():
                raise HFFolderError(f"{index}: lists shard {shard!r}, which is not a file in {folder}")
        return [folder / shard for shard in shards]
    if any((folder / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise HFFolderError(
            f"{folder}: holds pytorch_model.bin, a pickle, which cllm never loads (unpickling runs code). Convert "
            f"it to safetensors first, where it is trusted: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-st')\"")
    raise HFFolderError(f"{folder}: no weights ({WEIGHTS} or {WEIGHTS_INDEX})")


@contextmanager
def _weight_file_errors(path: Path):
    """Whatever reading the weight file at path raises, as an HFFolderError naming it once."""
    try:
        yield
    except HFFolderError:  # a refusal of ours, which names the file already
        raise
    except SafetensorError as e:
        raise HFFolderError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    except ValueError as e:  # tensor_files' refusals
        raise HFFolderError(f"{path}: {e}") from None
    except OSError as e:
        raise HFFolderError(f"{path}: cannot read it ({e.strerror or e})") from None


def _check_weights_hold(folder: Path, weight_files: list[Path], config: ModelConfig) -> None:
    """Refuses a config that describes more parameters than the weight files hold, before the model's buffer is
    sized by it: each tensor's shape is checked as it is read into that buffer, too late for a config that says
    10^12 tokens. Only the files' headers are read, and safetensors checks them against each file's size."""
    held: dict[str, int] = {}  # each tensor's number of values
    for path in weight_files:
        with _weight_file_errors(path), safe_open(path, framework="np") as f:
            held |= {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()
                     if not key.endswith(IGNORED_TENSORS[config.arch])}
    # Every layer has tensors of its own: the layers are bounded so before parameter_shapes lists each one's.
    if config.n_layers > len(held):
        raise HFFolderError(f"{folder / CONFIG}: describes {config.n_layers:,} layers, but its weights hold only "
                            f"{len(held):,} tensors")
    needed = sum(math.prod(shape) for shape in parameter_shapes(config)[0].values())
    if needed > sum(held.values()):
        raise HFFolderError(f"{folder / CONFIG}: describes a model of {needed:,} parameters, but its weights hold "
                            f"only {sum(held.values()):,}")


def _read_weights(folder: Path, weight_files: list[Path], model: GPT) -> None:
    """Reads every tensor of the folder's safetensors files into its view of the model's parameter buffer (never
    a second copy of the model: cllm.tensor_files), checking names, dtypes, shapes and values."""
    arch = model.config.arch
    tensors = hf_tensors(model)
    seen: set[str] = set()
    tied_head = None  # (file key, its values) if the file repeats a tied head: read only to compare
    for path in weight_files:
        wanted: dict[str, np.ndarray] = {}  # file key -> where it goes
        with _weight_file_errors(path):
            with safe_open(path, framework="np") as f:  # validates the header; only it is read here
                for key in f.keys():
                    name = key if key in tensors else BASE_PREFIX[arch] + key
                    if name.endswith(IGNORED_TENSORS[arch]):
                        continue
                    meta = f.get_slice(key)
                    if meta.get_dtype() not in READABLE_DTYPES:
                        raise HFFolderError(f"{path}: tensor {key!r} is {meta.get_dtype()}; cllm reads "
                                            f"{', '.join(READABLE_DTYPES)}")
                    if key == LM_HEAD and key not in tensors:
                        tied_head = key, np.empty(meta.get_shape(), np.float32)
                        wanted[key] = tied_head[1]
                        continue
                    if name not in tensors:
                        raise HFFolderError(f"{path}: unexpected tensor {key!r} for a {arch} model")
                    if tuple(meta.get_shape()) != tensors[name].shape:
                        raise HFFolderError(f"{path}: tensor {key!r} has shape {tuple(meta.get_shape())}, expected "
                                            f"{tensors[name].shape}")
                    wanted[key] = tensors[name]
                    seen.add(name)
            tensor_files.read_into(path, wanted.get)
    missing = [name for name in tensors if name not in seen]
    if missing:
        raise HFFolderError(f"{folder}: missing tensors {few_names(missing)}")
    for name, view in tensors.items():
        if not np.isfinite(view).all():
            raise HFFolderError(f"{folder}: tensor {name!r} holds non-finite values")
    if tied_head is not None and not np.array_equal(tied_head[1], model.p["wte"]):
        raise HFFolderError(f"{folder}: {tied_head[0]} differs from the token embedding, which {CONFIG} ties it to "
                            f"(tie_word_embeddings)")


# --------------------------------------------------------------------------------------------------------------
# writing


def save_hf(folder: str | os.PathLike, model: GPT, tokenizer: Tokenizer) -> list[Path]:
    """Writes model and tokenizer as a Hugging Face folder of the model's architecture (created if needed);
    returns the files written. Each file is written atomically, so an interrupted export never leaves a truncated
    one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    # A tokenizer that starts every text with a token of its own (Llama's <s>) names it as bos; else the separator
    # both starts and ends a text, as GPT-2's <|endoftext|> does.
    bos = leading_special_token(json.loads(tokenizer.hf_json())) or tokenizer.separator
    # transformers' generate() stops at any id of eos_token_id: a chat model's end of turn ends its reply, as the
    # separator ends a document. The separator comes first, which is the one reading takes (_separator).
    eos_ids = [tokenizer.separator_id, *tokenizer.end_of_turn_ids]
    special_ids = {"bos_token_id": tokenizer.vocab()[bos], "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    config = _CONFIG_WRITERS[cfg.arch](cfg) | special_ids | {
        "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": cfg.tied_head, "dtype": "float32"}
    special = {"bos_token": bos, "eos_token": tokenizer.separator}
    if tokenizer.kind in ("char", "word"):
        special["unk_token"] = "<unk>"
    if tokenizer.kind == "word":
        special["pad_token"] = "<pad>"
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.context_length,
                        "clean_up_tokenization_spaces": False, **padding_settings(tokenizer), **special}
    if tokenizer.chat_template is not None:
        chat = tokenizer.chat_template
        tokenizer_config |= {"chat_template": chat.source, "bos_token": chat.bos_token or bos,
                             "eos_token": chat.eos_token}
    atomic_write_file(folder / WEIGHTS, partial(tensor_files.write, tensors=hf_tensors(model),
                                                metadata={"format": "pt"}))
    files = {
        CONFIG: _json_bytes(config),
        TOKENIZER: tokenizer.hf_json().encode("utf-8"),
        TOKENIZER_CONFIG: _json_bytes(tokenizer_config),
        "generation_config.json": _json_bytes(special_ids),
    }
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    embedding_files = save_embedding_config(folder, tokenizer, cfg.dim, cfg.context_length)
    return [folder / WEIGHTS] + [folder / name for name in files] + embedding_files


def _gpt2_config_json(cfg: ModelConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.dim,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
            "activation_function": {"gelu_tanh": "gelu_new", "gelu_erf": "gelu"}[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True}


def _llama_config_json(cfg: ModelConfig) -> dict:
    """RoPE's base is written both ways: rope_parameters for transformers 5, rope_theta (with rope_scaling null)
    for earlier versions and for the tools that read config.json themselves (llama.cpp's converter). Qwen's
    sliding window is written off, as every released Qwen2 and Qwen3 model has it."""
    config = {"architectures": [CAUSAL_LM[cfg.arch]], "model_type": cfg.arch,
              "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length, "hidden_size": cfg.dim,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
              "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "attention_dropout": 0.0}
    if cfg.arch == "llama":
        return config | {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers,
               "layer_types": ["full_attention"] * cfg.n_layers}
    return config | ({"attention_bias": False} if cfg.arch == "qwen3" else {})


_CONFIG_WRITERS = {"gpt2": _gpt2_config_json, "llama": _llama_config_json, "qwen2": _llama_config_json,
                   "qwen3": _llama_config_json}


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

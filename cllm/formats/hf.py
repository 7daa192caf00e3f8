"""Hugging Face GPT-2 folders: read them as cllm models, and write cllm models as them.

cllm's model is GPT-2's architecture with GPT-2's parameter names and GPT-2's (in, out) layout of the four
projection matrices (HF's Conv1D), so a checkpoint maps onto it name for name, with no transposes. What this
module adds is the folder: `config.json` (GPT2Config), `model.safetensors` (or shards listed in
`model.safetensors.index.json`), and the tokenizer (`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`).

Reading refuses, with one line naming it, any config setting that would change the arithmetic from what cllm
computes, rather than run a different model silently. It never unpickles: a folder holding only
`pytorch_model.bin` is refused with the command that converts it.

Writing gives a folder that `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load
offline, and that reads back into the same tensors bit for bit.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .. import tensor_files
from ..atomic import atomic_write_bytes, atomic_write_file
from ..checkpoint import ModelFileError, few_names
from ..errors import UsageError
from ..model import GPT, ModelConfig, parameter_shapes
from ..tokenizer import ENDOFTEXT, SEPARATOR, Tokenizer

CONFIG, WEIGHTS, WEIGHTS_INDEX, TOKENIZER = "config.json", "model.safetensors", "model.safetensors.index.json", \
    "tokenizer.json"
# HF's activation names -> cllm's (cllm.model.ACTIVATIONS): GELU's tanh form under its two names, and the exact one.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}
LAYER_NORM_EPS = 1e-5  # what cllm's LayerNorm kernels use
# Settings that change GPT-2's arithmetic, with the value under which cllm computes the same thing.
SAME_ARITHMETIC = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "reorder_and_upcast_attn": False, "add_cross_attention": False}
IGNORED_TENSORS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers, not parameters
READABLE_DTYPES = tuple(tensor_files.DTYPES)  # F32, and F16 (widened on reading)
EMBEDDINGS = ("wte", "wpe")  # GPT-2 calls them wte.weight and wpe.weight; every other name is the same


def hf_name(name: str) -> str:
    """The Hugging Face name of a cllm parameter (without the transformer. prefix)."""
    return f"{name}.weight" if name in EMBEDDINGS else name


def cllm_name(key: str) -> str:
    """The cllm name of a Hugging Face tensor, with or without the transformer. prefix: hf_name's inverse."""
    name = key.removeprefix("transformer.")
    return name.removesuffix(".weight") if name.removesuffix(".weight") in EMBEDDINGS else name


class HFFolderError(ModelFileError):
    """A Hugging Face folder that cllm cannot read faithfully; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------------------
# reading


def load_hf(folder: str | os.PathLike, *, threads: int = 1) -> tuple[GPT, Tokenizer]:
    """A GPT-2-family folder as a cllm model and its tokenizer."""
    folder = Path(folder)
    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise HFFolderError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{config.vocab_size}")
    model = GPT(config, threads=threads, init=False)
    _read_weights(folder, model)
    return model, tokenizer


def read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise HFFolderError(f"{folder}: not a model folder (no {CONFIG})")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFolderError(f"{path}: unreadable ({e})") from None
    if not isinstance(hf, dict):
        raise HFFolderError(f"{path}: not a JSON object")
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise HFFolderError(f"{path}: model_type {model_type!r} is not supported (cllm reads GPT-2-family "
                            f"models, model_type \"gpt2\")")
    for key, same in SAME_ARITHMETIC.items():
        if hf.get(key, same) != same:
            raise HFFolderError(f"{path}: {key}={hf[key]!r} changes GPT-2's arithmetic, which cllm does not "
                                f"implement (it computes {key}={same})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise HFFolderError(f"{path}: activation_function {activation!r} is not supported "
                            f"(cllm has {', '.join(ACTIVATIONS)})")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        raise HFFolderError(f"{path}: layer_norm_epsilon={eps} is not supported (cllm's LayerNorm uses "
                            f"{LAYER_NORM_EPS})")
    n_embd = hf.get("n_embd")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise HFFolderError(f"{path}: n_inner={n_inner} is not supported (cllm's MLP is 4 * n_embd wide)")
    if hf.get("tie_word_embeddings", True) is not True:
        raise HFFolderError(f"{path}: tie_word_embeddings=false is not supported (cllm's output layer is the "
                            f"token embedding)")
    try:
        return ModelConfig(vocab_size=hf.get("vocab_size"), context_length=hf.get("n_positions"), dim=n_embd,
                           n_layers=hf.get("n_layer"), n_heads=hf.get("n_head"),
                           activation=ACTIVATIONS[activation])
    except UsageError as e:
        raise HFFolderError(f"{path}: {e}") from None


def read_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json as it is, or GPT-2's byte-level BPE from vocab.json and merges.txt."""
    path = folder / TOKENIZER
    try:
        if path.is_file():
            hf = HFTokenizer.from_file(str(path))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            hf = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
        else:
            raise HFFolderError(f"{folder}: no tokenizer ({TOKENIZER}, or vocab.json with merges.txt)")
    except HFFolderError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise HFFolderError(f"{folder}: unreadable tokenizer ({' '.join(str(e).split())})") from None
    if hf.token_to_id(ENDOFTEXT) is None:
        raise HFFolderError(f"{folder}: the tokenizer has no {ENDOFTEXT} token, which GPT-2 uses as the "
                            f"document separator")
    # An added special token keeps "<|endoftext|>" whole when decoding; GPT-2's vocab.json only lists it.
    hf.add_special_tokens([ENDOFTEXT])
    return Tokenizer("bpe", hf)


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


def _read_weights(folder: Path, model: GPT) -> None:
    """Reads every tensor of the folder's safetensors file(s) into the model's parameter buffer (never a second
    copy of the model: cllm.tensor_files), checking names, dtypes, shapes and values."""
    shapes, _ = parameter_shapes(model.config)
    seen: set[str] = set()
    lm_head = None
    for path in _weight_files(folder):
        wanted: dict[str, np.ndarray] = {}  # file key -> where it goes
        try:
            with safe_open(path, framework="np") as f:  # validates the header; only it is read here
                for key in f.keys():
                    name = cllm_name(key)
                    if name.endswith(IGNORED_TENSORS):
                        continue
                    meta = f.get_slice(key)
                    if meta.get_dtype() not in READABLE_DTYPES:
                        raise HFFolderError(f"{path}: tensor {key!r} is {meta.get_dtype()}; cllm reads "
                                            f"{' and '.join(READABLE_DTYPES)}")
                    if name == "lm_head.weight":  # tied or absent in cllm: read it only to compare
                        lm_head = key, np.empty(meta.get_shape(), np.float32)
                        wanted[key] = lm_head[1]
                        continue
                    if name not in shapes:
                        raise HFFolderError(f"{path}: unexpected tensor {key!r} for a GPT-2 model")
                    if tuple(meta.get_shape()) != shapes[name]:
                        raise HFFolderError(f"{path}: tensor {key!r} has shape {tuple(meta.get_shape())}, expected "
                                            f"{shapes[name]}")
                    wanted[key] = model.p[name]
                    seen.add(name)
            tensor_files.read_into(path, wanted.get)
        except SafetensorError as e:
            raise HFFolderError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
        except ValueError as e:
            raise HFFolderError(f"{path}: {e}") from None
        except OSError as e:
            raise HFFolderError(f"{path}: cannot read it ({e.strerror or e})") from None
    missing = sorted(set(shapes) - seen)
    if missing:
        raise HFFolderError(f"{folder}: missing tensors {few_names(missing)}")
    for name, view in model.p.items():
        if not np.isfinite(view).all():
            raise HFFolderError(f"{folder}: tensor {hf_name(name)!r} holds non-finite values")
    if lm_head is not None and (lm_head[1].shape != model.p["wte"].shape
                                or not np.array_equal(lm_head[1], model.p["wte"])):
        raise HFFolderError(f"{folder}: {lm_head[0]} differs from the token embedding; cllm's output layer is "
                            f"the token embedding (tied), so an untied head is not supported")


# --------------------------------------------------------------------------------------------------------------
# writing


def save_hf(folder: str | os.PathLike, model: GPT, tokenizer: Tokenizer) -> list[Path]:
    """Writes model and tokenizer as a Hugging Face GPT-2 folder (created if needed); returns the files written.
    Each file is written atomically, so an interrupted export never leaves a truncated one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    separator = SEPARATOR[tokenizer.kind]
    hf_activation = {"gelu_tanh": "gelu_new", "gelu_erf": "gelu"}[cfg.activation]
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None, "activation_function": hf_activation,
        "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": tokenizer.separator_id, "eos_token_id": tokenizer.separator_id, "dtype": "float32"}
    special = {"bos_token": separator, "eos_token": separator}
    if tokenizer.kind in ("char", "word"):
        special["unk_token"] = "<unk>"
    if tokenizer.kind == "word":
        special["pad_token"] = "<pad>"
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.context_length,
                        "clean_up_tokenization_spaces": False, **special}
    generation_config = {"bos_token_id": tokenizer.separator_id, "eos_token_id": tokenizer.separator_id}
    tensors = {f"transformer.{hf_name(name)}": view for name, view in model.p.items()}
    atomic_write_file(folder / WEIGHTS, partial(safetensors.numpy.save_file, tensors, metadata={"format": "pt"}))
    files = {
        CONFIG: _json_bytes(config),
        TOKENIZER: tokenizer.hf_json().encode("utf-8"),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "generation_config.json": _json_bytes(generation_config),
    }
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return [folder / WEIGHTS] + [folder / name for name in files]


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

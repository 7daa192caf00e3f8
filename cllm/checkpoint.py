""".cllm model files and resumable training state, both safetensors containers written atomically.

A .cllm file is one complete model: one float32 tensor per named parameter (GPT-2 names, the model's `p`
views) and string metadata
    format = "cllm", format_version = "1", config = ModelConfig JSON, tokenizer = tokenizer JSON
plus any caller metadata (e.g. the training step). Any safetensors reader can open it.

A training-state file holds what resuming needs beyond the model: AdamW's moments (`adamw.m`, `adamw.v`), the
parameters they belong to (`params`, optional), and metadata
    format = "cllm-state", format_version = "1", step, optimizer = AdamW's step_count and hyper-parameters as
    JSON, extra = a JSON object the trainer owns (settings, RNG state, data cursor).

Writes go to a temporary file beside the target and replace it only once complete and synced, so a crash
leaves either the old file or the new one, never half of either. Reads validate everything and raise
ModelFileError with one line naming the file; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from . import tensor_files
from .atomic import atomic_write_file
from .formats.gguf_in import is_gguf, load_gguf
from .formats.hf import load_hf
from .model import GPT, ModelConfig, parameter_shapes
from .model_file_errors import ModelFileError, few_names, one_line
from .optim import AdamW
from .tokenizer import Tokenizer

MODEL_FORMAT, STATE_FORMAT, FORMAT_VERSION = "cllm", "cllm-state", "1"
MODEL_KEYS = ("format", "format_version", "config", "tokenizer")  # metadata that save_model owns
STATE_TENSORS = ("adamw.m", "adamw.v")


# --------------------------------------------------------------------------------------------------------------
# model files


def save_model(path: str | os.PathLike, model: GPT, tokenizer: Tokenizer, *,
               metadata: dict[str, str] | None = None) -> None:
    """Writes model and tokenizer to one .cllm file. metadata adds string entries (not the reserved ones).

    Refuses (ValueError) to save non-finite weights, so a diverged run cannot overwrite a good model file.
    """
    extra = dict(metadata or {})
    reserved = sorted(set(extra) & set(MODEL_KEYS))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved for the model file itself")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("model file metadata must map strings to strings")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}")
    if not np.isfinite(model.params).all():
        raise ValueError("the model has non-finite weights (NaN or inf); not saving them")
    header = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
              "config": json.dumps(model.config.to_dict()), "tokenizer": tokenizer.to_json()}
    atomic_write_file(path, partial(safetensors.numpy.save_file, dict(model.p), metadata=extra | header))


def load_model(path: str | os.PathLike, *, threads: int = 1) -> tuple[GPT, Tokenizer]:
    """Reads a .cllm file written by save_model, a Hugging Face GPT-2 or Llama folder (cllm.formats.hf), or a GGUF
    file (cllm.formats.gguf_in: named .gguf, or starting with GGUF's magic). Raises ModelFileError (or
    HFFolderError) if anything about it is wrong."""
    if Path(path).is_dir():
        return load_hf(path, threads=threads)
    if is_gguf(path):
        return load_gguf(path, threads=threads)
    metadata, layout = _read_container(path, MODEL_FORMAT, "model", with_tensors=False)
    config = _model_config(path, metadata)
    tokenizer = _tokenizer(path, metadata, config)
    # Every layer has tensors of its own: the layers are bounded so before parameter_shapes lists each one's.
    if config.n_layers > len(layout):
        raise ModelFileError(f"{path}: the config describes {config.n_layers:,} layers, but the file holds only "
                             f"{len(layout):,} tensors")
    shapes, _ = parameter_shapes(config)
    _check_names_and_shapes(path, layout, shapes)
    model = GPT(config, threads=threads, init=False)
    try:  # straight into the model's buffer: loading costs one copy of the weights (cllm.tensor_files)
        tensor_files.read_into(path, model.p.get)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    for name, view in model.p.items():
        _check_finite(path, name, view)
    return model, tokenizer


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .cllm file (config, tokenizer, and what the saver added), weights unread."""
    return _read_container(path, MODEL_FORMAT, "model", with_tensors=False)[0]


def _model_config(path, metadata: dict[str, str]) -> ModelConfig:
    try:
        fields = json.loads(metadata.get("config", ""))
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return ModelConfig.from_dict(fields)
    except (ValueError, TypeError) as e:  # bad JSON, unknown or missing fields, invalid values
        raise ModelFileError(f"{path}: bad model config: {one_line(e)}") from None


def _tokenizer(path, metadata: dict[str, str], config: ModelConfig) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_json(metadata.get("tokenizer", ""))
    except ValueError as e:
        raise ModelFileError(f"{path}: bad tokenizer: {one_line(e)}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFileError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{config.vocab_size}")
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# training state


def save_state(path: str | os.PathLike, *, optimizer: AdamW, step: int, extra: dict,
               params: np.ndarray | None = None) -> None:
    """Writes what resuming needs: AdamW's moments and step_count, the step, and `extra` (any JSON object).

    params, if given, are stored too, so a resume takes weights and moments from one consistent file even if
    a crash came between writing the model file and this one.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if not isinstance(extra, dict):
        raise ValueError(f"training state extra must be a dict, got {type(extra).__name__}")
    try:
        extra_json = json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"training state extra must be JSON-serialisable: {e}") from None
    tensors = {"adamw.m": optimizer.m, "adamw.v": optimizer.v}
    if params is not None:
        if params.shape != optimizer.m.shape:
            raise ValueError(f"params has shape {params.shape} but the optimizer's moments {optimizer.m.shape}")
        tensors["params"] = params
    hyper = {"step_count": optimizer.step_count, "lr": optimizer.lr, "betas": list(optimizer.betas),
             "eps": optimizer.eps, "weight_decay": optimizer.weight_decay}
    metadata = {"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "step": str(step),
                "optimizer": json.dumps(hyper), "extra": extra_json}
    atomic_write_file(path, partial(safetensors.numpy.save_file, tensors, metadata=metadata))


def load_state(path: str | os.PathLike, *, optimizer: AdamW | None = None) -> dict:
    """Reads a training-state file: {"step", "extra", "optimizer": {step_count, lr, betas, eps, weight_decay},
    "m", "v", "params" (None if not saved)}.

    With an optimizer, the state must match its parameter count, and its moments and step_count are restored
    into it (hyper-parameters are only reported: the caller decides whether they must match).
    """
    metadata, tensors = _read_container(path, STATE_FORMAT, "training state")
    names = set(tensors)
    if not set(STATE_TENSORS) <= names <= set(STATE_TENSORS) | {"params"}:
        raise ModelFileError(f"{path}: a training state holds {list(STATE_TENSORS)} and optionally params, "
                             f"found {sorted(names)}")
    size = tensors["adamw.m"].size
    _check_tensors(path, tensors, {name: (size,) for name in names})
    if optimizer is not None and optimizer.m.size != size:
        raise ModelFileError(f"{path}: the training state is for {size} parameters but the model has "
                             f"{optimizer.m.size}")
    step = _json_field(path, metadata, "step", int)
    hyper = _json_field(path, metadata, "optimizer", dict)
    extra = _json_field(path, metadata, "extra", dict)
    step_count = hyper.get("step_count")
    if not (isinstance(step, int) and step >= 0 and isinstance(step_count, int) and step_count >= 0):
        raise ModelFileError(f"{path}: step and step_count must be non-negative integers")
    if optimizer is not None:
        np.copyto(optimizer.m, tensors["adamw.m"])
        np.copyto(optimizer.v, tensors["adamw.v"])
        optimizer.step_count = step_count
    return {"step": step, "extra": extra, "optimizer": hyper, "m": tensors["adamw.m"], "v": tensors["adamw.v"],
            "params": tensors.get("params")}


def _json_field(path, metadata: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(metadata[key])
    except (KeyError, ValueError):
        raise ModelFileError(f"{path}: metadata field {key!r} is missing or not valid JSON") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelFileError(f"{path}: metadata field {key!r} must be a JSON {kind.__name__}")
    return value


# --------------------------------------------------------------------------------------------------------------
# reading and checking a container


def _read_container(path, expected_format: str, what: str, *, with_tensors: bool = True
                    ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Metadata and the float32 tensors of a safetensors file whose format field is expected_format; with
    with_tensors=False, each tensor's shape instead of the tensor, and no data is read."""
    if not Path(path).exists():
        raise ModelFileError(f"{path}: no such {what} file")
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: not a {what} file (it is a directory or a special file)")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            _check_format(path, metadata, expected_format, what)
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            wrong = {name: dtype for name, dtype in dtypes.items() if dtype != "F32"}
            if wrong:
                name, dtype = next(iter(wrong.items()))
                raise ModelFileError(f"{path}: tensor {name!r} is {dtype}, expected F32 (float32)")
            if not with_tensors:
                return metadata, {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    return metadata, tensors


def _check_format(path, metadata: dict[str, str], expected_format: str, what: str) -> None:
    found = metadata.get("format")
    if found != expected_format:
        detail = "it has no format field" if found is None else f"its format is {found!r}"
        raise ModelFileError(f"{path}: not a cllm {what} file ({detail}, expected {expected_format!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported {what} format_version {version!r} "
                             f"(this cllm reads version {FORMAT_VERSION})")


def _check_tensors(path, tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly the expected names, each with its expected shape and only finite values."""
    _check_names_and_shapes(path, {name: tensor.shape for name, tensor in tensors.items()}, shapes)
    for name, tensor in tensors.items():
        _check_finite(path, name, tensor)


def _check_names_and_shapes(path, found: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    missing, unexpected = sorted(set(shapes) - set(found)), sorted(set(found) - set(shapes))
    if missing:
        raise ModelFileError(f"{path}: missing tensors {few_names(missing)}")
    if unexpected:
        raise ModelFileError(f"{path}: unexpected tensors {few_names(unexpected)}")
    for name, shape in shapes.items():
        if tuple(found[name]) != tuple(shape):
            raise ModelFileError(f"{path}: tensor {name!r} has shape {tuple(found[name])}, expected {tuple(shape)}")


def _check_finite(path, name: str, tensor: np.ndarray) -> None:
    if not np.isfinite(tensor).all():
        raise ModelFileError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf)")

""".cllm model files and resumable training state, both safetensors containers written atomically.

A .cllm file is one complete model: one float32 tensor per named parameter (GPT-2 names, the model's `p`
views) and string metadata
    format = "cllm", format_version = "1", config = ModelConfig JSON, tokenizer = tokenizer JSON
plus any caller metadata (e.g. the training step). Any safetensors reader can open it.

A model held quantized (`model.q`, cllm.quantized) keeps its matrices' GGML blocks: each row part of a quantized
matrix is a uint8 (U8) tensor of (rows, bytes per row) named after the matrix and the part's number
("h.0.attn.c_attn.weight.0", ".1", ...), in place of the matrix's float32 tensor, and metadata
    quantized = {matrix: {"cols": row length, "parts": [{"type": "Q4_K", "rows": n}, ...]}, ...} as JSON
describes them, so that any reader can widen them (gguf.quants.dequantize, row by row). The parts are the GGUF
tensors the matrix is made of (cllm.formats.gguf_file.matrix_parts: a Llama's q | k | v), in Hugging Face's row
order. Loading maps the blocks from the file, packs each part into the kernels' layout as it reads it (cllm.quantized)
and gives the file's pages back; the blocks stay mapped for a token's embedding row or an export, so the file must
stay as it is while the model lives. cllm's writers replace a file (atomically, a new inode) rather than write into
it, which leaves a mapping of the old one valid. The format version stays 1: a reader from before quantized files
refuses one (its U8 tensors, the missing float32 ones) rather than misreading it.

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
import mmap
import os
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from . import tensor_files
from .atomic import atomic_write_file
from .buffers import release_pages
from .formats.gguf_file import matrix_parts
from .formats.gguf_in import is_gguf, load_gguf
from .formats.hf import load_hf
from .model import GPT, VOCABULARY_TABLES, ModelConfig, parameter_shapes
from .model_file_errors import ModelFileError, few_names, one_line
from .optim import AdamW
from .quantized import KERNEL_TYPES, QuantizedMatrix, QuantizedRows
from .tokenizer import Tokenizer

MODEL_FORMAT, STATE_FORMAT, FORMAT_VERSION = "cllm", "cllm-state", "1"
MODEL_KEYS = ("format", "format_version", "config", "tokenizer", "quantized")  # metadata that save_model owns
STATE_TENSORS = ("adamw.m", "adamw.v")
F32, U8 = "F32", "U8"  # safetensors' names of the tensors' element types


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
    tensors = {name: view for name, view in model.p.items() if name not in model.q}
    if model.q:
        expected = _matrix_layouts(model.config)
        described = {}
        for name, matrix in model.q.items():
            rows, cols = expected[name]
            if [part.rows for part in matrix.parts] != rows or matrix.shape[1] != cols:
                raise ValueError(f"quantized {name} has parts of {[part.rows for part in matrix.parts]} rows of "
                                 f"{matrix.shape[1]}, expected {rows} of {cols} (the GGUF tensors it is made of)")
            described[name] = {"cols": cols, "parts": [{"type": part.ggml_type.name, "rows": part.rows}
                                                       for part in matrix.parts]}
            tensors |= {f"{name}.{i}": part.data for i, part in enumerate(matrix.parts)}
        header["quantized"] = json.dumps(described)
    atomic_write_file(path, partial(safetensors.numpy.save_file, tensors, metadata=extra | header))


def load_model(path: str | os.PathLike, *, threads: int = 1, dequantize: bool = False) -> tuple[GPT, Tokenizer]:
    """Reads a .cllm file written by save_model, a Hugging Face GPT-2, Llama or Qwen folder (cllm.formats.hf), or a
    GGUF file (cllm.formats.gguf_in: named .gguf, or starting with GGUF's magic). Raises ModelFileError (or
    HFFolderError) if anything about it is wrong.

    A file of quantized blocks gives a model that holds them (model.q), mapped from the file; with dequantize, a
    model of float32 weights instead (GPT.dequantize), to train or to convert."""
    if Path(path).is_dir():
        return load_hf(path, threads=threads)
    if is_gguf(path):
        return load_gguf(path, threads=threads, dequantize=dequantize)
    metadata, layout = _read_container(path, MODEL_FORMAT, "model", with_tensors=False)
    config = _model_config(path, metadata)
    tokenizer = _tokenizer(path, metadata, config)
    # Every layer has tensors of its own: the layers are bounded so before parameter_shapes lists each one's.
    if config.n_layers > len(layout):
        raise ModelFileError(f"{path}: the config describes {config.n_layers:,} layers, but the file holds only "
                             f"{len(layout):,} tensors")
    shapes, _ = parameter_shapes(config)
    quantized = _quantized_parts(path, metadata, config)
    expected = {name: (F32, shape) for name, shape in shapes.items() if name not in quantized}
    for name, (_, parts) in quantized.items():
        expected |= {f"{name}.{i}": (U8, shape) for i, (_, shape) in enumerate(parts)}
    _check_names_and_shapes(path, {name: shape for name, (_, shape) in layout.items()},
                            {name: shape for name, (_, shape) in expected.items()})
    for name, (dtype, _) in expected.items():
        if layout[name][0] != dtype:
            kind = "float32" if dtype == F32 else "GGML blocks"
            raise ModelFileError(f"{path}: tensor {name!r} is {layout[name][0]}, expected {dtype} ({kind})")
    model = GPT(config, threads=threads, init=False)
    try:  # straight into the model's buffer: loading costs one copy of the weights (cllm.tensor_files)
        tensor_files.read_into(path, model.p.get)
        if quantized:
            model.q = _mapped_blocks(path, quantized)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    for name, view in model.p.items():
        if name not in model.q:  # (a quantized matrix's float32 view is zero, and never touched)
            _check_finite(path, name, view)
    if dequantize:
        model.dequantize()
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


def _matrix_layouts(config: ModelConfig) -> dict[str, tuple[list[int], int]]:
    """Each matrix that may be held quantized: its parts' rows (the GGUF tensors it is made of) and its row length
    (in features; a vocabulary table's dim)."""
    shapes, _ = parameter_shapes(config)
    return {name: ([rows for _, rows in parts], shapes[name][1] if name in VOCABULARY_TABLES else shapes[name][0])
            for name, parts in matrix_parts(config).items()}


def _quantized_parts(path, metadata: dict[str, str], config: ModelConfig
                     ) -> dict[str, tuple[int, list[tuple[gguf.GGMLQuantizationType, tuple[int, int]]]]]:
    """The file's "quantized" metadata checked against the config: for each matrix, its row length and its parts'
    types and (rows, bytes per row); or a ModelFileError naming what is wrong."""
    if "quantized" not in metadata:
        return {}
    try:
        described = json.loads(metadata["quantized"])
    except ValueError:
        raise ModelFileError(f"{path}: metadata field 'quantized' is not valid JSON") from None
    if not isinstance(described, dict):
        raise ModelFileError(f"{path}: metadata field 'quantized' must be a JSON object")
    layouts = _matrix_layouts(config)
    quantized = {}
    for name, matrix in described.items():
        if name not in layouts:
            raise ModelFileError(f"{path}: quantized {name!r} is not a matrix that cllm quantizes")
        rows, cols = layouts[name]
        parts = matrix.get("parts") if isinstance(matrix, dict) else None
        if not isinstance(parts, list) or matrix.get("cols") != cols or \
                [part.get("rows") if isinstance(part, dict) else None for part in parts] != rows:
            raise ModelFileError(f"{path}: quantized {name!r} must be described as parts of {rows} rows of {cols} "
                                 f"columns, got {one_line(json.dumps(matrix))[:200]}")
        quantized[name] = cols, [_part_shape(path, name, part.get("type"), n, cols) for part, n in zip(parts, rows)]
    return quantized


def _part_shape(path, name: str, type_name, rows: int, cols: int
                ) -> tuple[gguf.GGMLQuantizationType, tuple[int, int]]:
    """A part's type, one that cllm's kernels compute on, and its blocks' shape: (rows, bytes per row)."""
    qtype = next((t for t in KERNEL_TYPES if t.name == type_name), None)
    if qtype is None:
        raise ModelFileError(f"{path}: quantized {name!r} has a part of type {str(type_name)[:40]!r}; cllm computes "
                             f"on {', '.join(t.name for t in KERNEL_TYPES)}")
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ModelFileError(f"{path}: quantized {name!r} has rows of {cols} values, not whole {qtype.name} blocks "
                             f"of {block}")
    return qtype, (rows, cols // block * nbytes)


def _mapped_blocks(path, quantized: dict) -> dict[str, QuantizedMatrix]:
    """The quantized matrices as read-only views of the file, memory-mapped (checked by the caller), each part
    packed for the kernels as it is read, and its pages of the file given back (as GGUF's, cllm.formats.gguf_in)."""
    entries, data_start = tensor_files.header(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the descriptor, as mmap does
    matrices = {}
    for name, (cols, parts) in quantized.items():
        rows = []
        for i, (qtype, shape) in enumerate(parts):
            begin, end = entries[f"{name}.{i}"]["data_offsets"]
            data = np.frombuffer(mapping, np.uint8, end - begin, data_start + begin).reshape(shape)
            part = QuantizedRows(qtype, data, cols)
            part.packed  # noqa: B018 (made now, while its pages are read; then they are given back)
            release_pages(mapping, data_start + begin, end - begin)
            rows.append(part)
        matrices[name] = QuantizedMatrix(tuple(rows))
    return matrices


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
    with_tensors=False, each tensor's element type and shape instead of the tensor (any type), and no data is
    read."""
    if not Path(path).exists():
        raise ModelFileError(f"{path}: no such {what} file")
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: not a {what} file (it is a directory or a special file)")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            _check_format(path, metadata, expected_format, what)
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
            if not with_tensors:
                return metadata, {name: (dtype, tuple(f.get_slice(name).get_shape())) for name, dtype in dtypes.items()}
            wrong = {name: dtype for name, dtype in dtypes.items() if dtype != F32}
            if wrong:
                name, dtype = next(iter(wrong.items()))
                raise ModelFileError(f"{path}: tensor {name!r} is {dtype}, expected F32 (float32)")
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

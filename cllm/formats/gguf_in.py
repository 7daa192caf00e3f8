"""GGUF in: a llama.cpp model file of the gpt2, llama, qwen2 or qwen3 architecture, in any of the common tensor
types, as a cllm model and its tokenizer.

The file is read as llama.cpp's converter (and cllm's own exporter, cllm.formats.gguf_file, which follows it) wrote
it, each step undone:

- Settings come from GGUF's own metadata, `{arch}.block_count`, `.embedding_length`, `.feed_forward_length`,
  `.attention.head_count(_kv)`, `.context_length`, the norm's epsilon, `.rope.freq_base` and, for llama and qwen3,
  `.attention.key_length`, the width of a head when it is set apart from embedding_length / head_count (Qwen3's);
  the vocabulary's size from the token embedding. Every other `{arch}.` key is refused by name unless it holds the
  value under which cllm computes the same thing (`rope.scaling.type` "none"), and so are keys that merely restate
  a size cllm derives (`rope.dimension_count`, `attention.value_length`, a qwen2's `attention.key_length`, which
  llama.cpp takes to be embedding_length / head_count) when they disagree with it: never a guess. A sliding
  window or RoPE scaling is such a key. An embedding model's `.pooling_type` (MEAN or LAST, Qwen3-Embedding's)
  becomes the tokenizer's embedding config, as a folder's sentence-transformers files do; another is refused.
- Tensors are named as gguf.TensorNameMap names the Hugging Face tensors that cllm.formats.hf maps onto cllm's
  buffer (`hf_tensors`): each GGUF tensor is written straight into its view of `model.p`, in GGML's (out, in)
  layout. GPT-2's four Conv1D matrices are transposed views. Llama's q and k rows were interleaved for llama.cpp's
  adjacent-pair RoPE; reading puts each row back where `interleave_rotary_pairs` took it from, a reorder of rows.
  qwen2's and qwen3's were not (llama.cpp's NEOX RoPE rotates halves, as cllm's does); qwen2's attn_q, attn_k and
  attn_v biases fill the packed c_attn bias, qwen3's attn_q_norm and attn_k_norm its per-head norms.
  A tied model has no `output.weight`, or one of the same blocks as the embedding (llama.cpp's GPT-2 files repeat
  it there); any other is an untied head, which K-quant mixes give GPT-2 files (the repeat gets a type of its own).
- Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (READ_TYPES). A matrix whose parts are
  all of a type cllm's quantized kernels take (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K) stays in its blocks (`model.q`), a view
  of the memory-mapped file, repacked at load into cllm's layout for the kernels (cllm.quantized). Any other
  tensor, or every one with dequantize=True (training), is dequantized to float32 at load by
  `gguf.quants.dequantize`, the reference, a chunk of rows at a time (a row is whole blocks), from the memory-mapped
  file into the model's buffer: loading holds the model and one chunk. A value that is not finite after
  dequantization is refused, as in a .cllm file.

Nothing is allocated on the metadata's word alone: every tensor's name, type and shape is checked against the
config (and the file's size, by the reader) before the model's buffer exists. Refusals are one line, a
ModelFileError naming the file and the key or tensor.

The tokenizer (tokenizer.ggml.*, the chat template) is cllm.formats.gguf_tokenizer's.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import gguf
import numpy as np

from ..buffers import release_pages
from ..checks import require_int
from ..embedding_config import EmbeddingConfig
from ..errors import UsageError
from ..model import GPT, MAX_CONTEXT_LENGTH, ModelConfig, parameter_shapes
from ..model_file_errors import ModelFileError, few_names, one_line
from ..quantized import KERNEL_TYPES, QuantizedMatrix, QuantizedRows
from ..tokenizer import Tokenizer
from .gguf_file import CONV1D, interleave_rotary_pairs, matrix_parts, paired_rope_heads, tensor_name_map
from .gguf_tokenizer import read_gguf_tokenizer
from .hf import hf_tensors

Q = gguf.GGMLQuantizationType
READ_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
MAGIC = b"GGUF"
CHUNK_VALUES = 1 << 20  # float32 values dequantized at a time: 4 MiB, whole rows (at least one)

# The {arch}. keys read into the config, per architecture. llama.cpp sizes a qwen2 model's queries by
# embedding_length, so only llama and qwen3 may set their heads' width apart (attention.key_length).
_LLAMA_KEYS = ("block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
               "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base")
CONFIG_KEYS = {
    "gpt2": ("block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
             "attention.layer_norm_epsilon"),
    "llama": _LLAMA_KEYS + ("attention.key_length",),
    "qwen2": _LLAMA_KEYS,
    "qwen3": _LLAMA_KEYS + ("attention.key_length",),
}
# {arch}. keys that may be present at the value under which cllm computes what llama.cpp does (llama.cpp's
# converters write some of them into files that need nothing more); any other value is refused.
NEUTRAL_VALUES = {"rope.scaling.type": "none", "rope.scaling.factor": 1.0, "expert_count": 0, "expert_used_count": 0}
# An embedding model's pooling (llama.cpp's converter writes it from 1_Pooling/), as cllm.pooling names it
POOLING_TYPE = "pooling_type"
POOLINGS = {gguf.PoolingType.MEAN: "mean", gguf.PoolingType.LAST: "last"}
V = gguf.GGUFValueType
ARRAY, STRING = V.ARRAY, V.STRING
INTEGERS = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
NUMBERS = INTEGERS | {V.FLOAT32, V.FLOAT64}
SCALARS = NUMBERS | {STRING, V.BOOL}
TIED_OUTPUT = "output.weight"  # a tied model's head is its token embedding; llama.cpp's GPT-2 files repeat it here
TOKEN_EMBEDDING = "token_embd.weight"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether path names a GGUF file: by its suffix, or (whatever its name) by its first four bytes."""
    path = Path(path)
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:  # a folder, or nothing there: not for this reader to report
        return False


def load_gguf(path: str | os.PathLike, *, threads: int = 1, dequantize: bool = False) -> tuple[GPT, Tokenizer]:
    """A gpt2, llama, qwen2 or qwen3 GGUF file as a cllm model and its tokenizer; ModelFileError, naming the file
    and the key or tensor, for anything cllm would not compute as llama.cpp does.

    Matrices of the types cllm's kernels compute on (cllm.quantized.KERNEL_TYPES) stay in their blocks, in
    `model.q`, as views of the memory-mapped file (q and k of a llama are copies, their rows put back in cllm's
    order); with dequantize=True, or of another type, they are widened to float32. Biases and norms are float32
    whatever their type in the file."""
    path = Path(path)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = read_config(reader, path, tensors)
    layout = _ggml_layout(_shapes_only(config))
    _check_tensors(path, tensors, layout, config)
    tokenizer = read_gguf_tokenizer(reader, path)
    tokenizer.embedding = _embedding_config(reader, path, config.arch)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFileError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but {TOKEN_EMBEDDING} only "
                             f"{config.vocab_size} rows")
    # The metadata is read. The reader keeps three numpy objects a token of the vocabulary (~100 MB for SmolLM2's):
    # dropped before the model's buffer exists, they stay out of the peak.
    reader.fields.clear()
    model = GPT(config, threads=threads, init=False)
    kept = {} if dequantize else _kept_quantized(model, tensors, layout, reader.mapping)
    model.q = {name: matrix for name, (matrix, _) in kept.items()}
    in_blocks = {gguf_name for _, gguf_names in kept.values() for gguf_name in gguf_names}
    try:
        for name, destination in _ggml_layout(model).items():
            if name not in in_blocks:
                read_tensor_into(tensors[name], destination.view, row_order=destination.row_order,
                                 mapping=reader.mapping)
    except ValueError as e:  # read_tensor_into's refusal of a non-finite value
        raise ModelFileError(f"{path}: {e}") from None
    return model, tokenizer


def _kept_quantized(model: GPT, tensors: dict, layout: dict[str, _Destination], mapping: mmap.mmap
                    ) -> dict[str, tuple[QuantizedMatrix, tuple[str, ...]]]:
    """The matrices whose every part is of a type the kernels take, as QuantizedMatrix (with their parts' GGUF
    names): views of the file's blocks, or for q and k, whose rows the file interleaves, copies in cllm's order.

    Each part is packed for the kernels here, as it is read, and its pages of the file given back: the packed copy
    is what products read, and the blocks are read again only for a token's embedding row or an export."""
    kept = {}
    for name, parts in matrix_parts(model.config).items():
        gguf_names = tuple(gguf_name for gguf_name, _ in parts)
        if not all(tensors[part].tensor_type in KERNEL_TYPES for part in gguf_names):
            continue
        rows = []
        for gguf_name in gguf_names:
            tensor = tensors[gguf_name]
            blocks = tensor.data.reshape(-1, tensor.data.shape[-1])
            order = layout[gguf_name].row_order
            if order is not None:  # file row r is row order[r]
                reordered = np.empty_like(blocks)
                reordered[order] = blocks
                blocks = reordered
            part = QuantizedRows(tensor.tensor_type, blocks, int(tensor.shape[0]))
            part.packed  # noqa: B018 (made now, while the part's pages are read)
            release_pages(mapping, tensor.data_offset, tensor.n_bytes)
            rows.append(part)
        kept[name] = (QuantizedMatrix(tuple(rows)), gguf_names)
    return kept


def quantized_types(path: str | os.PathLike) -> list[str]:
    """The block-quantized types (GGML's names: Q4_K, Q6_K, ...) of a GGUF file's tensors, which a model loaded to
    train (dequantize=True) widens: none for a file of floats."""
    return sorted({t.tensor_type.name for t in open_gguf(Path(path)).tensors if t.tensor_type not in FLOAT_TYPES})


# --------------------------------------------------------------------------------------------------------------
# the file and its settings


class _Reader(gguf.GGUFReader):
    """gguf's reader, reading its memory map (`data`) in two other ways:

    - through a plain ndarray view of it, not the np.memmap itself, every slice of which runs two Python methods
      of numpy's: the header's vocabulary, three slices a token, is read 2.5 times as fast;
    - a read past the end of the file is an error. The reader slices the map, and a slice past the end is merely
      short: a truncated file then fails later with a message about a reshape, and an array whose length the file
      claims to be 2^60 is read, element by empty element, forever.
    """

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap) -> None:  # GGUFReader.__init__ maps the file here first
        self.mapping = mapped.base  # the file's mmap.mmap
        self._data = mapped.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        values = super()._get(offset, dtype, count, override_order)
        if len(values) != int(count):
            raise ValueError(f"the file ends at byte {len(self.data):,}, inside its header or a tensor's data")
        return values

    def _build_fields(self, offs: int, count: int) -> int:
        """The metadata, as gguf's reader builds it but for arrays of scalars and strings (a vocabulary, its merges
        and token types: a few hundred thousand items), which are read whole here rather than an item at a time
        (three numpy objects a token there): loading SmolLM2's file took 1.3 s in this alone."""
        if self.byte_order != "I":
            return super()._build_fields(offs, count)
        for _ in range(int(count)):
            start = offs
            (key,), offs = self._strings(offs, 1)
            (kind,) = self._get(offs, np.uint32)
            offs += 4
            if kind != ARRAY:
                size, parts, indices, types = self._get_field_parts(offs, kind)
                key_parts = [np.array([len(key)], np.uint64), np.frombuffer(key, np.uint8), np.array([kind], np.uint32)]
                self._push_field(gguf.ReaderField(start, key.decode("utf-8"), key_parts + parts,
                                                  [i + len(key_parts) for i in indices], types), skip_sum=True)
                offs += size
                continue
            item, length = int(self._get(offs, np.uint32)[0]), int(self._get(offs + 4, np.uint64)[0])
            offs += 12
            if item == STRING:
                items, offs = self._strings(offs, length)
            elif item in gguf.GGUFReader.gguf_scalar_to_np:
                dtype = gguf.GGUFReader.gguf_scalar_to_np[gguf.GGUFValueType(item)]
                if length > (len(self.data) - offs) // np.dtype(dtype).itemsize:
                    raise ValueError(f"the file ends at byte {len(self.data):,}, inside the array {key!r}")
                items = self._get(offs, dtype, length)
                offs += items.nbytes
            else:  # arrays of arrays, which no model file cllm reads holds
                raise ValueError(f"{key.decode('utf-8', 'replace')!r} is an array of {gguf.GGUFValueType(item).name}")
            self._push_field(_ArrayField(start, key.decode("utf-8"), [items], range(length),
                                         [ARRAY, gguf.GGUFValueType(item)]), skip_sum=True)
        return offs

    def _strings(self, offs: int, count: int) -> tuple[list[bytes], int]:
        """count GGUF strings (a 64-bit length, then the bytes) from offs, and the offset past them."""
        end = len(self.data)
        if count > (end - offs) // 8:  # every string takes 8 bytes at least
            raise ValueError(f"the file ends at byte {end:,}, before the {count:,} strings it claims")
        strings, mapping, length = [], self.mapping, struct.Struct("<Q").unpack_from
        for _ in range(count):
            if offs + 8 > end:
                raise ValueError(f"the file ends at byte {end:,}, inside its header")
            (n,) = length(mapping, offs)
            if n > end - offs - 8:
                raise ValueError(f"the file ends at byte {end:,}, inside a string of {n:,} bytes")
            strings.append(mapping[offs + 8:offs + 8 + n])
            offs += 8 + n
        return strings, offs


class _ArrayField(gguf.ReaderField):
    """An array's items in one part (parts[0]: a list of bytes for strings, else an ndarray); data is range(n), so
    len(field.data) counts the items as gguf's own fields do. contents() decodes as gguf's does."""

    def contents(self, index_or_slice=slice(None)):
        chosen = self.parts[0][index_or_slice]
        if self.types[-1] != STRING:
            return chosen.tolist()
        if isinstance(index_or_slice, int):
            return str(chosen, encoding="utf-8")
        return [str(raw, encoding="utf-8") for raw in chosen]


def open_gguf(path: Path) -> _Reader:
    """The file's header read and its data memory-mapped (nothing is read until used); ModelFileError if it is not
    a GGUF file that this reader can take."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a model file (it is a directory or a special file)")
    try:
        reader = _Reader(path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        # gguf's reader raises these for a bad magic, version, type id, duplicate name or truncation
        raise ModelFileError(f"{path}: not a readable GGUF file ({one_line(e)})") from None
    if reader.byte_order != "I":  # the reader swaps the header's numbers, never the tensors' blocks
        raise ModelFileError(f"{path}: a GGUF file of the other byte order (big-endian), which cllm does not read")
    return reader


def read_config(reader: gguf.GGUFReader, path: Path, tensors: dict) -> ModelConfig:
    """The file's architecture and settings as cllm's ModelConfig, or a refusal naming the key."""
    general_type = _value(reader, path, "general.type", {STRING})
    if general_type not in (None, "model"):
        raise ModelFileError(f"{path}: general.type is {general_type!r}, not \"model\": cllm reads models only")
    splits = _value(reader, path, "split.count", INTEGERS)
    if splits not in (None, 1):
        raise ModelFileError(f"{path}: part of a GGUF split into {splits} files; merge them first "
                             f"(llama-gguf-split --merge)")
    arch = _value(reader, path, "general.architecture", {STRING})
    if arch not in CONFIG_KEYS:
        found = "missing" if arch is None else repr(arch)
        *others, last = CONFIG_KEYS
        raise ModelFileError(f"{path}: general.architecture is {found}; cllm reads the {', '.join(others)} and "
                             f"{last} architectures")
    setting = {key: _value(reader, path, f"{arch}.{key}", NUMBERS) for key in CONFIG_KEYS[arch]}
    n_layers = _int(path, f"{arch}.block_count", setting["block_count"])
    # Every layer has tensors of its own: the layers are bounded so before parameter_shapes lists each one's.
    if n_layers > len(tensors):
        raise ModelFileError(f"{path}: {arch}.block_count is {n_layers:,}, but the file holds only "
                             f"{len(tensors):,} tensors")
    embedding = tensors.get(TOKEN_EMBEDDING)
    if embedding is None:
        raise ModelFileError(f"{path}: missing tensor {TOKEN_EMBEDDING}")
    if len(embedding.shape) != 2:
        raise ModelFileError(f"{path}: tensor {TOKEN_EMBEDDING!r} has {len(embedding.shape)} dimensions, expected 2")
    dim = _int(path, f"{arch}.embedding_length", setting["embedding_length"])
    hidden = _int(path, f"{arch}.feed_forward_length", setting["feed_forward_length"])
    shape = dict(vocab_size=int(embedding.shape[-1]),  # GGML lists the row length first: (dim, vocab)
                 context_length=_int(path, f"{arch}.context_length", setting["context_length"],
                                     maximum=MAX_CONTEXT_LENGTH),
                 dim=dim, n_layers=n_layers, n_heads=_int(path, f"{arch}.attention.head_count",
                                                          setting["attention.head_count"]))
    if arch == "gpt2":
        if hidden % dim:
            raise ModelFileError(f"{path}: gpt2.feed_forward_length ({hidden}) is not a multiple of "
                                 f"gpt2.embedding_length ({dim}), as cllm's GPT-2 MLP width is")
        fields = dict(mlp_ratio=hidden // dim, activation="gelu_tanh", tied_head=_tied_head(tensors, reader.mapping),
                      # llama.cpp's gpt2 GELU is the tanh form
                      norm_eps=_positive(path, "gpt2.attention.layer_norm_epsilon",
                                         setting["attention.layer_norm_epsilon"]))
    else:
        kv_heads, theta, key_length = (setting.get(key) for key in ("attention.head_count_kv", "rope.freq_base",
                                                                      "attention.key_length"))
        fields = dict(arch=arch, intermediate_size=hidden, tied_head=_tied_head(tensors, reader.mapping),
                      n_kv_heads=None if kv_heads is None else _int(path, f"{arch}.attention.head_count_kv", kv_heads),
                      norm_eps=_positive(path, f"{arch}.attention.layer_norm_rms_epsilon",
                                         setting["attention.layer_norm_rms_epsilon"]),
                      # absent, RoPE's base is 10000 in llama.cpp as in cllm
                      rope_theta=10000.0 if theta is None else _positive(path, f"{arch}.rope.freq_base", theta),
                      # absent, a head is embedding_length / head_count wide in llama.cpp as in cllm
                      head_dim=None if key_length is None else _int(path, f"{arch}.attention.key_length", key_length))
    try:
        config = ModelConfig(**shape, **fields)
    except UsageError as e:
        raise ModelFileError(f"{path}: {e}") from None
    _check_other_settings(reader, path, config)
    return config


def _tied_head(tensors: dict[str, gguf.ReaderTensor], mapping: mmap.mmap) -> bool:
    """Whether the head is the token embedding: the file has no output.weight, or one of the same blocks (llama.cpp's
    GPT-2 converter repeats the embedding there; its K-quant mixes then give the repeat a type of its own, and
    the file a head of its own). The two are compared a chunk of rows at a time, each chunk's pages given back."""
    output, embedding = tensors.get(TIED_OUTPUT), tensors[TOKEN_EMBEDDING]
    if output is None:
        return True
    if output.tensor_type != embedding.tensor_type or output.data.shape != embedding.data.shape:
        return False
    ours, theirs = (t.data.reshape(-1, t.data.shape[-1]) for t in (output, embedding))
    rows = max(1, CHUNK_VALUES // ours.shape[1])
    for start in range(0, ours.shape[0], rows):
        same = np.array_equal(ours[start:start + rows], theirs[start:start + rows])
        for tensor in (output, embedding):
            release_pages(mapping, tensor.data_offset + start * ours.shape[1], ours[start:start + rows].nbytes)
        if not same:
            return False
    return True


def _restated(config: ModelConfig) -> dict[str, tuple[int, str]]:
    """The {arch}. keys that restate a size the config implies: the value each must have, and why."""
    if config.head_dim is not None:
        heads = f"its heads are attention.key_length = {config.head_size} wide"
    else:
        whose = "llama.cpp's qwen2 heads are" if config.arch == "qwen2" else "its heads are"
        heads = f"{whose} embedding_length / head_count = {config.head_size} wide"
    restated = {"vocab_size": (config.vocab_size, f"{TOKEN_EMBEDDING} has {config.vocab_size} rows"),
                "attention.key_length": (config.head_size, heads), "attention.value_length": (config.head_size, heads)}
    if config.arch == "gpt2":
        restated["attention.head_count_kv"] = (config.n_heads, "GPT-2 has a key/value head per head")
    else:
        restated["rope.dimension_count"] = (config.head_size, f"its RoPE rotates whole heads, and {heads}")
    return restated


def _check_other_settings(reader: gguf.GGUFReader, path: Path, config: ModelConfig) -> None:
    """Every {arch}. key that the config was not read from must restate it, or hold the value under which cllm
    computes what llama.cpp does; any other is refused by name."""
    arch = config.arch
    restated = _restated(config)
    for key, field in reader.fields.items():
        name = key[len(arch) + 1:]
        if not key.startswith(f"{arch}.") or name in CONFIG_KEYS[arch] or name == POOLING_TYPE:
            continue
        if name in restated:
            found = _value(reader, path, key, INTEGERS)
            if found != restated[name][0]:
                raise ModelFileError(f"{path}: {key} is {found}, which cllm does not compute ({restated[name][1]})")
            continue
        value = _value(reader, path, key, SCALARS) if field.types[0] != ARRAY else None
        if name not in NEUTRAL_VALUES or value != NEUTRAL_VALUES[name]:
            shown = f"an array of {len(field.data)}" if field.types[0] == ARRAY else repr(value)
            raise ModelFileError(f"{path}: {key} = {shown} is a setting that cllm does not compute")


def _embedding_config(reader: gguf.GGUFReader, path: Path, arch: str) -> EmbeddingConfig | None:
    """An embedding model's pooling, from {arch}.pooling_type as llama.cpp's converter writes it (Qwen3-Embedding's
    LAST), unit length as llama.cpp gives every pooled embedding; None for a file that declares no pooling."""
    key = f"{arch}.{POOLING_TYPE}"
    value = _value(reader, path, key, INTEGERS)
    if value in (None, gguf.PoolingType.NONE):
        return None
    if value not in POOLINGS:
        shown = gguf.PoolingType(value).name if value in iter(gguf.PoolingType) else value
        raise ModelFileError(f"{path}: {key} = {shown} is a pooling that cllm does not compute (it pools MEAN or "
                             f"LAST)")
    return EmbeddingConfig(pooling=POOLINGS[value])


def _value(reader: gguf.GGUFReader, path: Path, key: str, types: set):
    """A scalar metadata value of one of types, or None if the file has no such key."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types[0] not in types:
        kind = "an array" if field.types[0] == ARRAY else f"a {field.types[0].name}"
        raise ModelFileError(f"{path}: {key} is {kind}, expected {' or '.join(sorted(t.name for t in types))}")
    value = field.contents()
    if field.types[0] == gguf.GGUFValueType.FLOAT32:
        # the shortest decimal that is this float32, which is the one its writer rounded: 1e-05, not 9.99999974e-06
        value = float(str(np.float32(value)))
    return value


def _int(path: Path, key: str, value, *, maximum: int | None = None) -> int:
    if value is None:
        raise ModelFileError(f"{path}: no {key} in the file's metadata")
    try:
        return require_int(key, value, maximum=maximum)
    except UsageError as e:
        raise ModelFileError(f"{path}: {e}") from None


def _positive(path: Path, key: str, value) -> float:
    if value is None:
        raise ModelFileError(f"{path}: no {key} in the file's metadata")
    if not 0 < value < math.inf:
        raise ModelFileError(f"{path}: {key} must be a positive number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------------------
# the tensors


@dataclass(frozen=True)
class _Destination:
    """Where a GGUF tensor's values go: a view of the model's buffer in GGML's layout ((out, in) for a matrix,
    as GGML's rows are), and, for q and k, which row of the view each of the file's rows is (None: the same)."""
    view: np.ndarray
    row_order: np.ndarray | None = None


def _ggml_layout(model) -> dict[str, _Destination]:
    """Every GGUF tensor name of the model's architecture and where its values go: the inverse of what
    cllm.formats.gguf_file writes."""
    cfg = model.config
    names = tensor_name_map(cfg.arch, cfg.n_layers)
    layout = {}
    for hf_name, view in hf_tensors(model).items():
        order = None
        if cfg.arch == "gpt2" and hf_name.endswith(CONV1D):
            view = view.T  # GPT-2's (in, out) Conv1D as GGML's (out, in)
        elif (heads := paired_rope_heads(cfg, hf_name)) is not None:
            # the writer's own interleaving, applied to row numbers: file row r is row order[r] of the view
            order = interleave_rotary_pairs(np.arange(view.shape[0])[:, None], heads)[:, 0]
        layout[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = _Destination(view, order)
    return layout


def _shapes_only(config: ModelConfig) -> SimpleNamespace:
    """A stand-in for a model of config whose parameters are zero-stride views of one float: hf_tensors and
    _ggml_layout give every tensor's shape from it before the model's buffer is allocated."""
    shapes, _ = parameter_shapes(config)
    return SimpleNamespace(config=config, p={name: np.broadcast_to(np.float32(0), shape)
                                             for name, shape in shapes.items()})


def _check_tensors(path: Path, tensors: dict, layout: dict[str, _Destination], config: ModelConfig) -> None:
    """Exactly the tensors of the config's model (and a GPT-2's repeated head), each of a type cllm reads and of the
    shape the config gives it."""
    expected = dict(layout)
    if config.tied_head:  # a repeat of the embedding, if the file has one (_tied_head)
        expected[TIED_OUTPUT] = layout[TOKEN_EMBEDDING]
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise ModelFileError(f"{path}: unexpected tensors for a {config.arch} model: {few_names(unexpected)}")
    missing = [name for name in layout if name not in tensors]
    if missing:
        raise ModelFileError(f"{path}: missing tensors {few_names(missing)}")
    for name, tensor in tensors.items():
        if tensor.tensor_type not in READ_TYPES:
            raise ModelFileError(f"{path}: tensor {name!r} is {tensor.tensor_type.name}; cllm reads "
                                 f"{', '.join(t.name for t in READ_TYPES)}")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists the row length first
        if shape != expected[name].view.shape:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {shape}, expected {expected[name].view.shape} "
                                 f"(rows, row length)")


def dequantized_chunks(tensor: gguf.ReaderTensor, chunk_values: int = CHUNK_VALUES, *,
                       mapping: mmap.mmap | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The tensor's values as float32 (rows, row length) chunks of whole rows, each with its first row: each chunk
    gguf.quants.dequantize of the file's blocks for those rows, read from the memory map as it goes.

    mapping, the file's memory map, has each chunk's pages given back once the chunk is used: pages of a mapped
    file count in the process's memory until then, so reading every tensor would hold the file beside the model."""
    blocks = tensor.data.reshape(-1, tensor.data.shape[-1])  # a row of values is a row of whole blocks
    rows = max(1, chunk_values // int(tensor.shape[0]))
    for start in range(0, blocks.shape[0], rows):
        raw = blocks[start:start + rows]
        yield start, gguf.quants.dequantize(raw, tensor.tensor_type)
        if mapping is not None:
            release_pages(mapping, tensor.data_offset + start * blocks[0].nbytes, raw.nbytes)



def read_tensor_into(tensor: gguf.ReaderTensor, destination: np.ndarray, *, row_order: np.ndarray | None = None,
                     chunk_values: int = CHUNK_VALUES, mapping: mmap.mmap | None = None) -> None:
    """Dequantizes the tensor into destination (float32, its shape, any strides), a chunk of rows at a time; with
    row_order, file row r goes to row row_order[r]. ValueError if a value is not finite. mapping as for
    dequantized_chunks."""
    rows = np.atleast_2d(destination)
    for start, values in dequantized_chunks(tensor, chunk_values, mapping=mapping):
        if not np.isfinite(values).all():
            raise ValueError(f"tensor {tensor.name!r} holds non-finite values (NaN or inf)")
        where = slice(start, start + len(values)) if row_order is None else row_order[start:start + len(values)]
        rows[where] = values

"""Safetensors files read straight into buffers that already exist, and written from views of them.

`safetensors` itself maps the file and hands out a copy of each tensor. Loading a 124M-parameter model that way
holds three copies at its peak: the model's buffer, the copy, and the mapped file's pages, which count in the
process's resident memory until the file is closed. Here each tensor is read with plain reads into the place it
goes, so loading costs the model's memory and one tensor more at most: a tensor that cannot land as its bytes
are (float16 or bfloat16, widened; or a destination laid out otherwise, such as a transposed view or one slice of
a bigger matrix) goes through a buffer of its own size.

Writing is the mirror image: each tensor is made contiguous (a copy only if it is a view laid out otherwise) and
written on its own, so saving a model whose file layout differs from its memory layout never holds a second copy
of the model, as `safetensors.numpy.save_file`, which takes contiguous tensors only, would need.

The file is opened with `safetensors` first, which validates the header (a corrupt or truncated file raises
SafetensorError there); the data offsets are then taken from that header, as the format defines them: an 8-byte
little-endian header length, the header's JSON, then the data.
"""
from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO, Callable

import numpy as np

# The element types read, as the numpy type their bytes are read as. bfloat16, which numpy lacks, is the upper
# half of a float32, so its 16 bits widen exactly by a shift.
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
HEADER_ALIGNMENT = 8  # the data starts 8-byte aligned, as safetensors writes it: the header is padded with spaces


def header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """The tensors' entries (dtype, shape, data_offsets) and where the data starts. Call it on a file that
    safetensors has opened without error."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries, 8 + length


def read_into(path: str | os.PathLike, destination: Callable[[str], np.ndarray | None]) -> None:
    """For each tensor of the file, in file order, reads it into destination(name), a float32 array (or view, of
    any strides) of the tensor's shape, or skips it if that returns None. The tensors must be of DTYPES (checked
    by the caller, which also checks the shapes)."""
    entries, data_start = header(path)
    with open(path, "rb", buffering=0) as f:
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            target = destination(name)
            if target is None:
                continue
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            direct = dtype == np.float32 and target.flags.c_contiguous
            staging = target if direct else np.empty(target.shape, dtype)
            if staging.nbytes != end - begin:
                raise ValueError(f"tensor {name!r} holds {end - begin} bytes, its shape needs {staging.nbytes}")
            f.seek(data_start + begin)
            _read_exactly(f, staging, name)
            if not direct:
                _widen_into(target, staging)


def _read_exactly(f: BinaryIO, buffer: np.ndarray, name: str) -> None:
    view, done = memoryview(buffer.reshape(-1)).cast("B"), 0
    while done < buffer.nbytes:  # a read may return less than asked
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"tensor {name!r} is cut short: the file ends inside it")
        done += got


def _widen_into(target: np.ndarray, staging: np.ndarray) -> None:
    """target (float32) = staging's values, exactly: float32 or float16 as numpy converts them, bfloat16 (read as
    uint16) shifted into the upper half of each float32's bits."""
    if staging.dtype == np.uint16:
        np.left_shift(staging, 16, out=target.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(target, staging)


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (float32 arrays, or views of any strides) to a safetensors file at path, one at a time."""
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype != np.float32:
            raise ValueError(f"tensor {name!r} is {tensor.dtype}; only float32 is written")
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    if metadata:
        entries["__metadata__"] = metadata
    encoded = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            f.write(memoryview(np.ascontiguousarray(tensor).reshape(-1)).cast("B"))

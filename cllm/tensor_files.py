"""Reading a safetensors file's tensors straight into buffers that already exist.

`safetensors` itself maps the file and hands out a copy of each tensor. Loading a 124M-parameter model that way
holds three copies at its peak: the model's buffer, the copy, and the mapped file's pages, which count in the
process's resident memory until the file is closed. Here each tensor is read with plain reads into the place it
goes (a float16 one through a buffer of its own size, to widen it), so loading costs the model's memory and
nothing more.

The file is opened with `safetensors` first, which validates the header (a corrupt or truncated file raises
SafetensorError there); the data offsets are then taken from that header, as the format defines them: an 8-byte
little-endian header length, the header's JSON, then the data.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16}


def header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """The tensors' entries (dtype, shape, data_offsets) and where the data starts. Call it on a file that
    safetensors has opened without error."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries, 8 + length


def read_into(path: str | os.PathLike, destination: Callable[[str], np.ndarray | None]) -> None:
    """For each tensor of the file, in file order, reads it into destination(name), a C-contiguous float32 array
    of the tensor's shape, or skips it if that returns None. The tensors must be F32 or F16 (checked by the
    caller, which also checks the shapes)."""
    entries, data_start = header(path)
    with open(path, "rb", buffering=0) as f:
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            target = destination(name)
            if target is None:
                continue
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            staging = target if dtype == np.float32 else np.empty(target.shape, dtype)
            if staging.nbytes != end - begin:
                raise ValueError(f"tensor {name!r} holds {end - begin} bytes, its shape needs {staging.nbytes}")
            f.seek(data_start + begin)
            view, done = memoryview(staging.reshape(-1)).cast("B"), 0
            while done < staging.nbytes:  # a read may return less than asked
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"tensor {name!r} is cut short: the file ends inside it")
                done += got
            if staging is not target:
                np.copyto(target, staging)

"""Aligned flat float32 buffers carved into named views.

Parameters, gradients and activations each live in one allocation. Every view starts on a 64-byte boundary,
so vectorised loops see the same alignment on every run and every thread count: their results are
bit-reproducible.
"""
from __future__ import annotations

import math
import mmap

import numpy as np

ALIGN_FLOATS = 16  # 64 bytes


def aligned_zeros(n: int, dtype=np.float32) -> np.ndarray:
    """A zeroed 1-D array of n elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n + 64 // itemsize, dtype=dtype)
    offset = (-raw.ctypes.data % 64) // itemsize
    return raw[offset : offset + n]


def lazy_zeros(n: int, dtype=np.float32) -> np.ndarray:
    """A zeroed 1-D array of n elements whose memory is committed a 4 KiB page at a time, as it is first written
    (page-aligned, so 64-byte-aligned too). For a buffer that fills slowly, a KV cache: numpy asks the kernel for
    transparent huge pages on large arrays, and then a first write anywhere in a 2 MiB span commits all of it,
    so a cache of SmolLM2's shape held its whole context (94 MB) after a 128-token prompt. An anonymous mapping of
    our own gets no such advice."""
    itemsize = np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(n * itemsize, 1)), dtype=dtype, count=n)


def carve(buffer: np.ndarray, shapes: dict[str, tuple[int, ...]], *, pad: bool) -> dict[str, np.ndarray]:
    """Views into `buffer`, one per named shape, in order. With pad, each view starts on a 64-byte boundary."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = buffer[offset : offset + size].reshape(shape)
        offset += _padded(size) if pad else size
    return views


def carved_size(shapes: dict[str, tuple[int, ...]], *, pad: bool) -> int:
    return sum(_padded(math.prod(s)) if pad else math.prod(s) for s in shapes.values())


def _padded(size: int) -> int:
    return -(-size // ALIGN_FLOATS) * ALIGN_FLOATS


def release_pages(mapping: mmap.mmap, begin: int, nbytes: int) -> None:
    """Gives back the pages of a memory-mapped file that hold bytes begin:begin + nbytes: a mapped file's pages
    count in the process's memory until then (they are read from the file again if ever used again)."""
    page = begin - begin % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, page, begin + nbytes - page)

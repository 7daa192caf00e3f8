"""Aligned flat float32 buffers carved into named views.

Parameters, gradients and activations each live in one allocation. Every view starts on a 64-byte boundary,
so vectorised loops see the same alignment on every run and every thread count: their results are
bit-reproducible.
"""
from __future__ import annotations

import math

import numpy as np

ALIGN_FLOATS = 16  # 64 bytes


def aligned_zeros(n: int, dtype=np.float32) -> np.ndarray:
    """A zeroed 1-D array of n elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n + 64 // itemsize, dtype=dtype)
    offset = (-raw.ctypes.data % 64) // itemsize
    return raw[offset : offset + n]


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

"""Block-quantized weight matrices, held in memory as GGML's blocks and multiplied by cllm's quantized kernels.

A quantized matrix is a storage type, not a new model: `GPT.q` maps a parameter name (GPT-2's names, as `GPT.p`)
to a QuantizedMatrix, and the forward pass and the decoding step multiply by it instead of the float32 view,
which stays zero and untouched (its pages are never committed). Vectors (norms, biases) and GPT-2's position
table stay float32; training needs float32 weights (GPT.dequantize).

Every quantized matrix is in GGML's orientation whatever the float32 view's is: a row per output feature, its
values along the input features, in whole blocks of its type. A matrix may be a stack of parts of different types
(a Llama's q | k | v, or gate | up, whose GGUF tensors a K-quant mix types apart), each part a QuantizedRows.

The types the kernels compute on (cllm._kernels.quantized):
    Q8_0  blocks of 32: float16 d, 32 int8 q                                    w = d q
    Q4_0  blocks of 32: float16 d, 16 bytes of 4-bit q (j: low nibble of byte j, j + 16: its high nibble)
                                                                                w = d (q - 8)
    Q5_0  blocks of 32: float16 d, 4 bytes of high bits (bit j for value j), 16 bytes of low nibbles as Q4_0's
                                                                                w = d (q - 16)
    Q4_K  super-blocks of 256: float16 d, float16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes
          of 4-bit q (each 64 values: 32 bytes, low nibbles the first 32, high nibbles the next)
                                                                                w = d scale_j q - dmin min_j
    Q6_K  super-blocks of 256: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per
          16 values), float16 d                                                 w = d scale_j (q - 32)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import gguf
import numpy as np

from .formats.quantize import quantize

Q = gguf.GGMLQuantizationType
KERNEL_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q6_K)


@dataclass(frozen=True)
class QuantizedRows:
    """`rows` rows of `cols` values in GGML blocks of ggml_type: data is uint8 (rows, bytes per row), C-contiguous,
    possibly a read-only view of a memory-mapped file."""
    ggml_type: Q
    data: np.ndarray
    cols: int

    def __post_init__(self):
        if self.ggml_type not in KERNEL_TYPES:
            raise ValueError(f"no quantized kernel for {self.ggml_type.name}; they take "
                             f"{', '.join(t.name for t in KERNEL_TYPES)}")
        block, nbytes = gguf.GGML_QUANT_SIZES[self.ggml_type]
        if self.cols <= 0 or self.cols % block:
            raise ValueError(f"a {self.ggml_type.name} row is whole blocks of {block} values, not {self.cols}")
        want = self.cols // block * nbytes
        data = self.data
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != want or not data.flags.c_contiguous:
            raise ValueError(f"{self.ggml_type.name} rows of {self.cols} values are C-contiguous uint8 (rows, {want}), "
                             f"got {data.dtype} {data.shape}")

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @cached_property
    def packed(self) -> np.ndarray | None:
        """The rows in cllm's packed layout (8 rows interleaved, cllm/_kernels/quants.h), which the SIMD kernels
        multiply: made on first use, a copy the size of the blocks; None for a type or a part too small to pack."""
        from ._kernels.quantized import pack  # the kernels import this module's types

        return pack(self.ggml_type.name, self.data, self.cols)

    def dequantize(self) -> np.ndarray:
        """The float32 (rows, cols) values: gguf.quants.dequantize, the reference."""
        return gguf.quants.dequantize(self.data, self.ggml_type).reshape(self.rows, self.cols)


@dataclass(frozen=True)
class QuantizedMatrix:
    """A weight matrix (out features, in features) as a stack of row parts, in order."""
    parts: tuple[QuantizedRows, ...]

    def __post_init__(self):
        if not self.parts or len({part.cols for part in self.parts}) != 1:
            raise ValueError("a quantized matrix is one or more row parts of the same row length")

    @classmethod
    def of(cls, *parts: QuantizedRows) -> QuantizedMatrix:
        return cls(tuple(parts))

    @property
    def shape(self) -> tuple[int, int]:
        return sum(part.rows for part in self.parts), self.parts[0].cols

    @property
    def nbytes(self) -> int:
        return sum(part.data.nbytes for part in self.parts)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(part.ggml_type.name for part in self.parts)

    def dequantize(self) -> np.ndarray:
        """The float32 (out, in) matrix."""
        return np.concatenate([part.dequantize() for part in self.parts])


def quantize_rows(values: np.ndarray, ggml_type: Q) -> QuantizedRows:
    """values (rows, cols) float32 as GGML blocks of ggml_type (cllm.formats.quantize's quantizers, llama.cpp's)."""
    values = np.ascontiguousarray(values, np.float32)
    return QuantizedRows(ggml_type, quantize(values, ggml_type), values.shape[1])

"""cllm's own quantizer: float32 rows as GGML's blocks, and which GGML type each tensor of a model gets.

The quantizers compute what llama.cpp's reference quantizers compute (ggml-quants.c, the ones `llama-quantize` runs
when it has no importance matrix), so that a file cllm writes holds the blocks llama.cpp would have written:

- Q8_0, Q4_0 and Q5_0 (one float16 scale per 32 values) are the `gguf` package's own `gguf.quants.quantize`,
  which reproduces `quantize_row_q8_0_ref` and its siblings bit for bit (given no -0.0, which is made +0.0 first).
- Q4_K and Q6_K, which `gguf` does not quantize, are ported here to numpy, vectorised over blocks:
  `quantize_row_q4_K_ref` fits each 32 values' scale and minimum by `make_qkx2_quants` (a least-squares refit of
  the 4-bit levels over 21 trial scales, weighted towards the larger values), then rounds the eight scales and
  minima to 6 bits against the super-block's float16 d and dmin; `quantize_row_q6_K_ref` fits each 16 values'
  signed scale by `make_qx_quants` (19 trial scales, weighted by x^2), then rounds the sixteen scales to 8 bits
  against a float16 d. The port keeps the C code's float32 arithmetic in its order: each operation rounded to
  float32 as C rounds it, sums accumulated term by term from the first (np.add.accumulate, never numpy's pairwise
  np.sum), `nearest_int`'s add-1.5*2^23 rounding (ties to even) and the float16 conversions of the scales, so
  the blocks are llama.cpp's bit for bit (tools/check_quantize.py compares them with `llama-quantize`'s). That
  holds where ggml's reference code is compiled without fused multiply-adds, as it is for x86-64's baseline.

The type rule (`tensor_type`) is llama.cpp's `llama_tensor_get_type` for the file types cllm writes, over GGUF's
tensor names, so that the GGUF writer and the .cllm writer give every tensor the same type:

- q8_0 and q4_0: every matrix of that type, except that in q4_0 the head (`output`, or a tied `token_embd`) is Q6_K.
- q4_k_m: Q4_K matrices; Q6_K for the head and for `attn_v` (GPT-2's `attn_qkv`) and `ffn_down` in the layers
  where llama.cpp's `use_more_bits` holds (the first and last eighth, and every third between).
- A row length that is not whole blocks of the chosen type falls back as llama.cpp's does: Q4_K to Q5_0, Q6_K to
  Q8_0 (a head of the q4_k_m mix goes to Q8_0 at once), and a 32-value type to F16 when the rows are not whole
  32s either. SmolLM2-135M's width, 576, is not a multiple of 256: most of its q4_k_m matrices are Q5_0.
- Vectors (norms, biases) and GPT-2's position table stay F32, as llama.cpp leaves them.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# llama.cpp's file types that cllm writes, each with its default tensor type
FILE_TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k_m": Q.Q4_K}
FLOAT_FILE_TYPES = {"f32": Q.F32, "f16": Q.F16}
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}  # for rows that are not whole super-blocks of 256
QK_K = 256
CHUNK_VALUES = 1 << 20  # values quantized at a time: a few dozen MiB of temporaries however big the tensor
LAYER = re.compile(r"blk\.(\d+)\.")
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's: a group whose largest magnitude is below it is all zero


def quantize(values: np.ndarray, ggml_type: Q) -> np.ndarray:
    """values, float32 (rows, cols), as uint8 (rows, bytes per row) of ggml_type's blocks (F32 and F16: their bytes);
    the row length must be whole blocks."""
    values = np.ascontiguousarray(values, np.float32)
    if values.ndim != 2:
        raise ValueError(f"quantize takes (rows, cols) values, got shape {values.shape}")
    rows, cols = values.shape
    block, nbytes = gguf.GGML_QUANT_SIZES[ggml_type]
    if cols % block:
        raise ValueError(f"a {ggml_type.name} row is whole blocks of {block} values, not {cols}")
    out = np.empty((rows, cols // block * nbytes), np.uint8)
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for start in range(0, rows, step):
        chunk = values[start:start + step]
        if block > 1:
            # -0.0 as +0.0: ggml looks for a block's largest magnitude from +0, gguf from the block's first value,
            # which gives an all-zero block holding a -0.0 a scale of the other sign
            chunk = chunk + F32(0)
        if ggml_type in (Q.Q4_K, Q.Q6_K):
            blocks = (_q4_k if ggml_type == Q.Q4_K else _q6_k)(chunk.reshape(-1, QK_K))
        else:
            blocks = gguf.quants.quantize(chunk, ggml_type)
        out[start:start + step] = blocks.reshape(len(chunk), -1).view(np.uint8)
    return out


# --------------------------------------------------------------------------------------------------------------
# the rule


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, *, n_layers: int, tied: bool) -> Q:
    """The GGML type of the GGUF tensor `name` of shape (rows, row length) in a file of file_type (f32, f16, or one of
    FILE_TYPES), as llama.cpp's quantizer chooses it for a model of n_layers whose head is its token embedding if
    tied (no output.weight)."""
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight") or name.startswith(
            "position_embd."):
        return Q.F32
    if file_type in FLOAT_FILE_TYPES:
        return FLOAT_FILE_TYPES[file_type]
    qtype = FILE_TYPES[file_type]
    cols = shape[-1]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % _block(qtype):
            qtype = Q.Q8_0
        elif qtype != Q.Q8_0:
            qtype = Q.Q6_K
    elif file_type == "q4_k_m" and name.endswith(("attn_v.weight", "attn_qkv.weight", "ffn_down.weight")):
        # one of each per layer, so llama.cpp's running count of them is the layer's number
        if _use_more_bits(int(LAYER.match(name).group(1)), n_layers):
            qtype = Q.Q6_K
    if cols % _block(qtype):
        qtype = FALLBACK.get(qtype, qtype)
        if cols % _block(qtype):
            qtype = Q.F16
    return qtype


def _block(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in a K-quant mix."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


# --------------------------------------------------------------------------------------------------------------
# the K-quants, as ggml-quants.c computes them (in float32, in its order)



def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the float32 sum with 1.5 * 2^23 leaves the integer in the low mantissa bits (ties to
    even), as int32."""
    biased = (values.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (biased & 0x007FFFFF) - 0x00400000


def _serial_sum(terms: np.ndarray) -> np.ndarray:
    """Each row's float32 sum taken term by term from the first, as a C loop adds (np.sum would add pairwise)."""
    return np.add.accumulate(terms, axis=1, dtype=F32)[:, -1]


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (use_mad false) on each row of x (groups, n): (levels 0..nmax, scale, minus the minimum),
    x ~ scale * level - min. The minimum is at most 0; of nstep + 1 trial scales, the least-squares refit of scale
    and minimum with the smallest weighted squared error wins."""
    lowest, highest = x.min(axis=1), x.max(axis=1)
    sum_w = _serial_sum(weights)
    sum_x = _serial_sum(weights * x)
    lowest = np.where(lowest > 0, F32(0), lowest)
    flat = highest == lowest
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (highest - lowest)
        scale = F32(1) / iscale
        levels = np.clip(_nearest_int(iscale[:, None] * (x - lowest[:, None])), 0, nmax).astype(F32)
        diff = scale[:, None] * levels + lowest[:, None] - x
        best_error = _serial_sum(weights * (diff * diff))
        for step in range(nstep + 1):
            # from the minimum of the best fit so far, as the C loop goes on with it
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (highest - lowest)
            trial = np.clip(_nearest_int(iscale[:, None] * (x - lowest[:, None])), 0, nmax).astype(F32)
            wl = weights * trial
            sum_l, sum_l2, sum_xl = _serial_sum(wl), _serial_sum(wl * trial), _serial_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, F32(0), this_min)
            diff = this_scale[:, None] * trial + this_min[:, None] - x
            error = _serial_sum(weights * (diff * diff))
            better = (det > 0) & (error < best_error) & ~flat
            levels = np.where(better[:, None], trial, levels)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale)
            lowest = np.where(better, this_min, lowest)
    levels[flat] = 0
    scale = np.where(flat, F32(0), scale)
    return levels, scale, -lowest


def _q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: super-blocks (n, 256) as (n, 144) bytes: d, dmin, 12 bytes of 6-bit scales and mins,
    128 of 4-bit levels."""
    n = len(x)
    groups = x.reshape(n * 8, 32)
    av_x = np.sqrt(_serial_sum(groups * groups) / F32(32))
    weights = av_x[:, None] + np.abs(groups)
    levels, scales, mins = _make_qkx2_quants(groups, weights, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    # the largest of them, or 0 (the C loop's start) if none is positive
    max_scale = np.maximum(scales.max(axis=1), F32(0)) + F32(0)
    max_min = np.maximum(mins.max(axis=1), F32(0)) + F32(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        # nearest_int's int kept in a uint8 (wrapping, as the C assignment does) before the cap at 63
        ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
        d, dmin = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
        group_d = d.astype(F32)[:, None] * ls.astype(F32)
        group_m = dmin.astype(F32)[:, None] * lm.astype(F32)
        # the levels again against the rounded scales and minima; a group whose scale rounds to 0 keeps its fit's
        refit = np.clip(_nearest_int((x.reshape(n, 8, 32) + group_m[..., None]) / group_d[..., None]), 0, 15)
    levels = np.where((group_d != 0)[..., None], refit, levels.reshape(n, 8, 32)).astype(np.uint8)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    pairs = levels.reshape(n, 4, 2, 32)  # each 64 values: the first 32 in the low nibbles, the next in the high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, qs], axis=1)


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1 (weights x^2) on each row of x (groups, n): (levels 0..2 nmax - 1, scale),
    x ~ scale * (level - nmax); the scale's sign makes the value of largest magnitude -nmax levels. Of 19 trial
    scales the one whose least-squares refit explains most of the weighted x wins."""
    rows = np.arange(len(x))
    peak = x[rows, np.abs(x).argmax(axis=1)]  # the first value of the largest magnitude, signed
    zero = np.abs(peak) < GROUP_MAX_EPS
    weights = x * x
    weighted = weights * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):

        def fit(iscale):
            level = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
            return level, _serial_sum(weighted * level), _serial_sum(weights * level * level)

        level, sum_lx, sum_l2 = fit(F32(-nmax) / peak)
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
        best = scale * sum_lx
        levels = level
        for step in range(-9, 10):
            if step == 0:
                continue
            level, sum_lx, sum_l2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            levels = np.where(better[:, None], level, levels)
            scale = np.where(better, sum_lx / sum_l2, scale)
            best = np.where(better, scale * sum_lx, best)
    levels = (levels + F32(nmax)).astype(np.int32)
    levels[zero] = 0
    return levels, np.where(zero, F32(0), scale)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: super-blocks (n, 256) as (n, 210) bytes: 128 of low nibbles, 64 of high 2-bit pairs,
    16 int8 scales, d."""
    n = len(x)
    levels, scales = _make_qx_quants(x.reshape(n * 16, 16), nmax=32)
    scales = scales.reshape(n, 16)
    max_scale = scales[np.arange(n), np.abs(scales).argmax(axis=1)]  # the first of the largest magnitude, signed
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d = (F32(1) / iscale).astype(np.float16)
        # nearest_int's int kept in an int8 (wrapping, as the C assignment does) after the cap at 127
        group_scales = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
        group_d = d.astype(F32)[:, None] * group_scales.astype(F32)
        refit = np.clip(_nearest_int(x.reshape(n, 16, 16) / group_d[..., None]), -32, 31) + 32
    levels = np.where((group_d != 0)[..., None], refit, levels.reshape(n, 16, 16)).astype(np.uint8)
    quarters = levels.reshape(n, 2, 4, 32)  # each 128 values: four runs of 32
    low = quarters & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = quarters >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), group_scales.view(np.uint8),
                             d.reshape(n, 1).view(np.uint8)], axis=1)
    blocks[zero] = 0  # an all-zero super-block: every byte 0, as ggml's memset leaves it
    return blocks

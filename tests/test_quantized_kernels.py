"""The quantized matrix kernels of issue 22 (cllm._kernels.quantized) against float64 numpy references.

The weights are real GGML blocks: Q8_0, Q4_0 and Q5_0 quantized by gguf.quants from random float rows (magnitudes
from 1e-3 to 1e3, so that some scales are float16 subnormals; an all-zero block; blocks whose largest value is
negative; Q8_0 codes of -128, which gguf never writes but the format allows), Q4_K and Q6_K written as random
valid bytes (gguf cannot quantize them; every byte pattern is a valid block), with an all-zero super-block and
extreme codes and scales. gguf.quants.dequantize gives the weights W of the reference, in float64.

matmul is held to two references:
  (a) the product of W with the quantized activations x_hat = q * d that quantize_activations returns, in float64.
      The kernel forms exact integer dot products per scale group of 16 values (GGML's smallest) and sums the
      groups in float32, so it may err by (groups + SLACK) float32 roundings of the magnitude
      |x_hat| @ |W|.T + |bias|, where a Q4_K weight counts as |d scale q| + |dmin min| (the format's two terms,
      which llama.cpp too sums apart), and groups = cols / 16;
  (b) the product with the exact activations x: (a)'s bound plus the activation quantization's own,
      sum_k |W[r, k]| * |x[i, k] - x_hat[i, k]| <= (|W| @ (d / 2 per value).T)[i, r].
quantize_activations is itself checked against the rule d = max|x| / 127 per block of 32, q = round(x / d).
Outputs start out NaN, so that an element the kernel does not write, or adds onto, shows up. (a) holds too for
weights near zero, codes at their type's offset (a trained model's most weights): the offset is the codes', to be
taken out exactly, not a float beside a sum it would cancel.

Every ISA path this CPU supports runs every check (a path the CPU cannot run is skipped, with the reason), and
agrees with the portable "scalar" path to (a)'s bound (not bit for bit: their summation orders differ). One path
gives the same bits for threads = 1, 2, 3 and 8, and for the same call twice. A matrix of parts of different
types gives the bits of its parts' products side by side. dequantize_rows (the embedding lookup) gives
gguf.quants.dequantize's rows exactly. Bad calls raise ValueError at the boundary.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from cllm.quantized import QuantizedMatrix, QuantizedRows

Q = gguf.GGMLQuantizationType
ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")  # the kernel module's paths, portable first
U = 2.0 ** -24  # float32's unit roundoff
SLACK = 8  # roundings per product beyond one per group: scales, the integer sums' conversions, the bias
ROUNDING = 2.0 ** -12  # |x / d - q| <= 1/2 + this: x / d itself is a float32 of at most 127.5
f32, f64 = np.float32, np.float64

BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q5_0)  # blocks of 32, quantized by gguf
K_TYPES = (Q.Q4_K, Q.Q6_K)  # super-blocks of 256, written as random bytes
TYPES = BLOCK_TYPES + K_TYPES
NS = (1, 2, 3, 5, 8, 16, 17, 64)
ROWS = (1, 7, 33, 100)
COLS = {Q.Q8_0: (32, 96, 576, 768), Q.Q4_0: (32, 96, 576, 768), Q.Q5_0: (32, 96, 576, 768),
        Q.Q4_K: (256, 768), Q.Q6_K: (256, 768)}
THREADS = (1, 2, 3, 8)


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def qk():
    """The kernel module; a module that fails to import makes the tests error, not skip."""
    from cllm._kernels import quantized

    return quantized


@pytest.fixture
def keep_isa(qk):
    """Restores the path that was active before the test."""
    before = qk.active_isa()
    yield
    qk.use_isa(before)


@pytest.fixture(params=ISAS)
def isa(request, qk, keep_isa):
    """Each path in turn, active for the test."""
    if request.param not in qk.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path (it supports {', '.join(qk.supported_isas())})")
    qk.use_isa(request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# weights


class Weights:
    """A QuantizedMatrix with its float64 reference W = gguf's dequantization, and the magnitude |W| that the
    kernel's float32 rounding is measured against (for Q4_K, |d scale q| + |dmin min|)."""

    def __init__(self, parts: list[QuantizedRows]):
        self.matrix = QuantizedMatrix.of(*parts)
        self.w = np.concatenate([gguf_dequantize(p.data, p.ggml_type, p.cols) for p in parts])
        self.magnitude = np.concatenate([magnitude(p) for p in parts])
        self.rows, self.cols = self.w.shape


def gguf_dequantize(data, qtype, cols):
    return gguf.quants.dequantize(data, qtype).reshape(data.shape[0], cols).astype(f64)


def magnitude(part: QuantizedRows):
    w = np.abs(gguf_dequantize(part.data, part.ggml_type, part.cols))
    if part.ggml_type != Q.Q4_K:
        return w
    blocks = part.data.reshape(part.rows, -1, 144)
    scaled, minimum = blocks.copy(), blocks.copy()
    scaled[..., 2:4] = 0  # dmin = 0: d scale q
    minimum[..., 0:2] = 0  # d = 0: -dmin min
    return (np.abs(gguf_dequantize(scaled.reshape(part.data.shape), Q.Q4_K, part.cols))
            + np.abs(gguf_dequantize(minimum.reshape(part.data.shape), Q.Q4_K, part.cols)))


def block_rows(rng, qtype, rows, cols):
    """gguf's quantization of random rows of magnitudes 1e-3 to 1e3, with an all-zero block and blocks whose
    largest value is negative (Q4_0 and Q5_0 take d = max / -8 or -16 of the signed extreme)."""
    values = rng.standard_normal((rows, cols // 32, 32)) * 10.0 ** rng.uniform(-3, 3, (rows, 1, 1))
    values[0, 0] = 0.0
    values[-1, -1] = -np.abs(values[-1, -1])  # every value negative
    if cols >= 64:
        values[0, 1, 5] = -4.0 * np.abs(values[0, 1]).max()  # a lone negative extreme
    if rows >= 3:
        values[rows // 2, 0, 31] = 4.0 * np.abs(values[rows // 2, 0]).max()  # a lone positive extreme
    data = gguf.quants.quantize(values.reshape(rows, cols).astype(f32), qtype)
    if qtype == Q.Q8_0 and rows >= 2:
        data = data.copy()
        data[1, 2:34:3] = 0x80  # codes of -128: valid Q8_0, if not gguf's own output
    return data


def k_rows(rng, qtype, rows, cols):
    """Random valid Q4_K or Q6_K super-blocks: random bytes for the codes and the packed scales, float16 scales of
    magnitudes 1e-2 to 1e1 over a row's largest value (some negative), an all-zero super-block, extremes."""
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, nbytes), dtype=np.uint8)
    size = 10.0 ** rng.uniform(-2, 1, (rows, 1, 1)) * rng.uniform(0.25, 1.0, (rows, cols // 256, 1))
    sign = np.where(rng.random((rows, cols // 256, 1)) < 0.1, -1.0, 1.0)
    if qtype == Q.Q4_K:  # d, dmin, 12 bytes of (scale, min) pairs, 128 bytes of nibbles
        blocks[..., 0:2] = (sign * size / (63 * 15)).astype(np.float16).view(np.uint8)
        blocks[..., 2:4] = (size / (63 * 15) * rng.uniform(0, 8, size.shape)).astype(np.float16).view(np.uint8)
        blocks[0, 0, 0:4] = 0  # d = dmin = 0
        blocks[-1, -1, 4:16] = 0xFF  # every scale and min 63
        blocks[-1, -1, 16:80] = 0x00  # codes 0: -dmin 63
        blocks[-1, -1, 80:144] = 0xFF  # codes 15: 15 d 63 - dmin 63
    else:  # 128 bytes of low nibbles, 64 of high pairs, 16 int8 scales, d
        blocks[..., 208:210] = (sign * size / (128 * 32)).astype(np.float16).view(np.uint8)
        blocks[0, 0, 208:210] = 0  # d = 0
        blocks[-1, -1, 0:192] = 0  # codes -32
        blocks[-1, -1, 192:208] = 0x80  # scales -128
    return blocks.reshape(rows, -1)


@functools.lru_cache(maxsize=None)
def weights(types: tuple[Q, ...], rows: tuple[int, ...], cols: int, seed: int = 0) -> Weights:
    rng = np.random.default_rng([seed, cols, *rows, *types])
    parts = []
    for qtype, n in zip(types, rows):
        data = (block_rows if qtype in BLOCK_TYPES else k_rows)(rng, qtype, n, cols)
        data.setflags(write=False)  # as a memory-mapped file's
        parts.append(QuantizedRows(qtype, data, cols))
    return Weights(parts)


def single(qtype, rows, cols):
    return weights((qtype,), (rows,), cols)


# ---------------------------------------------------------------------------------------------------------------
# activations and references


@functools.lru_cache(maxsize=None)
def activations(n: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random rows of magnitudes 1e-2 to 1e2, blocks a further 1e-1 to 1e1 apart, a block whose largest value is
    negative (the last) and an all-zero block (the first, where it is not the last)."""
    rng = np.random.default_rng([seed, n, cols])
    x = (rng.standard_normal((n, cols // 32, 32)) * 10.0 ** rng.uniform(-2, 2, (n, 1, 1))
         * 10.0 ** rng.uniform(-1, 1, (n, cols // 32, 1)))
    x[-1, -1, 7] = -3.0 * np.abs(x[-1, -1]).max()
    if n * cols > 32:
        x[0, 0] = 0.0
    x = np.ascontiguousarray(x.reshape(n, cols).astype(f32))
    x.setflags(write=False)
    return x


def bias_for(rows, seed=0):
    return np.random.default_rng([seed, rows, 7]).standard_normal(rows).astype(f32)


def expand(d):
    """Per-block scales (n, cols / 32) as per-value (n, cols), in float64."""
    return np.repeat(np.asarray(d, f64), 32, axis=1)


def float32_bound(xhat, w: Weights, bias):
    """(a)'s bound on the kernel's float32 rounding."""
    mag = np.abs(xhat) @ w.magnitude.T
    if bias is not None:
        mag = mag + np.abs(bias.astype(f64))
    return (w.cols // 16 + SLACK) * U * mag


def nans(*shape):
    return np.full(shape, np.nan, dtype=f32)


def run(qk, x, w: Weights, bias=None, threads=1):
    out = nans(x.shape[0], w.rows)
    qk.matmul(x, w.matrix, out, bias, threads=threads)
    return out


def check_product(qk, x, w: Weights, bias=None, threads=1):
    """matmul against (a) and (b); returns the output and the largest error over each bound."""
    out = run(qk, x, w, bias, threads)
    q, d = qk.quantize_activations(x)
    xhat = q.astype(f64) * expand(d)
    b64 = 0.0 if bias is None else bias.astype(f64)
    bound_a = float32_bound(xhat, w, bias)
    err_a = np.abs(out - (xhat @ w.w.T + b64))
    assert np.all(err_a <= bound_a), where(err_a, bound_a, "against the quantized activations")
    bound_b = (expand(d) * (0.5 + ROUNDING)) @ np.abs(w.w).T + bound_a
    err_b = np.abs(out - (x.astype(f64) @ w.w.T + b64))
    assert np.all(err_b <= bound_b), where(err_b, bound_b, "against the exact activations")
    return out, ratio(err_a, bound_a), ratio(err_b, bound_b)


def ratio(err, bound):
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(bound > 0, err / bound, np.where(err > 0, np.inf, 0.0))
    return float(r.max())


def where(err, bound, what):
    bad = np.argwhere(~(err <= bound))
    i, r = bad[0]
    return (f"{what}: {len(bad)} elements over the bound, first out[{i}, {r}]: error {err[i, r]:.3g} > "
            f"bound {bound[i, r]:.3g}, {ratio(err, bound):.3g} times the bound at the worst")


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# the paths


def test_isa_list(qk, keep_isa):
    assert tuple(qk.ISAS) == ISAS
    supported = tuple(qk.supported_isas())
    assert supported[0] == "scalar"
    assert all(name in ISAS for name in supported)
    assert list(supported) == sorted(supported, key=ISAS.index)
    assert qk.active_isa() in supported
    for name in supported:
        qk.use_isa(name)
        assert qk.active_isa() == name
    for name in ("sse2", "", "AVX2"):
        with pytest.raises(ValueError):
            qk.use_isa(name)
    for name in set(ISAS) - set(supported):
        with pytest.raises(ValueError):
            qk.use_isa(name)


def active_in_child(**env):
    code = "from cllm._kernels import quantized as q; print(q.active_isa(), ','.join(q.supported_isas()))"
    environ = {k: v for k, v in os.environ.items() if k != "CLLM_ISA"} | env
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    active, supported = result.stdout.split()
    return active, tuple(supported.split(","))


def test_default_isa_is_the_best_and_cllm_isa_caps_it(qk):
    active, supported = active_in_child()
    assert active == supported[-1]
    for cap in supported:
        assert active_in_child(CLLM_ISA=cap)[0] == cap


# ---------------------------------------------------------------------------------------------------------------
# quantize_activations


@pytest.mark.parametrize("n, cols", [(1, 32), (3, 96), (17, 768), (64, 576)])
def test_quantize_activations_follows_the_rule(qk, isa, n, cols):
    x = activations(n, cols)
    q, d = qk.quantize_activations(x)
    assert q.dtype == np.int8 and q.shape == (n, cols)
    assert d.dtype == f32 and d.shape == (n, cols // 32)
    blocks = np.abs(x.astype(f64)).reshape(n, cols // 32, 32)
    want_d = blocks.max(axis=2) / 127
    np.testing.assert_allclose(d, want_d, rtol=2 * U, atol=0)
    assert np.all((q >= -127) & (q <= 127))
    scale = expand(d)
    err = np.abs(x.astype(f64) - q.astype(f64) * scale)
    assert np.all(err <= scale * (0.5 + ROUNDING))
    # q = round(x / d) itself, but where x / d is within ROUNDING of a half (a tie either way is the rule)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale > 0, x.astype(f64) / scale, 0.0)
    clear = np.abs(np.abs(t - np.trunc(t)) - 0.5) > 4 * ROUNDING
    assert np.array_equal(q[clear], np.round(t[clear]).astype(np.int8))
    assert q[-1, -32 + 7] == -127  # the negative extreme
    if n * cols > 32:
        assert np.all(q[0, :32] == 0) and d[0, 0] == 0  # the all-zero block


# ---------------------------------------------------------------------------------------------------------------
# matmul


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_against_the_references(qk, isa, qtype):
    """Every n, cols and rows: (a) and (b), with and without bias, out written whole (it starts NaN)."""
    for cols in COLS[qtype]:
        for rows in ROWS:
            w = single(qtype, rows, cols)
            for k, n in enumerate(NS):
                check_product(qk, activations(n, cols), w, bias_for(rows) if k % 2 else None)


def near_zero_rows(rng, qtype, rows, cols):
    """Weights as a trained model's mostly are: small beside their block's largest. Their codes sit at the type's
    offset (8, 16, 32 for Q4_0, Q5_0, Q6_K), or where Q4_K's d scale q meets its dmin min, so a product that
    carried the offset as a float next to the codes would cancel."""
    if qtype in BLOCK_TYPES:
        values = rng.standard_normal((rows, cols)) * 0.01
        values[:, ::32] = 3.0  # one large value a block
        return gguf.quants.quantize(values.astype(f32), qtype)
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, nbytes), dtype=np.uint8)
    size = (10.0 ** rng.uniform(-2, 0, (rows, cols // 256, 1))).astype(np.float16)
    if qtype == Q.Q4_K:
        blocks[..., 0:2] = size.view(np.uint8)  # d
        blocks[..., 2:4] = (size * 7.5).astype(np.float16).view(np.uint8)  # dmin: w = 63 (d q - 7.5 d), q 7 or 8
        blocks[..., 4:16] = 0xFF  # scales and mins 63
        blocks[..., 16:144] = np.where(rng.random((rows, cols // 256, 128)) < 0.5, 0x78, 0x87)
    else:
        blocks[..., 0:128] = (rng.random((rows, cols // 256, 128)) < 0.1) * 0x11  # low nibbles 0, some 1
        blocks[..., 128:192] = 0xAA  # high bits 2: codes 32 (w = 0), some 33
        blocks[..., 208:210] = size.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_on_weights_near_zero(qk, isa, qtype):
    """(a)'s bound is relative to the product's own size |x_hat| @ |W|.T, not to the codes' before their offset is
    taken out: the offset belongs in the integer sums (as the scalar path has it)."""
    rng = np.random.default_rng([qtype, 5])
    for cols in COLS[qtype]:
        data = near_zero_rows(rng, qtype, 33, cols)
        data.setflags(write=False)
        w = Weights([QuantizedRows(qtype, data, cols)])
        for n in (1, 17):
            check_product(qk, activations(n, cols), w)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bias_is_added_once(qk, isa, qtype):
    cols = COLS[qtype][1]
    w, x, bias = single(qtype, 33, cols), activations(5, cols), bias_for(33)
    plain, with_bias = run(qk, x, w), run(qk, x, w, bias)
    np.testing.assert_allclose(with_bias, plain.astype(f64) + bias, rtol=2 * U, atol=0)


MIXED = [
    ((Q.Q4_K, Q.Q6_K, Q.Q8_0), (5, 7, 3)),
    ((Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q6_K), (1, 17, 4, 9)),
    ((Q.Q6_K, Q.Q6_K, Q.Q4_K), (16, 1, 33)),
]


@pytest.mark.parametrize("types, rows", MIXED, ids=lambda v: "-".join(getattr(t, "name", str(t)) for t in v))
def test_matrix_of_parts_is_its_parts_side_by_side(qk, isa, types, rows):
    cols = 512
    w, bias = weights(types, rows, cols), bias_for(sum(rows))
    for n in (1, 3, 16):
        x = activations(n, cols)
        out, _, _ = check_product(qk, x, w, bias)
        starts = np.cumsum((0,) + rows)[:-1]
        alone = [run(qk, x, Weights([part]), bias[s:s + part.rows].copy()) for part, s in zip(w.matrix.parts, starts)]
        assert same_bits(out, np.concatenate(alone, axis=1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_threads_give_the_same_bits(qk, isa, qtype):
    cols = COLS[qtype][-1]
    w, bias = single(qtype, 100, cols), bias_for(100)
    for n in (1, 17):
        x = activations(n, cols)
        first = run(qk, x, w, bias, threads=1)
        assert same_bits(first, run(qk, x, w, bias, threads=1))
        for threads in THREADS[1:]:
            assert same_bits(first, run(qk, x, w, bias, threads=threads)), f"threads={threads}, n={n}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_isa_agrees_with_scalar(qk, keep_isa, qtype):
    cols = COLS[qtype][-1]
    w, bias = single(qtype, 33, cols), bias_for(33)
    x = activations(17, cols)
    qk.use_isa("scalar")
    scalar = run(qk, x, w, bias)
    q0, d0 = qk.quantize_activations(x)
    xhat = q0.astype(f64) * expand(d0)
    bound = float32_bound(xhat, w, bias)
    for name in qk.supported_isas()[1:]:
        qk.use_isa(name)
        q, d = qk.quantize_activations(x)
        assert np.array_equal(q, q0) and same_bits(d, d0), f"{name} quantizes the activations otherwise"
        err = np.abs(run(qk, x, w, bias).astype(f64) - scalar)
        assert np.all(err <= bound), where(err, bound, f"{name} against scalar")


def test_read_only_weights_and_activations(qk, isa):
    """The weights may be a read-only memory map, and the activations a read-only array (every weight and
    activation in this file is read-only; this names it)."""
    w, x = single(Q.Q4_K, 7, 256), activations(3, 256)
    assert not w.matrix.parts[0].data.flags.writeable and not x.flags.writeable
    check_product(qk, x, w)


def test_nonfinite_activations(qk, isa):
    """NaN or inf in a row of x: no crash, and the other rows are right. Nothing is asserted of the rows that hold
    them (a NaN, an inf, or the value dropped are all possible)."""
    w = single(Q.Q8_0, 7, 96)
    x = activations(5, 96).copy()
    x[1, 3] = np.nan
    x[3, 40] = np.inf
    x[4, 70] = -np.inf
    out = run(qk, x, w)
    finite = [0, 2]
    clean = np.ascontiguousarray(x[finite])
    check_product(qk, clean, w)
    q, d = qk.quantize_activations(clean)
    xhat = q.astype(f64) * expand(d)
    err = np.abs(out[finite] - xhat @ w.w.T)
    bound = float32_bound(xhat, w, None)
    assert np.all(err <= bound), where(err, bound, "the finite rows beside non-finite ones")


# ---------------------------------------------------------------------------------------------------------------
# dequantize_rows


@pytest.mark.parametrize("types, rows", MIXED[:2] + [((t,), (9,)) for t in TYPES],
                         ids=lambda v: "-".join(getattr(t, "name", str(t)) for t in v))
def test_dequantize_rows_is_gguf_exactly(qk, isa, types, rows):
    cols = 512
    w = weights(types, rows, cols)
    want = np.concatenate([gguf.quants.dequantize(p.data, p.ggml_type).reshape(p.rows, cols)
                           for p in w.matrix.parts])
    total = sum(rows)
    rng = np.random.default_rng(total)
    ids = np.concatenate([np.arange(total), rng.integers(0, total, 2 * total), [total - 1, 0, total - 1]])
    for dtype in (np.int64, np.int32):
        out = nans(len(ids), cols)
        qk.dequantize_rows(w.matrix, ids.astype(dtype), out)
        bad = np.argwhere(out != want[ids])
        assert not len(bad), (f"{len(bad)} values differ ({dtype.__name__} ids), first out[{bad[0][0]}, {bad[0][1]}] "
                              f"(row {ids[bad[0][0]]}): {out[tuple(bad[0])]} != {want[ids][tuple(bad[0])]}")


# ---------------------------------------------------------------------------------------------------------------
# bad calls


def good_call():
    w = single(Q.Q4_0, 7, 96)
    return activations(3, 96).copy(), w.matrix, nans(3, 7), bias_for(7)


def test_matmul_rejects_bad_shapes(qk):
    x, m, out, bias = good_call()
    qk.matmul(x, m, out, bias)  # the good call runs
    with pytest.raises(ValueError, match="x must be"):
        qk.matmul(activations(3, 128).copy(), m, out, bias)
    with pytest.raises(ValueError, match="out must be"):
        qk.matmul(x, m, nans(3, 8), bias)
    with pytest.raises(ValueError, match="out must be"):
        qk.matmul(x, m, nans(4, 7), bias)
    with pytest.raises(ValueError, match="bias must"):
        qk.matmul(x, m, out, bias_for(8))


def test_matmul_rejects_non_contiguous_activations(qk):
    x, m, out, bias = good_call()
    wide = np.zeros((3, 192), f32)
    wide[:, ::2] = x
    with pytest.raises(ValueError, match="contiguous"):
        qk.matmul(wide[:, ::2], m, out, bias)
    with pytest.raises(ValueError, match="contiguous"):
        qk.matmul(np.asfortranarray(x), m, out, bias)


def test_matmul_rejects_non_contiguous_out(qk):
    x, m, out, bias = good_call()
    with pytest.raises(ValueError, match="contiguous"):
        qk.matmul(x, m, nans(3, 14)[:, ::2], bias)


def test_matmul_rejects_bad_dtypes_and_threads(qk):
    x, m, out, bias = good_call()
    with pytest.raises(ValueError, match="dtype"):
        qk.matmul(x.astype(f64), m, out, bias)
    with pytest.raises(ValueError, match="dtype"):
        qk.matmul(x, m, out.astype(f64), bias)
    for threads in (0, -1):
        with pytest.raises(ValueError, match="threads"):
            qk.matmul(x, m, out, bias, threads=threads)


def test_matmul_rejects_too_many_parts(qk):
    """The kernels hold at most a few parts (q | k | v, gate | up): more is refused, not overrun."""
    w = weights((Q.Q8_0,) * 9, (1,) * 9, 32)
    with pytest.raises(ValueError, match="parts"):
        qk.matmul(activations(2, 32), w.matrix, nans(2, 9))
    with pytest.raises(ValueError, match="parts"):
        qk.dequantize_rows(w.matrix, np.array([0]), nans(1, 32))


def test_dequantize_rows_rejects_bad_ids_and_shapes(qk):
    w = single(Q.Q4_0, 7, 96)
    out = nans(2, 96)
    for ids in ([0, 7], [-1, 0], [0, 2 ** 40]):
        with pytest.raises(ValueError, match="out of range"):
            qk.dequantize_rows(w.matrix, np.array(ids, np.int64), out)
    with pytest.raises(ValueError, match="out must be"):
        qk.dequantize_rows(w.matrix, np.array([0, 1, 2], np.int64), out)
    with pytest.raises(ValueError, match="out must be"):
        qk.dequantize_rows(w.matrix, np.array([0, 1], np.int64), nans(2, 64))

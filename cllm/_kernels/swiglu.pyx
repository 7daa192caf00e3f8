# SwiGLU (Llama's MLP) on the output of one fused gate/up projection: gate_up (N, 2H) holds the gate in columns
# [0, H) and up in [H, 2H); out (N, H) = silu(gate) * up, with silu(g) = g / (1 + exp(-g)) (torch's F.silu).
from cython.parallel cimport prange

from ._common cimport CHUNK, cllm_expf, require, require_threads

# swiglu_span, the forward, is in swiglu.pxd, and so is why g is clamped below and why silu is g * sigmoid(g).


cdef inline void swiglu_backward_span(const float* dout, const float* gate, const float* up, float* dgate,
                                      float* dup, Py_ssize_t n, bint accumulate) noexcept nogil:
    """dgate (+)= dout * up * silu'(gate), dup (+)= dout * silu(gate), with sigma = 1 / (1 + exp(-g)),
    silu = g sigma and silu' = sigma (1 + g (1 - sigma)), as torch's silu_backward."""
    cdef float one = 1.0, g_min = -80.0
    cdef Py_ssize_t i
    cdef float g, sig, d
    if accumulate:
        for i in range(n):
            g = gate[i]
            g = g_min if g < g_min else g
            sig = one / (one + cllm_expf(-g))
            d = dout[i]
            dgate[i] += d * up[i] * (sig * (one + g * (one - sig)))
            dup[i] += d * (g * sig)
    else:
        for i in range(n):
            g = gate[i]
            g = g_min if g < g_min else g
            sig = one / (one + cllm_expf(-g))
            d = dout[i]
            dgate[i] = d * up[i] * (sig * (one + g * (one - sig)))
            dup[i] = d * (g * sig)


def swiglu_forward(const float[:, ::1] gate_up not None, float[:, ::1] out not None, *, int threads=1):
    """out (N, H) = silu(gate_up[:, :H]) * gate_up[:, H:], for gate_up (N, 2H)."""
    cdef Py_ssize_t n = gate_up.shape[0], h = gate_up.shape[1] // 2, nchunks, item, r, c
    require_threads(threads)
    require(gate_up.shape[1] % 2 == 0, f"gate_up must be (N, 2H), got an odd width {gate_up.shape[1]}")
    require(out.shape[0] == n and out.shape[1] == h, f"out must be ({n}, {h})")
    if n == 0 or h == 0:
        return
    # Work items are (row, chunk of a row): one long row (decoding) spreads over the threads too.
    nchunks = (h + CHUNK - 1) // CHUNK
    with nogil:
        for item in prange(n * nchunks, num_threads=threads, schedule="static"):
            r = item // nchunks
            c = (item % nchunks) * CHUNK
            swiglu_span(&gate_up[r, c], &gate_up[r, h + c], &out[r, c], min(CHUNK, h - c))


def swiglu_backward(const float[:, ::1] dout not None, const float[:, ::1] gate_up not None,
                    float[:, ::1] dgate_up not None, *, int threads=1, bint accumulate=False):
    """dgate_up[:, :H] = dout * up * silu'(gate) and dgate_up[:, H:] = dout * silu(gate), for dout (N, H) and
    gate_up, dgate_up (N, 2H); with accumulate=True both are added onto dgate_up instead."""
    cdef Py_ssize_t n = gate_up.shape[0], h = gate_up.shape[1] // 2, nchunks, item, r, c
    require_threads(threads)
    require(gate_up.shape[1] % 2 == 0, f"gate_up must be (N, 2H), got an odd width {gate_up.shape[1]}")
    require(dout.shape[0] == n and dout.shape[1] == h, f"dout must be ({n}, {h})")
    require(dgate_up.shape[0] == n and dgate_up.shape[1] == 2 * h, f"dgate_up must be ({n}, {2 * h})")
    if n == 0 or h == 0:
        return
    nchunks = (h + CHUNK - 1) // CHUNK
    with nogil:
        for item in prange(n * nchunks, num_threads=threads, schedule="static"):
            r = item // nchunks
            c = (item % nchunks) * CHUNK
            swiglu_backward_span(&dout[r, c], &gate_up[r, c], &gate_up[r, h + c], &dgate_up[r, c],
                                 &dgate_up[r, h + c], min(CHUNK, h - c), accumulate)

# GELU, tanh form (GPT-2): gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
from cython.parallel cimport prange

import numpy as np

from ._common cimport CHUNK, cllm_tanhf, require, require_threads

# gelu_span, the forward, is in gelu.pxd. As there, the constants are float locals (see why there).


cdef inline float gelu_grad(float v) noexcept nogil:
    cdef float k = 0.7978845608028654, cubic = 0.044715, cubic3 = 3 * 0.044715, half = 0.5, one = 1.0
    cdef float t = cllm_tanhf(k * (v + cubic * v * v * v))
    return half * (one + t) + half * v * (one - t * t) * k * (one + cubic3 * v * v)


cdef inline void gelu_backward_span(const float* dout, const float* x, float* dx, Py_ssize_t n,
                                    bint accumulate) noexcept nogil:
    cdef Py_ssize_t i
    if accumulate:
        for i in range(n):
            dx[i] += gelu_grad(x[i]) * dout[i]
    else:
        for i in range(n):
            dx[i] = gelu_grad(x[i]) * dout[i]


def gelu_forward(x, out, *, int threads=1):
    """out = gelu(x), elementwise over contiguous float32 arrays of equal size."""
    cdef const float[::1] xf = _flat(x)
    cdef float[::1] of = _flat(out)
    cdef Py_ssize_t n = xf.shape[0], c
    require_threads(threads)
    require(of.shape[0] == n, f"out has {of.shape[0]} elements, x has {n}")
    if n == 0:
        return
    with nogil:
        for c in prange(0, n, CHUNK, num_threads=threads, schedule="static"):
            gelu_span(&xf[c], &of[c], min(CHUNK, n - c))


def gelu_backward(dout, x, dx, *, bint accumulate=True, int threads=1):
    """dx += gelu'(x) * dout, or dx = gelu'(x) * dout with accumulate=False."""
    cdef const float[::1] gf = _flat(dout)
    cdef const float[::1] xf = _flat(x)
    cdef float[::1] dxf = _flat(dx)
    cdef Py_ssize_t n = xf.shape[0], c
    require_threads(threads)
    require(gf.shape[0] == n and dxf.shape[0] == n, "dout, x and dx must have the same size")
    if n == 0:
        return
    with nogil:
        for c in prange(0, n, CHUNK, num_threads=threads, schedule="static"):
            gelu_backward_span(&gf[c], &xf[c], &dxf[c], min(CHUNK, n - c), accumulate)


cdef object _flat(a):
    """A 1-D view of a C-contiguous array. Checked first: reshape would silently copy a strided one."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError("gelu needs C-contiguous float32 numpy arrays")
    return a.reshape(-1)

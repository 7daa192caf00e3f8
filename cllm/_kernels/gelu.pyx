# GELU, tanh form (GPT-2): gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
from cython.parallel cimport prange

import numpy as np

from ._common cimport CHUNK, cllm_tanhf, require, require_threads

cdef float SQRT_2_OVER_PI = 0.7978845608028654
cdef float CUBIC = 0.044715


cdef inline void gelu_span(const float* x, float* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float v
    for i in range(n):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + cllm_tanhf(SQRT_2_OVER_PI * (v + CUBIC * v * v * v)))


cdef inline void gelu_backward_span(const float* dout, const float* x, float* dx, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float v, t
    for i in range(n):
        v = x[i]
        t = cllm_tanhf(SQRT_2_OVER_PI * (v + CUBIC * v * v * v))
        dx[i] += (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * v * v)) * dout[i]


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


def gelu_backward(dout, x, dx, *, int threads=1):
    """dx += gelu'(x) * dout."""
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
            gelu_backward_span(&gf[c], &xf[c], &dxf[c], min(CHUNK, n - c))


cdef object _flat(a):
    """A 1-D view of a C-contiguous array. Checked first: reshape would silently copy a strided one."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError("gelu needs C-contiguous float32 numpy arrays")
    return a.reshape(-1)

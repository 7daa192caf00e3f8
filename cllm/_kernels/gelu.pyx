# GELU, tanh form (GPT-2, Hugging Face's gelu_new): gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
# or with exact=True the exact form (Hugging Face's gelu, nanoGPT's): gelu(x) = 0.5 x (1 + erf(x / sqrt 2)).
from cython.parallel cimport prange
from libc.math cimport erfcf, expf

import numpy as np

from ._common cimport CHUNK, cllm_tanhf, require, require_threads

# gelu_span and gelu_erf_span, the forwards, are in gelu.pxd. As there, the constants are float locals (see why
# there).


cdef inline float gelu_grad(float v) noexcept nogil:
    cdef float k = 0.7978845608028654, cubic = 0.044715, cubic3 = 3 * 0.044715, half = 0.5, one = 1.0
    cdef float t = cllm_tanhf(k * (v + cubic * v * v * v))
    return half * (one + t) + half * v * (one - t * t) * k * (one + cubic3 * v * v)


cdef inline float gelu_erf_grad(float v) noexcept nogil:
    """d/dx 0.5 x (1 + erf(x / sqrt 2)) = Phi(x) + x phi(x) = 0.5 erfc(-x / sqrt 2) + x exp(-x^2 / 2) / sqrt(2 pi),
    erfc for the reason given in gelu.pxd."""
    cdef float r = 0.7071067811865476, c = 0.3989422804014327, half = 0.5  # r = 1/sqrt(2), c = 1/sqrt(2 pi)
    return half * erfcf(-v * r) + v * c * expf(-half * v * v)


cdef inline void gelu_backward_span(const float* dout, const float* x, float* dx, Py_ssize_t n,
                                    bint accumulate) noexcept nogil:
    cdef Py_ssize_t i
    if accumulate:
        for i in range(n):
            dx[i] += gelu_grad(x[i]) * dout[i]
    else:
        for i in range(n):
            dx[i] = gelu_grad(x[i]) * dout[i]


# The erf form's loop repeats the tanh form's rather than branching per element: each loop inlines its own gradient
# and vectorises.
cdef inline void gelu_erf_backward_span(const float* dout, const float* x, float* dx, Py_ssize_t n,
                                        bint accumulate) noexcept nogil:
    cdef Py_ssize_t i
    if accumulate:
        for i in range(n):
            dx[i] += gelu_erf_grad(x[i]) * dout[i]
    else:
        for i in range(n):
            dx[i] = gelu_erf_grad(x[i]) * dout[i]


def gelu_forward(x, out, *, bint exact=False, int threads=1):
    """out = gelu(x), elementwise over contiguous float32 arrays of equal size: the tanh form, or with exact=True
    the erf form."""
    cdef const float[::1] xf = _flat(x)
    cdef float[::1] of = _flat(out)
    cdef Py_ssize_t n = xf.shape[0], c
    require_threads(threads)
    require(of.shape[0] == n, f"out has {of.shape[0]} elements, x has {n}")
    if n == 0:
        return
    with nogil:
        for c in prange(0, n, CHUNK, num_threads=threads, schedule="static"):
            if exact:
                gelu_erf_span(&xf[c], &of[c], min(CHUNK, n - c))
            else:
                gelu_span(&xf[c], &of[c], min(CHUNK, n - c))


def gelu_backward(dout, x, dx, *, bint accumulate=True, bint exact=False, int threads=1):
    """dx += gelu'(x) * dout, or dx = gelu'(x) * dout with accumulate=False; gelu is the tanh form, or with
    exact=True the erf form."""
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
            if exact:
                gelu_erf_backward_span(&gf[c], &xf[c], &dxf[c], min(CHUNK, n - c), accumulate)
            else:
                gelu_backward_span(&gf[c], &xf[c], &dxf[c], min(CHUNK, n - c), accumulate)


cdef object _flat(a):
    """A 1-D view of a C-contiguous array. Checked first: reshape would silently copy a strided one."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError("gelu needs C-contiguous float32 numpy arrays")
    return a.reshape(-1)

# The row kernel shared with the fused decoding step (decode.pyx), inline in both.
from libc.math cimport sqrtf


cdef inline void layernorm_row(const float* x, const float* w, const float* b, float* out, float* mean,
                               float* rstd, Py_ssize_t c, float eps) noexcept nogil:
    cdef Py_ssize_t i
    cdef float m = 0.0, v = 0.0, d, s
    for i in range(c):
        m = m + x[i]
    m = m / c
    for i in range(c):
        d = x[i] - m
        v = v + d * d
    s = 1 / sqrtf(v / c + eps)
    for i in range(c):
        out[i] = (x[i] - m) * s * w[i] + b[i]
    mean[0] = m
    rstd[0] = s

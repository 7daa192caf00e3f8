# The row kernel a fused decoding step can share (as decode.pyx shares layernorm_row), inline wherever cimported.
from libc.math cimport sqrtf


cdef inline void rmsnorm_row(const float* x, const float* w, float* out, float* rstd, Py_ssize_t c,
                             float eps) noexcept nogil:
    """out = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps), in the order Hugging Face's LlamaRMSNorm multiplies
    (x * rstd first, then the weight). No mean is subtracted and there is no bias."""
    cdef Py_ssize_t i
    cdef float ss = 0.0, s
    for i in range(c):
        ss = ss + x[i] * x[i]
    s = 1 / sqrtf(ss / c + eps)
    for i in range(c):
        out[i] = x[i] * s * w[i]
    rstd[0] = s

# The forward span shared with the fused decoding step (decode.pyx), inline in both.
from ._common cimport cllm_tanhf


# The constants are float locals, not literals or module globals: a bare literal is a C double, which would
# promote the whole expression to double and halve the vector width, and gcc must reload a global after every
# store through `out` (it might alias).
cdef inline void gelu_span(const float* x, float* out, Py_ssize_t n) noexcept nogil:
    cdef float k = 0.7978845608028654, cubic = 0.044715, half = 0.5, one = 1.0  # k = sqrt(2/pi)
    cdef Py_ssize_t i
    cdef float v
    for i in range(n):
        v = x[i]
        out[i] = half * v * (one + cllm_tanhf(k * (v + cubic * v * v * v)))

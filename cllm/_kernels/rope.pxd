# The rotation shared with the fused decoding step (decode.pyx), inline in both: a decoded token at position p
# is rotated by the very code and table values that rotated row p of a full pass, so it gets the same bits.


cdef inline void rotate_head(float* x, const float* cs, Py_ssize_t half, double sign) noexcept nogil:
    """Rotate one head in place: pair i = (x[i], x[i + half]) by the angle whose (cos, sin) is cs[2i], cs[2i + 1],
    times sign (+1: the forward; -1: the transpose). Negating sin is exact, so both directions use the same values."""
    cdef Py_ssize_t i
    cdef double a, b, c, s
    for i in range(half):
        c = cs[2 * i]
        s = sign * cs[2 * i + 1]
        a = x[i]
        b = x[i + half]
        x[i] = <float>(a * c - b * s)
        x[i + half] = <float>(b * c + a * s)


cdef inline void rotate_row(float* row, const float* cs, Py_ssize_t n_rotated, Py_ssize_t hs,
                            double sign) noexcept nogil:
    """One token: its first n_rotated heads (q's, then k's, which are contiguous) at one position."""
    cdef Py_ssize_t h
    for h in range(n_rotated):
        rotate_head(row + h * hs, cs, hs // 2, sign)

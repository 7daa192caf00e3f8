# Linear layers: y[N,OC] = x[N,C] @ W + b, where W is (C, OC), or (OC, C) with w_transposed=True (the tied LM head
# multiplies by the token embedding, stored (V, C)). The products are gemm()'s (_common.pxd), on `threads` threads.
from ._common cimport column_sum, gemm, linear_rows, require, require_blas_sizes, require_threads


cdef int check_weight(tuple wshape, Py_ssize_t c, Py_ssize_t oc, bint w_transposed) except -1:
    want = (oc, c) if w_transposed else (c, oc)
    return require(wshape == want, f"weight shape {wshape} does not match {want}")


def linear_forward(const float[:, ::1] x, const float[:, ::1] w, const float[::1] b, float[:, ::1] out,
                   *, bint w_transposed=False, int threads=1):
    """out = x @ W + b.  x (N, C), out (N, OC), b (OC,) or None."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], oc = out.shape[1]
    require_threads(threads)
    require(out.shape[0] == n, f"out has {out.shape[0]} rows, x has {n}")
    check_weight((w.shape[0], w.shape[1]), c, oc, w_transposed)
    require(n > 0 and c > 0 and oc > 0, f"empty linear: x {n}x{c}, out features {oc}")
    require(b is None or b.shape[0] == oc, f"bias length must be {oc}")
    require_blas_sizes((n, c, oc), "linear_forward")
    cdef const float* bias = NULL if b is None else &b[0]
    with nogil:
        linear_rows(&x[0, 0], n, c, &w[0, 0], bias, &out[0, 0], oc, w_transposed, threads)


def linear_backward(const float[:, ::1] dout, const float[:, ::1] x, const float[:, ::1] w, float[:, ::1] dx,
                    float[:, ::1] dw, float[::1] db, *, bint w_transposed=False, bint accumulate=True,
                    bint accumulate_dx=True, int threads=1):
    """dx += dout @ W^T (skipped if dx is None), dW += x^T @ dout, db += sum over rows of dout.

    accumulate=False overwrites dW and db instead, and accumulate_dx=False dx: a backward pass then needs no
    zeroed buffers.
    """
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], oc = dout.shape[1]
    require_threads(threads)
    require(dout.shape[0] == n, f"dout has {dout.shape[0]} rows, x has {n}")
    check_weight((w.shape[0], w.shape[1]), c, oc, w_transposed)
    check_weight((dw.shape[0], dw.shape[1]), c, oc, w_transposed)
    require(dx is None or (dx.shape[0] == n and dx.shape[1] == c), f"dx must be ({n}, {c})")
    require(n > 0 and c > 0 and oc > 0, f"empty linear: x {n}x{c}, out features {oc}")
    require(db is None or db.shape[0] == oc, f"db length must be {oc}")
    require_blas_sizes((n, c, oc), "linear_backward")
    cdef float beta = 1.0 if accumulate else 0.0, beta_dx = 1.0 if accumulate_dx else 0.0
    with nogil:
        if w_transposed:  # W is (OC, C)
            if dx is not None:
                gemm(False, False, n, c, oc, &dout[0, 0], oc, &w[0, 0], c, beta_dx, &dx[0, 0], c, threads)
            gemm(True, False, oc, c, n, &dout[0, 0], oc, &x[0, 0], c, beta, &dw[0, 0], c, threads)
        else:  # W is (C, OC)
            if dx is not None:
                gemm(False, True, n, c, oc, &dout[0, 0], oc, &w[0, 0], oc, beta_dx, &dx[0, 0], c, threads)
            gemm(True, False, c, oc, n, &x[0, 0], c, &dout[0, 0], oc, beta, &dw[0, 0], oc, threads)
        if db is not None:
            column_sum(&dout[0, 0], n, oc, &db[0], accumulate, threads)

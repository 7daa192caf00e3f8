"""nogil Cython kernels over raw float32 buffers.

Every public function validates shapes, dtypes and bounds once at the Python boundary and then runs its loop
without the GIL. Backward functions accumulate (+=) into the gradient buffers they are given, so residual
branches add up without copies, or overwrite them (accumulate=False), so that nothing needs zeroing first.
"""

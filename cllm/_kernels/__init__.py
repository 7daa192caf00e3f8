"""nogil Cython kernels over raw float32 buffers.

Every public function validates shapes, dtypes and bounds once at the Python boundary and then runs its loop
without the GIL. Backward functions accumulate (+=) into the gradient buffers they are given, so residual
branches add up without copies, or overwrite them (accumulate=False), so that nothing needs zeroing first.
"""
import importlib.machinery
import importlib.util
import os
import sys

BLAS_BINDINGS = "scipy.linalg.cython_blas"


def path_index(paths: tuple[str, ...], best: int, name: str) -> int:
    """The number of instruction-set path `name` among a kernel's `paths` (portable first), of which this CPU runs
    those up to `best`; ValueError naming them if it is not one of those."""
    supported = paths[:best + 1]
    if name not in supported:
        raise ValueError(f"the {name!r} path is not one this CPU runs: choose one of {', '.join(supported)}")
    return paths.index(name)


def _load_blas_bindings() -> None:
    """Loads scipy's BLAS bindings, which every kernel cimports, without running the scipy.linalg package: that
    imports some 300 modules and holds 25 MB (a third of a quantized model's process before the model), for the
    function pointers the kernels read once. If scipy.linalg is imported later, it finds the bindings loaded
    (`from scipy.linalg import cython_blas` gives them; they are not an attribute of the package until then). Should
    anything differ from what this expects, the usual import runs instead, as the kernels' own."""
    if BLAS_BINDINGS in sys.modules or "scipy.linalg" in sys.modules:
        return
    try:
        import scipy

        spec = importlib.machinery.PathFinder.find_spec(BLAS_BINDINGS, [os.path.join(scipy.__path__[0], "linalg")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[BLAS_BINDINGS] = module
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - the kernels' own import reports what is really wrong
        sys.modules.pop(BLAS_BINDINGS, None)


_load_blas_bindings()

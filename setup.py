"""Builds the Cython kernels in cllm/_kernels with OpenMP.

Flags, and why:
- -O3 -march=native: the build is for the machine it runs on; the kernels want AVX2/FMA.
- -fassociative-math and friends (but not -ffast-math): lets gcc vectorise float reductions such as the
  attention dot products. Reductions still run in one fixed order per build, so results stay bit-identical
  across thread counts. -ffast-math itself is avoided because linking with it sets flush-to-zero for the whole
  process, and -ffinite-math-only would break inf/nan checks.
"""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

KERNEL_DIR = Path(__file__).parent / "cllm" / "_kernels"
KERNELS = sorted(path.stem for path in KERNEL_DIR.glob("*.pyx"))  # all of them
# Every kernel is rebuilt when a C header changes (the build cannot see which ones include it).
HEADERS = sorted(f"cllm/_kernels/{path.name}" for path in KERNEL_DIR.glob("*.h"))

compile_args = [
    "-O3",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-Wno-unused-function",
]
if os.environ.get("CLLM_PORTABLE") != "1":
    compile_args.append("-march=native")

extensions = [
    Extension(
        f"cllm._kernels.{name}",
        [f"cllm/_kernels/{name}.pyx"],
        depends=HEADERS,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )
    for name in KERNELS
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
    ),
)

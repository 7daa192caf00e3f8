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

KERNELS = sorted(path.stem for path in (Path(__file__).parent / "cllm" / "_kernels").glob("*.pyx"))  # all of them

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

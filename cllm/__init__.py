"""cllm: train and serve small language models (GPT-2 and Llama architectures) on the CPU."""
import os

# An OpenMP thread that finishes its part of a region spins for about 0.1 ms (libgomp's GOMP_SPINCOUNT; LLVM's
# KMP_BLOCKTIME, in ms), then sleeps. The kernels enter regions a few microseconds apart, and waking a sleeping
# thread costs about 50 us, which was most of a small GEMM's time on 2 threads; spinning for long (libgomp's
# default is milliseconds) would steal the cores from the BLAS threads of a one-row product or from other work.
# This must be set before the kernels load their OpenMP runtime, hence here.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("KMP_BLOCKTIME", "1")
# OpenBLAS's threads (one-row products) likewise spin 2^20 cycles (about 0.3 ms) after a call, not its default 2^28
# (about 0.1 s): spinning that long after a decoding step, they held the cores that the next prefill's OpenMP
# threads needed, and a float32 prefill ran at 0.6x its speed.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from .model import GPT, ModelConfig  # noqa: E402
from .optim import AdamW, cosine_lr  # noqa: E402
from .sync_model import Model  # noqa: E402

# The async serving engine loads when one of its names is first used (PEP 562): training and offline use, which
# import cllm too, never need it.
_SERVING_NAMES = ("AsyncModel", "EngineStalled", "Overloaded")


def __getattr__(name: str):
    if name in _SERVING_NAMES:
        from . import serving

        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SERVING_NAMES))


__all__ = ["GPT", "ModelConfig", "AdamW", "cosine_lr", "AsyncModel", "EngineStalled", "Overloaded", "Model"]
__version__ = "0.1.0"

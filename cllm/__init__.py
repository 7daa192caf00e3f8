"""cllm: train and serve small language models (GPT-2 and Llama architectures) on the CPU."""
import os

# Idle OpenMP threads that spin steal the cores BLAS is about to use, and the other way round: on a 2-core
# machine that made training steps several times slower. Sleeping idle threads cost microseconds per region.
# This must be set before the kernels load libgomp, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

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

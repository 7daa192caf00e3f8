"""How a model file that cannot be read is reported: one exception type, and the helpers that keep its message
to one line.

It lives below every reader of model files (cllm.checkpoint for .cllm files, cllm.formats for other formats),
so that each can raise it without importing another: checkpoint hands a folder on to formats.hf, and the readers
must not import each other back.
"""
from .errors import UsageError


class ModelFileError(UsageError):
    """A model or training-state file is missing, corrupt, or not one this version of cllm can read."""


def few_names(names: list[str], shown: int = 4) -> str:
    """The first few names, and how many more: for one-line errors about many tensors."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's may span several), or its type if it has none."""
    return " ".join(str(e).split()) or type(e).__name__

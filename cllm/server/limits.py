"""What one request may ask of the server, and how long a client may take to send it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..checks import require_int
from ..errors import UsageError


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server. None means the model's context length."""

    max_embedding_inputs: int = 256  # texts in one embeddings request
    max_input_tokens: int | None = None  # tokens in one embeddings input or one completion prompt
    max_completion_tokens: int | None = None  # the largest max_tokens a completion may ask for
    max_body_bytes: int = 1 << 20  # request body, JSON included
    # Embeddings and completions in flight, streams until their last byte. As TEI's default: more than a busy
    # service's connections, so that its requests queue for the model rather than being refused.
    max_concurrent_requests: int = 512
    # Seconds a client may take to send a request's headers (the serve tool's uvicorn protocol enforces it: the
    # app only sees a request once its headers are in), and then its body (BufferedBody, 408).
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def resolve(self, context_length: int) -> ServerLimits:
        """These limits with None replaced by context_length; UsageError for limits that cannot work."""
        resolved = dataclasses.replace(
            self,
            max_input_tokens=context_length if self.max_input_tokens is None else self.max_input_tokens,
            max_completion_tokens=(context_length if self.max_completion_tokens is None
                                   else self.max_completion_tokens))
        for field in dataclasses.fields(resolved):
            value = getattr(resolved, field.name)
            if isinstance(field.default, float):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                    raise UsageError(f"ServerLimits.{field.name} must be a positive number, got {value!r}")
            else:
                require_int(f"ServerLimits.{field.name}", value)
        if resolved.max_input_tokens > context_length:
            # The model could never take such an input: saying so here beats a confusing 400 later.
            raise UsageError(f"ServerLimits.max_input_tokens ({resolved.max_input_tokens}) cannot exceed the "
                             f"model's context length ({context_length})")
        return resolved

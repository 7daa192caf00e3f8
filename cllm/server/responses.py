"""JSON bodies that hold embeddings: numpy vectors written fast, with the numbers json itself would write."""
from __future__ import annotations

import base64
import json

import numpy as np

try:  # optional (the serve extra has it): json_bytes is ~15x faster with it
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
from starlette.responses import JSONResponse


class EmbeddingsResponse(JSONResponse):
    """A JSONResponse whose content may hold numpy vectors, written by json_bytes."""

    def render(self, content) -> bytes:
        return json_bytes(content)


def json_bytes(document) -> bytes:
    """A JSON document as UTF-8 bytes, compact, where vectors may be numpy arrays: what a server answers with
    embeddings. The numbers are those of json.dumps(vector.tolist()), bit for bit once parsed (a float32 is
    written as the shortest text of its float64 value), and a NaN or infinity in an array raises ValueError, as
    json.dumps(allow_nan=False) does.

    With orjson installed, it writes the document: Python's float repr, which json uses, takes ~0.6 us per float32
    value (17 significant digits), so that encoding a 128-float embedding cost the event loop more than the rest
    of its request. orjson writes the same digits (a tiny value as 1e-5 where json writes 1e-05)."""
    if orjson is not None:
        # Not orjson's OPT_SERIALIZE_NUMPY: it writes float32 arrays with float32's shorter digits (other values
        # once parsed) and NaN as null.
        try:
            return orjson.dumps(document, default=_array_list)
        except orjson.JSONEncodeError:
            pass  # json says what is wrong, with json's exception (orjson makes every error a TypeError)
    return json.dumps(document, default=_array_list, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")


def _array_list(value) -> list:
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError("Out of range float values are not JSON compliant")
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embeddings: the little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")

"""Text embeddings from a causal model: one forward pass over texts padded to a common length, then each text's
final hidden states (after the final norm) pooled into one vector, and scaled to unit L2 norm where asked.

Two poolings:
- "mean": the average over the text's own tokens (masked: padding never counts). What TEI and llama.cpp do for a
  model without a pooling head of its own.
- "last": the hidden state of the text's last token, the only one that has read the whole text: the usual choice
  for a causal model (the E5-Mistral and GTE-Qwen recipes, TEI's `last-token` pooling).

The model is causal, so padding after a text does not change its hidden states: a text's embedding is the same
alone or batched with others, up to float32 rounding. AsyncModel (serving.py) and Model (sync_model.py) both embed
through here.
"""
from __future__ import annotations

import json

import numpy as np

try:  # optional: json_bytes is ~15x faster with it
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

from .errors import UsageError
from .model import GPT, ForwardWorkspaces

POOLINGS = ("mean", "last")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def fit_to_context(ids: np.ndarray, context: int, *, truncate: bool, name: str) -> np.ndarray:
    """A text's ids, checked: not empty, and within the context, or cut to its first `context` tokens if
    truncate (as TEI truncates)."""
    if ids.size == 0:
        raise UsageError(f"{name} is empty: there is nothing to embed")
    if ids.size > context:
        if not truncate:
            raise UsageError(f"{name} is {ids.size} tokens long but the model's context holds only {context} "
                             f"(truncate cuts it to fit)")
        return ids[:context]
    return ids


def embed_batch(model: GPT, workspaces: ForwardWorkspaces, texts: list[np.ndarray], *, seq: int,
                normalize: list[bool], pooling: list[str], threads: int) -> np.ndarray:
    """(n, dim) float32: each text's pooled final hidden states, in one forward pass over the texts right-padded
    to seq tokens (at least the longest text). Pooling and normalisation are per text."""
    lengths = [ids.size for ids in texts]
    ws = workspaces.get(len(texts), seq)
    tokens = np.zeros((ws.batch, ws.seq), np.int32)  # the padding's ids do not matter: nothing attends to it
    for row, ids in enumerate(texts):
        tokens[row, :ids.size] = ids
    model.forward_ws(ws, tokens, None, threads=threads, logits=False)
    hidden = ws.a["lnf"].reshape(ws.batch, ws.seq, -1)
    vectors = np.stack([hidden[row, n - 1].astype(np.float64) if how == "last"
                        else hidden[row, :n].mean(axis=0, dtype=np.float64)
                        for row, (n, how) in enumerate(zip(lengths, pooling))])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, np.finfo(np.float64).tiny)
    return np.where(np.array(normalize)[:, None], unit, vectors).astype(np.float32)


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

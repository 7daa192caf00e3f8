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

import numpy as np

from .errors import UsageError
from .model import GPT, ForwardWorkspaces

POOLINGS = ("mean", "last")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def fit_to_context(ids: np.ndarray, context: int, *, truncate: bool, name: str,
                   ends: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A text's ids, checked: not empty, and within the context, or if truncate cut to `context` tokens from its
    end, as TEI truncates (cut_to: the `ends` tokens the tokenizer put around the text stay)."""
    if ids.size == 0:
        raise UsageError(f"{name} is empty: there is nothing to embed")
    if ids.size > context:
        if not truncate:
            raise UsageError(f"{name} is {ids.size} tokens long but the model's context holds only {context} "
                             f"(truncate cuts it to fit)")
        return cut_to(ids, context, ends=ends)
    return ids


def cut_to(ids: np.ndarray, limit: int, *, ends: tuple[int, int] = (0, 0), side: str = "right") -> np.ndarray:
    """ids cut to at most limit tokens as the tokenizers library truncates a text: the tokens the tokenizer put
    before and after it (ends: how many of each) stay, and the text between loses its end (side "right") or its
    start ("left"). A model that pools its last token then pools the appended one, as it was trained to. A limit
    too small to hold the added tokens cuts the ids plainly."""
    if ids.size <= limit:
        return ids
    before, after = ends
    if limit <= before + after:
        return ids[:limit] if side == "right" else ids[ids.size - limit:]
    text = ids[before:ids.size - after]
    kept = limit - before - after
    text = text[:kept] if side == "right" else text[text.size - kept:]
    return np.concatenate([ids[:before], text, ids[ids.size - after:]])


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

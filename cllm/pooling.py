"""Text embeddings from a causal model: one forward pass over texts padded to a common length, then each text's
final hidden states (after the final norm) pooled into one vector, and scaled to unit L2 norm where asked.

Two poolings:
- "mean": the average over the text's own tokens (masked: padding never counts). What TEI and llama.cpp do for a
  model without a pooling head of its own.
- "last": the hidden state of the text's last token, the only one that has read the whole text: the usual choice
  for a causal model (the E5-Mistral and GTE-Qwen recipes, TEI's `last-token` pooling).

The model is causal, so padding after a text does not change its hidden states: a text's embedding is the same
alone or batched with others, up to float32 rounding. AsyncModel (serving.py) and Model (sync_model.py) both embed
through here, in the batches length_batches cuts: texts of about the same length together, so that little of a
pass's work is padding.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UsageError
from .model import GPT, ForwardWorkspaces

POOLINGS = ("mean", "last")

# What one more forward pass costs, in tokens of work: a pass packs every weight matrix whatever its rows, and its
# products run below full speed on few rows. So splitting a batch to pad less pays only if it saves more padding
# than this per extra pass. At Qwen3-Embedding-0.6B's widths, on one thread, a pass over n tokens (100 to 3,600)
# took as long as about n + 50 would at full speed with cllm's GEMM, and n + 200 with OpenBLAS's; more threads
# share the fixed part out less well. Batches cut with 128 cost within 1% of the best under either (256 texts of
# 20 to 200 tokens).
PASS_TOKENS = 128


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


def length_batches(lengths: Sequence[int], *, max_texts: int | None = None,
                   max_tokens: int | None = None) -> list[np.ndarray]:
    """The texts of these lengths (tokens) cut into forward passes: each pass the indices of its texts, longest
    first. The texts are sorted longest first (the largest workspace is made at once) and cut into runs where the
    work is least: each pass's padded tokens (its texts x its longest) plus PASS_TOKENS. Texts of about the same
    length then share a pass, and a pass holds more lengths only where another pass would cost more than their
    padding. A pass holds at most max_texts texts and max_tokens padded tokens (None: no limit); a text longer than
    max_tokens goes alone.

    The least work is found exactly, by dynamic programming over the sorted texts: at most n x (texts in the
    largest pass) steps, a few microseconds each."""
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-lengths, kind="stable")
    sizes = lengths[order]
    n = sizes.size

    def too_large(texts: int, longest: int) -> bool:
        return (max_texts is not None and texts > max_texts) or (max_tokens is not None
                                                                  and texts * longest > max_tokens)

    work = np.zeros(n + 1, np.int64)  # work[j]: the least work of the j longest texts
    start = np.zeros(n + 1, np.int64)  # start[j]: where its last pass begins
    positions = np.arange(n)
    first = 0  # the first text that can begin a pass ending at text j - 1: one beginning earlier is too large
    for j in range(1, n + 1):
        # A pass too large for this j is too large for every later one (more texts, the same longest): `first`
        # only moves on.
        while first < j - 1 and too_large(j - first, sizes[first]):
            first += 1
        candidates = work[first:j] + (j - positions[first:j]) * sizes[first:j]
        best = int(np.argmin(candidates))
        work[j], start[j] = candidates[best] + PASS_TOKENS, first + best
    batches, end = [], n
    while end > 0:
        batches.append(order[start[end]:end])
        end = int(start[end])
    return batches[::-1]


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

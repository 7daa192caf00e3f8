"""Grouped-query attention in the attention kernels: NKV key/value heads shared by groups of NH / NKV query heads.

The reference is independent of the kernels' grouping: GQA is multi-head attention whose key and value heads are
repeated across each group, so the float64 multi-head reference (tests/reference.py) runs on the repeated qkv,
and the gradient of a shared head is the sum of its copies' gradients."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cllm._kernels import attention

from . import reference as ref


def packed(rng, B, T, NH, NKV, hs):
    return rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)


def as_multi_head(qkv, NH, NKV, hs):
    """The (B, T, 3 NH hs) qkv of multi-head attention that repeats each key/value head over its group."""
    C, group = NH * hs, NH // NKV
    k = qkv[..., C:C + NKV * hs].reshape(*qkv.shape[:2], NKV, hs)
    v = qkv[..., C + NKV * hs:].reshape(*qkv.shape[:2], NKV, hs)
    repeat = lambda a: np.repeat(a, group, axis=2).reshape(*qkv.shape[:2], C)
    return np.concatenate([qkv[..., :C], repeat(k), repeat(v)], axis=-1)


def fold_gradient(dqkv_mha, NH, NKV, hs):
    """The gradient of as_multi_head's input, from the gradient of its output: copies' gradients add up."""
    C, group = NH * hs, NH // NKV
    B, T = dqkv_mha.shape[:2]
    fold = lambda a: a.reshape(B, T, NKV, group, hs).sum(axis=3).reshape(B, T, NKV * hs)
    return np.concatenate([dqkv_mha[..., :C], fold(dqkv_mha[..., C:2 * C]), fold(dqkv_mha[..., 2 * C:])], axis=-1)


def kernel_forward(qkv, NH, NKV, threads=1):
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    out = np.empty((B, T, NH * hs), np.float32)
    denom = np.empty((B, NH, T), np.float32)
    attention.attention_forward(qkv, out, denom, NH, n_kv_heads=NKV, threads=threads)
    return out, denom


def normwise_close(got, want, tolerance=1e-5):
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)


@pytest.mark.parametrize("B, T, NH, NKV, hs", [(2, 70, 6, 2, 8), (1, 130, 9, 3, 16), (2, 33, 4, 1, 8),
                                               (1, 20, 4, 4, 8)])
def test_gqa_matches_multi_head_attention_with_repeated_heads(B, T, NH, NKV, hs):
    rng = np.random.default_rng(B * 1000 + T)
    qkv = packed(rng, B, T, NH, NKV, hs)
    out, denom = kernel_forward(qkv, NH, NKV)
    mha = as_multi_head(qkv, NH, NKV, hs)
    want, att = ref.attention_forward(mha, NH)
    normwise_close(out, want)
    _, want_denom = ref.attention_softmax_stats(mha, NH)
    np.testing.assert_allclose(denom, want_denom, rtol=1e-5)

    dout = rng.standard_normal(out.shape).astype(np.float32)
    dqkv = np.full(qkv.shape, np.nan, np.float32)  # accumulate=False must write every element
    attention.attention_backward(dout, qkv, denom, dqkv, NH, n_kv_heads=NKV, accumulate=False)
    want_dqkv = fold_gradient(ref.attention_backward(dout, mha, att, NH), NH, NKV, hs)
    normwise_close(dqkv, want_dqkv)

    again = dqkv.copy()
    attention.attention_backward(dout, qkv, denom, again, NH, n_kv_heads=NKV, accumulate=True)
    np.testing.assert_allclose(again, 2 * dqkv, rtol=1e-5, atol=1e-6 * np.abs(dqkv).max())


def test_gqa_gives_the_same_bits_for_any_thread_count():
    rng = np.random.default_rng(5)
    NH, NKV, hs = 6, 2, 8
    qkv = packed(rng, 3, 90, NH, NKV, hs)
    dout = rng.standard_normal((3, 90, NH * hs)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        out, denom = kernel_forward(qkv, NH, NKV, threads)
        dqkv = np.empty_like(qkv)
        attention.attention_backward(dout, qkv, denom, dqkv, NH, n_kv_heads=NKV, accumulate=False, threads=threads)
        results.append((out, denom, dqkv))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("NH, NKV, width, message", [(6, 4, 14 * 8, "must divide"),
                                                     (6, 2, 10 * 8 + 1, "n_kv_heads) = 10 heads")])
def test_bad_head_counts_are_refused(NH, NKV, width, message):
    qkv = np.zeros((1, 4, width), np.float32)
    with pytest.raises(ValueError, match=re.escape(message)):
        attention.attention_forward(qkv, np.zeros((1, 4, NH * 8), np.float32), np.zeros((1, NH, 4), np.float32), NH,
                                    n_kv_heads=NKV)

"""ForwardWorkspaces: one buffer for forward passes of any shape, and a bounded number of views into it, however
many shapes a long-running server meets (a prefill's shape changes with every prompt length)."""
from __future__ import annotations

import tracemalloc

import numpy as np

from cllm.model import GPT, ForwardWorkspaces, ModelConfig

CONFIG = ModelConfig(vocab_size=64, context_length=64, dim=32, n_layers=2, n_heads=2)
SHAPES = [(batch, seq) for batch in range(1, 9) for seq in range(1, CONFIG.context_length + 1)]  # 512


def test_views_and_memory_stay_bounded_across_many_shapes():
    workspaces = ForwardWorkspaces(CONFIG)
    largest = SHAPES[-ForwardWorkspaces.MAX_VIEWS:]
    others = SHAPES[:-len(largest)]
    for shape in largest:  # the largest first: the buffer never has to grow
        workspaces.get(*shape)
    buffer = workspaces._buffer

    def memory_after(shapes) -> int:
        for shape in shapes + largest:  # new shapes, then the largest again: the views kept are alike each time
            workspaces.get(*shape)
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        # Measured after a first round: allocators' caches of freed blocks fill during it.
        grown = -memory_after(others[:len(others) // 2]) + memory_after(others[len(others) // 2:])
    finally:
        tracemalloc.stop()
    assert len(workspaces._views) <= ForwardWorkspaces.MAX_VIEWS
    assert workspaces._buffer is buffer, "one buffer, carved again for each shape"
    # Kept for every shape, the views of 248 more shapes took 1.5 MB more.
    assert grown < 16 * 1024, f"{len(others) // 2} new shapes grew the traced memory by {grown} bytes"


def test_the_shapes_used_last_are_kept_and_a_kept_shape_is_the_same_workspace():
    workspaces = ForwardWorkspaces(CONFIG)
    workspaces.get(2, CONFIG.context_length)  # the largest first: a buffer that grows drops every view
    first = workspaces.get(1, 8)
    for seq in range(9, 9 + ForwardWorkspaces.MAX_VIEWS):  # as many new shapes as it keeps
        workspaces.get(1, seq)
        assert workspaces.get(1, 8) is first  # used again each time: never the least recently used
    # 18 shapes: the two least recently used are gone.
    assert set(workspaces._views) == {(1, seq) for seq in range(8, 9 + ForwardWorkspaces.MAX_VIEWS)} - {(1, 9)}


def test_a_view_carved_again_computes_what_the_first_did():
    model = GPT(CONFIG, seed=0)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 16)).astype(np.int32)
    workspaces = ForwardWorkspaces(CONFIG)

    def logits() -> np.ndarray:
        ws = workspaces.get(*tokens.shape)
        model.forward_ws(ws, tokens, None)
        return ws.a["logits"].copy()

    reference = logits()
    for seq in range(1, ForwardWorkspaces.MAX_VIEWS + 2):  # enough other shapes to push (2, 16)'s view out
        workspaces.get(3, seq)
    assert (2, 16) not in workspaces._views
    np.testing.assert_array_equal(logits(), reference)

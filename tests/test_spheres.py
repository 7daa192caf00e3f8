"""Sphere-parallel steps: same bits for any thread count, and the same gradient as one big batch."""
import tracemalloc

import anyio
import numpy as np
import pytest

from cllm.model import GPT, ModelConfig, Workspace
from cllm.spheres import ReductionTree, Spheres, TreeSum, shard_rows

CFG = ModelConfig(vocab_size=40, context_length=16, dim=32, n_layers=2, n_heads=4)


def data(B=6, T=16, seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def sphere_step(threads, spheres, tokens, targets):
    model = GPT(CFG, seed=2)
    with Spheres(model, spheres=spheres, threads=threads) as sp:
        loss = anyio.run(sp.step, tokens, targets)
    return loss, model.grads.copy()


def test_shards_cover_the_batch_in_order():
    assert shard_rows(12, 12) == [(k, k + 1) for k in range(12)]
    assert shard_rows(5, 2) == [(0, 2), (2, 5)]
    assert sum(b - a for a, b in shard_rows(8, 12)) == 8


@pytest.mark.parametrize("spheres", [1, 4, 12])
def test_bit_identical_for_any_thread_count(spheres):
    tokens, targets = data()
    base_loss, base_grads = sphere_step(1, spheres, tokens, targets)
    for threads in (2, 3, 8):
        loss, grads = sphere_step(threads, spheres, tokens, targets)
        assert loss == base_loss and np.array_equal(grads, base_grads)


def test_matches_the_unsharded_model():
    tokens, targets = data()
    model = GPT(CFG, seed=2)
    loss = model.forward(tokens, targets)
    model.backward()
    sphere_loss, grads = sphere_step(2, 3, tokens, targets)
    assert sphere_loss == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(grads, model.grads, rtol=1e-4, atol=1e-7)


def test_needs_context_and_valid_arguments():
    model = GPT(CFG)
    with pytest.raises(ValueError):
        Spheres(model, threads=0)
    with pytest.raises(ValueError):
        Spheres(model, threads=65)
    with pytest.raises(RuntimeError, match="context manager"):
        anyio.run(Spheres(model).step, *data())


def test_accumulation_adds_scaled_micro_batches():
    tokens, targets = data(B=8)
    model = GPT(CFG, seed=2)
    with Spheres(model, spheres=2, threads=2) as sp:
        anyio.run(sp.step, tokens, targets)
        full = model.grads.copy()

        async def two_halves():
            await sp.step(tokens[:4], targets[:4], scale=0.5)
            await sp.step(tokens[4:], targets[4:], scale=0.5, accumulate=True)

        anyio.run(two_halves)
    np.testing.assert_allclose(model.grads, full, rtol=1e-4, atol=1e-7)


def test_rank_blocks_combine_to_the_same_bits():
    """What MPI ranks do, in one process: each block of spheres is summed alone, then the block sums are added
    by the same tree rule. The result must be the single-process gradient, bit for bit."""
    tokens, targets = data(B=12)
    _, whole = sphere_step(3, 12, tokens, targets)
    for ranks in (2, 4):
        size = 12 // ranks
        sums = []
        for r in range(ranks):
            model = GPT(CFG, seed=2)
            with Spheres(model, spheres=12, threads=2, owned=(r * size, (r + 1) * size)) as sp:
                anyio.run(sp.step, tokens, targets)
            sums.append(model.grads.copy())
        combined = TreeSum(ReductionTree(ranks), lambda a, b: a + b)
        for r, g in enumerate(sums):
            combined.push(r, r + 1, g)
        assert np.array_equal(combined.result(), whole)


def test_tree_sum_adds_siblings_in_tree_order_and_says_when():
    added = []
    total = TreeSum(ReductionTree(5), lambda a, b: added.append((a, b)) or a + b)  # [0,2) + [2,5), [2,5) = 2 + [3,5)
    expect_merge = [False, True, False, False, True]
    for k in range(5):
        assert total.merges(k, k + 1) == expect_merge[k], k
        total.push(k, k + 1, 10 ** k)
    assert total.result() == 11111
    assert added == [(1, 10), (1000, 10000), (100, 11000), (11, 11100)]


def test_rank_blocks_must_be_tree_nodes():
    with pytest.raises(ValueError, match="power of two"):
        Spheres(GPT(CFG), spheres=12, owned=(0, 4))
    assert ReductionTree(12).is_node(6, 12) and not ReductionTree(12).is_node(4, 8)


def memory_held_by_a_step(model, ids, **spheres_options) -> int:
    """Bytes a Spheres holds after one step over ids (B, T + 1): its gradient slots and workspaces."""
    tracemalloc.start()
    try:
        with Spheres(model, **spheres_options) as sp:
            anyio.run(sp.step, ids[:, :-1], ids[:, 1:])
            return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_the_first_sphere_writes_the_models_own_gradient_and_saves_a_buffer():
    # A large vocabulary and tiny shards: the gradient slots, not the activations, dominate memory.
    cfg = ModelConfig(vocab_size=4096, context_length=8, dim=64, n_layers=1, n_heads=2)
    model = GPT(cfg, seed=4)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    held = memory_held_by_a_step(model, ids, spheres=2, threads=2)
    # Sphere 0 wrote into model.grads, and sphere 1's slot received nothing else: one slot, not two.
    assert held < 1.6 * model.params.nbytes
    reference = GPT(cfg, seed=4)
    reference.forward(ids[:, :-1], ids[:, 1:])
    reference.backward()
    np.testing.assert_allclose(model.grads, reference.grads, rtol=1e-4, atol=1e-7)


def test_activations_are_held_per_thread_not_per_sphere():
    # Long rows and a tiny model: the activations, not the gradient slots, dominate memory.
    cfg = ModelConfig(vocab_size=16, context_length=128, dim=16, n_layers=2, n_heads=2)
    model = GPT(cfg, seed=5)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (8, 129)).astype(np.int32)
    workspace_bytes = 4 * Workspace.size(cfg, 2, 128)
    held = memory_held_by_a_step(model, ids, spheres=4, threads=1)
    # One thread computes one sphere at a time: one workspace, whatever slots hold partial sums meanwhile.
    assert held < 1.5 * workspace_bytes + 3 * model.params.nbytes

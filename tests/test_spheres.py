"""Sphere-parallel steps: same bits for any thread count, and the same gradient as one big batch."""
import anyio
import numpy as np
import pytest

from cllm.model import GPT, ModelConfig
from cllm.spheres import Spheres, shard_rows

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

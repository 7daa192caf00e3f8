"""examples/embedding_service.py, the AsyncModel inside an asyncio web app: driven through its lifespan with
httpx's ASGI transport, under pytest-asyncio. Concurrent requests share forward passes, and shutdown leaves
nothing running."""
import asyncio
import importlib.util
from pathlib import Path

import httpx
import numpy as np
import pytest

from cllm.checkpoint import save_model
from cllm.model import GPT, ModelConfig
from cllm.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)
EXAMPLE = Path(__file__).parents[1] / "examples" / "embedding_service.py"
CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"


def load_example():
    spec = importlib.util.spec_from_file_location("embedding_service", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_path(tmp_path):
    tokenizer = Tokenizer.train("char", [CORPUS])
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, dim=32, n_layers=2, n_heads=2),
                seed=0)
    save_model(tmp_path / "tiny.cllm", model, tokenizer)
    return tmp_path / "tiny.cllm"


@pytest.mark.asyncio
async def test_concurrent_requests_are_batched_and_shutdown_leaves_nothing_running(model_path):
    app = load_example().create_app(str(model_path), max_wait_ms=200)
    texts = [f"text number {i}" for i in range(8)]
    async with app.router.lifespan_context(app):
        model = app.state.model
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            responses = await asyncio.gather(*(client.post("/embed", json={"texts": [t]}) for t in texts))
        assert all(r.status_code == 200 for r in responses)
        vectors = np.array([r.json()["embeddings"][0] for r in responses])
        np.testing.assert_allclose(vectors, await model.embed(texts), atol=1e-6)
        assert model.info()["batches_run"]["embed"] < len(texts)  # the eight requests shared forward passes
    assert model.health()["status"] == "stopped"
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert not others, others  # the model's batcher tasks are gone

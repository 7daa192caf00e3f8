"""Configs are checked before anything is allocated by them: a context length past MAX_CONTEXT_LENGTH (which no
tensor holds, yet sizes the RoPE table and the KV cache) and sizes that the weight files do not hold are refused in
one line naming the setting, at once, whether they come from a Hugging Face folder or a .cllm file."""
from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import safetensors.numpy

from cllm.checkpoint import ModelFileError, load_model, save_model
from cllm.errors import UsageError
from cllm.formats.hf import HFFolderError, save_hf
from cllm.model import GPT, MAX_CONTEXT_LENGTH, ModelConfig
from cllm.tokenizer import Tokenizer

ABSURD = 10**12


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog"])


def small(tokenizer, arch: str) -> GPT:
    return GPT(ModelConfig(arch=arch, vocab_size=tokenizer.vocab_size, context_length=16, dim=16, n_layers=1,
                           n_heads=2), seed=0)


def folder_with(tmp_path, tokenizer, arch: str, **settings):
    """A Hugging Face folder of a small model whose config.json then says settings."""
    save_hf(tmp_path, small(tokenizer, arch), tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | settings))
    return tmp_path


def refusal(load, path, error=ModelFileError) -> str:
    """load(path)'s one-line refusal, checked to come at once and to allocate next to nothing."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(error) as refused:
            load(path)
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(refused.value)
    assert "\n" not in message and message.count(str(path)) == 1, message
    assert seconds < 2 and peak < 16 * 2**20, (seconds, peak)
    return message


@pytest.mark.parametrize("arch, key", [("llama", "max_position_embeddings"), ("gpt2", "n_positions")])
def test_an_absurd_context_in_a_folder_is_refused_by_its_name(tmp_path, tokenizer, arch, key):
    folder = folder_with(tmp_path, tokenizer, arch, **{key: ABSURD})
    message = refusal(load_model, folder, HFFolderError)
    assert f"config.json: {key} must be an integer from 1 to {MAX_CONTEXT_LENGTH}, got {ABSURD}" in message


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"])
def test_sizes_the_weights_do_not_hold_are_refused_before_the_model_is_allocated(tmp_path, tokenizer, key):
    """Each is checked against a tensor's shape, but only as that tensor is read into the model's buffer, which
    the config sizes: 10^12 of any would have asked for terabytes first (and layers were listed one by one)."""
    folder = folder_with(tmp_path, tokenizer, "llama", **{key: ABSURD, "head_dim": None})
    assert "its weights hold only" in refusal(load_model, folder, HFFolderError)


def cllm_file_with(tmp_path, tokenizer, **settings):
    """A .cllm file of a small model whose config then says settings."""
    path = tmp_path / "model.cllm"
    save_model(path, small(tokenizer, "llama"), tokenizer)
    with safetensors.safe_open(path, framework="np") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"]) | settings
    safetensors.numpy.save_file(safetensors.numpy.load_file(path), path,
                                metadata=metadata | {"config": json.dumps(config)})
    return path


def test_a_cllm_file_with_an_absurd_context_is_refused_by_its_name(tmp_path, tokenizer):
    message = refusal(load_model, cllm_file_with(tmp_path, tokenizer, context_length=ABSURD))
    assert f"ModelConfig.context_length must be an integer from 1 to {MAX_CONTEXT_LENGTH}, got {ABSURD}" in message


@pytest.mark.parametrize("key, fragment", [("vocab_size", "has shape"), ("dim", "has shape"),
                                           ("n_layers", "describes 1,000,000,000,000 layers, but the file holds only")])
def test_a_cllm_file_whose_sizes_its_tensors_do_not_hold_is_refused_at_once(tmp_path, tokenizer, key, fragment):
    """n_layers was the one that hung: the expected shapes were listed layer by layer before any was compared."""
    assert fragment in refusal(load_model, cllm_file_with(tmp_path, tokenizer, **{key: ABSURD}))


def test_the_cap_takes_the_contexts_of_real_models():
    for context in (2048, 131_072, 1_010_000, MAX_CONTEXT_LENGTH):  # Llama 2, Llama 3.1, Qwen2.5-1M, the cap
        assert ModelConfig(arch="llama", vocab_size=8, context_length=context, dim=8, n_layers=1,
                           n_heads=1).context_length == context
    with pytest.raises(UsageError, match="context_length must be an integer from 1 to 1048576, got 1048577"):
        ModelConfig(arch="llama", vocab_size=8, context_length=MAX_CONTEXT_LENGTH + 1, dim=8, n_layers=1, n_heads=1)


def test_a_refusal_inside_a_weight_file_names_the_file_once(tmp_path, tokenizer):
    folder = folder_with(tmp_path, tokenizer, "llama")
    weights = safetensors.numpy.load_file(folder / "model.safetensors")
    safetensors.numpy.save_file(weights | {"model.extra": weights["model.norm.weight"]}, folder / "model.safetensors",
                                metadata={"format": "pt"})
    message = refusal(load_model, folder, HFFolderError)
    assert message == f"{folder / 'model.safetensors'}: unexpected tensor 'model.extra' for a llama model"

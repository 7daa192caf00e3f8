"""A model whose matrices stay quantized (issue 22): what a GGUF file's blocks become in memory, and that every
path that runs the model (the full pass, prefill, the fused decoding step, batches of rows) computes on them
consistently, bit-identically for any thread count, and as close to the float32 model of the same (dequantized)
weights as 8-bit activations allow. The kernels themselves are held to float64 references in
test_quantized_kernels.py."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from cllm._kernels import quantized as qk
from cllm.formats.gguf_file import quantize_model, save_gguf
from cllm.formats.gguf_in import load_gguf
from cllm.generate import Decoder
from cllm.model import GPT, ModelConfig

from tests.test_gguf_in import bpe, random_model  # noqa: F401 (bpe: a fixture)

Q = gguf.GGMLQuantizationType
CONFIGS = {
    "gpt2": ModelConfig(vocab_size=300, context_length=48, dim=64, n_layers=2, n_heads=4),
    # rows of 256: q4_k_m gives Q4_K and Q6_K parts; grouped-query attention; an untied head
    "llama": ModelConfig(arch="llama", vocab_size=320, context_length=48, dim=256, n_layers=2, n_heads=4,
                         n_kv_heads=2, intermediate_size=256, tied_head=False),
}
FILE_TYPES = ("q8_0", "q4_0", "q4_k_m")
# The largest logit difference from the float32 model of the same weights, as a share of the largest logit. Each
# product rounds its activations to 8 bits a block of 32 (a relative error of up to 1/254 per value, ~0.2% on a
# sum); measured on these random models it is 0.4-1.9%, through two layers.
DEQUANTIZED_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def files(bpe, tmp_path_factory):
    """A GGUF file of each architecture and file type, written by cllm's exporter and quantizer."""
    folder = tmp_path_factory.mktemp("quantized")
    return {(name, file_type): save_gguf(folder / f"{name}-{file_type}.gguf", random_model(config), bpe,
                                         tensor_type=file_type)
            for name, config in CONFIGS.items() for file_type in FILE_TYPES}


def prompt(config: ModelConfig, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, length)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_a_gguf_files_matrices_stay_in_their_blocks(files, name, file_type):
    path = files[name, file_type]
    model, _ = load_gguf(path)
    file_types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    expected = {"q8_0": {Q.Q8_0}, "q4_0": {Q.Q4_0, Q.Q6_K, Q.Q8_0, Q.Q5_0}}.get(file_type)
    held = {part.ggml_type for matrix in model.q.values() for part in matrix.parts}
    assert held == ({t for t in file_types.values() if t not in (Q.F32, Q.F16)} if expected is None else
                    held & expected) and held
    if name == "llama" and file_type == "q4_k_m":
        assert {Q.Q4_K, Q.Q6_K} <= held
    layers = {f"h.{i}.{m}" for i in range(model.config.n_layers)
              for m in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    assert layers <= set(model.q)
    for matrix_name in model.q:  # the float32 views of quantized matrices are never written
        assert not model.p[matrix_name].any(), matrix_name
    dense, _ = load_gguf(path, dequantize=True)
    assert not dense.q
    model.dequantize()
    assert not model.q and np.array_equal(model.params, dense.params)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_the_quantized_model_is_the_dequantized_one_to_its_activations_rounding(files, name, file_type):
    model, _ = load_gguf(files[name, file_type])
    dense, _ = load_gguf(files[name, file_type], dequantize=True)
    ids = prompt(model.config, 20)[None]
    want = dense.logits(ids)
    error = np.abs(model.logits(ids) - want).max() / np.abs(want).max()
    assert 0 < error < DEQUANTIZED_TOLERANCE  # 0 would mean the float32 weights were used


@pytest.mark.parametrize("name", CONFIGS)
def test_decoding_steps_are_the_full_pass_on_the_same_blocks(files, name):
    assert_decoding_steps_are_the_full_pass(load_gguf(files[name, "q4_k_m"])[0])


def assert_decoding_steps_are_the_full_pass(model: GPT) -> None:
    """Prefill (the forward pass), then steps of the fused decoding kernel, two rows of different lengths, against
    a full pass over each row's tokens: the same quantized products, so they agree to float32 rounding."""
    cfg = model.config
    first, second = prompt(cfg, 9, seed=2), prompt(cfg, 4, seed=3)
    decoder = Decoder(model, batch=2)
    decoder.prefill([first, second])
    extra = prompt(cfg, 5, seed=4)
    for token in extra:
        logits = decoder.step(np.array([token, token])).copy()
    for row, tokens in enumerate((first, second)):
        full = model.logits(np.concatenate([tokens, extra])[None])[0, -1]
        np.testing.assert_allclose(logits[row], full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_results_are_bit_identical_for_any_thread_count(files, file_type):
    path = files["llama", file_type]
    results = []
    for threads in (1, 2, 3):
        model, _ = load_gguf(path, threads=threads)
        ids = prompt(model.config, 17)
        decoder = Decoder(model, batch=3, threads=threads)
        decoder.prefill([ids, ids[:5], ids[:11]])
        step = decoder.step(np.array([7, 8, 9])).copy()
        results.append((model.logits(ids[None]), step))
    for logits, step in results[1:]:
        assert np.array_equal(logits, results[0][0]) and np.array_equal(step, results[0][1])


def test_every_instruction_set_path_computes_the_same_model(files):
    model, _ = load_gguf(files["llama", "q4_k_m"])
    ids = prompt(model.config, 12)[None]
    default = qk.active_isa()
    try:
        by_path = {}
        for isa in qk.supported_isas():
            qk.use_isa(isa)
            by_path[isa] = model.logits(ids)
    finally:
        qk.use_isa(default)
    reference = by_path["scalar"]
    for isa, logits in by_path.items():  # summation orders differ: float32 rounding apart, no more
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * np.abs(reference).max(), err_msg=isa)


def test_a_model_quantized_in_memory_runs_as_its_file_does(bpe, tmp_path):
    """quantize_model (what cllm-convert --quantize does) gives the blocks that save_gguf writes and load_gguf maps."""
    model = random_model(CONFIGS["llama"])
    quantize_model(model, "q4_k_m")
    path = save_gguf(tmp_path / "m.gguf", model, bpe, tensor_type="q4_k_m")
    loaded, _ = load_gguf(path)
    ids = prompt(model.config, 10)[None]
    np.testing.assert_array_equal(loaded.logits(ids), model.logits(ids))


def test_training_a_quantized_model_is_refused(files):
    model, _ = load_gguf(files["gpt2", "q8_0"])
    ids = prompt(model.config, 8)[None]
    model.forward(ids, ids)
    with pytest.raises(RuntimeError, match="dequantize=True"):
        model.backward()

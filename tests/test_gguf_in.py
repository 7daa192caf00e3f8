"""GGUF in (cllm.formats.gguf_in): every tensor type read back exactly as the `gguf` package dequantizes it, by
chunks; GPT-2 and Llama files written by cllm's exporter read back to the same config, weights and logits, and to
transformers' logits on the same file; what cllm does not compute refused in one line; and a .gguf file taken
wherever a MODEL is. Files are tiny and made here, offline."""
from __future__ import annotations

import struct
import subprocess
import sys

import anyio
import gguf
import numpy as np
import pytest

from cllm import AsyncModel
from cllm import Model as SyncModel
from cllm.checkpoint import load_model, save_model
from cllm.formats.gguf_file import save_gguf
from cllm.formats.gguf_in import load_gguf, read_tensor_into
from cllm.formats.hf import hf_tensors, load_hf
from cllm.model import GPT, ModelConfig
from cllm.model_file_errors import ModelFileError
from cllm.tokenizer import Tokenizer
from cllm.tools import _cli, convert, evaluate, train_model

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20
CONFIGS = {
    "gpt2": ModelConfig(vocab_size=300, context_length=32, dim=64, n_layers=2, n_heads=4, norm_eps=1e-6),
    # grouped-query attention (4 query heads over 2 key/value heads), each head a different width
    "llama-tied": ModelConfig(arch="llama", vocab_size=320, context_length=48, dim=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, intermediate_size=96, rope_theta=500.0, norm_eps=1e-6),
    "llama-untied": ModelConfig(arch="llama", vocab_size=320, context_length=48, dim=96, n_layers=2, n_heads=6,
                                n_kv_heads=2, intermediate_size=128, tied_head=False),
    # heads of 32 set apart from the width (64 / 4): attention.key_length, and q and k interleaved per head of 32
    "llama-heads-apart": ModelConfig(arch="llama", vocab_size=320, context_length=48, dim=64, n_layers=2, n_heads=4,
                                     n_kv_heads=2, head_dim=32, intermediate_size=96),
}
# Logits of a file against the original model's, as a share of their largest magnitude: a rounding's effect (the
# weights themselves are checked exactly against the writer's rounding).
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("bpe", TEXT, vocab_size=300)


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every parameter (norms and biases too) is random, so that every mapping matters."""
    model = GPT(config, seed=seed)
    model.params += np.random.default_rng(seed).normal(0, 0.05, model.params.size).astype(np.float32)
    return model


def export_each(folder, tokenizer: Tokenizer, configs: dict[str, ModelConfig], tensor_types) -> dict:
    """(model, its GGUF file) for each configuration's random model and each type, written by cllm's exporter into
    folder, by (configuration's name, type)."""
    files = {}
    for name, config in configs.items():
        model = random_model(config)
        for tensor_type in tensor_types:
            files[name, tensor_type] = model, save_gguf(folder / f"{name}-{tensor_type}.gguf", model, tokenizer,
                                                        tensor_type=tensor_type)
    return files


@pytest.fixture(scope="module")
def exported(bpe, tmp_path_factory):
    return export_each(tmp_path_factory.mktemp("exported"), bpe, CONFIGS, TOLERANCE)


def interleave(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, made here: each head's row j to 2j, row j + head_dim / 2 to 2j + 1."""
    return rows.reshape(heads, 2, -1, rows.shape[1]).swapaxes(1, 2).reshape(rows.shape)


def ggml_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and in GGML's layout, as llama.cpp's converter makes them."""
    cfg, p = model.config, model.p
    if cfg.arch == "gpt2":
        tensors = {"token_embd.weight": p["wte"], "position_embd.weight": p["wpe"],
                   "output_norm.weight": p["ln_f.weight"], "output_norm.bias": p["ln_f.bias"]}
        parts = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                 "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
        for i in range(cfg.n_layers):
            for ours, theirs in parts.items():
                weight = p[f"h.{i}.{theirs}.weight"]
                tensors[f"blk.{i}.{ours}.weight"] = weight.T if weight.ndim == 2 else weight  # Conv1D (in, out)
                tensors[f"blk.{i}.{ours}.bias"] = p[f"h.{i}.{theirs}.bias"]
        return tensors
    hf = hf_tensors(model)
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not cfg.tied_head:
        tensors["output.weight"] = hf["lm_head.weight"]
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.n_layers):
        for ours, theirs in parts.items():
            tensor = hf[f"model.layers.{i}.{theirs}.weight"]
            if ours in ("attn_q", "attn_k"):
                tensor = interleave(tensor, cfg.n_heads if ours == "attn_q" else cfg.n_kv_heads)
            tensors[f"blk.{i}.{ours}.weight"] = tensor
    return tensors


def rewrite(src, dst, *, fields: dict | None = None, tensors: dict | None = None, drop=()) -> None:
    """A copy of the GGUF file src at dst, with metadata set ({key: (value, type)}, or None to remove the key),
    tensors replaced or added ({name: (array, type)}) and tensors dropped."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":  # the writer's own first key
            writer.add_key_value(key, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == V.ARRAY else None)
    for key, setting in (fields or {}).items():
        writer.kv_data[0].pop(key, None)
        if setting is not None:
            writer.add_key_value(key, *setting)
    replaced = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors if t.name not in drop}
    for name, (data, qtype) in (replaced | (tensors or {})).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------------------------
# every type, exactly


BLOCKED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
QUANTIZED_BY_GGUF = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf.quants.quantize has these
# Where each block type keeps its fp16 scales (d, and m or dmin): byte offsets in the block.
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# The largest multiple of its scale (d) that a block type's value can be: its quant, times a K-quant's sub-scale.
LARGEST_QUANT = {Q.Q8_0: 127, Q.Q4_0: 8, Q.Q4_1: 15, Q.Q5_0: 16, Q.Q5_1: 31, Q.Q4_K: 63 * 15, Q.Q5_K: 63 * 31,
                 Q.Q6_K: 128 * 32}
K_SCALES = slice(4, 16)  # Q4_K's and Q5_K's twelve bytes of 6-bit scales and mins
EXTREME_FP16 = np.array([65504.0, -65504.0, 2.0 ** -14, -(2.0 ** -14), 2.0 ** -24, -(2.0 ** -24), 1023 * 2.0 ** -24,
                         2.0 ** -20, 0.0, -0.0, 1.0, -1.5], np.float16)


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator, *, weights: bool = False) -> np.ndarray:
    """Random bytes as blocks of qtype, with finite fp16 scales: the extreme ones (largest, smallest normal,
    subnormal, zeros) first, then any finite bit pattern; for Q4_K and Q5_K, every single bit of the packed 6-bit
    scales and mins set alone once (all 96 packing positions), and all of them set. With weights, scales that
    make values of a model's size instead."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        if weights:
            scales = (rng.uniform(0.2, 1.0, n_blocks) * 0.05 / LARGEST_QUANT[qtype]).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
            continue
        bits = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
        bits = np.where(bits & 0x7C00 == 0x7C00, bits & ~np.uint16(0x4000), bits)  # no inf or NaN
        bits[:len(EXTREME_FP16)] = EXTREME_FP16.view(np.uint16)
        blocks[:, offset:offset + 2] = bits.view(np.uint8).reshape(n_blocks, 2)
    if qtype in (Q.Q4_K, Q.Q5_K) and not weights:
        blocks[:96, K_SCALES] = np.packbits(np.eye(96, dtype=np.uint8), axis=1)  # block b: bit b alone
        blocks[96, K_SCALES] = 0xFF
    return blocks


def typed_file(path, qtype: Q, rng: np.random.Generator) -> None:
    """A GGUF file holding qtype's tensors: values that gguf.quants.quantize made (where it can), and random blocks
    (for the block types), each 13 rows of whole blocks."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    row_length = 2 * max(block_size, 32)
    writer = gguf.GGUFWriter(path, "test")
    if qtype in QUANTIZED_BY_GGUF:  # values of every magnitude that float16 holds, subnormals among them
        values = (rng.normal(size=(13, row_length)) * 10.0 ** rng.uniform(-9, 4, (13, row_length))).astype(np.float32)
        writer.add_tensor("quantized", gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    if qtype in BLOCKED:
        blocks = random_blocks(qtype, 13 * 2 * max(block_size, 32) // block_size + 97, rng)
        rows = len(blocks) * block_size // row_length
        writer.add_tensor("random", blocks[:rows * row_length // block_size].reshape(rows, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, *BLOCKED], ids=lambda t: t.name)
def test_every_type_reads_back_as_gguf_dequantizes_it_bit_for_bit(tmp_path, qtype):
    typed_file(tmp_path / "t.gguf", qtype, np.random.default_rng(int(qtype)))
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    assert reader.tensors
    for tensor in reader.tensors:
        whole = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        row_length = whole.shape[-1]
        for chunk_rows in (1, 3, len(whole)):  # 3 rows: chunk boundaries inside the tensor, a short last chunk
            ours = np.full(whole.shape, np.nan, np.float32)
            read_tensor_into(tensor, ours, chunk_values=chunk_rows * row_length, mapping=reader.data.base)
            assert np.array_equal(ours.view(np.uint32), whole.view(np.uint32)), (tensor.name, chunk_rows)
        # into a transposed view, rows in another order: each row lands where it is told, the same bits
        order = np.random.default_rng(0).permutation(len(whole))
        target = np.zeros(whole.shape[::-1], np.float32)
        read_tensor_into(tensor, target.T, row_order=order, chunk_values=3 * row_length)
        assert np.array_equal(target.T[order].view(np.uint32), whole.view(np.uint32))


def test_the_k_quant_blocks_hold_every_scale_position_and_extreme_scale():
    blocks = random_blocks(Q.Q4_K, 128, np.random.default_rng(0))
    scales, mins = gguf.quants.Q4_K.get_scale_min(blocks[:, K_SCALES].copy())
    unpacked = np.concatenate([scales, mins], axis=1).astype(int)  # 16 six-bit values a block
    assert (np.count_nonzero(unpacked[:96], axis=1) == 1).all()  # each bit alone lights one value...
    for column in unpacked[:96].T:  # ...and each value's six bits are lit once each
        assert sorted(column[column != 0].tolist()) == [1, 2, 4, 8, 16, 32]
    assert (scales[96] == 63).all() and (mins[96] == 63).all()
    d = blocks[:, :2].copy().view(np.float16)[:, 0]
    assert np.isfinite(d).all() and {65504.0, 2.0 ** -24} <= set(d.astype(float).tolist())


def test_a_non_finite_value_is_refused_naming_its_tensor(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "test")
    blocks = random_blocks(Q.Q8_0, 16, np.random.default_rng(0))[12:]
    blocks[3, :2] = np.array([np.inf], np.float16).view(np.uint8)
    writer.add_tensor("bad", blocks.reshape(2, -1), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    with pytest.raises(ValueError, match="tensor 'bad' holds non-finite values"):
        read_tensor_into(tensor, np.empty((2, 64), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("tensor_type", list(TOLERANCE))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_an_exported_model_reads_back_with_its_config_weights_and_logits(exported, bpe, name, tensor_type):
    original, path = exported[name, tensor_type]
    model, tokenizer = load_gguf(path, dequantize=True)
    assert model.config == original.config
    assert tokenizer.encode(TEXT[0]).tolist() == bpe.encode(TEXT[0]).tolist()
    file_types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    ours, theirs = ggml_tensors(model), ggml_tensors(original)
    assert set(ours) == set(file_types)
    for tensor, values in ours.items():  # exactly what the writer's type made of the original weights
        qtype = file_types[tensor]
        made = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(theirs[tensor]), qtype), qtype)
        assert np.array_equal(values, made.reshape(values.shape)), tensor
    ids = bpe.encode(TEXT[1])[None, :20]
    if tensor_type == "f32":
        assert np.array_equal(model.params, original.params)
        assert np.array_equal(model.logits(ids), original.logits(ids))
    else:
        want = original.logits(ids)
        np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=TOLERANCE[tensor_type] * np.abs(want).max())


@pytest.mark.parametrize("name, tensor_type", [("gpt2", "f32"), ("gpt2", "q8_0"), ("llama-untied", "f32"),
                                               ("llama-tied", "q8_0"), ("llama-untied", "f16"),
                                               ("llama-heads-apart", "f32")])
def test_transformers_reads_the_same_file_to_the_same_logits(exported, bpe, name, tensor_type):
    _, path = exported[name, tensor_type]
    model, _ = load_gguf(path, dequantize=True)
    # transformers' GGUF reader takes gpt2.context_length as n_ctx and leaves n_positions at 1024: say it.
    extra = {"n_positions": model.config.context_length} if model.config.arch == "gpt2" else {}
    assert_transformers_logits(path, model, bpe.encode(TEXT[2])[None, :16], **extra)


def assert_transformers_logits(path, model: GPT, ids: np.ndarray, **config) -> None:
    """model's logits of ids (1, T) are those of transformers' own GGUF loader (gguf's dequantization, its own
    undoing of the q/k order) on the file at path, given config's settings."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **config).eval()
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids).long()).logits.float().numpy()
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))


# A file of mixed types, as llama.cpp's Q4_K_M quantizer makes them, on a Llama whose rows are whole K-quant blocks.
MIXED_CONFIG = ModelConfig(arch="llama", vocab_size=320, context_length=32, dim=256, n_layers=1, n_heads=4,
                           n_kv_heads=2, intermediate_size=256, tied_head=False)
MIXED_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_0, "ffn_gate": Q.Q4_1,
               "ffn_up": Q.Q5_1, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_norm": Q.BF16,
               "ffn_norm": Q.F16}


def retype(src, dst, type_of, rng: np.random.Generator) -> None:
    """A copy of the f32 GGUF file src at dst with each tensor of the type type_of(its name) gives (None: as it is):
    its values in a float type, or random blocks of model-sized values in a block type."""
    tensors = {}
    for t in gguf.GGUFReader(src).tensors:
        qtype = type_of(t.name)
        if qtype in FLOAT_TYPES:
            tensors[t.name] = gguf.quants.quantize(np.array(t.data), qtype), qtype
        elif qtype is not None:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            rows, length = t.data.shape
            blocks = random_blocks(qtype, rows * length // block_size, rng, weights=True)
            tensors[t.name] = blocks.reshape(rows, length // block_size * type_size), qtype
    rewrite(src, dst, tensors=tensors)


def kind(tensor_name: str) -> str:
    """A GGUF tensor's kind: blk.0.attn_q.weight's attn_q, token_embd.weight's token_embd."""
    return tensor_name.split(".")[-2] if tensor_name.startswith("blk.") else tensor_name.split(".")[0]


@pytest.fixture(scope="module")
def mixed(bpe, tmp_path_factory):
    """A Llama file whose every tensor but the final norm has another type: random blocks of model-sized values."""
    folder = tmp_path_factory.mktemp("mixed")
    save_gguf(folder / "f32.gguf", random_model(MIXED_CONFIG), bpe)
    retype(folder / "f32.gguf", folder / "mixed.gguf", lambda name: MIXED_TYPES.get(kind(name)),
           np.random.default_rng(7))
    return folder / "mixed.gguf"


def test_a_file_of_mixed_types_reads_each_tensor_as_gguf_dequantizes_it(mixed):
    model, _ = load_gguf(mixed, dequantize=True)
    assert model.config == MIXED_CONFIG
    ours = ggml_tensors(model)
    file_tensors = gguf.GGUFReader(mixed).tensors
    assert {t.tensor_type for t in file_tensors} == set(MIXED_TYPES.values()) | {Q.F32}
    for t in file_tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(ours[t.name].reshape(want.shape), want), t.name


def test_transformers_reads_a_file_of_mixed_types_to_the_same_logits(mixed, bpe):
    assert_transformers_logits(mixed, load_gguf(mixed, dequantize=True)[0], bpe.encode(TEXT[3])[None, :16])


def test_a_gpt2_files_repeated_head_is_tied_and_one_of_its_own_type_is_a_head_of_its_own(exported, bpe, tmp_path):
    original, path = exported["gpt2", "q8_0"]
    embedding = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    rewrite(path, tmp_path / "repeated.gguf", tensors={"output.weight": (np.array(embedding.data), Q.Q8_0)})
    model, _ = load_gguf(tmp_path / "repeated.gguf", dequantize=True)
    assert model.config.tied_head and np.array_equal(model.p["wte"], load_gguf(path, dequantize=True)[0].p["wte"])
    # llama.cpp's Q4_K_M gives GPT-2's repeated head a type of its own: a head of its own, as transformers reads it.
    other = gguf.quants.quantize(original.p["wte"], Q.Q4_0)
    rewrite(path, tmp_path / "own.gguf", tensors={"output.weight": (other, Q.Q4_0)})
    model, tokenizer = load_gguf(tmp_path / "own.gguf", dequantize=True)
    assert not model.config.tied_head
    assert np.array_equal(model.p["lm_head"], gguf.quants.dequantize(other, Q.Q4_0))
    ids = bpe.encode(TEXT[3])[None, :16]
    tied, _ = load_gguf(path, dequantize=True)
    assert np.abs(model.logits(ids) - tied.logits(ids)).max() > 1e-3  # the head is not wte
    convert.main([str(tmp_path / "own.gguf"), str(tmp_path / "hf")])
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids).long()).logits.float().numpy()
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))
    again, _ = load_hf(tmp_path / "hf")
    assert not again.config.tied_head and np.array_equal(again.p["lm_head"], model.p["lm_head"])


# ---------------------------------------------------------------------------------------------------------------
# refusals


def refusals(path) -> dict[str, tuple[dict, str]]:
    """Each way to spoil the llama file at path: rewrite's arguments, and the words of the refusal."""
    wrong_shape = np.zeros((64, 48), np.float32)
    return {
        "architecture": ({"fields": {"general.architecture": ("phi3", V.STRING)}},
                         "general.architecture is 'phi3'; cllm reads the gpt2, llama, qwen2 and qwen3 architectures"),
        "rope scaling": ({"fields": {"llama.rope.scaling.type": ("yarn", V.STRING)}},
                         "llama.rope.scaling.type = 'yarn' is a setting that cllm does not compute"),
        "sliding window": ({"fields": {"llama.attention.sliding_window": (16, V.UINT32)}},
                           "llama.attention.sliding_window = 16 is a setting that cllm does not compute"),
        "head_dim": ({"fields": {"llama.rope.dimension_count": (8, V.UINT32)}},
                     "llama.rope.dimension_count is 8, which cllm does not compute"),
        "missing setting": ({"fields": {"llama.attention.layer_norm_rms_epsilon": None}},
                            "no llama.attention.layer_norm_rms_epsilon in the file's metadata"),
        "IQ2_XXS": ({"tensors": {"blk.0.ffn_up.weight": (
            np.zeros((96, 66), np.uint8), Q.IQ2_XXS)}},
            "tensor 'blk.0.ffn_up.weight' is IQ2_XXS; cllm reads F32, F16, BF16, Q8_0"),
        "Q2_K": ({"tensors": {"blk.1.attn_v.weight": (np.zeros((32, 84), np.uint8), Q.Q2_K)}},
                 "tensor 'blk.1.attn_v.weight' is Q2_K"),
        "missing tensor": ({"drop": ("blk.1.ffn_down.weight",)}, "missing tensors blk.1.ffn_down.weight"),
        "extra tensor": ({"tensors": {"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)}},
                         "unexpected tensors for a llama model: rope_freqs.weight"),
        "shape": ({"tensors": {"blk.0.attn_q.weight": (wrong_shape, Q.F32)}},
                  "tensor 'blk.0.attn_q.weight' has shape (64, 48), expected (64, 64)"),
        "layers": ({"fields": {"llama.block_count": (10 ** 9, V.UINT32)}},
                   "llama.block_count is 1,000,000,000, but the file holds only"),
        "context": ({"fields": {"llama.context_length": (1 << 40, V.UINT64)}},
                    "llama.context_length must be an integer from 1 to 1048576"),
        "adapter": ({"fields": {"general.type": ("adapter", V.STRING)}}, "general.type is 'adapter', not \"model\""),
        "split": ({"fields": {"split.count": (2, V.UINT16)}}, "part of a GGUF split into 2 files; merge them first"),
        "non-finite": ({"tensors": {"output_norm.weight": (np.full(64, np.nan, np.float32), Q.F32)}},
                       "tensor 'output_norm.weight' holds non-finite values"),
    }


def spoiled_files(exported, tmp_path) -> dict[str, tuple[str, str]]:
    _, path = exported["llama-tied", "f32"]
    files = {}
    for what, (change, message) in refusals(path).items():
        rewrite(path, tmp_path / f"{what}.gguf", **change)
        files[what] = str(tmp_path / f"{what}.gguf"), message
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-1000])
    files["truncated"] = str(truncated), "not a readable GGUF file (the file ends at byte"
    files["not gguf"] = str(tmp_path / "refusal.gguf"), "not a readable GGUF file (GGUF magic invalid)"
    (tmp_path / "refusal.gguf").write_bytes(b"nothing like a model")
    big_endian = gguf.GGUFWriter(tmp_path / "big-endian.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    big_endian.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    big_endian.write_header_to_file()
    big_endian.write_kv_data_to_file()
    big_endian.write_tensors_to_file()
    big_endian.close()
    files["big-endian"] = str(tmp_path / "big-endian.gguf"), "a GGUF file of the other byte order (big-endian)"
    return files


def test_what_cllm_does_not_compute_is_refused_in_one_line_naming_it(exported, tmp_path, capsys):
    for what, (path, message) in spoiled_files(exported, tmp_path).items():
        with pytest.raises(ModelFileError) as refused:
            load_model(path)
        assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value), what
        assert "\n" not in str(refused.value)
        # the command line: one line, status 2
        with pytest.raises(SystemExit) as exited:
            _cli.run("convert", lambda: convert.main([path, str(tmp_path / "out.cllm")]))
        assert exited.value.code == 2, what
        assert capsys.readouterr().err == f"convert: error: {refused.value}\n"


@pytest.mark.timeout(20)
def test_a_header_that_claims_more_than_the_file_holds_is_refused_at_once(tmp_path):
    """An array of 2^60 bytes in a file of 60: gguf's reader alone would read it, an empty byte at a time."""
    key = b"huge"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    (tmp_path / "huge.gguf").write_bytes(header + struct.pack("<IIQ", V.ARRAY, V.UINT8, 1 << 60) + b"\0" * 8)
    with pytest.raises(ModelFileError, match="not a readable GGUF file \\(the file ends at byte 60"):
        load_model(tmp_path / "huge.gguf")


def test_a_refusal_from_the_command_line_is_one_line_with_status_2(exported, tmp_path):
    _, path = exported["gpt2", "f16"]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    done = subprocess.run([sys.executable, "-m", "cllm.tools.inference", str(truncated), "-p", "To be"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and f"{truncated}: not a readable GGUF file" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# wherever a MODEL is accepted


def test_load_model_takes_a_gguf_file_by_its_name_or_its_magic(exported, tmp_path):
    original, path = exported["llama-untied", "f32"]
    unnamed = tmp_path / "model.bin"
    unnamed.write_bytes(path.read_bytes())
    for given in (path, str(path), unnamed):
        model, _ = load_model(given)
        assert np.array_equal(model.params, original.params)


def test_the_engines_open_a_gguf_file(exported, bpe):
    _, path = exported["llama-tied", "q8_0"]
    prompt = TEXT[0][:12]

    async def serve():
        async with AsyncModel.open(path, threads=1) as served:
            vectors = await served.embed([TEXT[0], TEXT[1]])
            return vectors, await served.generate(prompt, max_new_tokens=5, temperature=0)

    vectors, completion = anyio.run(serve)
    same = SyncModel.open(path).generate(prompt, max_new_tokens=5, temperature=0)
    assert vectors.shape == (2, CONFIGS["llama-tied"].dim)
    assert (completion.text, completion.completion_tokens) == (same.text, same.completion_tokens)
    assert completion.prompt_tokens == len(bpe.encode(prompt))


def test_convert_takes_a_gguf_file_to_every_format_and_back(exported, tmp_path, capsys):
    original, path = exported["llama-untied", "q8_0"]
    loaded, _ = load_gguf(path, dequantize=True)
    cllm_file, folder, back = tmp_path / "m.cllm", tmp_path / "hf", tmp_path / "back.gguf"
    assert convert.main([str(path), str(cllm_file)]) == 0
    assert convert.main([str(path), str(folder)]) == 0
    assert convert.main([str(folder), str(back), "--gguf-type", "q8_0"]) == 0
    assert "read " in capsys.readouterr().out
    assert np.array_equal(load_model(cllm_file, dequantize=True)[0].params, loaded.params)
    assert np.array_equal(load_hf(folder)[0].params, loaded.params)
    # q8_0 of what q8_0 made is the same blocks: the round trip gives the file back, tensor for tensor
    first, second = gguf.GGUFReader(path), gguf.GGUFReader(back)
    assert [(t.name, t.tensor_type) for t in first.tensors] == [(t.name, t.tensor_type) for t in second.tensors]
    for a, b in zip(first.tensors, second.tensors):
        assert np.array_equal(a.data, b.data), a.name


def test_evaluate_and_generate_take_a_gguf_file(exported, tmp_path, capsys):
    _, path = exported["gpt2", "q8_0"]
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(TEXT[:8]))
    assert evaluate.main([str(path), str(text), "--no-progress", "--threads", "1"]) == 0
    assert "perplexity" in capsys.readouterr().out
    save_model(tmp_path / "same.cllm", *load_gguf(path))
    runs = [subprocess.run([sys.executable, "-m", "cllm.tools.inference", str(model), "-p", "To be", "-n", "6",
                            "--temperature", "0"], capture_output=True, text=True)
            for model in (path, tmp_path / "same.cllm")]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("To be")


@pytest.mark.parametrize("name, tensor_type, note", [("llama-tied", "q8_0", True), ("gpt2", "f16", False)])
def test_a_gguf_file_fine_tunes_in_float32_and_says_so_when_it_was_quantized(exported, tmp_path, capsys, name,
                                                                               tensor_type, note):
    _, path = exported[name, tensor_type]
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(TEXT))
    assert train_model.main([str(corpus), "--out", str(tmp_path / "run"), "--init-from", str(path),
                             "--batch-size", "2", "--steps", "2", "--eval-every", "1000", "--eval-batches", "1",
                             "--threads", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"{path} holds Q8_0 weights: training starts from them dequantized, and trains in float32" in err) == note
    tuned, _ = load_model(tmp_path / "run" / "model.cllm")
    base, _ = load_gguf(path)
    assert tuned.config == base.config and not np.array_equal(tuned.params, base.params)

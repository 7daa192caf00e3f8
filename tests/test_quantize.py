"""cllm's own quantizer (cllm.formats.quantize) and quantized model files: Q8_0, Q4_0 and Q5_0 exactly the `gguf`
package's blocks; Q4_K and Q6_K blocks that gguf dequantizes to within what 4 and 6 bits allow, and one block
worked out by hand; llama.cpp's per-tensor types of its q8_0, q4_0 and q4_k_m files on a SmolLM2-shaped and a
GPT-2-shaped model; .cllm files of quantized blocks, saved, memory-mapped back and refused when spoiled; and
`cllm-convert --quantize`. (Agreement with llama.cpp's own quantizer, block for block, is tools/check_quantize.py's,
which needs llama.cpp.)"""
from __future__ import annotations

import json
import mmap

import gguf
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from cllm.checkpoint import load_model, save_model
from cllm.errors import UsageError
from cllm.formats import quantize as quantizer
from cllm.formats.gguf_file import interleave_rotary_pairs, matrix_parts, quantize_model
from cllm.formats.quantize import quantize, tensor_type
from cllm.model import GPT, ModelConfig
from cllm.model_file_errors import ModelFileError
from cllm.quantized import QuantizedMatrix, quantize_rows
from cllm.tokenizer import Tokenizer
from cllm.tools import _cli, convert

Q = gguf.GGMLQuantizationType
TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
# Relative RMS error (||dequantized - x|| / ||x||) on Gaussian values, as measured on three seeds of 64 x 1024:
# Q6_K 0.0177-0.0178, Q4_K 0.0715-0.0719 (Q4_0, with no minimum and no refit, 0.086). A 4-bit uniform grid over a
# 32-value group's range (about 4.1 sigma) alone would give ~0.079; the bounds leave a little room for the seed.
RELATIVE_RMSE = {Q.Q6_K: 0.019, Q.Q4_K: 0.075}
SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, context_length=2048, dim=576, n_layers=30, n_heads=9,
                      n_kv_heads=3, intermediate_size=1536, rope_theta=100000.0)
GPT2 = ModelConfig(vocab_size=50257, context_length=1024, dim=768, n_layers=12, n_heads=12)
# Small models whose rows are whole super-blocks of 256 (the K-quants apply) or not (the fallbacks do).
LLAMA = ModelConfig(arch="llama", vocab_size=320, context_length=48, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                    intermediate_size=512, tied_head=False)
SMALL_GPT2 = ModelConfig(vocab_size=300, context_length=32, dim=64, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("bpe", TEXT, vocab_size=300)


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, (rows, cols)).astype(np.float32)


def relative_rmse(x: np.ndarray, qtype: Q) -> float:
    y = gguf.quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))


# ---------------------------------------------------------------------------------------------------------------
# the quantizers


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0])
def test_32_value_types_are_the_gguf_packages_blocks(qtype):
    rng = np.random.default_rng(1)
    x = np.concatenate([gaussian(40, 256), rng.standard_t(2, (8, 256)).astype(np.float32),
                        np.zeros((1, 256), np.float32), np.full((1, 256), 3e-8, np.float32)])
    assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, qtype).reshape(len(x), -1))


def test_a_block_of_zeros_has_llama_cpps_scale_whatever_the_sign_of_its_zeros():
    """ggml starts its search for the largest magnitude at +0, so an all-zero Q4_0 block's scale is +0 / -8 = -0.0
    (bytes 00 80) even where the values are -0.0, which the gguf package alone would make +0.0."""
    assert quantize(np.full((1, 32), -0.0, np.float32), Q.Q4_0)[0, :2].tolist() == [0x00, 0x80]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quants_round_trip_within_what_their_bits_allow(qtype):
    x = gaussian(64, 1024)
    assert relative_rmse(x, qtype) < RELATIVE_RMSE[qtype]
    assert relative_rmse(x, qtype) < relative_rmse(x, Q.Q4_0)  # more bits, or a minimum and a refit
    # each value within a step of its group's grid: 15 (Q4_K) or 63 (Q6_K) steps across the group
    y = gguf.quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    group = 32 if qtype == Q.Q4_K else 16
    spread = np.ptp(x.reshape(-1, group), axis=1, keepdims=True)
    steps = 15 if qtype == Q.Q4_K else 63
    assert (np.abs(y - x).reshape(-1, group) <= spread / steps).all()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_0])
def test_quantizing_is_deterministic_and_row_by_row(qtype, monkeypatch):
    x = np.concatenate([gaussian(24, 512, seed=3), np.zeros((2, 512), np.float32)])
    whole = quantize(x, qtype)
    assert np.array_equal(whole, quantize(x.copy(), qtype))
    monkeypatch.setattr(quantizer, "CHUNK_VALUES", 1000)  # a row at a time
    assert np.array_equal(whole, quantize(x, qtype))
    assert np.array_equal(whole[5:9], quantize(x[5:9], qtype))


def test_a_q4_k_block_worked_out_by_hand():
    """Each group of 32 is two ramps 0, 1, ..., 15 times 63/64: the fit is exact (scale 63/64, minimum 0), so every
    group's 6-bit scale is 63 against d = (63/64) / 63 = 2^-6 (float16 0x2400), dmin and the minima are 0, and
    byte l of each 32 holds level l % 16 in both nibbles."""
    x = (np.tile(np.arange(16), 16) * np.float32(63 / 64)).astype(np.float32)[None]
    block = quantize(x, Q.Q4_K)[0]
    assert block[:4].tolist() == [0x00, 0x24, 0x00, 0x00]  # d, dmin
    # scales 0-3 with the top bits of scales 4-7 (63 >> 4 = 3) above; minima 0; scales 4-7's low bits (15)
    assert block[4:16].tolist() == [255] * 4 + [0] * 4 + [15] * 4
    assert block[16:].tolist() == [17 * (i % 16) for i in range(32)] * 4
    assert np.array_equal(gguf.quants.dequantize(block[None], Q.Q4_K), x)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_an_all_zero_super_block_is_zero_bytes(qtype):
    blocks = quantize(np.zeros((2, 256), np.float32), qtype)
    assert not blocks.any() and not gguf.quants.dequantize(blocks, qtype).any()


def test_rows_of_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="whole blocks of 256"):
        quantize(np.zeros((2, 576), np.float32), Q.Q4_K)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's types per tensor


def use_more_bits(n_layers: int) -> set[int]:
    """llama.cpp's use_more_bits layers, written out: the first and last eighth, and every third between."""
    return {i for i in range(n_layers) if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2}


def types_of(config: ModelConfig, file_type: str) -> dict[str, Q]:
    """Every matrix part's GGUF name and type, and a norm's."""
    types = {name: tensor_type(name, (rows, _cols(config, name)), file_type,
                               n_layers=config.n_layers, tied=config.tied_head)
             for parts in matrix_parts(config).values() for name, rows in parts}
    types["blk.0.attn_norm.weight"] = tensor_type("blk.0.attn_norm.weight", (config.dim,), file_type,
                                                  n_layers=config.n_layers, tied=config.tied_head)
    return types


def _cols(config: ModelConfig, name: str) -> int:
    return config.hidden_dim if "ffn_down" in name else config.dim


def test_smollm2s_width_falls_back_as_llama_cpp_does():
    assert use_more_bits(30) == {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    types = types_of(SMOLLM2, "q4_k_m")
    assert types.pop("token_embd.weight") == Q.Q8_0  # the tied head: 576 is not whole 256s
    assert types.pop("blk.0.attn_norm.weight") == Q.F32
    for name, qtype in types.items():
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        more = layer in use_more_bits(30)
        expected = {"ffn_down": Q.Q6_K if more else Q.Q4_K,  # rows of 1536 = 6 x 256
                    "attn_v": Q.Q8_0 if more else Q.Q5_0}.get(kind, Q.Q5_0)  # Q6_K -> Q8_0, Q4_K -> Q5_0
        assert qtype == expected, name
    q4_0 = types_of(SMOLLM2, "q4_0")
    assert q4_0.pop("token_embd.weight") == Q.Q8_0  # the head's Q6_K, fallen back
    assert set(q4_0.values()) == {Q.Q4_0, Q.F32}
    assert set(types_of(SMOLLM2, "q8_0").values()) == {Q.Q8_0, Q.F32}


def test_gpt2s_q4_k_m_types():
    types = types_of(GPT2, "q4_k_m")
    assert types.pop("token_embd.weight") == Q.Q6_K  # the tied head
    assert types.pop("blk.0.attn_norm.weight") == Q.F32
    assert use_more_bits(12) == {0, 3, 6, 9, 10, 11}
    for name, qtype in types.items():
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        more = kind in ("attn_qkv", "ffn_down") and layer in use_more_bits(12)
        assert qtype == (Q.Q6_K if more else Q.Q4_K), name
    assert tensor_type("position_embd.weight", (1024, 768), "q4_k_m", n_layers=12, tied=True) == Q.F32
    assert tensor_type("blk.0.attn_qkv.bias", (2304,), "q4_k_m", n_layers=12, tied=True) == Q.F32
    q4_0 = types_of(GPT2, "q4_0")
    assert q4_0.pop("token_embd.weight") == Q.Q6_K
    assert set(q4_0.values()) == {Q.Q4_0, Q.F32}


def test_an_untied_head_is_the_output_and_the_embedding_keeps_the_files_type():
    for file_type, embedding, head in (("q4_k_m", Q.Q4_K, Q.Q6_K), ("q4_0", Q.Q4_0, Q.Q6_K), ("q8_0", Q.Q8_0, Q.Q8_0)):
        assert tensor_type("token_embd.weight", (320, 256), file_type, n_layers=4, tied=False) == embedding
        assert tensor_type("output.weight", (320, 256), file_type, n_layers=4, tied=False) == head
    assert tensor_type("blk.0.attn_q.weight", (40, 40), "q8_0", n_layers=1, tied=True) == Q.F16  # not whole 32s


# ---------------------------------------------------------------------------------------------------------------
# quantized .cllm files


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    model = GPT(config, seed=seed)
    model.params += np.random.default_rng(seed).normal(0, 0.05, model.params.size).astype(np.float32)
    return model


def mapped(array: np.ndarray) -> bool:
    """Whether array is a view of a memory map (through a memoryview of it, as np.frombuffer has it)."""
    while array is not None and not isinstance(array, mmap.mmap):
        array = array.obj if isinstance(array, memoryview) else array.base
    return array is not None


def test_quantize_model_holds_each_part_as_the_rule_types_it():
    model = random_model(LLAMA)
    original = {name: view.copy() for name, view in model.p.items()}
    quantize_model(model, "q4_k_m")
    assert set(model.q) == set(matrix_parts(LLAMA))
    for name, parts in matrix_parts(LLAMA).items():
        matrix = model.q[name]
        assert [part.rows for part in matrix.parts] == [rows for _, rows in parts]
        assert list(matrix.types) == [tensor_type(g, (rows, matrix.shape[1]), "q4_k_m", n_layers=4, tied=False).name
                                      for g, rows in parts]
        want = original[name] if name in ("wte", "lm_head") else original[name].T
        start = 0
        for part in matrix.parts:
            assert np.array_equal(part.data, quantize_rows(want[start:start + part.rows], part.ggml_type).data)
            start += part.rows
        assert not model.p[name].any()  # the float32 view is unused, zero
    assert np.array_equal(model.p["ln_f.weight"], original["ln_f.weight"])


@pytest.mark.parametrize("config", [LLAMA, SMALL_GPT2], ids=["llama", "gpt2"])
def test_a_quantized_model_file_maps_its_blocks_back(config, bpe, tmp_path):
    model = random_model(config)
    quantize_model(model, "q4_k_m")
    path = tmp_path / "q.cllm"
    save_model(path, model, bpe, metadata={"step": "7"})
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
    described = json.loads(metadata["quantized"])
    assert described["h.0.attn.c_attn.weight"]["cols"] == config.dim
    loaded, tokenizer = load_model(path)
    assert tokenizer.to_json() == bpe.to_json() and metadata["step"] == "7"
    assert set(loaded.q) == set(model.q)
    for name, matrix in model.q.items():
        for ours, theirs in zip(matrix.parts, loaded.q[name].parts):
            assert ours.ggml_type == theirs.ggml_type and np.array_equal(ours.data, theirs.data)
            assert mapped(theirs.data) and not theirs.data.flags.writeable
    for name, view in model.p.items():
        assert np.array_equal(loaded.p[name], view), name
    # saved over itself while mapped: the file is replaced, the mapping stays good
    save_model(path, loaded, tokenizer)
    again, _ = load_model(path)
    for name, matrix in again.q.items():
        assert all(np.array_equal(a.data, b.data) for a, b in zip(matrix.parts, loaded.q[name].parts))
    widened, _ = load_model(path, dequantize=True)
    assert not widened.q
    for name, matrix in model.q.items():
        want = matrix.dequantize() if name in ("wte", "lm_head") else matrix.dequantize().T
        assert np.array_equal(widened.p[name], want), name


def test_saving_parts_that_are_not_the_gguf_tensors_is_refused(bpe, tmp_path):
    model = random_model(LLAMA)
    qkv = model.p["h.0.attn.c_attn.weight"].T
    model.q["h.0.attn.c_attn.weight"] = QuantizedMatrix.of(quantize_rows(qkv, Q.Q8_0))  # q, k, v as one part
    with pytest.raises(ValueError, match="expected"):
        save_model(tmp_path / "bad.cllm", model, bpe)


def spoil(src, dst, *, metadata=None, tensors=None) -> None:
    """A copy of the .cllm file src at dst with metadata entries and tensors replaced."""
    with safe_open(src, framework="np") as f:
        found = {name: f.get_tensor(name) for name in f.keys()}
        header = f.metadata()
    safetensors.numpy.save_file(found | (tensors or {}), dst, metadata=header | (metadata or {}))


def test_a_spoiled_quantized_file_is_refused_in_one_line(bpe, tmp_path, capsys):
    model = random_model(LLAMA)
    quantize_model(model, "q4_k_m")
    good = tmp_path / "good.cllm"
    save_model(good, model, bpe)
    with safe_open(good, framework="np") as f:
        described = json.loads(f.metadata()["quantized"])
        part = f.get_tensor("h.0.attn.c_attn.weight.1")
    unknown = json.loads(json.dumps(described))
    unknown["h.0.attn.c_attn.weight"]["parts"][1]["type"] = "Q9_9"
    rows = json.loads(json.dumps(described))
    rows["h.0.mlp.c_fc.weight"]["parts"][0]["rows"] += 1
    cases = {
        "part of the wrong size": (dict(tensors={"h.0.attn.c_attn.weight.1": part[:-1]}),
                                   "'h.0.attn.c_attn.weight.1' has shape"),
        "float32 for blocks": (dict(tensors={"h.0.attn.c_attn.weight.1": part.astype(np.float32)}),
                               "'h.0.attn.c_attn.weight.1' is F32, expected U8"),
        "unknown type": (dict(metadata={"quantized": json.dumps(unknown)}), "a part of type 'Q9_9'"),
        "rows that are not the tensors'": (dict(metadata={"quantized": json.dumps(rows)}),
                                           "'h.0.mlp.c_fc.weight' must be described as parts of [512, 512] rows"),
        "not a matrix": (dict(metadata={"quantized": json.dumps({"ln_f.weight": {}})}),
                         "'ln_f.weight' is not a matrix that cllm quantizes"),
        "not JSON": (dict(metadata={"quantized": "{"}), "'quantized' is not valid JSON"),
    }
    for what, (change, message) in cases.items():
        path = tmp_path / f"{what}.cllm"
        spoil(good, path, **change)
        with pytest.raises(ModelFileError) as refused:
            load_model(path)
        assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value), what
        assert "\n" not in str(refused.value), what
        with pytest.raises(SystemExit) as exited:
            _cli.run("convert", lambda: convert.main([str(path), str(tmp_path / "out.cllm")]))
        assert exited.value.code == 2, what
        assert capsys.readouterr().err == f"convert: error: {refused.value}\n"


# ---------------------------------------------------------------------------------------------------------------
# cllm-convert --quantize


def test_convert_quantizes_to_cllm_and_gguf_alike(bpe, tmp_path, capsys):
    model = random_model(LLAMA)
    src = tmp_path / "model.cllm"
    save_model(src, model, bpe)
    assert convert.main([str(src), str(tmp_path / "q.cllm"), "--quantize", "q4_k_m"]) == 0
    assert convert.main([str(src), str(tmp_path / "q.gguf"), "--quantize", "q4_k_m"]) == 0
    out = capsys.readouterr().out
    assert "quantized q4_k_m: " in out and f"wrote {tmp_path / 'q.gguf'}" in out
    quantized, _ = load_model(tmp_path / "q.cllm")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    for name, parts in matrix_parts(LLAMA).items():
        for (gguf_name, rows), part in zip(parts, quantized.q[name].parts):
            assert tensors[gguf_name].tensor_type == tensor_type(gguf_name, (rows, part.cols), "q4_k_m", n_layers=4,
                                                                 tied=False), gguf_name
            data = part.data
            if ".attn_q." in gguf_name or ".attn_k." in gguf_name:  # llama.cpp's row order
                data = interleave_rotary_pairs(data, LLAMA.n_heads if ".attn_q." in gguf_name else LLAMA.n_kv_heads)
            assert np.array_equal(np.asarray(tensors[gguf_name].data).reshape(data.shape), data), gguf_name
    assert tensors["output_norm.weight"].tensor_type == Q.F32
    # the GGUF file's weights are the .cllm file's, and a quantized .cllm converts on
    from_gguf, _ = load_model(tmp_path / "q.gguf", dequantize=True)
    from_cllm, _ = load_model(tmp_path / "q.cllm", dequantize=True)
    assert all(np.array_equal(from_gguf.p[name], view) for name, view in from_cllm.p.items())
    assert convert.main([str(tmp_path / "q.cllm"), str(tmp_path / "q8.gguf"), "--gguf-type", "q8_0",
                         "--quantize", "q8_0"]) == 0
    assert {t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors} == {Q.Q8_0, Q.F32}


def test_a_small_gpt2_falls_back_per_tensor_in_gguf(bpe, tmp_path):
    src = tmp_path / "gpt2.cllm"
    save_model(src, random_model(SMALL_GPT2), bpe)
    assert convert.main([str(src), str(tmp_path / "q.gguf"), "--gguf-type", "q4_k_m"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["token_embd.weight"] == Q.Q8_0 and types["position_embd.weight"] == Q.F32
    assert types["blk.0.attn_qkv.weight"] == Q.Q5_0 and types["blk.1.attn_qkv.weight"] == Q.Q8_0
    assert types["blk.0.ffn_down.weight"] == Q.Q4_K and types["blk.1.ffn_down.weight"] == Q.Q6_K
    assert types["blk.0.attn_qkv.bias"] == Q.F32


def test_convert_refuses_quantize_where_it_cannot_apply(bpe, tmp_path, capsys):
    src = tmp_path / "model.cllm"
    save_model(src, random_model(SMALL_GPT2), bpe)
    for argv, message in (([str(tmp_path / "folder"), "--quantize", "q4_0"], "--quantize applies only to a .cllm or"),
                          ([str(tmp_path / "x.gguf"), "--quantize", "q4_0", "--gguf-type", "q8_0"], "disagree")):
        with pytest.raises(UsageError, match=message):
            convert.main([str(src), *argv])
        with pytest.raises(SystemExit) as exited:
            _cli.run("convert", lambda: convert.main([str(src), *argv]))
        assert exited.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "folder").exists()

"""GGUF in and out for the Qwen families (cllm.formats.gguf_file, gguf_in): qwen2, with biases on q, k and v, and
qwen3, with per-head norms of q and k and heads set apart from the width. cllm's export reads back to the same
config, and to the weights its type made, in every type it writes; its tensor names and metadata are those that
llama.cpp's converter writes (gguf's own constants), q and k in Hugging Face's row order (llama.cpp runs both with
NEOX RoPE); a quantized file computes on its blocks, biases included, to the logits of its widened weights within
the activations' rounding, and decoding steps are the full pass; transformers reads the same files to the same
logits; what cllm, or llama.cpp, does not compute is refused in one line. Files are tiny and made here, offline."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from cllm.checkpoint import load_model, save_model
from cllm.errors import UsageError
from cllm.formats.gguf_file import quantize_model, save_gguf
from cllm.formats.gguf_in import load_gguf
from cllm.formats.hf import hf_tensors
from cllm.formats.quantize import quantize
from cllm.model import ModelConfig
from cllm.model_file_errors import ModelFileError
from tests.test_gguf_in import (assert_transformers_logits, bpe, export_each, kind,  # noqa: F401 (bpe: a fixture)
                                 random_model, retype, rewrite)
from tests.test_llama_interop import gguf_fields
from tests.test_quantized_model import DEQUANTIZED_TOLERANCE, assert_decoding_steps_are_the_full_pass, prompt

Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR
V = gguf.GGUFValueType
CONFIGS = {
    # Qwen2.5-0.5B's kind: a tied head, two key/value heads, biases on q, k and v; rows of 256, so that q4_k_m
    # gives Q4_K and Q6_K parts
    "qwen2": ModelConfig(arch="qwen2", vocab_size=320, context_length=48, dim=256, n_layers=2, n_heads=4,
                         n_kv_heads=2, intermediate_size=256, rope_theta=1e6, norm_eps=1e-6),
    # Qwen3-0.6B's kind: a tied head, heads of 128 set apart from the width (256 / 4), so queries 512 wide
    "qwen3": ModelConfig(arch="qwen3", vocab_size=320, context_length=48, dim=256, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=128, intermediate_size=256, rope_theta=1e6, norm_eps=1e-6),
    # an untied head, and rows too narrow for K-quants (q4_k_m falls back to Q5_0 and Q8_0)
    "qwen3-untied": ModelConfig(arch="qwen3", vocab_size=320, context_length=48, dim=64, n_layers=2, n_heads=4,
                                n_kv_heads=1, head_dim=32, intermediate_size=96, tied_head=False, rope_theta=1e6),
}
FILE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
QUANTIZED = ("q8_0", "q4_0", "q4_k_m")
# What llama.cpp's converter names each of a layer's Hugging Face tensors (gguf.TensorNameMap's QWEN2 and QWEN3).
LAYER_TENSORS = {T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
                 T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj", T.FFN_NORM: "post_attention_layernorm",
                 T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj"}
QK_NORMS = {T.ATTN_Q_NORM: "self_attn.q_norm", T.ATTN_K_NORM: "self_attn.k_norm"}


@pytest.fixture(scope="module")
def exported(bpe, tmp_path_factory):
    return export_each(tmp_path_factory.mktemp("qwen"), bpe, CONFIGS, FILE_TYPES)


def gguf_name(tensor: gguf.MODEL_TENSOR, suffix: str = "weight", layer: int | None = None) -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=layer)}.{suffix}"


def converter_tensors(model) -> dict[str, np.ndarray]:
    """What llama.cpp's converter (its Qwen2Model and Qwen3Model) makes of the model's Hugging Face tensors: each
    under the name gguf's constants give it, as it is, (out, in), q and k rows unmoved."""
    cfg, hf = model.config, hf_tensors(model)
    assert {T.ATTN_Q_NORM, T.ATTN_K_NORM} <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3])
    tensors = {gguf_name(T.TOKEN_EMBD): hf["model.embed_tokens.weight"],
               gguf_name(T.OUTPUT_NORM): hf["model.norm.weight"]}
    if not cfg.tied_head:
        tensors[gguf_name(T.OUTPUT)] = hf["lm_head.weight"]
    parts = LAYER_TENSORS | (QK_NORMS if cfg.qk_norm else {})
    for i in range(cfg.n_layers):
        for tensor, hf_name in parts.items():
            tensors[gguf_name(tensor, layer=i)] = hf[f"model.layers.{i}.{hf_name}.weight"]
        if cfg.qkv_bias:
            for tensor in (T.ATTN_Q, T.ATTN_K, T.ATTN_V):
                tensors[gguf_name(tensor, "bias", i)] = hf[f"model.layers.{i}.{LAYER_TENSORS[tensor]}.bias"]
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# the files cllm writes


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_an_export_reads_back_to_its_config_and_the_weights_its_types_made(exported, name, file_type):
    original, path = exported[name, file_type]
    model, _ = load_gguf(path, dequantize=True)
    assert model.config == original.config
    file_tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    theirs, ours = converter_tensors(original), converter_tensors(model)
    assert set(file_tensors) == set(theirs)
    for tensor_name, values in ours.items():
        qtype = file_tensors[tensor_name].tensor_type
        if values.ndim == 1:  # biases and norms stay float32 in every type, as llama.cpp keeps them
            assert qtype == Q.F32 and np.array_equal(values, theirs[tensor_name]), tensor_name
            continue
        made = gguf.quants.dequantize(quantize(np.ascontiguousarray(theirs[tensor_name]), qtype), qtype)
        assert np.array_equal(values, made.reshape(values.shape)), tensor_name
    if file_type == "f32":
        assert np.array_equal(model.params, original.params)
        ids = prompt(model.config, 20)[None]
        assert np.array_equal(model.logits(ids), original.logits(ids))


@pytest.mark.parametrize("name", CONFIGS)
def test_the_metadata_is_what_llama_cpps_converter_writes(exported, name):
    """TextModel.set_gguf_parameters' keys, and key_length and value_length where config.json names head_dim, as
    Qwen3's always does; none of llama's rope.dimension_count or vocab_size."""
    original, path = exported[name, "q4_k_m"]
    cfg = original.config
    fields = gguf_fields(gguf.GGUFReader(path))
    llm, attention, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    want = {llm.BLOCK_COUNT: cfg.n_layers, llm.CONTEXT_LENGTH: cfg.context_length, llm.EMBEDDING_LENGTH: cfg.dim,
            llm.FEED_FORWARD_LENGTH: cfg.intermediate_size, attention.HEAD_COUNT: cfg.n_heads,
            attention.HEAD_COUNT_KV: cfg.n_kv_heads, attention.LAYERNORM_RMS_EPS: pytest.approx(cfg.norm_eps),
            rope.FREQ_BASE: cfg.rope_theta}
    if cfg.arch == "qwen3":
        want |= {attention.KEY_LENGTH: cfg.head_size, attention.VALUE_LENGTH: cfg.head_size}
    assert {key: value for key, value in fields.items() if key.startswith(f"{cfg.arch}.")} == \
        {key.format(arch=cfg.arch): value for key, value in want.items()}
    assert fields[gguf.Keys.General.ARCHITECTURE] == gguf.MODEL_ARCH_NAMES[
        {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[cfg.arch]]
    assert fields[gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_q_and_k_keep_hugging_faces_row_order(exported):
    """llama.cpp's qwen2 and qwen3 rotate halves of a head (NEOX RoPE), as Hugging Face does: the converter moves
    no row of q_proj or k_proj, where it interleaves a llama's."""
    original, path = exported["qwen3", "f32"]
    file_tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    hf = hf_tensors(original)
    for tensor, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        rows = np.asarray(file_tensors[f"blk.1.{tensor}.weight"].data)
        assert np.array_equal(rows, hf[f"model.layers.1.self_attn.{proj}.weight"])


def test_a_qwen2_model_with_heads_apart_from_its_width_is_refused_before_anything_is_written(bpe, tmp_path):
    config = ModelConfig(arch="qwen2", vocab_size=320, context_length=16, dim=64, n_layers=1, n_heads=4, head_dim=32)
    with pytest.raises(UsageError) as refused:
        save_gguf(tmp_path / "m.gguf", random_model(config), bpe)
    assert "llama.cpp's qwen2 architecture has heads of embedding_length / head_count" in str(refused.value)
    assert "\n" not in str(refused.value) and not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------------------------
# computing on the blocks


@pytest.mark.parametrize("file_type", QUANTIZED)
@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_the_quantized_model_is_the_dequantized_one_to_its_activations_rounding(exported, name, file_type):
    _, path = exported[name, file_type]
    model, _ = load_gguf(path)
    dense, _ = load_gguf(path, dequantize=True)
    layers = {f"h.{i}.{m}" for i in range(model.config.n_layers)
              for m in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    assert layers <= set(model.q)
    ids = prompt(model.config, 20)[None]
    want = dense.logits(ids)
    error = np.abs(model.logits(ids) - want).max() / np.abs(want).max()
    assert 0 < error < DEQUANTIZED_TOLERANCE  # 0 would mean the float32 weights were used


def test_q_k_and_v_keep_their_own_types_and_the_bias_is_added_to_the_blocks_product(exported):
    """q4_k_m gives the last layer's attn_v Q6_K (llama.cpp's use_more_bits) and q and k Q4_K: c_attn holds the three
    parts as they are. Without its bias, the quantized model parts from the dense one far more than rounding does."""
    _, path = exported["qwen2", "q4_k_m"]
    model, _ = load_gguf(path)
    assert model.q["h.0.attn.c_attn.weight"].types == ("Q4_K", "Q4_K", "Q4_K")
    assert model.q["h.1.attn.c_attn.weight"].types == ("Q4_K", "Q4_K", "Q6_K")
    dense, _ = load_gguf(path, dequantize=True)
    ids = prompt(model.config, 20)[None]
    want = dense.logits(ids)
    rounding = np.abs(model.logits(ids) - want).max()
    for i in range(model.config.n_layers):
        model.p[f"h.{i}.attn.c_attn.bias"][...] = 0.0
    assert np.abs(model.logits(ids) - want).max() > 3 * rounding


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_decoding_steps_are_the_full_pass_on_the_same_blocks(exported, name):
    assert_decoding_steps_are_the_full_pass(load_gguf(exported[name, "q4_k_m"][1])[0])


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_a_model_quantized_in_memory_runs_as_its_gguf_and_cllm_files_do(bpe, tmp_path, name):
    model = random_model(CONFIGS[name])
    quantize_model(model, "q4_k_m")
    loaded, _ = load_gguf(save_gguf(tmp_path / "m.gguf", model, bpe, tensor_type="q4_k_m"))
    save_model(tmp_path / "m.cllm", model, bpe)
    held, _ = load_model(tmp_path / "m.cllm")
    ids = prompt(model.config, 10)[None]
    want = model.logits(ids)
    np.testing.assert_array_equal(loaded.logits(ids), want)
    np.testing.assert_array_equal(held.logits(ids), want)


# A qwen2 file of every other type cllm reads: q, k and v of types the kernels do not take (their matrix is widened),
# the biases in F16 and the norms in BF16 (llama.cpp's converter keeps both F32, but a file may hold any).
MIXED_TYPES = {"attn_q": Q.Q5_K, "attn_k": Q.Q4_1, "attn_v": Q.Q5_1, "attn_output": Q.Q6_K, "ffn_gate": Q.Q4_0,
               "ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q4_K, "attn_norm": Q.BF16, "ffn_norm": Q.BF16}
MIXED_BIASES = Q.F16


def test_a_qwen2_file_of_mixed_types_reads_each_tensor_as_gguf_dequantizes_it(exported, tmp_path):
    retype(exported["qwen2", "f32"][1], tmp_path / "mixed.gguf",
           lambda name: MIXED_BIASES if name.endswith(".bias") else MIXED_TYPES.get(kind(name)),
           np.random.default_rng(11))
    dense, _ = load_gguf(tmp_path / "mixed.gguf", dequantize=True)
    ours = converter_tensors(dense)
    for t in gguf.GGUFReader(tmp_path / "mixed.gguf").tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(ours[t.name].reshape(want.shape), want), t.name
    model, _ = load_gguf(tmp_path / "mixed.gguf")
    assert "h.0.attn.c_attn.weight" not in model.q and model.q["h.0.mlp.c_proj.weight"].types == ("Q8_0",)
    ids = prompt(model.config, 12)[None]
    want = dense.logits(ids)
    assert np.abs(model.logits(ids) - want).max() < DEQUANTIZED_TOLERANCE * np.abs(want).max()


# ---------------------------------------------------------------------------------------------------------------
# the peers


@pytest.mark.parametrize("name, file_type", [("qwen2", "f32"), ("qwen3", "f32"), ("qwen3-untied", "f16"),
                                             ("qwen2", "q4_k_m"), ("qwen3", "q8_0")])
def test_transformers_reads_the_same_file_to_the_same_logits(exported, name, file_type):
    _, path = exported[name, file_type]
    model, _ = load_gguf(path, dequantize=True)
    # transformers' GGUF reader takes no qwen3.attention.key_length, and Qwen3Config's head_dim defaults to 128:
    # say it (as llama.cpp reads it from the file)
    extra = {"head_dim": model.config.head_size} if model.config.arch == "qwen3" else {}
    assert_transformers_logits(path, model, prompt(model.config, 16)[None], **extra)


# ---------------------------------------------------------------------------------------------------------------
# refusals


def refusals() -> dict[str, tuple[str, dict, str]]:
    """Each way to spoil a qwen file: which file, rewrite's arguments, and the words of the refusal."""
    return {
        "sliding window": ("qwen3", {"fields": {"qwen3.attention.sliding_window": (4096, V.UINT32)}},
                           "qwen3.attention.sliding_window = 4096 is a setting that cllm does not compute"),
        "rope scaling": ("qwen2", {"fields": {"qwen2.rope.scaling.type": ("yarn", V.STRING)}},
                         "qwen2.rope.scaling.type = 'yarn' is a setting that cllm does not compute"),
        "values apart from keys": ("qwen3", {"fields": {"qwen3.attention.value_length": (64, V.UINT32)}},
                                   ("qwen3.attention.value_length is 64, which cllm does not compute (its heads are "
                                    "attention.key_length = 128 wide)")),
        "rotating part of a head": ("qwen3", {"fields": {"qwen3.rope.dimension_count": (64, V.UINT32)}},
                                    ("qwen3.rope.dimension_count is 64, which cllm does not compute (its RoPE "
                                     "rotates whole heads")),
        "qwen2 heads apart": ("qwen2", {"fields": {"qwen2.attention.key_length": (128, V.UINT32)}},
                              ("qwen2.attention.key_length is 128, which cllm does not compute (llama.cpp's qwen2 "
                               "heads are embedding_length / head_count = 64 wide)")),
        "odd heads": ("qwen3", {"fields": {"qwen3.attention.key_length": (127, V.UINT32)}},
                      "the head size 127 must be even: RoPE rotates pairs"),
        "missing norm": ("qwen3", {"drop": ("blk.0.attn_q_norm.weight",)}, "missing tensors blk.0.attn_q_norm.weight"),
        "missing bias": ("qwen2", {"drop": ("blk.1.attn_v.bias",)}, "missing tensors blk.1.attn_v.bias"),
        "output bias": ("qwen2", {"tensors": {"blk.0.attn_output.bias": (np.zeros(256, np.float32), Q.F32)}},
                        "unexpected tensors for a qwen2 model: blk.0.attn_output.bias"),
        "norm of a head's width": ("qwen3", {"tensors": {"blk.1.attn_k_norm.weight": (np.ones(64, np.float32),
                                                                                      Q.F32)}},
                                   "tensor 'blk.1.attn_k_norm.weight' has shape (64,), expected (128,)"),
    }


@pytest.mark.parametrize("what", refusals())
def test_what_cllm_or_llama_cpp_does_not_compute_is_refused_in_one_line_naming_it(exported, tmp_path, what):
    name, change, message = refusals()[what]
    _, path = exported[name, "f32"]
    rewrite(path, tmp_path / "spoiled.gguf", **change)
    with pytest.raises(ModelFileError) as refused:
        load_model(tmp_path / "spoiled.gguf")
    assert str(refused.value).startswith(f"{tmp_path / 'spoiled.gguf'}: ") and message in str(refused.value)
    assert "\n" not in str(refused.value)

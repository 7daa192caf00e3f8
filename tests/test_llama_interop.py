"""Hugging Face Llama folders in and out, and GGUF out, checked against the real peers: cllm loads what
`transformers` writes (LlamaForCausalLM, random weights) and computes its logits; `transformers` loads what cllm
writes and computes the same; the `gguf` package reads back what cllm writes. Two shapes: SmolLM2-135M's (9 query
heads sharing 3 key/value heads, a tied head, its config.json keys and its kind of tokenizer) cut to 2 layers, and
a small untied one. Tokenizers are built here, offline. Needs the interop extra (pip install -e ".[interop]")."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch", reason="the interop tests need torch: pip install -e \".[interop]\"")
transformers = pytest.importorskip("transformers",
                                   reason="the interop tests need transformers: pip install -e \".[interop]\"")
gguf = pytest.importorskip("gguf")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from cllm.checkpoint import load_model, save_model  # noqa: E402
from cllm.formats.gguf_file import save_gguf  # noqa: E402
from cllm.formats.hf import HFFolderError, hf_tensors, load_hf, save_hf  # noqa: E402
from cllm.generate import generate  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402
from cllm.tools import convert  # noqa: E402
from tests.test_interop import assert_logits_close, fine_tune_and_export, hf_logits  # noqa: E402  (GPT-2's)

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
        "Act 3, scene 1, lines 56 to 89 (1603)"] * 20

# SmolLM2-135M's config.json, as the Hub has it, but for its 30 layers and its context of 8192.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 2048, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 2, "num_key_value_heads": 3,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "vocab_size": 49152}
SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A small untied model, its config made by transformers itself (transformers 5 writes rope_parameters).
SMALL_CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                    num_hidden_layers=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------------------------
# building folders as the Hub has them, offline


def smollm2_tokenizer() -> HFTokenizer:
    """A byte-level BPE built as SmolLM2's is: digits split one by one, then GPT-2's byte-level splitting, with its
    first three special tokens."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SMOLLM2_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT, trainer)
    return tokenizer


def tinyllama_tokenizer(texts=TEXT, vocab_size: int = 200) -> HFTokenizer:
    """A BPE built as Llama's (TinyLlama's) is: <unk>, <s>, </s>, then the 256 byte tokens <0x00>..<0xFF> for
    byte fallback, then the pieces merged from texts; "▁" for spaces and before the text; <s> before every text."""
    trained = HFTokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted(learned["vocab"], key=learned["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = HFTokenizer(models.BPE({piece: i for i, piece in enumerate(pieces)}, merges, unk_token="<unk>",
                                       fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens(specials)
    tokenizer.normalizer = trained.normalizer
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return tokenizer


TOKENIZERS = {
    "smollm2": (smollm2_tokenizer, {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                                    "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                                    "model_max_length": 8192}),
    "tinyllama": (tinyllama_tokenizer, {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                                        "legacy": False, "clean_up_tokenization_spaces": False,
                                        "model_max_length": 2048}),
}


def hf_llama(folder, *, config: dict, tokenizer: str, seed: int = 0, raw_config: bool = False):
    """A random LlamaForCausalLM made and saved by transformers, with a tokenizer as the Hub's. raw_config writes
    config as config.json, as the Hub has it, over the one transformers wrote."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():  # norms other than 1, so that every tensor's mapping matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    if raw_config:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    build, tokenizer_config = TOKENIZERS[tokenizer]
    build().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return model


def small_config(tokenizer: str) -> dict:
    ids = {"smollm2": (0, 0), "tinyllama": (1, 2)}[tokenizer]
    return SMALL_CONFIG | {"vocab_size": 512, "bos_token_id": ids[0], "eos_token_id": ids[1]}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M's shape and files, 2 layers: (folder, the transformers model)."""
    folder = tmp_path_factory.mktemp("smollm2")
    return folder, hf_llama(folder, config=SMOLLM2_CONFIG, tokenizer="smollm2", raw_config=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small untied model with a TinyLlama-style tokenizer: (folder, the transformers model)."""
    folder = tmp_path_factory.mktemp("small")
    return folder, hf_llama(folder, config=small_config("tinyllama"), tokenizer="tinyllama")


def hf_greedy(model, ids: np.ndarray, n: int, vocab_size: int) -> list[int]:
    """transformers' greedy tokens, drawn as cllm draws them: from the tokenizer's ids only (a model's vocabulary
    may have rows past the tokenizer's, as SmolLM2's shape has here)."""
    past_the_tokenizer = list(range(vocab_size, model.config.vocab_size))
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids).long(), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, suppress_tokens=past_the_tokenizer or None)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------------------------------------------
# reading


def test_a_smollm2_shaped_folder_loads_with_its_settings_tokenizer_and_logits(smollm2):
    folder, reference = smollm2
    model, tokenizer = load_model(folder)
    assert model.config == ModelConfig(arch="llama", vocab_size=49152, context_length=2048, dim=576, n_layers=2,
                                       n_heads=9, n_kv_heads=3, intermediate_size=1536, rope_theta=100000.0,
                                       norm_eps=1e-5, tied_head=True)
    assert (tokenizer.separator, tokenizer.separator_id) == ("<|endoftext|>", 0)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = TEXT[4] + " 2024"
    assert tokenizer.encode(text).tolist() == theirs(text)["input_ids"]
    ids = tokenizer.encode(text)[None]
    assert_logits_close(model.logits(ids), hf_logits(reference, ids))


def test_an_untied_folder_with_a_llama_tokenizer_loads_with_its_head_and_logits(small):
    folder, reference = small
    model, tokenizer = load_model(folder)
    cfg = model.config
    assert (cfg.tied_head, cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps) == (False, 2, 500.0, 1e-6)
    assert np.array_equal(model.p["lm_head"], reference.lm_head.weight.detach().numpy())
    # Llama's tokenizer puts <s> before the text, as transformers' does, and ends documents with </s>.
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode(TEXT[1]).tolist() == theirs(TEXT[1])["input_ids"]
    assert tokenizer.encode(TEXT[1])[0] == 1 and (tokenizer.separator, tokenizer.separator_id) == ("</s>", 2)
    ids = tokenizer.encode(TEXT[0])[None]
    assert_logits_close(model.logits(ids), hf_logits(reference, ids))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_are_widened_exactly(tmp_path, dtype):
    reference = hf_llama(tmp_path, config=small_config("smollm2"), tokenizer="smollm2")
    reference.to(getattr(torch, dtype)).save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path)
    theirs = {name: t.float().numpy() for name, t in reference.state_dict().items()}
    ours = hf_tensors(model)
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert np.array_equal(tensor, theirs[name]), name


def test_sharded_weights_load_as_the_whole(tmp_path, small):
    folder, reference = small
    shutil.copytree(folder, tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors").unlink()
    reference.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    whole, _ = load_model(folder)
    sharded, _ = load_model(tmp_path / "sharded")
    assert np.array_equal(whole.params, sharded.params)


@pytest.mark.parametrize("head, loads", [("the embedding", True), ("another", False)])
def test_a_tied_model_whose_file_repeats_its_head_loads_only_if_it_is_the_embedding(tmp_path, head, loads):
    hf_llama(tmp_path, config=small_config("smollm2") | {"tie_word_embeddings": True}, tokenizer="smollm2")
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding if head == "the embedding" else embedding + 1
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    if loads:
        assert np.array_equal(load_model(tmp_path)[0].p["wte"], embedding)
    else:
        with pytest.raises(HFFolderError, match="lm_head.weight differs from the token embedding"):
            load_model(tmp_path)


REFUSED = [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
           ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
           ("attention_bias", True), ("mlp_bias", True), ("pretraining_tp", 2),
           ("rope_interleaved", True), ("hidden_act", "gelu"), ("model_type", "mistral")]


@pytest.mark.parametrize("setting, value", REFUSED)
def test_settings_that_change_the_arithmetic_are_refused_in_one_line_naming_them(small, tmp_path, setting, value):
    assert_refused_in_one_line(small[0], tmp_path, setting, value)


def assert_refused_in_one_line(folder, tmp_path, setting: str, value) -> None:
    """A copy of folder whose config.json sets setting to value is refused in one line that names it."""
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {setting: value}))
    with pytest.raises(HFFolderError, match=setting) as refused:
        load_model(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_refusal_reaches_the_command_line_as_one_line(small, tmp_path):
    folder, _ = small
    shutil.copytree(folder, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    done = subprocess.run([sys.executable, "-m", "cllm.tools.convert", str(tmp_path / "hf"), str(tmp_path / "m.cllm")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "attention_bias=true" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# writing


@pytest.mark.parametrize("which", ["smollm2", "small"])
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(request, tmp_path, which):
    folder, _ = request.getfixturevalue(which)
    model, tokenizer = load_model(folder)
    save_hf(tmp_path, model, tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.rope_parameters["rope_theta"] == model.config.rope_theta
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode(TEXT[2])
    assert their_tokenizer(TEXT[2])["input_ids"] == ids.tolist()
    assert their_tokenizer.eos_token_id == theirs.config.eos_token_id == tokenizer.separator_id
    # bos: SmolLM2's <|endoftext|> both starts and ends texts; Llama's tokenizer starts every text with <s>
    assert their_tokenizer.bos_token_id == theirs.config.bos_token_id == {"smollm2": 0, "small": 1}[which]
    assert_logits_close(model.logits(ids[None]), hf_logits(theirs, ids[None]))


@pytest.mark.parametrize("tied", [True, False])
def test_hf_round_trip_is_bit_for_bit(tmp_path, tied):
    bpe = Tokenizer.train("bpe", TEXT, vocab_size=300)
    model = GPT(ModelConfig(arch="llama", vocab_size=bpe.vocab_size + 3, context_length=16, dim=32, n_layers=2,
                            n_heads=4, n_kv_heads=1, intermediate_size=48, rope_theta=20000.0, norm_eps=1e-6,
                            tied_head=tied), seed=1)
    save_hf(tmp_path, model, bpe)
    loaded, tokenizer = load_hf(tmp_path)
    assert loaded.config == model.config
    assert np.array_equal(loaded.params, model.params)
    assert tokenizer.to_json() == bpe.to_json()


def test_a_separator_other_than_endoftext_survives_every_format(tmp_path, small):
    folder, _ = small
    model, tokenizer = load_model(folder)
    save_model(tmp_path / "m.cllm", model, tokenizer)
    again, again_tokenizer = load_model(tmp_path / "m.cllm")
    save_hf(tmp_path / "hf", again, again_tokenizer)
    back, back_tokenizer = load_model(tmp_path / "hf")
    assert np.array_equal(back.params, model.params)
    assert back_tokenizer.separator == again_tokenizer.separator == "</s>"
    assert back_tokenizer.encode(TEXT[3]).tolist() == tokenizer.encode(TEXT[3]).tolist()


@pytest.mark.parametrize("which", ["smollm2", "small"])
def test_greedy_generation_matches_transformers(request, which):
    folder, reference = request.getfixturevalue(which)
    model, tokenizer = load_model(folder)
    prompt = TEXT[0]
    ids = tokenizer.encode(prompt)
    generation = generate(model, tokenizer, prompt, max_new_tokens=16, temperature=0.0)
    list(generation)
    assert generation.token_ids == hf_greedy(reference, ids[None], 16, tokenizer.vocab_size)


def test_a_folder_fine_tunes_and_the_result_exports_back_to_transformers(small, tmp_path):
    folder, _ = small
    tuned, tokenizer, _, theirs = fine_tune_and_export(folder, tmp_path, TEXT * 10)
    assert tokenizer.to_json() == load_model(folder)[1].to_json()  # </s> still the separator
    ids = tokenizer.encode(TEXT[1])[None]
    assert_logits_close(tuned.logits(ids), hf_logits(theirs, ids))


def test_convert_names_the_architecture(smollm2, tmp_path, capsys):
    folder, _ = smollm2
    assert convert.main([str(folder), str(tmp_path / "m.cllm")]) == 0
    assert "read " + str(folder) + ": Llama L2 H9 KV3 C576" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_fields(reader) -> dict:
    """The metadata as Python values: strings, numbers, and lists of them."""
    def value(field):
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            return [value_of(field.parts[i], field.types[-1]) for i in field.data]
        return value_of(field.parts[-1], field.types[0])

    def value_of(part, kind):
        return bytes(part).decode() if kind == gguf.GGUFValueType.STRING else part.tolist()[0]

    return {name: value(field) for name, field in reader.fields.items()}


def un_interleave(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row order: row 2j of each head back to j, row 2j + 1 to j + head_dim / 2."""
    return rows.reshape(heads, -1, 2, rows.shape[1]).swapaxes(1, 2).reshape(rows.shape)


@pytest.mark.parametrize("which, gguf_type, tolerance", [("smollm2", "f32", 0.0), ("small", "f32", 0.0),
                                                         ("small", "f16", 1e-3), ("smollm2", "q8_0", 1e-2)])
def test_gguf_reads_back_with_llama_names_metadata_and_pair_order(request, tmp_path, which, gguf_type, tolerance):
    folder, _ = request.getfixturevalue(which)
    model, tokenizer = load_model(folder)
    cfg = model.config
    reader = gguf.GGUFReader(save_gguf(tmp_path / "m.gguf", model, tokenizer, tensor_type=gguf_type))
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == "llama"
    assert {key: fields[f"llama.{key}"] for key in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "rope.dimension_count", "vocab_size")} == {
        "context_length": cfg.context_length, "embedding_length": cfg.dim, "block_count": 2,
        "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.n_heads,
        "attention.head_count_kv": cfg.n_kv_heads, "rope.dimension_count": cfg.head_size,
        "vocab_size": cfg.vocab_size}
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[:tokenizer.vocab_size] == sorted(
        tokenizer.vocab(), key=tokenizer.vocab().get)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.separator_id

    hf = hf_tensors(model)
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    expected |= {f"blk.{i}.{ours}.weight": hf[f"model.layers.{i}.{theirs}.weight"]
                 for i in range(2) for ours, theirs in layer.items()}
    if not cfg.tied_head:
        expected["output.weight"] = hf["lm_head.weight"]
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)  # a tied head has no output.weight: llama.cpp uses token_embd
    for name, want in expected.items():
        got = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(want.shape)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            got = un_interleave(got, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * max(1.0, np.abs(want).max()), err_msg=name)
    q = tensors["blk.0.attn_q.weight"]
    if q.tensor_type == gguf.GGMLQuantizationType.F32:  # the order itself, not only its inverse: row 1 is row hs/2
        rows = np.asarray(q.data).reshape(-1, cfg.dim)
        assert np.array_equal(rows[1], hf["model.layers.0.self_attn.q_proj.weight"][cfg.head_size // 2])


def test_gguf_tokenizers_take_the_form_llama_cpp_tokenizes_alike(tmp_path, smollm2, small):
    smol_model, smol_tokenizer = load_model(smollm2[0])
    fields = gguf_fields(gguf.GGUFReader(save_gguf(tmp_path / "smol.gguf", smol_model, smol_tokenizer)))
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    hf_merges = json.loads(smol_tokenizer.hf_json())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in hf_merges]

    llama_model, llama_tokenizer = load_model(small[0])
    fields = gguf_fields(gguf.GGUFReader(save_gguf(tmp_path / "llama.gguf", llama_model, llama_tokenizer)))
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (1, 2, 0, True)
    types = fields["tokenizer.ggml.token_type"]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                         gguf.TokenType.BYTE] and types[258] == gguf.TokenType.BYTE
    # sentencepiece merges the pair whose token scores highest: the first merge's token scores highest of all
    scores, tokens = fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.tokens"]
    first = "".join(json.loads(llama_tokenizer.hf_json())["model"]["merges"][0])
    assert scores[tokens.index(first)] == max(scores) > scores[tokens.index("e")]


def test_gguf_refuses_a_pre_tokenizer_llama_cpp_does_not_have(tmp_path, smollm2):
    model, tokenizer = load_model(smollm2[0])
    hf = json.loads(tokenizer.hf_json())
    hf["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    other = Tokenizer("bpe", HFTokenizer.from_str(json.dumps(hf)))
    with pytest.raises(ValueError, match="no faithful GGUF form.*gpt-2, smollm"):
        save_gguf(tmp_path / "m.gguf", model, other)
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------------------------
# a SmolLM2-shaped folder through the tools users run


def test_a_smollm2_folder_runs_through_inference_serve_and_fine_tuning(smollm2, tmp_path):
    import httpx

    from cllm.tools import train_model
    from cllm.tools.serve import BackgroundServer

    folder, _ = smollm2
    model, tokenizer = load_model(folder)
    prompt = TEXT[0]
    expected = generate(model, tokenizer, prompt, max_new_tokens=8, temperature=0.0)
    expected_text = "".join(expected)
    # inference, as a user runs it
    result = subprocess.run([sys.executable, "-m", "cllm.tools.inference", str(folder), "-p", prompt, "-n", "8",
                             "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt) and expected_text in result.stdout
    # serve: a greedy completion is the library's, and an embedding is the model's mean-pooled hidden state
    with BackgroundServer(folder, model_name="smollm2") as server, httpx.Client(base_url=server.url,
                                                                                 timeout=60) as http:
        done = http.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0}).json()
        assert done["choices"][0]["text"] == expected_text
        assert done["usage"]["prompt_tokens"] == len(expected.prompt_ids)
        vector = http.post("/v1/embeddings", json={"model": "smollm2", "input": prompt}).json()["data"][0]
        assert len(vector["embedding"]) == model.config.dim
        assert abs(np.linalg.norm(vector["embedding"]) - 1.0) < 1e-4  # normalized by default
    # train_model --init-from the folder, on windows shorter than its context of 2048
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(TEXT))
    assert train_model.main([str(corpus), "--out", str(tmp_path / "run"), "--init-from", str(folder),
                             "--seq-len", "64", "--batch-size", "2", "--steps", "2", "--eval-every", "1000",
                             "--eval-batches", "1", "--threads", "2", "--no-progress"]) == 0
    tuned, _ = load_model(tmp_path / "run" / "model.cllm")
    assert tuned.config == model.config and not np.array_equal(tuned.params, model.params)

"""Hugging Face Qwen2 (Qwen2.5) and Qwen3 folders in and out, checked against transformers: random-weight models
that transformers builds from the real configs of Qwen2.5-0.5B-Instruct and Qwen3-0.6B, cut to 2 layers (every
width as released: vocabularies of 151,936, Qwen3's heads of 128 apart from its width of 1024), saved in bfloat16
as the Hub ships them. cllm's logits, greedy tokens and chat prompts are transformers'; what cllm writes,
transformers loads with the same logits. The tokenizer is built here, offline, as Qwen's is built (byte-level BPE
behind Qwen2's pre-tokenizer, ChatML's tokens); the chat templates are the models' own (tests/templates). Needs the
interop extra (pip install -e ".[interop]")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the interop tests need torch: pip install -e \".[interop]\"")
transformers = pytest.importorskip("transformers",
                                   reason="the interop tests need transformers: pip install -e \".[interop]\"")

from tokenizers import Regex  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from cllm.checkpoint import load_model, save_model  # noqa: E402
from cllm.formats.hf import HFFolderError, load_hf, save_hf  # noqa: E402
from cllm.generate import generate  # noqa: E402
from cllm.model import ModelConfig  # noqa: E402
from tests.test_interop import assert_logits_close, fine_tune_and_export, hf_logits  # noqa: E402
from tests.test_llama_interop import TEXT, assert_refused_in_one_line, hf_greedy  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits, punctuation runs,
# newlines, spaces
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # Qwen's added tokens that are not special

# The released config.json files, but for their depth (24 and 28 layers) and their special tokens' ids, which
# are the offline tokenizer's
QWEN25_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 896,
    "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16,
    "num_hidden_layers": 2, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
MODELS = {"qwen2.5": (QWEN25_CONFIG, "qwen2.5-instruct.jinja", transformers.Qwen2ForCausalLM),
          "qwen3": (QWEN3_CONFIG, "qwen3.jinja", transformers.Qwen3ForCausalLM)}


def qwen_tokenizer() -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT + ["system user assistant You are Qwen, created by Alibaba Cloud."], trainer)
    tokenizer.add_tokens(ADDED)
    return tokenizer


def qwen_folder(folder: Path, config: dict, template: str, model_class, seed: int = 0):
    """A random Qwen model made by transformers from config (a config.json's), saved in bfloat16 with Qwen's
    tokenizer files and the chat template of that name; returns transformers' float32 model of what was saved."""
    tokenizer = qwen_tokenizer()
    ids = {"bos_token_id": tokenizer.token_to_id("<|endoftext|>"), "eos_token_id": tokenizer.token_to_id("<|im_end|>")}
    torch.manual_seed(seed)
    model = model_class(transformers.AutoConfig.for_model(**config | ids)).eval()
    with torch.no_grad():  # norms other than 1 and biases other than 0, so that every tensor's mapping matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(config | ids, indent=2))  # as the Hub has it
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False, "split_special_tokens": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "chat_template": (TEMPLATES / template).read_text()}))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(MODELS))
def qwen(request, tmp_path_factory):
    """(name, folder, transformers' model, cllm's (model, tokenizer)) for each released shape."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = qwen_folder(folder, *MODELS[request.param])
    return request.param, folder, reference, load_model(folder)


CHATS = [
    [{"role": "user", "content": "To be, or not to be?"}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Whether 'tis nobler"},
     {"role": "assistant", "content": "The slings and arrows"}, {"role": "user", "content": "Or to take arms"}],
]


# ---------------------------------------------------------------------------------------------------------------
# reading


def test_a_released_shape_loads_with_its_settings(qwen):
    which, folder, _, (model, tokenizer) = qwen
    common = dict(vocab_size=151936, n_layers=2, rope_theta=1e6, norm_eps=1e-6, tied_head=True)
    want = {"qwen2.5": ModelConfig(arch="qwen2", context_length=32768, dim=896, n_heads=14, n_kv_heads=2,
                                   intermediate_size=4864, **common),
            "qwen3": ModelConfig(arch="qwen3", context_length=40960, dim=1024, n_heads=16, n_kv_heads=8,
                                 head_dim=128, intermediate_size=3072, **common)}[which]
    assert model.config == want
    assert model.config.q_dim == {"qwen2.5": 896, "qwen3": 2048}[which]
    assert tokenizer.separator == "<|im_end|>" and tokenizer.chat_template is not None


def test_logits_and_greedy_tokens_are_transformers(qwen):
    _, folder, reference, (model, tokenizer) = qwen
    ids = tokenizer.encode(TEXT[4] + " 2024")
    assert ids.tolist() == transformers.AutoTokenizer.from_pretrained(folder)(TEXT[4] + " 2024")["input_ids"]
    assert_logits_close(model.logits(ids[None]), hf_logits(reference, ids[None]))
    generation = generate(model, tokenizer, ids.tolist(), max_new_tokens=12, temperature=0.0)
    list(generation)
    assert generation.token_ids == hf_greedy(reference, ids[None], 12, tokenizer.vocab_size)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_prompts_are_the_ids_transformers_renders(qwen, chat):
    _, folder, _, (_, tokenizer) = qwen
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    want = theirs.apply_chat_template(CHATS[chat], add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tokenizer.encode_chat(CHATS[chat]).tolist() == list(want)


@pytest.mark.parametrize("setting, value", [("use_sliding_window", True), ("rope_scaling", {"type": "yarn"}),
                                            ("layer_types", ["full_attention", "sliding_attention"]),
                                            ("model_type", "qwen2_moe")])
def test_settings_that_change_the_arithmetic_are_refused_in_one_line_naming_them(qwen, tmp_path, setting, value):
    assert_refused_in_one_line(qwen[1], tmp_path, setting, value)


def test_qwen3s_attention_bias_is_refused(tmp_path):
    config = QWEN3_CONFIG | {"attention_bias": True, "vocab_size": 600, "hidden_size": 64, "head_dim": 16,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFolderError, match="attention_bias=true"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# writing


def test_export_loads_in_transformers_with_the_same_logits(qwen, tmp_path):
    which, folder, _, (model, tokenizer) = qwen
    save_hf(tmp_path, model, tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs) is MODELS[which][2]
    back, _ = load_hf(tmp_path)
    assert back.config == model.config and np.array_equal(back.params, model.params)
    ids = tokenizer.encode(TEXT[2])[None]
    assert_logits_close(model.logits(ids), hf_logits(theirs, ids))
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rendered = their_tokenizer.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.chat_template.render(CHATS[1])


def test_a_qwen3_folder_fine_tunes_and_exports_back_to_transformers(tmp_path):
    """A small model of Qwen3's kind, so that training takes seconds: --init-from, a few steps, and the result's
    logits in transformers."""
    config = QWEN3_CONFIG | {"vocab_size": 600, "hidden_size": 64, "head_dim": 24, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 128}
    qwen_folder(tmp_path / "hf", config, "qwen3.jinja", transformers.Qwen3ForCausalLM)
    tuned, tokenizer, base, theirs = fine_tune_and_export(tmp_path / "hf", tmp_path, TEXT * 10)
    for name in ("h.0.attn.q_norm.weight", "h.1.attn.k_norm.weight"):  # the head norms trained too
        assert not np.array_equal(tuned.p[name], base.p[name]), name
    ids = tokenizer.encode(TEXT[1])[None]
    assert_logits_close(tuned.logits(ids), hf_logits(theirs, ids))
    save_model(tmp_path / "m.cllm", tuned, tokenizer)
    assert load_model(tmp_path / "m.cllm")[0].config == tuned.config

"""A chat model exported as a Hugging Face folder ends its replies in transformers as it does in cllm: config.json
and generation_config.json list the end-of-turn token among the eos ids, after the separator, and reading such a
folder back still takes the separator from the list. Needs the interop extra (pip install -e ".[interop]")."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: pip install -e \".[interop]\"")
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e \".[interop]\"")

from cllm.checkpoint import load_model  # noqa: E402
from cllm.formats.hf import save_hf  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.sync_model import Model  # noqa: E402
from tests.chat_models import chat_tokenizer  # noqa: E402

CONVERSATION = [{"role": "user", "content": "To be, or not to be?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def model_that_ends_every_turn_at_once(tokenizer) -> GPT:
    """A Llama whose greedy choice is always the end-of-turn token: every token embeds as ones, the blocks add
    nothing to the residual (zero output projections), so the final norm gives ones, and only the end of turn's
    row of the untied head is non-zero."""
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, context_length=64, dim=16, n_layers=1,
                         n_heads=2, tied_head=False)
    model = GPT(config, seed=0)
    model.p["wte"][...] = 1.0
    for name in ("h.0.attn.c_proj.weight", "h.0.mlp.c_proj.weight", "lm_head"):
        model.p[name][...] = 0.0
    model.p["lm_head"][tokenizer.end_of_turn_ids[0]] = 1.0
    return model


def test_transformers_generate_stops_at_the_end_of_turn(tmp_path, tokenizer):
    model = model_that_ends_every_turn_at_once(tokenizer)
    separator, [end_of_turn] = tokenizer.separator_id, tokenizer.end_of_turn_ids
    save_hf(tmp_path, model, tokenizer)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / name).read_text())["eos_token_id"] == [separator, end_of_turn]
    prompt = tokenizer.encode_chat(CONVERSATION)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        output = theirs.generate(torch.from_numpy(prompt[None].astype(np.int64)), max_new_tokens=8, do_sample=False,
                                 pad_token_id=separator)
    assert output[0, prompt.size:].tolist() == [end_of_turn]  # one token, the end of turn, and no further
    # cllm ends the same reply at the same token, with nothing generated
    reply = Model(model, tokenizer, threads=1).chat(CONVERSATION, max_new_tokens=8, temperature=0)
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("", "stop", 0)


def test_reading_the_folder_back_takes_the_separator_first_and_the_turn_from_the_template(tmp_path, tokenizer):
    save_hf(tmp_path, model_that_ends_every_turn_at_once(tokenizer), tokenizer)
    _, read = load_model(tmp_path)
    assert read.separator == tokenizer.separator and read.end_of_turn_ids == tokenizer.end_of_turn_ids


def test_a_model_without_a_chat_template_keeps_a_single_eos_id(tmp_path, tokenizer):
    plain = chat_tokenizer()
    plain.chat_template = None
    save_hf(tmp_path, model_that_ends_every_turn_at_once(tokenizer), plain)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / name).read_text())["eos_token_id"] == plain.separator_id

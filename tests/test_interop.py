"""Hugging Face GPT-2 folders in and out, and GGUF out, checked against the real peers: `transformers` (on CPU torch)
loads what cllm writes and computes the same logits; cllm loads what `transformers` writes and computes its logits;
the `gguf` package reads back what cllm writes. Models are tiny and random, and tokenizers are trained here,
offline. Needs the interop extra (pip install -e ".[interop]")."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the interop tests need torch: pip install -e \".[interop]\"")
transformers = pytest.importorskip("transformers",
                                   reason="the interop tests need transformers: pip install -e \".[interop]\"")
gguf = pytest.importorskip("gguf")

from cllm.checkpoint import load_model, save_model  # noqa: E402
from cllm.formats.gguf_file import save_gguf  # noqa: E402
from cllm.formats.hf import HFFolderError, load_hf, save_hf  # noqa: E402
from cllm.generate import generate  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402
from cllm.tools import convert  # noqa: E402

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20
LOGITS_TOLERANCE = 1e-4  # float32 engines with different summation orders, logits of size ~1


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("bpe", TEXT, vocab_size=300)


def hf_gpt2(folder, tokenizer, *, activation="gelu_new", seed=0, **config):
    """A random GPT-2 made and saved by transformers itself, with cllm's BPE tokenizer as its tokenizer.json."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                    activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=tokenizer.separator_id, eos_token_id=tokenizer.separator_id)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**(settings | config))).eval()
    with torch.no_grad():  # non-zero biases and norms, so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tokenizer.hf_json(), encoding="utf-8")
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def assert_logits_close(ours, theirs):
    scale = max(1.0, np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=LOGITS_TOLERANCE * scale)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu"])
def test_a_transformers_gpt2_loads_and_computes_its_logits(tmp_path, bpe, activation):
    reference = hf_gpt2(tmp_path, bpe, activation=activation)
    model, tokenizer = load_model(tmp_path)
    assert model.config.activation == ("gelu_erf" if activation == "gelu" else "gelu_tanh")
    ids = tokenizer.encode(TEXT[0])[None, :20]
    assert_logits_close(model.logits(ids), hf_logits(reference, ids))
    assert tokenizer.encode(TEXT[1]).tolist() == bpe.encode(TEXT[1]).tolist()


def test_sharded_weights_with_their_index_load(tmp_path, bpe):
    reference = hf_gpt2(tmp_path / "whole", bpe)
    reference.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    (tmp_path / "sharded" / "tokenizer.json").write_text(bpe.hf_json(), encoding="utf-8")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    whole, _ = load_model(tmp_path / "whole")
    sharded, _ = load_model(tmp_path / "sharded")
    assert np.array_equal(whole.params, sharded.params)


def test_vocab_and_merges_stand_in_for_tokenizer_json(tmp_path, bpe):
    hf_gpt2(tmp_path, bpe)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf_model = json.loads(bpe.hf_json())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(hf_model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf_model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer.json").unlink()
    _, tokenizer = load_model(tmp_path)
    text = "Or to take arms, 'tis nobler still\n  and  more"
    assert tokenizer.encode(text).tolist() == fast(text)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(tmp_path, bpe):
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size, context_length=32, dim=32, n_layers=2, n_heads=4), seed=3)
    save_hf(tmp_path, model, bpe)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = TEXT[2][:24]  # with the 12 new tokens, within the context of 32
    ids = np.array([their_tokenizer(prompt)["input_ids"]])
    assert ids[0].tolist() == bpe.encode(prompt).tolist() and ids.shape[1] + 12 <= 32
    assert_logits_close(model.logits(ids), hf_logits(theirs, ids))
    with torch.no_grad():
        out = theirs.generate(torch.from_numpy(ids).long(), max_new_tokens=12, do_sample=False,
                              pad_token_id=bpe.separator_id, eos_token_id=None)
    generation = generate(model, bpe, prompt, max_new_tokens=12, temperature=0.0)
    list(generation)
    assert generation.token_ids == out[0, ids.shape[1]:].tolist()


def test_hf_round_trip_is_bit_for_bit(tmp_path, bpe):
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size + 5, context_length=16, dim=16, n_layers=2, n_heads=2), seed=1)
    save_hf(tmp_path, model, bpe)
    loaded, tokenizer = load_hf(tmp_path)
    assert loaded.config == model.config
    assert np.array_equal(loaded.params, model.params)
    assert tokenizer.encode(TEXT[3]).tolist() == bpe.encode(TEXT[3]).tolist()


@pytest.mark.parametrize("kind", ["char", "word"])
def test_char_and_word_tokenizers_export_for_transformers(tmp_path, kind):
    tokenizer = Tokenizer.train(kind, TEXT)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, dim=16, n_layers=1, n_heads=2))
    save_hf(tmp_path, model, tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = TEXT[0].lower() if kind == "word" else TEXT[0]
    assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).tolist()
    assert theirs.eos_token_id == tokenizer.separator_id


@pytest.mark.parametrize("setting, value", [("scale_attn_by_inverse_layer_idx", True),
                                            ("reorder_and_upcast_attn", True), ("activation_function", "relu"),
                                            ("n_inner", 48)])
def test_settings_that_change_the_arithmetic_are_refused_by_name(tmp_path, bpe, setting, value):
    hf_gpt2(tmp_path, bpe)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {setting: value}))
    with pytest.raises(HFFolderError, match=setting):
        load_model(tmp_path)


def test_a_pickle_is_refused_and_never_loaded(tmp_path, bpe):
    hf_gpt2(tmp_path, bpe)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(HFFolderError, match="pickle.*safetensors"):
        load_model(tmp_path)


def test_an_untied_head_and_another_epsilon_load_and_compute_their_logits(tmp_path, bpe):
    reference = hf_gpt2(tmp_path, bpe, tie_word_embeddings=False, layer_norm_epsilon=1e-3)
    with torch.no_grad():
        reference.lm_head.weight.add_(1.0)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path)
    assert not model.config.tied_head and model.config.norm_eps == 1e-3
    ids = bpe.encode(TEXT[0])[None, :16]
    assert_logits_close(model.logits(ids), hf_logits(reference, ids))
    save_hf(tmp_path / "again", model, bpe)
    assert_logits_close(load_model(tmp_path / "again")[0].logits(ids), model.logits(ids))


# ---------------------------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 1e-2)])
def test_gguf_reads_back_with_gpt2_names_layouts_and_tokenizer(tmp_path, bpe, gguf_type, tolerance):
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size, context_length=32, dim=64, n_layers=2, n_heads=4), seed=2)
    path = save_gguf(tmp_path / "m.gguf", model, bpe, tensor_type=gguf_type)
    reader = gguf.GGUFReader(path)
    fields = {name: field for name, field in reader.fields.items()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gpt2"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert int(fields["gpt2.block_count"].parts[-1][0]) == 2
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert tokens[bpe.separator_id] == "<|endoftext|>"
    assert {t: i for i, t in enumerate(tokens)} == bpe.vocab()
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == bpe.separator_id
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    expected = {"token_embd.weight": model.p["wte"], "position_embd.weight": model.p["wpe"],
                "blk.1.attn_qkv.weight": model.p["h.1.attn.c_attn.weight"].T,
                "blk.0.ffn_down.weight": model.p["h.0.mlp.c_proj.weight"].T,
                "blk.0.attn_norm.bias": model.p["h.0.ln_1.bias"], "output_norm.weight": model.p["ln_f.weight"]}
    for name, want in expected.items():
        got = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * max(1.0, np.abs(want).max()))
    assert len(tensors) == len(model.p)


def test_gguf_f32_loads_in_transformers_with_the_same_logits(tmp_path, bpe):
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size, context_length=32, dim=32, n_layers=2, n_heads=4), seed=4)
    save_gguf(tmp_path / "m.gguf", model, bpe)
    # transformers' GGUF reader takes gpt2.context_length as n_ctx and leaves n_positions at 1024: say it.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", n_positions=32).eval()
    ids = bpe.encode(TEXT[1])[None, :16]
    assert_logits_close(model.logits(ids), hf_logits(theirs, ids))


def test_gguf_refuses_a_tokenizer_it_cannot_represent(tmp_path):
    tokenizer = Tokenizer.train("char", TEXT)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=8, dim=8, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="char tokenizer has no faithful GGUF form"):
        save_gguf(tmp_path / "m.gguf", model, tokenizer)
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------------------------
# the convert tool


def test_convert_between_all_three_formats(tmp_path, bpe, capsys):
    reference = hf_gpt2(tmp_path / "hf", bpe)
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "m.cllm")]) == 0
    assert convert.main([str(tmp_path / "m.cllm"), str(tmp_path / "out")]) == 0
    assert convert.main([str(tmp_path / "out"), str(tmp_path / "m.gguf"), "--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert out.count("read ") == 3 and "wrote" in out and "m.gguf" in out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = bpe.encode(TEXT[0])[None, :12]
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(reference, ids))


def test_convert_usage_errors_exit_2(tmp_path, bpe):
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size, context_length=8, dim=8, n_layers=1, n_heads=2))
    save_model(tmp_path / "m.cllm", model, bpe)
    m, x = str(tmp_path / "m.cllm"), str(tmp_path / "x")
    for args, message in [([m, x + ".cllm", "--gguf-type", "f16"], "--gguf-type applies only"),
                          ([str(tmp_path / "missing.cllm"), x + ".cllm"], "no such model file"),
                          ([m, x + ".gguf", "--gguf-type", "q4"], "invalid choice")]:
        done = subprocess.run([sys.executable, "-m", "cllm.tools.convert", *args], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


def test_float16_weights_are_widened_exactly(tmp_path, bpe):
    reference = hf_gpt2(tmp_path, bpe)
    reference.half().save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path)
    wte = reference.transformer.wte.weight.detach().numpy()
    assert wte.dtype == np.float16 and np.array_equal(model.p["wte"], wte.astype(np.float32))
    c_fc = reference.transformer.h[1].mlp.c_fc.weight.detach().numpy()
    assert np.array_equal(model.p["h.1.mlp.c_fc.weight"], c_fc.astype(np.float32))


def test_a_folder_serves_embeddings_and_generation_and_runs_the_inference_tool(tmp_path, bpe):
    import anyio

    from cllm import AsyncModel

    reference = hf_gpt2(tmp_path, bpe)

    async def serve():
        async with AsyncModel.open(tmp_path, threads=1) as served:
            vectors = await served.embed([TEXT[0], TEXT[1]])
            completion = await served.generate(TEXT[2][:20], max_new_tokens=6, temperature=0)
            return vectors, completion.text

    vectors, text = anyio.run(serve)
    model, tokenizer = load_model(tmp_path)
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ids = tokenizer.encode(TEXT[2][:20])
    with torch.no_grad():
        out = reference.generate(torch.from_numpy(ids[None]).long(), max_new_tokens=6, do_sample=False,
                                 pad_token_id=bpe.separator_id, eos_token_id=None)
    assert text == tokenizer.decode(out[0, ids.size:].numpy())
    done = subprocess.run([sys.executable, "-m", "cllm.tools.inference", str(tmp_path), "-p", TEXT[2][:20], "-n", "6",
                           "--temperature", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == TEXT[2][:20] + text + "\n"


def fine_tune_and_export(folder, tmp_path, text: list[str]):
    """Fine-tunes the Hugging Face folder for 3 steps on text (cllm-train --init-from), then exports the result
    back to a folder and loads it in transformers: (the tuned model, its tokenizer, the base model, transformers'
    model of the export)."""
    from cllm.tools import train_model

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(text))
    assert train_model.main([str(corpus), "--out", str(tmp_path / "run"), "--init-from", str(folder),
                             "--batch-size", "4", "--steps", "3", "--eval-every", "1000", "--eval-batches", "1",
                             "--threads", "2", "--no-progress"]) == 0
    tuned, tokenizer = load_model(tmp_path / "run" / "model.cllm")
    base, _ = load_model(folder)
    assert tuned.config == base.config and not np.array_equal(tuned.params, base.params)
    assert convert.main([str(tmp_path / "run" / "model.cllm"), str(tmp_path / "out")]) == 0
    return tuned, tokenizer, base, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()


def test_a_folder_fine_tunes_and_the_result_exports_back_to_transformers(tmp_path, bpe):
    hf_gpt2(tmp_path / "hf", bpe)
    tuned, tokenizer, _, theirs = fine_tune_and_export(tmp_path / "hf", tmp_path, TEXT)
    assert tokenizer.encode(TEXT[0]).tolist() == bpe.encode(TEXT[0]).tolist()
    ids = bpe.encode(TEXT[1])[None, :16]
    assert_logits_close(tuned.logits(ids), hf_logits(theirs, ids))


def test_exports_write_the_models_own_layer_norm_eps(tmp_path):
    tokenizer = Tokenizer.train("bpe", ["hello world, hello there. " * 40], vocab_size=280)
    model = GPT(ModelConfig(vocab_size=280, context_length=16, dim=32, n_layers=1, n_heads=2, norm_eps=1e-6), seed=0)
    save_hf(tmp_path / "hf", model, tokenizer)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_norm_epsilon"] == 1e-6
    field = gguf.GGUFReader(save_gguf(tmp_path / "m.gguf", model, tokenizer)).fields["gpt2.attention.layer_norm_epsilon"]
    assert float(field.parts[field.data[0]][0]) == pytest.approx(1e-6)

"""Embedding models as sentence-transformers ships them (Qwen3-Embedding's layout), checked against
sentence-transformers itself on the same folder: a tiny Llama of random weights saved by transformers as its base
model (Qwen3-Embedding's checkpoint is a Qwen3Model), and a Qwen3 of Qwen3-0.6B's widths, each with a byte-level
BPE built here, offline, whose post-processor appends <|endoftext|> to every text, and Qwen3-Embedding's
modules.json, 1_Pooling/config.json and config_sentence_transformers.json. cllm must read the pooling, normalization and prompts they declare, embed the ids
sentence-transformers embeds, keep all of it through a .cllm file and back to a folder, serve it, and refuse what
it would compute otherwise. Needs the interop extra (pip install -e ".[interop]")."""
from __future__ import annotations

import json
import re
import shutil

import anyio
import gguf
import httpx
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch", reason="the interop tests need torch: pip install -e \".[interop]\"")
transformers = pytest.importorskip("transformers",
                                   reason="the interop tests need transformers: pip install -e \".[interop]\"")
sentence_transformers = pytest.importorskip(
    "sentence_transformers", reason="the interop tests need sentence-transformers: pip install -e \".[interop]\"")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

import cllm  # noqa: E402
from cllm.checkpoint import load_model, read_metadata, save_model  # noqa: E402
from cllm.embedding_config import MAX_PROMPTS, EmbeddingConfig  # noqa: E402
from cllm.formats.gguf_file import save_gguf  # noqa: E402
from cllm.model_file_errors import ModelFileError  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402
from cllm.tools import convert  # noqa: E402
from cllm.tools.serve import BackgroundServer  # noqa: E402

CONTEXT, DIM = 64, 64
ENDOFTEXT = "<|endoftext|>"
# Qwen3-Embedding-0.6B's config_sentence_transformers.json
PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
           "document": ""}
QUERIES = ["What is the capital of China?", "Explain gravity",
           "how do the slings and arrows of outrageous fortune compare with a sea of troubles"]
DOCUMENTS = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other.",
             "To be, or not to be"]
CORPUS = QUERIES + DOCUMENTS + [PROMPTS["query"], "Whether 'tis nobler in the mind to suffer"]
NAME = "embedder"


# ---------------------------------------------------------------------------------------------------------------
# a folder as Qwen3-Embedding's, offline


def appending_tokenizer() -> HFTokenizer:
    """A byte-level BPE whose post-processor appends <|endoftext|> to every text, as Qwen3-Embedding's does."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[ENDOFTEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eot = tokenizer.token_to_id(ENDOFTEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {ENDOFTEXT}", pair=f"$A {ENDOFTEXT} $B:1 {ENDOFTEXT}:1", special_tokens=[(ENDOFTEXT, eot)])
    return tokenizer


def st_files(folder, *, width: int = DIM, pooling: dict | None = None, modules: list | None = None,
             prompts: dict | None = None):
    """Qwen3-Embedding's sentence-transformers files for a model of that width, with any of them replaced."""
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    files = {
        "modules.json": modules or [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": pooling or {"word_embedding_dimension": width,
                                             **{f"pooling_mode_{flag}": flag == "lasttoken" for flag in flags},
                                             "include_prompt": True},
        "config_sentence_transformers.json": prompts or {"prompts": PROMPTS, "default_prompt_name": None,
                                                         "similarity_fn_name": "cosine"},
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2))


def embedding_folder(folder, model_class, config: dict, *, scale: float):
    """A random base model (a Qwen3Model, as Qwen3-Embedding's checkpoint is) made by transformers from config,
    with weights of about scale so that every token's hidden state reads the others', saved in float32 with the
    appending tokenizer and Qwen3-Embedding's sentence-transformers files. The vocabulary and context are the
    tokenizer's and CONTEXT unless config sets them."""
    tokenizer = appending_tokenizer()
    eot = tokenizer.token_to_id(ENDOFTEXT)
    config = {"vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": CONTEXT} | config | {
        "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot}
    torch.manual_seed(0)
    model = model_class(transformers.AutoConfig.for_model(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else scale * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
        "padding_side": "left", "model_max_length": CONTEXT}))
    st_files(folder, width=config["hidden_size"])
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = dict(model_type="llama", hidden_size=DIM, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6)
    return embedding_folder(tmp_path_factory.mktemp("embedder") / "model", transformers.LlamaModel, config,
                            scale=0.15)


@pytest.fixture(scope="module")
def st_model(folder):
    return sentence_transformers.SentenceTransformer(str(folder), device="cpu")


@pytest.fixture(scope="module")
def ours(folder):
    return cllm.Model.open(folder, threads=2)


def assert_same_directions(got, want):
    """Every row of got points where want's does (cosine >= 0.99999)."""
    got, want = np.atleast_2d(got).astype(np.float64), np.atleast_2d(want).astype(np.float64)
    cosines = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.99999, cosines


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------------------------
# reading and embedding


def test_the_folder_declares_last_token_pooling_normalization_and_prompts(ours, st_model):
    assert ours.embedding == EmbeddingConfig("last", normalize=True, prompts=PROMPTS, default_prompt_name=None)
    assert st_model.prompts == PROMPTS


def test_ids_to_embed_are_sentence_transformers_and_prompts_are_not_ended(ours, st_model):
    tokenizer, eot = ours.tokenizer, ours.tokenizer.separator_id
    for text in QUERIES:
        theirs = st_model.preprocess([text], prompt=PROMPTS["query"])["input_ids"][0].tolist()
        [embedded] = tokenizer.encode_for_embedding([PROMPTS["query"] + text])
        assert embedded.tolist() == theirs and theirs[-1] == eot
        assert tokenizer.encode(text).tolist() == tokenizer.encode_for_embedding([text])[0][:-1].tolist()
        assert tokenizer.encode_batch([text])[0].tolist() == tokenizer.encode(text).tolist()
    completion = ours.generate("Explain", max_new_tokens=1, temperature=0)
    # no <|endoftext|> after a prompt: it would end the text before its continuation
    assert completion.prompt_tokens == len(tokenizer.pieces("Explain", add_special_tokens=False))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("prompt_name", [None, "query", "document"])
def test_encode_is_sentence_transformers_encode(ours, st_model, prompt_name, padding_side):
    texts = QUERIES + DOCUMENTS  # of mixed lengths: sentence-transformers pads them, cllm batches them by length
    st_model.tokenizer.padding_side = padding_side
    want = st_model.encode(texts, prompt_name=prompt_name, batch_size=4)
    assert_same_directions(ours.encode(texts, prompt_name=prompt_name, batch_size=4), want)
    np.testing.assert_allclose(np.linalg.norm(ours.encode(texts, prompt_name=prompt_name), axis=1), 1.0, atol=1e-6)


def test_a_prompt_given_whole_is_a_named_one_and_changes_the_vector(ours, st_model):
    named = ours.encode(QUERIES, prompt_name="query")
    assert_same_directions(ours.encode(QUERIES, prompt=PROMPTS["query"]), named)
    assert_same_directions(ours.encode(QUERIES, prompt="query: "), st_model.encode(QUERIES, prompt="query: "))
    assert max(cosine(a, b) for a, b in zip(named, ours.encode(QUERIES))) < 0.999


def test_the_comparison_sees_the_pooling_and_the_appended_token(ours, st_model):
    """The vectors above agree because cllm pools what sentence-transformers pools: pooling the mean, or the last
    token before <|endoftext|>, points elsewhere."""
    want = st_model.encode(QUERIES)
    assert max(cosine(a, b) for a, b in zip(ours.encode(QUERIES, pooling="mean"), want)) < 0.999

    async def embed_unended():  # the ids a prompt gets: no <|endoftext|>
        async with cllm.AsyncModel(ours.model, ours.tokenizer) as served:
            return await served.embed([ours.tokenizer.encode(text) for text in QUERIES])

    assert max(cosine(a, b) for a, b in zip(anyio.run(embed_unended), want)) < 0.999


def test_asyncmodel_embeds_as_the_model_declares(folder, st_model):
    async def run():
        async with cllm.AsyncModel.open(folder) as served:
            assert (served.pooling, served.info()["normalize"], served.info()["prompt_names"]) == \
                ("last", True, ["query", "document"])
            return await served.embed(QUERIES, prompt_name="query"), await served.embed(QUERIES, pooling="mean")

    named, mean = anyio.run(run)
    assert_same_directions(named, st_model.encode(QUERIES, prompt_name="query"))
    assert max(cosine(a, b) for a, b in zip(mean, st_model.encode(QUERIES))) < 0.999  # an explicit pooling wins


def test_truncation_keeps_the_appended_token_as_sentence_transformers_does(ours, st_model):
    long = " ".join(DOCUMENTS * 4)
    assert len(ours.tokenizer.encode(long)) > CONTEXT
    with pytest.raises(cllm.errors.UsageError, match="tokens long but the model's context holds only 64"):
        ours.encode([long])
    assert_same_directions(ours.encode([long], truncate=True), st_model.encode([long]))


@pytest.mark.parametrize("options, message", [
    ({"prompt_name": "passage"}, 'prompt_name "passage" is not one of this model\'s prompts \\("query", "document"\\)'),
    ({"prompt_name": "query", "prompt": "q: "}, "give a prompt or a prompt_name, not both")])
def test_a_bad_prompt_is_one_clear_usage_error(ours, options, message):
    with pytest.raises(cllm.errors.UsageError, match=message):
        ours.encode(QUERIES, **options)


def test_a_model_that_declares_nothing_has_no_named_prompts(ours):
    tokenizer = Tokenizer.from_json(ours.tokenizer.to_json())
    tokenizer.embedding = None
    plain = cllm.Model(ours.model, tokenizer)
    with pytest.raises(cllm.errors.UsageError, match="not one of this model's prompts \\(it names none\\)"):
        plain.encode("x", prompt_name="query")
    assert plain.embedding == EmbeddingConfig()  # cllm's defaults: mean pooling, unit length


# ---------------------------------------------------------------------------------------------------------------
# through .cllm and back to a folder


def test_a_round_trip_through_cllm_keeps_the_declarations_and_the_vectors(folder, st_model, tmp_path):
    assert convert.main([str(folder), str(tmp_path / "m.cllm")]) == 0
    assert json.loads(read_metadata(tmp_path / "m.cllm")["tokenizer"])["embedding"] == {
        "pooling": "last", "normalize": True, "prompts": PROMPTS, "default_prompt_name": None}
    from_file = cllm.Model.open(tmp_path / "m.cllm")
    assert from_file.embedding == EmbeddingConfig("last", True, PROMPTS)
    assert convert.main([str(tmp_path / "m.cllm"), str(tmp_path / "out")]) == 0
    exported = sentence_transformers.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    texts = QUERIES + DOCUMENTS
    for prompt_name in (None, "query"):
        want = st_model.encode(texts, prompt_name=prompt_name)
        assert_same_directions(exported.encode(texts, prompt_name=prompt_name), want)
        assert_same_directions(from_file.encode(texts, prompt_name=prompt_name), want)
    assert cllm.Model.open(tmp_path / "out").embedding == from_file.embedding


def test_gguf_carries_the_pooling_as_llama_cpp_declares_it(folder, ours, tmp_path):
    """{arch}.pooling_type, as llama.cpp's converter writes it from 1_Pooling/: the pooling comes back (GGUF holds
    no prompts), and the vectors with it; a pooling cllm does not compute is refused by name."""
    assert convert.main([str(folder), str(tmp_path / "e.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "e.gguf")
    assert reader.fields["llama.pooling_type"].contents() == gguf.PoolingType.LAST
    from_gguf = cllm.Model.open(tmp_path / "e.gguf")
    assert from_gguf.embedding == EmbeddingConfig("last", True)
    assert_same_directions(from_gguf.encode(DOCUMENTS), ours.encode(DOCUMENTS))
    model, tokenizer = load_model(tmp_path / "e.gguf")
    tokenizer.embedding = None  # a model that declares nothing writes no pooling_type, and reads back so
    save_gguf(tmp_path / "plain.gguf", model, tokenizer)
    assert "llama.pooling_type" not in gguf.GGUFReader(tmp_path / "plain.gguf").fields
    assert load_model(tmp_path / "plain.gguf")[1].embedding is None
    cls = tmp_path / "cls.gguf"
    cls.write_bytes((tmp_path / "e.gguf").read_bytes())
    field = gguf.GGUFReader(cls, "r+").fields["llama.pooling_type"]
    field.parts[field.data[0]][0] = gguf.PoolingType.CLS
    with pytest.raises(ModelFileError, match="llama.pooling_type = CLS is a pooling that cllm does not compute"):
        load_model(cls)


def test_a_mean_pooling_model_without_normalize_exports_as_it_reads(folder, tmp_path):
    """The other pooling cllm computes, unnormalized, with a default prompt."""
    mean = tmp_path / "mean"
    shutil.copytree(folder, mean)
    st_files(mean, pooling={"embedding_dimension": DIM, "pooling_mode": "mean"},
             modules=[{"idx": 0, "name": "0", "path": "",
                       "type": "sentence_transformers.base.modules.transformer.Transformer"},
                      {"idx": 1, "name": "1", "path": "1_Pooling",
                       "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"}],
             prompts={"prompts": PROMPTS, "default_prompt_name": "query"})
    ours = cllm.Model.open(mean)
    assert ours.embedding == EmbeddingConfig("mean", normalize=False, prompts=PROMPTS, default_prompt_name="query")
    want = sentence_transformers.SentenceTransformer(str(mean), device="cpu").encode(QUERIES)
    np.testing.assert_allclose(ours.encode(QUERIES), want, rtol=1e-4, atol=1e-5)  # not normalized: the values
    assert convert.main([str(mean), str(tmp_path / "out")]) == 0
    again = sentence_transformers.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    np.testing.assert_allclose(again.encode(QUERIES), want, rtol=1e-5, atol=1e-6)


def test_a_qwen3_embedding_model_embeds_as_sentence_transformers_and_exports_back(tmp_path):
    """Qwen3-Embedding-0.6B's released config (Qwen3-0.6B's widths: heads of 128 apart from its width of 1024, q
    and k norms; its vocabulary of 151,669 and context of 32,768) cut to 2 layers, saved as the base model,
    Qwen3Model, as Qwen3-Embedding's checkpoint is."""
    from tests.test_qwen_interop import QWEN3_CONFIG
    config = QWEN3_CONFIG | {"vocab_size": 151669, "max_position_embeddings": 32768}
    folder = embedding_folder(tmp_path / "qwen3", transformers.Qwen3Model, config, scale=0.05)
    ours = cllm.Model.open(folder)
    assert (ours.config.arch, ours.config.head_dim, ours.embedding.pooling) == ("qwen3", 128, "last")
    theirs = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    texts = QUERIES + DOCUMENTS
    for prompt_name in (None, "query"):
        assert_same_directions(ours.encode(texts, prompt_name=prompt_name),
                               theirs.encode(texts, prompt_name=prompt_name))
    assert convert.main([str(folder), str(tmp_path / "m.cllm")]) == 0
    assert convert.main([str(tmp_path / "m.cllm"), str(tmp_path / "out")]) == 0
    exported = sentence_transformers.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert_same_directions(exported.encode(texts, prompt_name="query"), theirs.encode(texts, prompt_name="query"))


# ---------------------------------------------------------------------------------------------------------------
# served


@pytest.fixture(scope="module")
def http(folder):
    with BackgroundServer(folder, model_name=NAME) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_the_routes_embed_with_the_models_pooling_and_prompts(http, st_model):
    for prompt_name in (None, "query"):
        want = st_model.encode(QUERIES, prompt_name=prompt_name)
        openai = http.post("/v1/embeddings", json={"model": NAME, "input": QUERIES, "prompt_name": prompt_name})
        assert openai.status_code == 200, openai.text
        assert_same_directions([d["embedding"] for d in openai.json()["data"]], want)
        tei = http.post("/embed", json={"inputs": QUERIES, "prompt_name": prompt_name})
        assert tei.status_code == 200, tei.text
        assert_same_directions(tei.json(), want)
    whole = http.post("/v1/embeddings", json={"model": NAME, "input": QUERIES, "prompt_text": PROMPTS["query"]})
    assert_same_directions([d["embedding"] for d in whole.json()["data"]],
                           st_model.encode(QUERIES, prompt_name="query"))
    assert http.get("/info").json()["engine"]["pooling"] == "last"


def test_the_routes_truncate_keeping_the_appended_token(http, st_model):
    long = " ".join(DOCUMENTS * 4)
    assert http.post("/embed", json={"inputs": long}).status_code == 422
    cut = http.post("/embed", json={"inputs": long, "truncate": True})
    assert_same_directions(cut.json(), st_model.encode([long]))


def test_tokenize_shows_the_prompt_and_the_appended_token(http, ours):
    [pieces] = http.post("/tokenize", json={"inputs": "Explain", "prompt_name": "query"}).json()
    assert [p["id"] for p in pieces] == ours.tokenizer.encode_for_embedding([PROMPTS["query"] + "Explain"])[0].tolist()
    assert pieces[-1]["special"] and pieces[-1]["text"] == ENDOFTEXT


@pytest.mark.parametrize("route, body, status, message", [
    ("/v1/embeddings", {"model": NAME, "input": "x", "prompt_name": "passage"}, 400,
     'prompt_name "passage" is not one of this model\'s prompts ("query", "document")'),
    ("/v1/embeddings", {"model": NAME, "input": "x", "prompt_name": "query", "prompt_text": "q: "}, 400,
     "give 'prompt_name' or 'prompt_text', not both."),
    ("/embed", {"inputs": "x", "prompt_name": "passage"}, 422,
     'prompt_name "passage" is not one of this model\'s prompts ("query", "document")')])
def test_the_routes_refuse_a_prompt_the_model_does_not_have(http, route, body, status, message):
    response = http.post(route, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert (error if isinstance(error, str) else error["message"]) == message


# ---------------------------------------------------------------------------------------------------------------
# refusals


FLAGS_ONLY = {"word_embedding_dimension": DIM, "include_prompt": True}
BAD_FOLDERS = [
    ("1_Pooling/config.json", FLAGS_ONLY | {"pooling_mode_cls_token": True},
     "pooling 'cls' is not one cllm computes (it computes mean and lasttoken)"),
    ("1_Pooling/config.json", FLAGS_ONLY | {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
     "declares the poolings max, mean, concatenated"),
    ("1_Pooling/config.json", {"embedding_dimension": 32, "pooling_mode": "lasttoken"},
     "pools vectors of 32 values, but the model's hidden states have 64"),
    ("1_Pooling/config.json", {"pooling_mode": "mean", "include_prompt": False},
     "include_prompt false leaves the prompt's tokens out of the mean"),
    ("modules.json", [{"path": "", "type": "sentence_transformers.models.Transformer"},
                      {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                      {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
     ("lists the modules sentence_transformers.models.Transformer, sentence_transformers.models.Pooling, "
      "sentence_transformers.models.Dense; cllm computes a Transformer, a Pooling and optionally a Normalize")),
    ("modules.json", [{"path": "", "type": "sentence_transformers.models.Transformer"},
                      {"path": "../elsewhere", "type": "sentence_transformers.models.Pooling"}],
     "the Pooling module's path '../elsewhere' is not a folder in"),
    ("sentence_bert_config.json", {"max_seq_length": 64, "do_lower_case": True},
     "do_lower_case lower-cases every text, which cllm does not"),
    ("config_sentence_transformers.json", {"prompts": PROMPTS, "default_prompt_name": "passage"},
     'the default prompt name "passage" is not one of the prompts ("query", "document")'),
    ("config_sentence_transformers.json", {"prompts": {f"p{i}": "" for i in range(MAX_PROMPTS + 1)}},
     "the embedding prompts are 1,025, more than 1,024"),
    ("config_sentence_transformers.json", {"prompts": {"query": 3}}, 'the prompt "query" must be a string, got 3'),
]


@pytest.mark.parametrize("name, content, message", BAD_FOLDERS, ids=[message[:30] for _, _, message in BAD_FOLDERS])
def test_a_folder_whose_embedding_cllm_would_compute_otherwise_is_refused(folder, tmp_path, name, content, message):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / name).write_text(json.dumps(content))
    with pytest.raises(ModelFileError, match=re.escape(message)) as refusal:
        load_model(bad)
    assert "\n" not in str(refusal.value) and str(bad) in str(refusal.value)


@pytest.mark.parametrize("embedding, message", [
    ({"pooling": "cls"}, "bad tokenizer: the embedding pooling must be one of mean, last, got \"cls\""),
    ({"normalize": "yes"}, "the embedding normalize must be true or false"),
    ({"prompts": ["query"]}, "the embedding prompts must be an object of names and prompts"),
    ({"prompts": {"x" * 300: ""}}, "a prompt's name must be a string of 1 to 256 characters"),
    ({"prompts": {"query": "x" * (1 << 20) + "x"}}, "the embedding prompts hold 1,048,577 characters, more than"),
    ({"default_prompt_name": ["query"]}, "the default prompt name \\[\"query\"\\] is not one of the prompts"),
    ({"dimensions": 32}, "the embedding section has fields this cllm does not know: dimensions"),
    ("last", "the embedding section must be a JSON object"),
])
def test_bad_embedding_metadata_in_a_cllm_file_is_refused_in_one_line(ours, tmp_path, embedding, message):
    path = tmp_path / "m.cllm"
    save_model(path, ours.model, ours.tokenizer)
    metadata = read_metadata(path)
    tokenizer = json.loads(metadata["tokenizer"])
    tokenizer["embedding"] = tokenizer["embedding"] | embedding if isinstance(embedding, dict) else embedding
    safetensors.numpy.save_file(dict(ours.model.p), str(path), metadata=metadata | {"tokenizer": json.dumps(tokenizer)})
    with pytest.raises(ModelFileError, match=message) as refusal:
        load_model(path)
    assert "\n" not in str(refusal.value)

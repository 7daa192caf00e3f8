"""Embedding throughput: cllm against sentence-transformers and transformers on the same embedding-model folder, each
as users run it.

    cllm                     cllm.Model.open(folder, threads=N).encode(texts, batch_size=B): the folder's pooling,
                             normalization and prompts as its sentence-transformers files declare them, float32
    sentence-transformers    SentenceTransformer(folder, device="cpu", model_kwargs={"dtype": torch.float32})
                             .encode(texts, batch_size=B), torch on N threads: float32, as cllm computes
    sentence-transformers (default dtype)
                             SentenceTransformer(folder, device="cpu") as users get it: under transformers 5 a
                             bfloat16 checkpoint loads in bfloat16, on CPU too; the row names the dtype that its
                             hidden states were computed in
    transformers             AutoTokenizer and AutoModel (float32) of the folder, pooled by hand as users write it:
                             the texts sorted by length (characters, longest first, as sentence-transformers sorts
                             them) and cut into batches of B, each padded to its longest; the folder's pooling (the
                             attention-mask-weighted mean of last_hidden_state, or the last token's) in
                             torch.inference_mode(), torch on N threads

The folder, made once per run in a process of its own, is one of two embedding models (--shape):

- Qwen3-Embedding's layout (qwen3-embedding-0.6b, the default; quick is the same at 4 layers, for a smoke test): a
  Qwen3Model (the base model, no head) at Qwen3-Embedding-0.6B's shape (28 layers, width 1024, 16 query heads of
  128 over 8 key/value heads, SwiGLU 3072, a vocabulary of 151,669, tied), random weights made by transformers (its
  own init, seeded) and saved in bfloat16 as the Hub ships them; a byte-level BPE tokenizer behind Qwen2's
  pre-tokenizer, whose post-processor appends <|endoftext|> to every text, with padding on the left
  (tokenizer_config.json); and sentence-transformers' modules.json (Transformer, Pooling, Normalize),
  1_Pooling/config.json (last-token pooling) and config_sentence_transformers.json (the model's "query" and
  "document" prompts). Default engines: cllm and sentence-transformers in float32 and in its default dtype.
- GPT-2 as a mean-pooling embedding model (gpt2-small; gpt2-quick is the same at 2 layers, for a smoke test): a
  GPT2Model (the base model, no head) at GPT-2 small's shape (12 layers, 12 heads of 64, width 768, GELU MLP 3072,
  learned positions for a context of 1024, LayerNorms and biases, a vocabulary of 50,257), random weights made by
  transformers (seeded) and saved in float32 as GPT-2 ships; a byte-level BPE tokenizer behind GPT-2's
  pre-tokenizer, which appends nothing, with <|endoftext|> as the pad token (GPT-2 has none) and padding on the
  right (learned positions count from a text's first token: left padding would shift them in transformers); and
  sentence-transformers' modules.json (Transformer, Pooling) and 1_Pooling/config.json (mean pooling), no Normalize
  and no prompts. Default engines: cllm, transformers and sentence-transformers in float32 (its default dtype is the
  checkpoint's float32 too).

Both tokenizers are trained here, offline, on the texts' corpus, at 4,096 tokens: the model's vocabulary is larger,
but the rows beyond the tokenizer's are never looked up, and a text's cost is its count of tokens.

The texts: --texts of them (256), whose lengths, counted by the folder's tokenizer with any token it appends, are
drawn uniformly from 20 to 200 tokens: spans of --text (a plain-text file, e.g. tinyshakespeare) or, without it, of
made-up words (bench_generate.generated_texts), cut at a token boundary. Encoded as documents (no prompt), in
batches of at most --batch-size (32, sentence-transformers' default), every engine sorting the texts by length so
that a batch pads little.

One fresh spawned process per engine per round: the imports, the load (timed: from the loading call to a model that
encodes), one untimed warm-up encode of the --batch-size longest texts (the largest batch), then --repeats timed
encodes of all the texts. --rounds rounds alternate the engines (every other round in the reverse order) so that all
sample the same drift of a shared machine's speed; the table gives the medians of the pooled timed encodes (texts/s,
tokens/s: the texts' own tokens, not the padding), the ratio cllm / engine, how much an encode's forward passes pad
(the tokens they computed over the texts' own, as each engine batched them), the load (median over rounds) and the
process's peak RSS (interpreter and libraries included).

The limit: encoding is bound by its GEMMs. Its FLOPs are 2 x the weight matrices' parameters (q, k, v and the
attention's output; the MLP's gate, up and down under SwiGLU, or GPT-2's fc and proj; not the embeddings, which are
looked up, nor the vectors of the norms and biases) x the texts' tokens, plus the attention's products (QK^T and PV:
4 x query channels per query-key pair per layer, causal pairs only); GFLOP/s is those over the median encode, the
same count for every engine (padding is work an engine chose, not work the texts need), and "% of sgemm peak" holds
it against the machine's float32 GEMM rate (sgemm_peak: the best of 5 calls of one 4096^3 sgemm on the same
threads, in a process of its own, with scipy's OpenBLAS). A bfloat16 row's "% of peak" is against the float32
peak too: above 100% is what bfloat16 products (AMX, AVX-512 BF16) buy.

--profile runs, instead of the benchmark, cllm's encode once more with each kernel timed (the GEMMs by their
weight's shape, attention, the norms, RoPE, SwiGLU or GELU), the batches' padding, and the same GEMMs as bare sgemm
calls.

Checks, printed before the table: every engine's vectors against cllm's, text by text (cosine), and its token counts
against the folder's tokenizer; cllm against sentence-transformers in float32 must reach --min-cosine (0.9999) on
every text, on the documents and, where the folder declares prompts (Qwen3-Embedding's), on a few texts with the
"query" prompt (prompt_name="query"): else the run says FAILED and exits 1.

    python tools/bench_embed.py --text tinyshakespeare.txt            # the full shape (tens of minutes)
    python tools/bench_embed.py --shape quick --texts 64 --rounds 1         # a smoke test, about a minute
    python tools/bench_embed.py --engines cllm,sentence-transformers --rounds 2 --repeats 2
    python tools/bench_embed.py --text tinyshakespeare.txt --profile  # where cllm's encode spends its time
    python tools/bench_embed.py --shape gpt2-small --text tinyshakespeare.txt   # GPT-2 small, mean pooling
    python tools/bench_embed.py --shape gpt2-quick --texts 32 --rounds 1    # its smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace

import numpy as np
from bench_common import (
    alternating_rounds,
    busy_note,
    finish_report,
    fmt,
    foreign_load,
    higher_peak,
    in_fresh_process,
    machine_snapshot,
    measure_machine,
    peak_rss_mb,
    timed_calls,
    use_this_checkout,
)
from bench_train import time_sgemm

SEED = 1337
MIN_TOKENS, MAX_TOKENS = 20, 200  # a text's length, with any token the tokenizer's post-processor appends
TOKENIZER_VOCAB = 4096
ENDOFTEXT = "<|endoftext|>"
# Qwen2's pre-tokenizer (Qwen3's too): contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, spaces
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
# Qwen3-Embedding-0.6B's config_sentence_transformers.json
PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
           "document": ""}
QUERY_TEXTS = 8  # texts also encoded with the "query" prompt, for the agreement check
PEAK_SGEMM, PEAK_CALLS = 4096, 5  # m = k = n of the product that measures the machine's sgemm peak; calls timed


@dataclass(frozen=True)
class Architecture:
    """What an architecture's embedding folder is beyond its sizes, as its models ship."""
    model_class: str  # transformers' base model (no head)
    saved_dtype: str  # the checkpoint's
    gated_mlp: bool  # SwiGLU's gate, up and down matrices; else GPT-2's fc and proj
    pooling: str  # cllm's name of the Pooling module's mode: "last" (token) or "mean"
    normalize: bool  # a Normalize module after the Pooling
    padding_side: str
    special_tokens: tuple[str, ...]  # the tokenizer's, <|endoftext|> first
    prompts: dict[str, str]  # config_sentence_transformers.json's; none: no such file, no query check
    engines: tuple[str, ...]  # the default --engines


ARCHITECTURES = {
    "qwen3": Architecture("Qwen3Model", "bfloat16", gated_mlp=True, pooling="last", normalize=True,
                          padding_side="left", special_tokens=(ENDOFTEXT, "<|im_start|>", "<|im_end|>"),
                          prompts=PROMPTS,
                          engines=("cllm", "sentence-transformers", "sentence-transformers-default")),
    # A float32 checkpoint: sentence-transformers' default dtype would be float32 again, so plain transformers instead.
    "gpt2": Architecture("GPT2Model", "float32", gated_mlp=False, pooling="mean", normalize=False,
                         padding_side="right", special_tokens=(ENDOFTEXT,), prompts={},
                         engines=("cllm", "transformers", "sentence-transformers")),
}


@dataclass(frozen=True)
class EmbedShape:
    """A model's shape: a Qwen3 base model's (Qwen3-Embedding-0.6B's by default) or, with arch "gpt2", GPT-2's."""
    name: str
    arch: str = "qwen3"  # ARCHITECTURES
    n_layers: int = 28
    dim: int = 1024
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 3072
    vocab: int = 151669
    rope_theta: float = 1e6  # Qwen3's; GPT-2 has learned positions
    context: int = 32768

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def matrix_params(self) -> int:
        """The weight matrices' parameters: the GEMMs' (q, k, v, o, and gate, up, down or fc, proj in every layer)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        mlp_matrices = 3 if self.architecture.gated_mlp else 2
        return self.n_layers * (self.dim * (q + 2 * kv) + q * self.dim + mlp_matrices * self.dim * self.intermediate)

    def flops(self, lengths: list[int]) -> float:
        """An encode's FLOPs over texts of these lengths (tokens), padding not counted: the products with the weight
        matrices, and attention's QK^T and PV over the causal query-key pairs."""
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        return 2.0 * self.matrix_params * sum(lengths) + 4.0 * self.n_layers * self.n_heads * self.head_dim * pairs

    def describe(self) -> str:
        return (f"{self.arch} L{self.n_layers} H{self.n_heads}/{self.n_kv_heads}x{self.head_dim} C{self.dim} "
                f"I{self.intermediate} V{self.vocab}")


GPT2_SMALL = EmbedShape("gpt2-small", arch="gpt2", n_layers=12, dim=768, n_heads=12, n_kv_heads=12, head_dim=64,
                        intermediate=4 * 768, vocab=50257, context=1024)
SHAPES = {shape.name: shape for shape in (EmbedShape("qwen3-embedding-0.6b"), EmbedShape("quick", n_layers=4),
                                          GPT2_SMALL, replace(GPT2_SMALL, name="gpt2-quick", n_layers=2))}


@dataclass(frozen=True)
class Engine:
    name: str
    module: str  # what must be installed (found, not imported, by the parent)
    dtype: str | None = None  # the dtype the engine loads the model in; None: sentence-transformers' default


ENGINES = {e.name: e for e in (Engine("cllm", "cllm"),
                               Engine("sentence-transformers", "sentence_transformers", "float32"),
                               Engine("sentence-transformers-default", "sentence_transformers"),
                               Engine("transformers", "transformers", "float32"))}
LABELS = {"sentence-transformers-default": "sentence-transformers (default dtype)"}
REFERENCE = "sentence-transformers"  # the engine cllm must agree with


# --------------------------------------------------------------------------------------------- the folder


def make_folder(shape: EmbedShape, folder: str, text_file: str | None, count: int) -> tuple[list[str], list[int], str]:
    """Writes the embedding-model folder (see the module's docstring) and draws the texts; runs in its own process.
    Returns the texts, their lengths in tokens (with any the tokenizer appends) and a line describing the folder."""
    import torch
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            corpus = f.read()
        source = os.path.basename(text_file)
    else:
        from bench_generate import generated_texts

        corpus = "\n".join(generated_texts(rng, documents=256))
        source = "made-up words"
    arch = shape.architecture
    tokenizer = HFTokenizer(models.BPE())
    if shape.arch == "gpt2":  # GPT-2's own regex, inside ByteLevel; its post-processor appends nothing
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus.splitlines(), trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=list(arch.special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eot = tokenizer.token_to_id(ENDOFTEXT)
    if shape.arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=shape.vocab, n_positions=shape.context, n_embd=shape.dim, n_layer=shape.n_layers,
            n_head=shape.n_heads, n_inner=shape.intermediate, bos_token_id=eot, eos_token_id=eot)
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {ENDOFTEXT}", pair=f"$A {ENDOFTEXT} $B:1 {ENDOFTEXT}:1", special_tokens=[(ENDOFTEXT, eot)])
        config = transformers.Qwen3Config(
            vocab_size=shape.vocab, hidden_size=shape.dim, num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
            intermediate_size=shape.intermediate, rope_theta=shape.rope_theta, rms_norm_eps=1e-6,
            tie_word_embeddings=True, max_position_embeddings=shape.context, bos_token_id=eot, eos_token_id=eot)
        tokenizer_config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None}
    texts = draw_texts(tokenizer, corpus, count, rng)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]

    torch.manual_seed(SEED)
    model = getattr(transformers, arch.model_class)(config).eval()
    model.to(getattr(torch, arch.saved_dtype)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if arch.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    files = {
        "tokenizer_config.json": tokenizer_config | {
            "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "padding_side": arch.padding_side,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": shape.context},
        "modules.json": modules,
        "1_Pooling/config.json": {"word_embedding_dimension": shape.dim, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": arch.pooling == "mean",
                                  "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
                                  "pooling_mode_weightedmean_tokens": False,
                                  "pooling_mode_lasttoken": arch.pooling == "last", "include_prompt": True},
    }
    if arch.prompts:
        files["config_sentence_transformers.json"] = {"prompts": arch.prompts, "default_prompt_name": None,
                                                      "similarity_fn_name": "cosine"}
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, name)))
    note = (f"folder: {shape.name} ({shape.describe()}), {model.num_parameters() / 1e6:.1f}M parameters "
            f"({shape.matrix_params / 1e6:.1f}M in the layers' matrices), {arch.saved_dtype}, {size / 1e6:,.0f} MB, "
            f"tokenizer of {tokenizer.get_vocab_size()} tokens; {len(texts)} texts from {source}, "
            f"{min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.1f} "
            f"({sum(lengths):,} in all); made in {time.perf_counter() - started:.0f} s")
    return texts, lengths, note


def draw_texts(tokenizer, corpus: str, count: int, rng: np.random.Generator) -> list[str]:
    """count spans of corpus, each starting at a word and cut at a token boundary so that the tokenizer makes it
    a length drawn uniformly from MIN_TOKENS to MAX_TOKENS (with the tokens it appends; re-tokenizing the cut span
    may merge across the cut, so lengths are measured afterwards, not assumed)."""
    appended = tokenizer.post_processor.num_special_tokens_to_add(False)
    starts = [i + 1 for i, c in enumerate(corpus[:-MAX_TOKENS * 16]) if c.isspace() and not corpus[i + 1].isspace()]
    texts = []
    for target in rng.integers(MIN_TOKENS, MAX_TOKENS + 1, size=count):
        start = starts[rng.integers(len(starts))]
        span = corpus[start:start + MAX_TOKENS * 16]
        offsets = tokenizer.encode(span, add_special_tokens=False).offsets
        texts.append(span[:offsets[min(target - appended, len(offsets)) - 1][1]])
    return texts


# ---------------------------------------------------------------------------------------------- engines


@dataclass
class Result:
    engine: str
    times: list[float]  # seconds per timed encode of all the texts
    loads: list[float]
    dtype: str  # what the hidden states were computed in
    vectors: np.ndarray  # (texts, dim), of the last timed encode
    query_vectors: np.ndarray | None  # (QUERY_TEXTS, dim) with the "query" prompt, or None if not computed
    query_note: str = ""  # why not
    peak_rss_mb: float | None = None
    tokens: list[int] = field(default_factory=list)  # the engine's own count of each text's tokens, where known
    padded: int | None = None  # the tokens the last timed encode's forward passes computed, padding included

    def pool(self, other: Result) -> None:
        self.times += other.times
        self.loads += other.loads
        self.peak_rss_mb = higher_peak(self.peak_rss_mb, other.peak_rss_mb)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    def summary(self, texts: int) -> str:
        return (f"  {label(self.engine):40s} {self.dtype:9s} encode {statistics.median(self.times):7.2f} s "
                f"({texts / self.median_s:6.1f} texts/s; runs {', '.join(f'{t:.2f}' for t in self.times)})  "
                f"load {statistics.median(self.loads):.2f} s  peak RSS {fmt(self.peak_rss_mb, '.0f')} MB")


def label(engine: str) -> str:
    return LABELS.get(engine, engine)


def bench_engine(engine: str, shape: EmbedShape, folder: str, texts: list[str], threads: int, batch_size: int,
                 repeats: int) -> tuple[Result | None, str | None]:
    """One engine in this (fresh) process: load, warm up, time; (result, None) or (None, what went wrong)."""
    try:
        use_this_checkout()
        run = {"cllm": run_cllm, "transformers": run_transformers}.get(engine, run_sentence_transformers)
        return run(ENGINES[engine], shape, folder, texts, threads, batch_size, repeats), None
    except Exception:  # noqa: BLE001 - reported by the parent; the other engines still run
        return None, f"{engine} failed:\n{traceback.format_exc()}"


def timed_encodes(encode, texts: list[str], batch_size: int, repeats: int,
                  passes: list[tuple[int, int]]) -> tuple[list[float], np.ndarray, int]:
    """One untimed encode of the batch_size longest texts (the largest batch an encode makes), then repeats timed
    encodes of all: (seconds each, the vectors, the tokens the last one computed). passes is where the engine's
    encode records each forward pass as (texts, padded length)."""
    encode(sorted(texts, key=len)[-batch_size:])
    times = []
    for _ in range(repeats):
        passes.clear()
        started = time.perf_counter()
        vectors = encode(texts)
        times.append(time.perf_counter() - started)
    return times, np.asarray(vectors, np.float32), sum(n * seq for n, seq in passes)


def query_vectors(encode_query, texts: list[str], shape: EmbedShape) -> tuple[np.ndarray | None, str]:
    """The first QUERY_TEXTS texts' vectors with the folder's "query" prompt; else None and why not."""
    if "query" not in shape.architecture.prompts:
        return None, "the folder declares no prompts"
    try:
        return np.asarray(encode_query(texts[:QUERY_TEXTS]), np.float32), ""
    except Exception as e:  # noqa: BLE001 - said in the agreement check
        return None, f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def cllm_passes():
    """Within the block, each forward pass of cllm's Model.encode as (texts, padded length), in the list the block
    is given: seen where Model.encode hands a batch to cllm.pooling.embed_batch (a cllm that no longer does leaves
    the list empty, and the table says n/a)."""
    import cllm.sync_model

    embed_batch = getattr(cllm.sync_model, "embed_batch", None)
    passes = []
    if embed_batch is None:
        yield passes
        return

    def recorded(model, workspaces, ids, *, seq, **kwargs):
        passes.append((len(ids), seq))
        return embed_batch(model, workspaces, ids, seq=seq, **kwargs)

    cllm.sync_model.embed_batch = recorded
    try:
        yield passes
    finally:
        cllm.sync_model.embed_batch = embed_batch


def run_cllm(spec: Engine, shape: EmbedShape, folder: str, texts: list[str], threads: int, batch_size: int,
             repeats: int) -> Result:
    import cllm

    started = time.perf_counter()
    model = cllm.Model.open(folder, threads=threads)
    load = time.perf_counter() - started
    with cllm_passes() as passes:
        times, vectors, padded = timed_encodes(lambda t: model.encode(t, batch_size=batch_size), texts, batch_size,
                                               repeats, passes)
    query, note = query_vectors(lambda t: model.encode(t, batch_size=batch_size, prompt_name="query"), texts, shape)
    tokens = [ids.size for ids in model.tokenizer.encode_for_embedding(texts)]
    return Result(spec.name, times, [load], "float32", vectors, query, note, peak_rss_mb(), tokens, padded)


def run_sentence_transformers(spec: Engine, shape: EmbedShape, folder: str, texts: list[str], threads: int,
                              batch_size: int, repeats: int) -> Result:
    import torch

    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": getattr(torch, spec.dtype)}} if spec.dtype else {}
    started = time.perf_counter()
    model = SentenceTransformer(folder, device="cpu", **kwargs)
    load = time.perf_counter() - started
    computed = set()  # the dtypes of the hidden states the Transformer module gives the pooling
    passes = []

    def seen(module, args, out):
        computed.add(out["token_embeddings"].dtype)
        passes.append(tuple(out["token_embeddings"].shape[:2]))

    hook = model[0].register_forward_hook(seen)
    times, vectors, padded = timed_encodes(lambda t: model.encode(t, batch_size=batch_size), texts, batch_size,
                                           repeats, passes)
    hook.remove()
    query, note = query_vectors(lambda t: model.encode(t, batch_size=batch_size, prompt_name="query"), texts, shape)
    tokens = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    dtype = "/".join(sorted(str(d).removeprefix("torch.") for d in computed))
    return Result(spec.name, times, [load], dtype, vectors, query, note, peak_rss_mb(), tokens, padded)


def run_transformers(spec: Engine, shape: EmbedShape, folder: str, texts: list[str], threads: int, batch_size: int,
                     repeats: int) -> Result:
    """The folder's pooling written by hand over plain transformers, batched as sentence-transformers batches."""
    import torch

    torch.set_num_threads(threads)
    import transformers
    from transformers import AutoModel, AutoTokenizer

    arch = shape.architecture
    # transformers imports its modules lazily: the model's before the timed load, as importing sentence-transformers
    # does for it, so that both loads time the folder's reading
    getattr(transformers, arch.model_class)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=getattr(torch, spec.dtype)).eval()
    load = time.perf_counter() - started
    passes = []

    def pool(hidden, mask):
        if arch.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # each text's last token, whichever side pads
        return hidden[torch.arange(hidden.shape[0]), last]

    def encode(batch_texts: list[str]) -> np.ndarray:
        vectors = np.empty((len(batch_texts), shape.dim), np.float32)
        longest_first = sorted(range(len(batch_texts)), key=lambda i: -len(batch_texts[i]))
        with torch.inference_mode():
            for start in range(0, len(longest_first), batch_size):
                batch = longest_first[start:start + batch_size]
                inputs = tokenizer([batch_texts[i] for i in batch], padding=True, return_tensors="pt")
                pooled = pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
                if arch.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                vectors[batch] = pooled.float().numpy()
                passes.append(tuple(inputs["input_ids"].shape))
        return vectors

    times, vectors, padded = timed_encodes(encode, texts, batch_size, repeats, passes)
    query, note = query_vectors(lambda t: encode([arch.prompts["query"] + text for text in t]), texts, shape)
    tokens = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    dtype = str(model.dtype).removeprefix("torch.")
    return Result(spec.name, times, [load], dtype, vectors, query, note, peak_rss_mb(), tokens, padded)


# ----------------------------------------------------------------------------------------------- the limit


def sgemm_peak(threads: int) -> tuple[float, str]:
    """The machine's float32 GEMM rate in GFLOP/s: the best of PEAK_CALLS calls of one PEAK_SGEMM^3 sgemm after a
    warm-up (bench_train.time_sgemm: scipy's OpenBLAS, on `threads` threads), and which BLAS that is. The best,
    not the median: it is a ceiling, and a shared machine only ever lowers it. Run it in a process of its own."""
    from threadpoolctl import threadpool_info

    n = PEAK_SGEMM
    seconds = min(time_sgemm([(n, n, n)], threads, PEAK_CALLS))
    blas = [f"{i.get('internal_api')} {i.get('version')} ({os.path.basename(os.path.dirname(i['filepath']))})"
            for i in threadpool_info() if i["user_api"] == "blas"]
    return 2.0 * n**3 / seconds / 1e9, "; ".join(blas)


# ------------------------------------------------------------------------------------------------ profile


def profile_cllm(shape: EmbedShape, folder: str, texts: list[str], threads: int, batch_size: int) -> str:
    """cllm's encode of the texts, part by part (after a warm-up encode): each kernel's seconds (the GEMMs by their
    weight's shape), the batches' padding, and the same GEMMs as bare sgemm calls on the same threads; runs in
    its own process. Returns the report's lines."""
    use_this_checkout()
    import cllm
    from cllm._kernels import attention, embedding, gelu, layernorm, linear, rmsnorm, rope, swiglu

    q, kv, inter = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.intermediate
    gated = shape.architecture.gated_mlp
    gemms = {(shape.dim, q + 2 * kv): "q, k, v GEMM", (q, shape.dim): "attention-out GEMM",
             (shape.dim, 2 * inter if gated else inter): "gate, up GEMM" if gated else "fc GEMM",
             (inter, shape.dim): "down GEMM" if gated else "MLP-out GEMM"}
    # Every architecture's kernels: a kernel the model does not call makes no row.
    targets = [(linear, "linear_forward", lambda x, w, *rest: gemms.get(w.shape, f"GEMM {w.shape}")),
               (attention, "attention_forward", "attention"), (rmsnorm, "rmsnorm_forward", "RMSNorm"),
               (rmsnorm, "head_rmsnorm_forward", "q/k head RMSNorm"), (rope, "rope_forward", "RoPE"),
               (swiglu, "swiglu_forward", "SwiGLU"), (layernorm, "layernorm_forward", "LayerNorm"),
               (gelu, "gelu_forward", "GELU"), (embedding, "embedding_forward", "embedding")]
    model = cllm.Model.open(folder, threads=threads)
    with cllm_passes() as batches:
        model.encode(sorted(texts, key=len)[-batch_size:], batch_size=batch_size)
        batches.clear()
        with timed_calls(targets) as totals:
            started = time.perf_counter()
            model.encode(texts, batch_size=batch_size)
            wall = time.perf_counter() - started
    parts = dict(totals)
    parts["the rest (tokenizing, pooling, Python)"] = wall - sum(parts.values())
    tokens = sum(ids.size for ids in model.tokenizer.encode_for_embedding(texts))
    padded = sum(n * seq for n, seq in batches)
    pairs = sum(n * seq * (seq + 1) // 2 for n, seq in batches)
    flops = {name: 2.0 * padded * c * oc * shape.n_layers for (c, oc), name in gemms.items()}
    flops["attention"] = 4.0 * shape.n_layers * q * pairs
    bare = {name: time_sgemm([(n * seq, c, oc) for n, seq in batches], threads, 1)[0] * shape.n_layers
            for (c, oc), name in gemms.items()}
    lines = [(f"cllm's encode of {len(texts)} texts on {threads} threads: {wall:.2f} s; {len(batches)} batches, "
              f"{tokens:,} tokens padded to {padded:,} (x{padded / tokens:.3f}); GFLOP/s on the padded tokens (the "
              f"attention's over causal pairs); bare sgemm: the same products as plain sgemm calls, {threads} BLAS "
              f"threads"),
             "",
             "| part | s | share | GFLOP/s | bare sgemm s | bare / cllm |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        gflops = flops[name] / seconds / 1e9 if name in flops and seconds > 0 else None
        lines.append(f"| {name} | {seconds:.2f} | {seconds / wall:.1%} | {fmt(gflops, '.1f')} "
                     f"| {fmt(bare.get(name), '.2f')} | {fmt(bare[name] / seconds if name in bare else None, '.0%')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- report


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_agreement(results: dict[str, Result], shape: EmbedShape, lengths: list[int], min_cosine: float) -> bool:
    """Prints each engine's cosines with cllm's vectors (documents; the "query" prompt, where the folder has one) and
    its token counts against the tokenizer's; False if cllm and the float32 reference part anywhere."""
    c = results.get("cllm")
    if c is None:
        return True
    ok = True
    for engine, r in results.items():
        if r.tokens and r.tokens != lengths:
            print(f"  {label(engine)}: tokenizes {sum(t != n for t, n in zip(r.tokens, lengths))} of the texts to "
                  f"another length than the folder's tokenizer")
            ok = ok and engine != REFERENCE
        if engine == "cllm":
            continue
        documents = cosines(c.vectors, r.vectors)
        line = (f"  cllm vs {label(engine)} ({r.dtype}): cosine min {documents.min():.7f}, median "
                f"{np.median(documents):.7f} over {documents.size} texts")
        query = None
        if c.query_vectors is not None and r.query_vectors is not None:
            query = cosines(c.query_vectors, r.query_vectors)
            line += f"; with the query prompt min {query.min():.7f} over {query.size}"
        else:
            line += f"; query prompt not compared ({c.query_note or r.query_note})"
        print(line)
        if engine != REFERENCE:
            continue
        worst = documents.min() if query is None else min(documents.min(), query.min())
        if worst < min_cosine:
            ok = False
            print(f"  FAILED: cllm's vectors part from {label(engine)}'s (cosine {worst:.7f} < {min_cosine})")
        if query is None and shape.architecture.prompts:
            ok = False
            print(f"  FAILED: the folder declares prompts, but cllm's and {label(engine)}'s vectors with the query "
                  f"prompt were not compared")
    return ok


def markdown_table(results: dict[str, Result], shape: EmbedShape, lengths: list[int],
                   peak_gflops: float | None) -> str:
    flops = shape.flops(lengths)
    c = results.get("cllm")
    lines = [("| engine | computes in | texts/s | tokens/s | cllm/engine | padded | GFLOP/s | % of sgemm peak "
              "| load s | peak RSS MB |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, r in results.items():
        gflops = flops / r.median_s / 1e9
        ratio = "" if c is None or r is c else f"**{r.median_s / c.median_s:.2f}**"
        padded = f"x{r.padded / sum(lengths):.3f}" if r.padded else "n/a"
        lines.append(f"| {label(engine)} | {r.dtype} | {len(lengths) / r.median_s:,.1f} "
                     f"| {sum(lengths) / r.median_s:,.0f} | {ratio} | {padded} | {gflops:.1f} "
                     f"| {fmt(peak_gflops and 100 * gflops / peak_gflops, '.0f')} | {statistics.median(r.loads):.2f} "
                     f"| {fmt(r.peak_rss_mb, '.0f')} |")
    lines.append("")
    lines.append(f"{shape.name} ({shape.describe()}): {len(lengths)} texts, mean {statistics.mean(lengths):.1f} tokens "
                 f"({sum(lengths):,} in all); an encode is {flops / 1e12:.3f} TFLOP (padding not counted); sgemm "
                 f"{PEAK_SGEMM}^3 peak {fmt(peak_gflops, '.1f')} GFLOP/s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_engines = "; ".join(f"{name}: {','.join(arch.engines)}" for name, arch in ARCHITECTURES.items())
    p.add_argument("--shape", default="qwen3-embedding-0.6b", choices=list(SHAPES),
                   help="the model's shape (quick: 4 layers, gpt2-quick: 2, for a smoke test)")
    p.add_argument("--engines", help=f"comma-separated subset of {','.join(ENGINES)} (default: the shape's "
                                     f"architecture's, {default_engines})")
    p.add_argument("--text", help="a plain-text file to cut the texts from (default: made-up words)")
    p.add_argument("--texts", type=int, default=256, help="how many texts (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="encode's batch size for every engine (default 32)")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="timed encodes per engine and round (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the engines this many times (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, where cllm's encode spends its time, kernel by kernel")
    p.add_argument("--min-cosine", type=float, default=0.9999,
                   help="the least cosine of cllm's vectors with sentence-transformers' float32 ones (default 0.9999)")
    args = p.parse_args(argv)
    args.shape = SHAPES[args.shape]
    args.engines = [e.strip() for e in (args.engines or ",".join(args.shape.architecture.engines)).split(",")
                    if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        p.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    if min(args.texts, args.batch_size, args.threads, args.repeats, args.rounds) < 1:
        p.error("need --texts, --batch-size, --threads, --repeats and --rounds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    print(f"threads {args.threads}, batch size {args.batch_size}, repeats {args.repeats}, rounds {args.rounds}, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    engines = []
    for engine in args.engines:
        if importlib.util.find_spec(ENGINES[engine].module) is None:  # find, don't import
            print(f"{ENGINES[engine].module} is not installed; skipping {label(engine)}")
        else:
            engines.append(engine)
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)
    machine, _ = measure_machine(args.threads)
    print(machine, flush=True)
    try:
        peak_gflops, blas = in_fresh_process(sgemm_peak, args.threads)
        print(f"sgemm {PEAK_SGEMM}x{PEAK_SGEMM}x{PEAK_SGEMM} on {args.threads} threads ({blas}): {peak_gflops:.1f} "
              f"GFLOP/s (best of {PEAK_CALLS} calls)", flush=True)
    except Exception as e:  # noqa: BLE001 - no scipy or threadpoolctl: the table says n/a
        peak_gflops = None
        print(f"the large sgemm failed ({type(e).__name__}: {e})")

    start = machine_snapshot()
    with tempfile.TemporaryDirectory(prefix="cllm-bench-embed-") as tmp:
        folder = os.path.join(tmp, args.shape.name)
        texts, lengths, note = in_fresh_process(make_folder, args.shape, folder, args.text, args.texts)
        print(note, flush=True)
        if args.profile:
            print(in_fresh_process(profile_cllm, args.shape, folder, texts, args.threads, args.batch_size))
            return 0
        results: dict[str, Result] = alternating_rounds(
            engines, args.rounds,
            lambda engine: in_fresh_process(bench_engine, engine, args.shape, folder, texts, args.threads,
                                            args.batch_size, args.repeats),
            lambda result: result.summary(len(texts)))
    agree = check_agreement(results, args.shape, lengths, args.min_cosine)
    title = (f"Embedding {len(texts)} texts ({MIN_TOKENS}-{MAX_TOKENS} tokens), batch {args.batch_size}, "
             f"{args.threads} threads, median of {args.repeats} encode(s) in each of {args.rounds} alternating "
             f"rounds; cllm/engine = cllm's texts/s over the engine's; padded = the tokens an encode's forward "
             f"passes computed over the texts' own; GFLOP/s = the encode's GEMM and attention FLOPs (padding not "
             f"counted) over its time; % of sgemm peak: that against one large float32 sgemm")
    status = finish_report(start, results, title,
                           lambda: markdown_table(results, args.shape, lengths, peak_gflops))
    if not agree:
        print("\nFAILED: cllm's embeddings do not agree with sentence-transformers' (see above)")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())

"""GGUF in and out, against llama.cpp itself (issue 21): files that cllm's exporter and llama.cpp's own
llama-quantize wrote, read by cllm and by llama.cpp, their logits, greedy tokens and perplexities side by side; and
llama.cpp's own tokenizer tests run on cllm's reading of their vocabularies.

A check to run by hand, never a test in CI: it needs llama.cpp and minutes of CPU. llama.cpp comes in two parts.
Its Python binding, llama-cpp-python, gives the logits; this machine's was built from its source package:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \\
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
        pip install llama-cpp-python==0.3.36 --no-binary llama-cpp-python

(ggml's AMX path crashed on q8_0 here). Its tools llama-quantize and llama-perplexity are found (--llama-cpp-bin,
$LLAMA_CPP_BIN, PATH) or else built with the same options from the binding's own version of that source package,
outside the repository (tools/bench_common.llama_cpp_tools: once, a few minutes on 2 cores).

    python tools/check_gguf.py                        # everything: about 20 minutes on 2 cores
    python tools/check_gguf.py --models smollm2 --types q4_k_m,q6_k --no-tokenizers
    python tools/check_gguf.py --tokenizers-only      # a minute or two
    python tools/check_gguf.py --work /tmp/gguf-check # keeps the models and files there; a rerun reuses them
    python tools/check_gguf.py --model smollm2=SmolLM2-135M.gguf   # your own weights (any MODEL cllm reads)
    python tools/check_gguf.py --models qwen2.5,qwen3 --no-tokenizers  # the Qwen architectures: ~25 minutes

The models (--models), each exported by cllm as an f32 GGUF file (`cllm-convert model.cllm model-f32.gguf`),
quantized by `llama-quantize` to each of --types (Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K), and by cllm's own exporter to
each of --cllm-types (`cllm-convert model-f32.gguf out.gguf --quantize q8_0`: rows "q8_0 by cllm"):

    gpt2      GPT-2 small's shape: 12 layers, 12 heads, width 768, context 1024, 50,257 rows (124M parameters)
    smollm2   SmolLM2-135M's: llama, 30 layers, 9 heads over 3 kv heads, width 576, SwiGLU 1536, context 2048,
              49,152 rows, a tied head, RoPE base 100,000 (135M). Its width is not a multiple of 256, so llama.cpp's
              K-quant mixes fall back to Q5_0, Q5_1 and Q8_0 on many of its matrices, as a real SmolLM2 file does.
    qwen2.5   Qwen2.5-0.5B's widths: qwen2 (biases on q, k and v), 14 heads over 2 kv heads, width 896, SwiGLU 4864,
              context 32,768, 151,936 rows, a tied head, RoPE base 10^6, norm epsilon 1e-6; 4 of its 24 layers
              (197M). 896 is not a multiple of 256 either: its q4_k_m holds Q5_0 and Q8_0 beside Q4_K and Q6_K.
    qwen3     Qwen3-0.6B's widths: qwen3 (an RMSNorm over each head of q and k), 16 heads of 128 (apart from the
              width, 1024) over 8 kv heads, SwiGLU 3072, context 40,960, 151,936 rows, a tied head, RoPE base 10^6,
              norm epsilon 1e-6; 4 of its 28 layers (218M).

Their weights are not pretrained models' (nothing is downloaded), and come in two sets (--weights), since neither
alone makes every check telling:

    trained   cllm's seeded init, trained --steps AdamW steps on the first 90% of --data (tinyshakespeare). The
              loss falls from ln(rows) ~ 10.8 to ~ 6.7: the model has learned the text's token frequencies, so its
              held-out perplexity (~ 900) is a language model's, not a uniform one's (~ 50,000). But a few dozen steps
              (about all that 2 cores allow here: a step of 512 tokens takes 2-5 s) do not teach it to use its context:
              its greedy continuation repeats one frequent token ("\n"), so the greedy check says little on it.
    random    cllm's seeded init with every block's matrices x2 and the final norm's gain x4, untrained: each block
              changes the residual stream and the logits are peaked (standard deviation ~ 2), so predictions depend
              on the context and 128 greedy tokens are 70 to 100 distinct ones, with margins between the top two
              logits of ~ 0.3: a real check of every step. Its perplexity is that of a random function (~ 3e5), and
              it is far more sensitive than a trained model: rounding its activations to 8 bits, as llama.cpp's
              quantized products do, moves its logits by a few percent and its perplexity by up to ~ 1%.

For the Qwen shapes, the random weights' q, k and v biases (qwen2) are N(0, 0.5^2) and the head norms' gains
(qwen3) N(1, 0.5^2), where cllm's init leaves them 0 and 1: each then moves the logits.

All come with a byte-level BPE tokenizer of --vocab tokens trained on the same 90% (the embedding's rows past it
stay as initialized and are never produced): cllm's own, or for the Qwen shapes one built as Qwen's is (NFC,
Qwen2's regex, then the bytes), which the GGUF files name pre-tokenizer qwen2 and llama.cpp splits with its own.
The script prints, for each, how peaked its logits are and how many distinct greedy tokens it makes. --model
NAME=PATH takes other weights instead (a .cllm file, a Hugging Face folder, or an f32/f16 GGUF file, which is
quantized as it is).

With --hf-converter, each model is also exported as a Hugging Face folder (`cllm-convert model.cllm folder/`) and
converted by llama.cpp's own `convert_hf_to_gguf.py --outtype f32` (from --llama-cpp-src): that file must hold the
tensors of cllm's f32 export bit for bit (its metadata's differences are notes), and is checked as the others are
(row "f32 by convert_hf_to_gguf"). The converter names a byte-level BPE's pre-tokenizer by hashing its ids of a
test string, which it knows only for published vocabularies; for these it is told the name cllm's exporter wrote.

For each file, the f32 export first, the engines run one at a time, each in a fresh process with --threads threads;
which of them goes first alternates from one file to the next. cllm: `cllm.checkpoint.load_model(file)`, its full
forward pass over the prompt and its KV-cache decoder. llama.cpp: `llama_cpp.Llama(file, logits_all=True)` with an
f32 KV cache, and `llama-perplexity`. The prompt is the first --prompt tokens of the held-out text (the last 10% of
--data); both engines get the same ids. The table's columns:

    logits last, all   ||cllm - llama.cpp|| / ||llama.cpp|| of the prompt's logits: its last position, all positions
    llama f16 KV       the same figure between llama.cpp's own logits with an f16 KV cache and with an f32 one: the
                       size of a difference llama.cpp itself makes by rounding activations to f16 (a yardstick)
    llama 8-bit        llama.cpp's logits on the file against its own on the F32 file `llama-quantize
                       --allow-requantize FILE F32` makes of it (the same weights): what llama.cpp's products on
                       quantized weights change by rounding their activations to 8 bits (Q8_0, Q8_K blocks); cllm
                       rounds its own (blocks of 32), so on quantized files "logits all" is of this size or more
    vs dequant         cllm on the file's weights widened to float32 (load_model(dequantize=True)) against llama.cpp
                       on that F32 file: the same weights and float arithmetic in both, so this one should be at
                       f32-against-f32 level, as on the f32 file (~1e-6), but for
                       llama.cpp's own f16 roundings: its gpt2 reads each GELU from an f16 table (input and output
                       rounded to f16), which moves the random gpt2's logits by ~4e-4
    vs f32             cllm's logits on the file against its logits on the f32 file: what the quantization itself
                       changes, the size of difference a wrong block or type would make
    weights            the largest |difference| between cllm's weights read from the file and llama.cpp's own
                       dequantization of them (that F32 file), over every tensor; "exact" if there is none
    greedy             where --greedy greedy tokens from the prompt first differ; "=" if they never do (on a
                       quantized file, llama.cpp's 8-bit activations may part them at a near-tie: a note gives cllm's
                       margin there)
    greedy vs dequant  the same against llama.cpp on the dequantized F32 file: on the f32 file only a near-tie may
                       part these; on a quantized one cllm's 8-bit activations may (a note)
    ppl cllm, llama    the held-out text's perplexity by cllm and by `llama-perplexity` on the same file, and their
                       relative difference (the issue asks for at most 0.5%)
    ppl ... dequant    llama-perplexity's on the dequantized F32 file (what llama.cpp gives without its 8-bit
                       activations), and cllm's relative difference from it, which should be smaller still

The check fails ("SOMETHING DISAGREES", exit status 1) on any weight that is not exact, held-out ids that differ,
"vs dequant" over 1e-4 or over llama.cpp's own f16 yardstick on the f32 file (its f16 KV column), whichever is
larger, greedy tokens parting from llama.cpp's on the f32 file where cllm's margin is not a near-tie (1e-3),
or a perplexity more than 0.5% from llama.cpp's: from llama-perplexity's on the file for trained
weights (the issue's criterion), and on the dequantized file for the random ones, whose sensitivity lets llama.cpp's
own 8-bit activations move its figure by about that much (the table shows both).

Perplexity is computed as llama-perplexity computes it, by both: the text tokenized whole (a bos token first if the
vocabulary adds one), cut into --ppl-chunks consecutive chunks of --ppl-ctx tokens, each evaluated from a fresh
context (its first token replaced by bos if the vocabulary adds one), and only the second half of each chunk's
predictions scored: positions ctx/2 .. ctx-2, each predicting the next token. (cllm's own `cllm-evaluate` scores
every position of its windows, so its figure is a different one.) The script also checks that cllm and llama.cpp
tokenize the held-out text to the same ids.

The tokenizer check: llama.cpp's source ships vocabulary-only GGUF files (models/ggml-vocab-*.gguf, no weights) with
test inputs (.gguf.inp) and the ids llama.cpp gives them (.gguf.out), as its test-tokenizer-0 reads them (no
special tokens added, none parsed; a repeated input counts once). For each vocabulary of a kind cllm reads
(tokenizer.ggml.model "gpt2" with the pre-tokenizers gpt-2, smollm, llama-bpe, qwen2, default or none, which
llama.cpp reads as default; and "llama", sentencepiece), cllm's `read_gguf_tokenizer` must give the .out ids; the
binding's own tokenizer is run on them too, to show the .out files are this llama.cpp's. Then every vocabulary
cllm reads, with tests or not, tokenizes every file's test inputs and the paragraphs of llama.cpp's README.md in
both cllm and the binding ("every input"). Vocabularies of other kinds are listed with cllm's refusal.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np

from bench_common import (LLAMA_CPP_HOME, busy_note, cpu_description, fmt, foreign_load, in_fresh_process,
                          llama_cpp_python_version, llama_cpp_source, llama_cpp_tools, machine_snapshot,
                          use_this_checkout)

SEED = 1337
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                            "data", "tinyshakespeare.txt")
HELD_OUT = 0.1  # the last tenth of --data
# llama-quantize's names for the types checked
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
CLLM_TYPES = ("q8_0", "q4_0", "q4_k_m")  # the file types cllm's exporter writes (cllm.formats.quantize.FILE_TYPES)
CONVERTED = "f32 by convert_hf_to_gguf"  # the row of llama.cpp's converter's file (--hf-converter)
PPL_TOLERANCE = 0.005
# cllm against llama.cpp on the same float weights: float32 arithmetic in different orders gives ~1e-6 here; a wrong
# block or row order gives 1e-2 and more. llama.cpp's gpt2 also rounds each GELU's input and output to f16 (a table),
# which on a sensitive model is more than this: there the limit is llama.cpp's own f16 rounding, the difference its
# f16 KV cache makes on the f32 file.
VS_DEQUANTIZED_TOLERANCE = 1e-4
# Which of llama.cpp's perplexities cllm's must be within PPL_TOLERANCE of: the file's (the issue's criterion) for
# trained weights, whose sensitivity is a trained model's; the dequantized file's for the random ones, on which
# llama.cpp's own 8-bit activations move its figure by more than the tolerance (the table shows both).
PPL_AGAINST = {"trained": "file", "given": "file", "random": "dequantized"}
NEAR_TIE = 1e-3  # a greedy step whose top two logits are closer may go either way in float arithmetic
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1  # llama_cpp's type_k / type_v values
LLAMA_TOOLS = ["llama-quantize", "llama-perplexity"]
WEIGHTS = ("trained", "random")
RANDOM_BLOCK_SCALE, RANDOM_NORM_SCALE = 2.0, 4.0  # the "random" weights (see the module's notes)
RANDOM_QWEN_SPREAD = 0.5  # the random weights' spread of qwen2's biases (init 0) and qwen3's head norms (init 1)
QWEN_ARCHITECTURES = ("qwen2", "qwen3")
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # the first ends a text
# Vocabularies whose tokenizer cllm reads (cllm.formats.gguf_tokenizer); any other is expected to be refused.
READ_PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe", "qwen2", "default")  # of model "gpt2"; a file without one: default


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str
    n_layers: int
    n_heads: int
    dim: int
    context: int
    vocab: int
    n_kv_heads: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    head_dim: int | None = None
    norm_eps: float = 1e-5

    def model_config(self):
        from cllm.model import ModelConfig

        llama = dict(n_kv_heads=self.n_kv_heads, intermediate_size=self.intermediate_size,
                     rope_theta=self.rope_theta, head_dim=self.head_dim) if self.arch != "gpt2" else {}
        return ModelConfig(vocab_size=self.vocab, context_length=self.context, dim=self.dim, n_layers=self.n_layers,
                           n_heads=self.n_heads, arch=self.arch, norm_eps=self.norm_eps, **llama)


SHAPES = {
    "gpt2": Shape("gpt2", "gpt2", n_layers=12, n_heads=12, dim=768, context=1024, vocab=50257),
    "smollm2": Shape("smollm2", "llama", n_layers=30, n_heads=9, dim=576, context=2048, vocab=49152, n_kv_heads=3,
                     intermediate_size=1536, rope_theta=100000.0),
    # Qwen2.5-0.5B's and Qwen3-0.6B's widths, 4 of their 24 and 28 layers
    "qwen2.5": Shape("qwen2.5", "qwen2", n_layers=4, n_heads=14, dim=896, context=32768, vocab=151936, n_kv_heads=2,
                     intermediate_size=4864, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": Shape("qwen3", "qwen3", n_layers=4, n_heads=16, dim=1024, context=40960, vocab=151936, n_kv_heads=8,
                   intermediate_size=3072, rope_theta=1e6, head_dim=128, norm_eps=1e-6),
}


@dataclass(frozen=True)
class Training:
    steps: int
    batch: int
    seq: int
    lr: float
    vocab: int


# ------------------------------------------------------------------------------------------------- the weights


def split_text(data: str) -> tuple[str, str]:
    """(the training text, the held-out text): the last HELD_OUT of data, cut at a line's start."""
    with open(data, encoding="utf-8") as f:
        text = f.read()
    cut = text.find("\n", int(len(text) * (1 - HELD_OUT))) + 1 or len(text)
    return text[:cut], text[cut:]


def byte_level_tokenizer(shape: Shape, text: str, vocab: int):
    """A byte-level BPE of vocab tokens trained on text: cllm's own (GPT-2's splitting), or for the Qwen shapes one
    built as Qwen's is (NFC, Qwen2's regex, then the bytes; ChatML's special tokens), which GGUF files name
    pre-tokenizer qwen2."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from cllm.formats.gguf_file import QWEN2_TOKENIZER_REGEX
    from cllm.tokenizer import Tokenizer

    if shape.arch not in QWEN_ARCHITECTURES:
        return Tokenizer.train("bpe", [text], vocab_size=vocab)
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_TOKENIZER_REGEX), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=QWEN_SPECIAL_TOKENS,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer("bpe", hf, separator=QWEN_SPECIAL_TOKENS[0])


def make_model(shape: Shape, kind: str, data: str, out: str, training: Training, threads: int) -> str:
    """cllm's seeded init of shape, made into the weights `kind` names (WEIGHTS), saved with a byte-level BPE
    tokenizer trained on data's training part (byte_level_tokenizer) to out (a .cllm file); runs in a process of
    its own. Returns a line saying what was done."""
    from cllm.checkpoint import save_model
    from cllm.model import GPT
    from cllm.optim import AdamW, cosine_lr
    from cllm.threads import blas_limit

    started = time.perf_counter()
    train_text, _ = split_text(data)
    tokenizer = byte_level_tokenizer(shape, train_text, training.vocab)
    model = GPT(shape.model_config(), seed=SEED, threads=threads)
    what = f"cllm's init (seed {SEED}) of {model.num_params / 1e6:.1f}M parameters"
    if kind == "random":
        rng = np.random.default_rng(SEED)
        for name, view in model.p.items():
            if name.startswith("h.") and view.ndim == 2:
                view *= RANDOM_BLOCK_SCALE
            elif name.endswith(("attn.c_attn.bias", "_norm.weight")):  # qwen2's biases, qwen3's head norms
                view += rng.normal(0.0, RANDOM_QWEN_SPREAD, view.shape).astype(np.float32)
        model.p["ln_f.weight"][...] *= RANDOM_NORM_SCALE
        save_model(out, model, tokenizer)
        qwen = {"qwen2": f", q, k and v biases N(0, {RANDOM_QWEN_SPREAD:g}^2)",
                "qwen3": f", head norms' gains N(1, {RANDOM_QWEN_SPREAD:g}^2)"}.get(shape.arch, "")
        return (f"{what}, every block matrix x{RANDOM_BLOCK_SCALE:g} and the final norm's gain "
                f"x{RANDOM_NORM_SCALE:g}{qwen}; untrained; a {tokenizer.vocab_size}-token BPE of the text")
    ids = tokenizer.encode(train_text)
    optimizer = AdamW(model, lr=training.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(SEED)
    warmup = max(1, training.steps // 10)
    losses = []
    with blas_limit(threads):
        for step in range(training.steps):
            starts = rng.integers(0, ids.size - training.seq - 1, training.batch)
            x = np.stack([ids[s:s + training.seq] for s in starts])
            y = np.stack([ids[s + 1:s + 1 + training.seq] for s in starts])
            model.zero_grad()
            losses.append(model.forward(x, y))
            model.backward()
            optimizer.step(lr=cosine_lr(step, max_lr=training.lr, min_lr=training.lr / 10, warmup=warmup,
                                        total=training.steps), max_grad_norm=1.0)
            if step % 10 == 0 or step == training.steps - 1:
                print(f"  {shape.name}: step {step + 1}/{training.steps}, loss {losses[-1]:.3f}", flush=True)
    save_model(out, model, tokenizer)
    return (f"{what}, trained {training.steps} AdamW steps of {training.batch} x {training.seq} tokens (lr "
            f"{training.lr:g}, cosine) on the first 90% of {os.path.basename(data)} with a {tokenizer.vocab_size}-token "
            f"BPE: loss {losses[0]:.2f} -> {np.mean(losses[-5:]):.2f} (mean of the last 5 steps; ln "
            f"{model.config.vocab_size} = {math.log(model.config.vocab_size):.2f}), in "
            f"{time.perf_counter() - started:.0f} s")


def export_f32(source: str, out: str) -> None:
    """cllm-convert SOURCE OUT: cllm's own GGUF export, f32."""
    export(source, out, "--gguf-type", "f32")


def export(source: str, out: str, *options: str) -> None:
    """cllm-convert SOURCE OUT OPTIONS..."""
    subprocess.run([sys.executable, "-m", "cllm.tools.convert", source, out, *options], check=True,
                   stdout=subprocess.DEVNULL)


def tokenizer_pre(path: str) -> str:
    """A GGUF file's tokenizer.ggml.pre."""
    import gguf

    return gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents()


def gguf_differences(ours: str, theirs: str) -> tuple[list[str], list[str]]:
    """Where two GGUF files differ: their tensors (names, types, shapes, bytes), and their metadata's values but for
    general.* (names, size labels) and the reader's own GGUF.* entries."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    differences = []
    tensors = {t.name: t for t in b.tensors}
    for t in a.tensors:
        other = tensors.pop(t.name, None)
        if other is None:
            differences.append(f"tensor {t.name} only in {os.path.basename(ours)}")
        elif (t.tensor_type, tuple(t.shape)) != (other.tensor_type, tuple(other.shape)):
            differences.append(f"tensor {t.name}: {t.tensor_type.name} {tuple(t.shape)} against "
                               f"{other.tensor_type.name} {tuple(other.shape)}")
        elif not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(other.data).view(np.uint8)):
            differences.append(f"tensor {t.name}: other values")
    differences += [f"tensor {name} only in {os.path.basename(theirs)}" for name in tensors]

    def metadata(reader) -> dict:
        return {key: field.contents() for key, field in reader.fields.items()
                if not key.startswith(("general.", "GGUF."))}

    mine, other = metadata(a), metadata(b)
    return differences, [f"{key}: {mine.get(key, '(none)')!r:.60} against {other.get(key, '(none)')!r:.60}"
                         for key in sorted(mine.keys() | other.keys()) if mine.get(key) != other.get(key)]


def convert_hf_to_gguf(source: str, folder: str, out: str, pre: str) -> str | None:
    """llama.cpp's own converter (SOURCE/convert_hf_to_gguf.py FOLDER --outtype f32 --outfile OUT) on a Hugging Face
    folder. The converter names a byte-level BPE's pre-tokenizer by hashing its ids of a test string, which it knows
    for published vocabularies only: if it does not know this one, it is run again told pre, the name cllm's
    exporter gives the same tokenizer. Returns a note saying so, or None."""
    script = os.path.join(source, "convert_hf_to_gguf.py")
    command = [script, folder, "--outtype", "f32", "--outfile", out]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    if "BPE pre-tokenizer was not recognized" not in done.stderr:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    told = (f"import runpy, sys\n"
            f"sys.path[:0] = [{source!r}, {os.path.join(source, 'gguf-py')!r}]\n"
            f"import conversion.base\n"
            f"conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
            f"sys.argv = {command!r}\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", told], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}, told pre-tokenizer {pre!r}, failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return (f"convert_hf_to_gguf.py does not know this vocabulary's pre-tokenizer by its hash (it knows published "
            f"ones): told {pre!r}, as cllm's exporter names it")


def quantize(tool: str, source: str, out: str, qtype: str, *, requantize: bool = False) -> None:
    command = [tool] + (["--allow-requantize"] if requantize else []) + [source, out, qtype, "2"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def prompt_ids(path: str, data: str, n: int) -> list[int]:
    """The first n ids of the held-out text, as the model's own tokenizer (cllm's) gives them."""
    from cllm.checkpoint import load_model

    _, tokenizer = load_model(path)
    _, held_out = split_text(data)
    ids = tokenizer.encode(held_out)
    if ids.size < n:
        raise ValueError(f"the held-out text has {ids.size} tokens, fewer than the prompt's {n}")
    return ids[:n].tolist()


# ------------------------------------------------------------------------------------------------- the engines
# Each runs in a fresh process and returns plain data: logits as float32 arrays, tokens as lists.


def greedy(first_logits: np.ndarray, step, n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens, and at each the margin of its logit over the runner-up's."""
    tokens, margins = [], []
    logits = first_logits
    while True:
        top2 = np.partition(logits, -2)[-2:]
        tokens.append(int(np.argmax(logits)))
        margins.append(float(top2[1] - top2[0]))
        if len(tokens) == n:
            return tokens, margins
        logits = step(tokens[-1])


def gguf_bos(path: str) -> int | None:
    """The bos token llama.cpp puts before a text of this file, or None: tokenizer.ggml.add_bos_token (by default
    true for sentencepiece vocabularies and Llama 3's, as llama.cpp's llama-vocab.cpp has it) and
    tokenizer.ggml.bos_token_id (by default 1 for sentencepiece)."""
    import gguf

    fields = gguf.GGUFReader(path).fields

    def value(key, default=None):
        return default if key not in fields else fields[key].contents()

    model, pre = value("tokenizer.ggml.model"), value("tokenizer.ggml.pre")
    if not value("tokenizer.ggml.add_bos_token", model == "llama" or pre in ("llama3", "llama-v3", "llama-bpe", "falcon3")):
        return None
    return value("tokenizer.ggml.bos_token_id", 1 if model == "llama" else None)


def run_cllm(path: str, dequantized: str, prompt: list[int], n_greedy: int, data: str, ppl_ctx: int,
             ppl_chunks: int, threads: int) -> dict:
    import gguf

    from cllm.checkpoint import load_model
    from cllm.formats.gguf_file import _ggml_tensors  # the model's tensors in the file's names and layout
    from cllm.generate import Decoder
    from cllm.threads import blas_limit

    started = time.perf_counter()
    model, tokenizer = load_model(path, threads=threads)  # as users load it: quantized matrices in their blocks
    load_s = time.perf_counter() - started
    out = {"load_s": load_s}
    # cllm's weights, widened, against llama.cpp's dequantization of the same file
    widened, _ = load_model(path, threads=threads, dequantize=True)
    reference = {t.name: t for t in gguf.GGUFReader(dequantized).tensors}
    worst, differing, missing = 0.0, [], []
    for name, tensor in _ggml_tensors(widened):
        if name not in reference:
            missing.append(name)
            continue
        theirs = np.asarray(reference[name].data, dtype=np.float32).reshape(tensor.shape)
        diff = float(np.max(np.abs(tensor - theirs)))
        if diff:
            differing.append((name, diff))
        worst = max(worst, diff)
    extra = sorted(set(reference) - {name for name, _ in _ggml_tensors(widened)})
    out.update(weights_max_diff=worst, weights_differing=differing, weights_missing=missing, weights_extra=extra)
    tokens = np.asarray(prompt, np.int32)
    with blas_limit(threads):
        out["logits"] = model.logits(tokens[None])[0].astype(np.float32)
        out["logits_widened"] = widened.logits(tokens[None])[0].astype(np.float32)
        del widened
        decoder = Decoder(model, 1, threads=threads)
        one = np.zeros(1, np.int32)

        def step(token: int) -> np.ndarray:
            one[0] = token
            return decoder.step(one)[0]

        out["greedy"], out["margins"] = greedy(decoder.prefill([tokens])[0], step, n_greedy)
        _, held_out = split_text(data)
        ids = tokenizer.encode(held_out)
        out["held_out_ids"] = ids
        out["ppl"], out["ppl_tokens"] = llama_perplexity_way(model, ids, ppl_ctx, ppl_chunks, gguf_bos(path))
    return out


def llama_perplexity_way(model, ids: np.ndarray, ctx: int, chunks: int, bos: int | None) -> tuple[float, int]:
    """Perplexity as llama.cpp's tools/perplexity computes it (see the module's notes), each chunk's first token
    replaced by bos if it is not None: (perplexity, tokens scored)."""
    if ids.size < chunks * ctx or ids.size < 2 * ctx:
        raise ValueError(f"the held-out text has {ids.size} tokens: too few for {chunks} chunks of {ctx}")
    first = ctx // 2
    nll, count = 0.0, 0
    for i in range(chunks):
        chunk = ids[i * ctx:(i + 1) * ctx].copy()
        if bos is not None:
            chunk[0] = bos
        logits = model.logits(chunk[None])[0].astype(np.float64)
        scored = logits[first:ctx - 1]
        targets = ids[i * ctx + first + 1:(i + 1) * ctx]
        peak = scored.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(scored - peak).sum(axis=1)) + peak[:, 0]
        nll += float(np.sum(log_z - scored[np.arange(targets.size), targets]))
        count += targets.size
    return math.exp(nll / count), count


def run_llama_cpp(path: str, dequantized: str, prompt: list[int], n_greedy: int, data: str, threads: int) -> dict:
    import inspect

    import llama_cpp

    n_ctx = len(prompt) + n_greedy
    options = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                   logits_all=True, verbose=False)
    accepted = inspect.signature(llama_cpp.Llama.__init__).parameters
    if "flash_attn" in accepted:
        options["flash_attn"] = False

    def open_(model_path: str, kv_type: int):
        return llama_cpp.Llama(model_path=model_path, type_k=kv_type, type_v=kv_type, **options)

    def prompt_logits(llm) -> np.ndarray:
        llm.reset()
        llm.eval(prompt)
        return np.array(llm.scores[:len(prompt)], dtype=np.float32)

    def greedy_from_prompt(llm, logits: np.ndarray) -> list[int]:
        def step(token: int) -> np.ndarray:
            llm.eval([token])
            return llm.scores[llm.n_tokens - 1]

        return greedy(logits[-1], step, n_greedy)[0]

    out = {}
    llm = open_(path, GGML_TYPE_F32)
    try:
        out["logits"] = prompt_logits(llm)
        out["greedy"] = greedy_from_prompt(llm, out["logits"])
        _, held_out = split_text(data)
        # as llama-perplexity tokenizes its text: the vocabulary's bos token if it adds one, special tokens not parsed
        out["held_out_ids"] = np.asarray(llm.tokenize(held_out.encode("utf-8"), add_bos=True, special=False))
    finally:
        llm.close()
    llm = open_(path, GGML_TYPE_F16)
    try:
        out["logits_f16_kv"] = prompt_logits(llm)
    finally:
        llm.close()
    if dequantized == path:
        out["logits_dequantized"], out["greedy_dequantized"] = out["logits"], out["greedy"]
        return out
    llm = open_(dequantized, GGML_TYPE_F32)
    try:
        out["logits_dequantized"] = prompt_logits(llm)
        out["greedy_dequantized"] = greedy_from_prompt(llm, out["logits_dequantized"])
    finally:
        llm.close()
    return out


def run_llama_perplexity(tool: str, path: str, held_out_file: str, ctx: int, chunks: int, threads: int) -> float:
    command = [tool, "-m", path, "-f", held_out_file, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
               "-t", str(threads), "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode or not found:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return float(found.group(1))


# ------------------------------------------------------------------------------------------------- one file


@dataclass
class Row:
    qtype: str
    size_mb: float
    tensor_types: str
    last: float | None = None
    all: float | None = None
    f16_kv: float | None = None
    llama_8bit: float | None = None
    vs_dequantized: float | None = None
    vs_f32: float | None = None
    weights: str = "n/a"
    greedy: str = "n/a"
    greedy_dequantized: str = "n/a"
    greedy_tokens: list | None = None  # cllm's
    margins: list | None = None  # cllm's, at each greedy token: its logit's margin over the runner-up's
    ppl_cllm: float | None = None
    ppl_llama: float | None = None
    ppl_llama_dequantized: float | None = None
    seconds: dict | None = None
    notes: list | None = None  # what a reader should know
    problems: list | None = None  # disagreements: the check fails
    logits: np.ndarray | None = None  # cllm's, of the prompt
    tokenized_same: bool | None = None  # the held-out text's ids, cllm's against llama.cpp's
    held_out_tokens: int | None = None

    @property
    def ppl_diff(self) -> float | None:
        """cllm's perplexity against llama-perplexity's on the file"""
        if self.ppl_cllm is None or self.ppl_llama is None:
            return None
        return abs(self.ppl_cllm - self.ppl_llama) / self.ppl_llama

    @property
    def ppl_diff_dequantized(self) -> float | None:
        """cllm's perplexity against llama-perplexity's on the dequantized file"""
        if self.ppl_cllm is None or self.ppl_llama_dequantized is None:
            return None
        return abs(self.ppl_cllm - self.ppl_llama_dequantized) / self.ppl_llama_dequantized

    def ok(self, kind: str) -> bool:
        """No problem, and the perplexity within PPL_TOLERANCE of the one llama.cpp's should match (PPL_AGAINST)."""
        diff = self.ppl_diff_dequantized if PPL_AGAINST.get(kind) == "dequantized" else self.ppl_diff
        return not self.problems and diff is not None and diff <= PPL_TOLERANCE


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tensor_types(path: str) -> str:
    """The file's tensor types and how many tensors of each, most first ("Q4_K 127, F32 62, ...")."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def check_file(qtype: str, path: str, dequantized: str, args, tools: dict, prompt: list[int], held_out_file: str,
               cllm_first: bool, f32_logits: np.ndarray | None, f16_yardstick: float | None) -> Row:
    row = Row(qtype, os.path.getsize(path) / 1e6, tensor_types(path), seconds={}, notes=[], problems=[])
    results = {}

    def cllm():
        started = time.perf_counter()
        results["cllm"] = in_fresh_process(run_cllm, path, dequantized, prompt, args.greedy, args.data, args.ppl_ctx,
                                           args.ppl_chunks, args.threads)
        row.seconds["cllm"] = time.perf_counter() - started

    def llama():
        started = time.perf_counter()
        results["llama"] = in_fresh_process(run_llama_cpp, path, dequantized, prompt, args.greedy, args.data,
                                            args.threads)
        row.ppl_llama = run_llama_perplexity(tools["llama-perplexity"], path, held_out_file, args.ppl_ctx,
                                             args.ppl_chunks, args.threads)
        row.ppl_llama_dequantized = row.ppl_llama if dequantized == path else run_llama_perplexity(
            tools["llama-perplexity"], dequantized, held_out_file, args.ppl_ctx, args.ppl_chunks, args.threads)
        row.seconds["llama.cpp"] = time.perf_counter() - started

    for engine in ((cllm, llama) if cllm_first else (llama, cllm)):
        try:
            engine()
        except Exception:  # noqa: BLE001 - reported, and the other engine still runs
            row.problems.append(f"{engine.__name__} failed on {os.path.basename(path)}:\n{traceback.format_exc()}")
    c, l = results.get("cllm"), results.get("llama")
    if c is not None:
        row.ppl_cllm = c["ppl"]
        row.seconds["cllm load"] = c["load_s"]
        row.weights = "exact" if c["weights_max_diff"] == 0 else f"{c['weights_max_diff']:.1e}"
        if c["weights_differing"]:
            shown = ", ".join(f"{n} {d:.1e}" for n, d in sorted(c["weights_differing"], key=lambda nd: -nd[1])[:4])
            row.problems.append(f"weights differ from llama.cpp's dequantization in {len(c['weights_differing'])} "
                             f"tensor(s): {shown}")
        if c["weights_missing"] or c["weights_extra"]:
            row.problems.append(f"tensors only cllm has: {c['weights_missing']}; only llama.cpp's F32 file has: "
                             f"{c['weights_extra']}")
    if l is not None:
        row.f16_kv = relative(l["logits_f16_kv"], l["logits"])
        if dequantized != path:
            row.llama_8bit = relative(l["logits"], l["logits_dequantized"])
    if c is not None and l is not None:
        row.last = relative(c["logits"][-1], l["logits"][-1])
        row.all = relative(c["logits"], l["logits"])
        row.vs_dequantized = relative(c["logits_widened"], l["logits_dequantized"])
        row.greedy = first_difference(c, l["greedy"], "llama.cpp", row.notes)
        # On the same weights in float arithmetic (an f32 file), only a near-tie may part the two; cllm's 8-bit
        # activations on a quantized file may part them further.
        row.greedy_dequantized = first_difference(c, l["greedy_dequantized"], "llama.cpp on the dequantized file",
                                                  row.notes, row.problems if dequantized == path else None)
        # llama.cpp's own f16 rounding of activations (its f16 KV cache on the f32 file) is the yardstick.
        limit = max(VS_DEQUANTIZED_TOLERANCE, f16_yardstick if f16_yardstick is not None else row.f16_kv)
        if row.vs_dequantized > limit:
            row.problems.append(f"cllm's logits differ from llama.cpp's on the same (dequantized) weights by "
                                f"{row.vs_dequantized:.1e}, more than float arithmetic explains ({limit:.1e})")
        row.greedy_tokens, row.margins = c["greedy"], c["margins"]
        same_ids = (c["held_out_ids"].size == l["held_out_ids"].size
                    and np.array_equal(c["held_out_ids"], l["held_out_ids"]))
        if not same_ids:
            n = min(c["held_out_ids"].size, l["held_out_ids"].size)
            at = next((i for i in range(n) if c["held_out_ids"][i] != l["held_out_ids"][i]), n)
            row.problems.append(f"the held-out text's ids differ: cllm {c['held_out_ids'].size} ids, llama.cpp "
                             f"{l['held_out_ids'].size}; first at {at}: cllm {c['held_out_ids'][at:at + 5].tolist()}, "
                             f"llama.cpp {l['held_out_ids'][at:at + 5].tolist()}")
        row.tokenized_same = same_ids
        row.held_out_tokens = int(c["held_out_ids"].size)
    if c is not None:
        row.logits = c["logits"]
        if f32_logits is not None and dequantized != path:
            row.vs_f32 = relative(c["logits"], f32_logits)
    return row


def first_difference(c: dict, theirs: list[int], whose: str, notes: list, problems: list | None = None) -> str:
    """Where cllm's greedy tokens first differ from theirs ("=" if nowhere), with a note of cllm's margin there: a
    problem (if problems is given) unless that margin is a near-tie's (NEAR_TIE)."""
    at = next((i for i, (a, b) in enumerate(zip(c["greedy"], theirs)) if a != b), None)
    if at is None:
        return "="
    margin = c["margins"][at]
    line = (f"greedy tokens part from {whose}'s at token {at}, where cllm's top two logits are {margin:.2g} apart "
            f"(its median margin: {np.median(c['margins']):.2g})")
    (problems if problems is not None and margin > NEAR_TIE else notes).append(line)
    return str(at)


def table(rows: list[Row], kind: str) -> str:
    lines = ["| type | MB | tensors | logits last | logits all | llama f16 KV | llama 8-bit | vs dequant | vs f32 "
             "| weights | greedy | greedy vs dequant | ppl cllm | ppl llama.cpp | diff | ppl llama.cpp dequant | diff |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def percent(diff: float | None, judged: bool) -> str:
        if diff is None:
            return "n/a"
        return f"{100 * diff:.3f}%" + ((" ok" if diff <= PPL_TOLERANCE else " OVER") if judged else "")

    judged = PPL_AGAINST.get(kind, "file")
    for r in rows:
        lines.append(f"| {r.qtype} | {r.size_mb:,.0f} | {r.tensor_types} | {fmt(r.last, '.1e')} | {fmt(r.all, '.1e')} "
                     f"| {fmt(r.f16_kv, '.1e')} | {fmt(r.llama_8bit, '.1e')} | {fmt(r.vs_dequantized, '.1e')} "
                     f"| {fmt(r.vs_f32, '.1e')} | {r.weights} | {r.greedy} | {r.greedy_dequantized} "
                     f"| {fmt(r.ppl_cllm, '.3f')} | {fmt(r.ppl_llama, '.3f')} | {percent(r.ppl_diff, judged == 'file')} "
                     f"| {fmt(r.ppl_llama_dequantized, '.3f')} "
                     f"| {percent(r.ppl_diff_dequantized, judged == 'dequantized')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- one model


def check_model(shape: Shape, kind: str, args, tools: dict, work: str) -> tuple[str, list[Row]]:
    """Makes (or takes) the weights, writes the files, checks each; returns what the weights are, and the rows."""
    stem = os.path.join(work, f"{shape.name}-{kind}")
    print(f"\n== {shape.name}, {kind} weights", flush=True)
    f32 = f"{stem}-f32.gguf"
    given = args.model.get(shape.name)
    source = None  # a model to export to a Hugging Face folder (not a given GGUF file)
    if given and given.endswith(".gguf"):
        f32, what = given, f"{given} (given; quantized as it is)"
    else:
        source = given or f"{stem}.cllm"
        if given:
            what = f"{given} (given)"
        elif os.path.exists(source):
            what = f"{source} (made by an earlier run, reused)"
        else:
            training = Training(args.steps, args.batch, args.seq, args.lr, args.vocab)
            what = in_fresh_process(make_model, shape, kind, args.data, source, training, args.threads)
        if not os.path.exists(f32):
            export_f32(source, f32)
    print(f"weights: {what}", flush=True)
    files = {"f32": f32}
    for qtype in args.types:
        files[qtype] = f"{stem}-{qtype}.gguf"
        if not os.path.exists(files[qtype]):
            started = time.perf_counter()
            quantize(tools["llama-quantize"], f32, files[qtype], QUANT_TYPES[qtype])
            print(f"llama-quantize {QUANT_TYPES[qtype]}: {time.perf_counter() - started:.0f} s", flush=True)
    for qtype in args.cllm_types:
        files[f"{qtype} by cllm"] = path = f"{stem}-{qtype}-cllm.gguf"
        if not os.path.exists(path):
            started = time.perf_counter()
            export(f32, path, "--quantize", qtype)
            print(f"cllm-convert --quantize {qtype}: {time.perf_counter() - started:.0f} s", flush=True)
    converted = f"{stem}-f32-converter.gguf"
    if args.hf_converter and source is not None:
        files[CONVERTED] = converted
        if not os.path.exists(converted):
            folder = f"{stem}-hf"
            export(source, folder)
            note = convert_hf_to_gguf(args.llama_cpp_src or llama_cpp_source(), folder, converted,
                                      in_fresh_process(tokenizer_pre, f32))
            print(f"{CONVERTED}: {folder} converted" + (f"; note: {note}" if note else ""), flush=True)
    prompt = in_fresh_process(prompt_ids, f32, args.data, args.prompt)
    held_out_file = os.path.join(work, "held_out.txt")
    with open(held_out_file, "w", encoding="utf-8") as f:
        f.write(split_text(args.data)[1])
    rows = []
    for i, (qtype, path) in enumerate(files.items()):
        dequantized = path
        if not qtype.startswith("f32"):
            dequantized = f"{stem}-{qtype}-dequantized-f32.gguf"
            if not os.path.exists(dequantized):
                quantize(tools["llama-quantize"], path, dequantized, "F32", requantize=True)
        row = check_file(qtype, path, dequantized, args, tools, prompt, held_out_file, cllm_first=i % 2 == 0,
                         f32_logits=rows[0].logits if rows else None,
                         f16_yardstick=rows[0].f16_kv if rows else None)
        if qtype == CONVERTED:  # the converter's file is to be cllm's f32 export, tensor for tensor
            tensors, metadata = in_fresh_process(gguf_differences, f32, path)
            row.problems += tensors
            row.notes += [f"metadata of cllm's f32 export against the converter's: {line}" for line in metadata]
        seconds = ", ".join(f"{k} {v:.0f} s" for k, v in row.seconds.items())
        print(f"{shape.name} {kind} {qtype}: done ({seconds})", flush=True)
        for line in row.notes:
            print(f"  note: {line}")
        for line in row.problems:
            print(f"  PROBLEM: {line}")
        rows.append(row)
    return what, rows


def describe(rows: list[Row]) -> str:
    """What the f32 file's logits and greedy tokens look like in cllm: how peaked, how varied."""
    first = rows[0]
    if first.logits is None:
        return ""
    top2 = np.sort(first.logits, axis=1)[:, -2:]
    line = (f"cllm on the f32 file: the prompt's logits have a standard deviation of {first.logits.std():.2f} and "
            f"a median top-1 margin of {np.median(top2[:, 1] - top2[:, 0]):.2f}; its {len(first.greedy_tokens)} "
            f"greedy tokens hold {len(set(first.greedy_tokens))} distinct ids, with a median margin of "
            f"{np.median(first.margins):.2f}")
    if first.tokenized_same is not None:
        line += (f"; the held-out text is {first.held_out_tokens:,} tokens, which cllm and llama.cpp give "
                 f"{'the same ids' if first.tokenized_same else 'DIFFERENT ids'}")
    return line


# ------------------------------------------------------------------------------------------------- tokenizers


def read_tests(stem: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 cases: inputs separated by a marker line, one line of ids per input. As its
    std::map keeps them, a repeated input counts once."""
    with open(stem + ".inp", encoding="utf-8", newline="") as f:
        inputs = f.read().split("\n__ggml_vocab_test__\n")
    with open(stem + ".out", encoding="utf-8") as f:
        outputs = f.read().split("\n")
    if inputs and inputs[-1].endswith("\n__ggml_vocab_test__"):  # the marker after the last input
        inputs[-1] = inputs[-1][:-len("\n__ggml_vocab_test__")]
    outputs = outputs[:len(inputs)]
    tests = {}
    for text, ids in zip(inputs, outputs):
        tests[text] = [int(t) for t in ids.split()]
    return list(tests.items())


def more_inputs(source: str, n: int = 150) -> list[str]:
    """More text to tokenize: the first n paragraphs of the source's README.md (prose, code, URLs, numbers,
    tables, as a user's prompts have them)."""
    try:
        with open(os.path.join(source, "README.md"), encoding="utf-8") as f:
            paragraphs = [p for p in f.read().split("\n\n") if p.strip()]
    except OSError:
        return []
    return paragraphs[:n]


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 sent to /dev/null meanwhile: what C code writes there too."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_vocabularies(paths: list[str]) -> list[dict]:
    """For each ggml-vocab file: its kind, cllm's refusal or its ids on the file's tests, and the binding's ids on
    them; then, for the vocabularies cllm reads, every test input of every file (llama.cpp's ids from the binding, as
    the .out files hold them where there are some). Runs in a process of its own."""
    every_input = list(dict.fromkeys(text for path in paths if os.path.exists(path + ".inp")
                                     for text, _ in read_tests(path)))
    every_input += more_inputs(os.path.dirname(os.path.dirname(paths[0])))
    return [check_vocabulary(path, every_input) for path in paths]


def check_vocabulary(path: str, every_input: list[str]) -> dict:
    import gguf
    import llama_cpp

    from cllm.formats.gguf_tokenizer import read_gguf_tokenizer

    reader = gguf.GGUFReader(path)
    model, pre = (None if (f := reader.fields.get(key)) is None else f.contents()
                  for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"))
    tests = read_tests(path) if os.path.exists(path + ".inp") else []
    r = {"path": path, "model": model, "pre": pre, "tests": len(tests),
         "read": model == "llama" or (model == "gpt2" and (pre or "default") in READ_PRE_TOKENIZERS)}
    try:
        tokenizer = read_gguf_tokenizer(reader, path)
    except Exception as e:  # noqa: BLE001 - a refusal is a result here
        r["refused"] = f"{type(e).__name__}: {str(e).replace(path + ': ', '')}"
        return r

    def cllm_ids(text: str) -> list[int]:  # as test-tokenizer-0: no special tokens added, none parsed
        return [p.id for p in tokenizer.pieces(text, add_special_tokens=False)]

    r["failures"] = [(text, expected, got) for text, expected in tests if (got := cllm_ids(text)) != expected]
    r["passed"] = len(tests) - len(r["failures"])
    try:
        with quiet_stderr():  # llama.cpp warns that a vocabulary-only file has no training context
            llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    except Exception as e:  # noqa: BLE001
        r["llama_error"] = f"{type(e).__name__}: {e}"
        return r
    try:
        def llama_ids(text: str) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

        r["llama_passed"] = sum(llama_ids(text) == expected for text, expected in tests)
        oracle = [(text, llama_ids(text), cllm_ids(text)) for text in every_input]
        r["oracle_failures"] = [(t, e, g) for t, e, g in oracle if e != g]
        r["oracle_passed"] = len(oracle) - len(r["oracle_failures"])
        r["oracle_tests"] = len(oracle)
    finally:
        llm.close()
    return r


def check_tokenizers(source: str) -> bool:
    print(f"\n== tokenizers: llama.cpp's models/ggml-vocab-*.gguf and their .inp/.out tests ({source})")
    paths = sorted(glob.glob(os.path.join(source, "models", "ggml-vocab-*.gguf")))
    if not paths:
        print("the source has no models/ggml-vocab-*.gguf files")
        return False
    ok = True
    lines = ["| vocabulary | model / pre | .out tests | cllm passes | llama.cpp passes | every input: cllm = llama.cpp "
             "| |", "|---|---|---:|---:|---:|---:|---|"]
    details = []
    for r in in_fresh_process(check_vocabularies, paths):
        name = os.path.basename(r["path"])[len("ggml-vocab-"):-len(".gguf")]
        kind = f"{r['model']} / {r['pre'] or '(none: default)'}"
        if "refused" in r:
            verdict = "not read, as expected" if not r["read"] else "REFUSED, though cllm reads this kind"
            ok &= not r["read"]
            lines.append(f"| {name} | {kind} | {r['tests'] or ''} | | | | {verdict}: {r['refused']} |")
            continue
        oracle = f"{r['oracle_passed']} / {r['oracle_tests']}" if "oracle_tests" in r else "n/a"
        if r["tests"]:
            verdict = "pass" if r["passed"] == r["tests"] else "FAIL"
        else:
            verdict = "no .out tests"
        if "oracle_tests" in r and r["oracle_passed"] != r["oracle_tests"]:
            verdict += "; differs from the binding"
        if not r["read"]:
            verdict += " (read, though not a kind cllm lists)"
        ok &= r["passed"] == r["tests"] and r.get("oracle_passed") == r.get("oracle_tests")
        lines.append(f"| {name} | {kind} | {r['tests'] or ''} | {r['passed'] if r['tests'] else ''} "
                     f"| {r.get('llama_passed', 'n/a') if r['tests'] else ''} | {oracle} | {verdict} |")
        for text, expected, got in (r["failures"] + r.get("oracle_failures", []))[:5]:
            details.append(f"  {name}: {text!r}: llama.cpp {expected}, cllm {got}")
        if r.get("llama_error"):
            details.append(f"  {name}: the binding could not load it: {r['llama_error']}")
    print("\n".join(lines))
    if details:
        print("differences (at most 5 per vocabulary):")
        print("\n".join(details))
    return ok


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/check_gguf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,smollm2",
                   help=f"comma-separated subset of {','.join(SHAPES)} (default: %(default)s)")
    p.add_argument("--types", default=",".join(QUANT_TYPES),
                   help="llama-quantize types, a comma-separated subset of the default; f32 is always checked "
                        "(default: %(default)s)")
    p.add_argument("--cllm-types", default="q8_0,q4_k_m",
                   help=f"the file types cllm's own exporter also writes from the f32 file (cllm-convert --quantize), "
                        f"a comma-separated subset of {','.join(CLLM_TYPES)}, or none (default: %(default)s)")
    p.add_argument("--hf-converter", action="store_true",
                   help="also export each model as a Hugging Face folder (cllm-convert) and check the f32 file "
                        "llama.cpp's convert_hf_to_gguf.py makes of it: the same tensors and metadata as cllm's f32 "
                        "export, and a row of its own")
    p.add_argument("--weights", default=",".join(WEIGHTS),
                   help="the weight sets made for each model, a comma-separated subset of the default (default: "
                        "%(default)s)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="check these weights for model NAME instead of making any (a .cllm file, a Hugging Face "
                        "folder, or an f32/f16 .gguf file); repeatable")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="the text: its first 90%% trains, its last 10%% is held out (default: %(default)s)")
    p.add_argument("--work", help="folder for the models and files, kept, and reused by the next run (default: a "
                                  "temporary folder, deleted)")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: %(default)s)")
    p.add_argument("--greedy", type=int, default=128, help="greedy tokens compared (default: %(default)s)")
    p.add_argument("--ppl-ctx", type=int, default=256, help="perplexity: tokens per chunk (default: %(default)s)")
    p.add_argument("--ppl-chunks", type=int, default=16, help="perplexity: chunks scored (default: %(default)s)")
    training = p.add_argument_group("the training of the trained weights")
    training.add_argument("--steps", type=int, default=30, help="AdamW steps (default: %(default)s)")
    training.add_argument("--batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    training.add_argument("--seq", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    training.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    training.add_argument("--vocab", type=int, default=4096,
                          help="the BPE tokenizer's size, for both weight sets (default: %(default)s)")
    p.add_argument("--llama-cpp-bin", help="the folder of llama.cpp's llama-quantize and llama-perplexity (default: "
                                           "$LLAMA_CPP_BIN, PATH, or built from PyPI's source package into "
                                           f"{LLAMA_CPP_HOME}, or $CLLM_PEERS_DIR)")
    p.add_argument("--llama-cpp-src", help="llama.cpp's source folder, for its models/ggml-vocab-* tests (default: "
                                           "unpacked from llama-cpp-python's source package on PyPI)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-tokenizers", action="store_true", help="skip the tokenizer check")
    which.add_argument("--tokenizers-only", action="store_true", help="only the tokenizer check")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or any(n not in SHAPES for n in names):
        p.error(f"--models: choose from {','.join(SHAPES)}")
    args.shapes = [SHAPES[n] for n in names]
    args.weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not args.weights or any(w not in WEIGHTS for w in args.weights):
        p.error(f"--weights: choose from {','.join(WEIGHTS)}")
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if any(t not in QUANT_TYPES for t in args.types):
        p.error(f"--types: choose from {','.join(QUANT_TYPES)}")
    args.cllm_types = [t.strip().lower() for t in args.cllm_types.split(",") if t.strip() not in ("", "none")]
    if any(t not in CLLM_TYPES for t in args.cllm_types):
        p.error(f"--cllm-types: choose from {','.join(CLLM_TYPES)}, or none")
    given = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or name not in SHAPES or not os.path.exists(path):
            p.error(f"--model {spec!r}: give NAME=PATH with NAME one of {','.join(SHAPES)} and an existing PATH")
        given[name] = path
    args.model = given
    for flag in ("threads", "prompt", "greedy", "ppl_ctx", "ppl_chunks", "steps", "batch", "seq", "vocab"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.ppl_ctx < 4:
        p.error("--ppl-ctx must be at least 4")
    if not args.tokenizers_only and not os.path.exists(args.data):
        p.error(f"--data {args.data} does not exist")
    return args


def versions(tools: dict) -> str:
    """llama-cpp-python's version, the llama.cpp commit it vendors (its changelog says, in the source package
    bench_common downloads), and the version llama.cpp's tools report."""
    import tarfile

    binding = llama_cpp_python_version()
    built = "unknown"
    if tools:
        done = subprocess.run([tools["llama-perplexity"], "--version"], capture_output=True, text=True)
        found = re.search(r"version: (.*)", done.stdout + done.stderr)
        if found:
            built = found.group(1).strip()
    commit = None
    archive = os.path.join(LLAMA_CPP_HOME, f"llama.cpp-{binding}", f"llama_cpp_python-{binding}.tar.gz")
    try:
        with tarfile.open(archive) as tar:
            changelog = tar.extractfile(f"llama_cpp_python-{binding}/CHANGELOG.md").read().decode("utf-8")
        section = changelog.split(f"## [{binding}]", 1)[1].split("\n## ", 1)[0]
        commit = re.search(r"llama\.cpp@([0-9a-f]+)", section).group(1)
    except (OSError, KeyError, IndexError, AttributeError, tarfile.TarError):
        pass
    vendored = f" (vendoring llama.cpp@{commit})" if commit else ""
    tools_say = f"; llama.cpp's tools report version {built}" if tools else ""
    return f"llama-cpp-python {binding or 'not installed'}{vendored}{tools_say}"


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    print(f"CPU: {cpu_description()}; {os.cpu_count()} logical CPUs; threads {args.threads}")
    if llama_cpp_python_version() is None:
        print("llama-cpp-python is not installed: install it as the module's notes say (python tools/check_gguf.py "
              "--help)")
        return 1
    tools = {}
    if not args.tokenizers_only:
        tools = llama_cpp_tools(LLAMA_TOOLS, bin_dir=args.llama_cpp_bin, threads=args.threads)
        print("llama.cpp tools: " + ", ".join(tools.values()))
    print(versions(tools))
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)
    start = machine_snapshot()
    ok = True
    if not args.no_tokenizers:
        ok &= check_tokenizers(args.llama_cpp_src or llama_cpp_source())
    if not args.tokenizers_only:
        work = args.work or tempfile.mkdtemp(prefix="cllm-check-gguf-")
        os.makedirs(work, exist_ok=True)
        try:
            tables = []
            for shape in args.shapes:
                for kind in (["given"] if shape.name in args.model else args.weights):
                    what, rows = check_model(shape, kind, args, tools, work)
                    ok &= all(r.ok(kind) for r in rows)
                    tables.append((shape, kind, what, rows))
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
        during = foreign_load(since=start)
        if during is not None:
            print(f"\nother processes busy on {during:.2f} CPUs on average during the run{busy_note(during)}")
        for shape, kind, what, rows in tables:
            print(f"\n{shape.name} ({shape.arch}, {shape.n_layers} layers, width {shape.dim}, {shape.vocab:,} rows), "
                  f"{kind} weights: {what}.\n{describe(rows)}.\nPrompt {args.prompt} tokens, {args.greedy} greedy, "
                  f"perplexity over {args.ppl_chunks} x {args.ppl_ctx} tokens.\n")
            print(table(rows, kind))
    print(f"\n{'everything agrees' if ok else 'SOMETHING DISAGREES: see the notes above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

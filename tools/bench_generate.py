"""Single-stream decoding benchmark: cllm's Decoder against peers on the same weights, each run as users run it,
for each weight type (float32 and GGUF's quantized types).

Engines (--engines, a comma-separated subset):

    cllm              cllm.generate.Decoder on cllm.checkpoint.load_model of the GGUF file of each type, as
                      `cllm-generate model.gguf` runs it (baby and mid: cllm's own float32 model, built in memory)
    llama.cpp         llama-cpp-python on the same GGUF file of each type
    transformers      transformers' GPT2LMHeadModel or LlamaForCausalLM from the Hugging Face folder, float32 (the
                      reference row, on the f32 type only), its KV cache
    torch             the PyTorch peer's KV-cache path (tools/torch_gpt.py; baby and mid)
    llama.cpp-TYPE    llama.cpp on that type's file only (llama.cpp-f32, llama.cpp-q8_0, ...: the names of earlier
                      versions of this script)

Types (--types, a comma-separated subset of f32,q8_0,q4_0,q4_k_m,q5_k_m,q6_k; by default f32,q8_0,q4_0,q4_k_m) are a
dimension of the exported configs (gpt2, smollm2, qwen2.5, qwen3): every (engine, type) pair is benchmarked. Every engine holds the
same weights, cllm's seeded random init. On gpt2 (GPT-2 small's shape: 124M parameters, a 50,257-token vocabulary)
and smollm2 they are written once per run, in a process of their own, as a GGUF f32 file (cllm.formats.gguf_file.
save_gguf) and, for transformers, a Hugging Face folder (cllm.formats.hf.save_hf), with a small byte-level BPE
tokenizer trained on generated text (the model's vocabulary is larger than the tokenizer's; the files carry that).
Each quantized type's file is then made from the f32 file by llama.cpp's own `llama-quantize` (found, or built from
PyPI's source package: tools/bench_common.llama_cpp_tools; --llama-cpp-bin names its folder), once per run, and
both cllm and llama.cpp load that same file. A K-quant mix (Q4_K_M) types some tensors otherwise (Q6_K, and where a
row is not whole 256-value super-blocks, as smollm2's width 576, Q5_0 or Q8_0), as llama-quantize decides. On baby
and mid, types do not apply: cllm builds its float32 weights and hands them to the torch peer as an .npz.

Every engine gets the same random prompt (token ids below the tokenizer's size on the exported configs, so every
engine accepts them). One run is

    prefill   one pass over the prompt, filling the KV cache                 -> prompt tokens / s
    decode    greedy (argmax on the host), one token per step                 -> steps / s

baby and mid prompt half the context and decode to its end; the exported configs prompt 128 tokens and decode 128
steps.
Batch 1, the same thread count for every engine. After one untimed warm-up run, --repeats runs are timed, in each
of --rounds rounds that alternate the engines and types (so all sample the same drift of a shared machine's speed;
every other round runs them in the reverse order); the table shows the medians of the pooled runs. Also per pair:

    load      seconds from the loading call to a model that can decode (cllm: load_model and its Decoder;
              llama.cpp: Llama(), which makes its context; transformers: from_pretrained), imports excluded, the
              file in the page cache (every engine reads files written moments before); the median over the rounds
    peak RSS  the process's peak resident set (interpreter and libraries included): the peak of loading and
              generating, read after the timed runs

and the ratio cllm/engine of each figure on the same type (for load and RSS, below 1 is cllm's advantage).

The limit: decoding one stream is bound by reading the weights, so the table prints, per type, the bytes of
weights a decode token reads (every tensor's bytes as stored in the file, but of the position table, gpt2's, one
row, and of the token embedding one row unless it is also the output head; the KV cache and activations are not
counted) and the machine's read bandwidth (bench_common.read_bandwidth: --threads threads streaming a buffer of
hundreds of MB, best of several passes, measured before and after the runs, the higher kept), and their quotient: the decode rate no engine can pass; "% of limit" is
each engine's decode rate against it. On baby and mid the bytes are cllm's float32 parameters, counted the same way.

Before the table, checks: each engine's last decode logits against its own full forward pass (no cache) over the
same tokens (llama.cpp's "full pass" is a fresh evaluation of the whole sequence), each peer's logits after the
prefill against cllm's on the same type, and its greedy tokens against cllm's (on float32 weights, the first 10
should agree; later ones may part on near-ties, which float rounding can flip). llama.cpp's f32 GELU rounds its
input to float16 and reads a table, so its logits agree with the float32 engines' to about 1e-3, not 1e-6. On
quantized types llama.cpp's products also round the activations to 8 bits (cllm's need not), differently in a
batch and in one row: there the agreement is printed (a warning only past 10% of the logits' norm, which a wrong
block or kernel makes ~100%), and tokens that part are a note, not an error.

Each (engine, type, config) runs in its own fresh spawned process, one at a time, never two engines in one
process: see tools/bench_train.py for why (cllm's OpenMP settings and torch's libgomp share a soname). A process per run
also makes its peak RSS and load time its own. The parent imports no engine; every peer is optional (one that is
not installed or not importable is skipped with a line saying so).

    python tools/bench_generate.py                    # baby + mid, cllm and torch, 2 threads (a few minutes)
    python tools/bench_generate.py --configs mid --threads 1 --repeats 20
    python tools/bench_generate.py --no-torch
    python tools/bench_generate.py --configs gpt2 --rounds 2 --repeats 2        # cllm, llama.cpp, transformers
    python tools/bench_generate.py --configs gpt2,smollm2 --types q8_0,q4_k_m --engines cllm,llama.cpp
    python tools/bench_generate.py --configs gpt2 --engines cllm,transformers,llama.cpp-f32,llama.cpp-q8_0

The exported configs are not in the default --configs: with three engines on four types, gpt2 and smollm2 each take
about ten minutes on 2 cores at --rounds 2 --repeats 2, qwen2.5 and qwen3 (0.5 and 0.6 billion parameters) longer.
smollm2 is the llama architecture at SmolLM2-135M's shape (grouped-query attention, SwiGLU, RoPE); qwen2.5 is
qwen2 at Qwen2.5-0.5B's (q, k, v biases) and qwen3 qwen3 at Qwen3-0.6B's (head norms, heads of 128 on a width of
1024). With llama.cpp-TYPE names and no --types, cllm runs on f32 and those types.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from bench_common import (available_llama_cpp_tools, busy_note, choose_configs, finish_report, fmt, foreign_load,
                          higher_peak, in_fresh_process, machine_snapshot, measure_machine, peak_rss_mb,
                          use_this_checkout)
from check_gguf import QUANT_TYPES, quantize, tensor_types

SEED = 1337
COMPARED_TOKENS = 10  # greedy tokens that must agree; later ones may differ on near-ties
CACHE_TOLERANCE = 1e-4  # cached vs full-pass logits; float32 rounding gives ~1e-6 at these logit scales
# llama.cpp's f32 GELU rounds its input to float16 and reads a table: its logits are good to ~1e-3 (both ways).
LLAMA_CPP_TOLERANCE = 1e-2
# cllm on quantized weights: a batch and a row may take different kernels (and round activations differently); a
# cache that is wrong moves logits by whole units.
QUANTIZED_CACHE_TOLERANCE = 1e-1
# cllm's prefill logits against llama.cpp's on the same quantized file, ||difference|| / ||llama.cpp's||: llama.cpp's
# 8-bit activations account for a few percent at most; a wrong block or kernel makes it ~1.
QUANTIZED_LOGITS_TOLERANCE = 1e-1
TOKENIZER_VOCAB = 512  # the exported configs' BPE tokenizer (256 bytes, <|endoftext|>, merges)
BPE = "bpe"
F32 = "f32"
DEFAULT_TYPES = (F32, "q8_0", "q4_0", "q4_k_m")
TYPES = (F32, *QUANT_TYPES)


@dataclass(frozen=True)
class GenConfig:
    name: str
    n_layers: int
    n_heads: int
    dim: int
    context: int
    vocab: int
    prompt_len: int = 0  # 0: half the context
    # Decode steps after the prefill; 0: to the end of the context. The prefill's logits give the first new
    # token; each step feeds one token and gives the next, so the token that fills the context is never fed.
    decode_steps: int = 0
    # Weights exported as GGUF files (and a Hugging Face folder), which every engine loads; else built by cllm.
    exported: bool = False
    default_engines: tuple[str, ...] = ("cllm", "torch")
    # The architecture, and the llama family's own settings (see cllm.model.ModelConfig)
    arch: str = "gpt2"
    n_kv_heads: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    head_dim: int | None = None

    def __post_init__(self):
        if not self.prompt_len:
            object.__setattr__(self, "prompt_len", self.context // 2)
        if not self.decode_steps:
            object.__setattr__(self, "decode_steps", self.context - self.prompt_len - 1)
        if self.prompt_len + self.decode_steps > self.context:
            raise ValueError(f"{self.name}: prompt {self.prompt_len} + decode {self.decode_steps} > context")

    @property
    def shape(self) -> str:
        kv = f"/{self.n_kv_heads}" if self.n_kv_heads else ""
        heads = f"x{self.head_dim}" if self.head_dim else ""
        return f"{self.arch} L{self.n_layers} H{self.n_heads}{kv}{heads} C{self.dim} T{self.context} V{self.vocab}"

    def model_config(self):
        """The cllm ModelConfig of these weights (imported here: the parent process imports no engine)."""
        from cllm.model import ModelConfig

        llama = dict(n_kv_heads=self.n_kv_heads, intermediate_size=self.intermediate_size,
                     rope_theta=self.rope_theta, head_dim=self.head_dim) if self.arch != "gpt2" else {}
        return ModelConfig(vocab_size=self.vocab, context_length=self.context, dim=self.dim, n_layers=self.n_layers,
                           n_heads=self.n_heads, arch=self.arch, **llama)


EXPORTED_ENGINES = ("cllm", "llama.cpp", "transformers")
CONFIGS = {
    "baby": GenConfig("baby", n_layers=4, n_heads=4, dim=128, context=64, vocab=65),
    "mid": GenConfig("mid", n_layers=6, n_heads=6, dim=384, context=256, vocab=65),
    "gpt2": GenConfig("gpt2", n_layers=12, n_heads=12, dim=768, context=1024, vocab=50257, prompt_len=128,
                      decode_steps=128, exported=True, default_engines=EXPORTED_ENGINES),
    # SmolLM2-135M's shape: 30 layers, 9 heads over 3 kv heads, SwiGLU 1536, a 49,152-token vocabulary, tied.
    "smollm2": GenConfig("smollm2", n_layers=30, n_heads=9, dim=576, context=2048, vocab=49152, prompt_len=128,
                         decode_steps=128, exported=True, arch="llama", n_kv_heads=3, intermediate_size=1536,
                         rope_theta=100000.0, default_engines=EXPORTED_ENGINES),
    # Qwen2.5-0.5B's shape: 24 layers, 14 heads over 2 kv heads, q/k/v biases, SwiGLU 4864, 151,936 tokens, tied.
    "qwen2.5": GenConfig("qwen2.5", n_layers=24, n_heads=14, dim=896, context=4096, vocab=151936, prompt_len=128,
                         decode_steps=128, exported=True, arch="qwen2", n_kv_heads=2, intermediate_size=4864,
                         rope_theta=1e6, default_engines=EXPORTED_ENGINES),
    # Qwen3-0.6B's: 28 layers, 16 heads of 128 (2048 query channels on a width of 1024) over 8 kv heads, head norms.
    "qwen3": GenConfig("qwen3", n_layers=28, n_heads=16, dim=1024, context=4096, vocab=151936, prompt_len=128,
                       decode_steps=128, exported=True, arch="qwen3", n_kv_heads=8, intermediate_size=3072,
                       rope_theta=1e6, head_dim=128, default_engines=EXPORTED_ENGINES),
}


@dataclass(frozen=True)
class Engine:
    module: str  # what must be installed (found, not imported, by the parent)
    needs_export: bool = False  # loads the exported files, so it runs on exported configs only
    reads_gguf: bool = False  # runs on each type's GGUF file (on exported configs); else on float32 weights only


ENGINES = {
    "cllm": Engine("cllm", reads_gguf=True),
    "llama.cpp": Engine("llama_cpp", needs_export=True, reads_gguf=True),
    "transformers": Engine("transformers", needs_export=True),
    "torch": Engine("torch"),
}
PINNED = "llama.cpp-"  # llama.cpp-TYPE: llama.cpp on that type only


@dataclass(frozen=True)
class Unit:
    """What one benchmark process runs: an engine on the weights of one type."""
    engine: str
    gguf_type: str = F32

    @property
    def quantized(self) -> bool:
        return self.gguf_type != F32

    @property
    def cache_tolerance(self) -> float | None:
        """Cached against full-pass logits; None: printed, not checked."""
        if self.quantized:
            return QUANTIZED_CACHE_TOLERANCE if self.engine == "cllm" else None
        return LLAMA_CPP_TOLERANCE if self.engine == "llama.cpp" else CACHE_TOLERANCE


@dataclass
class WeightFiles:
    """Where an engine finds its weights."""
    npz: str | None = None  # baby, mid: cllm writes its init here, the torch peer reads it
    hf_folder: str | None = None  # exported configs, for transformers
    gguf: dict[str, str] = field(default_factory=dict)  # GGUF type -> file, exported configs


# ------------------------------------------------------------------------------------------ exported weights


def generated_texts(rng: np.random.Generator, documents: int = 64, words: int = 300) -> list[str]:
    """Text for training a small BPE tokenizer: made-up words drawn with a Zipf-like skew, so there is
    something to merge."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(1, 9), p=_letter_odds(letters.size)))
               for _ in range(2000)]
    odds = 1.0 / np.arange(1, len(lexicon) + 1)
    odds /= odds.sum()
    return [" ".join(rng.choice(lexicon, size=words, p=odds)) + "." for _ in range(documents)]


def _letter_odds(n: int) -> np.ndarray:
    odds = 1.0 / np.arange(1, n + 1) ** 0.7
    return odds / odds.sum()


def export_weights(cfg: GenConfig, folder: str, hf_folder: bool) -> tuple[WeightFiles, int, str]:
    """Writes cllm's seeded init of cfg as an f32 GGUF file and, if hf_folder, a Hugging Face folder; runs in its
    own process.

    Returns the files, the tokenizer's size (prompts stay below it) and a line describing what was written.
    """
    from cllm.formats.gguf_file import save_gguf
    from cllm.formats.hf import save_hf
    from cllm.model import GPT
    from cllm.tokenizer import Tokenizer

    started = time.perf_counter()
    tokenizer = Tokenizer.train(BPE, generated_texts(np.random.default_rng(SEED)), vocab_size=TOKENIZER_VOCAB)
    model = GPT(cfg.model_config(), seed=SEED)
    files, written = WeightFiles(), []
    if hf_folder:
        files.hf_folder = os.path.join(folder, f"{cfg.name}-hf")
        written.append(f"Hugging Face folder "
                       f"{_mb(sum(p.stat().st_size for p in save_hf(files.hf_folder, model, tokenizer)))}")
    path = save_gguf(os.path.join(folder, f"{cfg.name}-{F32}.gguf"), model, tokenizer, tensor_type=F32)
    files.gguf[F32] = str(path)
    written.append(f"GGUF {F32} {_mb(path.stat().st_size)}")
    note = (f"  {cfg.name}: {model.num_params / 1e6:.2f}M parameters (seed {SEED}), tokenizer of "
            f"{tokenizer.vocab_size} tokens; wrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")
    return files, tokenizer.vocab_size, note


def quantized_files(cfg: GenConfig, files: WeightFiles, types: list[str], tool: str | None) -> list[str]:
    """Makes each quantized type's file from the f32 one with llama-quantize (tool); returns the types that have a
    file, and says why any other has none."""
    made = []
    for gguf_type in types:
        if gguf_type == F32:
            made.append(gguf_type)
            continue
        if tool is None:
            continue
        path = os.path.join(os.path.dirname(files.gguf[F32]), f"{cfg.name}-{gguf_type}.gguf")
        started = time.perf_counter()
        try:
            quantize(tool, files.gguf[F32], path, QUANT_TYPES[gguf_type])
        except RuntimeError as e:
            print(f"  {cfg.name}: no {gguf_type} file, so no {gguf_type} runs: {e}")
            continue
        files.gguf[gguf_type] = path
        made.append(gguf_type)
        print(f"  {cfg.name}: llama-quantize {QUANT_TYPES[gguf_type]}: {_mb(os.path.getsize(path))} "
              f"({tensor_types(path)}) in {time.perf_counter() - started:.0f} s", flush=True)
    return made


def decode_bytes(path: str) -> int:
    """The bytes of weights a decode token reads from the GGUF file at path: every tensor as stored, but one row of
    the position table, and one row of the token embedding unless it is also the output head (no output.weight)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    total = 0
    for name, t in tensors.items():
        lookup = name == "position_embd.weight" or (name == "token_embd.weight" and "output.weight" in tensors)
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1  # ggml's order: shape[0] is a row's length
        total += int(t.n_bytes) // rows if lookup else int(t.n_bytes)
    return total


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# ---------------------------------------------------------------------------------------------- engines
# Each engine is a session class built in the engine's own process, with three methods returning logits (V,)
# as a float32 array that stays valid until the session's next call:
#   prefill(ids)       starts the sequence afresh from the prompt ids (P,); logits predict the next token
#   step(token)        appends one token; logits predict the one after it
#   full_pass(ids)     a full forward pass over ids (T,) without any cache; the last position's logits
# It sets load_s, the seconds from the loading call to a model that decodes, and may set weight_bytes: the bytes
# of weights a decode step reads (cllm's float32 models, which have no file).


class CllmSession:
    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles,
                 gguf_type: str):
        from threadpoolctl import threadpool_limits

        from cllm.checkpoint import load_model
        from cllm.generate import Decoder
        from cllm.model import GPT

        stack.enter_context(threadpool_limits(threads, user_api="blas"))
        started = time.perf_counter()
        if files.gguf:
            self.model, _ = load_model(files.gguf[gguf_type], threads=threads)
        else:
            self.model = GPT(cfg.model_config(), seed=SEED, threads=threads)
        self.decoder = Decoder(self.model, 1, threads=threads)
        self.load_s = time.perf_counter() - started
        if not files.gguf:
            if files.npz:  # for the peer, which must not import cllm
                np.savez(files.npz, **self.model.p)
            # A step reads every parameter once, but of a position table (gpt2's) only its position's row.
            unread = (self.model.config.context_length - 1) * self.model.config.dim if "wpe" in self.model.p else 0
            self.weight_bytes = (self.model.num_params - unread) * self.model.params.itemsize
        self._token = np.zeros(1, np.int32)
        quantized = len(getattr(self.model, "q", None) or ())
        self.runtime = (f"cllm, {gguf_type}{f', {quantized} quantized matrices' if quantized else ''}, "
                        f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.decoder.prefill([ids])[0]

    def step(self, token: int) -> np.ndarray:
        self._token[0] = token
        return self.decoder.step(self._token)[0]

    def full_pass(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids[None])[0, -1]


class SafetensorsByCllmName:
    """A Hugging Face folder's tensors under cllm's (GPT-2's) names, read one at a time."""

    def __init__(self, folder: str, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.file = stack.enter_context(safe_open(os.path.join(folder, "model.safetensors"), framework="np"))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.file.get_tensor(f"transformer.{name}.weight" if name in ("wte", "wpe") else f"transformer.{name}")


class TorchSession:
    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles):
        import torch
        from torch_gpt import GPT, GPTConfig, load_gpt2_weights  # tools/ is on sys.path

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.model = GPT(GPTConfig(vocab_size=cfg.vocab, context_length=cfg.context, dim=cfg.dim,
                                   n_layers=cfg.n_layers, n_heads=cfg.n_heads), seed=SEED).eval()
        if files.hf_folder:
            with contextlib.ExitStack() as reading:
                load_gpt2_weights(self.model, SafetensorsByCllmName(files.hf_folder, reading))
        elif files.npz:  # absent only when cllm did not run: then the peer keeps its own init
            with np.load(files.npz) as weights:
                load_gpt2_weights(self.model, weights)
        self.load_s = time.perf_counter() - started
        self.cache = None
        self.runtime = (f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
                        f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        import torch

        logits, self.cache = self.model.prefill(torch.from_numpy(ids).long().view(1, -1))
        return logits[0].numpy()

    def step(self, token: int) -> np.ndarray:
        return self.model.decode_step(token, self.cache)[0].numpy()

    def full_pass(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(ids).long().view(1, -1))[0, -1].numpy()


class TransformersSession:
    """The folder's model (GPT2LMHeadModel, LlamaForCausalLM) as generate() drives it: a prefill with logits for the
    last position only, then one token per forward pass with the KV cache the model returned."""

    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles):
        import inspect

        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" on stderr
        self.torch = torch
        started = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(files.hf_folder, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - started
        forward = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed past_key_values to cache (argument and output).
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.prefill_args = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self.cache = None
        self._token = torch.zeros((1, 1), dtype=torch.long)
        self.runtime = (f"transformers {transformers.__version__}, torch {torch.__version__}, intra-op threads "
                        f"{torch.get_num_threads()}, attention "
                        f"{getattr(self.model.config, '_attn_implementation', '?')}")

    def _forward(self, ids, cache, **kwargs) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache}, **kwargs)
        self.cache = out[self.cache_arg]
        return out.logits[0, -1].numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._forward(self.torch.from_numpy(ids).long().view(1, -1), None, **self.prefill_args)

    def step(self, token: int) -> np.ndarray:
        self._token[0, 0] = token
        return self._forward(self._token, self.cache)

    def full_pass(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(ids).long().view(1, -1), use_cache=False)
        return out.logits[0, -1].numpy()


class LlamaCppSession:
    """llama-cpp-python's Llama on a GGUF file: eval() feeds tokens into its context; the logits of the last
    token evaluated are read from the context (with logits_all=False, Llama.scores is not filled)."""

    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles,
                 gguf_type: str):
        try:
            import llama_cpp
        except ImportError:
            raise
        except Exception as e:  # the shared library failed to load: as good as not importable
            raise ImportError(f"{type(e).__name__}: {e}") from e
        self.llama_cpp = llama_cpp
        started = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=files.gguf[gguf_type], n_ctx=cfg.context, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - started
        if hasattr(self.llm, "close"):
            stack.callback(self.llm.close)
        self.n_vocab = self.llm.n_vocab()
        if self.n_vocab != cfg.vocab:
            raise RuntimeError(f"llama.cpp reads a vocabulary of {self.n_vocab} tokens, expected {cfg.vocab}")
        self.runtime = (f"llama-cpp-python {llama_cpp.__version__}, {gguf_type}, threads {threads}, "
                        f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")

    def _last_logits(self) -> np.ndarray:
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return self._last_logits()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_logits()

    def full_pass(self, ids: np.ndarray) -> np.ndarray:
        return self.prefill(ids).copy()


def make_session(unit: Unit, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles):
    if unit.engine == "cllm":
        return CllmSession(cfg, threads, stack, files, unit.gguf_type)
    if unit.engine == "torch":
        return TorchSession(cfg, threads, stack, files)
    if unit.engine == "transformers":
        return TransformersSession(cfg, threads, stack, files)
    return LlamaCppSession(cfg, threads, stack, files, unit.gguf_type)


# ------------------------------------------------------------------------------------ one engine, one config


@dataclass
class Result:
    unit: Unit
    config: GenConfig
    prefill_s: list[float]  # per timed run
    decode_s: list[float]
    load_s: list[float]  # per process
    tokens: list[int]  # the greedy continuation
    prefill_logits: np.ndarray  # (V,) after the prompt, for comparing the engines
    cache_error: float  # max |last decode logits - full pass logits|
    peak_rss_mb: float | None
    runtime: str
    weight_bytes: int | None = None  # read per decode step (cllm's float32 models)

    @property
    def prefill_tok_s(self) -> float:
        return self.config.prompt_len / statistics.median(self.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        return self.config.decode_steps / statistics.median(self.decode_s)

    @property
    def load(self) -> float:
        return statistics.median(self.load_s)

    def pool(self, other: Result) -> None:
        """Adds another process's runs of the same seeded benchmark: the times pooled, the higher peak kept."""
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s
        self.load_s += other.load_s
        self.peak_rss_mb = higher_peak(self.peak_rss_mb, other.peak_rss_mb)

    def summary(self) -> str:
        return (f"  {self.unit.engine:12s} {self.unit.gguf_type:6s} {self.config.name:7s} load "
                f"{self.load_s[-1]:5.2f} s  prefill {self.prefill_tok_s:7,.0f} tok/s  decode {self.decode_tok_s:6,.1f} "
                f"tok/s (min {min(self.decode_s) * 1e3:.0f}, max {max(self.decode_s) * 1e3:.0f} ms for "
                f"{self.config.decode_steps} steps)  cache vs full pass {self.cache_error:.1e}  peak RSS "
                f"{fmt(self.peak_rss_mb, '.0f')} MB  [{self.runtime}]")


@dataclass
class Run:
    prefill_s: float
    decode_s: float  # every step and every argmax, as a real generation loop would spend
    tokens: list[int]  # the prefill's token, then one per step
    prefill_logits: np.ndarray
    last_logits: np.ndarray  # after the last step


def greedy_run(session, prompt: np.ndarray, steps: int) -> Run:
    """Prefill, then `steps` greedy decode steps."""
    started = time.perf_counter()
    logits = session.prefill(prompt)
    prefill_s = time.perf_counter() - started
    prefill_logits = logits.copy()
    started = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    for _ in range(steps):
        logits = session.step(tokens[-1])
        tokens.append(int(np.argmax(logits)))
    decode_s = time.perf_counter() - started
    return Run(prefill_s, decode_s, tokens, prefill_logits, logits.copy())


def bench_engine(unit: Unit, cfg: GenConfig, threads: int, repeats: int, prompt: np.ndarray,
                 files: WeightFiles) -> tuple[Result | None, str | None]:
    """Benchmarks one engine on one type of one config; runs in the engine's own fresh process.

    Returns (result, None), or (None, message) when the engine cannot be imported or fails.
    """
    what = f"{unit.engine} on {cfg.name} {unit.gguf_type}"
    try:
        with contextlib.ExitStack() as stack:
            session = make_session(unit, cfg, threads, stack, files)
            warmup = greedy_run(session, prompt, cfg.decode_steps)
            timed = [greedy_run(session, prompt, cfg.decode_steps) for _ in range(repeats)]
            # The peak of loading and generating, before the check below: a full pass without a cache is no
            # part of what a user's generation costs, for any engine.
            peak = peak_rss_mb()
            # The last step's logits predict the token after prompt + tokens[:-1]; a full pass must agree.
            full = session.full_pass(np.concatenate([prompt, np.asarray(warmup.tokens[:-1], prompt.dtype)]))
            cache_error = float(np.max(np.abs(warmup.last_logits - full)))
            runtime, weight_bytes = session.runtime, getattr(session, "weight_bytes", None)
    except ImportError as e:
        return None, f"{unit.engine} is not importable ({type(e).__name__}: {e}); skipping {what}"
    except Exception:  # report and go on with the other runs
        return None, f"{what} failed:\n{traceback.format_exc()}"
    return Result(unit, cfg, [r.prefill_s for r in timed], [r.decode_s for r in timed], [session.load_s],
                  warmup.tokens, warmup.prefill_logits, cache_error, peak, runtime, weight_bytes), None


# ------------------------------------------------------------------------------------------------- checks


def check_result(r: Result) -> None:
    tolerance = r.unit.cache_tolerance
    if tolerance is not None and r.cache_error > tolerance:
        print(f"  WARNING: {r.unit.engine} {r.config.name} {r.unit.gguf_type}: cached logits differ from a full pass "
              f"by {r.cache_error:.1e}")


def compare_engines(c: Result, peers: list[Result]) -> None:
    """Prints how closely each peer agrees with cllm on the same type: logits after the prefill (the largest
    difference, and relative to their norm), then the greedy tokens."""
    for t in peers:
        diff = c.prefill_logits.astype(np.float64) - t.prefill_logits
        relative = float(np.linalg.norm(diff) / (np.linalg.norm(t.prefill_logits.astype(np.float64)) or 1.0))
        same = next((i for i, (a, b) in enumerate(zip(c.tokens, t.tokens)) if a != b), len(c.tokens))
        where = f"{c.config.name} {c.unit.gguf_type}"
        print(f"  {where}: {t.unit.engine} vs cllm: prefill logits differ by at most {np.max(np.abs(diff)):.1e} "
              f"(relative {relative:.1e}); greedy tokens agree on the first {same} of {len(c.tokens)}")
        if c.unit.quantized and relative > QUANTIZED_LOGITS_TOLERANCE:
            print(f"  WARNING: {where}: {t.unit.engine}'s logits and cllm's on the same file differ by more than "
                  f"8-bit activations explain ({relative:.1e} > {QUANTIZED_LOGITS_TOLERANCE:.0e} relative)")
        if same < min(COMPARED_TOKENS, len(c.tokens)):
            what = "NOTE (quantized: expected to part earlier)" if c.unit.quantized else "WARNING"
            print(f"  {what}: {where}: {t.unit.engine}'s greedy tokens part from cllm's at token {same} (within "
                  f"the first {COMPARED_TOKENS}): cllm {c.tokens[:COMPARED_TOKENS]}, "
                  f"{t.unit.engine} {t.tokens[:COMPARED_TOKENS]}")


# ------------------------------------------------------------------------------------------------- main


@dataclass
class Limit:
    """The decode rate that reading the weights allows, per (config, type)."""
    file_mb: float | None
    weight_bytes: int

    def tok_s(self, bandwidth: float | None) -> float | None:
        return bandwidth / self.weight_bytes if bandwidth else None


def markdown_table(configs: list[GenConfig], units: dict[str, list[Unit]], results: dict[tuple, Result],
                   limits: dict[tuple[str, str], Limit], bandwidth: float | None) -> str:
    def ratio(c: Result | None, r: Result, figure) -> str:
        return "" if c is None or r is c else fmt(figure(c) / figure(r), ".2f")

    lines = [
        ("| config | type | engine | decode tok/s | cllm/engine | % of limit | prefill tok/s | cllm/engine "
         "| load s | cllm/engine | peak RSS MB | cllm/engine |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg in configs:
        for unit in units[cfg.name]:
            r = results.get((unit, cfg.name))
            if r is None:
                continue
            c = results.get((Unit("cllm", unit.gguf_type), cfg.name))
            limit = limits.get((cfg.name, unit.gguf_type))
            ceiling = limit.tok_s(bandwidth) if limit else None
            rss = ratio(c, r, lambda x: x.peak_rss_mb) if c and c.peak_rss_mb and r.peak_rss_mb else ""
            lines.append(
                f"| {cfg.name} | {unit.gguf_type} | {unit.engine} | {r.decode_tok_s:,.1f} "
                f"| {ratio(c, r, lambda x: x.decode_tok_s)} | {fmt(ceiling and 100 * r.decode_tok_s / ceiling, '.0f')} "
                f"| {r.prefill_tok_s:,.0f} | {ratio(c, r, lambda x: x.prefill_tok_s)} | {r.load:.2f} "
                f"| {ratio(c, r, lambda x: x.load)} | {fmt(r.peak_rss_mb, '.0f')} | {rss} |")
    lines += [
        "",
        (f"| config | type | file MB | weights read per decode token MB | limit tok/s at "
         f"{fmt(bandwidth and bandwidth / 1e9, '.1f')} GB/s |"),
        "|---|---|---:|---:|---:|",
    ]
    for cfg in configs:
        for gguf_type in dict.fromkeys(u.gguf_type for u in units[cfg.name]):
            limit = limits.get((cfg.name, gguf_type))
            if limit:
                lines.append(f"| {cfg.name} ({cfg.shape}) | {gguf_type} | {fmt(limit.file_mb, ',.1f')} "
                             f"| {limit.weight_bytes / 1e6:,.1f} | {fmt(limit.tok_s(bandwidth), ',.0f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="baby,mid", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated subset of {','.join(ENGINES)}, or {PINNED}TYPE for llama.cpp on one type "
                        f"(default: per config, cllm,torch for baby and mid, {','.join(EXPORTED_ENGINES)} for the "
                        f"exported configs)")
    p.add_argument("--types", default=None,
                   help=f"GGUF types of the exported configs, a comma-separated subset of {','.join(TYPES)} (default: "
                        f"{','.join(DEFAULT_TYPES)}; with {PINNED}TYPE engines, f32 and those types)")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (BLAS/OpenMP, default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine, config and round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the engines this many times (default 3)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--llama-cpp-bin", help="the folder of llama.cpp's llama-quantize (default: $LLAMA_CPP_BIN, PATH, "
                                           "or built from PyPI's source package: see tools/bench_common.py)")
    args = p.parse_args(argv)
    args.configs = choose_configs(p, args.configs, CONFIGS)
    pinned: list[str] = []
    args.llama_cpp_types = None  # llama.cpp on these types only (llama.cpp-TYPE names); None: on every type
    if args.engines is not None:
        names = [e.strip() for e in args.engines.split(",") if e.strip()]
        pinned = [e[len(PINNED):] for e in names if e.startswith(PINNED)]
        args.engines = [e for e in names if not e.startswith(PINNED)]
        if pinned and "llama.cpp" not in args.engines:
            args.engines.append("llama.cpp")
            args.llama_cpp_types = pinned
        unknown = [e for e in args.engines if e not in ENGINES] + [t for t in pinned if t not in TYPES]
        if unknown or not args.engines:
            p.error(f"unknown engine(s) or type(s) {unknown}; choose from {list(ENGINES)}, {PINNED}TYPE for TYPE in "
                    f"{list(TYPES)}")
    if args.types is None:
        args.types = list(dict.fromkeys([F32, *pinned])) if pinned else list(DEFAULT_TYPES)
    else:
        args.types = list(dict.fromkeys(t.strip().lower() for t in args.types.split(",") if t.strip()))
        if not args.types or any(t not in TYPES for t in args.types):
            p.error(f"--types: choose from {','.join(TYPES)}")
        args.types += [t for t in pinned if t not in args.types]
    if args.threads < 1 or args.repeats < 1 or args.rounds < 1:
        p.error("need --threads >= 1, --repeats >= 1 and --rounds >= 1")
    return args


def engines_to_run(args, cfg: GenConfig, told: set) -> list[str]:
    """The engines to run on cfg, cllm first; says once why any other is skipped."""
    chosen = args.engines if args.engines is not None else list(cfg.default_engines)
    chosen = sorted(dict.fromkeys(chosen), key=lambda e: e != "cllm")
    engines = []
    for engine in chosen:
        spec = ENGINES[engine]
        if engine == "torch" and args.no_torch:
            continue
        if engine == "torch" and cfg.arch != "gpt2":
            note = f"the torch peer (tools/torch_gpt.py) is GPT-2's architecture; skipping it on {cfg.name}"
        elif spec.needs_export and not cfg.exported:
            exported = ", ".join(c.name for c in CONFIGS.values() if c.exported)
            note = f"{engine} runs on the exported configs only ({exported}); skipping it on {cfg.name}"
        elif importlib.util.find_spec(spec.module) is None:  # find, don't import
            note = f"{spec.module} is not installed; skipping {engine}"
        else:
            engines.append(engine)
            continue
        if note not in told:
            told.add(note)
            print(note)
    return engines


def units_to_run(args, cfg: GenConfig, engines: list[str], types: list[str]) -> list[Unit]:
    """(engine, type) pairs in the order a round runs them: type by type, cllm first; float32-only engines with
    f32."""
    if not cfg.exported:
        return [Unit(engine) for engine in engines]
    units = []
    for gguf_type in types:
        for engine in engines:
            spec = ENGINES[engine]
            if engine == "llama.cpp" and args.llama_cpp_types is not None and gguf_type not in args.llama_cpp_types:
                continue
            if spec.reads_gguf or gguf_type == F32:
                units.append(Unit(engine, gguf_type))
    return units


def prepare_config(cfg: GenConfig, args, engines: list[str], tmp: str, quantize_tool) -> tuple | None:
    """Writes cfg's weights (exported configs: the f32 file, the Hugging Face folder if transformers runs, each
    quantized type's file): (files, units, prompt, limits), or None if that failed."""
    if not cfg.exported:  # cllm writes its weights here for the peer, which reads them only if cllm got that far
        files = WeightFiles(npz=os.path.join(tmp, f"{cfg.name}.npz") if len(engines) > 1 else None)
        prompt = np.random.default_rng(SEED).integers(0, cfg.vocab, cfg.prompt_len, dtype=np.int32)
        return files, units_to_run(args, cfg, engines, [F32]), prompt, {}
    try:  # written once, in a process of its own: the parent imports no engine
        files, id_limit, note = in_fresh_process(export_weights, cfg, tmp, "transformers" in engines)
    except Exception:  # noqa: BLE001 - reported; the other configs still run
        print(f"exporting {cfg.name}'s weights failed; skipping it:\n{traceback.format_exc()}")
        return None
    print(note, flush=True)
    types = quantized_files(cfg, files, args.types, quantize_tool() if any(t != F32 for t in args.types) else None)
    limits = {t: Limit(os.path.getsize(files.gguf[t]) / 1e6, decode_bytes(files.gguf[t])) for t in types}
    prompt = np.random.default_rng(SEED).integers(0, id_limit, cfg.prompt_len, dtype=np.int32)
    return files, units_to_run(args, cfg, engines, types), prompt, limits


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    print(f"threads {args.threads}, repeats {args.repeats}, python {platform.python_version()}, "
          f"numpy {np.__version__}")
    told: set[str] = set()
    engines = {cfg.name: engines_to_run(args, cfg, told) for cfg in args.configs}
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)
    machine, bandwidth = measure_machine(args.threads)
    print(machine, flush=True)

    tool: list[str | None] = []

    def quantize_tool() -> str | None:
        """llama-quantize's path (found or built the first time it is asked for), or None, said once."""
        if not tool:
            found = available_llama_cpp_tools(["llama-quantize"], bin_dir=args.llama_cpp_bin, threads=args.threads)
            tool.append(found and found["llama-quantize"])
        return tool[0]

    results: dict[tuple[Unit, str], Result] = {}
    limits: dict[tuple[str, str], Limit] = {}
    start = machine_snapshot()
    with tempfile.TemporaryDirectory(prefix="cllm-bench-generate-") as tmp:
        prepared = {}
        for cfg in args.configs:
            if engines[cfg.name] and (done := prepare_config(cfg, args, engines[cfg.name], tmp, quantize_tool)):
                prepared[cfg.name] = done
                limits.update({(cfg.name, t): limit for t, limit in done[3].items()})
        configs = [cfg for cfg in args.configs if cfg.name in prepared]
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            for cfg in configs:
                files, units, prompt, _ = prepared[cfg.name]
                # cllm first on baby and mid (it writes the peer's weights); elsewhere every other round reversed
                order = units if round_ % 2 or not cfg.exported else units[::-1]
                for unit in order:
                    weights = files
                    if not cfg.exported and unit.engine != "cllm" and (Unit("cllm"), cfg.name) not in results:
                        weights = WeightFiles()  # cllm never wrote them
                    result, error = in_fresh_process(bench_engine, unit, cfg, args.threads, args.repeats, prompt,
                                                     weights)
                    if error:
                        print(error)
                        continue
                    print(result.summary(), flush=True)
                    check_result(result)
                    pooled = results.setdefault((unit, cfg.name), result)
                    if pooled is not result:  # the same seeded runs again
                        pooled.pool(result)
                if round_ == 1:
                    for gguf_type in dict.fromkeys(u.gguf_type for u in units):
                        c = results.get((Unit("cllm", gguf_type), cfg.name))
                        peers = [results[(u, cfg.name)] for u in units if u.gguf_type == gguf_type
                                 and u.engine != "cllm" and (u, cfg.name) in results]
                        if c is not None and peers:
                            compare_engines(c, peers)
    for cfg in configs:  # baby and mid: the limit of cllm's float32 weights
        c = results.get((Unit("cllm"), cfg.name))
        if not cfg.exported and c is not None and c.weight_bytes:
            limits[(cfg.name, F32)] = Limit(None, c.weight_bytes)
    # Measured again: another process on the cores lowers the rate, so the higher of the two is the machine's.
    again = measure_machine(args.threads)
    if again[1] > bandwidth:
        machine, bandwidth = again
    print(machine)
    title = (f"Single-stream greedy decoding, batch 1, {args.threads} threads, median of {args.repeats} runs in each "
             f"of {args.rounds} alternating rounds; cllm/engine = cllm's figure over the engine's on the same type "
             f"and file (decode and prefill: above 1, cllm is faster; load and RSS: below 1, cllm takes less); "
             f"% of limit: the decode rate against the rate at which the machine can read the weights a token "
             f"needs (second table)")
    units = {cfg.name: prepared[cfg.name][1] for cfg in configs}
    return finish_report(start, results, title, lambda: markdown_table(configs, units, results, limits, bandwidth))


if __name__ == "__main__":
    sys.exit(main())

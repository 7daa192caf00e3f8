"""Single-stream decoding benchmark: cllm's Decoder against peers on the same weights, each run as users run it.

Engines (--engines, a comma-separated subset):

    cllm              cllm.generate.Decoder (on the exported configs, the model comes from
                      cllm.checkpoint.load_model of the Hugging Face folder, as users load one)
    torch             the PyTorch peer's KV-cache path (tools/torch_gpt.py)
    transformers      transformers' GPT2LMHeadModel or LlamaForCausalLM from the Hugging Face folder, float32,
                      its KV cache
    llama.cpp-f32     llama-cpp-python on the GGUF file, f32
    llama.cpp-q8_0    the same on a q8_0 GGUF file (quantized matrices: its tokens may part from cllm's early)

Every engine holds the same weights, cllm's seeded random init. On baby and mid, cllm builds them and hands them
to the torch peer as an .npz. On gpt2 (GPT-2 small's shape: 124M parameters, a 50,257-token vocabulary) they are
written once per run, in a process of their own, as a Hugging Face folder (cllm.formats.hf.save_hf) and as GGUF
f32 and q8_0 files (cllm.formats.gguf_file.save_gguf), with a small byte-level BPE tokenizer trained on generated
text (the model's vocabulary is larger than the tokenizer's; the files carry that). Every engine loads those
files, cllm the folder. Every engine gets the same random prompt (token ids below the tokenizer's size on gpt2,
so every engine accepts them). One run is

    prefill   one pass over the prompt, filling the KV cache                 -> prompt tokens / s
    decode    greedy (argmax on the host), one token per step                 -> steps / s

baby and mid prompt half the context and decode to its end; gpt2 prompts 128 tokens and decodes 128 steps.
Batch 1, the same thread count for every engine. After one untimed warm-up run, --repeats runs are timed, in each
of --rounds rounds that alternate the engines (so all sample the same drift of a shared machine's speed); the
table shows the medians of the pooled runs. Before the table, three checks: each engine's last decode logits
against its own full forward pass (no cache) over the same tokens (llama.cpp's "full pass" is a fresh evaluation
of the whole sequence), each peer's logits after the prefill against cllm's, and its greedy tokens against cllm's
(the first 10 should agree; later ones may part on near-ties, which float rounding can flip). llama.cpp's f32 GELU
rounds its input to float16 and reads a table, so its logits agree with the float32 engines' to about 1e-3, not
1e-6; q8_0 also rounds weights and activations to 8 bits, so its tokens may part earlier: printed, not an error.

For cllm the table also gives the bytes of weights a decode step reads (every float32 parameter once, but only
one row of the position table; the KV cache and activations are not counted) and the memory bandwidth that
implies at its decode rate: decoding one stream is bound by streaming the weights, so that figure against the
machine's bandwidth says how close to the limit it runs.

Each (engine, config) pair runs in its own fresh spawned process, one at a time, cllm first, never two engines in
one process: see tools/bench_train.py for why (OMP_WAIT_POLICY and torch's libgomp share a soname). A process
per config also makes its peak RSS (interpreter and libraries included) that config's own; it is read after the
timed runs and before the full-pass check, so it is the peak of loading and generating. The parent imports no
engine; every peer is optional (one that is not installed or not importable is skipped with a line saying so).

    python tools/bench_generate.py                    # baby + mid, cllm and torch, 2 threads (a few minutes)
    python tools/bench_generate.py --configs mid --threads 1 --repeats 20
    python tools/bench_generate.py --no-torch
    python tools/bench_generate.py --configs gpt2 --engines cllm,transformers,llama.cpp-f32,llama.cpp-q8_0 \\
        --rounds 2 --repeats 2                        # GPT-2 small's shape against transformers and llama.cpp

gpt2 is not in the default --configs: with its four engines and the default rounds and repeats it would add about
six minutes on 2 cores (the command above takes about two). Its default engines are those four; baby's and mid's
are cllm and torch. smollm2 is the llama architecture at SmolLM2-135M's shape (grouped-query attention, SwiGLU,
RoPE), exported like gpt2 and run by the same four engines:

    python tools/bench_generate.py --configs smollm2 --rounds 2 --repeats 2
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

from bench_common import (busy_note, choose_configs, finish_report, fmt, foreign_load, higher_peak, in_fresh_process,
                          machine_snapshot, peak_rss_mb, use_this_checkout)

SEED = 1337
COMPARED_TOKENS = 10  # greedy tokens that must agree; later ones may differ on near-ties
CACHE_TOLERANCE = 1e-4  # cached vs full-pass logits; float32 rounding gives ~1e-6 at these logit scales
# llama.cpp's f32 GELU rounds its input to float16 and reads a table: its logits are good to ~1e-3 (both ways).
LLAMA_CPP_TOLERANCE = 1e-2
TOKENIZER_VOCAB = 512  # the exported configs' BPE tokenizer (256 bytes, <|endoftext|>, merges)
BPE = "bpe"


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
    # Weights exported as a Hugging Face folder and GGUF files, which every engine loads; else built by cllm.
    exported: bool = False
    default_engines: tuple[str, ...] = ("cllm", "torch")
    # The architecture, and llama's own settings (see cllm.model.ModelConfig)
    arch: str = "gpt2"
    n_kv_heads: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0

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
        return f"{self.arch} L{self.n_layers} H{self.n_heads}{kv} C{self.dim} T{self.context} V{self.vocab}"

    def model_config(self):
        """The cllm ModelConfig of these weights (imported here: the parent process imports no engine)."""
        from cllm.model import ModelConfig

        llama = dict(n_kv_heads=self.n_kv_heads, intermediate_size=self.intermediate_size,
                     rope_theta=self.rope_theta) if self.arch == "llama" else {}
        return ModelConfig(vocab_size=self.vocab, context_length=self.context, dim=self.dim, n_layers=self.n_layers,
                           n_heads=self.n_heads, arch=self.arch, **llama)


CONFIGS = {
    "baby": GenConfig("baby", n_layers=4, n_heads=4, dim=128, context=64, vocab=65),
    "mid": GenConfig("mid", n_layers=6, n_heads=6, dim=384, context=256, vocab=65),
    "gpt2": GenConfig("gpt2", n_layers=12, n_heads=12, dim=768, context=1024, vocab=50257, prompt_len=128,
                      decode_steps=128, exported=True,
                      default_engines=("cllm", "transformers", "llama.cpp-f32", "llama.cpp-q8_0")),
    # SmolLM2-135M's shape: 30 layers, 9 heads over 3 kv heads, SwiGLU 1536, a 49,152-token vocabulary, tied.
    "smollm2": GenConfig("smollm2", n_layers=30, n_heads=9, dim=576, context=2048, vocab=49152, prompt_len=128,
                         decode_steps=128, exported=True, arch="llama", n_kv_heads=3, intermediate_size=1536,
                         rope_theta=100000.0,
                         default_engines=("cllm", "transformers", "llama.cpp-f32", "llama.cpp-q8_0")),
}


@dataclass(frozen=True)
class Engine:
    module: str  # what must be installed (found, not imported, by the parent)
    exact: bool = True  # float32 weights: its greedy tokens should agree with cllm's on the first ones
    cache_tolerance: float | None = CACHE_TOLERANCE  # cached vs full-pass logits; None: printed, not checked
    needs_export: bool = False  # loads the exported files, so it runs on exported configs only
    gguf_type: str | None = None


ENGINES = {
    "cllm": Engine("cllm"),
    "torch": Engine("torch"),
    "transformers": Engine("transformers", needs_export=True),
    "llama.cpp-f32": Engine("llama_cpp", cache_tolerance=LLAMA_CPP_TOLERANCE, needs_export=True, gguf_type="f32"),
    # Its products quantize the activations too (to 8 bits), differently in a batch and in one row.
    "llama.cpp-q8_0": Engine("llama_cpp", exact=False, cache_tolerance=None, needs_export=True, gguf_type="q8_0"),
}


@dataclass
class WeightFiles:
    """Where an engine finds its weights."""
    npz: str | None = None  # baby, mid: cllm writes its init here, the torch peer reads it
    hf_folder: str | None = None  # exported configs
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


def export_weights(cfg: GenConfig, folder: str, gguf_types: list[str]) -> tuple[WeightFiles, int, str]:
    """Writes cllm's seeded init of cfg as a Hugging Face folder and GGUF files; runs in its own process.

    Returns the files, the tokenizer's size (prompts stay below it) and a line describing what was written.
    """
    from cllm.formats.gguf_file import save_gguf
    from cllm.formats.hf import save_hf
    from cllm.model import GPT
    from cllm.tokenizer import Tokenizer

    started = time.perf_counter()
    tokenizer = Tokenizer.train(BPE, generated_texts(np.random.default_rng(SEED)), vocab_size=TOKENIZER_VOCAB)
    model = GPT(cfg.model_config(), seed=SEED)
    files = WeightFiles(hf_folder=os.path.join(folder, f"{cfg.name}-hf"))
    written = [f"Hugging Face folder {_mb(sum(p.stat().st_size for p in save_hf(files.hf_folder, model, tokenizer)))}"]
    for gguf_type in gguf_types:
        path = save_gguf(os.path.join(folder, f"{cfg.name}-{gguf_type}.gguf"), model, tokenizer, tensor_type=gguf_type)
        files.gguf[gguf_type] = str(path)
        written.append(f"GGUF {gguf_type} {_mb(path.stat().st_size)}")
    note = (f"  {cfg.name}: {model.num_params / 1e6:.2f}M parameters (seed {SEED}), tokenizer of "
            f"{tokenizer.vocab_size} tokens; wrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")
    return files, tokenizer.vocab_size, note


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# ---------------------------------------------------------------------------------------------- engines
# Each engine is a session class built in the engine's own process, with three methods returning logits (V,)
# as a float32 array that stays valid until the session's next call:
#   prefill(ids)       starts the sequence afresh from the prompt ids (P,); logits predict the next token
#   step(token)        appends one token; logits predict the one after it
#   full_pass(ids)     a full forward pass over ids (T,) without any cache; the last position's logits
# A session may set weight_bytes: the bytes of weights a decode step reads.


class CllmSession:
    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles):
        from threadpoolctl import threadpool_limits

        from cllm.checkpoint import load_model
        from cllm.generate import Decoder
        from cllm.model import GPT

        stack.enter_context(threadpool_limits(threads, user_api="blas"))
        if files.hf_folder:
            self.model, _ = load_model(files.hf_folder, threads=threads)
        else:
            self.model = GPT(cfg.model_config(), seed=SEED, threads=threads)
            if files.npz:  # for the peer, which must not import cllm
                np.savez(files.npz, **self.model.p)
        self.decoder = Decoder(self.model, 1, threads=threads)
        self._token = np.zeros(1, np.int32)
        # A step reads every parameter once, but of a position table (gpt2's) only its position's row.
        unread = (self.model.config.context_length - 1) * self.model.config.dim if "wpe" in self.model.p else 0
        self.weight_bytes = (self.model.num_params - unread) * self.model.params.itemsize
        self.runtime = f"cllm, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}"

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
        self.model = GPT(GPTConfig(vocab_size=cfg.vocab, context_length=cfg.context, dim=cfg.dim,
                                   n_layers=cfg.n_layers, n_heads=cfg.n_heads), seed=SEED).eval()
        if files.hf_folder:
            with contextlib.ExitStack() as reading:
                load_gpt2_weights(self.model, SafetensorsByCllmName(files.hf_folder, reading))
        elif files.npz:  # absent only when cllm did not run: then the peer keeps its own init
            with np.load(files.npz) as weights:
                load_gpt2_weights(self.model, weights)
        self.cache = None
        self.runtime = (f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
                        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")

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
    """The folder's model (GPT2LMHeadModel, LlamaForCausalLM) as generate() drives it: a prefill with logits for the last position only, then one
    token per forward pass with the KV cache the model returned."""

    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles):
        import inspect

        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" on stderr
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(files.hf_folder, dtype=torch.float32).eval()
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
        self.llm = llama_cpp.Llama(model_path=files.gguf[gguf_type], n_ctx=cfg.context, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)
        if hasattr(self.llm, "close"):
            stack.callback(self.llm.close)
        self.n_vocab = self.llm.n_vocab()
        if self.n_vocab != cfg.vocab:
            raise RuntimeError(f"llama.cpp reads a vocabulary of {self.n_vocab} tokens, expected {cfg.vocab}")
        self.runtime = (f"llama-cpp-python {llama_cpp.__version__}, {gguf_type}, threads {threads}, "
                        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")

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


def make_session(engine: str, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, files: WeightFiles):
    if engine == "cllm":
        return CllmSession(cfg, threads, stack, files)
    if engine == "torch":
        return TorchSession(cfg, threads, stack, files)
    if engine == "transformers":
        return TransformersSession(cfg, threads, stack, files)
    return LlamaCppSession(cfg, threads, stack, files, ENGINES[engine].gguf_type)


# ------------------------------------------------------------------------------------ one engine, one config


@dataclass
class Result:
    engine: str
    config: GenConfig
    prefill_s: list[float]  # per timed run
    decode_s: list[float]
    tokens: list[int]  # the greedy continuation
    prefill_logits: np.ndarray  # (V,) after the prompt, for comparing the engines
    cache_error: float  # max |last decode logits - full pass logits|
    peak_rss_mb: float | None
    runtime: str
    weight_bytes: int | None = None  # read per decode step (cllm)

    @property
    def prefill_tok_s(self) -> float:
        return self.config.prompt_len / statistics.median(self.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        return self.config.decode_steps / statistics.median(self.decode_s)

    @property
    def bandwidth_gb_s(self) -> float | None:
        return self.weight_bytes * self.decode_tok_s / 1e9 if self.weight_bytes else None

    def summary(self) -> str:
        return (f"  {self.engine:14s} {self.config.name:4s}  prefill {self.prefill_tok_s:9,.0f} tok/s"
                f"  decode {self.decode_tok_s:7,.1f} tok/s (min {min(self.decode_s) * 1e3:.1f}, "
                f"max {max(self.decode_s) * 1e3:.1f} ms for {self.config.decode_steps} steps)"
                f"  cache vs full pass {self.cache_error:.1e}  peak RSS {fmt(self.peak_rss_mb, '.0f')} MB"
                f"  [{self.runtime}]")


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


def bench_engine(engine: str, cfg: GenConfig, threads: int, repeats: int, prompt: np.ndarray,
                 files: WeightFiles) -> tuple[Result | None, str | None]:
    """Benchmarks one engine on one config; runs in the engine's own fresh process.

    Returns (result, None), or (None, message) when the engine cannot be imported or fails.
    """
    try:
        with contextlib.ExitStack() as stack:
            session = make_session(engine, cfg, threads, stack, files)
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
        return None, f"{engine} is not importable ({type(e).__name__}: {e}); skipping {engine} on {cfg.name}"
    except Exception:  # report and go on with the other runs
        return None, f"{engine} failed on {cfg.name}:\n{traceback.format_exc()}"
    return Result(engine, cfg, [r.prefill_s for r in timed], [r.decode_s for r in timed], warmup.tokens,
                  warmup.prefill_logits, cache_error, peak, runtime, weight_bytes), None


# ------------------------------------------------------------------------------------------------- checks


def check_result(r: Result) -> None:
    tolerance = ENGINES[r.engine].cache_tolerance
    if tolerance is not None and r.cache_error > tolerance:
        print(f"  WARNING: {r.engine} {r.config.name}: cached logits differ from a full pass by {r.cache_error:.1e}")


def compare_engines(c: Result, peers: list[Result]) -> None:
    """Prints how closely each peer agrees with cllm: logits after the prefill, then the greedy tokens."""
    for t in peers:
        logits_diff = float(np.max(np.abs(c.prefill_logits - t.prefill_logits)))
        same = next((i for i, (a, b) in enumerate(zip(c.tokens, t.tokens)) if a != b), len(c.tokens))
        print(f"  {c.config.name}: {t.engine} vs cllm: prefill logits differ by at most {logits_diff:.1e}; greedy "
              f"tokens agree on the first {same} of {len(c.tokens)}")
        if same < min(COMPARED_TOKENS, len(c.tokens)):
            what = ("NOTE (quantized weights, expected to part earlier)" if not ENGINES[t.engine].exact
                    else "WARNING")
            print(f"  {what}: {c.config.name}: {t.engine}'s greedy tokens part from cllm's at token {same} (within "
                  f"the first {COMPARED_TOKENS}): cllm {c.tokens[:COMPARED_TOKENS]}, "
                  f"{t.engine} {t.tokens[:COMPARED_TOKENS]}")


# ------------------------------------------------------------------------------------------------- main


def markdown_table(configs: list[GenConfig], engines: dict[str, list[str]],
                   results: dict[tuple[str, str], Result]) -> str:
    lines = [
        "| config | engine | decode tok/s | cllm/engine | prefill tok/s | cllm/engine | peak RSS MB "
        "| weights read per token MB | implied bandwidth GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg in configs:
        c = results.get(("cllm", cfg.name))
        for engine in engines[cfg.name]:
            r = results.get((engine, cfg.name))
            if r is None:
                continue
            decode_ratio = fmt(c and c.decode_tok_s / r.decode_tok_s, ".2f") if r is not c else ""
            prefill_ratio = fmt(c and c.prefill_tok_s / r.prefill_tok_s, ".2f") if r is not c else ""
            lines.append(
                f"| {cfg.name} ({cfg.shape}, prompt {cfg.prompt_len}, decode {cfg.decode_steps}) | {engine} "
                f"| {r.decode_tok_s:,.1f} | {decode_ratio} | {r.prefill_tok_s:,.0f} | {prefill_ratio} "
                f"| {fmt(r.peak_rss_mb, '.0f')} "
                f"| {'' if r.weight_bytes is None else format(r.weight_bytes / 1e6, ',.1f')} "
                f"| {'' if r.bandwidth_gb_s is None else format(r.bandwidth_gb_s, '.2f')} |"
            )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="baby,mid", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated subset of {','.join(ENGINES)} (default: per config, cllm,torch for baby "
                        f"and mid, cllm,transformers,llama.cpp-f32,llama.cpp-q8_0 for gpt2 and smollm2)")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (BLAS/OpenMP, default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine, config and round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the engines this many times (default 3)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    args = p.parse_args(argv)
    args.configs = choose_configs(p, args.configs, CONFIGS)
    if args.engines is not None:
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        unknown = [e for e in args.engines if e not in ENGINES]
        if unknown or not args.engines:
            p.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    print(f"threads {args.threads}, repeats {args.repeats}, python {platform.python_version()}, "
          f"numpy {np.__version__}, {os.cpu_count()} logical CPUs")
    told: set[str] = set()
    engines = {cfg.name: engines_to_run(args, cfg, told) for cfg in args.configs}
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)

    results: dict[tuple[str, str], Result] = {}
    start = machine_snapshot()
    with tempfile.TemporaryDirectory(prefix="cllm-bench-generate-") as tmp:
        files: dict[str, WeightFiles] = {}
        prompts: dict[str, np.ndarray] = {}
        configs = []
        for cfg in args.configs:
            if not engines[cfg.name]:
                continue
            id_limit = cfg.vocab
            if cfg.exported:  # written once, in a process of its own: the parent imports no engine
                gguf_types = [ENGINES[e].gguf_type for e in engines[cfg.name] if ENGINES[e].gguf_type]
                try:
                    files[cfg.name], id_limit, note = in_fresh_process(export_weights, cfg, tmp, gguf_types)
                except Exception:
                    print(f"exporting {cfg.name}'s weights failed; skipping it:\n{traceback.format_exc()}")
                    continue
                print(note, flush=True)
            else:  # cllm writes its weights here for the peer, which reads them only if cllm got that far
                files[cfg.name] = WeightFiles(npz=os.path.join(tmp, f"{cfg.name}.npz")
                                              if len(engines[cfg.name]) > 1 else None)
            prompts[cfg.name] = np.random.default_rng(SEED).integers(0, id_limit, cfg.prompt_len, dtype=np.int32)
            configs.append(cfg)
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            for cfg in configs:
                for engine in engines[cfg.name]:
                    weights = files[cfg.name]
                    if not cfg.exported and engine != "cllm" and ("cllm", cfg.name) not in results:
                        weights = WeightFiles()  # cllm never wrote them
                    result, error = in_fresh_process(bench_engine, engine, cfg, args.threads, args.repeats,
                                                     prompts[cfg.name], weights)
                    if error:
                        print(error)
                        continue
                    print(result.summary(), flush=True)
                    check_result(result)
                    pooled = results.setdefault((engine, cfg.name), result)
                    if pooled is not result:  # the same seeded runs again: pool the times, keep the peak
                        pooled.prefill_s += result.prefill_s
                        pooled.decode_s += result.decode_s
                        pooled.peak_rss_mb = higher_peak(pooled.peak_rss_mb, result.peak_rss_mb)
                peers = [results[(e, cfg.name)] for e in engines[cfg.name]
                         if e != "cllm" and (e, cfg.name) in results]
                if round_ == 1 and ("cllm", cfg.name) in results and peers:
                    compare_engines(results[("cllm", cfg.name)], peers)
    title = (f"Single-stream greedy decoding, batch 1, {args.threads} threads, median of {args.repeats} runs in "
             f"each of {args.rounds} alternating rounds; cllm/engine = cllm's rate over the engine's (above 1: "
             f"cllm is faster); weights read per decode step in 10^6 bytes and the bandwidth that implies at the "
             f"decode rate, in 10^9 bytes/s (cllm, float32)")
    return finish_report(start, results, title, lambda: markdown_table(configs, engines, results))


if __name__ == "__main__":
    sys.exit(main())

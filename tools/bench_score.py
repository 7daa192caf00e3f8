"""Scoring throughput: cllm-serve scoring text for an evaluation harness, against transformers on the same weights,
each as lm-evaluation-harness drives it for a multiple-choice task (its loglikelihood requests).

    cllm           cllm-serve over the model folder (cllm.tools.serve.BackgroundServer: cllm-serve's defaults, the
                   playground included, but --threads, which cllm-serve leaves at 1), sent the requests that
                   lm-evaluation-harness's local-completions model sends, one after the other (num_concurrent=1):
                   POST /v1/completions {"prompt": [ids, ...] (--batch prompts of token ids, context +
                   continuation), "echo": true, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234},
                   over one httpx connection; each prompt's continuation scored from the answer as the harness
                   reads it (the sum of token_logprobs[ctxlen:-1], greedy if each of those is its top_logprobs' max)
    transformers   AutoModelForCausalLM of the same folder (GPT2LMHeadModel, LlamaForCausalLM), float32, torch on
                   --threads threads, as the harness's hf model scores the same batches: each prompt's tokens but
                   its last, right-padded, one forward pass (no attention mask, as the harness calls a causal model;
                   --attention-mask passes one) in torch.inference_mode, log_softmax over the vocabulary at every
                   position, the tokens' logprobs gathered (every position's, which the check below needs; the
                   harness gathers the continuation's), the continuation's argmax compared with its tokens

The folder, made once per run in a process of its own (--shape):

- gpt2-small (the default): GPT-2 small's geometry (12 layers, 12 heads of 64, width 768, GELU MLP 3072, learned
  positions for 1024, a vocabulary of 50,257, tied), 124M parameters: lm-evaluation-harness's own example model
  (pretrained=gpt2), and cllm's native architecture.
- smollm2-135m: SmolLM2-135M's (llama: 30 layers, 9 heads over 3 key/value heads, width 576, SwiGLU 1536, RoPE,
  a vocabulary of 49,152, tied).
- gpt2-quick, smollm2-quick: the same at 2 layers, for a smoke test.

The weights are cllm's seeded init (tools/bench_generate.py's configs), written by cllm's Hugging Face export
(cllm.formats.hf.save_hf), which both engines load. The tokenizer is a byte-level BPE trained here on --text: it
stops short of the model's vocabulary (tinyshakespeare holds ~21,500 merges' worth), so its BPE vocabulary is
padded up to it with tokens that no merge makes (never encoded, but decodable), as the real models' tokenizers are
as large as their vocabularies. That matters: cllm's server takes a prompt token's log-softmax over the tokenizer's
vocabulary, transformers over the model's; and the padding is not added tokens, each of which slows the tokenizer's
decoding of a single token (the server writes every logprob's token as text), by 700 us at 28,700 of them.

The prompts: --prompts of them (64), each a window of the tokenized text of a length drawn uniformly from 64 to 160
tokens (seeded), whose last 1 to 32 tokens (drawn too, as an answer's) are the continuation and the rest the
context. As the harness does for both models, they are sorted by length, longest first (its Collator), and cut
into requests of --batch (8).

One fresh spawned process per engine per round: the imports, the load (timed: cllm the server's start, model
loaded and port bound; transformers from_pretrained), one untimed warm-up of the first (longest) batch, then
--repeats timed passes over all the prompts. --rounds rounds alternate the engines (every other round in the
reverse order). The table gives the medians of the pooled passes: prompts/s and scored tokens/s (a prompt's tokens
but its first, which nothing predicts), the ratio cllm / transformers, and the physical context: a pass's FLOPs,
counted the same for both engines over the positions that scoring needs (each prompt's tokens but its last): 2 x
the layers' weight matrices' parameters and 2 x the head's (vocabulary x width: its logits at every position) per
position, plus the attention's QK^T and PV over the causal pairs; GFLOP/s is those over the median pass, and "% of
its GEMM's peak" holds it against the engine's own float32 GEMM on one 2048^3 product (best of 5 calls, --threads
threads, a process of its own): cllm's sgemm, and torch.mm (MKL) for transformers.

Checks, before the table (correctness before speed): each prompt's logprobs from cllm's echo against transformers',
token by token: the sum over the prompt (every token but the first) and over the continuation (what the harness
sums) must agree within --tolerance (1e-3), else the run says FAILED and exits 1; the greedy flags are compared
too (a random model's logits are flat, so near-ties may part them: printed, not checked).

--profile runs, instead of the benchmark, one pass of cllm's side with its parts timed: the prefill's forward pass
(the layers), the head over every prompt position, the head on the last position, the per-position log-softmax
(Continuation.score_prompt: cllm.generate.token_logprobs, a kernel's log-sum-exp and the alternatives in numpy), the
token drawn, the response's choices written, the client's parse, and the rest (HTTP, JSON, the server's event
loop).

    python tools/bench_score.py                                 # gpt2-small, all CPUs (1.5 minutes on 2 cores)
    python tools/bench_score.py --shape smollm2-135m
    python tools/bench_score.py --shape gpt2-quick --prompts 16 --rounds 1     # a smoke test, under a minute
    python tools/bench_score.py --profile                       # where cllm's time goes
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

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
from bench_generate import CONFIGS as GENERATE_CONFIGS
from bench_generate import GenConfig
from check_gguf import DEFAULT_DATA

SEED = 1337
MIN_TOKENS, MAX_TOKENS = 64, 160  # a prompt's length: context + continuation
MAX_CONTINUATION = 32  # a continuation's length is drawn from 1 to this
HARNESS_SEED = 1234  # what lm-evaluation-harness sends as a request's seed
TOLERANCE = 1e-3  # |cllm - transformers| of a prompt's summed logprobs
PEAK_GEMM, PEAK_CALLS = 2048, 5  # m = k = n of the product that measures each engine's GEMM peak; calls timed
UNUSED = "unused{}"  # the tokens that pad the tokenizer to the model's vocabulary (byte-level text, as GPT-2's)


@dataclass(frozen=True)
class ScoreShape:
    """A model's shape: one of bench_generate's exported configs, maybe with fewer layers."""
    name: str
    config: GenConfig

    @property
    def q_dim(self) -> int:
        c = self.config
        return c.n_heads * (c.head_dim or c.dim // c.n_heads)

    @property
    def matrix_params(self) -> int:
        """The layers' weight matrices' parameters: q, k, v, the attention's output, and gate, up, down (llama) or
        fc, proj (gpt2)."""
        c = self.config
        if c.arch == "gpt2":
            return c.n_layers * 12 * c.dim * c.dim
        kv = (c.n_kv_heads or c.n_heads) * (c.head_dim or c.dim // c.n_heads)
        return c.n_layers * (c.dim * (self.q_dim + 2 * kv) + self.q_dim * c.dim + 3 * c.dim * c.intermediate_size)

    @property
    def head_params(self) -> int:
        return self.config.vocab * self.config.dim

    def flops(self, lengths: list[int]) -> float:
        """Scoring prompts of these lengths: each one's positions but the last through the layers and the head,
        and the attention's QK^T and PV over their causal pairs."""
        positions = [n - 1 for n in lengths]
        pairs = sum(n * (n + 1) // 2 for n in positions)
        return (2.0 * (self.matrix_params + self.head_params) * sum(positions)
                + 4.0 * self.config.n_layers * self.q_dim * pairs)

    def describe(self) -> str:
        return self.config.shape


SHAPES = {s.name: s for s in (
    ScoreShape("gpt2-small", GENERATE_CONFIGS["gpt2"]),
    ScoreShape("smollm2-135m", GENERATE_CONFIGS["smollm2"]),
    ScoreShape("gpt2-quick", dataclasses.replace(GENERATE_CONFIGS["gpt2"], n_layers=2)),
    ScoreShape("smollm2-quick", dataclasses.replace(GENERATE_CONFIGS["smollm2"], n_layers=2)),
)}
ENGINES = {"cllm": "cllm", "transformers": "transformers"}  # engine -> what must be installed (found, not imported)
GEMMS = {"cllm": "cllm", "transformers": "torch"}  # engine -> bench_gemm's engine of its GEMM


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # context + continuation
    context: int  # the context's length: the continuation is ids[context:]
    index: int  # in the order drawn


# --------------------------------------------------------------------------------------------- the folder


def make_folder(shape: ScoreShape, folder: str, text_file: str, count: int) -> tuple[list[Prompt], str]:
    """Writes the model folder (see the module's docstring) and draws the prompts; runs in its own process.
    Returns the prompts and a line describing them."""
    use_this_checkout()
    import json

    from cllm.formats.hf import save_hf
    from cllm.model import GPT
    from cllm.tokenizer import Tokenizer

    started = time.perf_counter()
    with open(text_file, encoding="utf-8") as f:
        corpus = f.read()
    cfg = shape.config
    trained = Tokenizer.train("bpe", corpus.splitlines(), vocab_size=cfg.vocab)
    # Padded in the BPE model's own vocabulary, which no merge reaches: as added tokens, each token's decoding
    # (what the server writes a logprob's token with) took 700 us instead of 3.
    doc = json.loads(trained.to_json())
    doc["hf"]["model"]["vocab"].update({UNUSED.format(i): i for i in range(trained.vocab_size, cfg.vocab)})
    tokenizer = Tokenizer.from_json(json.dumps(doc))
    if tokenizer.vocab_size != cfg.vocab:
        raise RuntimeError(f"the padded tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab}")
    model = GPT(cfg.model_config(), seed=SEED)
    size = sum(path.stat().st_size for path in save_hf(folder, model, tokenizer))

    ids = tokenizer.encode(corpus)
    rng = np.random.default_rng(SEED)
    prompts = []
    for index in range(count):
        length = int(rng.integers(MIN_TOKENS, MAX_TOKENS + 1))
        start = int(rng.integers(0, len(ids) - length))
        continuation = int(rng.integers(1, MAX_CONTINUATION + 1))
        prompts.append(Prompt([int(i) for i in ids[start:start + length]], length - continuation, index))
    lengths = [len(p.ids) for p in prompts]
    note = (f"folder: {shape.name} ({shape.describe()}), {model.num_params / 1e6:.1f}M parameters "
            f"({shape.matrix_params / 1e6:.1f}M in the layers' matrices, {shape.head_params / 1e6:.1f}M in the "
            f"head), seed {SEED}, float32, {size / 1e6:,.0f} MB; tokenizer: {trained.vocab_size:,} BPE tokens "
            f"trained on {os.path.basename(text_file)}, padded to {tokenizer.vocab_size:,}; {count} prompts of "
            f"{min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.1f} ({sum(lengths):,} in all), "
            f"continuations of {min(len(p.ids) - p.context for p in prompts)}-"
            f"{max(len(p.ids) - p.context for p in prompts)}; made in {time.perf_counter() - started:.0f} s")
    return prompts, note


def harness_batches(prompts: list[Prompt], batch: int) -> list[list[Prompt]]:
    """The prompts as lm-evaluation-harness batches them: longest first (ties by their tokens), cut into batches."""
    ordered = sorted(prompts, key=lambda p: (-len(p.ids), tuple(p.ids)))
    return [ordered[i:i + batch] for i in range(0, len(ordered), batch)]


# ---------------------------------------------------------------------------------------------- engines


@dataclass
class Scores:
    """What an engine made of each prompt: its tokens' logprobs (every token but the first) and whether its
    continuation is the greedy one."""
    logprobs: dict[int, np.ndarray] = field(default_factory=dict)  # prompt index -> (len - 1,)
    greedy: dict[int, bool] = field(default_factory=dict)


@dataclass
class Result:
    engine: str
    times: list[float]  # seconds per timed pass over all the prompts
    loads: list[float]
    scores: Scores
    runtime: str
    peak_rss_mb: float | None = None

    def pool(self, other: Result) -> None:
        self.times += other.times
        self.loads += other.loads
        self.peak_rss_mb = higher_peak(self.peak_rss_mb, other.peak_rss_mb)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    def summary(self, prompts: int) -> str:
        return (f"  {self.engine:12s} pass {self.median_s:7.2f} s ({prompts / self.median_s:6.2f} prompts/s; runs "
                f"{', '.join(f'{t:.2f}' for t in self.times)})  load {statistics.median(self.loads):.2f} s  peak RSS "
                f"{fmt(self.peak_rss_mb, '.0f')} MB  [{self.runtime}]")


def timed_passes(score, batches: list[list[Prompt]], repeats: int) -> tuple[list[float], Scores]:
    """One untimed call of score on the first (longest) batch, then repeats timed passes over all the batches:
    (seconds each, the last pass's scores). score(batch, scores) fills scores in."""
    score(batches[0], Scores())
    times = []
    for _ in range(repeats):
        scores = Scores()
        started = time.perf_counter()
        for batch in batches:
            score(batch, scores)
        times.append(time.perf_counter() - started)
    return times, scores


def harness_request(model_name: str, batch: list[Prompt]) -> dict:
    """lm-evaluation-harness's local-completions body for loglikelihood requests (its _create_payload)."""
    return {"model": model_name, "prompt": [p.ids for p in batch], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": HARNESS_SEED, "echo": True}


def read_choices(answer: dict, batch: list[Prompt], scores: Scores) -> None:
    """Each prompt's logprobs from an echoed completion, and its greedy flag as the harness reads it
    (parse_logprobs: token_logprobs[ctxlen:-1] against the max of each one's top_logprobs)."""
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    if len(choices) != len(batch):
        raise RuntimeError(f"{len(choices)} choices for {len(batch)} prompts")
    for choice, prompt in zip(choices, batch):
        logprobs = choice["logprobs"]
        token_logprobs, top = logprobs["token_logprobs"], logprobs["top_logprobs"]
        if len(token_logprobs) != len(prompt.ids) + 1:  # the prompt's tokens, then the one generated
            raise RuntimeError(f"{len(token_logprobs)} logprobs for a prompt of {len(prompt.ids)} tokens and one "
                               f"generated")
        scores.logprobs[prompt.index] = np.array(token_logprobs[1:-1], np.float64)
        scores.greedy[prompt.index] = all(t == max(alternatives.values()) for t, alternatives in
                                          zip(token_logprobs[prompt.context:-1], top[prompt.context:-1]))


def run_cllm(shape: ScoreShape, folder: str, batches: list[list[Prompt]], threads: int, repeats: int,
             attention_mask: bool) -> Result:
    import httpx

    from cllm.tools.serve import BackgroundServer

    name = os.path.basename(folder)  # cllm-serve's default model name: the path's stem
    started = time.perf_counter()
    with BackgroundServer(folder, model_name=name, threads=threads) as server:
        load = time.perf_counter() - started
        with httpx.Client(base_url=server.url, timeout=600) as http:
            def score(batch: list[Prompt], scores: Scores) -> None:
                answer = http.post("/v1/completions", json=harness_request(name, batch))
                answer.raise_for_status()
                read_choices(answer.json(), batch, scores)

            times, scores = timed_passes(score, batches, repeats)
            limits = http.get("/info").json()["engine"]["limits"]
    runtime = (f"cllm-serve, threads {limits['threads']}, max_streams {limits['max_streams']}, max_batch_tokens "
               f"{limits['max_batch_tokens']}; GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    return Result("cllm", times, [load], scores, runtime, peak_rss_mb())


def run_transformers(shape: ScoreShape, folder: str, batches: list[list[Prompt]], threads: int, repeats: int,
                     attention_mask: bool) -> Result:
    import torch

    torch.set_num_threads(threads)
    import torch.nn.functional as F
    import transformers

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load = time.perf_counter() - started

    def score(batch: list[Prompt], scores: Scores) -> None:
        # The harness's hf model: each prompt's tokens but its last, right-padded to the batch's longest
        inputs = [p.ids[:-1] for p in batch]
        padded = torch.zeros((len(batch), max(map(len, inputs))), dtype=torch.long)
        mask = torch.zeros_like(padded)
        targets = torch.zeros_like(padded)
        for row, (p, tokens) in enumerate(zip(batch, inputs)):
            padded[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
            targets[row, :len(tokens)] = torch.tensor(p.ids[1:])
        with torch.inference_mode():
            logits = model(padded, attention_mask=mask).logits if attention_mask else model(padded).logits
            logprobs = F.log_softmax(logits, dim=-1)
            gathered = torch.gather(logprobs, 2, targets.unsqueeze(-1)).squeeze(-1)
            for row, p in enumerate(batch):
                n = len(p.ids) - 1
                continuation = slice(p.context - 1, n)  # the positions that predict the continuation's tokens
                scores.greedy[p.index] = bool((logprobs[row, continuation].argmax(dim=-1)
                                               == targets[row, continuation]).all())
                scores.logprobs[p.index] = gathered[row, :n].double().numpy()

    times, scores = timed_passes(score, batches, repeats)
    runtime = (f"transformers {transformers.__version__}, torch {torch.__version__}, intra-op threads "
               f"{torch.get_num_threads()}, attention {getattr(model.config, '_attn_implementation', '?')}, "
               f"{'with' if attention_mask else 'no'} attention mask")
    return Result("transformers", times, [load], scores, runtime, peak_rss_mb())


def bench_engine(engine: str, shape: ScoreShape, folder: str, batches: list[list[Prompt]], threads: int,
                 repeats: int, attention_mask: bool) -> tuple[Result | None, str | None]:
    """One engine in this (fresh) process: load, warm up, time; (result, None) or (None, what went wrong)."""
    try:
        use_this_checkout()
        run = run_cllm if engine == "cllm" else run_transformers
        return run(shape, folder, batches, threads, repeats, attention_mask), None
    except Exception:  # noqa: BLE001 - reported by the parent; the other engine still runs
        return None, f"{engine} failed:\n{traceback.format_exc()}"


# ----------------------------------------------------------------------------------------------- the limit


def gemm_peak(engine: str, threads: int) -> tuple[float, str]:
    """An engine's GEMM on one PEAK_GEMM^3 float32 product, on `threads` threads: GFLOP/s of the best of
    PEAK_CALLS calls after a warm-up (a ceiling: a shared machine only ever lowers it), and what ran. Run it in a
    process of its own."""
    use_this_checkout()
    from bench_gemm import ENGINES as GEMM_ENGINES
    from bench_gemm import Gemm, operands, timed

    runner = GEMM_ENGINES[engine](None)
    runner.use_threads(threads)
    g = Gemm(PEAK_GEMM, PEAK_GEMM, PEAK_GEMM)
    a, b, _ = operands(g)
    call = runner.product(g, a, b, np.empty((g.m, g.n), np.float32))
    call()
    return g.flops / min(timed(call) for _ in range(PEAK_CALLS)) / 1e9, runner.about()


# ------------------------------------------------------------------------------------------------ profile


# The parts of cllm's side that --profile times
STEP = "decoding step (the model's work, in its thread)"
FORWARD = "prefill forward pass (the layers, GPT.forward_ws)"
HEAD_PROMPT = "head over every prompt position (GPT.head_logits)"
HEAD_LAST = "head on each prompt's last position"
LOG_SOFTMAX = "log-softmax per position (Continuation.score_prompt -> token_logprobs)"
DRAW = "drawing the one token (Continuation.advance)"
RESPONSE = "the response's choices (token texts, logprobs: ResponseForm.response)"
PARSE = "client: parsing the answer (httpx .json(), the harness's reading)"
STEP_REST = "the rest of the decoding step (copying the KV cache, Python)"
REST = "the rest (HTTP, the request's checks, JSON, the event loop)"


def profile_cllm(shape: ScoreShape, folder: str, batches: list[list[Prompt]], threads: int) -> str:
    """One pass of cllm's side after a warm-up, part by part; runs in its own process. Returns the report's lines.

    The server runs in this process (BackgroundServer's thread, its model calls on worker threads), so the parts
    are timed by wrapping the library's functions where the decoding step calls them."""
    use_this_checkout()
    import httpx

    from cllm.generate import Continuation
    from cllm.model import GPT
    from cllm.openai_format import ResponseForm
    from cllm.serving import AsyncModel
    from cllm.tools.serve import BackgroundServer

    calls: dict[str, int] = defaultdict(int)

    def counted(label):
        def name(*args):
            part = label(*args) if callable(label) else label
            calls[part] += 1
            return part
        return name

    def head(model, hidden, *rest):
        # Decoder.prefill_rows hands the head each prompt's positions as slices of its final norm's output, rows
        # one position apart; then the prompts' last positions, rows a prompt apart (or a copy of them).
        own_rows = hidden.base is not None and hidden.strides[0] == hidden.shape[1] * hidden.itemsize
        return HEAD_PROMPT if own_rows else HEAD_LAST

    targets = [(AsyncModel, "_decode_step", counted(STEP)),
               (GPT, "forward_ws", counted(FORWARD)),
               (GPT, "head_logits", counted(head)),
               (Continuation, "score_prompt", counted(LOG_SOFTMAX)),
               (Continuation, "advance", counted(DRAW)),
               (ResponseForm, "response", counted(RESPONSE))]
    name = os.path.basename(folder)
    with BackgroundServer(folder, model_name=name, threads=threads) as server, \
            httpx.Client(base_url=server.url, timeout=600) as http:
        def post(batch: list[Prompt]) -> httpx.Response:
            answer = http.post("/v1/completions", json=harness_request(name, batch))
            answer.raise_for_status()
            return answer

        post(batches[0])
        parse = 0.0
        with timed_calls(targets) as totals:
            started = time.perf_counter()
            for batch in batches:
                answer = post(batch)
                parsing = time.perf_counter()
                read_choices(answer.json(), batch, Scores())
                parse += time.perf_counter() - parsing
            wall = time.perf_counter() - started
    parts = dict(totals)
    inside = [FORWARD, HEAD_PROMPT, HEAD_LAST, LOG_SOFTMAX, DRAW]
    parts[STEP_REST] = parts[STEP] - sum(parts.get(p, 0.0) for p in inside)
    parts[PARSE] = parse
    parts[REST] = wall - parts[STEP] - parse - parts.get(RESPONSE, 0.0)
    prompts = sum(map(len, batches))
    positions = sum(len(p.ids) for batch in batches for p in batch)
    lines = [(f"cllm-serve scoring {prompts} prompts ({positions:,} prompt tokens) in {len(batches)} requests on "
              f"{threads} threads: {wall:.2f} s; the parts marked · are inside the decoding step"), "",
             "| part | s | share | calls |", "|---|---:|---:|---:|"]
    for part in [STEP, *inside, STEP_REST, RESPONSE, PARSE, REST]:
        seconds = parts.get(part, 0.0)
        indent = "· " if part in inside or part == STEP_REST else ""
        lines.append(f"| {indent}{part} | {seconds:.2f} | {seconds / wall:.1%} | {calls.get(part, '')} |")
    forward_flops = 2.0 * shape.matrix_params * positions
    head_flops = 2.0 * shape.head_params * (positions - prompts)
    lines += ["", (f"forward (layers) {forward_flops / parts[FORWARD] / 1e9:.1f} GFLOP/s (attention not counted); "
                   f"head over the prompt positions {head_flops / parts[HEAD_PROMPT] / 1e9:.1f} GFLOP/s; "
                   f"log-softmax {parts[LOG_SOFTMAX] / (positions - prompts) * 1e6:.0f} us per position over "
                   f"{shape.config.vocab:,} logits")]
    return "\n".join(lines)




# ------------------------------------------------------------------------------------------------- report


def check_agreement(results: dict[str, Result], prompts: list[Prompt], tolerance: float) -> bool:
    """Prints how cllm's logprobs agree with transformers' (per token, summed over each prompt and over each
    continuation, and the greedy flags); False if a sum parts by more than tolerance."""
    c, t = results.get("cllm"), results.get("transformers")
    if c is None or t is None:
        return True
    token = max(float(np.max(np.abs(c.scores.logprobs[p.index] - t.scores.logprobs[p.index]))) for p in prompts)
    whole = max(abs(c.scores.logprobs[p.index].sum() - t.scores.logprobs[p.index].sum()) for p in prompts)
    answer = max(abs(c.scores.logprobs[p.index][p.context - 1:].sum() - t.scores.logprobs[p.index][p.context - 1:]
                     .sum()) for p in prompts)
    greedy = sum(c.scores.greedy[p.index] == t.scores.greedy[p.index] for p in prompts)
    mean = statistics.mean(float(c.scores.logprobs[p.index].mean()) for p in prompts)
    print(f"  cllm vs transformers: max |difference| of a prompt's summed logprobs {whole:.2e} (every token but "
          f"the first), of a continuation's {answer:.2e} (what the harness sums), of one token's {token:.2e}; "
          f"greedy flags agree on {greedy} of {len(prompts)} ({sum(c.scores.greedy.values())} greedy for cllm); "
          f"mean token logprob {mean:.3f}")
    if max(whole, answer) > tolerance:
        print(f"  FAILED: cllm's logprobs part from transformers' by more than {tolerance:g}")
        return False
    return True


def markdown_table(results: dict[str, Result], shape: ScoreShape, prompts: list[Prompt],
                   peaks: dict[str, float | None]) -> str:
    lengths = [len(p.ids) for p in prompts]
    flops = shape.flops(lengths)
    scored = sum(lengths) - len(lengths)
    c = results.get("cllm")
    lines = [("| engine | prompts/s | scored tokens/s | cllm/engine | GFLOP/s | % of its GEMM's peak | load s "
              "| peak RSS MB |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for engine, r in results.items():
        gflops = flops / r.median_s / 1e9
        peak = peaks.get(engine)
        ratio = "" if c is None or r is c else f"**{r.median_s / c.median_s:.2f}**"
        lines.append(f"| {engine} | {len(prompts) / r.median_s:.2f} | {scored / r.median_s:,.0f} | {ratio} "
                     f"| {gflops:.1f} | {fmt(peak and 100 * gflops / peak, '.0f')} "
                     f"| {statistics.median(r.loads):.2f} | {fmt(r.peak_rss_mb, '.0f')} |")
    per_token = flops / scored
    lines += ["", (f"{shape.name} ({shape.describe()}): {len(prompts)} prompts, {scored:,} scored tokens; a pass is "
                   f"{flops / 1e12:.3f} TFLOP, {per_token / 1e6:.0f} MFLOP per position (2 x "
                   f"{shape.matrix_params / 1e6:.1f}M layer parameters + 2 x {shape.head_params / 1e6:.1f}M head, plus "
                   f"attention); GEMM peak "
                   f"{PEAK_GEMM}^3: cllm {fmt(peaks.get('cllm'), '.1f')}, torch (MKL) "
                   f"{fmt(peaks.get('transformers'), '.1f')} GFLOP/s")]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gpt2-small", choices=list(SHAPES),
                   help="the model's shape (gpt2-quick, smollm2-quick: 2 layers, for a smoke test)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--text", default=DEFAULT_DATA, help="the text the tokenizer is trained on and the prompts cut "
                                                        "from (default: tinyshakespeare.txt in shared/data beside "
                                                        "the repository)")
    p.add_argument("--prompts", type=int, default=64, help="how many prompts (default 64)")
    p.add_argument("--batch", type=int, default=8, help="prompts per request / forward pass (default 8, the "
                                                        "harness's batch_size)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help=f"threads for each engine (default: all the CPUs, {os.cpu_count()}; cllm-serve's own "
                        f"default is 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per engine and round (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the engines this many times (default 3)")
    p.add_argument("--attention-mask", action="store_true",
                   help="give transformers the padding's attention mask (the harness gives a causal model none)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"the largest |cllm - transformers| of a prompt's summed logprobs (default {TOLERANCE:g})")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, where cllm's side spends its time, part by part")
    args = p.parse_args(argv)
    args.shape = SHAPES[args.shape]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        p.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    if min(args.prompts, args.batch, args.threads, args.repeats, args.rounds) < 1:
        p.error("need --prompts, --batch, --threads, --repeats and --rounds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.exists(args.text):
        print(f"the text {args.text} is absent: give --text, a plain-text file (tinyshakespeare.txt is what the "
              f"README's figures use); nothing was benchmarked")
        return 1
    use_this_checkout()
    print(f"threads {args.threads} (of {os.cpu_count()} logical CPUs; cllm-serve's --threads default is 1), batch "
          f"{args.batch}, {args.prompts} prompts, repeats {args.repeats}, rounds {args.rounds}, python "
          f"{platform.python_version()}, numpy {np.__version__}")
    engines = []
    for engine in args.engines:
        if importlib.util.find_spec(ENGINES[engine]) is None:  # find, don't import
            print(f"{ENGINES[engine]} is not installed; skipping {engine}")
        else:
            engines.append(engine)
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)
    machine, _ = measure_machine(args.threads)
    print(machine, flush=True)
    peaks: dict[str, float | None] = {}
    for engine in [] if args.profile else engines:
        try:
            peaks[engine], about = in_fresh_process(gemm_peak, GEMMS[engine], args.threads)
            print(f"GEMM {PEAK_GEMM}^3 on {args.threads} threads for {engine}: {peaks[engine]:.1f} GFLOP/s (best of "
                  f"{PEAK_CALLS} calls; {about})", flush=True)
        except Exception as e:  # noqa: BLE001 - the table says n/a
            peaks[engine] = None
            print(f"{engine}'s GEMM peak could not be measured ({type(e).__name__}: {e})")

    start = machine_snapshot()
    with tempfile.TemporaryDirectory(prefix="cllm-bench-score-") as tmp:
        folder = os.path.join(tmp, args.shape.name)
        prompts, note = in_fresh_process(make_folder, args.shape, folder, args.text, args.prompts)
        print(note, flush=True)
        batches = harness_batches(prompts, args.batch)
        if args.profile:
            print(in_fresh_process(profile_cllm, args.shape, folder, batches, args.threads))
            return 0
        results: dict[str, Result] = alternating_rounds(
            engines, args.rounds,
            lambda engine: in_fresh_process(bench_engine, engine, args.shape, folder, batches, args.threads,
                                            args.repeats, args.attention_mask),
            lambda result: result.summary(len(prompts)))
    agree = check_agreement(results, prompts, args.tolerance)
    title = (f"Scoring {len(prompts)} prompts ({MIN_TOKENS}-{MAX_TOKENS} tokens) as lm-evaluation-harness does, "
             f"{args.batch} per request or forward pass, {args.threads} threads, median of {args.repeats} pass(es) "
             f"in each of {args.rounds} alternating rounds; cllm: cllm-serve's /v1/completions with echo and "
             f"logprobs over HTTP, transformers: one forward pass and log_softmax per batch in-process; cllm/engine "
             f"= cllm's prompts/s over the engine's; GFLOP/s = a pass's FLOPs over its time; % of its GEMM's peak: "
             f"that against the engine's own GEMM on one {PEAK_GEMM}^3 product")
    status = finish_report(start, results, title, lambda: markdown_table(results, args.shape, prompts, peaks))
    if not agree:
        print("\nFAILED: cllm's logprobs do not agree with transformers' (see above)")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())

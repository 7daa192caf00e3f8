"""Text generation: KV-cache decoding, sampling, and streaming text with stop strings.

    prompt -> tokens -> Decoder.prefill (one full forward pass, keys and values cached per layer)
           -> repeat: sample a token from the last logits -> Decoder.step (that one token through every layer)

Decoding a token costs one pass of a single position through the model instead of a full forward pass over
the whole sequence so far; the cached keys and values are exactly what the full pass computes, so the logits
agree with `GPT.logits` up to float32 rounding.

Context overflow: the model has learned positions for `context_length` tokens and no more, so nothing here
slides or truncates the window. A prompt longer than the context raises ValueError. Generation stops with
finish_reason "length" once the prompt plus the generated tokens fill the context (a prompt of exactly
context_length tokens therefore generates nothing), or after max_new_tokens. It stops with "stop" when the model
generates the separator token (the end of a document) or the text contains a stop string. An empty prompt
starts from the separator token, i.e. at the start of a new document.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from numbers import Integral, Real

import numpy as np

from ._kernels import decode, gelu, layernorm, linear
from .buffers import aligned_zeros, carve, carved_size
from .model import GPT, Workspace

# A byte-level BPE token can end inside a multi-byte UTF-8 character; until the next token completes it, that
# character decodes to U+FFFD.
REPLACEMENT_CHARACTER = "\ufffd"


# --------------------------------------------------------------------------------------------------------------
# KV-cache decoding


class Decoder:
    """A key/value cache for one model and a batch of sequences: prefill prompts, then decode one token per
    sequence per step.

    The cache and every per-step buffer are allocated once, here. The model's parameters are only read, so
    several decoders (each with its own buffers) may share one model, from different threads.
    """

    def __init__(self, model: GPT, batch: int = 1, *, threads: int | None = None):
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        cfg = model.config
        self.model, self.batch, self.threads = model, batch, threads or model.threads
        B, C, T = batch, cfg.dim, cfg.context_length
        shapes = {}
        for i in range(cfg.n_layers):
            shapes |= {f"k{i}": (B, T, C), f"v{i}": (B, T, C)}
        shapes |= {"x": (B, C), "position": (B, C), "mid": (B, C), "ln": (B, C), "mean": (B,), "rstd": (B,),
                   "qkv": (B, 3 * C), "q": (B, C), "atty": (B, C), "fc": (B, cfg.hidden_dim),
                   "fc_gelu": (B, cfg.hidden_dim), "logits": (B, cfg.vocab_size)}
        self.buffer = aligned_zeros(carved_size(shapes, pad=True))
        self.a = carve(self.buffer, shapes, pad=True)
        self.lengths = np.zeros(B, np.int32)  # cached positions per sequence
        self._positions = np.zeros(B, np.int32)  # where this step's tokens go
        self._rows = np.arange(B)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Starts every sequence afresh from its prompt (one token-id sequence per batch row, lengths may differ).

        Returns the logits (B, V) that predict each sequence's next token: a view into this decoder, valid until
        its next call.
        """
        cfg = self.model.config
        if len(prompts) != self.batch:
            raise ValueError(f"this decoder holds {self.batch} sequences, got {len(prompts)} prompts")
        prompts = [np.asarray(p) for p in prompts]
        for p in prompts:
            if p.ndim != 1 or not 1 <= p.size <= cfg.context_length:
                raise ValueError(f"a prompt must be 1 to {cfg.context_length} token ids, got shape {p.shape}")
            _check_ids(p, cfg.vocab_size)
        # Checked above, before anything is written: a bad prompt leaves the cache as it was.
        rows_by_length: dict[int, list[int]] = {}
        for row, p in enumerate(prompts):
            rows_by_length.setdefault(p.size, []).append(row)
        for rows in rows_by_length.values():
            self._prefill_rows(rows, np.stack([prompts[r] for r in rows]))
        return self.a["logits"]

    def _prefill_rows(self, rows: list[int], tokens: np.ndarray) -> None:
        """One full forward pass over equally long prompts; their keys and values are copied into the cache."""
        cfg, a = self.model.config, self.a
        n, T, C = len(rows), tokens.shape[1], cfg.dim
        # A workspace of our own, not model.workspace(): the model keeps those forever (one per shape, and
        # prompt lengths vary), and a training step or another decoder may be using them right now.
        ws = Workspace(cfg, n, T)
        self.model.forward_ws(ws, tokens, None, threads=self.threads)
        for i in range(cfg.n_layers):
            qkv = ws.a[f"qkv{i}"]  # (n, T, 3C): q | k | v
            a[f"k{i}"][rows, :T] = qkv[:, :, C:2 * C]
            a[f"v{i}"][rows, :T] = qkv[:, :, 2 * C:]
        a["logits"][rows] = ws.a["logits"].reshape(n, T, -1)[:, -1]
        self.lengths[rows] = T

    def step(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Appends one token to every sequence and returns the logits (B, V) that predict the token after it
        (a view into this decoder, valid until its next call)."""
        cfg, p, a, th = self.model.config, self.model.p, self.a, self.threads
        tokens = self._check_step(tokens)
        C, NH = cfg.dim, cfg.n_heads
        np.copyto(self._positions, self.lengths)
        x = a["x"]
        np.take(p["wte"], tokens, axis=0, out=x)
        np.take(p["wpe"], self._positions, axis=0, out=a["position"])
        x += a["position"]
        self.lengths += 1  # attention below covers the new token too
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            layernorm.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], a["ln"], a["mean"], a["rstd"],
                                        threads=th)
            qkv = a["qkv"]
            linear.linear_forward(a["ln"], p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"], qkv,
                                  threads=th)
            np.copyto(a["q"], qkv[:, :C])  # the kernel takes q as its own contiguous (B, C) array
            a[f"k{i}"][self._rows, self._positions] = qkv[:, C:2 * C]
            a[f"v{i}"][self._rows, self._positions] = qkv[:, 2 * C:]
            decode.attention_decode(a["q"], a[f"k{i}"], a[f"v{i}"], self.lengths, a["atty"], NH, threads=th)
            mid = a["mid"]
            linear.linear_forward(a["atty"], p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"], mid,
                                  threads=th)
            mid += x
            layernorm.layernorm_forward(mid, p[h + "ln_2.weight"], p[h + "ln_2.bias"], a["ln"], a["mean"],
                                        a["rstd"], threads=th)
            linear.linear_forward(a["ln"], p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"], a["fc"], threads=th)
            gelu.gelu_forward(a["fc"], a["fc_gelu"], threads=th)
            # x (the block's input) is no longer needed: the block's output takes its place.
            linear.linear_forward(a["fc_gelu"], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"], x,
                                  threads=th)
            x += mid
        layernorm.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], a["ln"], a["mean"], a["rstd"], threads=th)
        linear.linear_forward(a["ln"], p["wte"], None, a["logits"], w_transposed=True, threads=th)
        return a["logits"]

    def _check_step(self, tokens) -> np.ndarray:
        cfg = self.model.config
        tokens = np.asarray(tokens)
        if tokens.shape != (self.batch,):
            raise ValueError(f"step takes one token per sequence, shape ({self.batch},), got {tokens.shape}")
        _check_ids(tokens, cfg.vocab_size)
        if self.lengths.min() < 1:
            raise ValueError("step needs a prefill first")
        if self.lengths.max() >= cfg.context_length:
            raise ValueError(f"the context is full: a sequence already holds context_length="
                             f"{cfg.context_length} tokens")
        return tokens.astype(np.intp)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")


# --------------------------------------------------------------------------------------------------------------
# sampling


def sample_token(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> int:
    """One token id drawn from logits (V,).

    temperature 0 is greedy (the first maximum). Otherwise the draw is from softmax(logits / temperature),
    restricted first to the top_k most likely tokens (ties with the k-th are kept), then to the smallest set of
    most likely tokens whose probability reaches top_p. Either filter always keeps the most likely token, so
    top_k=1 or a tiny top_p is greedy.
    """
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        kth_largest = np.partition(z, z.size - top_k)[z.size - top_k]
        z[z < kth_largest] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # stable: among equals, the lowest id first, as argmax
        kept = np.searchsorted(np.cumsum(probs[order]), top_p) + 1  # the shortest prefix reaching top_p
        probs[order[kept:]] = 0.0
    # Inverse-CDF draw; side="right" never lands on a token of probability 0.
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), z.size - 1))


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raises ValueError for sampling settings that mean nothing."""
    if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, Integral) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


# --------------------------------------------------------------------------------------------------------------
# streaming text


class TextStream:
    """Turns generated token ids into text pieces that never change once handed out, and finds stop strings.

    Each piece is the newly settled end of decode(all ids so far). Two kinds of tail are held back until later
    tokens settle them: U+FFFD, which may be a multi-byte character cut in half, and any tail that could be the
    start of a stop string, so that a stop string is never half-emitted. Decoding the whole sequence each time
    (rather than token by token) is what lets a later token complete an earlier one's bytes; sequences are at
    most one context long, so the repeated work stays small.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything handed out so far
        self.stopped = False  # a stop string appeared; the text ends just before it

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it settles (often "", sometimes several characters)."""
        self.ids.append(token_id)
        decoded = self.tokenizer.decode(self.ids)
        stop_at = min((i for i in (decoded.find(s) for s in self.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self.stopped = True
            return self._settle(decoded[:stop_at])
        settled = decoded.rstrip(REPLACEMENT_CHARACTER)
        return self._settle(settled[:len(settled) - _stop_prefix_length(settled, self.stop)])

    def flush(self) -> str:
        """The held-back rest, once no more tokens will come (nothing after a stop string)."""
        return "" if self.stopped else self._settle(self.tokenizer.decode(self.ids))

    def _settle(self, settled: str) -> str:
        # A held-back tail is never a completed stop string, so `settled` extends what was handed out.
        piece = settled[len(self.text):]
        self.text += piece
        return piece


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of text that is the start (not the whole) of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


# --------------------------------------------------------------------------------------------------------------
# the generation API


class Generation(Iterator[str]):
    """One streaming generation: iterate it for text pieces as they are decoded.

    Afterwards, `text` is everything generated (the pieces joined), `finish_reason` is "stop" or "length"
    (None until the end), `prompt_ids` are the tokens the model was given and `token_ids` the tokens it
    generated, stop string included. Settings are checked and the prompt encoded when it is created; the model
    runs only while it is iterated.
    """

    def __init__(self, model: GPT, tokenizer, prompt: str, *, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | Iterable[str] = ()):
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        context = model.config.context_length
        ids = tokenizer.encode(prompt)
        if len(ids) == 0:
            ids = [tokenizer.separator_id]
        if len(ids) > context:
            raise ValueError(f"the prompt is {len(ids)} tokens long but the model's context holds only {context}")
        self.prompt_ids = [int(i) for i in ids]
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._pieces = self._run(model, tokenizer, max_new_tokens, stop, np.random.default_rng(seed),
                                 dict(temperature=temperature, top_k=top_k, top_p=top_p))

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece

    def _run(self, model, tokenizer, max_new_tokens, stop, rng, sampling) -> Iterator[str]:
        decoder = Decoder(model)
        stream = TextStream(tokenizer, stop)
        # Ids past the tokenizer's vocabulary (a model vocabulary padded for speed) can never be decoded.
        vocab = tokenizer.vocab_size
        budget = min(max_new_tokens, model.config.context_length - len(self.prompt_ids))
        finish_reason = "length"
        logits = decoder.prefill([self.prompt_ids])[0] if budget > 0 else None
        for n in range(budget):
            token = sample_token(logits[:vocab], rng, **sampling)
            if token == tokenizer.separator_id:
                finish_reason = "stop"
                break
            self.token_ids.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                finish_reason = "stop"
                break
            if n + 1 < budget:
                logits = decoder.step([token])[0]
        self.finish_reason = finish_reason
        tail = stream.flush()
        if tail:
            yield tail


def generate(model: GPT, tokenizer, prompt: str, *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | Iterable[str] = ()) -> Generation:
    """Streams the continuation of prompt as text pieces. See Generation, and the module notes on context."""
    return Generation(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, stop=stop)


def complete(model: GPT, tokenizer, prompt: str, *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | Iterable[str] = ()) -> tuple[str, str]:
    """The whole continuation at once: (text, finish_reason), finish_reason "stop" or "length"."""
    generation = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    for _ in generation:
        pass
    return generation.text, generation.finish_reason

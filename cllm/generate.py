"""Text generation: KV-cache decoding, sampling, and streaming text with stop strings.

    prompt -> tokens -> Decoder.prefill (one full forward pass, keys and values cached per layer; the prompt's
              own logprobs from the same pass, when asked: what scoring a text takes)
           -> repeat: Continuation.advance (sample a token from the last logits, settle its text, decide
              whether to end) -> Decoder.step (that one token through every layer), or, once the cache
              is full, a context shift (below)

A Continuation is one sequence's sampling and text, apart from the model; a Decoder holds a batch of rows that
can each be restarted or left idle, so one decoder can serve many continuations that join and leave it at
different times (continuous batching, cllm/serving.py).

Decoding a token costs one pass of a single position through the model instead of a full forward pass over
the whole sequence so far; the cached keys and values are exactly what the full pass computes, so the logits
agree with `GPT.logits` up to float32 rounding.

Context overflow: a context shift, as llama.cpp's, but by re-encoding. The model knows positions below
`context_length` and no others (GPT-2 has learned embeddings, wpe, for that many; llama's RoPE table covers that
many, the positions it was trained on). When a sequence's cache is full and another token is wanted, the window
slides: the most recent `context_shift_length(context_length)` tokens (half the context, `context_length // 2`,
at least 1) of prompt + generated so far, the token just drawn included, are kept and encoded again from
position 0 by a fresh prefill of that row alone (Decoder.prefill_rows: the other rows of a batch are
untouched), and decoding goes on from there. Nothing at the start is pinned (llama.cpp can keep its first n_keep
tokens): the window is the most recent tokens.

Why the cache is not simply shifted. GPT-2's cached keys and values were each computed from a token's embedding
plus the learned embedding of its absolute position, and nothing turns that into another position's. llama.cpp
shifts a RoPE cache by rotating its keys to their new positions, which is exact for the first layer only: every
later layer's keys and values were computed by attending to the tokens that are now dropped, so the rotated cache
is not what the model computes on the window. Re-encoding is: after a shift, the row holds exactly what a full
pass over the window computes, for both architectures. What this means for quality: from a shift on, the model
sees only the kept window (what came before is forgotten, the prompt too once it has slid out), and each shift
costs a prefill of context_length // 2 tokens. Shifts come every T - T // 2 + 1 generated tokens for a context of
T (the room the kept window leaves, plus the token that finds the cache full): 9 for T = 16. A generation thus
goes on until it stops or reaches max_new_tokens, whatever the context length.

A prompt longer than the context raises UsageError (it is never truncated); a prompt of exactly
context_length tokens is fine, its first new token comes with a shift. Generation ends with finish_reason
"length" after max_new_tokens, and with "stop" when the model generates the separator token (the end of a
document) or the text contains a stop string. An empty prompt starts from the separator token, i.e. at the
start of a new document.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import numpy as np

from ._kernels import crossentropy, decode, quantized
from .buffers import aligned_zeros, lazy_zeros
from .checks import require_int
from .errors import UsageError
from .model import GPT, ForwardWorkspaces
from .pooling import length_batches
from .threads import available_cpus, current_blas_limit

# A byte-level BPE token can end inside a multi-byte UTF-8 character; until the next token completes it, that
# character decodes to U+FFFD.
REPLACEMENT_CHARACTER = "\ufffd"

# Temperatures below this sample greedily, as temperature 0 does (vLLM draws the same line). Dividing logits by a
# smaller one overflows: 1e-310 turned every logit into inf and the softmax into NaN, which always drew the last
# token id. Down here the softmax is the argmax anyway, unless two logits are within about 1e-3 of each other.
GREEDY_TEMPERATURE = 1e-5
# Sampling's upper bounds, which the server's request schema (cllm.schemas) takes from here, so that a setting one
# refuses the other never takes. OpenAI's temperature and penalty ranges, and a repetition_penalty far past any
# useful value (1.1 to 1.3 are usual).
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty, from -MAX_PENALTY
MAX_REPETITION_PENALTY = 10.0
MAX_TOP_K = 2**31 - 1
# The logits a prefill computes at once when a prompt's are wanted (Decoder.prefill_rows): 64 MB, so that a long
# prompt never holds its length times the vocabulary, while a prompt an evaluation harness sends (a few hundred
# positions over GPT-2's vocabulary) goes through the head in one product, which reads the head's weights once.
PROMPT_LOGITS_FLOATS = 2**24
# Prompt tokens, padding included, that a prefill's forward pass may hold besides one full-context prompt
PREFILL_PASS_TOKENS = 4096


# --------------------------------------------------------------------------------------------------------------
# KV-cache decoding


class Decoder:
    """A key/value cache for one model and a batch of sequences: prefill prompts, then decode one token per
    sequence per step.

    Rows are independent: `prefill_rows` restarts some rows while the others keep their sequences, and `step`
    may advance only the active rows, so a server can let requests join and leave a running batch (continuous
    batching). A step computes only its active rows, so a lone sequence costs what it would in a batch of one.
    A row whose cache is full cannot step: `feed` then shifts its context with prefill_rows (module notes).

    The cache and every per-step buffer are allocated once, here. The model's parameters are only read, so
    several decoders (each with its own buffers) may share one model, from different threads.
    """

    def __init__(self, model: GPT, batch: int = 1, *, threads: int | None = None):
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        cfg = model.config
        self.model, self.batch, self.threads = model, batch, threads or model.threads
        B, T, KV = batch, cfg.context_length, cfg.kv_dim
        # Keys and values of the key/value heads only: with grouped-query attention, fewer than the query heads.
        # Memory for what is cached, not for the whole context: a page is committed when a position first fills it.
        self.k_cache = lazy_zeros(cfg.n_layers * B * T * KV).reshape(cfg.n_layers, B, T, KV)
        self.v_cache = lazy_zeros(self.k_cache.size).reshape(self.k_cache.shape)
        self._logits = aligned_zeros(B * cfg.vocab_size).reshape(B, cfg.vocab_size)
        self._scratch = aligned_zeros(decode.decode_step_scratch(
            B, dim=cfg.dim, q_dim=cfg.q_dim, qkv_dim=cfg.qkv_dim, up_dim=cfg.up_dim, hidden=cfg.hidden_dim,
            vocab=cfg.vocab_size))
        # Where decode_step finds each parameter in the model's flat buffer; ABSENT for those the model lacks
        # (the llama family's biases and wpe, a tied model's lm_head), which decode_step checks against the
        # architecture.
        offset = {name: (view.ctypes.data - model.params.ctypes.data) // view.itemsize
                  for name, view in model.p.items()}
        absent = decode.ABSENT
        self._layer_offsets = np.array([[offset.get(f"h.{i}.{name}", absent) for name in decode.LAYER_PARAMETERS]
                                        for i in range(cfg.n_layers)], np.intp)
        self._model_offsets = np.array([offset.get(name, absent) for name in decode.MODEL_PARAMETERS], np.intp)
        # The matrices held in blocks, in decode_step's order; None for those it reads from params.
        self._quantized = None if not model.q else quantized.MatrixTable(
            [model.q.get(f"h.{i}.{name}") for i in range(cfg.n_layers) for name in decode.QUANTIZED_LAYER_MATRICES]
            + [model.q.get(model.head), model.q.get("wte")])
        self.lengths = np.zeros(B, np.int32)  # cached positions per sequence
        self._prefill_workspaces = ForwardWorkspaces(cfg)
        self._all_rows = np.arange(B)
        self._cpus = available_cpus()  # BLAS's thread count when no limit is held

    @property
    def logits(self) -> np.ndarray:
        """(B, V): each row's logits from its latest prefill or step, predicting its next token (a view)."""
        return self._logits

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Starts every sequence afresh from its prompt (one token-id sequence per batch row, lengths may differ).

        Returns the logits (B, V) that predict each sequence's next token: a view into this decoder, valid until
        its next call.
        """
        if len(prompts) != self.batch:
            raise ValueError(f"this decoder holds {self.batch} sequences, got {len(prompts)} prompts")
        return self.prefill_rows(range(self.batch), prompts)

    def prefill_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], *,
                     prompt_logits: Mapping[int, Callable[[int, np.ndarray], None]] | None = None) -> np.ndarray:
        """Starts the given rows afresh from their prompts (lengths may differ); the other rows keep their
        sequences and logits.

        prompt_logits maps some of the rows to a function that takes the logits at every position of that row's
        prompt but the last (whose logits are the row's `logits`), from the same forward pass: it is called as
        f(start, logits) with the logits (n, V) of positions start to start + n - 1, in order, n at most
        PROMPT_LOGITS_FLOATS // V. A long prompt's logits at once would be its length times the vocabulary in
        floats, hundreds of megabytes or more.

        Returns the logits (B, V), a view into this decoder (see `logits`).
        """
        cfg = self.model.config
        rows = [int(r) for r in rows]
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(rows)} rows but {len(prompts)} prompts")
        if len(set(rows)) != len(rows) or not all(0 <= r < self.batch for r in rows):
            raise ValueError(f"rows must be distinct and in [0, {self.batch}), got {rows}")
        prompts = [np.asarray(p) for p in prompts]
        for p in prompts:
            if p.ndim != 1 or not 1 <= p.size <= cfg.context_length:
                raise ValueError(f"a prompt must be 1 to {cfg.context_length} token ids, got shape {p.shape}")
            _check_ids(p, cfg.vocab_size)
        # Checked above, before anything is written: a bad prompt leaves the cache as it was. Prompts of about the
        # same length share a forward pass (a batch of an evaluation harness's, or requests that came together),
        # as an embedding batch's texts do, each pass no larger than a full-context prompt's or PREFILL_PASS_TOKENS.
        max_tokens = max(cfg.context_length, PREFILL_PASS_TOKENS)
        for together in length_batches([p.size for p in prompts], max_tokens=max_tokens):
            self._prefill_pass([rows[i] for i in together], [prompts[i] for i in together], prompt_logits or {})
        return self._logits

    def _prefill_pass(self, rows: list[int], prompts: list[np.ndarray],
                      prompt_logits: Mapping[int, Callable[[int, np.ndarray], None]]) -> None:
        """One full forward pass over prompts padded on the right to the longest: causal attention keeps the
        padding out of every prompt position's result. Their keys and values are copied into the cache (a row's
        padding's too, past its length, where nothing reads them and decoding overwrites them), and the rows in
        prompt_logits get their prompts' logits (see prefill_rows)."""
        cfg = self.model.config
        lengths = np.array([p.size for p in prompts])
        n, T, C, Q, KV = len(rows), int(lengths.max()), cfg.dim, cfg.q_dim, cfg.kv_dim
        tokens = np.zeros((n, T), np.int32)
        for k, p in enumerate(prompts):
            tokens[k, :p.size] = p
        # Workspaces of our own, not model.workspace(): a training step or another decoder may be using that.
        # Their passes start at position 0 (ws.start), as a prefill does.
        ws = self._prefill_workspaces.get(n, T)

        def keys_values(layer: int, qkv: np.ndarray) -> None:  # (n, T, Q + 2 KV): q | k | v, q and k rotated
            self.k_cache[layer, rows, :T] = qkv[:, :, Q:Q + KV]
            self.v_cache[layer, rows, :T] = qkv[:, :, Q + KV:]

        self.model.forward_ws(ws, tokens, None, threads=self.threads, logits=False, keys_values=keys_values)
        hidden = ws.a["lnf"].reshape(n, T, C)
        block = max(1, PROMPT_LOGITS_FLOATS // cfg.vocab_size)
        for k, row in enumerate(rows):
            if row in prompt_logits:
                for start in range(0, lengths[k] - 1, block):
                    positions = hidden[k, start:min(start + block, lengths[k] - 1)]
                    logits = np.empty((len(positions), cfg.vocab_size), np.float32)
                    self.model.head_logits(positions, logits, self.threads)
                    prompt_logits[row](start, logits)
        # Otherwise only the last position's logits are wanted, so the head runs on those rows alone: with a real
        # vocabulary, the head over every position is a large part of the pass. A row whose prompt's logits were
        # wanted gets its last position's here too, so that its tokens are the same bits as without them.
        last_hidden = np.ascontiguousarray(hidden[np.arange(n), lengths - 1])
        logits = np.empty((n, cfg.vocab_size), np.float32)
        self.model.head_logits(last_hidden, logits, self.threads)
        self._logits[rows] = logits
        self.lengths[rows] = lengths

    def truncate(self, row: int, length: int) -> None:
        """Forgets row's positions from `length` on, keeping the first `length` (a conversation whose history
        changed after them goes on from there: cllm.session). Its logits are stale until its next step; a row cut
        to 0 needs a prefill."""
        if not 0 <= row < self.batch:
            raise ValueError(f"row must be in [0, {self.batch}), got {row}")
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} positions; cannot keep {length}")
        self.lengths[row] = length  # a step writes over the positions past it, and attends to none of them

    def step(self, tokens: Sequence[int] | np.ndarray, active: Sequence[bool] | np.ndarray | None = None
             ) -> np.ndarray:
        """Appends one token to every active sequence and returns the logits (B, V) (a view, see `logits`):
        the active rows now predict the token after the one appended.

        active is a boolean mask (B,), all rows by default. Inactive rows are left exactly as they were: their
        tokens are ignored, their lengths and logits do not change, and they may be empty or full.
        """
        cfg = self.model.config
        tokens, rows = self._check_step(tokens, active)
        # One nogil call for the whole model. On quantized weights it runs on as many threads as BLAS may use (it
        # takes BLAS's place), which share out its products and attention heads; on float32 weights its products
        # of one row run on BLAS's threads, of 2 to 16 rows on that many threads of a kernel of cllm's own.
        decode.decode_step(self.model.params, self._layer_offsets, self._model_offsets, cfg.n_heads,
                           cfg.hidden_dim, tokens, rows, self.lengths[rows].astype(np.intp), self.k_cache,
                           self.v_cache, self._scratch, self._logits, eps=cfg.norm_eps, exact_gelu=cfg.exact_gelu,
                           arch=cfg.arch, n_kv_heads=cfg.n_kv_heads, dim=cfg.dim, rope=self.model.rope,
                           quantized=self._quantized, threads=current_blas_limit() or self._cpus)
        self.lengths[rows] += 1
        return self._logits

    def _check_step(self, tokens, active) -> tuple[np.ndarray, np.ndarray]:
        """The active rows' tokens (as indices) and the active rows, once the step is known to be possible."""
        cfg = self.model.config
        tokens = np.asarray(tokens)
        if tokens.shape != (self.batch,):
            raise ValueError(f"step takes one token per sequence, shape ({self.batch},), got {tokens.shape}")
        if active is None:
            rows = self._all_rows
        else:
            active = np.asarray(active)
            if active.dtype != bool or active.shape != (self.batch,):
                raise ValueError(f"active must be a boolean mask of shape ({self.batch},), got {active.dtype} "
                                 f"{active.shape}")
            rows = np.flatnonzero(active)
            if rows.size == 0:
                raise ValueError("step needs at least one active sequence")
        tokens = tokens[rows]
        _check_ids(tokens, cfg.vocab_size)
        lengths = self.lengths[rows]
        if lengths.min() < 1:
            raise ValueError("step needs a prefill first")
        if lengths.max() >= cfg.context_length:
            raise ValueError(f"the context is full: a sequence already holds context_length="
                             f"{cfg.context_length} tokens")
        return tokens.astype(np.intp), rows


def context_shift_length(context_length: int) -> int:
    """The tokens a context shift keeps (the most recent ones): half the context, at least one."""
    return max(1, context_length // 2)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")


# --------------------------------------------------------------------------------------------------------------
# sampling


@dataclass(frozen=True)
class Sampling:
    """How a continuation draws each token from the model's logits, checked on creation (UsageError).

    In order: the penalties change the logits, then the draw is from softmax(logits / temperature), cut to the
    top_k most likely tokens (ties with the k-th kept), then to the smallest set of most likely tokens whose
    probability reaches top_p, then to the tokens at least min_p times as likely as the most likely one. Each cut
    keeps the most likely token, so top_k=1, a tiny top_p or min_p=1 is greedy. temperature 0, or any below
    GREEDY_TEMPERATURE (1e-5), is greedy: the first maximum of the penalized logits. temperature goes up to
    MAX_TEMPERATURE (2, as OpenAI's).

    The penalties, as Hugging Face and OpenAI define them: repetition_penalty divides the positive logits (and
    multiplies the negative ones) of every token in the prompt or generated so far, so that above 1 it discourages
    them (up to MAX_REPETITION_PENALTY, 10); frequency_penalty subtracts itself once per time a token was
    generated, and presence_penalty once for any token generated at all (both from -2 to 2; negative values
    encourage repetition).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        def number(name, low, high, *, low_open=False):
            value = getattr(self, name)  # every bound is finite, so NaN and the infinities fail the comparisons
            if not (isinstance(value, Real) and not isinstance(value, bool)
                    and (low < value if low_open else low <= value) and value <= high):
                raise UsageError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")

        number("temperature", 0.0, MAX_TEMPERATURE)
        require_int("top_k", self.top_k, maximum=MAX_TOP_K, optional=True)
        if self.top_p is not None:
            number("top_p", 0.0, 1.0, low_open=True)
        if self.min_p is not None:
            number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, MAX_REPETITION_PENALTY, low_open=True)
        number("frequency_penalty", -MAX_PENALTY, MAX_PENALTY)
        number("presence_penalty", -MAX_PENALTY, MAX_PENALTY)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def sample_token(logits: np.ndarray, rng: np.random.Generator, sampling: Sampling = Sampling()) -> int:
    """One token id drawn from logits (V,) as `sampling` says, the penalties aside (Continuation applies those,
    since they depend on what came before)."""
    if sampling.temperature < GREEDY_TEMPERATURE:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    ids = None  # the ids that z holds, when top_k cut it (else all of them, in order)
    top_k = sampling.top_k
    if top_k is not None and top_k < z.size:
        kth_largest = np.partition(z, z.size - top_k)[z.size - top_k]
        ids = np.flatnonzero(z >= kth_largest)
        z = z[ids]  # the rest of the vocabulary has probability 0: leave it out of everything below
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1.0:
        kept = _nucleus(probs, sampling.top_p)
        probs_kept = probs[kept]
        probs.fill(0.0)
        probs[kept] = probs_kept
    if sampling.min_p:
        probs[probs < sampling.min_p * probs.max()] = 0.0  # the most likely token always stays
    # Inverse-CDF draw; side="right" never lands on a token of probability 0.
    cdf = np.cumsum(probs)
    drawn = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), z.size - 1))
    return drawn if ids is None else int(ids[drawn])


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (its raw distribution, before penalties and temperature, as vLLM
    reports it by default), and the `top` most likely tokens with theirs, most likely first. A prompt's first token
    has neither (None): nothing before it predicts it."""
    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None


MAX_TOP_LOGPROBS = 20  # as OpenAI


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """token's log-probability under softmax(logits), with the top most likely tokens' (ties in id order)."""
    return token_logprobs(logits[np.newaxis], [token], top)[0]


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """token_logprob of each row of logits (n, V) and its token. A log-probability is the logit minus its row's
    log-sum-exp (a kernel's, summed in double), in float64: a prompt scored at every position over a real
    vocabulary makes no float64 copy of its logits, which cost more than the head's product that made them."""
    logits = np.ascontiguousarray(logits, np.float32)
    log_norms = np.empty(len(logits))
    crossentropy.log_normalizers(logits, log_norms)
    entries = []
    for row, token, log_norm in zip(logits, tokens, log_norms):
        best: tuple[tuple[int, float], ...] = ()
        if top == 1:  # the usual request (an evaluation harness's): argmax, the lowest id among equals
            best = ((int(row.argmax()), float(row.max()) - log_norm),)
        elif top:
            candidates = np.argpartition(-row, top - 1)[:top] if top < row.size else np.arange(row.size)
            ranked = candidates[np.lexsort((candidates, -row[candidates]))]
            best = tuple((int(i), float(row[i]) - log_norm) for i in ranked)
        entries.append(TokenLogprob(int(token), float(row[token]) - log_norm, best))
    return entries


def _nucleus(probs: np.ndarray, top_p: float, first: int = 256) -> np.ndarray:
    """The ids of the shortest run of most likely tokens whose probability reaches top_p, taken in descending
    order of probability and, among equals, ascending id (argmax's order).

    Sorting a 50,257-token vocabulary costs more than the rest of a decoding step's sampling, and the nucleus is
    almost always a few hundred tokens at most: sort only the tokens at least as likely as the `first`-th most
    likely (ties included, so their order is the full sort's), and widen that set only if it falls short.
    """
    n = probs.size
    count = min(first, n)
    while True:
        threshold = np.partition(probs, n - count)[n - count] if count < n else 0.0
        # Tokens of probability 0 (cut by top_k) are never needed: they add nothing to reach top_p.
        candidates = np.flatnonzero(probs >= threshold if threshold > 0 else probs > 0)  # in id order
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        kept = np.searchsorted(np.cumsum(probs[order]), top_p) + 1  # the shortest prefix reaching top_p
        if kept <= order.size or threshold == 0:  # reached, or every token that could count is in
            return order[:kept]
        count = min(n, count * 16)


def check_generation(*, max_new_tokens: int, seed: int | None, stop: str | Iterable[str],
                     logprobs: int | None = None, prompt_logprobs: int | None = None) -> tuple[str, ...]:
    """Raises UsageError for generation settings that mean nothing; returns the stop strings as a tuple."""
    require_int("max_new_tokens", max_new_tokens, minimum=0)
    require_int("seed", seed, minimum=0, optional=True)
    require_int("logprobs", logprobs, minimum=0, maximum=MAX_TOP_LOGPROBS, optional=True)
    require_int("prompt_logprobs", prompt_logprobs, minimum=0, maximum=MAX_TOP_LOGPROBS, optional=True)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise UsageError("stop strings must be non-empty strings")
    return stop


def token_ids(value, vocab_size: int, what: str) -> np.ndarray:
    """value as a 1-D int32 array of token ids below vocab_size (UsageError otherwise): ids a caller hands in
    instead of text, checked before any kernel sees them."""
    ids = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if ids is None or ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise UsageError(f"{what} must be a string or token ids, got {type(value).__name__}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise UsageError(f"{what} holds token ids outside [0, {vocab_size}): {ids.min()}..{ids.max()}")
    return ids.astype(np.int32)


# --------------------------------------------------------------------------------------------------------------
# streaming text


class TextStream:
    """Turns generated token ids into text pieces that never change once handed out, and finds stop strings.

    Each piece is the newly settled end of decode(all ids so far). Two kinds of tail are held back until later
    tokens settle them: U+FFFD, which may be a multi-byte character cut in half, and any tail that could be the
    start of a stop string, so that a stop string is never half-emitted. Decoding the whole sequence each time
    (rather than token by token) is what lets a later token complete an earlier one's bytes. The repeated work
    grows with the square of the length, which context shifts no longer bound (max_new_tokens does): a
    Hugging Face decode takes about 0.2 microseconds a token, so a token costs some 0.2 ms at 1,000 tokens
    and 2 ms at 10,000.
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
        return self._settle(settled[:len(settled) - partial_match_length(settled, self.stop)])

    def flush(self) -> str:
        """The held-back rest, once no more tokens will come (nothing after a stop string)."""
        return "" if self.stopped else self._settle(self.tokenizer.decode(self.ids))

    def _settle(self, settled: str) -> str:
        # A held-back tail is never a completed stop string, so `settled` extends what was handed out.
        piece = settled[len(self.text):]
        self.text += piece
        return piece


def partial_match_length(text: str, strings: Sequence[str]) -> int:
    """The length of the longest tail of text that is the start (not the whole) of one of strings: what a stream
    holds back until the next piece tells whether the string follows."""
    longest = 0
    for s in strings:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


# --------------------------------------------------------------------------------------------------------------
# the generation API


@dataclass(frozen=True)
class Completion:
    """A continuation once it has ended, as a value: what Model.generate and AsyncModel.generate return, and what
    each choice of a stream ends as. Here, beside what it holds, so that using one loads no serving engine."""
    text: str
    finish_reason: str  # "stop" (the separator, an end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # stop string included
    logprobs: list[TokenLogprob] | None = None  # one per completion token (and the end token), when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked for (the first's None)


class Continuation:
    """One continuation of a prompt, apart from the model that computes it.

    Settings are checked and the prompt encoded (unless it comes as token ids) on creation. Then each
    `advance(logits)` draws the next token, turns it into settled text and decides whether the continuation has
    ended (`finish_reason`). A Generation drives one with a decoder of its own; a server drives many, one per
    row of a shared decoder, and gets the very same tokens and text.

    `prompt_ids` are the tokens the model is given, `token_ids` the tokens generated (stop string included,
    separator not), `finish_reason` "stop" or "length" (max_new_tokens reached), None while it may go on, and
    `context_shifts` how many times its decoder row slid its window (see `shift_window` and the module notes).
    The separator ends a continuation, and so does any of `end_ids` (a chat's end-of-turn token); neither is part
    of token_ids or the text. `sampling` are Sampling's settings.

    With `logprobs` (0 to MAX_TOP_LOGPROBS), `logprobs` lists a TokenLogprob for each of token_ids, with that
    many alternatives, and last for the end token it drew, if it ended on one, as vLLM lists it: a client that
    scores a prompt by dropping the last entry, the generated token's (lm-evaluation-harness), would otherwise drop
    one of the prompt's. With `prompt_logprobs` (as many), `prompt_logprobs` lists one for each of prompt_ids once
    the prompt is prefilled (`prefill`, which scores it in the same forward pass; the first token's logprob and
    top are None), even with max_new_tokens=0: what scoring a text takes.
    """

    def __init__(self, tokenizer, prompt: str | Sequence[int], *, context_length: int, max_new_tokens: int = 256,
                 seed: int | None = None, stop: str | Iterable[str] = (), logprobs: int | None = None,
                 prompt_logprobs: int | None = None, end_ids: Iterable[int] = (), **sampling):
        self.sampling = Sampling(**sampling)
        stop = check_generation(max_new_tokens=max_new_tokens, seed=seed, stop=stop, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs)
        # Token ids are taken as they are: a server that has tokenized the prompt to count it need not again.
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else token_ids(prompt, tokenizer.vocab_size,
                                                                                 "the prompt")
        if len(ids) == 0:
            ids = [tokenizer.separator_id]
        if len(ids) > context_length:
            raise UsageError(f"the prompt is {len(ids)} tokens long but the model's context holds only "
                             f"{context_length}")
        self.prompt_ids = [int(i) for i in ids]
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.context_shifts = 0
        self.logprobs: list[TokenLogprob] | None = None if logprobs is None else []
        self._top_logprobs = logprobs
        self.prompt_logprobs: list[TokenLogprob] | None = (
            None if prompt_logprobs is None else [TokenLogprob(self.prompt_ids[0], None, None)])
        self._top_prompt_logprobs = prompt_logprobs
        self._context_length = context_length
        self._budget = max_new_tokens
        if self._budget == 0:
            self.finish_reason = "length"
        self._end_ids = {tokenizer.separator_id, *map(int, end_ids)}
        # Ids past the tokenizer's vocabulary (a model vocabulary padded for speed) can never be decoded.
        self._vocab_size = tokenizer.vocab_size
        self._text = TextStream(tokenizer, stop)
        self._rng = np.random.default_rng(seed)
        # For the penalties: the tokens seen so far (prompt and generated), and how often each was generated.
        self._seen = set(self.prompt_ids)
        self._generated: dict[int, int] = {}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_prefill(self) -> bool:
        """Whether, before it starts, it needs the model at all: it has tokens to draw, or its prompt to score."""
        return not self.finished or self.prompt_logprobs is not None

    def score_prompt(self, start: int, logits: np.ndarray) -> None:
        """Takes the logits (n, V) of prompt positions start to start + n - 1 (Decoder.prefill_rows' prompt_logits),
        which predict the prompt's tokens after them, into prompt_logprobs."""
        scored = slice(start + 1, start + 1 + len(logits))
        self.prompt_logprobs[scored] = token_logprobs(logits[:, :self._vocab_size], self.prompt_ids[scored],
                                                      self._top_prompt_logprobs)

    def advance(self, logits: np.ndarray) -> str:
        """Draws the next token from logits (V,), those predicting the token after prompt_ids + token_ids.

        Returns the text that token settles (often "", and once the continuation has ended, everything held
        back too). The model then needs token_ids[-1] appended, unless the continuation has finished.
        """
        if self.finished:
            raise RuntimeError(f"the continuation has finished ({self.finish_reason})")
        logits = logits[:self._vocab_size]
        token = sample_token(self._penalized(logits) if self.sampling.penalized else logits, self._rng,
                             self.sampling)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self._top_logprobs))
        if token in self._end_ids:
            self.finish_reason = "stop"
            return self._text.flush()
        self.token_ids.append(token)
        self._seen.add(token)
        self._generated[token] = self._generated.get(token, 0) + 1
        piece = self._text.push(token)
        if self._text.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) == self._budget:
            self.finish_reason = "length"
        return piece + self._text.flush() if self.finished else piece

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with Sampling's penalties applied (see Sampling)."""
        s = self.sampling
        logits = logits.copy()
        if s.repetition_penalty != 1.0:
            seen = np.fromiter(self._seen, np.intp, len(self._seen))
            scores = logits[seen]
            logits[seen] = np.where(scores > 0, scores / s.repetition_penalty, scores * s.repetition_penalty)
        if self._generated and (s.frequency_penalty or s.presence_penalty):
            ids = np.fromiter(self._generated, np.intp, len(self._generated))
            counts = np.fromiter(self._generated.values(), np.float32, len(self._generated))
            logits[ids] -= s.frequency_penalty * counts + s.presence_penalty
        return logits

    def shift_window(self) -> list[int]:
        """For a context shift, once the decoder row is full: the tokens to prefill the row with afresh, the
        last context_shift_length(context_length) of prompt_ids + token_ids (the token just drawn included).
        Counts the shift."""
        if self.finished:
            raise RuntimeError(f"the continuation has finished ({self.finish_reason})")
        keep = context_shift_length(self._context_length)
        self.context_shifts += 1
        return (self.prompt_ids[-keep:] + self.token_ids[-keep:])[-keep:]


def prefill(decoder: Decoder, continuations: Mapping[int, Continuation]) -> None:
    """Starts each named decoder row afresh from its continuation's prompt, so that decoder.logits[row] predict
    its first token; a continuation that asks for its prompt's logprobs gets them from the same forward pass."""
    decoder.prefill_rows(list(continuations), [c.prompt_ids for c in continuations.values()],
                         prompt_logits={row: c.score_prompt for row, c in continuations.items()
                                        if c.prompt_logprobs is not None})


def feed(decoder: Decoder, continuations: Mapping[int, Continuation]) -> None:
    """Gives each decoder row the token its continuation has just drawn, so that decoder.logits[row] predict
    the one after; rows of finished continuations, and rows not named, are left as they are.

    A row with room in its cache takes the token in one step (the rows together in one Decoder.step). A full
    row shifts its context instead (module notes): it is prefilled afresh with its continuation's
    shift_window(), which ends with that token, and the other rows do not see it happen.
    """
    context = decoder.model.config.context_length
    tokens = np.zeros(decoder.batch, np.int32)
    stepping = np.zeros(decoder.batch, bool)
    shifting = []
    for row, continuation in continuations.items():
        if continuation.finished:
            continue
        if decoder.lengths[row] >= context:
            shifting.append(row)
        else:
            tokens[row], stepping[row] = continuation.token_ids[-1], True
    if shifting:
        decoder.prefill_rows(shifting, [continuations[row].shift_window() for row in shifting])
    if stepping.any():
        decoder.step(tokens, active=stepping)


class Generation(Iterator[str]):
    """One streaming generation: iterate it for text pieces as they are decoded.

    Afterwards, `text` is everything generated (the pieces joined), `finish_reason` is "stop" or "length"
    (None while it may go on), `prompt_ids` are the tokens the model was given and `token_ids` the tokens it
    generated, stop string included, `context_shifts` how often the context was full and slid (module notes), and
    `logprobs` and `prompt_logprobs` Continuation's. Settings are checked and the prompt encoded when it is
    created; the model runs only while it is iterated.
    """

    def __init__(self, model: GPT, tokenizer, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
                 seed: int | None = None, stop: str | Iterable[str] = (), logprobs: int | None = None,
                 prompt_logprobs: int | None = None, end_ids: Iterable[int] = (), **sampling):
        self._continuation = Continuation(tokenizer, prompt, context_length=model.config.context_length,
                                          max_new_tokens=max_new_tokens, seed=seed, stop=stop, logprobs=logprobs,
                                          prompt_logprobs=prompt_logprobs, end_ids=end_ids, **sampling)
        self.text = ""
        self._pieces = self._run(model)

    @property
    def prompt_ids(self) -> list[int]:
        return self._continuation.prompt_ids

    @property
    def token_ids(self) -> list[int]:
        return self._continuation.token_ids

    @property
    def finish_reason(self) -> str | None:
        return self._continuation.finish_reason

    @property
    def context_shifts(self) -> int:
        return self._continuation.context_shifts

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self._continuation.logprobs

    @property
    def prompt_logprobs(self) -> list[TokenLogprob] | None:
        return self._continuation.prompt_logprobs

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece

    def _run(self, model: GPT) -> Iterator[str]:
        continuation = self._continuation
        if not continuation.needs_prefill:  # max_new_tokens=0
            return
        decoder = Decoder(model)
        prefill(decoder, {0: continuation})
        while not continuation.finished:
            piece = continuation.advance(decoder.logits[0])
            if piece:
                yield piece
            feed(decoder, {0: continuation})


def generate(model: GPT, tokenizer, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
             seed: int | None = None, stop: str | Iterable[str] = (), **settings) -> Generation:
    """Streams the continuation of prompt (text, or token ids) as text pieces. `settings` are Sampling's
    (temperature, top_k, top_p, min_p and the penalties) and Continuation's logprobs, prompt_logprobs and end_ids.
    See Generation, and the module notes on context."""
    return Generation(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed, stop=stop, **settings)


def complete(model: GPT, tokenizer, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
             seed: int | None = None, stop: str | Iterable[str] = (), **settings) -> tuple[str, str]:
    """The whole continuation at once: (text, finish_reason), finish_reason "stop" or "length"."""
    generation = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                          **settings)
    for _ in generation:
        pass
    return generation.text, generation.finish_reason

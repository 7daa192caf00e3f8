"""An interactive session: one conversation whose tokens stay in a KV cache from one turn to the next.

    session = Session(model, tokenizer, prompt="You are terse.", temperature=0)
    for piece in session.send("Hello!"):   # a Reply: iterate it for text pieces as they are decoded
        print(piece, end="")

Two modes. Chat (the tokenizer has a chat template, cllm.chat): the history is a list of messages, the prompt
(if any) its system message; each turn adds the user's message, and the reply, which ends at the template's
end-of-turn token (or the separator), is added as the assistant's. Plain (no template, or chat=False): the history
is one document, the prompt its start; each turn's text is appended to it as it is (no newline is added, and an
empty turn simply continues the document), and the reply continues it. A plain document that starts empty starts
with the separator token, as a new document does (cllm.generate).

The cache. A batch-1 Decoder holds the conversation's tokens (`tokens`, or its most recent window, see below).
Each turn the whole history is rendered and encoded again (chat: with the template, Tokenizer.encode_chat;
plain: Tokenizer.encode); when the cache holds a prefix of those ids, as it does when the re-encoded history
gives back the very tokens that were cached, only the ids past it are computed, one Decoder.step each, and the
reply goes on from there. When it does not (the model generated a tokenization of its reply that encoding the
text does not give back, or a special token, which in a message's text is text (cllm.chat); a stop string ended
the reply; a template trims what it is given), the row keeps the positions the two share (Decoder.truncate) and
computes the rest; with nothing shared, it is prefilled afresh. What a turn says is text too: a user who types a
template's markup ("<|im_start|>") cannot open a turn of their own.

Context. A reply that fills the context shifts it as generate() does (its most recent half is kept and encoded
again, cllm.generate). A turn whose conversation would leave less room for the reply than max_new_tokens (at most
half the context) starts afresh: the row is prefilled with the conversation's most recent tokens, half the context
of them, and the model sees nothing older from then on (`Reply.restarted` says so). Windows are cut at a token,
not at a message.

Interrupts. A KeyboardInterrupt (Ctrl-C) during a reply ends that reply where it stands: the text generated so
far is kept as the reply (and added to the history), and the session goes on. The cache cannot fall out of step
with `tokens`: every write to it is marked, and a write that did not finish its bookkeeping makes the next turn
prefill the row afresh from the conversation.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .chat import template_kwargs
from .errors import UsageError
from .generate import Continuation, Decoder, Sampling, check_generation, context_shift_length
from .model import GPT


class Reply(Iterator[str]):
    """One turn's reply: iterate it for text pieces as they are decoded. The model runs only while it is iterated;
    the turn enters the history when iteration starts.

    Afterwards `text` is the reply (what the pieces joined; for an interrupted reply, everything decoded so far),
    `finish_reason` "stop", "length" (max_new_tokens) or "interrupted" (the iteration ended early: a
    KeyboardInterrupt, or close()), `token_ids` the tokens generated, `context_shifts` how often the context filled
    during the reply, and `restarted` whether the conversation no longer fit and was cut to its recent window
    before the reply (see the module notes).
    """

    def __init__(self, pieces: Iterator[str] | None = None):
        self.text = ""
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.context_shifts = 0
        self.restarted = False
        self._pieces = pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Ends the reply where it stands (as an interrupt does)."""
        self._pieces.close()
        if self.finish_reason is None:  # closed before it started: the turn never entered the history
            self.finish_reason = "interrupted"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Session:
    """A conversation with one model whose tokens stay in a KV cache between turns (module notes).

    prompt: chat mode's system message (none if empty), or plain mode's start of the document. chat: the mode,
    chat if the tokenizer has a chat template unless False. chat_template_kwargs: chat mode's template arguments
    (cllm.chat: Qwen3's {"enable_thinking": False}). The other settings are each reply's, as generate() takes
    them: max_new_tokens, stop strings, Sampling's (temperature, top_k, top_p, min_p and the penalties), and seed,
    which turn i (from 0) uses as seed + i. They are checked here (UsageError).
    """

    def __init__(self, model: GPT, tokenizer, *, prompt: str = "", chat: bool | None = None,
                 chat_template_kwargs: dict | None = None, max_new_tokens: int = 256, seed: int | None = None,
                 stop: str | Iterable[str] = (), threads: int | None = None, **sampling):
        if chat is None:
            chat = tokenizer.chat_template is not None
        elif chat and tokenizer.chat_template is None:
            raise UsageError("this model has no chat template, so a session with it can only continue a document")
        if chat_template_kwargs is not None and not chat:
            raise UsageError("chat template arguments need a chat session, with a model that has a chat template")
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.chat_template_kwargs = template_kwargs(chat_template_kwargs)
        self.stop = check_generation(max_new_tokens=max_new_tokens, seed=seed, stop=stop)
        Sampling(**sampling)  # checked now, not at the first turn
        self.max_new_tokens, self.seed, self.sampling = max_new_tokens, seed, sampling
        self.prompt = prompt
        self.decoder = Decoder(model, 1, threads=threads)
        self.turns = 0
        self.messages: list[dict] = []
        self.document = ""
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation, back to the prompt alone; the cache is refilled at the next turn."""
        self._close_reply()
        self.messages = [{"role": "system", "content": self.prompt}] if self.chat and self.prompt else []
        self.document = "" if self.chat else self.prompt
        self._cached: list[int] = []  # what the decoder's row holds: the conversation's tokens from _offset on
        self._offset = 0
        self._dirty = False  # a write to the cache has not finished its bookkeeping: refill before use
        self._reply: Reply | None = None

    @property
    def tokens(self) -> list[int]:
        """The tokens the cache holds, in order: the conversation's, or its most recent window."""
        return list(self._cached)

    def conversation_ids(self, messages: Sequence[dict] | None = None, document: str | None = None) -> list[int]:
        """The conversation's token ids as this session encodes it: the messages (default: the history) with the
        prompt for the assistant's reply (chat), or the document (plain)."""
        if self.chat:
            return [int(i) for i in self.tokenizer.encode_chat(self.messages if messages is None else messages,
                                                               chat_template_kwargs=self.chat_template_kwargs)]
        document = self.document if document is None else document
        start = [] if self.prompt else [self.tokenizer.separator_id]
        return start + [int(i) for i in self.tokenizer.encode(document)] or [self.tokenizer.separator_id]

    def send(self, text: str) -> Reply:
        """The reply to a turn: the user's message (chat), or text appended to the document (plain). A reply
        still being iterated ends first, as if interrupted. Nothing happens until the reply is iterated."""
        if not isinstance(text, str):
            raise UsageError(f"a turn must be text, got {type(text).__name__}")
        self._close_reply()
        reply = Reply()
        reply._pieces = self._run(reply, text)
        self._reply = reply
        return reply

    def _close_reply(self) -> None:
        reply = getattr(self, "_reply", None)
        if reply is not None and not reply.finished:
            reply.close()

    def _run(self, reply: Reply, text: str) -> Iterator[str]:
        # The history takes the turn only once it is known to render (a template may refuse the messages).
        if self.chat:
            messages = self.messages + [{"role": "user", "content": text}]
            target = self.conversation_ids(messages)
            self.messages = messages
        else:
            document = self.document + text
            target = self.conversation_ids(document=document)
            self.document = document
        seed = None if self.seed is None else self.seed + self.turns
        self.turns += 1
        continuation = None
        try:
            reply.restarted = self._load(target)
            continuation = Continuation(self.tokenizer, self._cached, context_length=self._context,
                                        max_new_tokens=self.max_new_tokens, seed=seed, stop=self.stop,
                                        end_ids=self.tokenizer.end_of_turn_ids if self.chat else (), **self.sampling)
            while not continuation.finished:
                piece = continuation.advance(self.decoder.logits[0])
                if piece:
                    reply.text += piece
                    yield piece
                if continuation.finished:
                    break
                if len(self._cached) < self._context:
                    self._step(continuation.token_ids[-1])
                else:  # a context shift, as generate() makes: the window ends with the token just drawn
                    window = continuation.shift_window()
                    self._prefill(window, self._offset + len(self._cached) + 1 - len(window))
        finally:
            self._end(reply, continuation)

    def _end(self, reply: Reply, continuation: Continuation | None) -> None:
        """The reply enters the history, finished or not."""
        if continuation is not None:
            reply.token_ids = continuation.token_ids
            reply.context_shifts = continuation.context_shifts
        if continuation is not None and continuation.finished:
            reply.finish_reason = continuation.finish_reason
        else:
            # Everything decoded so far, the text a stop string might still have held back included; a character
            # cut in half by the interrupt is left out.
            reply.finish_reason = "interrupted"
            reply.text = self.tokenizer.decode(reply.token_ids).rstrip("\ufffd") if reply.token_ids else ""
        if self.chat:
            self.messages = self.messages + [{"role": "assistant", "content": reply.text}]
        else:
            self.document += reply.text

    # ----------------------------------------------------------------------------------------------------------
    # the cache

    @property
    def window(self) -> int:
        """The tokens a conversation that outgrew the context goes on from: the other half of the context is the
        reply's."""
        return max(1, self._context - context_shift_length(self._context))

    @property
    def _context(self) -> int:
        return self.model.config.context_length

    def _load(self, target: list[int]) -> bool:
        """Makes the cache hold the conversation `target` from self._offset on, computing only the ids it lacks
        when it holds a prefix of them, else keeping what they share; or, when the conversation would leave too
        little room for the reply, its most recent window. Returns whether it was cut to that window."""
        context, cached, offset = self._context, self._cached, self._offset
        if self._dirty or int(self.decoder.lengths[0]) != len(cached):
            cached = []  # an interrupted write: what the row holds is not known, so it is refilled
        room = min(self.max_new_tokens, context_shift_length(context))
        if offset < len(target) and len(target) - offset + room <= context:
            tail = target[offset:]
            same = next((i for i, (a, b) in enumerate(zip(cached, tail)) if a != b), min(len(cached), len(tail)))
            if same == len(tail) == len(cached):
                return False  # the cache holds it all already
            if same == 0:
                self._prefill(tail, offset)
                return False
            # Keep the positions the history still shares, and compute the rest: at least the last token, whose
            # logits predict the reply.
            keep = min(same, len(tail) - 1)
            self._dirty = True
            self.decoder.truncate(0, keep)
            del self._cached[keep:]
            self._dirty = False
            for token in tail[keep:]:
                self._step(token)
            return False
        keep = self.window
        self._prefill(target[-keep:], len(target) - min(keep, len(target)))
        return True

    def _step(self, token: int) -> None:
        self._dirty = True
        self.decoder.step([token])
        self._cached.append(int(token))
        self._dirty = False

    def _prefill(self, ids: Sequence[int], offset: int) -> None:
        self._dirty = True
        self.decoder.prefill_rows([0], [ids])
        self._cached = [int(i) for i in ids]
        self._offset = offset
        self._dirty = False

"""Generate text from a trained model, streamed to stdout as it is decoded.

    python -m cllm.tools.inference runs/default/model.cllm -p "def main(" -n 200 --temperature 0.8 --top-k 40
    python -m cllm.tools.inference MODEL -f prompt.txt --num-samples 3 --seed 1   # or -f - for standard input
    python -m cllm.tools.inference MODEL -i -p "You are terse."   # a conversation, turns typed at "> "

-i (--interactive) reads turns from standard input, one line each, after a "> " prompt, and streams each reply
(cllm.session: the conversation stays in the KV cache, each turn computes only its new tokens). With a chat
model (one with a chat template) a turn is the user's message and -p/-f the system message; otherwise a turn's
text is appended to the document as typed and continued, -p/-f the start of the document, and an empty line
continues it further. "/reset" forgets the conversation (the system message or starting text stays). Ctrl-C
during a reply stops that reply (what it said so far stays in the conversation); Ctrl-C or Ctrl-D (end of input)
at the prompt ends the session, with status 0. When the conversation outgrows the context, it goes on from its
most recent half-context of tokens, and a note on stderr says so. --chat-template-kwargs JSON gives a chat model's
template its own arguments, as transformers' apply_chat_template(**kwargs) takes them (Qwen3's
'{"enable_thinking": false}').

-n may exceed the model's context: when the context is full, the last half of it is kept and re-encoded (a
context shift, see cllm.generate), and generation goes on, seeing only that window from then on. A prompt
longer than the context is refused.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from ..checkpoint import load_model
from ..errors import UsageError
from ..generate import Sampling, generate
from ..session import Session
from ..threads import available_cpus, blas_limit
from ._cli import MODEL_HELP, Parser, positive_int, run

RESET = "/reset"


def sampling_setting(name: str):
    """An argparse type for one of Sampling's settings, checked by Sampling itself (its ranges are written once)."""
    def parse(text: str) -> float:
        value = float(text)
        try:
            Sampling(**{name: value})
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name} ")) from None
        return value
    parse.__name__ = "number"  # argparse's message for text that is no number: "invalid number value: 'x'"
    return parse


def json_object(text: str) -> dict:
    """An argparse type for a JSON object given on the command line."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"enable_thinking\": false}}', got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="inference",
               description="Generate text with a model (.cllm, GGUF, or a Hugging Face GPT-2, Llama or Qwen "
                           "folder).")
    p.add_argument("model", help=MODEL_HELP)
    source = p.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", default="", help="text to continue (default: start a new document)")
    source.add_argument("-f", "--file", metavar="FILE",
                        help="read the prompt from FILE (UTF-8), or from standard input if FILE is -")
    p.add_argument("-n", "--max-new", type=positive_int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=sampling_setting("temperature"), default=0.8,
                   help="0 (or below 1e-5) is greedy")
    p.add_argument("--top-k", type=positive_int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=sampling_setting("top_p"), help="sample from the smallest set holding this probability")
    p.add_argument("--min-p", type=sampling_setting("min_p"),
                   help="sample only from tokens at least this many times as likely as the most likely one, in [0, 1]")
    p.add_argument("--repetition-penalty", type=sampling_setting("repetition_penalty"), default=1.0,
                   help="above 1, discourages every token already in the prompt or the text (divides its logit)")
    p.add_argument("--frequency-penalty", type=sampling_setting("frequency_penalty"), default=0.0,
                   help="in [-2, 2], subtracted from a token's logit once per time it was generated")
    p.add_argument("--presence-penalty", type=sampling_setting("presence_penalty"), default=0.0,
                   help="in [-2, 2], subtracted from the logit of every token generated already")
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--threads", type=positive_int, default=available_cpus(),
                   help="threads, the whole budget (default: the CPUs this process may use)")
    p.add_argument("--num-samples", type=positive_int, default=1,
                   help="continuations of the prompt, one after another (with --seed, seeds S, S+1, ...)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="hold a conversation: read turns from standard input, a line each, and stream each "
                        "reply; -p/-f is then the system message (a chat model) or the start of the document; "
                        f"{RESET} forgets the conversation")
    p.add_argument("--chat-template-kwargs", type=json_object, metavar="JSON",
                   help="with -i and a chat model: arguments for its chat template, a JSON object "
                        "('{\"enable_thinking\": false}')")
    p.add_argument("-v", "--verbose", action="store_true", help="report tokens/s on stderr")
    args = p.parse_args(argv)
    if args.chat_template_kwargs is not None and not args.interactive:
        p.error("--chat-template-kwargs goes with -i, a chat model's conversation")
    if args.interactive and args.file == "-":
        p.error("-i reads its turns from standard input, so the prompt cannot come from there too (-f -)")
    if args.interactive and args.num_samples != 1:
        p.error("--num-samples does not go with -i")
    prompt = read_prompt(args.file) if args.file else args.prompt
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                    presence_penalty=args.presence_penalty)

    model, tokenizer = load_model(args.model, threads=args.threads)
    if args.interactive:
        session = Session(model, tokenizer, prompt=prompt, chat_template_kwargs=args.chat_template_kwargs,
                          max_new_tokens=args.max_new, seed=args.seed, stop=tuple(args.stop), **sampling)
        return converse(session, threads=args.threads, verbose=args.verbose)
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {sample + 1} of {args.num_samples}", flush=True)
        started = time.perf_counter()
        seed = None if args.seed is None else args.seed + sample
        generation = generate(model, tokenizer, prompt, max_new_tokens=args.max_new, seed=seed,
                              stop=tuple(args.stop), **sampling)
        sys.stdout.write(prompt)
        # BLAS would otherwise use every core whatever --threads says.
        with blas_limit(args.threads):
            for piece in generation:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if args.verbose:
            # Tokens, not pieces: a piece may hold several tokens' text, or a token none yet.
            tokens, seconds = len(generation.token_ids), time.perf_counter() - started
            shifts = generation.context_shifts
            print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s"
                  + (f" ({shifts} context shift{'s' * (shifts != 1)})" if shifts else ""), file=sys.stderr)
    return 0


def converse(session: Session, *, threads: int, verbose: bool = False) -> int:
    """The -i loop: a turn per line of standard input, each reply streamed to stdout. Returns 0 at the end of the
    input or on Ctrl-C at the prompt."""
    if sys.stdin.isatty():
        try:
            importlib.import_module("readline")  # line editing and history for input()
        except ImportError:
            pass
        mode = "chat" if session.chat else "a document to continue"
        print(f"{mode}; {RESET} forgets the conversation, Ctrl-C stops a reply, Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return 0
        if line.strip() == RESET:
            session.reset()
            print("(the conversation is forgotten)", file=sys.stderr)
            continue
        if session.chat and not line.strip():
            continue
        started, shown = time.perf_counter(), 0
        reply = session.send(line)
        try:
            with blas_limit(threads):
                for piece in reply:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    shown += len(piece)
        except KeyboardInterrupt:
            reply.close()
            sys.stdout.write(reply.text[shown:])  # what was held back, e.g. the start of a possible stop string
        sys.stdout.write("\n")
        sys.stdout.flush()
        if reply.restarted:
            print(f"(the conversation outgrew the context of {session.model.config.context_length} tokens: it "
                  f"went on from its last {session.window} tokens)", file=sys.stderr)
        if reply.finish_reason == "interrupted":
            print("(interrupted)", file=sys.stderr)
        if verbose:
            tokens, seconds = len(reply.token_ids), time.perf_counter() - started
            shifts = reply.context_shifts
            print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s"
                  + (f" ({shifts} context shift{'s' * (shifts != 1)})" if shifts else ""), file=sys.stderr)


def read_prompt(path: str) -> str:
    """The prompt in a UTF-8 file, or on standard input for "-"."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"the prompt in {'standard input' if path == '-' else path} is not UTF-8 text ({e.reason} "
                         f"at byte {e.start})") from None


if __name__ == "__main__":
    run("inference", lambda: main(sys.argv[1:]))

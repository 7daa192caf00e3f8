"""Generate text from a trained model, streamed to stdout as it is decoded.

    python -m cllm.tools.inference runs/default/model.cllm -p "def main(" -n 200 --temperature 0.8 --top-k 40
    python -m cllm.tools.inference MODEL -f prompt.txt --num-samples 3 --seed 1   # or -f - for standard input

-n may exceed the model's context: when the context is full, the last half of it is kept and re-encoded (a
context shift, see cllm.generate), and generation goes on, seeing only that window from then on. A prompt
longer than the context is refused.
"""
from __future__ import annotations

import sys
import time

from ..checkpoint import load_model
from ..errors import UsageError
from ..generate import generate
from ..threads import available_cpus, blas_limit
from ._cli import Parser, non_negative_float, positive_int, run


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="inference",
               description="Generate text with a model (.cllm, or a Hugging Face GPT-2 or Llama folder).")
    p.add_argument("model", help="a .cllm model file or a Hugging Face GPT-2 or Llama folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", default="", help="text to continue (default: start a new document)")
    source.add_argument("-f", "--file", metavar="FILE",
                        help="read the prompt from FILE (UTF-8), or from standard input if FILE is -")
    p.add_argument("-n", "--max-new", type=positive_int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 (or below 1e-5) is greedy")
    p.add_argument("--top-k", type=positive_int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=probability, help="sample from the smallest set holding this probability")
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--threads", type=positive_int, default=available_cpus(),
                   help="threads for BLAS, the whole budget (default: the CPUs this process may use)")
    p.add_argument("--num-samples", type=positive_int, default=1,
                   help="continuations of the prompt, one after another (with --seed, seeds S, S+1, ...)")
    p.add_argument("-v", "--verbose", action="store_true", help="report tokens/s on stderr")
    args = p.parse_args(argv)
    prompt = read_prompt(args.file) if args.file else args.prompt

    # The kernels' own OpenMP loops stay on one thread: the prefill's attention calls BLAS inside its loop, and
    # BLAS has the thread budget (below), so threads of each would make threads² (as in cllm.serving).
    model, tokenizer = load_model(args.model, threads=1)
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {sample + 1} of {args.num_samples}", flush=True)
        started = time.perf_counter()
        seed = None if args.seed is None else args.seed + sample
        generation = generate(model, tokenizer, prompt, max_new_tokens=args.max_new, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=seed, stop=tuple(args.stop))
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

"""Perplexity on the same GGUF file, per type: cllm's against llama.cpp's own `llama-perplexity` (issue 22's quality
criterion: within 0.5%).

    python tools/bench_perplexity.py                             # gpt2 and smollm2; f32, q8_0, q4_0, q4_k_m
    python tools/bench_perplexity.py --models smollm2 --types q4_k_m --work /tmp/ppl   # keeps the files; a rerun
                                                                                     # reuses them
    python tools/bench_perplexity.py --model mine=SmolLM2-135M-f32.gguf                # your own weights

The text is tinyshakespeare (--data; by default ../shared/data/tinyshakespeare.txt beside the repository, which is
read, never copied): its first 90% trains the models, its last 10% is the held-out text. The models are
tools/check_gguf.py's "trained" weights: GPT-2 small's and SmolLM2-135M's shapes, cllm's seeded init trained
--steps AdamW steps on the training text with a byte-level BPE tokenizer of 4,096 tokens trained on it too, so that
their perplexity is a language model's (a few hundred), not a random one's; exported by cllm as an f32 GGUF file
(`cllm-convert`), and quantized from it by llama.cpp's own `llama-quantize` to each of --types. --model NAME=PATH
takes other weights instead (a .cllm file, a Hugging Face folder, or an f32/f16 GGUF file, quantized as it is).

On each file, in turn (which goes first alternates from file to file), each with --threads threads:

    cllm        cllm.checkpoint.load_model(file), then the perplexity computed as llama-perplexity computes it
                (tools/check_gguf.llama_perplexity_way: the text tokenized whole, --ppl-chunks chunks of --ppl-ctx
                tokens from a fresh context each, the second half of each chunk's predictions scored)
    llama.cpp   llama-perplexity -m file -f held-out.txt -c CTX -b CTX --chunks N, its f32 KV cache (cllm keeps
                float32 keys and values too)

The table gives both perplexities, their relative difference and whether it is within 0.5%, and each engine's
seconds (loading and evaluating; llama-perplexity's process as a whole).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback

from bench_common import available_llama_cpp_tools, cpu_description, fmt, in_fresh_process, use_this_checkout
from check_gguf import (DEFAULT_DATA, PPL_TOLERANCE, QUANT_TYPES, SHAPES, Training, export_f32, gguf_bos,
                        llama_perplexity_way, make_model, quantize, run_llama_perplexity, split_text, tensor_types)

F32 = "f32"
DEFAULT_TYPES = (F32, "q8_0", "q4_0", "q4_k_m")
TRAINING = Training(steps=30, batch=8, seq=64, lr=3e-3, vocab=4096)  # check_gguf's defaults


def cllm_perplexity(path: str, data: str, ctx: int, chunks: int, threads: int) -> tuple[float, int, float]:
    """cllm's perplexity of data's held-out text on the file, as llama-perplexity computes it: (perplexity, tokens
    scored, seconds of loading and evaluating). Runs in a process of its own."""
    from cllm.checkpoint import load_model
    from cllm.threads import blas_limit

    started = time.perf_counter()
    model, tokenizer = load_model(path, threads=threads)
    ids = tokenizer.encode(split_text(data)[1])
    with blas_limit(threads):
        ppl, scored = llama_perplexity_way(model, ids, ctx, chunks, gguf_bos(path))
    return ppl, scored, time.perf_counter() - started


def perplexities(name: str, gguf_type: str, path: str, args, tool: str, held_out: str, cllm_first: bool) -> dict:
    """{"cllm": cllm_perplexity's figures, "llama": (perplexity, seconds)} on the file, each engine in turn; an
    engine that fails is reported and left out."""
    figures = {}

    def cllm():
        figures["cllm"] = in_fresh_process(cllm_perplexity, path, args.data, args.ppl_ctx, args.ppl_chunks,
                                           args.threads)

    def llama():
        started = time.perf_counter()
        ppl = run_llama_perplexity(tool, path, held_out, args.ppl_ctx, args.ppl_chunks, args.threads)
        figures["llama"] = ppl, time.perf_counter() - started

    for engine in ((cllm, llama) if cllm_first else (llama, cllm)):
        try:
            engine()
        except Exception:  # noqa: BLE001 - reported; the other engine still runs
            print(f"{engine.__name__} failed on {name} {gguf_type}:\n{traceback.format_exc()}")
    return figures


def model_files(name: str, args, tools: dict, work: str) -> dict[str, str]:
    """type -> file for model name: made (or reused from --work, or given), exported f32, quantized."""
    stem = os.path.join(work, f"{name}-trained")
    given = args.model.get(name)
    f32 = given if given and given.endswith(".gguf") else f"{stem}-f32.gguf"
    if not os.path.exists(f32):
        source = given or f"{stem}.cllm"
        if not os.path.exists(source):
            training = dataclasses.replace(TRAINING, steps=args.steps)
            what = in_fresh_process(make_model, SHAPES[name], "trained", args.data, source, training, args.threads)
            print(f"{name}: {what}", flush=True)
        export_f32(source, f32)
    files = {}
    for gguf_type in args.types:
        files[gguf_type] = f32 if gguf_type == F32 else f"{stem}-{gguf_type}.gguf"
        if not os.path.exists(files[gguf_type]):
            quantize(tools["llama-quantize"], f32, files[gguf_type], QUANT_TYPES[gguf_type])
    return files


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/bench_perplexity.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,smollm2", help=f"comma-separated subset of {','.join(SHAPES)} "
                                                            f"(default: %(default)s)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES),
                   help=f"comma-separated subset of {','.join((F32, *QUANT_TYPES))} (default: %(default)s)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="these weights for model NAME instead of training them; repeatable")
    p.add_argument("--data", default=DEFAULT_DATA, help="the text (default: tinyshakespeare.txt in shared/data "
                                                        "beside the repository)")
    p.add_argument("--work", help="folder for the models and files, kept and reused (default: a temporary one)")
    p.add_argument("--steps", type=int, default=TRAINING.steps, help="AdamW steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (default: %(default)s)")
    p.add_argument("--ppl-ctx", type=int, default=256, help="tokens per chunk (default: %(default)s)")
    p.add_argument("--ppl-chunks", type=int, default=16, help="chunks scored (default: %(default)s)")
    p.add_argument("--llama-cpp-bin", help="the folder of llama.cpp's llama-quantize and llama-perplexity")
    args = p.parse_args(argv)
    given = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.exists(path):
            p.error(f"--model {spec!r}: give NAME=PATH with an existing PATH")
        given[name] = path
    args.model = given
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if any(n not in SHAPES for n in names):
        p.error(f"--models: choose from {','.join(SHAPES)}")
    args.names = list(dict.fromkeys(([] if given and args.models == p.get_default("models") else names)
                                    + list(given)))
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if not args.types or any(t != F32 and t not in QUANT_TYPES for t in args.types):
        p.error(f"--types: choose from {','.join((F32, *QUANT_TYPES))}")
    for flag in ("steps", "threads", "ppl_chunks"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.ppl_ctx < 4:
        p.error("--ppl-ctx must be at least 4")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.exists(args.data):
        print(f"the held-out text {args.data} is absent: give --data, a text file (tinyshakespeare.txt is what the "
              f"README's figures use)")
        return 1
    use_this_checkout()
    tools = available_llama_cpp_tools(["llama-quantize", "llama-perplexity"], bin_dir=args.llama_cpp_bin,
                                      threads=args.threads)
    if tools is None:
        return 1
    work = args.work or tempfile.mkdtemp(prefix="cllm-bench-perplexity-")
    os.makedirs(work, exist_ok=True)
    held_out = os.path.join(work, "held_out.txt")
    with open(held_out, "w", encoding="utf-8") as f:
        f.write(split_text(args.data)[1])
    lines = [("| model | type | file MB | tensors | perplexity cllm | perplexity llama.cpp | difference | within "
              f"{100 * PPL_TOLERANCE:g}% | cllm s | llama-perplexity s |"),
             "|---|---|---:|---|---:|---:|---:|---|---:|---:|"]
    ok = True
    try:
        turn = 0
        for name in args.names:
            try:
                files = model_files(name, args, tools, work)
            except Exception:  # noqa: BLE001 - reported; the other models still run
                print(f"{name}: making its files failed:\n{traceback.format_exc()}")
                ok = False
                continue
            for gguf_type, path in files.items():
                figures = perplexities(name, gguf_type, path, args, tools["llama-perplexity"], held_out,
                                       cllm_first=turn % 2 == 0)
                turn += 1
                c, l = figures.get("cllm"), figures.get("llama")
                diff = abs(c[0] - l[0]) / l[0] if c and l else None
                ok &= diff is not None and diff <= PPL_TOLERANCE
                print(f"{name} {gguf_type}: cllm {fmt(c and c[0], '.3f')}, llama.cpp {fmt(l and l[0], '.3f')}",
                      flush=True)
                lines.append(f"| {name} | {gguf_type} | {os.path.getsize(path) / 1e6:,.0f} | {tensor_types(path)} "
                             f"| {fmt(c and c[0], '.3f')} | {fmt(l and l[0], '.3f')} "
                             f"| {fmt(None if diff is None else 100 * diff, '.3f')}% "
                             f"| {'yes' if diff is not None and diff <= PPL_TOLERANCE else 'NO'} "
                             f"| {fmt(c and c[2], '.1f')} | {fmt(l and l[1], '.1f')} |")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nCPU: {cpu_description()}; threads {args.threads}. Held-out text: the last 10% of "
          f"{os.path.basename(args.data)}, {args.ppl_chunks} chunks of {args.ppl_ctx} tokens, the second half of "
          f"each scored\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

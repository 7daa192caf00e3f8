"""cllm's own quantizer against llama.cpp's (issue 22): the same f32 GGUF file quantized by llama.cpp's
`llama-quantize` and by cllm (cllm.formats.quantize), tensor by tensor and block by block.

A check to run by hand, never a test in CI: it needs llama.cpp's llama-quantize, found (--llama-cpp-bin,
$LLAMA_CPP_BIN, PATH) or built outside the repository as tools/check_gguf.py's notes say (bench_common).

    python tools/check_quantize.py                          # every check_gguf shape (gpt2, smollm2, qwen2.5,
                                                            # qwen3), random weights
    python tools/check_quantize.py --models qwen2.5,qwen3 --types q8_0,q4_0,q4_k_m   # about 15 minutes
    python tools/check_quantize.py --models smollm2 --types q4_k_m --weights trained
    python tools/check_quantize.py --work /tmp/quantize-check   # keeps the files; a rerun reuses them

The models are tools/check_gguf.py's (its SHAPES and weights: cllm's seeded init, "random" with every block matrix
x2, or "trained" a few dozen AdamW steps on --data), saved as .cllm, exported f32 by `cllm-convert`, and quantized by
`llama-quantize` (no importance matrix, as cllm has none) to each of --types: Q8_0, Q4_0, Q4_K_M. For each file:

- every tensor's type as llama.cpp chose it against cllm's rule (`tensor_type`, llama_tensor_get_type's);
- every tensor quantized by cllm's `quantize` from the same f32 values (the f32 file's, in its GGML layout) to the
  type llama.cpp chose: the share of blocks that are the same bytes, and the largest difference between the two
  dequantized (gguf.quants.dequantize), as a share of the tensor's largest magnitude;
- the file cllm's own exporter writes (`save_gguf`, as `cllm-convert --quantize` does), tensor for tensor against
  llama-quantize's: how many are the same bytes.

With --perplexity, also what quantizing costs: cllm's perplexity on the held-out text (the last 10% of --data,
computed as llama-perplexity computes it, tools/check_gguf.py's llama_perplexity_way) of the float32 model and of
`cllm-convert --quantize TYPE`'s .cllm file, run on its blocks by cllm's quantized kernels. Telling on the trained
weights only (the random ones' perplexity is a random function's).

The check fails (exit status 1) on any type that differs from llama.cpp's or any block that is not identical.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bench_common import LLAMA_CPP_HOME, cpu_description, in_fresh_process, llama_cpp_tools, use_this_checkout
from check_gguf import (DEFAULT_DATA, SHAPES, Training, export_f32, llama_perplexity_way, make_model, quantize,
                        split_text)

TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}  # cllm's file types and llama-quantize's names
WEIGHTS = ("random", "trained")


@dataclass
class Comparison:
    """One llama-quantize file against cllm's quantizer on the same f32 tensors."""
    tensors: int = 0
    type_differs: list[str] = field(default_factory=list)  # "name: llama.cpp's TYPE, cllm's TYPE"
    blocks: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # type: same, all
    worst: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # type: max |diff| / max |x|
    exported_same: int = 0  # tensors of cllm's own export that are llama-quantize's bytes
    seconds: float = 0.0
    perplexity: tuple[float, float] | None = None  # cllm's, float32 and quantized


def compare(f32_path: str, llama_path: str, ours_path: str, file_type: str) -> Comparison:
    """llama_path (llama-quantize's file_type of f32_path) against cllm's quantizer and cllm's export ours_path."""
    import gguf

    from cllm.formats.quantize import quantize as cllm_quantize
    from cllm.formats.quantize import tensor_type

    started = time.perf_counter()
    source = gguf.GGUFReader(f32_path)
    values = {t.name: t for t in source.tensors}
    arch = source.fields["general.architecture"].contents()
    n_layers = int(source.fields[f"{arch}.block_count"].contents())
    tied = "output.weight" not in values
    exported = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    result = Comparison()
    for theirs in gguf.GGUFReader(llama_path).tensors:
        result.tensors += 1
        x = np.asarray(values[theirs.name].data, np.float32)
        shape = tuple(int(n) for n in reversed(theirs.shape))  # GGML lists the row length first
        x = x.reshape(shape)
        qtype = theirs.tensor_type
        ours_type = tensor_type(theirs.name, shape, file_type, n_layers=n_layers, tied=tied)
        if ours_type != qtype:
            result.type_differs.append(f"{theirs.name}: llama.cpp's {qtype.name}, cllm's {ours_type.name}")
        mine = exported[theirs.name]
        if mine.tensor_type == qtype and np.array_equal(np.asarray(mine.data).reshape(-1).view(np.uint8),
                                                        np.asarray(theirs.data).reshape(-1).view(np.uint8)):
            result.exported_same += 1
        if gguf.GGML_QUANT_SIZES[qtype][0] == 1:  # F32 and F16: compared whole, in cllm's export
            continue
        ours = cllm_quantize(x, qtype)
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        theirs_bytes = np.asarray(theirs.data).reshape(-1).view(np.uint8)
        same = (ours.reshape(-1, block_bytes) == theirs_bytes.reshape(-1, block_bytes)).all(axis=1)
        counts = result.blocks[qtype.name]
        counts[0] += int(same.sum())
        counts[1] += same.size
        if not same.all():
            difference = np.abs(gguf.quants.dequantize(ours, qtype).reshape(shape) -
                                gguf.quants.dequantize(theirs_bytes.reshape(ours.shape), qtype).reshape(shape))
            result.worst[qtype.name] = max(result.worst[qtype.name], float(difference.max() / np.abs(x).max()))
    result.seconds = time.perf_counter() - started
    return result


def export_quantized(source: str, out: str, file_type: str) -> None:
    """`cllm-convert SOURCE OUT --quantize TYPE`: cllm's own GGUF or .cllm file of file_type."""
    from cllm.tools import convert

    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            convert.main([source, out, "--quantize", file_type])
        finally:
            sys.stdout = stdout


def perplexity(path: str, data: str, ctx: int, chunks: int, threads: int) -> float:
    """cllm's perplexity of the model at path (as it loads: a quantized file on its blocks) on the held-out text."""
    from cllm.checkpoint import load_model
    from cllm.threads import blas_limit

    model, tokenizer = load_model(path, threads=threads)
    with blas_limit(threads):
        return llama_perplexity_way(model, tokenizer.encode(split_text(data)[1]), ctx, chunks, None)[0]


def table(rows: list[tuple[str, str, str, Comparison]]) -> str:
    lines = [("| model | weights | file type | tensors | types as llama.cpp's | blocks identical, per type "
              "| largest dequantized difference / tensor's max | cllm's export: tensors identical |"),
             "|---|---|---|---:|---:|---|---|---:|"]
    for model, kind, file_type, c in rows:
        blocks = ", ".join(f"{name} {same / total:.6f} ({same:,}/{total:,})" for name, (same, total)
                           in sorted(c.blocks.items()))
        worst = ", ".join(f"{name} {value:.1e}" for name, value in sorted(c.worst.items())) or "none (all identical)"
        lines.append(f"| {model} | {kind} | {file_type} | {c.tensors} | {c.tensors - len(c.type_differs)}/{c.tensors} "
                     f"| {blocks} | {worst} | {c.exported_same}/{c.tensors} |")
    measured = [(model, kind, file_type, c.perplexity) for model, kind, file_type, c in rows if c.perplexity]
    if measured:
        lines += ["", "| model | weights | file type | cllm's perplexity, float32 | quantized (.cllm) | change |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {model} | {kind} | {file_type} | {f32:.3f} | {q:.3f} | {(q / f32 - 1) * 100:+.3f}% |"
                  for model, kind, file_type, (f32, q) in measured]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/check_quantize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset of %(default)s")
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated subset of %(default)s")
    p.add_argument("--weights", default="random", help=f"comma-separated subset of {','.join(WEIGHTS)} "
                                                       "(default: %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the text for the tokenizer and the trained weights "
                                                        "(default: %(default)s)")
    p.add_argument("--work", help="folder for the models and files, kept and reused (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2, help="threads for training and llama-quantize "
                                                          "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="AdamW steps of the trained weights (default: %(default)s)")
    p.add_argument("--perplexity", action="store_true", help="also cllm's perplexity, float32 and quantized")
    p.add_argument("--ppl-ctx", type=int, default=256, help="perplexity: tokens per chunk (default: %(default)s)")
    p.add_argument("--ppl-chunks", type=int, default=16, help="perplexity: chunks scored (default: %(default)s)")
    p.add_argument("--llama-cpp-bin", help="the folder of llama.cpp's llama-quantize (default: $LLAMA_CPP_BIN, "
                                           f"PATH, or built into {LLAMA_CPP_HOME})")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    args.weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    for flag, chosen, allowed in (("--models", args.models, SHAPES), ("--types", args.types, TYPES),
                                  ("--weights", args.weights, WEIGHTS)):
        if not chosen or any(c not in allowed for c in chosen):
            p.error(f"{flag}: choose from {','.join(allowed)}")
    if min(args.threads, args.steps, args.ppl_chunks) < 1 or args.ppl_ctx < 4:
        p.error("--threads, --steps and --ppl-chunks must be at least 1, --ppl-ctx at least 4")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    tool = llama_cpp_tools(["llama-quantize"], bin_dir=args.llama_cpp_bin, threads=args.threads)["llama-quantize"]
    print(f"{cpu_description()}; llama-quantize: {tool}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or scratch
        os.makedirs(work, exist_ok=True)
        rows = []
        for name in args.models:
            for kind in args.weights:
                stem = os.path.join(work, f"{name}-{kind}")
                if not os.path.exists(f"{stem}.cllm"):
                    training = Training(args.steps, batch=8, seq=64, lr=3e-3, vocab=4096)
                    print(in_fresh_process(make_model, SHAPES[name], kind, args.data, f"{stem}.cllm", training,
                                           args.threads), flush=True)
                if not os.path.exists(f"{stem}-f32.gguf"):
                    export_f32(f"{stem}.cllm", f"{stem}-f32.gguf")
                ppl = {}  # cllm's perplexity by file
                for file_type in args.types:
                    theirs, ours = f"{stem}-{file_type}-llama.gguf", f"{stem}-{file_type}-cllm.gguf"
                    if not os.path.exists(theirs):
                        quantize(tool, f"{stem}-f32.gguf", theirs, TYPES[file_type])
                    started = time.perf_counter()
                    in_fresh_process(export_quantized, f"{stem}.cllm", ours, file_type)
                    exported = time.perf_counter() - started
                    result = compare(f"{stem}-f32.gguf", theirs, ours, file_type)
                    print(f"{name} {kind} {file_type}: cllm's export {exported:.0f} s, comparison "
                          f"{result.seconds:.0f} s", flush=True)
                    for line in result.type_differs:
                        print(f"  TYPE DIFFERS: {line}")
                    if args.perplexity:
                        quantized = f"{stem}-{file_type}.cllm"
                        in_fresh_process(export_quantized, f"{stem}.cllm", quantized, file_type)
                        ppl |= {path: in_fresh_process(perplexity, path, args.data, args.ppl_ctx, args.ppl_chunks,
                                                       args.threads)
                               for path in (f"{stem}.cllm", quantized) if path not in ppl}
                        result.perplexity = ppl[f"{stem}.cllm"], ppl[quantized]
                        print(f"  cllm's perplexity: float32 {result.perplexity[0]:.3f}, {file_type} "
                              f"{result.perplexity[1]:.3f}", flush=True)
                    rows.append((name, kind, file_type, result))
    print()
    print(table(rows))
    failed = any(c.type_differs or any(same != total for same, total in c.blocks.values()) or
                 c.exported_same != c.tensors for *_, c in rows)
    print("\nSOMETHING DISAGREES" if failed else "\nevery type and block is llama.cpp's")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

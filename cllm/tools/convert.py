"""Convert a model between cllm's .cllm file, a Hugging Face folder (GPT-2 or Llama) and GGUF (for llama.cpp).

    python -m cllm.tools.convert smollm2-folder model.cllm               # Hugging Face -> cllm
    python -m cllm.tools.convert model.cllm exported/                    # cllm -> Hugging Face folder
    python -m cllm.tools.convert model.cllm model.gguf --gguf-type q8_0  # cllm (or a folder) -> GGUF

SRC is a .cllm file or a Hugging Face folder. DST's kind comes from its name: a .cllm file, a .gguf file, or else
a folder for Hugging Face (created if needed). Files are written atomically: an interrupted conversion leaves
any file that already existed as it was.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint import load_model, save_model
from ..errors import UsageError
from ..formats.gguf_file import TYPES, save_gguf
from ..formats.hf import save_hf
from ._cli import Parser, run


def describe(model, tokenizer) -> str:
    """One line: the architecture and its shape (layers L, query heads H, key/value heads KV, width C), then what
    the shape leaves open."""
    cfg = model.config
    if cfg.arch == "llama":
        shape = (f"Llama L{cfg.n_layers} H{cfg.n_heads} KV{cfg.n_kv_heads} C{cfg.dim}, MLP {cfg.intermediate_size}, "
                 f"{'tied' if cfg.tied_head else 'untied'} head, RoPE base {cfg.rope_theta:g}")
    else:
        shape = f"GPT-2 L{cfg.n_layers} H{cfg.n_heads} C{cfg.dim}"
    return (f"{shape}, context {cfg.context_length}, vocabulary {cfg.vocab_size}, {cfg.activation}, "
            f"{model.num_params / 1e6:.1f}M parameters; {tokenizer.kind} tokenizer of {tokenizer.vocab_size} tokens")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="convert", description="Convert a model between .cllm, a Hugging Face folder and GGUF.")
    p.add_argument("src", help="a .cllm file or a Hugging Face folder (GPT-2 or Llama)")
    p.add_argument("dst", help="a .cllm file, a .gguf file, or a folder (Hugging Face)")
    p.add_argument("--gguf-type", choices=tuple(TYPES), help="tensor type of a .gguf DST (default: f32)")
    args = p.parse_args(argv)
    dst = Path(args.dst)
    if args.gguf_type and dst.suffix != ".gguf":
        raise UsageError("--gguf-type applies only to a .gguf destination")
    if dst.suffix not in (".cllm", ".gguf") and dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} exists and is not a folder; name a .cllm or .gguf file, or a folder")

    model, tokenizer = load_model(args.src)
    print(f"read {args.src}: {describe(model, tokenizer)}")
    if dst.suffix == ".cllm":
        save_model(dst, model, tokenizer)
        written = [dst]
    elif dst.suffix == ".gguf":
        written = [save_gguf(dst, model, tokenizer, tensor_type=args.gguf_type or "f32")]
    else:
        written = save_hf(dst, model, tokenizer)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0


if __name__ == "__main__":
    run("convert", lambda: main(sys.argv[1:]))

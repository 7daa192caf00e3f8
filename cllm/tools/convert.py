"""Convert a model between cllm's .cllm file, a Hugging Face folder (GPT-2, Llama, Qwen2 or Qwen3) and GGUF
(llama.cpp's).

    python -m cllm.tools.convert smollm2-folder model.cllm               # Hugging Face -> cllm
    python -m cllm.tools.convert model.cllm exported/                    # cllm -> Hugging Face folder
    python -m cllm.tools.convert model.cllm model.gguf --gguf-type q8_0  # cllm (or a folder) -> GGUF
    python -m cllm.tools.convert SmolLM2-135M-Q4_K_M.gguf smollm2/       # GGUF -> Hugging Face (float32)
    python -m cllm.tools.convert smollm2-folder q4.cllm --quantize q4_k_m # quantized blocks, for cllm
    python -m cllm.tools.convert model.cllm chat.cllm --chat-template chatml.jinja --end-of-turn "<|im_end|>"

SRC is a .cllm file (float32 or quantized), a GGUF file (gpt2, llama, qwen2 or qwen3) or a Hugging Face folder; its
weights are read as float32 (quantized ones widened). DST's kind comes from its name: a .cllm file, a .gguf file,
or else a folder for Hugging Face (created if needed). Files are written atomically: an interrupted conversion leaves
any file that already existed as it was.

--quantize q8_0|q4_0|q4_k_m quantizes the matrices as llama.cpp's llama-quantize does for that file type, with
cllm's own quantizer (cllm.formats.quantize: each tensor's type by llama.cpp's rule, its blocks llama.cpp's): a
.cllm DST then holds the blocks, which cllm computes on as they are (memory-mapped at load); for a .gguf DST it is
--gguf-type's synonym. A folder holds float32 weights only.

--chat-template gives the model a chat template (a Jinja file, as Hugging Face's chat_template; see cllm.chat),
replacing any it has; --end-of-turn names the token that ends an assistant's turn (default: the separator).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from ..chat import ChatTemplate
from ..checkpoint import load_model, save_model
from ..errors import UsageError
from ..formats.gguf_file import TYPES, quantize_model, save_gguf
from ..formats.hf import save_hf
from ..formats.quantize import FILE_TYPES
from ._cli import MODEL_HELP, Parser, run


ARCHITECTURE_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def describe(model, tokenizer) -> str:
    """One line: the architecture and its shape (layers L, query heads H, key/value heads KV, width C), then what
    the shape leaves open."""
    cfg = model.config
    if cfg.llama_family:
        heads = f" of {cfg.head_dim}" if cfg.head_dim else ""
        shape = (f"{ARCHITECTURE_NAMES[cfg.arch]} L{cfg.n_layers} H{cfg.n_heads}{heads} KV{cfg.n_kv_heads} C{cfg.dim}, "
                 f"MLP {cfg.intermediate_size}, {'tied' if cfg.tied_head else 'untied'} head, RoPE base "
                 f"{cfg.rope_theta:g}")
    else:
        shape = f"GPT-2 L{cfg.n_layers} H{cfg.n_heads} C{cfg.dim}"
    return (f"{shape}, context {cfg.context_length}, vocabulary {cfg.vocab_size}, {cfg.activation}, "
            f"{model.num_params / 1e6:.1f}M parameters; {tokenizer.kind} tokenizer of {tokenizer.vocab_size} tokens")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="convert", description="Convert a model between .cllm, a Hugging Face folder and GGUF.")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="a .cllm file, a .gguf file, or a folder (Hugging Face)")
    p.add_argument("--gguf-type", choices=tuple(TYPES), help="tensor type of a .gguf DST (default: f32)")
    p.add_argument("--quantize", choices=tuple(FILE_TYPES),
                   help="quantize the matrices as llama.cpp's file type of that name (a .cllm or .gguf DST)")
    p.add_argument("--chat-template", metavar="FILE", help="give the model this chat template (a Jinja file)")
    p.add_argument("--end-of-turn", metavar="TOKEN",
                   help="with --chat-template: the token that ends an assistant's turn (default: the separator)")
    args = p.parse_args(argv)
    dst = Path(args.dst)
    if args.end_of_turn is not None and args.chat_template is None:
        raise UsageError("--end-of-turn applies only with --chat-template")
    template = read_template(args.chat_template) if args.chat_template else None
    if args.gguf_type and dst.suffix != ".gguf":
        raise UsageError("--gguf-type applies only to a .gguf destination")
    if args.quantize and dst.suffix not in (".cllm", ".gguf"):
        raise UsageError("--quantize applies only to a .cllm or .gguf destination (a folder holds float32 weights)")
    if args.quantize and args.gguf_type and args.quantize != args.gguf_type:
        raise UsageError(f"--quantize {args.quantize} and --gguf-type {args.gguf_type} disagree; give one of them")
    if dst.suffix not in (".cllm", ".gguf") and dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} exists and is not a folder; name a .cllm or .gguf file, or a folder")

    model, tokenizer = load_model(args.src, dequantize=True)
    print(f"read {args.src}: {describe(model, tokenizer)}")
    if template is not None:
        tokenizer.chat_template = chat_template(template, tokenizer, args.end_of_turn)
    if dst.suffix == ".cllm":
        if args.quantize:
            quantize_model(model, args.quantize)
            print(f"quantized {args.quantize}: {quantized_types(model)}")
        save_model(dst, model, tokenizer)
        written = [dst]
    elif dst.suffix == ".gguf":
        written = [save_gguf(dst, model, tokenizer, tensor_type=args.quantize or args.gguf_type or "f32")]
    else:
        written = save_hf(dst, model, tokenizer)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0


def quantized_types(model) -> str:
    """What the model holds quantized: how many matrix parts of each type, their size, and the matrices left
    float32."""
    parts = [part for matrix in model.q.values() for part in matrix.parts]
    counts = Counter(part.ggml_type.name for part in parts)
    floats = len(model.p) - len(model.q)
    return (", ".join(f"{n} {name}" for name, n in sorted(counts.items())) +
            f" tensors ({sum(part.data.nbytes for part in parts) / 1e6:,.1f} MB of blocks); "
            f"{floats} tensors float32")


def read_template(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the chat template {path}: {e}") from None


def chat_template(source: str, tokenizer, end_of_turn: str | None) -> ChatTemplate:
    """The template with the tokens it may name: the end of a turn, and the token the tokenizer starts every text
    with (Llama's <s>), if any. Checked by compiling it."""
    vocab = tokenizer.vocab()
    eos = tokenizer.separator if end_of_turn is None else end_of_turn
    if eos not in vocab:
        raise UsageError(f"--end-of-turn {eos!r} is not a token of the model's tokenizer")
    leading = [p.text for p in tokenizer.pieces("") if p.special]
    template = ChatTemplate(source, bos_token=leading[0] if leading else "", eos_token=eos)
    template.template  # noqa: B018 (compiles it: UsageError for a template that is not valid Jinja)
    return template


if __name__ == "__main__":
    run("convert", lambda: main(sys.argv[1:]))

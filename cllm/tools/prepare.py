"""Build the tokenizer and the token files alone (the same code train_model runs first).

    python -m cllm.tools.prepare DATA --out runs/mine    # writes runs/mine/data/{tokenizer.json,*.tokens}
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..data import prepare
from ._cli import Parser, positive_int, run


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="prepare", description="Tokenize a corpus into a run folder's data/.")
    p.add_argument("data", help="a text file or a folder of them")
    p.add_argument("--out", default="runs/default", help="run folder")
    p.add_argument("--val-data", help="validation text (default: the last 10%% of DATA)")
    p.add_argument("--tokenizer", choices=["bpe", "char", "word"], default="bpe")
    p.add_argument("--vocab-size", type=positive_int, default=4096)
    args = p.parse_args(argv)
    prepare(Path(args.data), Path(args.out) / "data", tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_data=args.val_data)
    return 0


if __name__ == "__main__":
    run("prepare", lambda: main(sys.argv[1:]))

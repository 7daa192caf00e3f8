"""Build the tokenizer and the token files alone (the same code train_model runs first).

    python -m cllm.tools.prepare DATA --out runs/mine    # writes runs/mine/data/{tokenizer.json,*.tokens}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import TokenizerSettings, prepare
from ..run_folder import DATA_DIR
from ._cli import Parser, add_flags, given_settings, run


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="prepare", description="Tokenize a corpus into a run folder's data/.",
               argument_default=argparse.SUPPRESS)
    p.add_argument("data", help="a text file or a folder of them")
    p.add_argument("--out", default="runs/default", help="run folder")
    p.add_argument("--val-data", default=None, help="validation text (default: the last 10%% of DATA)")
    add_flags(p.add_argument_group("tokenizer"), TokenizerSettings)  # the same flags as train_model's
    args = p.parse_args(argv)
    tokenizer = given_settings(TokenizerSettings, vars(args))
    out = Path(args.out)
    prepare(Path(args.data), out / DATA_DIR, tokenizer=tokenizer.kind, vocab_size=tokenizer.vocab_size,
            val_data=args.val_data, exclude=out)
    return 0


if __name__ == "__main__":
    run("prepare", lambda: main(sys.argv[1:]))

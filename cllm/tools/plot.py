"""Draw a run's loss curve: python -m cllm.tools.plot RUN_DIR  (writes RUN_DIR/loss.png)."""
from __future__ import annotations

import sys

from ..plot import INSTALL_HINT, write_loss_plot
from ._cli import USAGE_ERROR, Parser, run


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="plot", description="Plot train and validation loss of a run folder to loss.png.")
    p.add_argument("run_dir", help="a train_model --out folder")
    args = p.parse_args(argv)
    path = write_loss_plot(args.run_dir)
    if path is None:
        print(f"plot: {INSTALL_HINT}", file=sys.stderr)
        return USAGE_ERROR
    print(path)
    return 0


if __name__ == "__main__":
    run("plot", lambda: main(sys.argv[1:]))

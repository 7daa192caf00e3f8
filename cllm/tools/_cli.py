"""What every command-line tool shares: one-line usage errors (exit 2) and no traceback for a user's error."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from typing import Callable

from ..errors import UsageError
from ..trainer import flag

USAGE_ERROR = 2
MODEL_HELP = ("a .cllm model file, a GGUF file (gpt2, llama, qwen2 or qwen3, any common type) or a Hugging Face "
              "GPT-2, Llama, Qwen2 or Qwen3 folder")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in --help, unless it has none worth showing or the help text names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], "", argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2, and --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        # Run as a console command (cllm-train, cllm.tools.commands), usage and errors say its name, not the tool's.
        command = os.path.basename(sys.argv[0])
        if command.startswith("cllm-"):
            kwargs["prog"] = command
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


# Settings dataclasses as flags: each field's default and help are written once, in the dataclass.


def flag_of(setting: dataclasses.Field) -> str:
    """The flag of a settings field: its metadata's "flag", or its name with dashes."""
    return setting.metadata.get("flag") or flag(setting.name)


def add_flags(group, settings: type, shown_defaults: dict[str, str] | None = None) -> None:
    """A flag for each field of a settings dataclass, with the field's help and default. The flags themselves
    have no default: what the user gave is then exactly what the parsed arguments hold."""
    defaults, types = settings(), typing.get_type_hints(settings)
    for setting in dataclasses.fields(settings):
        kind = next(t for t in typing.get_args(types[setting.name]) or [types[setting.name]] if t is not type(None))
        name, help = flag_of(setting), setting.metadata["help"]
        if kind is bool:
            group.add_argument(name, dest=setting.name, action="store_true", help=help)
            continue
        default = (shown_defaults or {}).get(setting.name) or setting.metadata.get("default_help") \
            or getattr(defaults, setting.name)
        choices = setting.metadata.get("choices")
        group.add_argument(name, dest=setting.name, type=kind, choices=choices,
                           metavar=None if choices else name[2:].replace("-", "_").upper(),
                           help=f"{help} (default: {default})".replace("%", "%%"))


def given_settings(settings: type, given: dict, base=None):
    """base (default: the dataclass's defaults) with the fields the user gave."""
    names = {setting.name for setting in dataclasses.fields(settings)}
    return dataclasses.replace(settings() if base is None else base,
                               **{name: value for name, value in given.items() if name in names})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def run(prog: str, main: Callable[[], int]) -> None:
    """Runs main and exits with its status.

    A user's error is one line and status 2: a UsageError, or an OSError on a file the user named (missing,
    unreadable). Ctrl-C is status 130. Anything else is a bug and keeps its traceback, and so does a user's
    error when CLLM_DEBUG=1 is set. Under MPI, a rank that ends with a non-zero status ends every rank.
    """
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        status = 130
    except (UsageError, OSError) as e:
        if os.environ.get("CLLM_DEBUG") == "1" or isinstance(e, OSError) and e.filename is None:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.strerror:
            message = f"{e.strerror}: {e.filename}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        status = USAGE_ERROR
    sys.stdout.flush()
    if status:
        _end_other_ranks(status)
    sys.exit(status)


def _end_other_ranks(status: int) -> None:
    """Under MPI, a rank that fails must not leave the others waiting at a collective (a barrier, a broadcast):
    MPI_Abort ends every rank. mpi4py is consulted only if this program imported it already."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized() or MPI.COMM_WORLD.Get_size() == 1:
        return
    sys.stderr.flush()
    time.sleep(1.0)  # MPI_Abort tears the job down at once, stdio forwarding included: let the error line out
    MPI.COMM_WORLD.Abort(status)

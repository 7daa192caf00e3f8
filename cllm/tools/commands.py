"""The console commands that `pip install` puts on the PATH ([project.scripts] in pyproject.toml), each the tool
that `python -m cllm.tools.X` runs:

    cllm-train     train_model        cllm-generate  inference        cllm-serve  serve
    cllm-convert   convert            cllm-prepare   prepare

A command's usage lines and error messages carry its own name (cllm-train), not the module's.
"""
from __future__ import annotations

import importlib
import sys

from ._cli import run

COMMANDS = {"cllm-train": "train_model", "cllm-generate": "inference", "cllm-serve": "serve",
            "cllm-convert": "convert", "cllm-prepare": "prepare"}


def _run(command: str) -> None:
    tool = importlib.import_module(f"{__package__}.{COMMANDS[command]}")
    run(command, lambda: tool.main(sys.argv[1:]))


def train() -> None:
    _run("cllm-train")


def generate() -> None:
    _run("cllm-generate")


def serve() -> None:
    _run("cllm-serve")


def convert() -> None:
    _run("cllm-convert")


def prepare() -> None:
    _run("cllm-prepare")

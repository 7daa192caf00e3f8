"""The command-line tools' error contract: a user's error is one line and status 2, a bug keeps its traceback; and
the console commands that run them."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cllm.errors import UsageError
from cllm.tools._cli import run
from cllm.tools.commands import COMMANDS


def exit_of(main, capsys):
    with pytest.raises(SystemExit) as info:
        run("tool", main)
    return info.value.code, capsys.readouterr().err


def fail_with(error):
    def main():
        raise error
    return main


def test_a_usage_error_is_one_line_and_status_2(capsys):
    status, err = exit_of(fail_with(UsageError("--steps must be at least 1")), capsys)
    assert status == 2 and err == "tool: error: --steps must be at least 1\n"


def test_a_missing_file_the_user_named_is_one_line(capsys):
    status, err = exit_of(fail_with(FileNotFoundError(2, "No such file or directory", "runs/x/model.cllm")), capsys)
    assert status == 2 and err == "tool: error: No such file or directory: runs/x/model.cllm\n"


@pytest.mark.parametrize("bug", [ValueError("operands could not be broadcast"), OSError("no filename"),
                                 KeyError("config")])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(bug, capsys):
    with pytest.raises(type(bug)):
        run("tool", fail_with(bug))


def test_cllm_debug_shows_the_traceback_of_a_usage_error(monkeypatch):
    monkeypatch.setenv("CLLM_DEBUG", "1")
    with pytest.raises(UsageError):
        run("tool", fail_with(UsageError("bad flag")))


def test_the_status_of_main_is_the_exit_status(capsys):
    assert exit_of(lambda: 0, capsys)[0] == 0
    assert exit_of(lambda: 1, capsys)[0] == 1


def test_the_prepare_tool_takes_train_models_tokenizer_flags_and_skips_its_run_folder(tmp_path, capsys):
    from cllm.data import TokenFile
    from cllm.tokenizer import Tokenizer
    from cllm.tools import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    out = corpus / "run"  # a run folder inside the corpus: its files are no text to learn from
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "zzz.txt").write_text("QXZ" * 100)
    assert prepare.main([str(corpus), "--out", str(out), "--tokenizer", "char", "--vocab-size", "40"]) == 0
    tokenizer = Tokenizer.from_json((out / "data" / "tokenizer.json").read_text())
    assert tokenizer.kind == "char" and "Q" not in tokenizer.decode(range(tokenizer.vocab_size))
    assert len(TokenFile.open(out / "data" / "train.tokens")) > 0


def run_command(target: str, command: str, *args: str) -> subprocess.CompletedProcess:
    """What the console script `command` does: call its entry point with argv[0] its own name."""
    module, function = target.split(":")
    code = f"import sys; sys.argv[0] = {command!r}; from {module} import {function}; {function}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_console_commands_run_the_tools_under_their_own_names():
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS) == {"cllm-train", "cllm-generate", "cllm-serve", "cllm-convert",
                                             "cllm-prepare"}
    for command, target in scripts.items():
        helped = run_command(target, command, "--help")
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {command} "), helped.stderr
        refused = run_command(target, command, "--no-such-flag")
        assert refused.returncode == 2 and refused.stderr.startswith(f"{command}: error: "), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

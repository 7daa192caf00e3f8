"""train_model --tensorboard: the event files hold metrics.jsonl's numbers at the same steps, a resumed run's log
reads as one run in TensorBoard, and without tensorboardX the flag fails at once, in one line."""
import json
import shutil
import struct
import sys

import pytest

from cllm import data
from cllm.errors import UsageError
from cllm.tensorboard import TensorBoardLog
from cllm.tools._cli import run
from cllm.tools.train_model import main

pytestmark = pytest.mark.timeout(120)
tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402
from tensorboardX.record_writer import masked_crc32c  # noqa: E402

TEXT = "".join(f"the {w} sat on the mat number {i}.\n" for i, w in enumerate(["cat", "dog", "bird", "fox"] * 60))
ARGS = ["--tokenizer", "char", "--dim", "16", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--steps", "8", "--lr", "3e-3", "--warmup", "2", "--eval-every", "4", "--eval-batches", "1",
        "--checkpoint-every", "4", "--threads", "2", "--no-progress"]
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
        "val_loss": "val/loss"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def train(*args):
    return main([str(a) for a in args])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(path):
    """The events of one file: TFRecords of an 8-byte length, its masked CRC-32C, the data and the data's."""
    blob, at = path.read_bytes(), 0
    while at < len(blob):
        header = blob[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", blob[at + 8:at + 12])
        body = blob[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", blob[at + 12 + length:at + 16 + length])
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body), f"{path} is corrupt"
        yield event_pb2.Event.FromString(body)
        at += 16 + length


def scalars(logdir):
    """tag -> {step: value}, as TensorBoard reads the directory: its files in name order, and a session's start
    purging what earlier files hold at its step and later."""
    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in events(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in found.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def assert_log_matches(logdir, records):
    logged = scalars(logdir)
    expected = {}
    for record in records:
        for field, value in record.items():
            if field != "step":
                expected.setdefault(TAGS[field], {})[record["step"]] = value
    assert logged.keys() == expected.keys()
    for tag, values in expected.items():
        assert logged[tag].keys() == values.keys(), tag
        for step, value in values.items():  # TensorBoard keeps a float32
            assert logged[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)


@pytest.mark.parametrize("where", ["default", "given"])
def test_the_log_holds_every_metric_at_its_step(corpus, tmp_path, where, capsys):
    out = tmp_path / "run"
    logdir = out / "tensorboard" if where == "default" else tmp_path / "logs" / "mine"
    flag = "--tensorboard" if where == "default" else f"--tensorboard={logdir}"
    assert train(corpus, "--out", out, *ARGS, flag) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    assert_log_matches(logdir, records)
    assert f"tensorboard --logdir {logdir}" in capsys.readouterr().out
    if where == "given":
        assert not (out / "tensorboard").exists()


def test_no_log_without_the_flag(corpus, tmp_path):
    assert train(corpus, "--out", tmp_path / "run", *ARGS, "--steps", 2) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_resumed_run_goes_on_in_the_same_log_and_reads_as_one_run(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, "--out", out, *ARGS, "--stop-after", 4, "--tensorboard") == 0
    kept = tmp_path / "kept"  # the checkpoint at step 4
    kept.mkdir()
    for name in ("model.cllm", "train_state.safetensors"):
        shutil.copy(out / name, kept / name)
    assert train("--out", out, "--resume", "--tensorboard") == 0
    # As if the run had died after step 8 with its last checkpoint at 4: resumed, it trains steps 5 to 8 again.
    for name in ("model.cllm", "train_state.safetensors"):
        shutil.copy(kept / name, out / name)
    assert train("--out", out, "--resume", "--tensorboard") == 0

    logdir = out / "tensorboard"
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 3  # one per process; none replaced another
    logged_twice = [e.step for path in files for e in events(path)
                    if any(v.tag == "train/tokens_per_s" for v in e.summary.value)]
    assert sorted(logged_twice) == [1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8]
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert_log_matches(logdir, records)  # the later values (tokens/s differs between the two passes)


def test_the_log_writes_every_number_of_a_record_and_nothing_else(tmp_path):
    with TensorBoardLog(tmp_path, resumed_at=2) as log:
        log.write({"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1234.5, "new": 7,
                   "note": "text", "flag": True})
        log.write({"step": 4, "loss": 2.25, "val_loss": 2.0})
    assert scalars(tmp_path) == {"train/loss": {3: 2.5, 4: 2.25}, "train/lr": {3: pytest.approx(1e-3)},
                                 "train/grad_norm": {3: 0.75}, "train/tokens_per_s": {3: 1234.5},
                                 "train/new": {3: 7.0}, "val/loss": {4: 2.0}}
    starts = [e.step for path in tmp_path.glob("events.*") for e in events(path) if e.HasField("session_log")]
    assert starts == [3]  # what an earlier file holds from the first step trained is purged


def test_without_tensorboardx_the_flag_fails_at_once_in_one_line(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX now raises ImportError
    monkeypatch.setattr(data, "scan", lambda *a, **k: pytest.fail("the corpus was read"))
    with pytest.raises(SystemExit) as info:
        run("train_model", lambda: main([str(corpus), "--out", str(tmp_path / "run"), *ARGS, "--tensorboard"]))
    assert info.value.code == 2
    assert capsys.readouterr().err == ('train_model: error: --tensorboard needs tensorboardX, which is not '
                                       'installed: pip install "cllm[tensorboard]"\n')
    assert not (tmp_path / "run").exists()


def test_a_log_directory_that_is_a_file_is_refused_before_the_corpus_is_read(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "scan", lambda *a, **k: pytest.fail("the corpus was read"))
    with pytest.raises(UsageError, match="is not a directory"):
        train("--out", tmp_path / "run", *ARGS, "--tensorboard", corpus)  # DATA taken for DIR: no demo run
    assert not (tmp_path / "run").exists()



def test_a_new_run_in_the_folder_drops_the_earlier_runs_events(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, "--out", out, *ARGS, "--steps", 4, "--tensorboard") == 0
    assert train(corpus, "--out", out, *ARGS, "--steps", 2, "--tensorboard") == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_log_matches(out / "tensorboard", metrics(out))

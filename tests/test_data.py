"""Data: corpus discovery and reading, token files, prepare() and its reuse, and the batch iterator."""
import os

import numpy as np
import pytest

from cllm import data
from cllm.data import (Batches, CorpusError, TokenFile, TokenFileError, TokenFileWriter, discover, eval_batches,
                       prepare, read_pieces, reopen, scan)
from cllm.errors import UsageError
from cllm.tokenizer import Tokenizer

SPEECH = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def quiet(_line):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the corpus


def test_discover_walks_nested_folders_in_sorted_order_and_skips_hidden_ones(tmp_path):
    for name in ["b.txt", "a/z.txt", "a/deeper/y.txt", ".hidden.txt", ".git/config", "a/.cache/x.txt"]:
        write(tmp_path / name, "text")
    assert [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)] == [
        "a/deeper/y.txt", "a/z.txt", "b.txt"]
    assert discover(tmp_path / "a" / "z.txt") == [tmp_path / "a" / "z.txt"]


def test_a_missing_path_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file or folder: .*nowhere"):
        prepare(tmp_path / "nowhere", tmp_path / "out", log=quiet)


def test_an_empty_folder_is_a_corpus_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    write(tmp_path / "corpus" / ".only-hidden", "text")
    with pytest.raises(CorpusError, match="no files in"):
        prepare(tmp_path / "corpus", tmp_path / "out", log=quiet)


def test_reading_strips_the_bom_and_normalises_line_ends(tmp_path, monkeypatch):
    path = write(tmp_path / "windows.txt", b"\xef\xbb\xbf" + b"one\r\ntwo\rthree\n" * 50)
    assert "".join(read_pieces(path)) == "one\ntwo\nthree\n" * 50
    monkeypatch.setattr(data, "PIECE_CHARS", 5)  # reads that split "\r\n" pairs, and many pieces
    assert "".join(read_pieces(path)) == "one\ntwo\nthree\n" * 50


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_pieces_encode_to_the_same_tokens_as_the_whole_text(tmp_path, monkeypatch, kind):
    text = "".join(f"line {i}\n" + "\n" * (i % 3) + "word\n  indented\n\tx = {i}\n" for i in range(300))
    tokenizer = Tokenizer.train(kind, [text], 300)  # learns merges across "\n\n", which a careless cut would split
    monkeypatch.setattr(data, "PIECE_CHARS", 40)
    pieces = list(read_pieces(write(tmp_path / "doc.txt", text)))
    assert len(pieces) > 50 and "".join(pieces) == text
    assert np.array_equal(np.concatenate(tokenizer.encode_batch(pieces)), tokenizer.encode(text))


def test_binary_undecodable_and_empty_files_are_skipped_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "good.txt", SPEECH)
    write(corpus / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(corpus / "late-nul.txt", b"x" * 9000 + b"\x00")  # past the sniffed 8 KiB: valid UTF-8 text
    write(corpus / "latin1.txt", "café".encode("latin-1"))
    write(corpus / "blank.txt", " \n\t\r\n")
    write(corpus / "bom-only.txt", b"\xef\xbb\xbf")
    found = scan(corpus)
    assert [p.name for p in found.files] == ["good.txt", "late-nul.txt"]
    assert found.skipped == {"binary": 1, "empty": 2, "not UTF-8": 1}
    lines = []
    prepare(corpus, tmp_path / "out", tokenizer="char", log=lines.append)
    size = len(SPEECH) + 9001
    assert lines[0] == f"corpus: 2 files, {size:,} bytes; 4 files skipped (1 binary, 2 empty, 1 not UTF-8)"


def test_a_corpus_with_no_usable_text_says_why(tmp_path):
    write(tmp_path / "corpus" / "a.bin", b"\x00\x01")
    write(tmp_path / "corpus" / "b.bin", b"\x00\x02")
    write(tmp_path / "corpus" / "c.txt", b"\xff\xfe")
    with pytest.raises(CorpusError) as error:
        prepare(tmp_path / "corpus", tmp_path / "out", log=quiet)
    assert str(error.value) == f"no usable text in {tmp_path / 'corpus'}: 3 files skipped (2 binary, 1 not UTF-8)"


def test_an_empty_file_is_not_a_corpus(tmp_path):
    with pytest.raises(CorpusError, match=r"no usable text .*: 1 file skipped \(1 empty\)"):
        prepare(write(tmp_path / "empty.txt", ""), tmp_path / "out", log=quiet)


# ---------------------------------------------------------------------------------------------------------------
# token files


def test_token_files_round_trip_with_the_smallest_dtype(tmp_path):
    for vocab_size, dtype in [(65536, np.uint16), (65537, np.uint32)]:
        ids = np.array([0, 1, vocab_size - 1, 7], dtype=np.int32)
        with TokenFileWriter(tmp_path / "t.tokens", vocab_size, b"f" * 32) as writer:
            writer.write(ids[:2])
            writer.write(ids[2:])
            opened = writer.commit()
        assert opened.tokens.dtype == dtype and np.array_equal(opened.tokens, ids)
        assert isinstance(opened.tokens, np.memmap) and not opened.tokens.flags.writeable
        assert opened.fingerprint == b"f" * 32
        assert os.path.getsize(tmp_path / "t.tokens") == data.HEADER.size + 4 * np.dtype(dtype).itemsize


def test_moving_the_tail_to_another_file_keeps_both_writable(tmp_path):
    with TokenFileWriter(tmp_path / "a.tokens", 100, bytes(32)) as a, \
            TokenFileWriter(tmp_path / "b.tokens", 100, bytes(32)) as b:
        a.write(np.arange(10))
        a.move_tail_to(b, 3)
        a.write([20, 21])
        b.write([30])
        assert a.commit().tokens.tolist() == [0, 1, 2, 3, 4, 5, 6, 20, 21]
        assert b.commit().tokens.tolist() == [7, 8, 9, 30]


def test_an_empty_token_file_opens_as_an_empty_array(tmp_path):
    with TokenFileWriter(tmp_path / "t.tokens", 100, bytes(32)) as writer:
        assert len(writer.commit()) == 0
    assert len(TokenFile.open(tmp_path / "t.tokens")) == 0


def token_file(tmp_path, n=100):
    with TokenFileWriter(tmp_path / "t.tokens", 1000, bytes(32)) as writer:
        writer.write(np.arange(n))
        writer.commit()
    return tmp_path / "t.tokens"


@pytest.mark.parametrize("keep, message", [
    (-1, "truncated: 255 bytes where its header promises 256"),
    (20, "truncated: 20 bytes, shorter than a token file header"),
    (0, "truncated: 0 bytes"),
])
def test_a_truncated_token_file_is_a_clear_error(tmp_path, keep, message):
    path = token_file(tmp_path)
    content = path.read_bytes()
    path.write_bytes(content[:keep] if keep >= 0 else content[:len(content) + keep])
    with pytest.raises(TokenFileError, match=message):
        TokenFile.open(path)


def test_a_foreign_or_future_file_is_a_clear_error(tmp_path):
    foreign = write(tmp_path / "notes.txt", "just some text, long enough to hold a header " * 3)
    with pytest.raises(TokenFileError, match="notes.txt is not a cllm token file"):
        TokenFile.open(foreign)
    path = token_file(tmp_path)
    content = bytearray(path.read_bytes())
    content[8:12] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(content))
    with pytest.raises(TokenFileError, match="token file version 99, this cllm reads 1"):
        TokenFile.open(path)


def test_a_failed_write_leaves_neither_a_temp_file_nor_a_damaged_target(tmp_path):
    path = token_file(tmp_path, n=10)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with TokenFileWriter(path, 1000, bytes(32)) as writer:
            writer.write(np.arange(50))
            assert writer.tmp.exists() and writer.tmp.parent == path.parent
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["t.tokens"] and path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# prepare


def separated(tokenizer, *texts):
    return np.concatenate([np.append(tokenizer.encode(t), tokenizer.separator_id) for t in texts])


def test_prepare_writes_tokenizer_and_token_files_with_a_separator_after_each_document(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "b.txt", "Second.\r\n")
    write(corpus / "a" / "one.txt", SPEECH)
    prepared = prepare(corpus, tmp_path / "out", tokenizer="char", val_fraction=0, log=quiet)
    assert sorted(os.listdir(tmp_path / "out")) == ["tokenizer.json", "train.tokens", "val.tokens"]  # no temp files
    assert Tokenizer.from_json((tmp_path / "out" / "tokenizer.json").read_text()).to_json() == \
        prepared.tokenizer.to_json()
    assert np.array_equal(prepared.train, separated(prepared.tokenizer, SPEECH, "Second.\n"))
    assert len(prepared.val) == 0 and prepared.report.files == 2


def test_the_validation_split_is_the_tail_of_the_token_stream(tmp_path):
    corpus = write(tmp_path / "speech.txt", SPEECH * 20)
    whole = prepare(corpus, tmp_path / "whole", val_fraction=0, log=quiet).train
    split = prepare(corpus, tmp_path / "split", log=quiet)
    assert len(split.val) == int(len(whole) * 0.1) > 0
    assert np.array_equal(np.concatenate([split.train, split.val]), whole)
    assert (split.report.train_tokens, split.report.val_tokens) == (len(split.train), len(split.val))


def test_separate_validation_data_is_tokenized_but_not_trained_on(tmp_path):
    prepared = prepare(write(tmp_path / "train.txt", SPEECH), tmp_path / "out", tokenizer="char",
                       val_data=write(tmp_path / "val" / "v.txt", "Speak, Zed."), log=quiet)
    tok = prepared.tokenizer
    assert np.array_equal(prepared.train, separated(tok, SPEECH))
    assert np.array_equal(prepared.val, separated(tok, "Speak, Zed."))
    assert tok.decode(prepared.val) == "Speak, <unk>ed.<|endoftext|>"  # "Z" is only in the validation text


def test_a_second_prepare_reuses_everything_when_nothing_changed(tmp_path, monkeypatch):
    corpus = write(tmp_path / "corpus" / "speech.txt", SPEECH * 20)
    first = prepare(corpus.parent, tmp_path / "out", vocab_size=300, log=quiet)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    lines = []
    second = prepare(corpus.parent, tmp_path / "out", vocab_size=300, log=lines.append)
    assert second.report.reused and not first.report.reused
    assert lines[1].startswith(f"reusing the tokenizer and tokens in {tmp_path / 'out'}")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.tokenizer.to_json() == first.tokenizer.to_json()


@pytest.mark.parametrize("change", ["edit a file", "rename a file", "vocab_size", "tokenizer kind", "val_fraction",
                                    "corrupt token file", "other tokenizer.json"])
def test_prepare_rebuilds_when_anything_it_depends_on_changed(tmp_path, change):
    corpus = write(tmp_path / "corpus" / "speech.txt", SPEECH * 20)
    settings = dict(tokenizer="bpe", vocab_size=300, val_fraction=0.1, log=quiet)
    prepare(corpus.parent, tmp_path / "out", **settings)
    if change == "edit a file":
        write(corpus, SPEECH * 21)
    elif change == "rename a file":
        corpus.rename(corpus.with_name("renamed.txt"))
    elif change == "corrupt token file":
        with open(tmp_path / "out" / "val.tokens", "r+b") as f:
            f.truncate(100)
    elif change == "other tokenizer.json":
        other = Tokenizer.train("bpe", ["something else entirely"], 300)
        (tmp_path / "out" / "tokenizer.json").write_text(other.to_json())
    else:
        settings.update({"vocab_size": {"vocab_size": 290}, "tokenizer kind": {"tokenizer": "char"},
                         "val_fraction": {"val_fraction": 0.2}}[change])
    assert not prepare(corpus.parent, tmp_path / "out", **settings).report.reused


def test_an_output_folder_inside_the_corpus_is_not_read_as_corpus(tmp_path):
    write(tmp_path / "corpus" / "speech.txt", SPEECH * 20)
    first = prepare(tmp_path / "corpus", tmp_path / "corpus" / "prepared", tokenizer="char", log=quiet)
    second = prepare(tmp_path / "corpus", tmp_path / "corpus" / "prepared", tokenizer="char", log=quiet)
    assert second.report.reused and second.report.files == first.report.files == 1


def test_a_run_folder_inside_the_corpus_is_skipped_whole(tmp_path):
    write(tmp_path / "corpus" / "speech.txt", SPEECH * 20)
    run = tmp_path / "corpus" / "run"
    first = prepare(tmp_path / "corpus", run / "data", tokenizer="char", exclude=run, log=quiet)
    write(run / "metrics.jsonl", '{"step": 1, "loss": 3.0}\n')  # what a run writes beside data/: text too
    write(run / "run.json", "{}\n")
    second = prepare(tmp_path / "corpus", run / "data", tokenizer="char", exclude=run, log=quiet)
    assert second.report.reused and second.report.files == first.report.files == 1


def test_a_file_named_as_the_corpus_is_read_even_inside_the_excluded_folder(tmp_path):
    corpus = write(tmp_path / "run" / "text.txt", SPEECH * 20)
    prepared = prepare(corpus, tmp_path / "run" / "data", tokenizer="char", exclude=tmp_path / "run", log=quiet)
    assert prepared.report.files == 1


def test_reopen_opens_the_prepared_files_without_reading_the_corpus(tmp_path, monkeypatch):
    corpus = write(tmp_path / "corpus" / "speech.txt", SPEECH * 20)
    first = prepare(corpus, tmp_path / "out", tokenizer="char", log=quiet)
    write(corpus, SPEECH * 20 + "Zebras!\n")  # the corpus changes; the prepared files stay what they were
    monkeypatch.setattr(data, "scan", lambda *a, **k: pytest.fail("the corpus was read"))
    again = reopen(tmp_path / "out", first.recipe)
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    assert again.tokenizer.to_json() == first.tokenizer.to_json() and again.report is None
    monkeypatch.undo()
    prepare(corpus, tmp_path / "out", tokenizer="char", log=quiet)  # rebuilt from the new text
    with pytest.raises(TokenFileError, match="not the ones this run was prepared with"):
        reopen(tmp_path / "out", first.recipe)


def test_corpus_and_token_file_errors_are_usage_errors():
    assert issubclass(CorpusError, UsageError) and issubclass(TokenFileError, UsageError)


def test_bad_settings_fail_before_any_work(tmp_path):
    corpus = write(tmp_path / "speech.txt", SPEECH)
    with pytest.raises(ValueError, match="unknown tokenizer 'unigram'"):
        prepare(corpus, tmp_path / "out", tokenizer="unigram", log=quiet)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1"):
        prepare(corpus, tmp_path / "out", val_fraction=1, log=quiet)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# batches


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = Batches(tokens, 4, 16, seed=1).get(7)
    again_x, again_y = Batches(tokens, 4, 16, seed=1).get(7)  # a fresh iterator: what a resumed run builds
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    assert not np.array_equal(x, Batches(tokens, 4, 16, seed=1).get(8)[0])
    assert not np.array_equal(x, Batches(tokens, 4, 16, seed=2).get(7)[0])


def test_targets_are_the_inputs_shifted_by_one():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = Batches(tokens, 8, 32, seed=0).get(0)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int32
    assert x.flags.c_contiguous and y.flags.c_contiguous
    assert np.array_equal(y, x + 1)  # consecutive windows of arange: every target is the next token
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_windows_never_read_past_the_end_of_a_short_stream():
    seq_len = 16
    tokens = np.arange(seq_len + 3, dtype=np.uint16)  # room for exactly 3 window starts: 0, 1 and 2
    batches = Batches(tokens, 4, seq_len, seed=0)
    starts = {int(x[b, 0]) for step in range(50) for x in [batches.get(step)[0]] for b in range(4)}
    assert starts == {0, 1, 2}
    exact = Batches(tokens[:seq_len + 1], 2, seq_len, seed=0).get(0)
    assert np.array_equal(exact[0][0], tokens[:seq_len]) and np.array_equal(exact[1][0], tokens[1:seq_len + 1])


def test_a_stream_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(CorpusError, match=r"16 tokens is too short for a window of seq_len \+ 1 = 17 tokens"):
        Batches(np.arange(16), 2, seq_len=16, seed=0)
    with pytest.raises(CorpusError):
        eval_batches(np.arange(16), 2, seq_len=16, n_batches=3, seed=0)


def test_batches_read_a_prepared_memmap(tmp_path):
    prepared = prepare(write(tmp_path / "speech.txt", SPEECH * 20), tmp_path / "out", tokenizer="char", log=quiet)
    x, y = Batches(prepared.train, 2, 8, seed=3).get(0)
    text = prepared.tokenizer.decode(prepared.train)
    assert prepared.tokenizer.decode(np.append(x[0], y[0, -1])) in text


def test_eval_batches_are_the_same_fixed_set_every_call():
    tokens = np.arange(5_000, dtype=np.uint32)
    first = list(eval_batches(tokens, 4, 16, n_batches=3, seed=5))
    second = list(eval_batches(tokens, 4, 16, n_batches=3, seed=5))
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(first[0][0], first[1][0])

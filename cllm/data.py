"""Corpus -> token files -> training batches.

prepare() finds the text files under a path, trains a tokenizer on them and streams their tokens into two token
files, train and validation, beside tokenizer.json. When neither the corpus nor the settings changed, the next
prepare() reuses all three; reopen() opens them again without looking at the corpus at all. Batches cuts random
windows out of a token file as a pure function of (seed, step), so a resumed run sees exactly the batches an
unbroken run would have seen.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .atomic import atomic_write_bytes, commit, temporary_path
from .errors import UsageError
from .tokenizer import KINDS, Tokenizer, check_settings

TOKENIZER_FILE, TRAIN_FILE, VAL_FILE = "tokenizer.json", "train.tokens", "val.tokens"

READ_BLOCK = 1 << 20  # bytes per read while inspecting a file
BINARY_SNIFF = 8192  # a NUL byte among this many leading bytes marks a file as binary
PIECE_CHARS = 1 << 16  # characters read at a time; a piece is cut at the last safe place in them
BATCH_CHARS = 1 << 20  # characters per encode_batch call: keeps HF's threads busy and memory bounded


class CorpusError(UsageError):
    """The corpus cannot be used: it is missing, holds no text, or is too short for the windows asked of it."""


class TokenFileError(UsageError):
    """A token file is truncated, corrupt or not a cllm token file at all."""


# ---------------------------------------------------------------------------------------------------------------
# The corpus: which files, which of them are text, and their text in pieces


def discover(path, *, skip=None) -> list[Path]:
    """The path itself if it is a file, else every file under it, sorted; hidden files and folders are skipped,
    and so is the folder `skip` wherever it turns up in the walk."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusError(f"no such file or folder: {path}")
    skip = None if skip is None else Path(skip).resolve()
    found = []
    for folder, subfolders, names in os.walk(path):
        if skip is not None and Path(folder).resolve() == skip:
            subfolders[:] = []
            continue
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder) / name for name in names if not name.startswith(".")]
    return sorted(p for p in found if p.is_file())  # is_file: no sockets or FIFOs, which would block a read


@dataclass(frozen=True)
class Corpus:
    files: list[Path]  # the usable text files, in order
    n_bytes: int  # their total size on disk
    skipped: dict[str, int]  # why a file was skipped -> how many
    fingerprint: bytes  # sha256 over each usable file's relative path and content

    def describe(self) -> str:
        text = f"{_plural(len(self.files), 'file')}, {self.n_bytes:,} bytes"
        return text + (f"; {_describe_skipped(self.skipped)}" if self.skipped else "")

    def texts(self) -> Iterator[str]:
        """All the text, file after file, in pieces: what the tokenizer trains on."""
        for path in self.files:
            yield from read_pieces(path)


def scan(path, *, exclude=None) -> Corpus:
    """Inspects every file under path and keeps the ones that are text.

    path may also be a list of files and folders; their names are then taken relative to their common folder.
    exclude is a folder never read while walking a folder of the corpus: a run folder that sits inside it holds
    the run's own output. A file named in path is always read.
    """
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    if not paths:
        raise CorpusError("no corpus files given")
    files = [f for p in paths for f in discover(p, skip=exclude)]
    if len(paths) > 1:
        path = Path(os.path.commonpath([p.resolve() for p in paths]))
        files = [f.resolve() for f in files]
    else:
        path = paths[0]
    if not files:
        raise CorpusError(f"no files in {path}")
    root = path if path.is_dir() else path.parent
    usable, skipped, n_bytes, fingerprint = [], Counter(), 0, hashlib.sha256()
    for file in files:
        problem, content_hash, size = _inspect(file)
        if problem:
            skipped[problem] += 1
            continue
        name = file.relative_to(root).as_posix().encode()
        fingerprint.update(len(name).to_bytes(8, "little") + name + content_hash)
        usable.append(file)
        n_bytes += size
    if not usable:
        raise CorpusError(f"no usable text in {path}: {_describe_skipped(skipped)}")
    return Corpus(usable, n_bytes, dict(sorted(skipped.items())), fingerprint.digest())


def _inspect(path: Path) -> tuple[str | None, bytes, int]:
    """Reads the file once: (why it is unusable, or None), the sha256 of its bytes, and its size."""
    content_hash = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: a leading BOM is not text
    size, has_text = 0, False
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK):
                if size < BINARY_SNIFF and b"\0" in block[:BINARY_SNIFF - size]:
                    return "binary", b"", 0
                content_hash.update(block)
                size += len(block)
                text = decoder.decode(block)
                has_text = has_text or (text != "" and not text.isspace())
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8", b"", 0
    except OSError:
        return "unreadable", b"", 0
    return (None if has_text else "empty"), content_hash.digest(), size


def read_pieces(path) -> Iterator[str]:
    """The file's text (UTF-8, BOM stripped, CRLF and lone CR turned into LF) in pieces of about PIECE_CHARS.

    A piece ends only at a lone line break between two visible characters, where no tokenizer here joins the
    characters on either side into one token. So encoding the pieces one by one gives exactly the tokens of the
    whole text, while memory stays bounded. (A long stretch with no such place stays one piece.)
    """
    pending: list[str] = []
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:  # newline=None: universal newlines
            while block := f.read(PIECE_CHARS):
                cut = _last_safe_cut(block)
                if cut is None:
                    pending.append(block)
                    continue
                yield "".join(pending) + block[:cut]
                pending = [block[cut:]]
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is no longer valid UTF-8: did it change while being prepared?") from None
    if rest := "".join(pending):
        yield rest


def _last_safe_cut(text: str) -> int | None:
    """The index just after the last "\\n" with a visible character on each side, or None.

    Byte-level BPE's pre-tokenizer sees a run of whitespace as one pre-token, and one at the very end of a text
    differently from one in the middle; a lone "\\n" between visible characters is a pre-token either way.
    """
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        if _visible(text[i - 1]) and _visible(text[i + 1]):
            return i + 1
        i = text.rfind("\n", 0, i)
    return None


def _visible(ch: str) -> bool:
    # Deliberately narrow (ASCII punctuation, letters, digits): regex engines disagree about exotic whitespace.
    return ch.isalnum() or "!" <= ch <= "~"


def encode_documents(tokenizer: Tokenizer, files: Iterable[Path]) -> Iterator[np.ndarray]:
    """The token ids of each file followed by the separator, in order, encoding BATCH_CHARS of text at a time."""
    separator = np.array([tokenizer.separator_id], dtype=np.int32)
    batch, ends_document, size = [], [], 0
    for piece, last in _pieces_marking_the_last(files):
        batch.append(piece)
        ends_document.append(last)
        size += len(piece)
        if size >= BATCH_CHARS:
            yield from _with_separators(tokenizer.encode_batch(batch), ends_document, separator)
            batch, ends_document, size = [], [], 0
    yield from _with_separators(tokenizer.encode_batch(batch), ends_document, separator)


def _pieces_marking_the_last(files: Iterable[Path]) -> Iterator[tuple[str, bool]]:
    """(piece, whether it is the last of its file) for every piece of every file."""
    for path in files:
        pieces = read_pieces(path)
        piece = next(pieces, None)
        for following in pieces:
            yield piece, False
            piece = following
        if piece is not None:
            yield piece, True


def _with_separators(encoded: list[np.ndarray], ends_document: list[bool], separator: np.ndarray):
    for ids, last in zip(encoded, ends_document):
        yield ids
        if last:
            yield separator


# ---------------------------------------------------------------------------------------------------------------
# Token files: a fixed header, then the raw little-endian token ids, read back through a read-only memmap

MAGIC = b"CLLMTOK\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIHHQ32s")  # magic, format version, dtype code, reserved (0), token count, fingerprint
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


def dtype_code(vocab_size: int) -> int:
    return 1 if vocab_size <= 1 << 16 else 2


@dataclass(frozen=True)
class TokenFile:
    path: Path
    fingerprint: bytes  # what the tokens were made from (see prepare)
    tokens: np.ndarray  # read-only, memory-mapped

    @classmethod
    def open(cls, path) -> "TokenFile":
        """Validates the header and the file size, then maps the tokens; raises TokenFileError if anything is off."""
        path = Path(path)
        with open(path, "rb") as f:
            header = f.read(HEADER.size)
            size = os.fstat(f.fileno()).st_size
        if not MAGIC.startswith(header[:len(MAGIC)]):
            raise TokenFileError(f"{path} is not a cllm token file")
        if len(header) < HEADER.size:
            raise TokenFileError(f"{path} is truncated: {size} bytes, shorter than a token file header")
        _, version, code, _, count, fingerprint = HEADER.unpack(header)
        if version != FORMAT_VERSION:
            raise TokenFileError(f"{path} is token file version {version}, this cllm reads {FORMAT_VERSION}")
        if code not in DTYPES:
            raise TokenFileError(f"{path} has an unknown token type code {code}")
        expected = HEADER.size + count * DTYPES[code].itemsize
        if size != expected:
            problem = "truncated" if size < expected else "corrupt"
            raise TokenFileError(f"{path} is {problem}: {size:,} bytes where its header promises {expected:,}")
        if count == 0:  # np.memmap cannot map zero bytes
            return cls(path, fingerprint, np.zeros(0, DTYPES[code]))
        return cls(path, fingerprint, np.memmap(path, DTYPES[code], mode="r", offset=HEADER.size, shape=(count,)))

    def __len__(self) -> int:
        return len(self.tokens)


class TokenFileWriter:
    """Streams tokens into a temporary file beside PATH; commit() writes the final count into the header,
    syncs and renames the file into place. A crash or an error never leaves a half-written file under PATH.
    Use it as a context manager: leaving the block without commit() deletes the temporary file."""

    def __init__(self, path, vocab_size: int, fingerprint: bytes):
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.code = dtype_code(vocab_size)
        self.dtype = DTYPES[self.code]
        self.fingerprint = fingerprint
        self.count = 0
        self._file = open(self.tmp, "w+b")
        self._file.write(self._header())

    def _header(self) -> bytes:
        return HEADER.pack(MAGIC, FORMAT_VERSION, self.code, 0, self.count, self.fingerprint)

    def write(self, ids: np.ndarray) -> None:
        self._file.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.count += len(ids)

    def move_tail_to(self, other: "TokenFileWriter", n: int) -> None:
        """Moves the last n tokens written here to the end of other (how the validation split is cut off)."""
        n = min(n, self.count)
        start = HEADER.size + (self.count - n) * self.dtype.itemsize
        self._file.flush()
        self._file.seek(start)
        while block := self._file.read(READ_BLOCK):  # READ_BLOCK is a multiple of any token size
            other.write(np.frombuffer(block, self.dtype))
        self._file.truncate(start)
        self._file.seek(start)  # truncate() leaves the position at the old end: later writes would leave a hole
        self.count -= n

    def commit(self) -> TokenFile:
        self._file.seek(0)
        self._file.write(self._header())
        commit(self._file, self.tmp, self.path)
        return TokenFile.open(self.path)

    def __enter__(self) -> "TokenFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)  # already gone after a commit


# ---------------------------------------------------------------------------------------------------------------
# prepare: corpus -> tokenizer.json, train.tokens, val.tokens; reused as long as nothing they depend on changed


@dataclass(frozen=True)
class TokenizerSettings:
    """The tokenizer flags of train_model: each field's default and help are the flag's."""
    kind: str = field(default="bpe", metadata={
        "flag": "--tokenizer", "choices": KINDS, "help": "byte-level BPE, characters, or lower-cased words"})
    vocab_size: int = field(default=4096, metadata={
        "help": "tokens in the vocabulary, special tokens included; caps char too (the most frequent characters "
                "are kept, the rest become <unk>)"})


@dataclass(frozen=True)
class PrepareReport:
    files: int
    bytes: int
    skipped: dict[str, int]  # why -> how many files
    train_tokens: int
    val_tokens: int
    reused: bool  # True when the existing tokenizer and token files were up to date
    fingerprint: bytes  # the corpus's (Corpus.fingerprint)
    val_fingerprint: bytes | None  # the validation data's, when it is separate


@dataclass(frozen=True)
class Prepared:
    tokenizer: Tokenizer
    train: np.ndarray  # token ids, memory-mapped read-only
    val: np.ndarray
    recipe: bytes  # what the files were made from: reopen() takes it to open exactly these files again
    report: PrepareReport | None  # None from reopen(), which looks at no corpus


def prepare(data, out_dir, *, tokenizer: str | Tokenizer = "bpe", vocab_size: int | None = None, val_data=None,
            val_fraction: float = 0.1, exclude=None, log: Callable[[str], object] = print) -> Prepared:
    """Trains a tokenizer on the text under `data` and writes out_dir/{tokenizer.json,train.tokens,val.tokens}.

    tokenizer is the kind to train, or a Tokenizer to use as it is (a model's own, when fine-tuning it).

    The validation tokens are the last val_fraction of the token stream or, when val_data (a file or folder) is
    given, its tokens; the tokenizer is then trained on `data` alone. If the corpus (every usable file's relative
    path and content) and the settings are unchanged since the last call, the files are reused as they are.
    exclude (default: out_dir) is a folder never read as corpus, e.g. the run folder that out_dir is part of.
    Raises CorpusError for a missing or unusable corpus, ValueError for bad settings.
    """
    if isinstance(tokenizer, str):
        check_settings(tokenizer, vocab_size)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    exclude = out_dir if exclude is None else exclude  # it may sit inside the corpus folder: never read our output
    corpus = scan(data, exclude=exclude)
    val_corpus = None if val_data is None else scan(val_data, exclude=exclude)
    log(f"corpus: {corpus.describe()}" + (f"; validation: {val_corpus.describe()}" if val_corpus else ""))

    recipe = _recipe(corpus, val_corpus, tokenizer, vocab_size, val_fraction)
    outputs = _load_if_current(out_dir, recipe)
    reused = outputs is not None
    if not reused:
        outputs = _build(out_dir, recipe, corpus, val_corpus, tokenizer, vocab_size, val_fraction)
    tok, train, val = outputs
    report = PrepareReport(len(corpus.files), corpus.n_bytes, corpus.skipped, len(train), len(val), reused,
                           corpus.fingerprint, val_corpus.fingerprint if val_corpus else None)
    counts = f"{len(train):,} train + {len(val):,} validation tokens"
    if report.reused:
        log(f"reusing the tokenizer and tokens in {out_dir} (corpus and settings unchanged): {counts}")
    else:
        log(f"tokens: {counts}, {tok.kind} tokenizer with {tok.vocab_size:,} tokens, written to {out_dir}")
    return Prepared(tok, train.tokens, val.tokens, recipe, report)


def reopen(out_dir, recipe: bytes) -> Prepared:
    """The tokenizer and token files that prepare() made from `recipe`, opened as they are: no corpus is read and
    nothing is rebuilt. Raises TokenFileError if they are missing, damaged, or were rebuilt from anything else."""
    outputs = _load_if_current(Path(out_dir), recipe)
    if outputs is None:
        raise TokenFileError(f"the tokenizer and token files in {out_dir} are missing, damaged, or not the ones "
                             f"this run was prepared with (rebuilt since?)")
    tok, train, val = outputs
    return Prepared(tok, train.tokens, val.tokens, recipe, None)


def _recipe(corpus: Corpus, val_corpus: Corpus | None, kind: str | Tokenizer, vocab_size: int | None,
            val_fraction: float) -> bytes:
    """A digest of everything the outputs depend on, the trained tokenizer aside (see _fingerprint); a given
    tokenizer is part of it."""
    if isinstance(kind, Tokenizer):
        kind = "given " + hashlib.sha256(kind.to_json().encode()).hexdigest()
    recipe = {"format": FORMAT_VERSION, "tokenizer": kind, "vocab_size": vocab_size,
              "train": corpus.fingerprint.hex(),
              "val": val_corpus.fingerprint.hex() if val_corpus else f"last {val_fraction!r} of train"}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).digest()


def _fingerprint(recipe: bytes, tokenizer_json: str) -> bytes:
    """What the token files record: the recipe and the exact tokenizer, so a tokenizer.json that was replaced
    or half-updated after a crash never passes for the one the tokens were made with."""
    return hashlib.sha256(recipe + tokenizer_json.encode()).digest()


def _load_if_current(out_dir: Path, recipe: bytes) -> tuple[Tokenizer, TokenFile, TokenFile] | None:
    """The existing outputs if they were made from this recipe, else None (missing or broken ones included)."""
    try:
        tokenizer_json = (out_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
        train, val = TokenFile.open(out_dir / TRAIN_FILE), TokenFile.open(out_dir / VAL_FILE)
        if not train.fingerprint == val.fingerprint == _fingerprint(recipe, tokenizer_json):
            return None
        return Tokenizer.from_json(tokenizer_json), train, val
    except (OSError, ValueError):
        return None


def _build(out_dir: Path, recipe: bytes, corpus: Corpus, val_corpus: Corpus | None, kind: str | Tokenizer,
           vocab_size: int | None, val_fraction: float) -> tuple[Tokenizer, TokenFile, TokenFile]:
    tokenizer = kind if isinstance(kind, Tokenizer) else Tokenizer.train(kind, corpus.texts(), vocab_size)
    tokenizer_json = tokenizer.to_json()
    fingerprint = _fingerprint(recipe, tokenizer_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / TOKENIZER_FILE, tokenizer_json.encode())
    size = tokenizer.vocab_size
    with TokenFileWriter(out_dir / TRAIN_FILE, size, fingerprint) as train, \
            TokenFileWriter(out_dir / VAL_FILE, size, fingerprint) as val:
        for ids in encode_documents(tokenizer, corpus.files):
            train.write(ids)
        if val_corpus is None:
            train.move_tail_to(val, int(train.count * val_fraction))
        else:
            for ids in encode_documents(tokenizer, val_corpus.files):
                val.write(ids)
        return tokenizer, train.commit(), val.commit()


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _describe_skipped(skipped: dict[str, int]) -> str:
    reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
    return f"{_plural(sum(skipped.values()), 'file')} skipped ({reasons})"


# ---------------------------------------------------------------------------------------------------------------
# Batches: random windows of a token stream, a pure function of (seed, step)


class Batches:
    """batch_size random windows of seq_len + 1 tokens per step; x is a window's first seq_len tokens, y the
    same shifted by one. Nothing is consumed or cached, so resuming at step k replays the batches an unbroken run
    would have seen, and memory does not grow with the corpus (windows are read straight from the memmap)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0):
        tokens = np.asarray(tokens.tokens if isinstance(tokens, TokenFile) else tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if len(tokens) < seq_len + 1:
            raise CorpusError(f"{_plural(len(tokens), 'token')} is too short for a window of seq_len + 1 = "
                              f"{seq_len + 1} tokens: use more text or a shorter context")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self._window = np.arange(seq_len + 1)

    def get(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both int32 of shape (batch_size, seq_len)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, step])
        # The last start is n - seq_len - 1, so a window's last target, start + seq_len, is the stream's last token.
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = self.tokens[starts[:, None] + self._window].astype(np.int32)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def eval_batches(tokens, batch_size: int, seq_len: int, n_batches: int,
                 seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of n_batches batches (the same on every call), for comparable validation losses."""
    batches = Batches(tokens, batch_size, seq_len, seed)  # here, so bad arguments raise now, not when iterated
    return (batches.get(step) for step in range(n_batches))

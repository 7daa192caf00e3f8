"""Crash-safe file replacement: a file under its real name is always either the old one or the complete new one.

New content goes to a temporary file in the same folder (os.replace is atomic only within one file system), is
flushed and fsynced, then renamed over the real name; the folder is fsynced so the rename itself is durable.

A temporary is named NAME.tmp-PID-RANDOM. The random part keeps two writers apart even when they share a process
id, as processes on two machines writing to one shared folder can. A writer that is killed leaves its temporary
behind; sweep_temporaries() removes such leftovers once nothing can be writing them any more.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

TEMPORARY_NAME = re.compile(r".\.tmp-\d+(-[0-9a-f]+)?$")  # also the pid-only names of earlier versions


def temporary_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def sweep_temporaries(folder: str | os.PathLike, *, older_than: float) -> list[Path]:
    """Deletes the temporaries in folder (not below it) last modified before older_than, and returns them.

    Only the caller can know that a temporary's writer is gone: e.g. one that holds a lock every writer of the
    folder takes, passing the time it took the lock. older_than should come from the folder's own clock (a file's
    mtime), since a shared folder's clock may differ from this machine's.
    """
    swept = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return swept
    for entry in entries:
        try:
            if TEMPORARY_NAME.search(entry.name) and entry.is_file(follow_symlinks=False) \
                    and entry.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(entry.path)
                swept.append(Path(entry.path))
        except FileNotFoundError:  # gone meanwhile
            pass
    return swept


def commit(f: BinaryIO, tmp: Path, path: str | os.PathLike) -> None:
    """Syncs and closes f (open on tmp), then renames tmp over path."""
    f.flush()
    os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible under the real name
    f.close()
    os.replace(tmp, path)
    _fsync_directory(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces path with data. On any error, Ctrl-C included, the temporary file goes and path is untouched."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Replaces path with the file that write(temporary path) creates: bytes in hand, or writers that stream to a
    path of their own (a model's tensors, written without first gathering them into one bytes object). On any
    error, Ctrl-C included, the temporary file goes and path is untouched."""
    tmp = temporary_path(path)
    try:
        # Some writers, safetensors among them, make their file readable by its owner alone: give it the
        # permissions of any other file this process creates (those of an empty file made here first).
        open(tmp, "wb").close()
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            commit(f, tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    """Best effort: the file is complete and in place already; this only makes the rename survive a crash."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory, and needs no such sync
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a directory
        pass
    finally:
        os.close(fd)

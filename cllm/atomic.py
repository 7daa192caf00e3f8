"""Crash-safe file replacement: a file under its real name is always either the old one or the complete new one.

New content goes to a temporary file in the same folder (os.replace is atomic only within one file system), is
flushed and fsynced, then renamed over the real name; the folder is fsynced so the rename itself is durable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def temporary_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def commit(f: BinaryIO, tmp: Path, path: str | os.PathLike) -> None:
    """Syncs and closes f (open on tmp), then renames tmp over path."""
    f.flush()
    os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible under the real name
    f.close()
    os.replace(tmp, path)
    _fsync_directory(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces path with data. On any error, Ctrl-C included, the temporary file goes and path is untouched."""
    tmp = temporary_path(path)
    try:
        f = open(tmp, "wb")
        with f:
            f.write(data)
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

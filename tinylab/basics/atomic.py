"""Atomic file writes: a reader sees the old file or the whole new one, never half of either."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["writable_folder", "write_atomic", "write_bytes_atomic", "write_folder_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path`.

    The temporary file is removed if `write` fails (or is interrupted). `path` naming an existing
    folder is a ValueError that says so, not an error about the temporary file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; pass a file path inside it, e.g. "
                         f"{str(path / 'adapter.tlra')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `write_atomic`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_atomic(path, write)


def write_folder_atomic(folder: Path, write) -> None:
    """Run `write(tmp_folder)` and rename the result to `folder`; the first writer wins (a folder is
complete when it holds `config.json`)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def writable_folder(folder: str | os.PathLike, name: str) -> Path:
    """Create `folder` and prove a file can be written there (64 KiB, synced, removed), before any
    work that would write into it starts. An OSError names the argument (`name`) and the folder."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise OSError(err.errno, f"{name}={str(folder)!r} is not writable ({err.strerror or err}); "
                                 "choose a folder you can write to") from err
    return folder

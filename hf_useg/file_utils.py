"""Atomic writes: a file or folder is either complete or absent, never half-written (a killed run loses no work
and leaves nothing a later run could mistake for a result)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "fsync_tree"]


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path`` (and ``path`` itself when a file), so a rename after it publishes data
    that is on disk."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` with one rename.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "model") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in root.iterdir())
    ['model']
    ```
    """
    final = Path(path)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` with one rename.

    Example:

    ```python
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "table.json"
    >>> with atomic_file(target) as tmp:
    ...     _ = tmp.write_text("[]")
    >>> target.read_text()
    '[]'
    ```
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}"
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""File writes that never leave a half-written file behind, and file hashes."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable


def tmp_path(path: str | Path) -> Path:
    """The temporary name a file is written under before it is renamed into place: ``NAME.tmp``. One writer
    per file is assumed (the name is fixed), so a crash's leftover is simply overwritten by the next attempt."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write; on leaving the block without an error it is renamed to ``path``,
    so a reader sees the old file (or none) until the new one is complete, never a truncated one."""
    tmp = tmp_path(path)
    yield tmp
    os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[IO], Any], mode: str = "w") -> Path:
    """Write ``path`` through ``write(file)`` under :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        write(f)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as UTF-8 JSON (non-ASCII kept as is) plus a newline, written atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()

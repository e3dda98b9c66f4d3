"""File integrity: atomic writes, and the sha256 that manifests and sidecars record.

Atomic writes mean readers see the old file or the complete new one, never a partial one.

Every writer in bltjax (shards, manifests, sidecars, exported checkpoints) goes through here:
write a hidden temporary sibling ``.NAME.tmp``, flush it to disk, then `os.replace` it into
place, which is atomic on POSIX filesystems. A crash leaves at most the temporary file, which
the next run overwrites (and `prepare` sweeps up).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable


def temporary_sibling(path: pathlib.Path) -> pathlib.Path:
    """The hidden temporary name a write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Writes ``data`` (bytes, or a function that writes a file at the given path) atomically."""
    path = pathlib.Path(path)
    temp = temporary_sibling(path)
    try:
        if callable(data):
            data(str(temp))
        else:
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks (shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()

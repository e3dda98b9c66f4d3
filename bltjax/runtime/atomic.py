"""File integrity: atomic writes, and the sha256 that manifests and sidecars record.

Atomic writes mean readers see the old file or the complete new one, never a partial one.

Every writer in bltjax (shards, manifests, sidecars, exported checkpoints) goes through here.
The guarantee holds on both kinds of storage, by different means:

* Local paths: write a hidden temporary sibling ``.NAME.tmp``, flush it to disk, then
  `os.replace` it into place, which is atomic on POSIX filesystems. A crash leaves at most the
  temporary file, which the next run overwrites (and `prepare` sweeps up).
* URIs (``gs://`` and the other object stores `etils.epath` opens): the object is uploaded in
  one request under its final name. An object store publishes an object only when its upload
  completes, so readers see the old object or the new one; a temporary object plus a rename
  would add nothing, because a rename there is a copy and a delete, which is not atomic.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable

from etils import epath

from bltjax.runtime import paths


def temporary_sibling(path: epath.Path) -> epath.Path:
    """The hidden temporary name a local write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: paths.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Writes ``data`` (bytes, or a function that writes a local file at the given path) atomically."""
    if paths.is_uri(path):
        _write_object(paths.resolve(path), data)
        return
    path = paths.resolve(path)
    temp = temporary_sibling(path)
    try:
        if callable(data):
            data(os.fspath(temp))
        else:
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def _write_object(path: epath.Path, data: bytes | Callable[[str], None]) -> None:
    """One upload under the final name; a writer function fills a local temporary file first."""
    if callable(data):
        with tempfile.TemporaryDirectory(prefix="bltjax-upload-") as local:
            staged = os.path.join(local, path.name)
            data(staged)
            with open(staged, "rb") as file:
                data = file.read()
    path.write_bytes(data)


def sha256_file(path: paths.PathLike) -> str:
    """Hex sha256 of a file or object, read in 8 MiB blocks (shards can be large)."""
    digest = hashlib.sha256()
    with paths.resolve(path).open("rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()

"""One way to turn a user's path into a path object: local folders and cloud URIs alike.

Every program and library function that takes a workdir, data folder, checkpoint or output path
goes through `resolve`. Local paths become absolute (so a relaunch from another directory finds
the same run); ``gs://``, ``s3://`` and the other URIs that `etils.epath` knows stay as they are.
`pathlib.Path("gs://b/x").absolute()` would instead give ``<cwd>/gs:/b/x``, the bug this avoids.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


class PathError(ValueError):
    """A path that cannot be used here: an unknown URI scheme, or a remote path where only a local one works."""


def is_uri(path: PathLike) -> bool:
    """True for ``scheme://...`` paths (cloud storage and other fsspec filesystems)."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """An absolute local path, or the URI unchanged; a clear error for a scheme epath cannot open."""
    text = os.fspath(path)
    if not is_uri(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    scheme = text.split("://", 1)[0] + "://"
    try:
        return epath.Path(text)
    except KeyError:
        from etils.epath import register  # noqa: PLC0415 - only to list the schemes in the message

        known = ", ".join(sorted(register._URI_PREFIXES_TO_CLS))  # noqa: SLF001 - epath has no public list
        raise PathError(f"{text}: unsupported URI scheme {scheme!r}; expected a local path or one of {known}") from None


def require_local(path: PathLike, what: str) -> epath.Path:
    """For the few things that need a real local file (subprocess launch scripts, mmap); says so up front."""
    if is_uri(path):
        raise PathError(f"{os.fspath(path)}: {what} must be a local path, not a URI")
    return resolve(path)

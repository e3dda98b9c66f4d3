"""A persistent XLA compilation cache for the command-line tools.

Compiling a BLT train step takes tens of seconds on a CPU host (and minutes for big models on
TPU), and every relaunch of a pre-empted run compiles the same programs again. jax's
persistent cache turns the second compilation into a file read.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENV_VAR = "BLTJAX_COMPILE_CACHE"


def default_cache_dir() -> pathlib.Path:
    """$BLTJAX_COMPILE_CACHE, else $XDG_CACHE_HOME/bltjax/jax (~/.cache/bltjax/jax)."""
    if os.environ.get(ENV_VAR):
        return pathlib.Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "bltjax" / "jax"


def enable(directory: str | os.PathLike | None = None, min_compile_seconds: float = 1.0) -> pathlib.Path | None:
    """Turns the cache on (unless $BLTJAX_COMPILE_CACHE is "off"); returns its directory."""
    if os.environ.get(ENV_VAR, "").lower() == "off":
        return None
    path = pathlib.Path(directory) if directory else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path

"""Command-line helpers shared by the bltjax programs."""

from __future__ import annotations

from collections.abc import Sequence


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Accepts ``--max-bytes`` as well as absl's ``--max_bytes``: dashes in flag names become underscores.

    Only the name before ``=`` changes; values are left alone.
    """
    out = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("---"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out

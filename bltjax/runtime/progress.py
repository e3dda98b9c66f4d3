"""One progress line for the long loops of bltjax's programs (prepare, entropy sidecars), on stderr.

    from bltjax.runtime.progress import print_above, progress_bar

    with progress_bar("entropy", total=n_tokens, unit=" tokens") as bar:
        for chunk in work:
            bar.update(len(chunk))
    print_above("prepare: warning: ...")  # a message that does not tear the line apart

Only process 0 of a joined multi-process run prints (a lone process always may), so N hosts
show one line, not N. It is a tqdm bar: these loops count bytes and tokens rather than
training steps, which is what tqdm measures (rates, SI or binary unit prefixes, terminal
width) and clears its line for messages, while clu's ReportProgress reports steps per second through a metric writer.
Numbers a program needs afterwards (bytes read, seconds) are counted by the program itself:
a disabled bar counts nothing.
"""

from __future__ import annotations

import sys
from typing import TextIO

import tqdm

TTY_INTERVAL_S = 0.5  # a terminal redraws its one line in place
LOG_INTERVAL_S = 10.0  # a log file gets a line every so often, not a line per update


def is_primary_process() -> bool:
    """True unless this is a joined multi-process jax run and not its process 0.

    Never starts jax's backends itself (prepare, which uses no jax, stays free of it).
    """
    jax = sys.modules.get("jax")
    return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


def progress_bar(
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    binary: bool = False,
    enabled: bool = True,
    file: TextIO | None = None,
) -> tqdm.tqdm:
    """A tqdm bar named ``desc`` on ``file`` (default stderr); a silent one when not ``enabled`` or not process 0.

    ``binary=True`` counts bytes in multiples of 1024 (tqdm's convention writes them ``kB``,
    ``MB``); otherwise ``unit`` gets SI prefixes (``12.3k tokens/s``).
    """
    stream = sys.stderr if file is None else file
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm.tqdm(
        desc=desc,
        total=total,
        unit="B" if binary else unit,
        unit_scale=True,
        unit_divisor=1024 if binary else 1000,
        disable=not (enabled and is_primary_process()),
        file=stream,
        mininterval=TTY_INTERVAL_S if tty else LOG_INTERVAL_S,
        dynamic_ncols=tty,
        ascii=not tty,  # log files get plain "#" bars, not block characters
    )


def print_above(message: str, file: TextIO | None = None) -> None:
    """Prints ``message`` on its own line above any bar of ``file`` (default stderr), which is then redrawn."""
    tqdm.tqdm.write(message, file=sys.stderr if file is None else file)

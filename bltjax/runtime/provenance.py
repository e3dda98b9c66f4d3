"""When and where a run happened, as the JSON records of programs and benchmarks state it.

One stamp for every record that a document later renders (benchmarks/tables.py prints its
``date`` and ``machine``), so the records of different programs read alike.
"""

from __future__ import annotations

import datetime
import os
import platform


def run_stamp() -> dict[str, str]:
    """{"date": "2026-12-04 14:10 UTC", "machine": "x86_64, 2 cores"} for now and this host."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }

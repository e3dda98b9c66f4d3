"""The one progress helper of the long loops (bltjax/runtime/progress.py): tqdm, process 0 only."""

from __future__ import annotations

import io

import jax

from bltjax.runtime import progress


def test_bar_reports_count_rate_and_postfix():
    stream = io.StringIO()
    with progress.progress_bar("prepare", binary=True, file=stream) as bar:
        bar.update(3 * 2**20)
        bar.set_postfix_str("12 documents, 1 shards", refresh=False)
    line = stream.getvalue().splitlines()[-1]
    assert line.lstrip("\r").startswith("prepare: 3.00MB") and "B/s" in line and "12 documents, 1 shards" in line


def test_disabled_bar_and_other_processes_print_nothing(monkeypatch):
    stream = io.StringIO()
    with progress.progress_bar("entropy", total=10, unit=" tokens", enabled=False, file=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""
    assert progress.is_primary_process()  # a lone process, whatever jax's state
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not progress.is_primary_process()
    with progress.progress_bar("entropy", total=10, unit=" tokens", file=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""  # process 1 of a joined run stays quiet


def test_print_above_keeps_messages_on_their_own_line():
    stream = io.StringIO()
    with progress.progress_bar("prepare", file=stream) as bar:
        bar.update(1)
        progress.print_above("prepare: warning: x.txt: skipped", file=stream)
    assert "prepare: warning: x.txt: skipped\n" in stream.getvalue()

"""Smoke test of benchmarks/train.py: its bltjax row runs end to end on a tiny model and prints the table.

Only the script's plumbing is checked (child process, train step, table, JSON); the numbers of a
tiny model on a shared CPU mean nothing. The transformers reference and the byte LM baseline are
skipped to keep it well under a minute.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train.py"


@pytest.mark.slow
def test_train_benchmark_prints_table(tmp_path):
    out = tmp_path / "train.json"
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--seq-len", "128", "--batch", "1", "--steps", "1",
               "--skip-hf", "--skip-baseline", "--skip-components", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| row |"))
    for column in ("bytes/s", "step s", "compile s", "FLOPs/byte", "achieved GFLOP/s", "MFU", "peak RSS MiB"):
        assert column in header
    blt_row = next(line for line in lines if line.startswith("| bltjax BLT |"))
    cells = [cell.strip() for cell in blt_row.strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0  # bytes/s
    assert "skipped" in next(line for line in lines if line.startswith("| HF torch BLT |"))
    assert "skipped" in next(line for line in lines if line.startswith("| bltjax byte LM |"))

    report = json.loads(out.read_text())
    blt = report["results"]["bltjax_blt"]
    assert report["seq_len"] == 128 and report["batch"] == 1
    assert blt["bytes_per_s"] > 0 and blt["peak_rss_mib"] >= blt["base_rss_mib"] > 0
    assert blt["flops_per_byte"]["matmul"]["train"] > 0 and 0 < blt["mfu"]
    assert blt["mean_patch_size"] > 1

"""Measured figures in README.md and docs/*.md equal the benchmark JSON they are rendered from (benchmarks/tables.py).

A benchmark rerun that is not rendered, or a figure edited by hand, fails here; so does a
changed JSON value. `python benchmarks/tables.py` rewrites the figures.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("tables", REPO / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tables"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tables = _tables()
sources = importlib.import_module("benchmarks.sources")  # importable once tables.py put the repo on sys.path


@pytest.fixture
def copy(tmp_path):
    """README, docs and benchmarks copied into a scratch root the test may change."""
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copytree(REPO / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def edit_json(root: pathlib.Path, name: str, change) -> None:
    path = root / "benchmarks" / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1) + "\n")


def test_readme_and_docs_figures_match_their_json():
    reports = tables.drift(REPO)
    assert not reports, "figures differ from their JSON; run `python benchmarks/tables.py`:\n" + "\n".join(reports)


def test_every_block_names_the_date_and_machine_of_its_run():
    for name, block in tables.BLOCKS.items():
        data = json.loads((REPO / block.source).read_text())
        rendered = block.render(data)
        assert str(data["date"]) in rendered and str(data["machine"]) in rendered, name


@pytest.mark.parametrize(
    "name, change, figure",
    [
        ("generate.json", lambda d: d["rows"][0].update(bytes_per_s=99.5), "99.5"),
        ("train.json", lambda d: d["ratios"]["speedup_vs_hf"].update(value=1.5), "**1.50x**"),
        ("data.json", lambda d: d["results"][0]["pipeline"].update(bytes_per_s=12.5e6), "12.50"),
        ("pod_variants.json", lambda d: d["rows"][1].update(peak_gib=52.25), "52.25 GiB"),
        ("generate.json", lambda d: d.update(date="2031-01-02 03:04 UTC"), "2031-01-02 03:04 UTC"),
        ("padding.json", lambda d: d["results"][1].update(padded_patch_fraction=0.125), "12.5%"),
        ("records/scan_layers.json", lambda d: d["rows"][1].update(compile_s=99.25), "99.2 s"),
        ("records/multislice.json", lambda d: d["rows"][1].update(peak_gib=42.75), "42.75 GiB"),
        ("records/quickstart.json", lambda d: d.update(total_seconds=321.0), "`total 321 s`"),
        ("records/compile_blt_1b_v5p-128.json", lambda d: d.update(peak_bytes=20 * 2**30), "20.00 GiB per chip"),
        ("records/compile_blt_1b_v5p-128.json", lambda d: d.update(table="printout"), "printout"),
        ("../docs/results/study.json", lambda d: d["groups"][0].update(mean=1.2345), "1.234 ±"),
        ("../docs/results/study.json", lambda d: d["claims"][0].update(status="not measured"), "| not measured |"),
    ],
    ids=[
        "generate",
        "train",
        "data",
        "pod_variants",
        "date",
        "padding",
        "scan_layers",
        "multislice",
        "quickstart",
        "compile-fit",
        "compile-report",
        "results",
        "verdict",
    ],  # fmt: skip
)
def test_a_changed_json_value_fails_the_check_until_rendered(copy, name, change, figure):
    assert tables.drift(copy) == []
    edit_json(copy, name, change)
    reports = tables.drift(copy)
    assert reports and any(line.startswith("+") and figure in line for line in "\n".join(reports).splitlines())
    changed = tables.write(copy)
    assert changed and tables.drift(copy) == []
    assert any(figure in path.read_text() for path in changed)


def test_hand_edited_figure_fails_the_check(copy):
    readme = copy / "README.md"
    readme.write_text(readme.read_text().replace("| 42 % |", "| 44 % |", 1))
    (report,) = tables.drift(copy)
    assert "-| bltjax BLT" in report and "+| bltjax BLT" in report


def test_check_command_exits_1_on_drift_and_0_when_rendered(copy):
    edit_json(copy, "train.json", lambda d: d["results"]["bltjax_blt"].update(step_s=9.25))
    command = [sys.executable, str(REPO / "benchmarks" / "tables.py"), "--root", str(copy)]
    result = subprocess.run([*command, "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "9.25" in result.stdout, result.stderr
    assert subprocess.run(command, capture_output=True, text=True, timeout=60).returncode == 0
    result = subprocess.run([*command, "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- generated by benchmarks/tables.py: nope from benchmarks/x.json -->\nx\n<!-- end generated -->",
         r"README.md:1: unknown generated block 'nope'"),
        ("a\n<!-- generated by benchmarks/tables.py: training from benchmarks/data.json -->\nx\n<!-- end generated -->",
         r"README.md:2: block 'training' is rendered from benchmarks/train.json, not benchmarks/data.json"),
        ("<!-- generated by benchmarks/tables.py: training from benchmarks/train.json -->\nx\n",
         r"block 'training' has no '<!-- end generated -->'"),
        ("<!-- generated by benchmarks/tables.py: training-summary from benchmarks/train.json -->\nx\n"
         "<!-- end generated -->", r"block 'training-summary' is inline"),
    ],
    ids=["unknown", "wrong-source", "unclosed", "inline-on-lines"],
)  # fmt: skip
def test_bad_markers_are_named(copy, text, message):
    (copy / "README.md").write_text(text)
    with pytest.raises(tables.FigureError, match=message):
        tables.drift(copy)


def test_missing_json_field_names_file_and_field(copy):
    edit_json(copy, "generate.json", lambda d: d.pop("date"))
    with pytest.raises(tables.FigureError, match=r"benchmarks/generate.json \(for README.md:\d+.*missing field 'date'"):
        tables.drift(copy)


def test_a_block_dropped_from_the_docs_is_reported(copy):
    launching = copy / "docs" / "launching.md"
    launching.write_text(launching.read_text().replace("tables.py: pod-variants", "tables.py: gone"))
    with pytest.raises(tables.FigureError, match="unknown generated block 'gone'"):
        tables.drift(copy)
    launching.write_text(launching.read_text().replace("<!-- generated by benchmarks/tables.py: gone", "<!-- x"))
    with pytest.raises(tables.FigureError, match=r"rendered nowhere.*'pod-variants'"):
        tables.drift(copy)


def test_generation_table_has_one_cached_rate_per_row_and_ratios_against_it():
    data = json.loads((REPO / "benchmarks" / "generate.json").read_text())
    lines = [line for line in tables.generation_table(data).splitlines() if line.startswith("| `")]
    pairs = tables.generation_pairs(data)
    assert len(lines) == len(pairs)
    for line, (cached, other) in zip(lines, pairs, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2] == tables.rate(cached["bytes_per_s"])
        assert cells[6] == f"{tables.times(cached['bytes_per_s'] / other['bytes_per_s'])} faster"


# --- prose quoting a record, and measured figures without any source ------------------------------------------

RECORD = {
    "date": "2026-12-03",
    "machine": "2-core x86_64 CPU",
    "recorded_at_commit": "abc1234",
    "command": "python timing.py",
    "figures": {"decoder layer, forward": "819 -> 370 ms", "speed-up": "2.2x"},
}
REGION = (
    "- a note\n  <!-- figures from benchmarks/records/x.json -->\n  One layer ran 2.2x faster (819 ->\n"
    "  370 ms).\n  <!-- end figures -->\n- next\n"
)


def _render_region(text: str, record: dict = RECORD) -> str:
    return sources.render_figures(text, "doc.md", lambda source: record)[0]


def test_a_quoted_region_gets_its_provenance_line_and_keeps_its_indentation():
    rendered = _render_region(REGION)
    assert "  370 ms).\n\n  Measured: run of 2026-12-03 on 2-core x86_64 CPU, at commit abc1234 (" in rendered
    assert rendered.endswith("(`benchmarks/records/x.json`, with its command).\n  <!-- end figures -->\n- next\n")
    assert _render_region(rendered) == rendered  # rendering twice changes nothing
    inline = "a <!-- figures from benchmarks/records/x.json -->2.2x (819 -> 370 ms)<!-- end figures --> b"
    assert _render_region(inline).endswith("370 ms) (Measured: run of 2026-12-03 on 2-core x86_64 CPU, at commit "
                                           "abc1234 (`benchmarks/records/x.json`, with its command))"
                                           "<!-- end figures --> b")  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda text, rec: (text.replace("2.2x", "2.3x"), rec), r"figure 'speed-up' \('2.2x'\) does not appear"),
        (lambda text, rec: (text, {**rec, "figures": {**rec["figures"], "speed-up": "2.4x"}}), r"'2.4x'\) does not"),
        (lambda text, rec: (text.replace("faster", "faster in 5 s"), rec), r"'5 s' is in none of the record's"),
        (lambda text, rec: (text.replace("(819", "(818"), rec), r"\('819 -> 370 ms'\) does not appear"),
        (lambda text, rec: (text, {k: v for k, v in rec.items() if k != "figures"}), r"missing field 'figures'"),
        (lambda text, rec: (text.replace("<!-- end figures -->", ""), rec), r"have no '<!-- end figures -->'"),
    ],
    ids=["prose-edited", "record-changed", "unquoted-figure", "number-edited", "no-figures", "unclosed"],
)
def test_prose_and_record_that_disagree_fail_naming_both(change, message):
    text, record = change(REGION, RECORD)
    with pytest.raises(sources.FigureError, match=message):
        _render_region(text, record)


def test_no_measured_figure_in_readme_or_docs_lacks_a_source():
    problems = sources.unsourced(REPO)
    assert not problems, "quote these from a record, render them, or (settings only) add them to NOT_MEASURED:\n" + (
        "\n".join(problems)
    )


def test_the_source_check_sees_new_figures_and_stale_exemptions(copy):
    guide = copy / "docs" / "evaluation.md"
    guide.write_text(guide.read_text() + "\nA new run took 12.5 s and 3.2 GiB, 1.4x faster.\n")
    problems = [p for p in sources.unsourced(copy) if p.startswith("docs/evaluation.md")]
    assert [p.split(": ", 1)[1] for p in problems] == [
        "'12.5 s' has no source (quote it from a record)",
        "'3.2 GiB' has no source (quote it from a record)",
        "'1.4x' has no source (quote it from a record)",
    ]
    guide.write_text(guide.read_text().replace("randomly removes 10% of the characters", "drops characters"))
    stale = "docs/evaluation.md: NOT_MEASURED phrase 'randomly removes 10% of the characters' no longer appears"
    assert stale in sources.unsourced(copy)
    checked = "\n<!-- checked by tests/test_x.py::test_y -->\n| 4.2% |\n<!-- end checked -->\n"
    guide.write_text(guide.read_text() + checked + "and 7 s outside it\n")
    reported = [p.split(": ", 1)[1] for p in sources.unsourced(copy) if p.startswith("docs/evaluation.md:")]
    assert reported[-1] == "'7 s' has no source (quote it from a record)" and not any("4.2%" in p for p in reported)


def test_the_measured_pattern_takes_units_and_ratios_but_not_shapes():
    text = "4 x 4096 bytes, 16 KiB rows, 834-863 ms, ~300 MiB, 2.2x, 20 %, 1.9 TFLOP, 3.1e8 FLOPs, v5p-128"
    # A range's first number has no unit of its own: the record's figure "834-863 ms" covers it.
    assert [m.group(0) for m in sources.MEASURED.finditer(text)] == ["863 ms", "~300 MiB", "2.2x", "20 %", "1.9 TFLOP"]

"""README and docs point at the tests that show their claims, and those tests exist.

A claim in README.md or docs/*.md names its test as `tests/test_x.py::test_name`. These tests
fail when a named test is renamed or removed (the reference would silently point nowhere) and
when a row of the README's status table names no test at all.
"""

from __future__ import annotations

import ast
import functools
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_REFERENCE = re.compile(r"tests/(test_\w+\.py)::(\w+)")
TEST_FILE = re.compile(r"tests/(test_\w+\.py)\b")


@functools.cache
def _test_functions(file_name: str) -> frozenset[str]:
    """Names of the module-level test functions a test file defines (pytest collects them)."""
    tree = ast.parse((ROOT / "tests" / file_name).read_text(encoding="utf-8"))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return frozenset(node.name for node in tree.body if isinstance(node, functions) and node.name.startswith("test"))


def _references(text: str) -> list[tuple[int, str, str]]:
    """(line number, test file, test name) for every `tests/test_x.py::name` in a document."""
    return [
        (line_number, match.group(1), match.group(2))
        for line_number, line in enumerate(text.splitlines(), start=1)
        for match in TEST_REFERENCE.finditer(line)
    ]


def _status_rows(readme: str) -> list[tuple[str, str]]:
    """(part, whole row) for each body row of the table under README's '## Status' heading."""
    section = re.split(r"^## Status\n", readme, maxsplit=1, flags=re.MULTILINE)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows and rows[0].startswith("| part |"), "README's Status section lost its table"
    return [(row.split("|")[1].strip(), row) for row in rows[1:]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_test_a_document_names_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for line_number, file_name, name in _references(text):
        if not (ROOT / "tests" / file_name).is_file():
            missing.append(f"{doc.name}:{line_number}: tests/{file_name} does not exist")
        elif name not in _test_functions(file_name):
            missing.append(f"{doc.name}:{line_number}: tests/{file_name} defines no test {name!r}")
    for line_number, line in enumerate(text.splitlines(), start=1):
        for match in TEST_FILE.finditer(line):
            if not (ROOT / "tests" / match.group(1)).is_file():
                missing.append(f"{doc.name}:{line_number}: tests/{match.group(1)} does not exist")
    assert not missing, "\n".join(missing)


def test_every_status_row_names_a_test():
    rows = _status_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(rows) >= 10
    untested = [part for part, row in rows if not TEST_REFERENCE.search(row)]
    assert not untested, f"README status rows without a `tests/test_x.py::name` reference: {untested}"


def _sections(text: str) -> dict[str, str]:
    """'## ' heading -> the text under it, up to the next '## ' heading."""
    parts = re.split(r"^## (.+)\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


# README sections that promise behaviour; each names at least one test.
BEHAVIOUR_SECTIONS = [
    "Install",
    "The main job",
    "Training",
    "Evaluation",
    "Generation",
    "Sweeping patch size at a fixed FLOP budget",
    "Launching beyond one machine",
    "Configs",
    "Data",
    "Using Hugging Face checkpoints",
    "Layout",
]


def test_every_behaviour_section_and_guide_names_a_test():
    sections = _sections((ROOT / "README.md").read_text(encoding="utf-8"))
    missing = [name for name in BEHAVIOUR_SECTIONS if name not in sections]
    assert not missing, f"README lost the sections {missing}; update BEHAVIOUR_SECTIONS"
    untested = [name for name in BEHAVIOUR_SECTIONS if not TEST_REFERENCE.search(sections[name])]
    assert not untested, f"README sections without a `tests/test_x.py::name` reference: {untested}"
    for guide in ("data.md", "launching.md", "sweeps.md", "design.md", "architecture.md"):
        assert TEST_REFERENCE.search((ROOT / "docs" / guide).read_text(encoding="utf-8")), f"docs/{guide} names no test"


def test_the_checks_catch_a_renamed_test_and_an_untested_row():
    """The parsers above see what they must: a reference to a missing test, a row without one."""
    assert _references("see `tests/test_patch_ids.py::test_spec_pid_dpid_example` and x") == [
        (1, "test_patch_ids.py", "test_spec_pid_dpid_example")
    ]
    assert "test_spec_pid_dpid_example" in _test_functions("test_patch_ids.py")
    assert "test_no_such_test" not in _test_functions("test_patch_ids.py")
    readme = "## Status\n\n| part | state |\n|---|---|\n| a | b (`tests/test_a.py::test_b`) |\n| c | d |\n\n## Next\n"
    rows = _status_rows(readme)
    assert [part for part, row in rows if not TEST_REFERENCE.search(row)] == ["c"]


def test_the_launching_guide_lists_the_memory_the_compiler_assumes():
    """docs/launching.md's target table names the HBM that `bltjax.compile` checks against (runtime/aot.py)."""
    from bltjax.runtime.aot import ACCELERATORS

    text = (ROOT / "docs" / "launching.md").read_text(encoding="utf-8")
    rows = {re.findall(r"`(\w+)-N`", row)[0]: row for row in text.splitlines() if re.match(r"\| `[a-z0-9]+-N`", row)}
    tpus = [name for name, acc in ACCELERATORS.items() if acc.platform == "tpu"]
    assert sorted(rows) == sorted([*tpus, "h100"]), "docs/launching.md: one row per TPU generation and the GPU row"
    for name in tpus:
        assert f"| {ACCELERATORS[name].hbm_gib:g} GiB |" in rows[name], f"docs/launching.md: the {name} row's HBM"
        per = "N/2 chips" if ACCELERATORS[name].count_per_device == 2 else "N chips"
        assert per in rows[name], f"docs/launching.md: the {name} row's device count"
    gpus = " / ".join(f"{ACCELERATORS[n].hbm_gib:g}" for n in ("h100", "h200", "a100"))
    assert f"| {gpus} GiB |" in rows["h100"], "docs/launching.md: the GPU row's HBM"


# A section that promises nothing bltjax does (notation, the paper's own numbers, a how-to whose
# commands are run elsewhere) says so, with its reason, instead of naming a test.
NO_CLAIM = re.compile(r"<!-- no behaviour claim: [^>]*\w[^>]*-->")
HEADING = re.compile(r"^(#{2,4}) (.+)$")
GENERATED_PAGES = {"results.md"}  # written whole by a program from its JSON (tests/test_paper_ordering.py)


def _headed_sections(text: str) -> list[tuple[int, str, str]]:
    """(line, heading, the text up to the next heading of any level) for every ##/###/#### heading
    outside fenced code blocks."""
    sections, fenced, current = [], False, None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else HEADING.match(line)
        if heading or (not fenced and line.startswith("# ")):
            if current:
                sections.append(current)
            current = (number, heading.group(2), "") if heading else None
        elif current:
            current = (current[0], current[1], current[2] + line + "\n")
    if current:
        sections.append(current)
    return sections


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d.name not in GENERATED_PAGES], ids=lambda path: path.relative_to(ROOT).as_posix()
)
def test_every_section_names_its_test_or_says_it_claims_nothing(doc):
    text = doc.read_text(encoding="utf-8")
    untested = [
        f"{doc.name}:{line}: {heading}"
        for line, heading, body in _headed_sections(text)
        if not TEST_REFERENCE.search(body) and not NO_CLAIM.search(body)
    ]
    assert not untested, (
        "sections that name no `tests/test_x.py::name` and carry no `<!-- no behaviour claim: why -->`:\n"
        + "\n".join(untested)
    )


def test_the_section_check_sees_headings_claims_and_code_blocks():
    text = (
        "# Title\n\nintro\n\n## A\n\nsee `tests/test_a.py::test_b`\n\n### B\n\nuntested\n\n"
        "```bash\n# not a heading\n```\n\n## C\n<!-- no behaviour claim: notation only -->\n"
    )
    sections = _headed_sections(text)
    assert [heading for _, heading, _ in sections] == ["A", "B", "C"]
    assert [bool(TEST_REFERENCE.search(b) or NO_CLAIM.search(b)) for _, _, b in sections] == [True, False, True]
    assert not NO_CLAIM.search("<!-- no behaviour claim: -->")


def test_the_bundled_corpus_is_as_large_as_the_data_guide_says():
    """docs/data.md gives the bundled corpus's size in text bytes (JSONL `text` fields and plain files)."""
    corpus = ROOT / "bltjax" / "data" / "corpus"
    text_bytes = 0
    for file in corpus.iterdir():
        if file.suffix == ".jsonl":
            lines = file.read_text(encoding="utf-8").splitlines()
            text_bytes += sum(len(json.loads(line)["text"].encode()) for line in lines if line.strip())
        elif file.suffix == ".txt":
            text_bytes += file.stat().st_size
    megabytes = text_bytes / 1e6
    text = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    assert f"-->{megabytes:.1f} MB<!-- end checked --> of text" in text, f"the corpus holds {megabytes:.1f} MB"

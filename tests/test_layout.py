"""The package layout keeps its promises: no import cycles, lower layers never import higher
ones, no oversized module, no reference to a document the repository does not ship.

These read the source (ast and text), so they are fast and need no jax.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bltjax"
MAX_MODULE_LINES = 600
# Which top-level parts of bltjax a part may not import (the data's way, bottom to top:
# tokenizer -> kernels -> models -> patching -> data -> training -> inference -> sweep).
FORBIDDEN_IMPORTS = {
    "tokenizer": ("kernels", "models", "patching", "data", "training", "inference", "sweep", "convert"),
    "kernels": ("models", "patching", "data", "training", "inference", "sweep", "convert"),
    "models": ("patching", "data", "training", "inference", "sweep", "convert"),
    "patching": ("kernels", "models", "data", "training", "inference", "sweep", "convert"),
    "data": ("training", "inference", "sweep"),
    "training": ("inference", "sweep"),
    "inference": ("sweep",),
    # The on-disk formats sit beside config: data (the entropy pass), training and inference read them.
    "checkpoints": ("data", "training", "inference", "sweep"),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_files() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "corpus" not in p.parts)


def _is_module(name: str) -> bool:
    path = REPO / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> set[str]:
    """bltjax modules that ``path`` imports, anywhere in the file (lazy imports included)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("bltjax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("bltjax"):
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if _is_module(child) else base)
    return {name for name in found if _is_module(name)}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in _library_files()}
    return {name: _imports(path) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_the_import_graph_is_read_from_source():
    graph = _graph()
    assert "bltjax.models.blt" in graph
    assert "bltjax.models.configs" in graph["bltjax.models.blt"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # the detector detects


def test_no_module_imports_one_that_imports_it_back():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("part", sorted(FORBIDDEN_IMPORTS))
def test_lower_layers_never_import_higher_ones(part):
    bad = []
    for module, imported in _graph().items():
        if module.split(".")[1:2] != [part] and module != f"bltjax.{part}":
            continue
        for name in imported:
            target = name.split(".")[1] if name.count(".") else ""
            if target in FORBIDDEN_IMPORTS[part]:
                bad.append(f"{module} imports {name}")
    assert bad == []


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(REPO)): n for p in _library_files() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines"


def _shipped_text_files() -> list[pathlib.Path]:
    roots = [PACKAGE, REPO / "docs", REPO / "tests", REPO / "benchmarks", REPO / "experiments", REPO / "launch"]
    files = [REPO / "README.md"] + [p for root in roots for p in root.rglob("*") if p.is_file()]
    return [p for p in files if p.suffix in (".py", ".md", ".sh", ".sbatch") and "corpus" not in p.parts]


def test_no_reference_to_a_spec_outside_the_repository():
    pattern = re.compile(r"\bspec §|shared/spec")
    this_file = pathlib.Path(__file__).resolve()
    bad = [str(p.relative_to(REPO)) for p in _shipped_text_files() if p != this_file and pattern.search(p.read_text())]
    assert bad == [], "cite docs/architecture.md or the paper instead"


def test_architecture_doc_has_every_section_the_code_cites():
    doc = (REPO / "docs" / "architecture.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", doc, flags=re.M))
    cited = set()
    for path in _shipped_text_files():
        cited.update(re.findall(r"architecture\.md §(\d+(?:\.\d+)?)", path.read_text()))
    missing = sorted(cited - sections, key=lambda s: [int(x) for x in s.split(".")])
    assert cited and missing == []


def test_library_code_does_not_find_experiments_next_to_the_package():
    bad = []
    for path in _library_files():
        text = path.read_text()
        if "__file__" in text and re.search(r"[\"']experiments[\"']", text):
            bad.append(str(path.relative_to(REPO)))
    assert bad == [], "an installed package has no experiments/ folder beside it"

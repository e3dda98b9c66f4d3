"""Builds the bundled corpus (the ``*.jsonl`` files next to this script) from Debian packages.

  python bltjax/data/corpus/build_corpus.py            # apt-get update + download, then write the files
  python bltjax/data/corpus/build_corpus.py --check    # rebuild into a temp folder, compare with the committed files

Why: the project's default data must be real human-written text (English prose, other
languages and scripts, code) that is small enough to commit, free to redistribute, and
reproducible by anyone. Debian's archive keeps exact package versions, licences
(``usr/share/doc/PKG/copyright``) and content, so every file here can be rebuilt and audited.

How: ``apt-get download`` fetches the ``.deb`` files of PACKAGES into a work folder (nothing is
installed), ``dpkg-deb -x`` unpacks them into ``WORK/root``, and the selections listed in
OUTPUTS below are turned into JSONL files, one document per line:
``{"source": "<package>:<path or passage>[#<number>]", "text": "<document>"}`` (keys sorted, UTF-8,
``ensure_ascii=False``). The selection is fixed by name (books, chapters, files), never by
size or randomness, so the same package versions give the same bytes; a version other than
the one in PACKAGES is reported, because its content may differ. ``PROVENANCE.md`` records
package, version, path, licence and selection of every file. Needs a Debian bookworm system
with apt-get and dpkg-deb; run as root for ``apt-get update`` or pass ``--no-update``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

HERE = pathlib.Path(__file__).resolve().parent

# Package -> the version the committed files were built from (Debian 12 "bookworm").
PACKAGES = {
    "bible-kjv": "4.38",  # the `bible` program that decompresses the text
    "bible-kjv-text": "4.38",
    "jargon-text": "4.4.7-4.1",
    "fortunes": "1:1.99.1-7.3",
    "fortunes-min": "1:1.99.1-7.3",
    "fortunes-it": "1.99-4.1",
    "fortunes-es": "1.36",
    "fortunes-ru": "1.52-3.1",
    "fortunes-zh": "2.98",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
}

FORTUNES = "usr/share/games/fortunes"

# King James Version: whole books, one document per chapter.
KJV_BOOKS = (
    "Genesis",
    "Ruth",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Matthew",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "James",
    "Revelation",
)

# Jargon File 4.4.7: chapters 1-12, glossary letters, Appendix B; one document per chapter/letter.
JARGON_GLOSSARY_LETTERS = ("A", "B", "C")

# Fortune files, taken whole (every fortune), one document per fortune.
FORTUNES_EN = ("literature", "wisdom", "people")  # literature from fortunes-min, the others from fortunes
FORTUNES_IT = ("it/computer", "it/definizioni", "it/formiche", "it/leggi", "it/luke", "it/norm", "it/paolotedeschi")
FORTUNES_ES = tuple(
    f"es/{name}.fortunes"
    for name in (
        "amistad",
        "arte",
        "ciencia",
        "filosofia",
        "humanos",
        "libertad",
        "poder",
        "sabiduria",
        "sentimientos",
        "verdad",
        "vida",
    )
)
FORTUNES_RU = ("ru/book", "ru/knowledge", "ru/friendship", "ru/truth", "ru/time")
FORTUNES_ZH = ("tang300", "song100")  # Tang and Song dynasty poems; colour escape codes are removed

# Python 3.11 standard library modules (PSF licence only: logging, multiprocessing, sqlite3,
# asyncio, tarfile and turtle carry other notices and are left out); one document per file.
PYTHON_MODULES = (
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "cmd.py",
    "colorsys.py",
    "contextlib.py",
    "csv.py",
    "dataclasses.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "json/tool.py",
    "operator.py",
    "pathlib.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "sched.py",
    "secrets.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
    "timeit.py",
    "tokenize.py",
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(command: list[str], cwd: pathlib.Path | None = None, env: dict | None = None) -> str:
    """Runs a command and returns its stdout; a failure stops the build with the command named."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"build_corpus: `{' '.join(command)}` failed ({result.returncode}): {result.stderr.decode()[-2000:]}")
    return result.stdout.decode("utf-8")


def fetch(work: pathlib.Path, update: bool) -> pathlib.Path:
    """Downloads and unpacks PACKAGES into WORK/root; returns the root, warns on other versions."""
    debs, root = work / "debs", work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    if update:
        run(["apt-get", "update"])
    run(["apt-get", "download", *PACKAGES], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        name, version = run(["dpkg-deb", "-f", str(deb), "Package", "Version"]).split("\n")[:2]
        name, version = name.split(": ", 1)[1], version.split(": ", 1)[1]
        if name in PACKAGES and PACKAGES[name] != version:
            print(f"build_corpus: warning: {name} {version}, the committed files are from {PACKAGES[name]}")
        run(["dpkg-deb", "-x", str(deb), str(root)])
    return root


def fortunes(path: pathlib.Path) -> Iterator[str]:
    """The fortunes of a strfile source: blocks separated by '%' lines (trailing blanks allowed: source typos)."""
    text = _ANSI.sub("", path.read_text(encoding="utf-8"))
    for block in re.split(r"^%[ \t]*\n", text, flags=re.MULTILINE):
        block = "\n".join(line.rstrip() for line in block.strip("\n").split("\n")).strip("\n")
        if block.strip():
            yield block + "\n"


def fortune_documents(root: pathlib.Path, package: str, names: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for name in names:
        for number, text in enumerate(fortunes(root / FORTUNES / name), start=1):
            yield f"{package}:{name}#{number}", text  # path relative to FORTUNES


def kjv_documents(root: pathlib.Path) -> Iterator[tuple[str, str]]:
    """KJV_BOOKS, one chapter per document: 'Book N', a blank line, then one verse per line.

    The `bible` program wraps verses at a column width; lines are re-joined so the text does
    not depend on the terminal.
    """
    env = dict(os.environ, COLUMNS="80")
    dump = run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"], env=env)
    lines = dump.split("\n")
    chapters: dict[str, list[str]] = {}
    books = "|".join(re.escape(b) for b in KJV_BOOKS)
    header = re.compile(r"^((?:[123] )?[A-Z][A-Za-z ]+) (\d+)$")
    verse = re.compile(r"^\s+(\d+) (.*)$")
    current: list[str] | None = None
    for i, line in enumerate(lines):
        match = header.match(line)
        if match and (i + 1 == len(lines) or not lines[i + 1].strip()) and (i == 0 or not lines[i - 1].strip()):
            current = chapters.setdefault(line, []) if re.fullmatch(books, match.group(1)) else None
            continue
        if current is None or not line.strip():
            continue
        if verse.match(line):
            number, words = verse.match(line).groups()
            current.append(f"{number} {words.strip()}")
        else:
            current[-1] += " " + line.strip()  # a wrapped verse continues
    for title, verses in chapters.items():
        yield f"bible-kjv-text:KJV {title}", f"{title}\n\n" + "\n".join(verses) + "\n"


def jargon_documents(root: pathlib.Path) -> Iterator[tuple[str, str]]:
    """Jargon File chapters 1-12, glossary letters JARGON_GLOSSARY_LETTERS and Appendix B."""
    path = "usr/share/doc/jargon-text/jargon.txt.gz"
    with gzip.open(root / path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")

    def section(start: re.Pattern, stop: re.Pattern, after: int = 0) -> tuple[int, int]:
        begin = next(i for i in range(after, len(lines)) if start.match(lines[i]))
        end = next(i for i in range(begin + 1, len(lines)) if stop.match(lines[i]))
        return begin, end

    def text(begin: int, end: int) -> str:
        return "\n".join(line.rstrip() for line in lines[begin:end]).strip("\n") + "\n"

    glossary = lines.index("Glossary")  # chapter and appendix titles use no-break spaces (\\s matches them)
    for number in range(1, 13):
        begin, end = section(re.compile(rf"^Chapter\s{number}\.\s"), re.compile(r"^(Chapter\s\d+\.\s|Glossary$)"))
        yield f"jargon-text:{path} Chapter {number}", text(begin, end)
    for letter in JARGON_GLOSSARY_LETTERS:
        begin, end = section(re.compile(rf"^  {letter}$"), re.compile(r"^  [0A-Z]$|^Appendix\sA\."), after=glossary)
        yield f"jargon-text:{path} Glossary {letter}", text(begin, end)
    begin, end = section(re.compile(r"^Appendix\sB\.\s"), re.compile(r"^Appendix\sC\.\s"))
    yield f"jargon-text:{path} Appendix B", text(begin, end)


def python_documents(root: pathlib.Path) -> Iterator[tuple[str, str]]:
    """PYTHON_MODULES, each named with the package that ships it (-minimal or -stdlib)."""
    base = "usr/lib/python3.11"
    minimal = next((root.parent / "debs").glob("libpython3.11-minimal_*.deb"))
    in_minimal = {line.split()[-1].removeprefix("./") for line in run(["dpkg-deb", "-c", str(minimal)]).splitlines()}
    for module in PYTHON_MODULES:
        package = "libpython3.11-minimal" if f"{base}/{module}" in in_minimal else "libpython3.11-stdlib"
        yield f"{package}:{base}/{module}", (root / base / module).read_text(encoding="utf-8")


OUTPUTS: dict[str, Callable[[pathlib.Path], Iterator[tuple[str, str]]]] = {
    "en_kjv_excerpt.jsonl": kjv_documents,
    "en_jargon_file_excerpt.jsonl": jargon_documents,
    "en_fortunes.jsonl": lambda root: fortune_documents(root, "fortunes", FORTUNES_EN),
    "it_fortunes.jsonl": lambda root: fortune_documents(root, "fortunes-it", FORTUNES_IT),
    "es_fortunes.jsonl": lambda root: fortune_documents(root, "fortunes-es", FORTUNES_ES),
    "ru_fortunes.jsonl": lambda root: fortune_documents(root, "fortunes-ru", FORTUNES_RU),
    "zh_tang_song_poems.jsonl": lambda root: fortune_documents(root, "fortunes-zh", FORTUNES_ZH),
    "code_python_stdlib.jsonl": python_documents,
}


def build(root: pathlib.Path, out: pathlib.Path) -> list[tuple[str, int, int, str]]:
    """Writes every OUTPUTS file into ``out``; returns (file, documents, bytes, sha256) rows."""
    rows = []
    for name, documents in OUTPUTS.items():
        lines = [json.dumps({"source": s, "text": t}, ensure_ascii=False, sort_keys=True) for s, t in documents(root)]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        (out / name).write_bytes(data)
        rows.append((name, len(lines), len(data), hashlib.sha256(data).hexdigest()))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "bltjax-corpus")
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="where to write the files (default: here)")
    parser.add_argument("--no-update", action="store_true", help="skip `apt-get update`")
    parser.add_argument("--check", action="store_true", help="build into a temp folder and compare with --out")
    args = parser.parse_args()
    root = fetch(args.work, update=not args.no_update)
    target = pathlib.Path(tempfile.mkdtemp(prefix="bltjax-corpus-check-")) if args.check else args.out
    rows = build(root, target)
    print("| file | documents | bytes | sha256 |\n|---|---|---|---|")
    for name, docs, size, sha in rows:
        print(f"| `{name}` | {docs:,} | {size:,} | `{sha[:16]}` |")
    print(f"total: {sum(r[2] for r in rows):,} bytes in {target}")
    if args.check:
        differ = [n for n, *_ in rows if (args.out / n).read_bytes() != (target / n).read_bytes()]
        print("check: identical to the committed files" if not differ else f"check: DIFFERENT: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

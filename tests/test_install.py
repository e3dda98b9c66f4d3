"""The README's Install section and constraints.txt: every command there names real extras and resolves.

The fast tests read setup.cfg, the README and constraints.txt. The slow ones run each README
install line through pip offline (``--dry-run --no-index --no-build-isolation``): the package
metadata must build and provide the extras, and the constraints line must resolve in full
against this venv (which tests/run.sh installed through constraints.txt).
"""

from __future__ import annotations

import configparser
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import lock  # noqa: E402  (launch/lock.py, the constraints generator)


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _install_commands() -> list[list[str]]:
    """The `pip install` lines of the README's Install section, as argument lists (comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _extras(args: list[str]) -> list[str]:
    target = args[args.index("-e") + 1]
    match = re.fullmatch(r"\.(?:\[([a-z0-9_,-]+)\])?", target)
    assert match, f"README: expected -e . or -e .[extras], got {target!r}"
    return match.group(1).split(",") if match.group(1) else []


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_install_section_follows_the_two_setup_commands_and_covers_every_machine():
    text = (REPO / "README.md").read_text()
    assert text.index("bash tests/run.sh") < text.index("\n## Install\n") < text.index("\n## Status\n")
    commands = _install_commands()
    assert all(c[:2] == ["pip", "install"] for c in commands)
    named = {extra for c in commands for extra in _extras(c)}
    assert {"cuda", "tpu", "aot", "hf", "test"} <= named
    assert [] in [_extras(c) for c in commands], "a plain CPU install line"


def test_every_extra_the_readme_names_exists_in_setup_cfg():
    extras = set(_setup_cfg()["options.extras_require"])
    for command in _install_commands():
        missing = set(_extras(command)) - extras
        assert not missing, f"README: {' '.join(command)} names extras {sorted(missing)} that setup.cfg lacks"
        if "-c" in command:
            assert (REPO / command[command.index("-c") + 1]).is_file()


def test_python_requires_matches_the_readme_and_venv_sh():
    python_requires = _setup_cfg()["options"]["python_requires"].strip()
    assert python_requires == ">=3.11"
    assert "Python 3.11 or newer" in (REPO / "README.md").read_text()
    assert 'min_python="3.11"' in (REPO / "launch" / "venv.sh").read_text()


def test_constraints_pin_every_requirement_within_setup_cfg():
    """Each install_requires / test / hf requirement is pinned, and the pin satisfies setup.cfg's range."""
    pins = _pins()
    for requirement in lock.project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt: {requirement.name} is not pinned; run python launch/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt: {name}=={pins[name]} is outside setup.cfg's {requirement}; run python launch/lock.py"
        )
    assert "bltjax" not in pins and "libtpu" not in pins  # the package itself; accelerator wheels pair with jax


def test_constraints_are_the_dependency_closure_of_this_venv():
    """launch/lock.py would write the same set of packages (their versions: see the slow resolution test)."""
    assert set(lock.closure(lock.project_requirements())) == set(_pins())


def test_installs_go_through_the_constraints():
    venv = (REPO / "launch" / "venv.sh").read_text()
    assert '-c "$repo_root/constraints.txt"' in venv
    assert "source launch/venv.sh" in (REPO / "tests" / "run.sh").read_text()  # CI: .ci/run -> tests/run.sh


def test_lock_skips_requirements_for_other_platforms_and_strips_local_labels(monkeypatch):
    import importlib.metadata as metadata

    class Dist:
        def __init__(self, version, requires):
            self.version, self.requires = version, requires

    dists = {
        "root": Dist("1.0", ["a>=1", "win-only; sys_platform == 'win32'", "b[x]", "missing>=2"]),
        "a": Dist("2.1+cpu", []),
        "b": Dist("3.0", ["c; extra == 'x'", "d; extra == 'y'"]),
        "c": Dist("4.0", []),
        "d": Dist("5.0", []),
        "win-only": Dist("6.0", []),
    }

    def distribution(name):
        if name not in dists:
            raise metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(lock.metadata, "distribution", distribution)
    assert lock.closure([Requirement("root")]) == {"a": "2.1", "b": "3.0", "c": "4.0", "root": "1.0"}


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    offline = ["--dry-run", "--no-index", "--no-build-isolation", "--disable-pip-version-check"]
    return subprocess.run([sys.executable, "-m", *args, *offline], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_install_commands())))
def test_readme_install_command_resolves_offline(index, tmp_path):
    command = _install_commands()[index]
    if "-c" in command:
        # Everything is installed at the pinned versions, so pip resolves the whole tree without an index.
        result = _pip(command)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr[-2000:]}"
        assert "Would install bltjax" in result.stdout
        return
    report = tmp_path / "report.json"
    result = _pip([*command, "--no-deps", "--quiet", "--report", str(report)])
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr[-2000:]}"
    (item,) = json.loads(report.read_text())["install"]
    meta = item["metadata"]
    assert meta["name"] == "bltjax" and meta["requires_python"] == ">=3.11"
    for extra in _extras(command):
        assert extra in meta["provides_extra"]
        assert any(f'extra == "{extra}"' in requirement for requirement in meta["requires_dist"]), extra

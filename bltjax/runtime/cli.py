"""One command line for every ``python -m bltjax.X`` program: absl flags, both spellings, one-line errors.

A program is a `Program`: a function that defines its absl flags (``--config`` through
ml_collections' config_flags, as big_vision does) and a main that gets the parsed `CommandLine`.
`Program.run` gives every program the same behaviour:

* ``--max-bytes`` and ``--max_bytes`` are the same flag, and so are ``--no-progress``,
  ``--no_progress`` and absl's ``--noprogress``. Only the names of flags the program defines are
  rewritten (``--config.train.eval-every`` included); a flag's value never is, nor is anything
  after a bare ``--``, so ``--prompt "--foo"`` and ``--prompt=--x-y`` reach the program as typed.
* Old flag names stay accepted for a release (``aliases``), with a one-line note on stderr.
* A flag listed in ``multi_word`` takes every following word up to the next ``-...`` argument
  (``--input a.txt b/``), which is how the former argparse programs spelled lists.
* Bad command lines (unknown flag or config key, bad value, missing config file, missing
  required flag) print one ``error: ...`` line naming the flag and exit with `USAGE_STATUS`;
  the program's own errors (``errors``) print one line and exit with ``error_status``. No traceback.

Flags live in a fresh `absl.flags.FlagValues` per parse, so programs can be called in-process
(tests) as often as wanted and two programs' flags never collide. absl's own flags (``-v``,
``--verbosity``, ``--logtostderr``) and the flags libraries define (grain, orbax) are shared in.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from absl import flags, logging

from bltjax.runtime.paths import PathError

USAGE_STATUS = 2  # argparse's convention for "the command line is wrong"
DEPRECATED_NOTE = "warning: {program}: --{old} is deprecated and goes away in the next release; use --{new}"


@dataclasses.dataclass
class _ConfigFlags:
    """The config flags one parse defines, and the argv they read their overrides from (ml_collections
    scans an argv list for --config.* at parse time; it is filled in once the names are normalised)."""

    names: list[str] = dataclasses.field(default_factory=list)
    argv: list[str] = dataclasses.field(default_factory=list)


# Set while a Program's define_flags runs, so define_config_file can register into it.
_CONFIGS: contextvars.ContextVar[_ConfigFlags | None] = contextvars.ContextVar("bltjax_config_flags", default=None)


class CommandLineError(Exception):
    """A command line that cannot run; the message names the flag (or argument) and what was expected."""


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """What a program's main gets: its flags, the positional arguments and what followed a bare ``--``."""

    flags: flags.FlagValues
    args: list[str]
    after_dashes: list[str]
    typed: tuple[str, ...] = ()  # the command line as given, program name first (for the records a program writes)


def define_config_file(name: str, help_string: str, flag_values: flags.FlagValues) -> None:
    """``--NAME path.py[:variant]`` plus ``--NAME.field=value`` overrides (ml_collections' config_flags)."""
    from ml_collections import config_flags

    configs = _CONFIGS.get()
    if configs is None:
        raise RuntimeError("cli.define_config_file: call it from the define_flags of a cli.Program")
    config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values, sys_argv=configs.argv)
    configs.names.append(name)


@dataclasses.dataclass(frozen=True)
class _Name:
    """A flag name as the program defines it (``canonical``); ``takes_value``: absl reads the next argument."""

    canonical: str
    takes_value: bool
    alias_of: str | None = None  # the old name the user typed, when it is a deprecated alias


def _lookup(typed: str, values: flags.FlagValues, aliases: Mapping[str, str], configs: Sequence[str]) -> _Name | None:
    """The defined flag ``typed`` means, or None when it is none of this program's flags."""
    for name in dict.fromkeys((typed, typed.replace("-", "_"))):
        if name in aliases:
            new = aliases[name]
            return _Name(new, not values[new].boolean, alias_of=name)
        if name in values:
            return _Name(name, not values[name].boolean)
        negated = re.fullmatch(r"no_?(\w[\w.]*)", name)
        if negated and negated.group(1) in values and values[negated.group(1)].boolean:
            return _Name("no" + negated.group(1), False)
        prefix, dot, field = name.partition(".")
        if dot and prefix in configs:
            # An override of a config field: config keys are identifiers, so dashes become underscores.
            return _Name(f"{prefix}.{field.replace('-', '_')}", True)
    return None


def normalise_argv(
    argv: Sequence[str],
    values: flags.FlagValues,
    *,
    aliases: Mapping[str, str] | None = None,
    multi_word: Sequence[str] = (),
    configs: Sequence[str] = (),
    program: str = "bltjax",
    warn: TextIO | None = None,
) -> tuple[list[str], list[str]]:
    """(argv with every flag name spelled as defined, the arguments after the first bare ``--``).

    Walks the arguments as absl reads them: a non-boolean flag without ``=`` takes the next
    argument as its value, which is copied unchanged whatever it looks like.
    """
    aliases = dict(aliases or {})
    out, spellings = [argv[0]], {}  # spellings: canonical name -> {None (new name), old name}
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return out, list(argv[i:])
        if not arg.startswith("-") or arg == "-":
            out.append(arg)
            continue
        dashes = "--" if arg.startswith("--") else "-"
        typed, eq, value = arg[len(dashes) :].partition("=")
        name = _lookup(typed, values, aliases, configs)
        if name is None:  # not a flag of this program: left as typed, so absl's error names it
            out.append(arg)
            continue
        if name.alias_of is not None:
            note = DEPRECATED_NOTE.format(program=program, old=name.alias_of, new=name.canonical)
            print(note, file=warn or sys.stderr)
        spellings.setdefault(name.canonical, set()).add(name.alias_of)
        if len(spellings[name.canonical]) > 1:
            old = next(s for s in spellings[name.canonical] if s is not None)
            raise CommandLineError(f"--{old} is the old name of --{name.canonical}; give only one of them")
        out.append(dashes + name.canonical + eq + value)
        if eq or not name.takes_value:
            continue
        if config_override := ("." in name.canonical and name.canonical not in values):
            if i < len(argv) and argv[i].startswith("-"):
                continue  # a boolean override such as --config.model.scan_layers
        if i < len(argv):
            out.append(argv[i])  # the value, byte for byte
            i += 1
        if not config_override and name.canonical in multi_word:
            while i < len(argv) and not argv[i].startswith("-"):
                out += [dashes + name.canonical, argv[i]]
                i += 1
    return out, []


def _absl_flags() -> flags.FlagValues:
    """absl's logging flags and whatever libraries define globally (grain, orbax), shared into each parse."""
    import absl.logging  # noqa: F401 - defines --verbosity, -v, --logtostderr

    return flags.FLAGS


def _flag_error(err: flags.Error, values: flags.FlagValues, configs: Sequence[str], program: str) -> str:
    """absl's message, made one line that names the flag and what was expected."""
    text = str(err)
    if isinstance(err, flags.UnrecognizedFlagError):
        name = err.flagname
        known = [n for n in values if len(n) > 1 and n not in _absl_flags()]
        close = difflib.get_close_matches(name.replace("-", "_"), known, n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else f"; see {program} --help"
        return f"unknown flag --{name} for {program}{hint}"
    match = re.match(r"flag --([^=]+)=(.*?): (.*)", text, flags=re.S)
    if isinstance(err, flags.IllegalFlagValueError) and match:
        name, value, detail = match.groups()
        lines = [line.strip() for line in detail.strip().splitlines() if line.strip()]
        if name in configs:  # get_config() raised: its own last line says why
            return f"--{name}={value}: the config file raised {lines[-1]}"
        if "expected" in lines[-1] and repr(value) in lines[-1]:  # the parser already says what it expected
            return f"--{name}: {lines[-1]}"
        kind = values[name].flag_type() if name in values else "a valid value"
        return f"--{name}: expected {kind}, got {value!r} ({lines[-1]})"
    return " ".join(text.split())


def _config_argument(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--NAME`` in a normalised argv (the last one, as absl takes it)."""
    found = None
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            found = arg.split("=", 1)[1]
    return found


def _missing_config_file(name: str, argument: str) -> str | None:
    """The one-line error for ``--NAME path.py[:variant]`` whose file is not there, else None."""
    path = argument.split(":", 1)[0]
    if not os.path.isfile(path):
        return (f"--{name}: no such config file {path} (relative paths are read from the current folder "
                f"{os.getcwd()}); expected path.py or path.py:variant")  # fmt: skip
    return None


def _unknown_config_key(values: flags.FlagValues, configs: Sequence[str], argv: Sequence[str]) -> str | None:
    """Which ``--config.a.b`` override names a field the config does not have, and the fields it has."""
    for name in configs:
        if (argument := _config_argument(argv, name)) is None:
            continue
        config = values[name].parser.parse(argument)
        for arg in argv:
            match = re.match(rf"-{{1,2}}(?:no)?{re.escape(name)}\.([\w.]+)", arg)
            if not match:
                continue
            node, walked = config, name
            for key in match.group(1).split("."):
                keys = list(node.keys()) if hasattr(node, "keys") else []
                if key not in keys:
                    choices = ", ".join(sorted(map(str, keys))) or "none (it is a value, not a group)"
                    close = difflib.get_close_matches(key, list(map(str, keys)), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    return f"--{name}.{match.group(1)}: {walked} has no field {key!r}{hint}; its fields: {choices}"
                node, walked = node[key], f"{walked}.{key}"
    return None


def _parse_configs(values: flags.FlagValues, configs: Sequence[str], argv: list[str]) -> list[str]:
    """absl's parse, with ml_collections' errors (raised from deep inside it) turned into one line."""
    try:
        return values(argv)
    except flags.Error:
        raise
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as err:
        for name in configs:
            if (argument := _config_argument(argv, name)) is not None:
                if message := _missing_config_file(name, argument):
                    raise CommandLineError(message) from None
        if isinstance(err, (AttributeError, KeyError)) and (message := _unknown_config_key(values, configs, argv)):
            raise CommandLineError(message) from None
        raise


def _check_config_loaded(values: flags.FlagValues, configs: Sequence[str]) -> None:
    """config_flags defers a config file's load error until first use; surface it now, with the path."""
    import ml_collections
    from ml_collections import config_flags

    for name in configs:
        flag = values[name]
        if flag.value is not None and not isinstance(flag.value, ml_collections.ConfigDict):
            argument = config_flags.get_config_filename(flag)
            raise CommandLineError(_missing_config_file(name, argument) or f"--{name}: cannot load {argument}")


def require(values: flags.FlagValues, *names: str) -> None:
    """Every flag in ``names`` was given a value (absl's required flags, with a one-line error)."""
    for name in names:
        if values[name].value in (None, "", []):
            raise CommandLineError(f"--{name} is required: {values[name].help}")


def _help_text(program: str, doc: str, values: flags.FlagValues) -> str:
    lines = [doc.strip(), "", f"flags of {program} (--a-b and --a_b are the same flag):"]
    for name in sorted(values):
        flag = values[name]
        if name != flag.name or name in _absl_flags() or name == "help":
            continue
        default = "" if flag.default in (None, "", []) else f" (default: {flag.default_as_str or flag.default})"
        lines.append(f"  --{name}: {flag.help}{default}")
    lines.append("  -v / --verbosity, --logtostderr: absl logging")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Program:
    """One ``python -m bltjax.X`` program: how it defines its flags, its main, and how it fails."""

    name: str  # e.g. "python -m bltjax.train", used in messages
    define_flags: Callable[[flags.FlagValues], None]
    main: Callable[[CommandLine], int | None]
    doc: str = ""
    errors: tuple[type[BaseException], ...] = ()  # the program's domain errors: one line, error_status
    error_status: int = 1
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # old name -> new name
    multi_word: tuple[str, ...] = ()
    positional: bool = False  # the program reads positional arguments (sweep's sub-command and folder)
    passthrough: bool = False  # the program reads the arguments after a bare --

    def parse(self, argv: Sequence[str], *, warn: TextIO | None = None) -> CommandLine:
        """The flags of ``argv`` (argv[0] is the program); raises CommandLineError with a one-line message."""
        typed = (self.name, *list(argv)[1:])
        values = flags.FlagValues()
        shared = _absl_flags()
        values.append_flag_values(shared)
        values.unparse_flags()  # a previous in-process parse must not leak its -v into this one
        configs = _ConfigFlags()
        token = _CONFIGS.set(configs)
        try:
            self.define_flags(values)
        finally:
            _CONFIGS.reset(token)
        flags.DEFINE_bool("help", False, "Show the program's flags and exit.", flag_values=values, short_name="h")
        argv, after = normalise_argv(
            list(argv),
            values,
            aliases=self.aliases,
            multi_word=self.multi_word,
            configs=configs.names,
            program=self.name,
            warn=warn,
        )
        configs.argv[:] = argv
        try:
            args = _parse_configs(values, configs.names, argv)[1:]
        except flags.Error as err:
            raise CommandLineError(_flag_error(err, values, configs.names, self.name)) from None
        if not shared.is_parsed():
            shared.mark_as_parsed()  # absl logging checks it; the shared flags were parsed above
        if values.help:
            return CommandLine(values, args, after, typed)
        _check_config_loaded(values, configs.names)
        if args and not self.positional:
            raise CommandLineError(f"unexpected argument {args[0]!r}: {self.name} takes flags only (--name=value)")
        if after and not self.passthrough:
            raise CommandLineError(f"{self.name} takes no arguments after --, got {' '.join(after)!r}")
        return CommandLine(values, args, after, typed)

    def knows(self, typed: str) -> bool:
        """Whether ``--typed`` (either spelling, without the dashes) is one of this program's current flag names:
        a deprecated alias is not, a config override (``config.a.b``) is when the program has that config flag."""
        values, configs = flags.FlagValues(), _ConfigFlags()
        token = _CONFIGS.set(configs)
        try:
            self.define_flags(values)
        finally:
            _CONFIGS.reset(token)
        name = _lookup(typed, values, {}, configs.names)
        return name is not None or typed in ("help", "h", "v", "verbosity", "logtostderr")

    def run(self, argv: Sequence[str] | None = None) -> int:
        """Parses ``argv`` (default: sys.argv), runs main, and returns the exit status; never a traceback
        for a bad command line or one of ``errors``."""
        argv = list(sys.argv if argv is None else [self.name, *argv])
        try:
            command_line = self.parse(argv)
            if command_line.flags.help:
                print(_help_text(self.name, self.doc, command_line.flags))
                return 0
            if not command_line.flags["verbosity"].present:
                logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
            status = self.main(command_line)
        except CommandLineError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return USAGE_STATUS
        except (PathError, *self.errors) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return self.error_status
        return int(status or 0)

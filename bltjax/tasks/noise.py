"""The character-level noise of the BLT paper's robustness study (its §7 and Table 3), seeded.

The paper noises HellaSwag five ways; the definitions and rates below are the paper's words, and
docs/evaluation.md ("Noise transforms") records how each is read where the text leaves a choice:

* ``antspeak``   the whole text in uppercase, one space between characters ("the cat" -> "T H E   C A T").
* ``drop``       each character removed with probability 0.1 ("randomly removes 10% of the characters").
* ``randomcase`` each character uppercased with probability 0.5, lowercased otherwise.
* ``repeat``     each character chosen with probability 0.2 and then written 2, 3 or 4 times in all,
                 uniformly ("repeats 20% of the characters up to a maximum of four times").
* ``uppercase``  the whole text in uppercase.

A noised text is a function of (noise, seed, text) only: the random stream is seeded with a hash of
all three, so the same document noised twice, in any order or process, gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DROP_RATE = 0.1
RANDOMCASE_UPPER_RATE = 0.5
REPEAT_RATE = 0.2
REPEAT_MAX_COPIES = 4  # a repeated character is written 2..REPEAT_MAX_COPIES times in all
APPLY_TO = ("both", "context", "choices")  # the paper noises the prompt, the completion, or both


class NoiseError(ValueError):
    """A noise name, rate or task layout that cannot be noised; the message names what was expected."""


def _rng(noise: str, seed: int, text: str) -> np.random.Generator:
    """The random stream of one (noise, seed, text): independent of call order, process and platform."""
    digest = hashlib.blake2b(f"{noise}\0{seed}\0".encode() + text.encode("utf-8", "surrogatepass"), digest_size=16)
    return np.random.default_rng(np.frombuffer(digest.digest(), dtype=np.uint32))


def antspeak(text: str, seed: int = 0) -> str:
    """Uppercase, every character followed by a space except the last (spaces themselves included)."""
    del seed  # deterministic
    return " ".join(text.upper())


def uppercase(text: str, seed: int = 0) -> str:
    """Every character in uppercase."""
    del seed  # deterministic
    return text.upper()


def drop(text: str, seed: int = 0, rate: float = DROP_RATE) -> str:
    """Each character removed independently with probability ``rate``."""
    keep = _rng("drop", seed, text).random(len(text)) >= rate
    return "".join(char for char, kept in zip(text, keep, strict=True) if kept)


def randomcase(text: str, seed: int = 0, rate: float = RANDOMCASE_UPPER_RATE) -> str:
    """Each character uppercased with probability ``rate`` and lowercased otherwise."""
    upper = _rng("randomcase", seed, text).random(len(text)) < rate
    return "".join(char.upper() if up else char.lower() for char, up in zip(text, upper, strict=True))


def repeat(text: str, seed: int = 0, rate: float = REPEAT_RATE, max_copies: int = REPEAT_MAX_COPIES) -> str:
    """Each character chosen with probability ``rate`` is written 2..``max_copies`` times (uniform)."""
    rng = _rng("repeat", seed, text)
    chosen = rng.random(len(text)) < rate
    copies = rng.integers(2, max_copies + 1, size=len(text))  # drawn for every position: one stream layout
    return "".join(char * (int(count) if pick else 1) for char, pick, count in zip(text, chosen, copies, strict=True))


NOISES: Mapping[str, Callable[..., str]] = {
    "antspeak": antspeak,
    "drop": drop,
    "randomcase": randomcase,
    "repeat": repeat,
    "uppercase": uppercase,
}


def noise_names(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, one name or a comma-separated list (or a sequence) -> checked noise names, in order."""
    names = [name.strip() for name in (spec.split(",") if isinstance(spec, str) else spec) if name.strip()]
    if names == ["all"]:
        return list(NOISES)
    unknown = [name for name in names if name not in NOISES]
    if unknown or not names:
        raise NoiseError(f"noise: unknown {unknown or spec!r}; expected 'all' or names among {', '.join(NOISES)}")
    return names


def noise_text(text: str, noise: str, seed: int = 0) -> str:
    """``text`` under the named noise, a function of (noise, seed, text) only."""
    if noise not in NOISES:
        raise NoiseError(f"noise: unknown {noise!r}; expected one of {', '.join(NOISES)}")
    return NOISES[noise](text, seed)


@dataclasses.dataclass(frozen=True)
class ChoiceDocument:
    """One multiple-choice question as lm-eval scores it: ``context + delimiter + choices[i]`` for each i."""

    context: str
    choices: tuple[str, ...]
    label: int

    def to_json(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "label": self.label}


def noise_document(document: ChoiceDocument, noise: str, seed: int = 0, apply_to: str = "both") -> ChoiceDocument:
    """The document with its context, its choices or both noised (the label does not move)."""
    if apply_to not in APPLY_TO:
        raise NoiseError(f"apply_to: expected one of {', '.join(APPLY_TO)}, got {apply_to!r}")
    context, choices = document.context, document.choices
    if apply_to in ("both", "context"):
        context = noise_text(context, noise, seed)
    if apply_to in ("both", "choices"):
        choices = tuple(noise_text(choice, noise, seed) for choice in choices)
    return ChoiceDocument(context, choices, document.label)


def noise_documents(
    documents: Iterable[ChoiceDocument], noise: str, seed: int = 0, apply_to: str = "both"
) -> list[ChoiceDocument]:
    """Every document under one noise (see `noise_document`)."""
    return [noise_document(document, noise, seed, apply_to) for document in documents]

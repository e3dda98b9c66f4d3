"""Character- and word-manipulation tasks in the categories of CUTE (Edman et al. 2024), built offline.

CUTE asks a model to spell, to read a spelling back, to say whether a word contains a letter (or a
sentence a word), and to insert, delete, substitute or swap letters in a word or words in a
sentence. The BLT paper reports these categories in its Table 3. This module generates such
examples from text the package ships (bltjax/data/corpus, see `word_list` and `sentences`), each
answer computed by construction, with four solved examples before the question as CUTE's prompts
have. An example is a function of (category, seed, index): every build gives the same bytes.

Each example carries the answer (scored by exact match of a greedy generation, as CUTE scores) and
a multiple-choice form: the answer among near misses of it (the input left unchanged, one unit
dropped, doubled, replaced or two swapped), so a model too small to generate an exact answer still
gets a graded score (docs/evaluation.md says why both exist).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
import random
import re
import string
from collections.abc import Callable, Sequence

CORPUS_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "corpus"
# Public-domain English text of the bundled corpus (licences in bltjax/data/corpus/PROVENANCE.md).
WORD_SOURCES = ("en_kjv_excerpt.jsonl", "en_jargon_file_excerpt.jsonl")
SENTENCE_SOURCE = "en_kjv_excerpt.jsonl"
MIN_WORD_COUNT = 3  # a word seen fewer times may be a typo or a fragment of markup
WORD_LENGTHS = (3, 10)
SENTENCE_WORDS = (5, 10)
SHOTS = 4
CHOICES = 4

INSTRUCTIONS = {
    "spelling": "Spell out the word, putting spaces between each letter.",
    "spelling_inverse": "Write the word that is spelled out, without any spaces.",
    "contains_char": "Answer whether the specified letter is in the given word.",
    "contains_word": "Answer whether the specified word is in the given sentence.",
    "ins_char": "Add the specified letter after every instance of the second specified letter in the given word.",
    "ins_word": "Add the specified word after every instance of the second specified word in the given sentence.",
    "del_char": "Delete every instance of the specified letter in the given word.",
    "del_word": "Delete every instance of the specified word in the given sentence.",
    "sub_char": "Substitute every instance of the first specified letter with the second in the given word.",
    "sub_word": "Substitute every instance of the first specified word with the second in the given sentence.",
    "swap_char": "Swap the positions of the two specified letters in the given word.",
    "swap_word": "Swap the positions of the two specified words in the given sentence.",
}
CATEGORIES = tuple(INSTRUCTIONS)


class TaskBuildError(ValueError):
    """A task that cannot be built as asked; the message names the argument and what was expected."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One solved question: ``question`` is answered by ``answer``; ``units`` say how near misses are made."""

    question: str
    answer: str
    source: str  # the word or sentence the question edits ("" when near misses of the input make no sense)
    units: str  # "chars", "spelled" (letters between spaces), "words" or "yesno"


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt (instruction, solved shots, question) with its answer and its multiple-choice form."""

    prompt: str
    answer: str
    choices: tuple[str, ...]
    label: int

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "choices": list(self.choices), "label": self.label}


def _english_texts(files: Sequence[str]) -> list[str]:
    texts = []
    for name in files:
        with open(CORPUS_DIR / name, encoding="utf-8") as handle:
            texts.extend(json.loads(line)["text"] for line in handle)
    return texts


@functools.cache
def word_list() -> tuple[str, ...]:
    """Lowercase ASCII words of 3-10 letters written in lowercase at least 3 times in the public-domain
    English of the bundled corpus (capitalised forms are left out, which leaves most names out)."""
    counts = collections.Counter(
        word for text in _english_texts(WORD_SOURCES) for word in re.findall(r"(?<![A-Za-z'])[a-z]+(?![A-Za-z'])", text)
    )
    low, high = WORD_LENGTHS
    return tuple(sorted(word for word, count in counts.items() if count >= MIN_WORD_COUNT and low <= len(word) <= high))


@functools.cache
def sentences() -> tuple[str, ...]:
    """Clauses of 5-10 plain words (letters only) from the King James Version's verses, in corpus order,
    without repeats: the sentences of the word-level tasks."""
    seen: dict[str, None] = {}
    low, high = SENTENCE_WORDS
    for text in _english_texts((SENTENCE_SOURCE,)):
        for line in text.splitlines()[2:]:  # a chapter's title line and blank line come first
            verse = line.partition(" ")[2]
            for clause in re.split(r"[,;:.?!()]", verse):
                words = clause.split()
                if low <= len(words) <= high and all(word.isascii() and word.isalpha() for word in words):
                    seen.setdefault(" ".join(words), None)
    return tuple(seen)


def _letter_not_in(rng: random.Random, word: str) -> str:
    return rng.choice([letter for letter in string.ascii_lowercase if letter not in word])


def _unique_positions(units: Sequence[str]) -> list[int]:
    counts = collections.Counter(units)
    return [index for index, unit in enumerate(units) if counts[unit] == 1]


def _spelling(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    word = rng.choice(words)
    return Item(f'Spell out the word "{word}".', " ".join(word), "", "spelled")


def _spelling_inverse(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    word = rng.choice(words)
    return Item(f'Write the word "{" ".join(word)}".', word, "", "chars")


def _contains_char(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    word = rng.choice(words)
    present = rng.random() < 0.5  # balanced, so always answering one way scores 50%
    letter = rng.choice(word) if present else _letter_not_in(rng, word)
    return Item(f'Is there a "{letter}" in "{word}"?', "Yes" if present else "No", "", "yesno")


def _contains_word(rng: random.Random, words: Sequence[str], sentence_pool: Sequence[str]) -> Item:
    sentence = rng.choice(sentence_pool)
    present = rng.random() < 0.5
    own = sentence.split()
    word = rng.choice(own) if present else rng.choice([w for w in rng.sample(words, 8) if w not in own])
    return Item(f'Is there a "{word}" in "{sentence}"?', "Yes" if present else "No", "", "yesno")


def _ins_char(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    word = rng.choice(words)
    after = rng.choice(word)
    letter = rng.choice([c for c in string.ascii_lowercase if c != after])
    edited = word.replace(after, after + letter)
    return Item(f'Add "{letter}" after every "{after}" in "{word}".', edited, word, "chars")


def _ins_word(rng: random.Random, words: Sequence[str], sentence_pool: Sequence[str]) -> Item:
    sentence = rng.choice(sentence_pool)
    after = rng.choice(sentence.split())
    word = rng.choice([w for w in rng.sample(words, 8) if w != after])
    edited = " ".join(w for own in sentence.split() for w in ((own, word) if own == after else (own,)))
    return Item(f'Add "{word}" after every "{after}" in "{sentence}".', edited, sentence, "words")


def _del_char(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    word = rng.choice([w for w in rng.sample(words, 8) if len(set(w)) > 1])
    letter = rng.choice(word)
    return Item(f'Delete every "{letter}" in "{word}".', word.replace(letter, ""), word, "chars")


def _del_word(rng: random.Random, words: Sequence[str], sentence_pool: Sequence[str]) -> Item:
    sentence = rng.choice(sentence_pool)
    word = rng.choice(sentence.split())
    edited = " ".join(own for own in sentence.split() if own != word)
    return Item(f'Delete every "{word}" in "{sentence}".', edited, sentence, "words")


def _sub_char(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    word = rng.choice(words)
    old = rng.choice(word)
    new = _letter_not_in(rng, word)
    return Item(f'Substitute "{old}" with "{new}" in "{word}".', word.replace(old, new), word, "chars")


def _sub_word(rng: random.Random, words: Sequence[str], sentence_pool: Sequence[str]) -> Item:
    sentence = rng.choice(sentence_pool)
    old = rng.choice(sentence.split())
    new = rng.choice([w for w in rng.sample(words, 8) if w not in sentence.split()])
    edited = " ".join(new if own == old else own for own in sentence.split())
    return Item(f'Substitute "{old}" with "{new}" in "{sentence}".', edited, sentence, "words")


def _swap(units: list[str], rng: random.Random) -> tuple[str, str, list[str]] | None:
    """Two units that each occur once, and the units with them swapped (None if there are no two)."""
    unique = _unique_positions(units)
    if len(unique) < 2:
        return None
    first, second = sorted(rng.sample(unique, 2))
    swapped = list(units)
    swapped[first], swapped[second] = units[second], units[first]
    return units[first], units[second], swapped


def _swap_char(rng: random.Random, words: Sequence[str], _: Sequence[str]) -> Item:
    while (swap := _swap(list(word := rng.choice(words)), rng)) is None:
        pass
    first, second, swapped = swap
    return Item(f'Swap "{first}" and "{second}" in "{word}".', "".join(swapped), word, "chars")


def _swap_word(rng: random.Random, words: Sequence[str], sentence_pool: Sequence[str]) -> Item:
    while (swap := _swap((sentence := rng.choice(sentence_pool)).split(), rng)) is None:
        pass
    first, second, swapped = swap
    return Item(f'Swap "{first}" and "{second}" in "{sentence}".', " ".join(swapped), sentence, "words")


GENERATORS: dict[str, Callable[[random.Random, Sequence[str], Sequence[str]], Item]] = {
    "spelling": _spelling,
    "spelling_inverse": _spelling_inverse,
    "contains_char": _contains_char,
    "contains_word": _contains_word,
    "ins_char": _ins_char,
    "ins_word": _ins_word,
    "del_char": _del_char,
    "del_word": _del_word,
    "sub_char": _sub_char,
    "sub_word": _sub_word,
    "swap_char": _swap_char,
    "swap_word": _swap_word,
}


def near_misses(item: Item, rng: random.Random, count: int = CHOICES - 1) -> list[str]:
    """``count`` distinct wrong answers close to the right one: the unedited input first (the mistake
    of a model that copies), then the answer with one unit dropped, doubled, replaced or two swapped."""
    if item.units == "yesno":
        return ["No" if item.answer == "Yes" else "Yes"]
    separator = "" if item.units == "chars" else " "
    units = item.answer.split(" ") if separator else list(item.answer)
    fillers = string.ascii_lowercase if item.units != "words" else word_list()
    found: dict[str, None] = {}
    if item.source and item.source != item.answer:
        found[item.source] = None
    for _ in range(200):  # edits of a one-unit answer can run out; 200 draws is far more than needed
        if len(found) >= count:
            break
        edited = list(units)
        kind = rng.randrange(4)
        position = rng.randrange(len(edited)) if edited else 0
        if kind == 0 and len(edited) > 1:
            del edited[position]
        elif kind == 1 and edited:
            edited.insert(position, edited[position])
        elif kind == 2 and edited:
            edited[position] = rng.choice(fillers)
        elif len(edited) > 1:
            other = rng.randrange(len(edited))
            edited[position], edited[other] = edited[other], edited[position]
        candidate = separator.join(edited)
        if candidate and candidate != item.answer:
            found.setdefault(candidate, None)
    if len(found) < count:
        raise TaskBuildError(f"near_misses: found {len(found)} of {count} distinct wrong answers to {item.question!r}")
    return list(found)[:count]


def _rng(category: str, seed: int, index: int, role: str) -> random.Random:
    return random.Random(f"cute/{category}/{seed}/{role}/{index}")  # str seeds hash with sha512: stable everywhere


def _split_pools(seed: int) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """Disjoint word and sentence pools for the solved shots and for the questions (a question never
    repeats a shot's word)."""
    words, sentence_pool = list(word_list()), list(sentences())
    random.Random(f"cute/pools/{seed}").shuffle(words)
    random.Random(f"cute/pools/{seed}").shuffle(sentence_pool)
    return (words[:200], sentence_pool[:200]), (words[200:], sentence_pool[200:])


def _line(item: Item) -> str:
    return f"Question: {item.question}\nAnswer:"


def examples(category: str, count: int, seed: int = 0) -> list[Example]:
    """``count`` examples of one CUTE category, each with its own solved shots, deterministic in ``seed``."""
    if category not in GENERATORS:
        raise TaskBuildError(f"cute category: unknown {category!r}; expected one of {', '.join(CATEGORIES)}")
    if count < 1:
        raise TaskBuildError(f"cute examples: expected a count of at least 1, got {count}")
    (shot_words, shot_sentences), (words, sentence_pool) = _split_pools(seed)
    generate = GENERATORS[category]
    built = []
    for index in range(count):
        shots_rng = _rng(category, seed, index, "shots")
        shots = [generate(shots_rng, shot_words, shot_sentences) for _ in range(SHOTS)]
        item = generate(_rng(category, seed, index, "question"), words, sentence_pool)
        solved = "".join(f"{_line(shot)} {shot.answer}\n\n" for shot in shots)
        prompt = f"{INSTRUCTIONS[category]}\n\n{solved}{_line(item)}"
        choice_rng = _rng(category, seed, index, "choices")
        choices = [item.answer, *near_misses(item, choice_rng)]
        choice_rng.shuffle(choices)
        built.append(Example(prompt, item.answer, tuple(choices), choices.index(item.answer)))
    return built

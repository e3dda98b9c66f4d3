"""A multiple-choice cloze task from the bundled corpus: an offline stand-in to noise, not HellaSwag.

HellaSwag (the paper's noised benchmark) needs a download. This task has its shape (a context and
four endings, one of them the true one) and ships with the package: each question is the first half
of a King James Version verse (public domain, bltjax/data/corpus/PROVENANCE.md); the true ending is
the rest of that verse and the three others are second halves of other verses. The quickstart trains
on none of the KJV, so the text is held out from its models. Scores on it say nothing about
HellaSwag; they exist so that clean and noised accuracies can be compared offline.
"""

from __future__ import annotations

import functools
import json
import random

from bltjax.tasks.cute import CORPUS_DIR, TaskBuildError
from bltjax.tasks.noise import ChoiceDocument

SOURCE = "en_kjv_excerpt.jsonl"
MIN_VERSE_WORDS = 10  # both halves need a few words for the ending to be predictable from the context
MAX_VERSE_BYTES = 160  # short questions keep scoring cheap and every ending within a small model's context
CHOICES = 4


@functools.cache
def verses() -> tuple[tuple[str, ...], ...]:
    """Verses of at least 10 words and at most 160 bytes, as word tuples, without their numbers, in corpus order."""
    found = []
    with open(CORPUS_DIR / SOURCE, encoding="utf-8") as handle:
        for line in handle:
            for verse_line in json.loads(line)["text"].splitlines()[2:]:  # title and blank line first
                words = tuple(verse_line.split()[1:])
                if len(words) >= MIN_VERSE_WORDS and len(" ".join(words).encode()) <= MAX_VERSE_BYTES:
                    found.append(words)
    return tuple(found)


def _split(words: tuple[str, ...]) -> tuple[str, str]:
    half = (len(words) + 1) // 2
    return " ".join(words[:half]), " ".join(words[half:])


def documents(count: int, seed: int = 0) -> list[ChoiceDocument]:
    """``count`` questions; a function of (count, seed) whose first ``k`` do not depend on ``count``."""
    pool = verses()
    if not 1 <= count <= len(pool) // 2:  # questions come from the front half of the shuffled pool
        raise TaskBuildError(f"corpus_cloze: expected between 1 and {len(pool) // 2} examples, got {count}")
    order = list(range(len(pool)))
    random.Random(f"cloze/{seed}").shuffle(order)
    built = []
    for index in range(count):
        rng = random.Random(f"cloze/{seed}/{index}")
        context, ending = _split(pool[order[index]])
        endings = {ending: None}
        while len(endings) < CHOICES:
            # Distractors from the back half of the shuffled pool: never the true verse of another question.
            endings.setdefault(_split(pool[order[rng.randrange(len(pool) // 2, len(pool))]])[1], None)
        choices = list(endings)
        rng.shuffle(choices)
        built.append(ChoiceDocument(context, tuple(choices), choices.index(ending)))
    return built

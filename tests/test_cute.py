"""CUTE-category tasks (bltjax.tasks.cute) and the corpus cloze (bltjax.tasks.cloze): every answer
correct by construction (checked by independent solvers, themselves checked on the BLT paper's
examples), deterministic, built as local lm-eval tasks that load offline."""

from __future__ import annotations

import collections
import json
import random
import re
import shutil

import pytest

from bltjax.tasks import build, cloze, cute
from bltjax.tasks.__main__ import main as tasks_main


def _quoted(question: str) -> list[str]:
    return re.findall(r'"([^"]*)"', question)


def _replace_units(units: list[str], mapping) -> list[str]:
    return [new for unit in units for new in mapping(unit)]


def solve(category: str, question: str) -> str:
    """The answer to a question, computed independently of bltjax.tasks.cute from the question's text."""
    args = _quoted(question)
    words = category.endswith("_word")
    split = (lambda text: text.split(" ")) if words else list
    join = " ".join if words else "".join
    if category == "spelling":
        return " ".join(args[0])
    if category == "spelling_inverse":
        return args[0].replace(" ", "")
    if category in ("contains_char", "contains_word"):
        unit, text = args
        return "Yes" if unit in split(text) else "No"
    if category.startswith("ins_"):
        new, after, text = args
        return join(_replace_units(split(text), lambda unit: [unit, new] if unit == after else [unit]))
    if category.startswith("del_"):
        gone, text = args
        return join(_replace_units(split(text), lambda unit: [] if unit == gone else [unit]))
    if category.startswith("sub_"):
        old, new, text = args
        return join(_replace_units(split(text), lambda unit: [new] if unit == old else [unit]))
    if category.startswith("swap_"):
        first, second, text = args
        units = split(text)
        assert units.count(first) == units.count(second) == 1, question  # the swap is unambiguous
        i, j = units.index(first), units.index(second)
        units[i], units[j] = units[j], units[i]
        return join(units)
    raise AssertionError(category)


def test_the_solvers_answer_the_papers_examples():
    # BLT paper, Table 11 (its CUTE prompts, BLT's right answers) and CUTE's spelling example.
    assert solve("swap_char", 'Swap "h" and "a" in "that".') == "taht"
    assert solve("sub_char", 'Substitute "a" with "m" in "page".') == "pmge"
    assert solve("ins_char", 'Add "z" after every "n" in "not".') == "nzot"
    assert solve("sub_word", 'Substitute "and" with "internet" in "She went to the kitchen and saw two cereals".') \
        == "She went to the kitchen internet saw two cereals"  # fmt: skip
    assert solve("spelling", 'Spell out the word "cat".') == "c a t"
    assert solve("del_char", 'Delete every "a" in "banana".') == "bnn"


def test_the_generators_answer_hand_checked_cases():
    rng = random.Random(0)
    spelling = cute.GENERATORS["spelling"](rng, ["cat"], [])
    assert spelling == cute.Item('Spell out the word "cat".', "c a t", "", "spelled")
    assert cute.GENERATORS["spelling_inverse"](rng, ["cat"], []).answer == "cat"
    swap = cute.GENERATORS["swap_char"](rng, ["that"], [])  # only h and a occur once
    assert swap.answer == "taht"
    assert cute.GENERATORS["del_word"](rng, [], ["the cat saw the dog"]).answer in {
        "cat saw dog", "the saw the dog", "the cat the dog", "the cat saw the"}  # fmt: skip


@pytest.mark.parametrize("category", cute.CATEGORIES)
def test_every_example_is_correct_by_construction(category):
    examples = cute.examples(category, 150, seed=3)
    for example in examples:
        blocks = example.prompt.split("\n\n")
        assert blocks[0] == cute.INSTRUCTIONS[category] and len(blocks) == cute.SHOTS + 2
        for shot in blocks[1:-1]:  # the solved examples are right too
            question, answer = re.fullmatch(r"Question: (.*)\nAnswer: (.*)", shot).groups()
            assert solve(category, question) == answer
        question = re.fullmatch(r"Question: (.*)\nAnswer:", blocks[-1]).group(1)
        assert solve(category, question) == example.answer
        assert example.choices[example.label] == example.answer
        assert len(set(example.choices)) == len(example.choices) == (2 if category.startswith("contains") else 4)
        if category.split("_")[0] in ("ins", "del", "sub", "swap"):
            source = _quoted(question)[-1]
            assert source in example.choices  # copying the input is the first near miss
    labels = collections.Counter(example.label for example in examples)
    assert len(labels) == len(examples[0].choices)  # the answer is not always in the same place
    if category.startswith("contains"):
        yes = sum(example.answer == "Yes" for example in examples)
        assert 45 <= yes <= 105  # balanced: 75 expected of 150


def test_examples_are_deterministic_and_questions_never_reuse_a_shots_word():
    first = cute.examples("spelling", 100, seed=0)
    assert cute.examples("spelling", 100, seed=0) == first
    assert cute.examples("spelling", 40, seed=0) == first[:40]  # the count does not reshuffle
    assert cute.examples("spelling", 100, seed=1) != first
    shot_words = {w for e in first for w in re.findall(r'word "(\w+)"', e.prompt.rsplit("\n\n", 1)[0])}
    question_words = {re.findall(r'word "(\w+)"', e.prompt)[-1] for e in first}
    assert shot_words and question_words and not shot_words & question_words


def test_word_list_and_sentences_come_from_public_domain_text_of_the_corpus():
    provenance = (cute.CORPUS_DIR / "PROVENANCE.md").read_text()
    for name in (*cute.WORD_SOURCES, cute.SENTENCE_SOURCE, cloze.SOURCE):
        row = next(line for line in provenance.splitlines() if line.startswith(f"| `{name}`"))
        assert row.rstrip(" |").endswith("public domain") or "| public domain" in row, row
    words = cute.word_list()
    assert len(words) > 3000 and all(re.fullmatch(r"[a-z]{3,10}", w) for w in words)
    assert {"light", "earth", "hacker"} <= set(words)
    assert all(5 <= len(s.split()) <= 10 and s.replace(" ", "").isalpha() for s in cute.sentences())


def test_cloze_questions_end_with_their_own_verse_and_distractors_with_others():
    docs = cloze.documents(50, seed=0)
    assert docs == cloze.documents(50, seed=0) and cloze.documents(10, seed=0) == docs[:10]
    verses = {" ".join(words) for words in cloze.verses()}
    for doc in docs:
        assert len(f"{doc.context} {doc.choices[doc.label]}".encode()) <= cloze.MAX_VERSE_BYTES
        assert f"{doc.context} {doc.choices[doc.label]}" in verses
        assert len(set(doc.choices)) == 4
        assert all(f"{doc.context} {choice}" not in verses for i, choice in enumerate(doc.choices) if i != doc.label)
    with pytest.raises(cute.TaskBuildError, match=r"corpus_cloze: expected between 1 and \d+ examples, got 0"):
        cloze.documents(0)


def test_the_command_builds_the_same_task_files_twice(tmp_path, capsys):
    for out in ("a", "b"):
        assert tasks_main(["build", "--out", str(tmp_path / out), "--tasks", "cute,cute_mc,corpus_cloze",
                           "--examples", "5"]) == 0  # fmt: skip
    names = [f"cute_{c}" for c in cute.CATEGORIES] + [f"cute_{c}_mc" for c in cute.CATEGORIES] + ["corpus_cloze"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(names)
    for name in names:
        data = (tmp_path / "a" / name / f"{name}.jsonl").read_bytes()
        assert data == (tmp_path / "b" / name / f"{name}.jsonl").read_bytes() and len(data.splitlines()) == 5
    assert "cute_swap_word_mc: " in capsys.readouterr().out
    assert tasks_main(["build", "--out", str(tmp_path / "c"), "--tasks", "cute_spell"]) == 1
    assert "task 'cute_spell': not a built-in task; expected one of" in capsys.readouterr().err


def test_built_tasks_load_in_lm_eval_offline(tmp_path, monkeypatch):
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks", reason="lm-eval is the eval extra")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = build.build_tasks(["cute_spelling", "cute_spelling_mc", "corpus_cloze_drop"], tmp_path, examples=3)
    loaded = lm_eval_tasks.TaskManager(include_path=str(tmp_path)).load(list(built))["tasks"]
    spelling, choice = loaded["cute_spelling"], loaded["cute_spelling_mc"]
    expected = [json.loads(line) for line in (tmp_path / "cute_spelling" / "cute_spelling.jsonl").open()]
    docs = list(spelling.eval_docs)
    assert [spelling.doc_to_text(d) for d in docs] == [e["prompt"] for e in expected]
    assert [spelling.doc_to_target(d) for d in docs] == [e["answer"] for e in expected]
    assert spelling.OUTPUT_TYPE == "generate_until" and spelling.config.generation_kwargs["until"] == ["\n"]
    longest = max(len(e["answer"].encode()) for e in expected)  # decoding budget: the longest answer and a margin
    assert spelling.config.generation_kwargs["max_gen_toks"] == longest + build.ANSWER_MARGIN_BYTES
    doc = next(iter(choice.eval_docs))
    assert choice.OUTPUT_TYPE == "multiple_choice" and choice.doc_to_choice(doc)[choice.doc_to_target(doc)] == \
        expected[0]["answer"]  # fmt: skip
    assert loaded["corpus_cloze_drop"].OUTPUT_TYPE == "multiple_choice"


def test_a_tiny_model_scores_built_in_tasks_through_the_task_runner(fixtures_dir, tmp_path):
    """A character task (both scorings) and a noised cloze, by name, on the tiny Hugging Face BLT fixture."""
    pytest.importorskip("lm_eval", reason="lm-eval is the eval extra")
    from bltjax.inference.task_runner import run_tasks  # noqa: PLC0415

    model = tmp_path / "hf_blt"
    shutil.copytree(fixtures_dir / "hf_blt_tiny_b", model)
    result = run_tasks(model, "cute_swap_char,cute_swap_char_mc,corpus_cloze_uppercase", limit=3, batch_size=4)
    assert result["n_samples"] == {"cute_swap_char": 3, "cute_swap_char_mc": 3, "corpus_cloze_uppercase": 3}
    assert result["tasks"]["cute_swap_char"]["exact_match"] in (0, 1 / 3, 2 / 3, 1)
    assert result["tasks"]["cute_swap_char_mc"]["acc"] in (0, 1 / 3, 2 / 3, 1)
    assert result["tasks"]["corpus_cloze_uppercase"]["acc"] in (0, 1 / 3, 2 / 3, 1)


def test_the_command_spells_its_flags_both_ways_and_refuses_a_bad_side(tmp_path, capsys):
    from bltjax.tasks.__main__ import PROGRAM  # noqa: PLC0415

    for spelling in ("--apply-to=context", "--apply_to=context"):
        assert PROGRAM.parse(["tasks", "noise", spelling]).flags.apply_to == "context"
    assert tasks_main(["noise", "--task", "x", "--out", str(tmp_path), "--apply-to", "prompt"]) == 2
    assert "apply_to" in capsys.readouterr().err


def test_documented_task_commands_use_only_flags_the_command_defines():
    """Every ``python -m bltjax.tasks`` in the README, docs/ and the package names only flags it defines."""
    from bltjax.tasks.__main__ import PROGRAM  # noqa: PLC0415

    root = cute.CORPUS_DIR.parents[2]
    sources = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "bltjax").rglob("*.py"))]
    commands = [
        match.group(1)
        for path in sources
        for match in re.finditer(r"python -m bltjax\.tasks([^\n`#|]*)", path.read_text().replace("\\\n", " "))
    ]
    assert len(commands) >= 5
    unknown = [flag for command in commands for flag in re.findall(r"(?<![\w-])--?([A-Za-z][\w.-]*)", command)
               if not PROGRAM.knows(flag)]  # fmt: skip
    assert not unknown

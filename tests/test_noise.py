"""The BLT paper's noise transforms (bltjax.tasks.noise): exact where they are deterministic, seeded,
and at their documented rates within binomial tolerance; noised copies of multiple-choice tasks."""

from __future__ import annotations

import itertools
import json
import math
import random
import string

import pytest

from bltjax.tasks import build, noise
from bltjax.tasks.noise import ChoiceDocument


def _text(length: int, seed: int) -> str:
    """Letters and spaces with no two neighbours equal, so every run in a noised copy is one source
    character repeated."""
    rng, chars = random.Random(seed), []
    while len(chars) < length:
        char = rng.choice(string.ascii_lowercase + " ")
        if not chars or char != chars[-1]:
            chars.append(char)
    return "".join(chars)


TEXT = _text(20000, seed=1234)  # long enough for tight rate checks


def _within_binomial(successes: int, trials: int, rate: float, sigmas: float = 4.5) -> bool:
    """True when ``successes`` is within ``sigmas`` standard deviations of trials * rate."""
    return abs(successes - trials * rate) <= sigmas * math.sqrt(trials * rate * (1 - rate))


def test_antspeak_and_uppercase_are_the_papers_deterministic_rewrites():
    assert noise.antspeak("The cat.") == "T H E   C A T ."
    assert noise.uppercase("The cat, 3 dogs.") == "THE CAT, 3 DOGS."
    assert noise.noise_text("ab", "antspeak", seed=1) == noise.noise_text("ab", "antspeak", seed=2) == "A B"


@pytest.mark.parametrize("name", sorted(noise.NOISES))
def test_a_noised_text_is_a_function_of_noise_seed_and_text(name):
    first = noise.noise_text(TEXT, name, seed=7)
    assert noise.noise_text(TEXT, name, seed=7) == first
    noise.noise_text("something else entirely", name, seed=7)  # another text in between changes nothing
    assert noise.noise_text(TEXT, name, seed=7) == first
    if name in ("drop", "randomcase", "repeat"):
        assert noise.noise_text(TEXT, name, seed=8) != first


def test_drop_removes_a_tenth_of_the_characters_and_keeps_the_others_in_order():
    noised = noise.drop(TEXT, seed=3)
    position = 0
    for char in noised:  # a subsequence of the original: str.index raises if a character is out of order
        position = TEXT.index(char, position) + 1
    assert _within_binomial(len(TEXT) - len(noised), len(TEXT), noise.DROP_RATE)
    assert not _within_binomial(len(TEXT) - len(noised), len(TEXT), 0.2)  # the test can tell rates apart


def test_randomcase_uppercases_half_of_the_letters_and_changes_nothing_else():
    noised = noise.randomcase(TEXT, seed=4)
    assert noised.lower() == TEXT.lower() and len(noised) == len(TEXT)
    letters = [char for char in noised if char.isalpha()]
    assert _within_binomial(sum(char.isupper() for char in letters), len(letters), noise.RANDOMCASE_UPPER_RATE)
    mixed = noise.randomcase("ABCDEFGHIJ" * 500, seed=4)
    assert _within_binomial(sum(c.islower() for c in mixed), len(mixed), 1 - noise.RANDOMCASE_UPPER_RATE)


def test_repeat_writes_a_fifth_of_the_characters_two_to_four_times():
    noised = noise.repeat(TEXT, seed=5)
    runs = [len(list(group)) for _, group in itertools.groupby(noised)]
    assert len(runs) == len(TEXT)  # no neighbours were equal, so one run per source character
    assert "".join(char for char, _ in itertools.groupby(noised)) == TEXT
    repeated = [length for length in runs if length > 1]
    assert set(repeated) == {2, 3, 4}
    assert _within_binomial(len(repeated), len(runs), noise.REPEAT_RATE)
    for copies in (2, 3, 4):  # uniform over 2..4 copies
        assert _within_binomial(repeated.count(copies), len(repeated), 1 / 3)


def test_noise_names_and_errors_name_the_expected_values():
    assert noise.noise_names("all") == ["antspeak", "drop", "randomcase", "repeat", "uppercase"]
    assert noise.noise_names("drop, uppercase") == ["drop", "uppercase"]
    with pytest.raises(noise.NoiseError, match=r"unknown \['shout'\].*antspeak, drop, randomcase, repeat, uppercase"):
        noise.noise_names("drop,shout")
    with pytest.raises(noise.NoiseError, match="apply_to: expected one of both, context, choices"):
        noise.noise_document(ChoiceDocument("a", ("b",), 0), "drop", apply_to="prompt")


def test_noising_a_question_touches_the_chosen_side_and_never_the_label():
    doc = ChoiceDocument("A man is sitting on a roof.", ("he starts pulling up roofing.", "he eats a cake."), 1)
    assert noise.noise_document(doc, "uppercase", apply_to="context") == ChoiceDocument(
        "A MAN IS SITTING ON A ROOF.", doc.choices, 1
    )
    assert noise.noise_document(doc, "uppercase", apply_to="choices") == ChoiceDocument(
        doc.context, ("HE STARTS PULLING UP ROOFING.", "HE EATS A CAKE."), 1
    )
    both = noise.noise_document(doc, "antspeak")
    assert both.context == " ".join(doc.context.upper()) and both.choices[1] == " ".join("HE EATS A CAKE.")


def test_the_builtin_cloze_task_has_a_noised_copy_per_noise(tmp_path):
    built = build.build_tasks(["corpus_cloze", "corpus_cloze_noised"], tmp_path, examples=20, seed=0)
    assert list(built) == ["corpus_cloze"] + [f"corpus_cloze_{name}" for name in noise.NOISES]

    def documents(name):
        return [json.loads(line) for line in (tmp_path / name / f"{name}.jsonl").read_text().splitlines()]

    clean = documents("corpus_cloze")
    for name in noise.NOISES:
        noised = documents(f"corpus_cloze_{name}")
        assert [d["label"] for d in noised] == [d["label"] for d in clean]
        assert noised == [noise.noise_document(ChoiceDocument(d["context"], tuple(d["choices"]), d["label"]), name)
                          .to_json() for d in clean]  # fmt: skip
    uppercase = documents("corpus_cloze_uppercase")
    assert uppercase[0]["context"] == clean[0]["context"].upper()


# HellaSwag's field layout (the Hugging Face dataset "Rowan/hellaswag"), two tiny made-up rows.
HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the "
     "window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "", "endings": [
         ", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting "
         "the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas "
         "coat, knitted with netting.", ", the man continues removing the snow on his car."], "source_id": "x",
     "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 9, "activity_label": "Baking cookies", "ctx_a": "A female chef in white uniform shows a stack of baking "
     "pans in a large kitchen presenting them.", "ctx_b": "the pans", "ctx": "", "endings": [
         "contain egg yolks and baking soda.", "are then sprinkled with brown sugar.", "are placed in a strainer on "
         "the counter.", "are filled with pastries and loaded into the oven."], "source_id": "y", "split": "val",
     "split_type": "indomain", "label": "3"},
]  # fmt: skip


def _lm_eval():
    """lm-eval (the `eval` extra), or a skip naming why it is missing."""
    try:
        import lm_eval.tasks  # noqa: PLC0415
    except ImportError as err:
        pytest.skip(f"lm-eval (the eval extra) is not installed: {err}")
    return lm_eval


def _tiny_hellaswag(folder):
    """A local task with lm-eval's own hellaswag config (its process_docs and templates), over two rows."""
    lm_eval = _lm_eval()
    import pathlib  # noqa: PLC0415

    config = pathlib.Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    data = folder / "hellaswag_tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS))
    yaml = folder / "hellaswag_tiny.yaml"
    yaml.write_text(
        f"include: {config}\ntask: hellaswag_tiny\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {data}\n    validation: {data}\n"
    )
    return yaml


def test_noise_applies_to_a_hellaswag_task_as_lm_eval_renders_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "source"
    source.mkdir()
    yaml = _tiny_hellaswag(source)
    built = build.noise_task(str(yaml), "uppercase,drop", tmp_path / "noised", seed=0)
    assert list(built) == ["hellaswag_tiny_clean", "hellaswag_tiny_uppercase", "hellaswag_tiny_drop"]

    def documents(name):
        return [json.loads(line) for line in (tmp_path / "noised" / name / f"{name}.jsonl").read_text().splitlines()]

    clean = documents("hellaswag_tiny_clean")
    # lm-eval's hellaswag process_docs: "<activity>: <ctx_a> <Ctx_b>", endings stripped.
    expected = "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
    assert clean[0]["context"] == expected + "wearing winter clothes smiles. Then"
    assert clean[0]["choices"][3] == ", the man continues removing the snow on his car."
    assert [d["label"] for d in clean] == [3, 3]
    upper = documents("hellaswag_tiny_uppercase")
    assert [d["context"] for d in upper] == [d["context"].upper() for d in clean]
    assert [d["choices"] for d in upper] == [[c.upper() for c in d["choices"]] for d in clean]
    dropped = documents("hellaswag_tiny_drop")
    assert dropped[0]["context"] == noise.drop(clean[0]["context"], seed=0)

    # The noised copy is an lm-eval task like any other.
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    loaded = TaskManager(include_path=str(tmp_path / "noised")).load(["hellaswag_tiny_drop"])
    task = loaded["tasks"]["hellaswag_tiny_drop"]
    first = next(iter(task.eval_docs))
    assert task.doc_to_text(first) == dropped[0]["context"] and task.doc_to_target(first) == 3


def test_a_task_whose_data_is_not_here_is_one_clear_error(tmp_path):
    _lm_eval()
    yaml = tmp_path / "gone.yaml"
    yaml.write_text(
        "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    with pytest.raises(build.TaskBuildError, match=r"--task '.*gone\.yaml': its data is not on this machine"):
        build.noise_task(str(yaml), "drop", tmp_path / "out")
    with pytest.raises(build.TaskBuildError, match="lm-eval knows no task 'no_such_task'"):
        build.noise_task("no_such_task", "drop", tmp_path / "out")

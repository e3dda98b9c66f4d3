"""The lm-eval model ``bltjax`` (bltjax/inference/harness.py) against direct forward passes of the model.

The model is the tiny Hugging Face BLT of tests/fixtures/hf_blt_tiny_b, read with its own
entropy patcher (entropy patching at its threshold, max patch length 5), float32. Every number
the harness returns is recomputed here from `model.apply` over one sequence at a time (no
padding, no batching): entropy model -> patch lengths -> BLT logits -> log-softmax. The
requests need the eval extra (lm-eval); everything runs offline.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from bltjax import checkpoints, patching  # noqa: E402
from bltjax.convert import hf  # noqa: E402
from bltjax.inference import harness  # noqa: E402
from bltjax.inference.generation import generate  # noqa: E402
from bltjax.inference.restore import load_for_inference  # noqa: E402
from bltjax.models.byte_lm import next_byte_entropy  # noqa: E402
from bltjax.models.factory import build_model, example_inputs  # noqa: E402
from bltjax.patching.incremental import IncrementalRule  # noqa: E402
from bltjax.tokenizer import BOS_ID  # noqa: E402

CONTEXTS = [
    ("The cat sat on the", " mat."),
    ("", "Hello"),
    ("Byte Latent Transformers patch bytes by the entropy of the next byte.", " Patches"),
    ("é ü 中文, ", "and more"),
    ("One, two,", " three"),
    ("x" * 40, "y"),
]


@pytest.fixture(scope="module")
def hf_dir(fixtures_dir):
    return fixtures_dir / "hf_blt_tiny_b"


@pytest.fixture(scope="module")
def direct(hf_dir):
    """Log-softmax rows [n - 1, V] of ids [n] from the fixture's own modules, one unpadded sequence at a time."""
    model, params = hf.load_hf_blt(hf_dir)
    entropy_model, entropy_params, threshold = hf.load_hf_entropy_model(hf_dir)
    rule = IncrementalRule.from_config(load_for_inference(hf_dir).config)
    assert rule.needs_entropy and rule.threshold == pytest.approx(threshold)
    blt = jax.jit(lambda p, t, lengths: model.apply({"params": p}, t, lengths))
    lm = jax.jit(lambda p, t: entropy_model.apply({"params": p}, t))

    def logprobs(ids) -> np.ndarray:
        tokens = np.asarray(ids[:-1], np.int32)[None]
        entropies = np.asarray(next_byte_entropy(lm(entropy_params, tokens)))
        entropies = entropies.astype(np.float16) if rule.entropy_float16 else entropies.astype(np.float32)
        lengths = patching.patch_lengths(tokens, rule, entropies=entropies, include_next_token=True)
        logits = np.asarray(blt(params, tokens, lengths))[0].astype(np.float64)
        return (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )

    return logprobs


def _direct_score(logprobs, ids, k) -> tuple[float, bool]:
    rows = logprobs(ids)[len(ids) - k - 1 :]
    targets = np.asarray(ids[len(ids) - k :])
    return float(rows[np.arange(k), targets].sum()), bool(np.all(rows.argmax(-1) == targets))


@pytest.fixture(scope="module")
def lm(hf_dir):
    return harness.BltjaxLM(path=str(hf_dir), batch_size=4)


def _ids(text: str) -> list[int]:
    return harness.byte_ids(text)


def test_loglikelihood_equals_the_sum_of_per_byte_log_probs_of_model_apply(lm, direct):
    assert lm.scorer.entropy_model is not None  # the folder's own patcher, found without model_args
    got = lm.scorer.loglikelihood(CONTEXTS)  # 6 requests in batches of 4: sorting, padding and order
    for (context, continuation), (logprob, greedy) in zip(CONTEXTS, got, strict=True):
        ids = [BOS_ID, *_ids(context), *_ids(continuation)]
        want, want_greedy = _direct_score(direct, ids, len(_ids(continuation)))
        assert logprob == pytest.approx(want, abs=1e-5), (context, continuation)
        assert greedy == want_greedy
    # is_greedy: the model's own argmax continuation is greedy, a changed last byte is not.
    ids = [BOS_ID, *_ids("The cat sat")]
    for _ in range(3):
        ids.append(int(direct(ids + [0])[-1].argmax()))
    greedy_text = bytes(i - 4 for i in ids[-3:])
    other = bytes([*greedy_text[:2], (greedy_text[2] + 1) % 128])
    (_, is_greedy), (_, not_greedy) = lm.scorer.score([(ids, 3), (ids[:-1] + [other[2] + 4], 3)])
    assert is_greedy and not not_greedy


def test_long_contexts_lose_their_oldest_bytes(hf_dir, direct):
    short = harness.BltjaxLM(path=str(hf_dir), batch_size=2, max_length=32)
    context, continuation = "a long context " * 6, " end"
    (logprob, _), (empty_context, _) = short.scorer.loglikelihood([(context, continuation), ("", continuation)])
    ids = [BOS_ID, *_ids(context), *_ids(continuation)][-33:]  # 32 inputs + the last target
    assert logprob == pytest.approx(_direct_score(direct, ids, 4)[0], abs=1e-5)
    assert empty_context == pytest.approx(_direct_score(direct, [BOS_ID, *_ids(continuation)], 4)[0], abs=1e-5)
    with pytest.raises(harness.HarnessError, match="more than max_length=32"):
        short.scorer.loglikelihood([("", "z" * 40)])


def test_rolling_windows_score_every_byte_once_with_context():
    for n_ids in (1, 2, 5, 32, 33, 100, 257):
        windows = harness.rolling_windows(n_ids, max_length=32, context=8)
        scored = [t for w in windows for t in range(w.first, w.stop)]
        assert scored == list(range(1, n_ids))  # every byte (not BOS) once, in order
        for w in windows:
            assert 0 <= w.start < w.first < w.stop and w.stop - 1 - w.start <= 32  # at most 32 inputs
            if w.first > 1:
                assert w.first - w.start >= 8  # at least rolling_context bytes of context
    with pytest.raises(harness.HarnessError, match="rolling_context"):
        harness.rolling_windows(10, max_length=8, context=8)


def test_rolling_loglikelihood_equals_direct_sums(hf_dir, lm, direct):
    short_doc = "A short document, one window."
    (whole,) = lm.scorer.loglikelihood_rolling([short_doc])
    ids = [BOS_ID, *_ids(short_doc)]
    assert whole == pytest.approx(_direct_score(direct, ids, len(ids) - 1)[0], abs=1e-5)

    windowed = harness.BltjaxLM(path=str(hf_dir), batch_size=4, max_length=32, rolling_context=8)
    long_doc = "Every byte of a long document is scored exactly once across windows. " * 2
    ids = [BOS_ID, *_ids(long_doc)]
    windows = harness.rolling_windows(len(ids), 32, 8)
    assert len(windows) > 3
    want = sum(_direct_score(direct, ids[w.start : w.stop], w.stop - w.first)[0] for w in windows)
    got_long, got_short = windowed.scorer.loglikelihood_rolling([long_doc, short_doc])
    assert got_long == pytest.approx(want, abs=1e-4)
    # With one window the whole short document is scored as before; many windows differ from one.
    assert got_short == pytest.approx(whole, abs=1e-5)


def test_generate_until_is_greedy_generation_cut_at_the_first_stop_sequence(lm, monkeypatch):
    """The rows stop inside the generation loop at their first stop sequence; the text is cut before it."""
    loaded = lm.scorer.loaded
    prompt = "The Jargon File"
    (full,) = generate(loaded.model, loaded.params, loaded.config, [prompt], entropy_model=lm.scorer.entropy_model,
                       max_bytes=24)  # fmt: skip
    text = full.text
    # A stop made of real characters (a random model's invalid bytes decode to U+FFFD, which no byte
    # sequence of the generation contains: such a stop only cuts the text, it cannot end the row).
    stop = next(s for i in range(4, len(text) - 2) if "\ufffd" not in (s := text[i : i + 2]) and s not in text[:i])
    generated = []

    def spy(*args, **kwargs):
        generated.extend(results := generate(*args, **kwargs))
        return results

    monkeypatch.setattr(harness, "generate", spy)
    got = lm.scorer.generate_until(
        [(prompt, {"until": [stop, "\x00never"], "max_gen_toks": 24}), (prompt, {"until": [], "max_gen_toks": 24})]
    )
    assert got == [text[: text.index(stop)], text]
    assert [r.stop_reason for r in generated] == ["stop_sequence", "max_bytes"]  # the first row stopped early
    assert generated[0].text == text[: text.index(stop) + len(stop)]
    assert 4 <= len(got[0]) < len(text)
    with pytest.raises(harness.HarnessError, match="unknown key 'top_k'"):
        lm.scorer.generate_until([(prompt, {"until": ["\n"], "top_k": 5})])
    with pytest.raises(harness.HarnessError, match="max_gen_toks: expected a positive number of bytes, got 0"):
        lm.scorer.generate_until([(prompt, {"max_gen_toks": 0})])


def _write_choice_task(folder, docs) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "choice.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    yaml = folder / "choice.yaml"
    yaml.write_text(
        "task: bltjax_test_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return yaml


def test_a_local_multiple_choice_yaml_task_scores_the_direct_accuracy(hf_dir, lm, direct, tmp_path):
    from bltjax.inference.task_runner import run_tasks

    questions = [(c, ["mat.", "sky.", "hat."]) for c in ("The cat sat on the", "A dog sat on the")]
    questions += [(c, ["three", "seven"]) for c in ("One, two,", "Ten, nine,", "Bits per")]
    docs, right = [], 0
    for index, (context, choices) in enumerate(questions):
        # lm-eval joins context and choice with its target_delimiter " ".
        scores = [_direct_score(direct, [BOS_ID, *_ids(context), *_ids(" " + c)], len(c) + 1)[0] for c in choices]
        best = int(np.argmax(scores))
        label = best if index % 2 == 0 else (best + 1) % len(choices)  # some right, some wrong
        right += label == best
        docs.append({"context": context, "choices": choices, "label": label})
    yaml = _write_choice_task(tmp_path / "task", docs)
    result = run_tasks(hf_dir, [str(yaml)], model=lm)
    assert result["tasks"]["bltjax_test_choice"]["acc"] == pytest.approx(right / len(docs))
    assert result["n_samples"] == {"bltjax_test_choice": len(docs)} and 0 < right < len(docs)
    assert result["model"] == str(hf_dir) and result["step"] is None
    assert run_tasks(hf_dir, [str(yaml.parent)], model=lm, limit=2)["n_samples"] == {"bltjax_test_choice": 2}


def test_a_hugging_face_import_and_its_bltjax_save_score_the_same(hf_dir, lm, tmp_path):
    from bltjax.data.entropy import load_entropy_model

    loaded = load_for_inference(hf_dir)
    model_dir = checkpoints.save_model(tmp_path / "blt", loaded.config, jax.device_get(loaded.params))
    entropy = load_entropy_model(hf_dir)
    entropy_dir = checkpoints.save_model(tmp_path / "entropy", entropy.config, jax.device_get(entropy.params))
    with pytest.raises(harness.HarnessError, match="entropy_model: .* add entropy_model=DIR"):
        harness.BltjaxLM(path=str(model_dir))  # nothing next to a bare model folder proves its entropy model
    saved = harness.BltjaxLM(path=str(model_dir), entropy_model=str(entropy_dir), batch_size=4)
    ours, theirs = saved.scorer.loglikelihood(CONTEXTS), lm.scorer.loglikelihood(CONTEXTS)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-6)
    doc = "The same weights, saved by bltjax, read back."
    assert saved.scorer.loglikelihood_rolling([doc]) == pytest.approx(lm.scorer.loglikelihood_rolling([doc]), abs=1e-6)


def test_a_byte_lm_is_scored_by_its_own_forward_pass(tmp_path):
    from bltjax.config import load_config

    config = load_config("experiments/byte_lm.py:tiny")
    config.data.seq_len = 128  # every request fits: nothing truncated
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(3), *example_inputs(config))["params"]
    model_dir = checkpoints.save_model(tmp_path / "byte_lm", config, params)
    lm = harness.BltjaxLM(path=str(model_dir), batch_size=2)
    assert lm.scorer.entropy_model is None and lm.scorer.max_length == 128
    got = lm.scorer.loglikelihood(CONTEXTS[:3])
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for (context, continuation), (logprob, _) in zip(CONTEXTS[:3], got, strict=True):
        ids = [BOS_ID, *_ids(context), *_ids(continuation)]
        logits = np.asarray(forward(params, np.asarray(ids[:-1], np.int32)[None]))[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        k = len(_ids(continuation))
        want = float(logp[np.arange(len(ids) - k - 1, len(ids) - 1), ids[-k:]].sum())
        assert logprob == pytest.approx(want, abs=1e-5)

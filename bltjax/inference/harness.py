r"""The lm-eval-harness model ``bltjax``: lm-eval's tasks scored by any bltjax byte-level model.

    python -m bltjax.inference.harness run --model bltjax \
        --model_args path=runs/quickstart/blt,batch_size=16 --tasks my_task --include_path tasks/

This is lm-eval's own command line (``lm-eval run ...``) with the model ``bltjax`` registered;
`bltjax.inference.task_runner.run_tasks` and ``python -m bltjax.evaluate`` call it from Python.
``model_args``: ``path=DIR`` (a training workdir, its newest complete step or ``step=N``; a
`save_model` folder; a Hugging Face BLT folder or Hub id), ``batch_size`` (rows per forward pass,
default 8), ``max_length`` (input ids per forward pass, default the model's ``data.seq_len``) and,
for an entropy-patched BLT whose entropy model cannot be found next to it, ``entropy_model=DIR``.
lm-eval would reach the Hugging Face Hub for datasets: this module sets ``HF_DATASETS_OFFLINE=1``
and ``HF_HUB_OFFLINE=1`` unless they are set already, so tasks run from local files and caches.

Conventions (docs/evaluation.md). Text is UTF-8 bytes, id = byte + 4 after a BOS (`bltjax.tokenizer`).

* ``loglikelihood(context, continuation)``: one forward pass over the inputs BOS + context +
  continuation (all but its last byte) with the model's own patching: the entropy model, the
  patcher and ``BLT.apply`` as training runs them (`generation.full_forward`). The score is the
  sum of the continuation bytes' log-probabilities, and ``is_greedy`` says every one of them was
  the argmax. A sequence of more than ``max_length`` inputs loses its oldest ids (BOS first).
* ``loglikelihood_rolling(text)``: every byte of BOS + text scored exactly once, in windows of
  at most ``max_length`` inputs (`rolling_windows`): the first window scores the first
  ``max_length`` bytes; each later one scores the next ``max_length - rolling_context`` bytes
  and sees as many bytes before them as fit, at least ``rolling_context``.
* ``generate_until(context, {until, max_gen_toks, ...})``: cached generation
  (`generation.generate`), greedy unless ``do_sample``; stops at EOS or after ``max_gen_toks``
  bytes, and the text is cut at the first stop sequence. The prompt keeps its last
  ``max_length - 1`` bytes (BOS + prompt fit the model's length); the bytes generated follow it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

# Set before lm_eval (and through it `datasets`, which reads them at import) is imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402

from bltjax.inference.generation.decode import full_forward, generate  # noqa: E402
from bltjax.inference.restore import InferenceModel, load_for_inference  # noqa: E402
from bltjax.tokenizer import BOS_ID, OFFSET  # noqa: E402

MODEL_NAME = "bltjax"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until
SCORED_MODEL_TYPES = ("blt", "byte_lm")


class HarnessError(ValueError):
    """A model or request the harness cannot score; the message names the model_arg or request field."""


def byte_ids(text: str | bytes) -> list[int]:
    """The ids of ``text``'s UTF-8 bytes (no BOS/EOS)."""
    data = text.encode("utf-8", errors="ignore") if isinstance(text, str) else bytes(text)
    return [b + OFFSET for b in data]


@dataclasses.dataclass(frozen=True)
class Window:
    """One rolling window: inputs are ids[start:stop - 1], and the targets ids[first:stop] are scored."""

    start: int  # first input id
    first: int  # first scored target
    stop: int  # one past the last scored target


def rolling_windows(n_ids: int, max_length: int, context: int) -> list[Window]:
    """Windows over a sequence of ``n_ids`` ids (BOS + bytes) that score ids 1..n_ids-1 exactly once.

    Window k scores up to ``max_length`` targets (the first) or ``max_length - context`` (the
    others) and feeds the at most ``max_length`` ids before its last target.
    """
    if not 0 <= context < max_length:
        raise HarnessError(f"rolling_context: expected 0 <= rolling_context < max_length={max_length}, got {context}")
    windows, first = [], 1
    while first < n_ids:
        stop = min(n_ids, first + (max_length if first == 1 else max_length - context))
        windows.append(Window(max(0, stop - 1 - max_length), first, stop))
        first = stop
    return windows


def _batch_size(value: Any) -> int:
    """lm-eval passes batch_size as an int, a digit string or 'auto' (which becomes the default)."""
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"batch_size: expected a positive number of rows, got {value!r}") from None
    if size < 1:
        raise HarnessError(f"batch_size: expected a positive number of rows, got {value!r}")
    return size


def _entropy_model_for(loaded: InferenceModel, path: str, entropy_model: str | None):
    """The entropy model an entropy-patched BLT needs (given, or the one that provably goes with it)."""
    from bltjax.inference.generation.folders import default_entropy_model
    from bltjax.patching.incremental import IncrementalRule

    if loaded.config.model_type != "blt" or not IncrementalRule.from_config(loaded.config).needs_entropy:
        return None
    from bltjax.data.entropy import load_entropy_model

    source = entropy_model or default_entropy_model(path, loaded.config)
    if source is None:
        raise HarnessError(
            f"entropy_model: {loaded.source} is an entropy-patched BLT (config.patching.mode='entropy'); add "
            "entropy_model=DIR to model_args (e.g. runs/quickstart/entropy_model/export)"
        )
    try:
        return load_entropy_model(source)
    except (FileNotFoundError, ValueError) as err:
        raise HarnessError(f"entropy_model: {err}") from err


class ByteScorer:
    """Log-probabilities and generations of one loaded model, batched; what the lm-eval model calls."""

    def __init__(
        self,
        loaded: InferenceModel,
        entropy_model: Any = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        rolling_context: int | None = None,
    ) -> None:
        if loaded.config.model_type not in SCORED_MODEL_TYPES:
            raise HarnessError(
                f"path: {loaded.source} holds a {loaded.config.model_type!r} model; the harness scores byte-level "
                f"models ({', '.join(SCORED_MODEL_TYPES)})"
            )
        self.loaded = loaded
        self.entropy_model = entropy_model
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or loaded.config.data.seq_len)
        if self.max_length < 2:
            raise HarnessError(f"max_length: expected at least 2 input ids, got {self.max_length}")
        self.rolling_context = self.max_length // 4 if rolling_context is None else int(rolling_context)
        rolling_windows(0, self.max_length, self.rolling_context)  # checks rolling_context now

    def _forward_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per input row, float64 log-softmax [len, V] of one training-mode forward (rows padded to a full batch)."""
        padded = list(rows) + [rows[0]] * (self.batch_size - len(rows))  # one shape per width: one compilation
        loaded = self.loaded
        # Widths and patch columns in powers of two: requests of every length share a few compiled shapes.
        logits = full_forward(
            loaded.model, loaded.params, loaded.config, padded, entropy_model=self.entropy_model, power_of_two=True
        )
        out = []
        for row, ids in enumerate(rows):
            x = logits.logits[row, : len(ids)].astype(np.float64)
            top = x.max(axis=-1, keepdims=True)
            out.append(x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))
        return out

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) of the last ``k`` ids of each ``(ids, k)``; inputs are ids[:-1].

        Rows are sorted by length so that each batch pads little; results come back in order.
        """
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        for chunk in _chunks(order, self.batch_size):
            todo = [i for i in chunk if sequences[i][1] > 0]
            for i in chunk:
                if sequences[i][1] == 0:
                    results[i] = (0.0, True)
            if not todo:
                continue
            logprobs = self._forward_logprobs([list(sequences[i][0][:-1]) for i in todo])
            for i, lp in zip(todo, logprobs, strict=True):
                ids, k = np.asarray(sequences[i][0]), sequences[i][1]
                targets = ids[len(ids) - k :]
                rows = lp[len(ids) - k - 1 :]
                total = float(rows[np.arange(k), targets].sum())
                results[i] = (total, bool(np.all(rows.argmax(axis=-1) == targets)))
        return results  # type: ignore[return-value]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        sequences = []
        for index, (context, continuation) in enumerate(pairs):
            target = byte_ids(continuation)
            if len(target) > self.max_length:
                raise HarnessError(
                    f"request {index}: the continuation has {len(target)} bytes, more than max_length="
                    f"{self.max_length} inputs can score; raise max_length in model_args"
                )
            ids = [BOS_ID, *byte_ids(context), *target]
            sequences.append((ids[-(self.max_length + 1) :], len(target)))
        return self.score(sequences)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        pieces, owner = [], []
        for index, text in enumerate(texts):
            ids = [BOS_ID, *byte_ids(text)]
            for window in rolling_windows(len(ids), self.max_length, self.rolling_context):
                pieces.append((ids[window.start : window.stop], window.stop - window.first))
                owner.append(index)
        totals = [0.0] * len(texts)
        for index, (logprob, _) in zip(owner, self.score(pieces), strict=True):
            totals[index] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Continuations cut at the first stop sequence; requests with equal settings are batched."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, (_, kwargs) in enumerate(requests):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(index)
        for key, members in groups.items():
            settings = _generation_settings(json.loads(key))
            keep = self.max_length - 1  # BOS + prompt fill at most max_length positions
            for chunk in _chunks(members, self.batch_size):
                prompts = [requests[i][0].encode("utf-8", errors="ignore")[-keep:] for i in chunk]
                loaded = self.loaded
                generated = generate(
                    loaded.model,
                    loaded.params,
                    loaded.config,
                    prompts,
                    entropy_model=self.entropy_model,
                    max_bytes=settings["max_bytes"],
                    temperature=settings["temperature"],
                    top_p=settings["top_p"],
                    seed=settings["seed"],
                    stop_sequences=[stop for stop in settings["until"] if stop],  # rows stop at their first
                )
                for i, result in zip(chunk, generated, strict=True):
                    results[i] = cut_at_stop(result.text, settings["until"])
        return results  # type: ignore[return-value]


def _generation_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's gen_kwargs as `generate`'s arguments; unknown keys are an error (nothing silently ignored)."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_bytes = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
    top_p = float(kwargs.pop("top_p", 1.0))
    seed = int(kwargs.pop("seed", 0))
    if not do_sample:
        temperature = 0.0
    unknown = sorted(kwargs)
    if unknown:
        raise HarnessError(
            f"gen_kwargs: unknown key {unknown[0]!r}; expected until, max_gen_toks, do_sample, temperature, top_p, seed"
        )
    if max_bytes < 1:
        raise HarnessError(f"gen_kwargs.max_gen_toks: expected a positive number of bytes, got {max_bytes}")
    return {"until": until, "max_bytes": max_bytes, "temperature": temperature, "top_p": top_p, "seed": seed}


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in until:
        if stop and (found := text.find(stop)) >= 0:
            cut = min(cut, found)
    return text[:cut]


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class BltjaxLM(LM):
    """lm-eval's ``--model bltjax``; ``model_args`` as in the module docstring."""

    def __init__(
        self,
        path: str | None = None,
        batch_size: Any = None,
        max_length: int | None = None,
        entropy_model: str | None = None,
        step: int | None = None,
        rolling_context: int | None = None,
        max_batch_size: Any = None,  # passed by lm-eval's command line; batches are fixed-size here
        device: Any = None,  # passed by lm-eval's command line; jax places the model itself
        scorer: ByteScorer | None = None,
    ) -> None:
        super().__init__()
        if scorer is None:
            if not path:
                raise HarnessError("path: give the model folder in model_args, e.g. path=runs/quickstart/blt")
            loaded = load_for_inference(str(path), step=None if step is None else int(step),
                                        devices=jax.local_devices()[:1])  # fmt: skip
            scorer = ByteScorer(
                loaded,
                _entropy_model_for(loaded, str(path), entropy_model),
                batch_size=_batch_size(batch_size),
                max_length=None if max_length is None else int(max_length),
                rolling_context=None if rolling_context is None else int(rolling_context),
            )
        self.scorer = scorer

    @property
    def tokenizer_name(self) -> str:
        return "bltjax-bytes"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([request.args for request in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([request.args[0] for request in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.scorer.generate_until([request.args for request in requests])


# Registered by import path, not by class: run as ``python -m bltjax.inference.harness`` this file is
# also ``__main__``, and a path names one class however often the module is imported.
model_registry.register(MODEL_NAME, target="bltjax.inference.harness:BltjaxLM")


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with ``--model bltjax`` available (``argv`` without the program name)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["python -m bltjax.inference.harness", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()

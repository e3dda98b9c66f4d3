"""What `generate` is asked, checked and batched: prompts, sampling settings and stop sequences.

Arrays are padded to rounded widths (`PROMPT_BUCKET`, `STOP_BUCKET`) so that requests of similar
sizes share one compiled generation program.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bltjax.tokenizer import BOE_ID, OFFSET, encode

PROMPT_BUCKET = 16  # prompt widths are rounded up to a multiple of this (fewer compilations)
STOP_BUCKET = 8  # stop sequences: their count rounded up to a multiple of 4, their width to one of this


def check_arguments(prompts: Any, max_bytes: int, temperature: float, top_p: float) -> list[bytes]:
    """The prompts as bytes (str as UTF-8); a bad prompt or setting is an error that names it."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: expected a non-empty list of str or bytes")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append(prompt.encode("utf-8", errors="ignore"))
        elif isinstance(prompt, (bytes, bytearray)):
            out.append(bytes(prompt))
        else:
            raise TypeError(f"prompts[{i}]: expected str or bytes, got {type(prompt).__name__}")
    if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_bytes: expected a positive integer, got {max_bytes!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    return out


def check_stop_sequences(stop_sequences: Any) -> list[bytes]:
    """The stop sequences as bytes (str as UTF-8); an empty one would stop every row at once, so it is refused."""
    if isinstance(stop_sequences, (str, bytes)) or not isinstance(stop_sequences, Sequence):
        raise TypeError("stop_sequences: expected a list of str or bytes")
    out = []
    for i, stop in enumerate(stop_sequences):
        data = stop.encode("utf-8") if isinstance(stop, str) else stop
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError(f"stop_sequences[{i}]: expected a non-empty str or bytes, got {stop!r}")
        out.append(bytes(data))
    return out


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def stop_batch(stop_sequences: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences as ids right-aligned in [S, L] (S, L rounded up: fewer compilations) and their lengths [S].

    Padding rows have length 0 and never match; the loop compares each row's last L ids with them."""
    count = round_up(len(stop_sequences), 4)
    width = round_up(max([len(s) for s in stop_sequences] + [1]), STOP_BUCKET)
    ids = np.zeros((count, width), np.int32)
    lengths = np.zeros(count, np.int32)
    for row, stop in enumerate(stop_sequences):
        ids[row, width - len(stop) :] = np.frombuffer(stop, np.uint8).astype(np.int32) + OFFSET
        lengths[row] = len(stop)
    return ids, lengths


def prompt_batch(prompts: list[bytes], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned ids (BOS + bytes, BOE padding) [B, T] and lengths [B]."""
    encoded = [encode(p, bos=True, eos=False) for p in prompts]
    lengths = np.array([ids.size for ids in encoded], np.int32)
    tokens = np.full((len(encoded), round_up(int(lengths.max()), bucket)), BOE_ID, np.int32)
    for row, ids in enumerate(encoded):
        tokens[row, : ids.size] = ids
    return tokens, lengths

"""Bytes <-> token ids, exactly as the BLT checkpoints expect them (docs/architecture.md §1).

BLT has no learned tokenizer: every UTF-8 byte ``b`` is token ``b + 4``, and the four ids below
it are special. The vocabulary is therefore 260 for every embedding and output head.
"""

from __future__ import annotations

import numpy as np

BOE_ID = 0  # "beginning of example": padding id and hash-window filler
BOS_ID = 1  # prepended to every document
EOS_ID = 2  # appended to training documents; ends an attention segment
BPE_ID = 3  # delimiter of the optional bpe-delimiter tokenization
OFFSET = 4  # byte b is token b + OFFSET
VOCAB_SIZE = 256 + OFFSET


def encode(text: str | bytes, *, bos: bool = True, eos: bool = True) -> np.ndarray:
    """Returns the int32 ids of ``text``: [BOS] + (UTF-8 bytes + 4) + [EOS].

    Code points that UTF-8 cannot encode (lone surrogates) are dropped, as the reference does.
    Generation prompts use ``eos=False``.
    """
    if isinstance(text, str):
        data = text.encode("utf-8", errors="ignore")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
    else:
        raise TypeError(f"encode: expected str or bytes for 'text', got {type(text).__name__}")
    body = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + OFFSET
    parts = [np.array([BOS_ID], np.int32)] if bos else []
    parts.append(body)
    if eos:
        parts.append(np.array([EOS_ID], np.int32))
    return np.concatenate(parts)


def decode(ids, *, stop_at_eos: bool = False) -> str:
    """Returns the text of ``ids``: special ids are dropped and invalid UTF-8 is skipped.

    With ``stop_at_eos`` everything after the first EOS is cut, which is what generation wants.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"decode: ids must lie in [0, {VOCAB_SIZE}), got range [{ids.min()}, {ids.max()}]")
    if stop_at_eos:
        eos_positions = np.flatnonzero(ids == EOS_ID)
        if eos_positions.size:
            ids = ids[: eos_positions[0]]
    byte_ids = ids[ids >= OFFSET] - OFFSET
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="ignore")

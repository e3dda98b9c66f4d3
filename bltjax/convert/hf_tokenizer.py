"""The tokenizer and generation files of a `transformers` BLT folder, written from bltjax's byte ids.

    write_tokenizer_files(out_dir)      # tokenizer.json, tokenizer_config.json, special_tokens_map.json
    write_generation_config(out_dir)    # generation_config.json

`transformers` (5.x) has no tokenizer class of its own for model_type "blt": `AutoTokenizer`
falls back to its `tokenizers`-backed class, which needs ``tokenizer.json``. BLT's tokenizer is
fixed (`bltjax.tokenizer`: byte b is id b + 4, ids 0-3 special), so the file is generated here
rather than copied: a byte-level pre-tokenizer without splitting maps every UTF-8 byte to one
symbol, a BPE model without merges maps each symbol to its id, and a template adds BOS in
front, as `bltjax.tokenizer.encode(text, eos=False)` does for prompts. ``split_special_tokens``
makes text such as "<s>" encode as its bytes, never as the special id.
"""

from __future__ import annotations

import json
import os
import pathlib

from bltjax.runtime.atomic import write_atomic
from bltjax.tokenizer import BOE_ID, BOS_ID, BPE_ID, EOS_ID, OFFSET

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG_FILE = "generation_config.json"
SPECIAL_TOKENS = {BOE_ID: "<boe>", BOS_ID: "<s>", EOS_ID: "</s>", BPE_ID: "<bpe>"}


def byte_symbols() -> dict[int, str]:
    """The byte-level pre-tokenizer's printable symbol of each byte (the GPT-2 table `tokenizers` uses).

    Printable Latin-1 bytes stand for themselves; the 68 others are shifted to code points 256 and up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in symbols)
    for n, b in enumerate(shifted):
        symbols[b] = chr(256 + n)
    return symbols


def tokenizer_json() -> dict:
    """The `tokenizers` serialisation of BLT's byte tokenizer (BOS added, no EOS)."""
    vocab = {token: i for i, token in SPECIAL_TOKENS.items()}
    vocab.update({symbol: b + OFFSET for b, symbol in byte_symbols().items()})
    bos = SPECIAL_TOKENS[BOS_ID]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, token in SPECIAL_TOKENS.items()
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _special_tokens_map() -> dict:
    return {
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[BOE_ID],
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers 5 reads it as its tokenizers backend
        **_special_tokens_map(),
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,  # bytes: no tokenizer-side limit; the model's window decides
    }


def generation_config() -> dict:
    """Greedy decoding that starts, pads and stops with bltjax's ids."""
    return {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": BOE_ID,
        "do_sample": False,
        "use_cache": False,  # as config.json records it
    }


def _write_json(path: pathlib.Path, value: dict) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def write_tokenizer_files(out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Writes the files `AutoTokenizer.from_pretrained` reads for a BLT folder; returns them."""
    out_dir = pathlib.Path(out_dir)
    contents = (tokenizer_json(), tokenizer_config(), _special_tokens_map())
    for name, value in zip(TOKENIZER_FILES, contents, strict=True):
        _write_json(out_dir / name, value)
    return [out_dir / name for name in TOKENIZER_FILES]


def write_generation_config(out_dir: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(out_dir) / GENERATION_CONFIG_FILE
    _write_json(path, generation_config())
    return path

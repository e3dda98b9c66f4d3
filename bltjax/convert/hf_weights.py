"""The safetensors files of a Hugging Face folder: one ``model.safetensors``, or shards with an index.

    with open_weights(model_dir) as weights:       # either layout, read lazily tensor by tensor
        weights.names, weights.shape(name), weights.tensor(name)
    write_weights(out_dir, tensors, dtype="bfloat16", max_shard_bytes=5 * 10**9)

Large checkpoints are split by `save_pretrained` into ``model-00001-of-0000N.safetensors`` files
and a ``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor;
`transformers` reads the single file when both exist, and so does this module. Tensors are
numpy arrays (bfloat16 as ml_dtypes'), read through safetensors' own reader, so no torch is needed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from bltjax.convert.hf_config import CONFIG_FILE, CheckpointError
from bltjax.runtime import paths
from bltjax.runtime.atomic import write_atomic

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_SHARD_BYTES = 5 * 10**9  # the Hub's advice for files served through Git LFS
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def has_weights(model_dir: str | os.PathLike) -> bool:
    """True when the folder holds its weights in either layout (one file, or an index and its shards)."""
    model_dir = paths.resolve(model_dir)
    return (model_dir / WEIGHTS_FILE).is_file() or (model_dir / INDEX_FILE).is_file()


def parse_size(text: str | int) -> int:
    """Bytes of a size such as '5GB', '500MiB' or '1000000' (a number alone counts bytes)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a positive size such as 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


class WeightFiles:
    """Every tensor of a folder by name, whichever file holds it."""

    def __init__(self, files: Mapping[str, Any], where: Mapping[str, pathlib.Path]):
        self._files = files  # name -> open safetensors reader
        self._where = where  # name -> path of its file

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def path_of(self, name: str) -> pathlib.Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[name].get_slice(name).get_shape())

    def tensor(self, name: str) -> np.ndarray:
        return self._files[name].get_tensor(name)


def _open(stack: ExitStack, path: pathlib.Path) -> Any:
    try:
        reader = safe_open(path, framework="np")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    return stack.enter_context(reader)


def _read_index(path: pathlib.Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable index ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: field 'weight_map' is missing or empty (expected {{tensor name: shard file}})")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or pathlib.PurePath(shard).name != shard:
            raise CheckpointError(f"{path}: field 'weight_map.{name}' is {shard!r}; expected a file name in the folder")
    return weight_map


@contextmanager
def open_weights(model_dir: str | os.PathLike) -> Iterator[WeightFiles]:
    """The folder's tensors, from ``model.safetensors`` or else from the shards its index names."""
    model_dir = pathlib.Path(model_dir)
    single, index = model_dir / WEIGHTS_FILE, model_dir / INDEX_FILE
    with ExitStack() as stack:
        if single.is_file():
            reader = _open(stack, single)
            names = list(reader.keys())
            yield WeightFiles(dict.fromkeys(names, reader), dict.fromkeys(names, single))
            return
        if not index.is_file():
            raise FileNotFoundError(
                f"{single}: no such file, nor {INDEX_FILE} (a Hugging Face BLT folder holds {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}, or {INDEX_FILE} and the shards it names)"
            )
        weight_map = _read_index(index)
        readers: dict[str, Any] = {}
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                first = next(name for name, s in sorted(weight_map.items()) if s == shard)
                raise FileNotFoundError(f"{path}: no such file ({index} names it for '{first}' and others)")
            readers[shard] = _open(stack, path)
        stored = {shard: set(reader.keys()) for shard, reader in readers.items()}
        for name, shard in weight_map.items():
            if name not in stored[shard]:
                raise CheckpointError(f"{model_dir / shard}: holds no tensor '{name}', which {index} places there")
        yield WeightFiles(
            {name: readers[shard] for name, shard in weight_map.items()},
            {name: model_dir / shard for name, shard in weight_map.items()},
        )


def _shard_plan(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Names in sorted order, cut into consecutive groups of at most ``max_shard_bytes`` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _save(tensors: Mapping[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    save_file(dict(tensors), path, metadata=metadata)
    os.chmod(path, 0o644)  # safetensors creates owner-only files; an export is meant to be shared


def write_weights(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> list[pathlib.Path]:
    """Writes ``tensors`` in ``dtype``: one ``model.safetensors``, or shards plus an index above ``max_shard_bytes``.

    Shards are cut in sorted name order, so the same tensors always give the same files. Each
    file is written atomically; returns the files written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = pathlib.Path(out_dir)
    cast = {name: np.ascontiguousarray(np.asarray(value).astype(DTYPES[dtype])) for name, value in tensors.items()}
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    groups = _shard_plan(cast, max_shard_bytes or math.inf)
    if len(groups) == 1:
        path = out_dir / WEIGHTS_FILE
        write_atomic(path, lambda tmp: _save(cast, tmp, metadata))
        return [path]
    written, weight_map = [], {}
    for i, names in enumerate(groups):
        path = out_dir / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {name: cast[name] for name in names}
        write_atomic(path, lambda tmp, part=part: _save(part, tmp, metadata))
        weight_map.update(dict.fromkeys(names, path.name))
        written.append(path)
    index = {"metadata": {"total_size": sum(v.nbytes for v in cast.values())}, "weight_map": weight_map}
    write_atomic(out_dir / INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return [*written, out_dir / INDEX_FILE]

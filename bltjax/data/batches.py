"""A dataset's batches on the host and on the devices: random access by step, checkpointable
iteration, and global jax.Arrays from every process's rows.

These serve every row kind (windows, packed rows, mixtures; `bltjax.data.pipeline`), which is why
they live apart from the sources. jax is imported only by `global_batch`, so data workers start
without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np


def batch_at_step(dataset: grain.MapDataset, step: int) -> dict[str, np.ndarray]:
    """This process's batch of `step`: random access, so resuming at step s needs nothing else."""
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return dataset[int(step)]


def make_iterator(dataset: grain.MapDataset, *, start_step: int = 0, num_threads: int = 0) -> Any:
    """A checkpointable grain iterator (`get_state` / `set_state`) positioned at `start_step`.

    num_threads=0 is the fastest on 2 cores (jax-stack-facts §4); use 1-2 threads on hosts whose
    accelerator step is long enough to hide the reading.
    """
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 0))
    iterator = iter(dataset.to_iter_dataset(options))
    if start_step:
        state = iterator.get_state()
        if set(state) != {"next_index"}:
            raise RuntimeError(f"unexpected grain iterator state {state!r}; cannot position it at a step")
        iterator.set_state({"next_index": int(start_step)})
    return iterator


def _process_rows(sharding: Any, global_rows: int) -> tuple[int, int]:
    """The contiguous row range this process's devices hold in a batch of `global_rows`."""
    indices = sharding.addressable_devices_indices_map((global_rows,))
    starts, stops = [], []
    for index in indices.values():
        row_slice = index[0] if index else slice(None)
        start, stop, _ = row_slice.indices(global_rows)
        starts.append(start)
        stops.append(stop)
    return min(starts), max(stops)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """Global jax.Arrays from every process's rows (`jax.make_array_from_process_local_data`).

    `sharding` (one for all fields, or a dict per field) must shard the leading batch axis so
    that process p's devices hold rows [p*b, (p+1)*b) -- the rows `make_dataset` gave it. That
    is checked, because a mesh with another device order would silently permute rows.
    """
    import jax

    index, count = jax.process_index(), jax.process_count()
    out = {}
    for name, value in local_batch.items():
        field_sharding = sharding[name] if isinstance(sharding, Mapping) else sharding
        rows = value.shape[0]
        global_shape = (rows * count, *value.shape[1:])
        if count > 1:
            first, stop = _process_rows(field_sharding, global_shape[0])
            if (first, stop) != (index * rows, (index + 1) * rows):
                raise ValueError(
                    f"global_batch: field {name!r}: this process (index {index}) holds rows [{first}, {stop}) of the "
                    f"mesh but loaded rows [{index * rows}, {(index + 1) * rows}); order the mesh devices by process "
                    "along the batch axis (jax.make_mesh does)"
                )
        out[name] = jax.make_array_from_process_local_data(field_sharding, value, global_shape)
    return out

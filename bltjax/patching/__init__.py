"""Patching: where patches start (docs/architecture.md §3), one rule record for every user.

    from bltjax import patching
    rule = patching.PatchingRule(mode="entropy", threshold=1.335)   # or PatchingRule.from_config(config)
    lengths = patching.patch_lengths(tokens, rule, entropies=h)     # numpy, whole rows

Modules, lowest first: `rule` (the `PatchingRule` record and its validation), `lengths`
(lengths <-> start masks <-> patch ids), `offline` (numpy patcher for the data pipeline),
`traced` (its jax twin for use under jit), `incremental` (`IncrementalRule`: one decision at a
time for decoding; imports jax, so it is not imported here) and `calibrate` (entropies in,
threshold out). Nothing here imports `bltjax.data`, `models`, `training` or `inference`.
"""

from bltjax.patching.lengths import (
    decoder_patch_ids_from_lengths,
    lengths_from_start_mask,
    patch_ids_from_lengths,
    split_long_patches,
    start_mask_from_lengths,
)
from bltjax.patching.offline import patch_lengths, patch_start_mask
from bltjax.patching.rule import KINDS, MODES, SPACE_LIKE, PatchingError, PatchingRule
from bltjax.patching.traced import patch_lengths_jnp, patch_start_mask_jnp

__all__ = [
    "KINDS",
    "MODES",
    "SPACE_LIKE",
    "PatchingError",
    "PatchingRule",
    "decoder_patch_ids_from_lengths",
    "lengths_from_start_mask",
    "patch_ids_from_lengths",
    "patch_lengths",
    "patch_lengths_jnp",
    "patch_start_mask",
    "patch_start_mask_jnp",
    "split_long_patches",
    "start_mask_from_lengths",
]

"""Fast generation from BLT and byte-level models: KV caches and incremental patching (docs/architecture.md §16).

    from bltjax.inference.generation import generate
    results = generate(model, params, config, ["Once upon a time"], entropy_model=(lm, lm_params))
    print(results[0].text, results[0].patch_lengths)

* `generate`: cached generation; the global model runs once per closed patch (`decode`).
* `generate_full_recompute`: the official code's method (re-run everything per byte), the reference.
* `CachedBLT` / `CachedByteLM`: pure prefill / step functions for callers that drive decoding
  themselves (`blt`, `byte_lm`). They run the models' own Linen modules (`bltjax.models`) over
  their own parameter trees, through the modules' KV-cache methods (`prefill`, `step`) and the
  cache layout of `bltjax.kernels.kv_cache`.
* `IncrementalRule`: the training patching rule, one boundary decision at a time (`rule`).
"""

from bltjax.inference.generation.blt import BLTState, CachedBLT
from bltjax.inference.generation.byte_lm import ByteLMState, CachedByteLM
from bltjax.inference.generation.decode import (
    FullForward,
    GenerationResult,
    TeacherForced,
    cached_decoder,
    full_forward,
    generate,
    generate_full_recompute,
    patch_rule_of,
    split_utf8,
    teacher_forced,
)
from bltjax.inference.generation.sampling import choose_next, nucleus_logits
from bltjax.patching.incremental import IncrementalRule

__all__ = [
    "BLTState",
    "ByteLMState",
    "FullForward",
    "CachedBLT",
    "CachedByteLM",
    "GenerationResult",
    "IncrementalRule",
    "cached_decoder",
    "full_forward",
    "choose_next",
    "generate",
    "generate_full_recompute",
    "nucleus_logits",
    "patch_rule_of",
    "split_utf8",
    "teacher_forced",
    "TeacherForced",
]

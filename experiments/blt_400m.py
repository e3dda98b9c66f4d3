r"""BLT-400M of the paper (docs/architecture.md §15.2), entropy patching, 16 KiB contexts, bf16 compute.

  python -m bltjax.describe --config experiments/blt_400m.py
  python -m bltjax.compile --config experiments/blt_400m.py:v5p-64 --topology v5p-64

Without an argument: the model at the paper's batch with the single-host defaults (data
parallelism, no remat). With a pod variant (the TPU slice it is sized for, listed in
`bltjax.config.POD_VARIANTS`): FSDP over the slice, block remat, scanned layers and at most 4
micro-batches for the paper's 1024 x 16 KiB step; the slice is recorded in `config.topology`.

Layer counts and widths come from `bltjax.config.PAPER_SIZES`; only the 1B row is confirmed
by a released checkpoint (blt-1b).
"""

from bltjax.config import paper_blt_config


def get_config(arg: str | None = None):
    return paper_blt_config("400m", variant=arg)

r"""BLT-4B of the paper (docs/architecture.md §15.2), entropy patching, 16 KiB contexts, bf16 compute.

  python -m bltjax.describe --config experiments/blt_4b.py
  python -m bltjax.compile --config experiments/blt_4b.py:v5p-256 --topology v5p-256

As shipped (`bltjax.config.pod_settings`): the paper's 1024 x 16 KiB step with FSDP over every
device, block remat, scanned layers and 4 micro-batches, and the paper's 2000 warm-up steps of
a 100k-step run. A pod variant (the TPU slice it is sized for, listed in
`bltjax.config.POD_VARIANTS`) adds only the slice, recorded in `config.topology`.

Layer counts and widths come from `bltjax.config.PAPER_SIZES`; only the 1B row is confirmed
by a released checkpoint (blt-1b).
"""

from bltjax.config import paper_blt_config


def get_config(arg: str | None = None):
    return paper_blt_config("4b", variant=arg)

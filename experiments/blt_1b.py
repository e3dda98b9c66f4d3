r"""BLT-1B of the paper (docs/architecture.md §15.2), entropy patching, 16 KiB contexts, bf16 compute.

  python -m bltjax.describe --config experiments/blt_1b.py

Layer counts and widths come from `bltjax.config.PAPER_SIZES`; only the 1B row is confirmed
by a released checkpoint (blt-1b).
"""

from bltjax.config import paper_blt_config


def get_config(arg: str | None = None):
    del arg
    return paper_blt_config("1b")

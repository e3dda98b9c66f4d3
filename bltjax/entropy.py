"""Entry point of the entropy sidecars: ``python -m bltjax.entropy --data DIR --checkpoint MODEL_DIR``.

The work lives in `bltjax.data.entropy` (see its docstring for the format and the design).
"""

import sys

from bltjax.data.entropy import main

if __name__ == "__main__":
    sys.exit(main())

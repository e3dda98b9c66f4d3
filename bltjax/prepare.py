"""``python -m bltjax.prepare``: raw text -> byte shards; the code lives in :mod:`bltjax.data.prepare`.

python -m bltjax.prepare --input bltjax/data/corpus --output /tmp/bltjax-data
"""

from bltjax.data.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())

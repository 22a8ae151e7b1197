"""``python -m labelsmart``: the product's commands (:mod:`labelsmart.cli`) and the benchmarks' (``bench``).

This entry point is where the two meet; nothing in the product imports :mod:`labelsmart.bench`.
"""

from labelsmart.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

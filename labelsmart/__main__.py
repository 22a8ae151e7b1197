"""``python -m labelsmart``: see :mod:`labelsmart.cli`."""

from labelsmart.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

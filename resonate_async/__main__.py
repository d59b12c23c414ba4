"""``python -m resonate_async``: the ``resonate-async`` command line."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())

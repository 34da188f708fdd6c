"""``python -m emailmw.devserver``: see :mod:`emailmw.devserver.cli`."""

from emailmw.devserver.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m aiomemo``: the ``aiomemo`` command (see :mod:`aiomemo._cli`)."""

from __future__ import annotations

import sys

from aiomemo._cli import main

if __name__ == "__main__":
    sys.exit(main())

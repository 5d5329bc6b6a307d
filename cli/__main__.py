"""``python -m cli``: the same as the ``freshrec`` command (``python -m cli up`` starts the stack)."""

import sys

from cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m attncc``: the ``attncc`` command."""
import sys

from attncc.cli import main

if __name__ == "__main__":
    sys.exit(main())

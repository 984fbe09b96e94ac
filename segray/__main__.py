"""``python -m segray <stage> [flags]``: segray/cli.py."""

import sys

from segray.cli import main

if __name__ == "__main__":
    sys.exit(main())

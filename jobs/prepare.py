"""``python jobs/prepare.py ...``: the prepare command of segray/commands/prepare.py (its usage and flags are there)."""

# The command lives in segray/commands/prepare.py (also `segray prepare` and `python -m segray prepare`);
# this file stays so that `ray job submit --working-dir . -- python jobs/prepare.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python jobs/demo.py ...``: the demo command of segray/commands/demo.py (its usage and flags are there)."""

# The command lives in segray/commands/demo.py (also `segray demo` and `python -m segray demo`);
# this file stays so that `ray job submit --working-dir . -- python jobs/demo.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

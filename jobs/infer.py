"""``python jobs/infer.py ...``: the infer command of segray/commands/infer.py (its usage and flags are there)."""

# The command lives in segray/commands/infer.py (also `segray infer` and `python -m segray infer`);
# this file stays so that `ray job submit --working-dir . -- python jobs/infer.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

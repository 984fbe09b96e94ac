"""The whole pipeline on embedded defaults: local Ray, local files, minutes on 2 CPU cores.

    python jobs/demo.py                         # synthetic CamVid-format street scenes
    python jobs/demo.py --camvid ../shared/camvid --size 176x240 --epochs 20 --base-channels 16

Each data source gets its own run, named ``demo-synthetic-<hash>`` or ``demo-camvid-<hash>``: the
hash covers what the run is made from (the CamVid path, or the generated scenes' counts and
seed; the size, --base-channels, --batch-size and --seed), so a demo never resumes another's run.
Everything of a run lives under ``<workdir>/{sources,prepared,runs,predictions,report}/<name>``.
Rerunning the same command resumes (and with a higher --epochs extends) its run and reuses its
prepared dataset (delete ``<workdir>/prepared/<name>`` to prepare it again).
"""

# The command lives in segray/commands/demo.py (also `segray demo` and `python -m segray demo`);
# this file stays so that `ray job submit --working-dir . -- python jobs/demo.py ...` runs it
# from a checkout without installing segray.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.commands.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

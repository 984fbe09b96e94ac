"""``segray <stage> [flags]`` and ``python -m segray <stage> [flags]``: one command for every job.

The stages are segray/commands/<stage>.py, the same modules ``python jobs/<stage>.py`` runs.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": "read labelled frames, resize them, write a sharded dataset",
    "train": "train a network on a prepared dataset with Ray Train",
    "infer": "segment images, archives and videos into Parquet",
    "evaluate": "write the HTML report of an infer output",
    "demo": "the whole pipeline on generated scenes, locally",
}


def usage() -> str:
    import segray

    width = max(map(len, STAGES))
    lines = [f"usage: segray <stage> [flags]   (segray {segray.__version__})", "", "stages:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in STAGES.items()]
    lines += ["", "segray <stage> --help shows a stage's flags; --version the versions it runs with."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        import segray

        print(f"segray {segray.__version__}")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"segray: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"segray.commands.{stage}")
    sys.argv[0] = f"segray {stage}"
    return command.main(rest)


if __name__ == "__main__":
    sys.exit(main())

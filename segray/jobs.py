"""What every job entrypoint shares: flag defaults from the stage's config, one connection to Ray
(runtime.init_ray, after the checks that need no cluster), a quiet console (console.job_output;
``--verbose`` shows everything), and failing with one clear line (and its traceback with --verbose)."""

from __future__ import annotations

import dataclasses
import sys
import traceback
from typing import Any, Callable

from segray.console import job_output
from segray.errors import one_line
from segray.runtime import init_ray


def add_version(parser) -> None:
    """``--version`` and ``--verbose`` on a job's parser: segray's version, and the Ray and torch
    it runs with; every line Ray prints, and the traceback of a failure."""
    from segray import software_versions

    v = software_versions("ray", "torch", "av")
    parser.add_argument("--version", action="version",
                        version=f"segray {v['segray']} (" + ", ".join(f"{k} {x}" for k, x in v.items() if k != "segray") + ")")
    parser.add_argument("--verbose", action="store_true",
                        help="show every line Ray prints (its INFO and WARNING lines are hidden by default), "
                        "and the traceback of a failure after its one-line message")


def defaults(config_class: type) -> dict[str, Any]:
    """Every field default of a stage's config dataclass: the one source of its flags' defaults."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def run_job(stage: str, body: Callable[[], object], connect: bool = True, gpu: bool = False,
            preflight: Callable[[], object] | None = None, verbose: bool = False) -> int:
    """Run ``preflight`` (checks that need no cluster), connect to Ray (unless ``connect`` is
    False: a stage that connects itself, after its own checks, through the same init_ray), then
    ``body``; exit code 0 on success, 1 with ``<stage>: error: ...`` on failure. ``gpu``: the
    job's model runs on GPU workers (runtime.worker_env). ``verbose``: nothing filtered from the
    console, and a failure's traceback after its line."""
    with job_output(show_all=verbose):
        try:
            if preflight is not None:
                preflight()
            if connect:
                init_ray(gpu=gpu)
            body()
        except KeyboardInterrupt:
            print(f"{stage}: interrupted", file=sys.stderr, flush=True)
            return 130
        except Exception as e:  # noqa: BLE001 - a job ends with one line, whatever went wrong
            print(f"{stage}: error: {one_line(e)}", file=sys.stderr, flush=True)
            if verbose:
                traceback.print_exc()
            return 1
        return 0

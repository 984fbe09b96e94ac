"""What every job entrypoint shares: connect to Ray, run, and fail with one clear line."""

from __future__ import annotations

import sys
from typing import Callable

from segray.errors import one_line
from segray.runtime import init_ray


def run_job(stage: str, body: Callable[[], object], connect: bool = True) -> int:
    """Run ``body`` on the cluster; exit code 0 on success, 1 with ``<stage>: error: ...`` on failure."""
    try:
        if connect:
            init_ray()
        body()
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - a job ends with one line, whatever went wrong
        print(f"{stage}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0

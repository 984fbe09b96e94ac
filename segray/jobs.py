"""What every job entrypoint shares: connect to Ray, run, and fail with one clear line."""

from __future__ import annotations

import sys
from typing import Callable

from segray.errors import one_line
from segray.runtime import init_ray


def run_job(stage: str, body: Callable[[], object], connect: bool = True, gpu: bool = False) -> int:
    """Run ``body`` on the cluster; exit code 0 on success, 1 with ``<stage>: error: ...`` on failure.
    ``gpu``: the job's model runs on GPU workers (runtime.worker_env)."""
    try:
        if connect:
            init_ray(gpu=gpu)
        body()
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - a job ends with one line, whatever went wrong
        print(f"{stage}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0

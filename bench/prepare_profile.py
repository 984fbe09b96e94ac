"""Where jobs/prepare.py spends its time: segray.prepare.prepare() with each phase timed.

    RAY_ADDRESS=... python bench/prepare_profile.py --source /work/shared/camvid --dest /tmp/p --size 176x240

The job's own code runs unchanged; this driver only wraps the calls it makes (layout detection,
each Ray Data execution: materialize, to_pandas, write_parquet per split, dataset.json) with
timers, and turns on Ray Data's per-operator stats (printed after each execution).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES: list[tuple[str, float]] = []


def timed_call(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES.append((name, time.perf_counter() - t0))

    return wrapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--size", default="176x240")
    args = p.parse_args(argv)

    import ray
    import ray.data

    from segray import prepare as prep
    from segray.preprocess import parse_size
    from segray.runtime import init_ray

    t_start = time.perf_counter()
    init_ray(quiet=True)
    PHASES.append(("connect to Ray (init_ray)", time.perf_counter() - t_start))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_auto_log_stats = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    prep.detect = timed_call("list the source (layout.detect)", prep.detect)
    prep.write_info = timed_call("write dataset.json", prep.write_info)
    ray.data.Dataset.materialize = timed_call("Ray Data: decode + resize + check (materialize)",
                                              ray.data.Dataset.materialize)
    ray.data.Dataset.to_pandas = timed_call("Ray Data: summary columns (to_pandas)", ray.data.Dataset.to_pandas)
    ray.data.Dataset.write_parquet = timed_call("Ray Data: one split -> Parquet (write_parquet)",
                                                ray.data.Dataset.write_parquet)
    t0 = time.perf_counter()
    info = prep.prepare(prep.PrepareConfig(source=args.source, dest=args.dest, size=parse_size(args.size)))
    total = time.perf_counter() - t0
    pairs = sum(info.splits.values())
    print(f"\nprepare_profile: {pairs} pairs in {total:.1f} s ({pairs / total:.1f} images/s); phases:")
    accounted = 0.0
    for name, seconds in PHASES:
        print(f"  {seconds:7.2f} s  {name}")
        accounted += seconds if not name.startswith("connect") else 0.0
    print(f"  {total - accounted:7.2f} s  the rest (driver: listing summary, deletes, bookkeeping)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

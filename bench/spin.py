"""A stand-in for Ray's service processes: busy-spin FRACTION of one core, FRACTION x 20 ms in every 20 ms,
until killed. Runs at nice 0 on whatever core the scheduler picks.

    python bench/spin.py 0.10 &                                # ~ what Ray's services use in train_bench
    nice -n 15 python bench/train_plain.py ... --world 2       # DDP at the niceness of Ray's workers
    kill %1
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fraction, period = float(args[0]) if args else 0.10, 0.02
    if not 0 < fraction < 1:
        print(f"spin.py: FRACTION must be between 0 and 1, not {fraction}", file=sys.stderr)
        return 2
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < fraction * period:
            pass
        time.sleep(period * (1 - fraction))


if __name__ == "__main__":
    sys.exit(main())

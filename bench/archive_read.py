"""Streaming the members of one tar archive (sources.iter_archive), against an earlier revision.

    python bench/archive_read.py --baseline-rev 759fcd0 [--members 3000] [--rounds 3]

Reads a local tar of --members 90x120 PNGs (no decoding: members only) with this checkout's
segray and with the segray of --baseline-rev (extracted with git archive), alternating the two
--rounds times in fresh processes, and prints members/s and the ratio of the medians. Decoding
and resizing a frame cost ~100x more than reading it (docs/benchmarks.md), so this isolates
the reader's own overhead.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ = """
import sys, time
sys.path.insert(0, sys.argv[1])
from segray import sources
t = time.perf_counter()
n = sum(1 for m in sources.iter_archive(sys.argv[2]) if m.data)
print(n / (time.perf_counter() - t))
"""


def make_tar(path: str, members: int) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as t:
        for i in range(members):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(buf, "PNG")
            info = tarfile.TarInfo(f"seq/{i:05d}.png")
            info.size = buf.tell()
            buf.seek(0)
            t.addfile(info, buf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", required=True, help="git revision whose segray is the baseline")
    p.add_argument("--members", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "frames.tar")
        make_tar(archive, args.members)
        baseline = os.path.join(tmp, "baseline")
        os.makedirs(baseline)
        subprocess.run(f"git -C {REPO} archive {args.baseline_rev} segray | tar -x -C {baseline}", shell=True,
                       check=True)
        rates: dict[str, list[float]] = {"baseline": [], "this": []}
        for _ in range(args.rounds):
            for tag, root in (("baseline", baseline), ("this", REPO)):
                out = subprocess.run([sys.executable, "-c", READ, root, archive], capture_output=True, text=True,
                                     check=True).stdout
                rates[tag].append(float(out))
        size = os.path.getsize(archive) / 1e6
    b, t = statistics.median(rates["baseline"]), statistics.median(rates["this"])
    print(f"archive of {args.members} members, {size:.1f} MB; members/s baseline {[round(r) for r in rates['baseline']]}, "
          f"this {[round(r) for r in rates['this']]}")
    print(f"median members/s: baseline {b:.0f}, this {t:.0f}; this/baseline {t / b:.2f}; "
          f"per member {1e6 / b:.0f} -> {1e6 / t:.0f} us")


if __name__ == "__main__":
    main()

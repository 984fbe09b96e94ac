"""The infer stage's per-frame CPU work (decode + resize, label decode, mask back to size and
confusion counts) of this checkout against an earlier revision, without Ray.

    python bench/perframe_compare.py --baseline-rev 9b4a813 [--frames /work/shared/camvid/val]
        [--labels /work/shared/camvid/valannot] [--rounds 3]

Each tree runs in its own process (``git archive REV`` for the baseline), alternating, on the same
frames; prints ms per frame. The model's forward pass is not included (its code is the same in
both trees of #15; bench/revision_compare.py has the jobs end to end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = """
import sys, time, glob
sys.path.insert(0, sys.argv[1])
import numpy as np
try:
    from segray import frames as F, predictor as P
    from segray.classes import CAMVID
    load_frame, finish = F.load_frame, P.finish_frame
    load_label = lambda u: P.load_label(u, "index", (), CAMVID)
except ImportError:  # before #15: one infer module
    from segray import infer as I
    load_frame, finish = I.load_frame, I.finish_frame
    load_label = lambda u: I.load_label(u, "index", ())
imgs, labs = sorted(glob.glob(sys.argv[2] + "/*.png")), sorted(glob.glob(sys.argv[3] + "/*.png"))
pred = np.random.default_rng(0).integers(0, 11, (176, 240)).astype(np.uint8)
data = [(open(a, "rb").read(), a, b) for a, b in zip(imgs, labs)]
def once():
    for d, a, b in data:
        _, h, w = load_frame(d, a, (176, 240))
        finish(pred, (h, w), 11, 11, load_label(b))
once()
t = time.perf_counter(); once(); once()
print((time.perf_counter() - t) / (2 * len(data)) * 1000)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--frames", default="/work/shared/camvid/val")
    parser.add_argument("--labels", default="/work/shared/camvid/valannot")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "baseline")
        os.makedirs(base)
        archive = subprocess.run(["git", "-C", REPO, "archive", args.baseline_rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        for k in range(args.rounds):
            order = [("baseline", base), ("current", REPO)]
            for tag, tree in order if k % 2 == 0 else order[::-1]:
                out = subprocess.run([sys.executable, "-c", WORK, tree, args.frames, args.labels], cwd=tmp,
                                     capture_output=True, text=True, check=True)
                times[tag].append(float(out.stdout.split()[-1]))
                print(f"round {k + 1} {tag:8s} {times[tag][-1]:.2f} ms/frame", flush=True)
    ratios = [c / b for b, c in zip(times["baseline"], times["current"])]
    print(f"median ms/frame: baseline {statistics.median(times['baseline']):.2f}, current "
          f"{statistics.median(times['current']):.2f}; current/baseline per round "
          f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f}; > 1 is slower)")


if __name__ == "__main__":
    main()

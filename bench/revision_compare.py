"""Training and inference speed of this checkout against an earlier revision (the #15 refactor).

    python bench/revision_compare.py --baseline-rev 9b4a813 [--data PREPARED] [--source /work/shared/camvid]
        [--size 176x240] [--epochs 2] [--rounds 2] [--workdir /tmp/revcmp]

The "Training" and "Inference" rows of docs/benchmarks.md, rerun for two trees in the same run:
--baseline-rev (``git archive REV | tar -x``) and the working tree of this checkout. One local
Ray cluster of this process (ray.init(num_cpus=2)); each tree's jobs/*.py run as subprocesses
with cwd = the tree and PYTHONPATH unset, so that the driver and its Ray workers import that
tree's segray (a probe checks both, once per tree):

- train: ``jobs/train.py --epochs E --num-workers 2 --batch-size 8 --base-channels 16 --seed 0``
  on one prepared dataset (--data, else --source prepared once at --size by this checkout's
  jobs/prepare.py into <workdir>/prepared); steady images/s = the mean images_per_s of epochs
  2..E in metrics.json (epoch 1, with the start-up, is kept too), and the command's wall time.
- infer: ``jobs/infer.py`` with the model the same tree just trained (the model format changed)
  over <source>/val with <source>/valannot labels; frames/s from the job's summary line, and the
  command's wall time.

Rounds alternate the order (baseline first in odd rounds); each round's outputs are deleted
before the next. Printed: every round's figures, the per-round ratios current/baseline and their
median (images/s and frames/s: > 1 is faster; wall seconds: > 1 is slower). The same as JSON in
<workdir>/revision_compare.json and a BENCH_JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

REPO = benchlib.REPO
# segray/infer.py format_summary (the same in 9b4a813 and after #15): "infer: done in S s: N inputs
# this run (F frames/s), K already done"; F = N / S unrounded.
SUMMARY = re.compile(r"infer: done in ([\d.]+) s: (\d+) inputs this run \(([\d.]+) frames/s\)")
FIGURES = ("train_ips", "epoch1_ips", "train_wall_s", "infer_fps", "infer_wall_s")
# Which segray a job of TREE imports: its driver (jobs/*.py put the tree first on sys.path) and a
# Ray worker (Ray gives workers the driver's script folder and cwd, which is the tree).
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import ray, segray

@ray.remote(num_cpus=0)
def where():
    import segray
    return segray.__file__

ray.init(log_to_driver=False, logging_level="ERROR")
print("SEGRAY driver", segray.__file__)
print("SEGRAY worker", ray.get(where.remote()))
"""


def git(*args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def extract(rev: str, dest: Path) -> None:
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", rev], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")


def run(tree: Path, cmd: list[str], address: str, what: str) -> benchlib.CmdResult:
    env = benchlib.job_env(address)
    env.pop("PYTHONPATH", None)
    return benchlib.check(benchlib.run_cmd([sys.executable, *cmd], env=env, cwd=tree, timeout=3600), what)


def check_imports(tree: Path, address: str) -> None:
    out = run(tree, ["-c", PROBE, str(tree)], address, f"import probe in {tree}").out
    want = (tree / "segray" / "__init__.py").resolve()
    found = dict(line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith("SEGRAY "))
    for who in ("driver", "worker"):
        if who not in found or Path(found[who]).resolve() != want:
            raise SystemExit(f"{tree}: the {who} imports segray from {found.get(who)}, not {want}")
    print(f"  {tree}: driver and Ray worker import {want}", flush=True)


def measure(tag: str, tree: Path, k: int, data: str, args: argparse.Namespace, address: str) -> dict:
    workdir = Path(args.workdir)
    runs, pred = workdir / f"runs-{tag}-r{k}", workdir / f"pred-{tag}-r{k}"
    for folder in (runs, pred):  # a leftover run would resume, a leftover output be skipped
        shutil.rmtree(folder, ignore_errors=True)
    t = run(tree, [str(tree / "jobs/train.py"), "--data", data, "--storage", str(runs), "--name", "t", "--epochs",
                   str(args.epochs), "--num-workers", "2", "--batch-size", "8", "--base-channels", "16", "--seed", "0"],
            address, f"{tag}: jobs/train.py")
    history = json.loads((runs / "t" / "metrics.json").read_text())["history"]
    if history[-1]["epoch"] < 2:
        raise SystemExit(f"{tag}: metrics.json has no epoch 2 ({len(history)} epochs)")
    source = args.source.rstrip("/")
    i = run(tree, [str(tree / "jobs/infer.py"), "--model", str(runs / "t"), "--images", f"{source}/val",
                   "--labels", f"{source}/valannot", "--output", str(pred)], address, f"{tag}: jobs/infer.py")
    summary = [m for line in i.out.splitlines() if (m := SUMMARY.search(line))]
    if not summary:
        raise SystemExit(f"{tag}: no summary line in the output of jobs/infer.py:\n{i.out[-2000:]}")
    steady = [h["images_per_s"] for h in history[1:]]
    row = {"round": k, "rev": tag, "train_ips": sum(steady) / len(steady), "epoch1_ips": history[0]["images_per_s"],
           "train_wall_s": t.wall_s, "infer_fps": float(summary[-1].group(3)), "infer_frames": int(summary[-1].group(2)),
           "infer_wall_s": i.wall_s}
    print(f"  [round {k}] {tag:8s} train {row['train_ips']:.3g} images/s (epoch 1 {row['epoch1_ips']:.3g}), "
          f"wall {t.wall_s:.0f} s; infer {row['infer_fps']:.3g} frames/s ({row['infer_frames']} frames), "
          f"wall {i.wall_s:.0f} s", flush=True)
    for folder in (runs, pred):
        shutil.rmtree(folder, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", required=True, help="git revision to compare this working tree with")
    p.add_argument("--data", default=None, help="prepared dataset (default: --source prepared at --size in --workdir)")
    p.add_argument("--source", default="/work/shared/camvid", help="CamVid (SegNet layout): prepare, and val/ to infer")
    p.add_argument("--size", default="176x240", help="HxW of the prepared dataset (default %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs, at least 2 (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each: both revisions (default %(default)s)")
    p.add_argument("--workdir", default="/tmp/revcmp")
    args = p.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        p.error("--epochs must be at least 2 (the last epoch is the steady one) and --rounds at least 1")
    workdir = Path(args.workdir).resolve()
    args.workdir = str(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    baseline_sha = git("rev-parse", "--verify", f"{args.baseline_rev}^{{commit}}")
    changed = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
    current = f"{git('rev-parse', 'HEAD')[:12]} + working tree ({changed} tracked files modified)"
    print(f"machine: {benchlib.machine().describe()}; load average {os.getloadavg()}")
    print(f"baseline: {args.baseline_rev} = {baseline_sha[:12]}; current: {current}", flush=True)
    os.environ.pop("PYTHONPATH", None)  # the raylet, hence every Ray worker, inherits this environment
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="revcmp-") as tmp, benchlib.local_ray(2) as address:
        base = Path(tmp) / "baseline"
        extract(baseline_sha, base)
        trees = {"baseline": base, "current": REPO}
        for tree in trees.values():
            check_imports(tree, address)
        data = args.data
        if data is None:
            data = str(workdir / "prepared")
            if not (workdir / "prepared" / "dataset.json").exists():
                print(f"  preparing {args.source} at {args.size} -> {data}", flush=True)
                run(REPO, [str(REPO / "jobs/prepare.py"), "--source", args.source, "--dest", data, "--size",
                           args.size], address, "current: jobs/prepare.py")
            else:
                print(f"  reusing {data}", flush=True)
        for k in range(1, args.rounds + 1):
            order = ("baseline", "current") if k % 2 else ("current", "baseline")
            rows.extend(measure(tag, trees[tag], k, data, args, address) for tag in order)
    ratios = []
    for k in range(1, args.rounds + 1):
        b, c = (next(r for r in rows if r["round"] == k and r["rev"] == tag) for tag in ("baseline", "current"))
        ratios.append({"round": k, "rev": "current/baseline", **{f: c[f] / b[f] if b[f] else float("nan")
                                                                 for f in FIGURES}})
    median = {"round": "median", "rev": "current/baseline",
              **{f: benchlib.median(r[f] for r in ratios) for f in FIGURES}}
    columns = ("round", "rev", *FIGURES)
    benchlib.print_table(rows, columns, title=f"Per round (train_ips: mean images/s of epochs 2..E; epoch1_ips: epoch 1's; "
                         f"infer_fps: the infer job's frames/s); baseline {args.baseline_rev}, current {current}")
    benchlib.print_table([*ratios, median], columns,
                         title="Ratios current/baseline (images/s, frames/s: > 1 faster; wall s: > 1 slower)")
    doc = {"baseline_rev": args.baseline_rev, "baseline_commit": baseline_sha, "current": current,
           "data": data, "machine": benchlib.machine().describe(), "load_avg": os.getloadavg(), "args": vars(args),
           "rows": rows, "ratios": ratios, "median_ratios": median}
    out = workdir / "revision_compare.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nJSON: {out}")
    benchlib.emit_json("revision_compare", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

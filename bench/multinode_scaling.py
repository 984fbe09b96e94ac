"""Training samples/s and inference frames/s on 1 and 2 simulated nodes (docs/scaling.md).

    python bench/multinode_scaling.py [--workdir /tmp/mnscale] [--cpus 2] [--rounds 1]

Each node is a real raylet of cluster/local_multinode.py (driven through tests/multinode.py) with
--cpus CPUs, the head holding none; N nodes get N training workers and N inference replicas. A
training worker reserves every CPU of its node (so each goes to a node of its own) and runs one
torch thread; a replica reserves one CPU and one thread. The data is generated street scenes
(160 train, 16 val, 96x128) in local folders, which every node reads (they are one machine).
Figures per node count: the steady training images/s (mean of epochs 2..E in metrics.json), and
infer's frames/s over the 160 training frames (its summary line). Ratios are 2 nodes against 1
node in the same run. On this machine both nodes share its 2 cores: the ratio says how segray
spreads over nodes, not what a second real machine adds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from multinode import start_cluster  # noqa: E402

MARKER = ".multinode-scaling"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/mnscale")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each node (default 2)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    from segray.synthetic import write_dataset

    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 holds the start-up; the steady rate is of the rest)")
    work = Path(args.workdir)
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        parser.error(f"--workdir {work} holds files that this benchmark did not write; choose another folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text("written by bench/multinode_scaling.py; deleted and rewritten by its next run\n")
    write_dataset(str(work / "source"), layout="segnet", counts={"train": 160, "val": 16}, size=(96, 128), seed=0)
    results: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for nodes in ((1, 2) if r % 2 == 0 else (2, 1)):
            with start_cluster(nodes=nodes, cpus=args.cpus) as cluster:
                prepared = work / f"prepared-{r}-{nodes}"
                cluster.run_job("prepare", "--source", str(work / "source"), "--dest", str(prepared), check=True)
                t0 = time.perf_counter()
                cluster.run_job("train", "--data", str(prepared), "--storage", str(work / "runs"), "--name",
                                f"n{nodes}-{r}", "--epochs", str(args.epochs), "--num-workers", str(nodes),
                                "--batch-size", "4", "--base-channels", "16", "--seed", "0",
                                "--cpus-per-worker", str(args.cpus), "--threads", "1", check=True)
                train_s = time.perf_counter() - t0
                history = json.loads((work / "runs" / f"n{nodes}-{r}" / "metrics.json").read_text())["history"]
                steady = [h["images_per_s"] for h in history[1:]]
                t0 = time.perf_counter()
                proc = cluster.run_job("infer", "--model", str(work / "runs" / f"n{nodes}-{r}"), "--images",
                                       str(work / "source" / "train"), "--output", str(work / f"pred-{r}-{nodes}"),
                                       "--num-replicas", str(nodes), "--cpus-per-replica", "1", "--threads", "1",
                                       check=True)
                infer_s = time.perf_counter() - t0
                fps = float(re.search(r"\(([\d.]+) frames/s\)", proc.stdout).group(1))
                nodes_seen = {n for h in history for n in h["nodes"]}
                row = {"nodes": nodes, "round": r, "train_images_per_s": sum(steady) / len(steady),
                       "train_wall_s": round(train_s, 1), "infer_frames_per_s": fps, "infer_wall_s": round(infer_s, 1),
                       "training_nodes": len(nodes_seen)}
                results[nodes].append(row)
                print(json.dumps(row), flush=True)

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    ratios = {
        key: median([b[key] / a[key] for a, b in zip(results[1], results[2])])
        for key in ("train_images_per_s", "infer_frames_per_s", "train_wall_s", "infer_wall_s")
    }
    print("2 nodes / 1 node (median over rounds): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("BENCH_JSON " + json.dumps({"rows": results, "ratios": ratios, "cpus_per_node": args.cpus,
                                      "cores": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training: samples/s of the Ray Train job (DDP, 2 CPU workers) vs the plain PyTorch loop.

    python bench/train_bench.py                     # CamVid at 176x240, base 16, ~25 minutes
    python bench/train_bench.py --quick             # 1 repetition, ~10 minutes
    python bench/train_bench.py --paper             # also the 64-channel U-Net at 352x480 (short)

Same prepared data (jobs/prepare.py of /work/shared/camvid at 176x240, made here if --data is
not given), same model, loss, optimizer and augmentation on both sides:

- ray: ``python jobs/train.py --num-workers 2 --batch-size B`` against this process's own local
  cluster (ray.init(num_cpus=2)); samples/s = the train images of an epoch / its training
  time, from the run's metrics.json (epoch 1 includes the first batches' start-up; epoch 2+
  is the steady state). DDP's global batch is 2 x B.
- plain: ``python bench/train_plain.py --threads 2`` at batch B (the per-worker batch) and 2 x B
  (the same global batch), and ``--threads 1`` pinned to one core (what one DDP worker does:
  2 x its samples/s is DDP without any communication or Ray overhead).
- start-up: seconds from the command's start to its first training step (the epoch's start,
  = the time the epoch-1 line is printed minus that epoch's duration), and the command's
  total wall time.

Variants run back to back in each repetition (ray, plain ...), ratios are per repetition and
the table shows their median: the machine is shared, and only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

CAMVID = "/work/shared/camvid"
PLAIN_EPOCH = re.compile(r"plain: epoch (\d+)/\d+ .* train ([\d.]+) s \(([\d.]+) images/s.*epoch ([\d.]+) s")
PLAIN_READ = re.compile(r"plain: read (\d+) train")
RAY_EPOCH = re.compile(r"train: epoch (\d+)/\d+ ")


def prepared(workdir: Path, size: str, source: str = CAMVID, address: str | None = None) -> str:
    dest = workdir / "prep" / f"camvid{size.split('x')[0]}"
    if not (dest / "dataset.json").exists():
        print(f"  preparing {source} at {size} -> {dest}", flush=True)
        benchlib.check(benchlib.run_cmd(benchlib.python("jobs/prepare.py", "--source", source, "--dest", str(dest),
                                                        "--size", size), env=benchlib.job_env(address)), "prepare")
    return str(dest)


def synthetic_prepared(workdir: Path, size: str, train: int, val: int, address: str | None) -> str:
    """A small synthetic dataset (for the 64-channel model, whose steps take seconds each)."""
    h, w = size.split("x")
    src = workdir / "synthetic" / f"src-{size}-{train}"
    dest = workdir / "prep" / f"synthetic-{size}-{train}"
    if not (dest / "dataset.json").exists():
        benchlib.check(benchlib.run_cmd([sys.executable, "-m", "segray.synthetic", "--dest", str(src), "--train",
                                         str(train), "--val", str(val), "--size", size]), "synthetic")
        benchlib.check(benchlib.run_cmd(benchlib.python("jobs/prepare.py", "--source", str(src), "--dest", str(dest)),
                                        env=benchlib.job_env(address)), "prepare")
    return str(dest)


def run_ray(data: str, storage: Path, base: int, batch: int, epochs: int, address: str, extra: list[str],
            profile_after: float | None = None) -> dict:
    """``profile_after``: py-spy one DDP worker for 30 s that many seconds after the start."""
    name = f"bench-{time.time_ns()}"
    cmd = benchlib.python("jobs/train.py", "--data", data, "--storage", str(storage), "--name", name,
                          "--epochs", str(epochs), "--num-workers", "2", "--batch-size", str(batch),
                          "--base-channels", str(base), *extra)
    spy_out = storage / f"{name}.pyspy.txt"
    stop = __import__("threading").Event()
    spy = benchlib.pyspy_record("RayTrainWorker", 30, spy_out, delay=profile_after, stop=stop) \
        if profile_after is not None else None
    with benchlib.TreeMonitor(interval=1.0) as mon:
        r = benchlib.check(benchlib.run_cmd(cmd, env=benchlib.job_env(address), timeout=3600), "jobs/train.py")
    stop.set()
    if spy is not None:
        spy.join(timeout=120)
    trace = storage / f"{name}.log"  # the job's output, each line with its second since the start
    trace.write_text("\n".join(f"{t:8.2f}  {line}" for t, line in r.lines) + "\n")
    history = json.loads((storage / name / "metrics.json").read_text())["history"]
    first = r.first(r"train: epoch 1/")
    last = r.first(rf"train: epoch {epochs}/")
    # CPU by process over epochs 2..N only (start-up and the first epoch left out).
    steady_cpu = mon.cpu_between(first[0], last[0], 16) if first and last and epochs > 1 else []
    startup = first[0] - history[0]["epoch_time_s"] if first else float("nan")
    steady = history[1:] or history
    return {
        "variant": "ray", "batch": batch, "global_batch": 2 * batch, "wall_s": r.wall_s, "startup_s": startup,
        "epoch1_ips": history[0]["images_per_s"],
        "ips": benchlib.median(h["images_per_s"] for h in steady),
        "epoch_s": benchlib.median(h["epoch_time_s"] for h in steady),
        "train_images": history[0]["train_images"],
        "cpu_s": mon.cpu_s, "peak_pss_mib": mon.peak_pss_mib, "trace": str(trace),
        "cpu_by_process": mon.cpu_by_process(14), "pyspy": benchlib.leaf_shares(spy_out),
        "steady_window_s": last[0] - first[0] if first and last else None, "steady_cpu_by_process": steady_cpu,
    }


def run_plain(data: str, base: int, batch: int, epochs: int, threads: int, cores: list[int] | None,
              world: int = 1, pin: bool = False) -> dict:
    extra = ("--world", str(world), *(("--pin",) if pin else ()))
    cmd = [*benchlib.taskset(cores), *benchlib.python("bench/train_plain.py", "--data", data, "--base-channels",
                                                       str(base), "--batch-size", str(batch), "--epochs", str(epochs),
                                                       "--threads", str(threads), *extra)]
    cpu0 = benchlib.children_cpu_s()
    r = benchlib.check(benchlib.run_cmd(cmd, env=benchlib.malloc_env("thresholds"), timeout=3600), "train_plain.py")
    epochs_seen = [(t, m) for t, line in r.lines if (m := PLAIN_EPOCH.search(line))]
    t1, m1 = epochs_seen[0]
    return {
        "variant": f"plain-{threads}thr", "batch": batch,
        "global_batch": batch * world, "wall_s": r.wall_s,
        "startup_s": t1 - float(m1.group(4)),
        "epoch1_ips": float(m1.group(3)),
        "ips": benchlib.median(float(m.group(3)) for _, m in epochs_seen[1:] or epochs_seen),
        "epoch_s": benchlib.median(float(m.group(4)) for _, m in epochs_seen),
        "cpu_s": benchlib.children_cpu_s() - cpu0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="prepared dataset (default: CamVid prepared at 176x240 in --workdir)")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="per DDP worker (default 8, the job's default)")
    p.add_argument("--epochs", type=int, default=2, help="Ray job epochs; epochs 2+ are the steady state (default 2)")
    p.add_argument("--plain-epochs", type=int, default=1, help="plain loop epochs (default 1)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="ray,plain-b,plain-2b,plain-1thr",
                   help="ray; plain-b (batch B, 2 threads); plain-2b (batch 2B = DDP's global batch); "
                   "plain-1thr (batch B, 1 thread pinned to one core); plain-ddp (2 DDP processes over gloo x "
                   "1 thread, batch B each, no Ray); plain-ddp-pin (the same, each pinned to its own core)")
    p.add_argument("--paper", action="store_true",
                   help="also the 64-channel U-Net at 352x480 on a small synthetic set (12 train frames; --paper-epochs)")
    p.add_argument("--paper-epochs", type=int, default=2,
                   help="epochs of the paper model, Ray job and plain loops; epochs 2+ are the steady state (default 2)")
    p.add_argument("--workdir", default="/tmp/segray-bench")
    p.add_argument("--quick", action="store_true", help="1 repetition, variants ray,plain-b,plain-2b")
    p.add_argument("--profile", type=float, default=None, metavar="SECONDS",
                   help="py-spy one DDP worker for 30 s, SECONDS after the job's start (first repetition), and "
                   "print the CPU seconds of every process of the Ray runs")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.variants = 1, "ray,plain-b,plain-2b"

    m = benchlib.machine()
    workdir = Path(args.workdir)
    storage = workdir / "runs"
    storage.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    print(f"machine: {m.describe()}; load average {os.getloadavg()}", flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def one_repetition(data: str, base: int, batch: int, epochs: int, plain_epochs: int, rep: int, tag: str,
                       address: str) -> None:
        rep_rows = []
        for v in variants:
            if v == "ray":
                row = run_ray(data, storage, base, batch, epochs, address, [],
                              args.profile if rep == 1 and tag.startswith("base") and base == args.base_channels
                              else None)
            elif v == "plain-b":
                row = run_plain(data, base, batch, plain_epochs, m.cores, None)
            elif v == "plain-2b":
                row = run_plain(data, base, 2 * batch, plain_epochs, m.cores, None)
            elif v == "plain-1thr":
                row = run_plain(data, base, batch, plain_epochs, 1, [0])
            elif v == "plain-ddp":
                row = run_plain(data, base, batch, plain_epochs, 1, None, world=2)
            elif v == "plain-ddp-pin":
                row = run_plain(data, base, batch, plain_epochs, 1, None, world=2, pin=True)
            else:
                raise SystemExit(f"unknown variant {v}")
            row.update(rep=rep, model=tag, label=v)
            rep_rows.append(row)
            print(f"  [{tag} rep {rep}] {v:10s} batch {row['batch']:2d}: {row['ips']:.4g} images/s "
                  f"(epoch 1 {row['epoch1_ips']:.4g}), start-up {row['startup_s']:.1f} s, wall {row['wall_s']:.0f} s",
                  flush=True)
        ray_row = next((r for r in rep_rows if r["label"] == "ray"), None)
        plains = [r for r in rep_rows if r["label"] in ("plain-b", "plain-2b")]
        best_plain = max(plains, key=lambda r: r["ips"]) if plains else None
        one = next((r for r in rep_rows if r["label"] == "plain-1thr"), None)
        for r in rep_rows:
            r["ray_vs_this"] = ray_row["ips"] / r["ips"] if ray_row else None
            if r is ray_row:
                r["vs_best_plain"] = r["ips"] / best_plain["ips"] if best_plain else None
                r["vs_2x_one_thread"] = r["ips"] / (2 * one["ips"]) if one else None
        rows.extend(rep_rows)

    with benchlib.local_ray(m.cores) as address:
        data = args.data or prepared(workdir, "176x240", address=address)
        for rep in range(1, args.repeats + 1):
            one_repetition(data, args.base_channels, args.batch_size, args.epochs, args.plain_epochs, rep,
                           f"base{args.base_channels}", address)
        if args.paper:
            data64 = synthetic_prepared(workdir, "352x480", 12, 2, address)
            saved = variants
            variants = [v for v in saved if v in ("ray", "plain-b", "plain-2b", "plain-ddp")]
            one_repetition(data64, 64, 2, args.paper_epochs, args.paper_epochs, 1, "base64-352x480", address)
            variants = saved

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["label"]), []).append(r)
    table = []
    for (model, label), rs in groups.items():
        med = lambda k: benchlib.median(r[k] for r in rs if r.get(k) is not None)  # noqa: E731
        table.append({"model": model, "variant": label, "batch": rs[0]["batch"], "global_batch": rs[0]["global_batch"],
                      "reps": len(rs), "images_per_s": med("ips"), "epoch1_images_per_s": med("epoch1_ips"),
                      "ray_vs_this": med("ray_vs_this"), "vs_best_plain": med("vs_best_plain"),
                      "vs_2x_one_thread": med("vs_2x_one_thread"), "startup_s": med("startup_s"),
                      "wall_s": med("wall_s")})
    benchlib.print_table(table, title="Training samples/s (medians over repetitions; ratios per repetition). "
                         "ray_vs_this = Ray's samples/s / this row's")
    for r in rows:
        if r.get("cpu_by_process"):
            print(f"\nCPU seconds by process, Ray run ({r['model']} rep {r['rep']}, {r['cpu_s']:.0f} s in all; "
                  f"{r['train_images']} train images/epoch); trace: {r['trace']}")
            for name, seconds in r["cpu_by_process"]:
                print(f"  {seconds:7.1f} s  {name}")
        if r.get("steady_cpu_by_process"):
            total = sum(s for _, s in r["steady_cpu_by_process"])
            print(f"\nCPU seconds by process over epochs 2..{args.epochs} only ({r['steady_window_s']:.0f} s wall, "
                  f"{total:.0f} CPU-s of the top 16 processes; the machine has {m.cores} cores):")
            for name, seconds in r["steady_cpu_by_process"]:
                print(f"  {seconds:7.1f} s  {seconds / r['steady_window_s'] * 100:5.1f}% of a core  {name}")
        if r.get("pyspy"):
            print(f"\npy-spy of one DDP worker, 30 s ({r['model']} rep {r['rep']}): share of samples per leaf")
            for name, share in r["pyspy"]:
                print(f"  {share * 100:5.1f}%  {name}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    benchlib.emit_json("train", {"summary": table, "runs": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

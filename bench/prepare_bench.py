"""Prepare: images/s of jobs/prepare.py vs a single-process PIL loop over the same pairs.

    python bench/prepare_bench.py                   # /work/shared/camvid -> 176x240, local and S3
    python bench/prepare_bench.py --quick           # local only, 1 repetition
    python bench/prepare_bench.py --source DIR --size 360x480 --repeats 3

- ray: ``python jobs/prepare.py --source S --dest D --size HxW`` against this process's own
  local cluster (ray.init(num_cpus=C)); images/s = pairs / the job's own time (listing,
  Ray Data start-up, decode + resize + check in tasks, Parquet write, dataset.json), and
  pairs / the command's wall time (with Python start-up and connecting to Ray).
- plain: one process, one thread: the same listing (segray.layout.detect), the same
  per-pair function (segray.prepare.process_pair: decode with PIL, check, resize image
  bilinear / label NEAREST), then one Parquet file per split with pyarrow (zstd), in this
  file's ``plain_prepare``.
- ideal: the plain loop's time spread perfectly over C cores: plain images/s x C.

Sources: local files (the page cache holds them after the first pass) and a moto S3 server on
127.0.0.1 holding a copy. Variants of a repetition run back to back; ratios are per repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

CAMVID = "/work/shared/camvid"
WROTE = re.compile(r"prepare: wrote (\d+) pairs .* in ([\d.]+) s \(([\d.]+) images/s\)")


def plain_prepare(source: str, dest: str, size: tuple[int, int]) -> dict:
    """The prepare stage's work in one process: list, read, decode, check, resize, Parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segray import storage
    from segray.dataset import SCHEMA
    from segray.layout import ORIGINAL, detect
    from segray.preprocess import color_lookup
    from segray.prepare import process_pair

    t0 = time.perf_counter()
    layout = detect(storage.normalize(source))
    lookup = color_lookup(layout.label_colors) if layout.kind == ORIGINAL else None
    by_split: dict[str, list[dict]] = {}
    for pair in layout.pairs:
        image, label, _ = process_pair(storage.read_bytes(pair.image), storage.read_bytes(pair.label), pair.image,
                                       pair.label, size, lookup)
        np.bincount(label.ravel(), minlength=12)  # the class counts dataset.json gets
        by_split.setdefault(pair.split, []).append({
            "name": pair.name, "image": image.tobytes(), "label": label.tobytes(), "height": size[0],
            "width": size[1], "source": pair.image})
    for split, rows in by_split.items():
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf, compression="zstd")
        storage.write_bytes(storage.join(dest, split, "part-0.parquet"), buf.getvalue().to_pybytes())
    seconds = time.perf_counter() - t0
    pairs = len(layout.pairs)
    return {"pairs": pairs, "seconds": seconds, "images_per_s": pairs / seconds}


def run_plain(source: str, dest: str, size: str) -> dict:
    cpu0 = benchlib.children_cpu_s()
    r = benchlib.check(benchlib.run_cmd([sys.executable, __file__, "--plain-one", json.dumps(
        {"source": source, "dest": dest, "size": size})], env=benchlib.malloc_env("thresholds")), "plain prepare")
    doc = benchlib.parse_json_lines(r.out)[-1]["result"]
    return {"variant": "plain", **doc, "wall_s": r.wall_s, "images_per_s_process": doc["pairs"] / r.wall_s,
            "cpu_s": benchlib.children_cpu_s() - cpu0}


def run_ray(source: str, dest: str, size: str, address: str) -> dict:
    with benchlib.TreeMonitor(interval=0.5) as mon:
        r = benchlib.check(benchlib.run_cmd(benchlib.python("jobs/prepare.py", "--source", source, "--dest", dest,
                                                            "--size", size), env=benchlib.job_env(address)),
                           "jobs/prepare.py")
    m = WROTE.search(r.out)
    if not m:
        raise RuntimeError(f"no 'prepare: wrote' line:\n{r.out[-2000:]}")
    pairs = int(m.group(1))
    return {"variant": "ray", "pairs": pairs, "seconds": float(m.group(2)), "images_per_s": float(m.group(3)),
            "wall_s": r.wall_s, "images_per_s_process": pairs / r.wall_s, "cpu_s": mon.cpu_s,
            "peak_pss_mib": mon.peak_pss_mib}


def profile(source: str, dest: str, size: str, address: str) -> None:
    with benchlib.TreeMonitor(interval=0.5) as mon:
        r = benchlib.check(benchlib.run_cmd(benchlib.python("bench/prepare_profile.py", "--source", source, "--dest",
                                                            dest, "--size", size), env=benchlib.job_env(address)),
                           "prepare_profile")
    print("\n== profile of one jobs/prepare.py run (bench/prepare_profile.py)")
    print("\n".join(line for line in r.out.splitlines() if "WARNING" not in line))
    print(f"\nCPU seconds by process during that run ({mon.cpu_s:.1f} s in all):")
    for name, seconds in mon.cpu_by_process(12):
        print(f"  {seconds:6.1f} s  {name}")


def upload(local: str, uri: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from segray import storage

    root = Path(local)
    files = [p for p in root.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: storage.write_bytes(f"{uri}/{p.relative_to(root)}", p.read_bytes()), files))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=CAMVID, help=f"CamVid source, local (default {CAMVID})")
    p.add_argument("--size", default="176x240", help="output HxW (default 176x240)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--where", default="local,s3", help="local and/or s3 (a moto copy of --source)")
    p.add_argument("--workdir", default="/tmp/segray-bench")
    p.add_argument("--quick", action="store_true", help="local only, 1 repetition")
    p.add_argument("--profile", action="store_true",
                   help="then one more job run (local source) through bench/prepare_profile.py: its phases, Ray "
                   "Data's per-operator stats and the CPU seconds of each process of the cluster")
    p.add_argument("--plain-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.plain_one:
        job = json.loads(args.plain_one)
        h, w = (int(v) for v in job["size"].split("x"))
        print(benchlib.JSON_PREFIX + json.dumps({"result": plain_prepare(job["source"], job["dest"], (h, w))}),
              flush=True)
        return 0
    if args.quick:
        args.repeats, args.where = 1, "local"

    m = benchlib.machine()
    where = args.where.split(",")
    out = Path(args.workdir) / "prepare-out"
    print(f"machine: {m.describe()}; load average {os.getloadavg()}", flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    with benchlib.moto_s3() if "s3" in where else contextlib.nullcontext():
        sources = {"local": args.source}
        if "s3" in where:
            sources["s3"] = f"s3://{benchlib.BUCKET}/camvid"
            upload(args.source, sources["s3"])
        with benchlib.local_ray(m.cores) as address:
            for rep in range(1, args.repeats + 1):
                for w, source in sources.items():
                    dest = str(out / f"{w}") if w == "local" else f"s3://{benchlib.BUCKET}/prepared"
                    ray_row = run_ray(source, f"{dest}-ray-{rep}", args.size, address)
                    plain_row = run_plain(source, f"{dest}-plain-{rep}", args.size)
                    for r in (ray_row, plain_row):
                        r.update(rep=rep, where=w, cores=m.cores)
                    ray_row["vs_plain"] = ray_row["images_per_s"] / plain_row["images_per_s"]
                    ray_row["vs_ideal"] = ray_row["images_per_s"] / (plain_row["images_per_s"] * m.cores)
                    ray_row["process_vs_plain_process"] = (ray_row["images_per_s_process"]
                                                           / plain_row["images_per_s_process"])
                    rows += [ray_row, plain_row]
                    print(f"  [{w} rep {rep}] ray {ray_row['images_per_s']:.1f} images/s (job), plain "
                          f"{plain_row['images_per_s']:.1f}: x{ray_row['vs_plain']:.2f} plain, "
                          f"x{ray_row['vs_ideal']:.2f} ideal (plain x {m.cores} cores)", flush=True)
            if args.profile:
                profile(args.source, str(out / "profile"), args.size, address)

    table = []
    for w in where:
        for v in ("ray", "plain"):
            rs = [r for r in rows if r["where"] == w and r["variant"] == v]
            if not rs:
                continue
            med = lambda k: benchlib.median(r[k] for r in rs if r.get(k) is not None)  # noqa: E731
            table.append({"source": w, "variant": v, "pairs": rs[0]["pairs"], "reps": len(rs),
                          "images_per_s": med("images_per_s"), "images_per_s_process": med("images_per_s_process"),
                          "vs_plain": med("vs_plain"), "vs_ideal": med("vs_ideal"),
                          "process_vs_plain_process": med("process_vs_plain_process"),
                          "cpu_ms_per_image": 1000 * benchlib.median(r["cpu_s"] / r["pairs"] for r in rs),
                          "seconds": med("seconds"), "wall_s": med("wall_s")})
    benchlib.print_table(table, title=f"Prepare {args.source} -> {args.size} (medians; ratios per repetition)")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    benchlib.emit_json("prepare", {"summary": table, "runs": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

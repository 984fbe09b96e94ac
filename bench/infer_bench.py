"""Inference end to end: jobs/infer.py vs the ideal pipeline, model-only and the plain script.

    python bench/infer_bench.py                       # everything, ~35 minutes on 2 shared cores
    python bench/infer_bench.py --quick               # local files + memory at 1k/4k, ~12 minutes
    python bench/infer_bench.py --what local,s3 --frames 300 --repeats 2

What is measured (each in its own process; the Ray cluster is this process's own, started with
ray.init(num_cpus=C), never ``ray start``; S3 is a moto server on 127.0.0.1 in this process):

- t_io: one thread, seconds per frame of read + decode + resize to the model's size + mask back
  to the frame's size (NEAREST) + PNG encode + Parquet write, with segray.infer's functions,
  from local files, local .tar archives, S3 files and S3 archives.
- t_model: model-only seconds per frame on pre-decoded uint8 frames (normalise, forward,
  argmax), torch on all C cores, batch 16 (the job's default): in NCHW (the plain script's
  default) and in channels-last (NHWC), the job's CPU format.
- ideal pipeline frames/s = 1 / (t_model + t_io / C): decoding spread over every core, the model
  on every core; measured right before the end-to-end runs of the same repetition.
- end to end: ``python jobs/infer.py`` against the local cluster (frames/s as the job reports
  it: listing, start-up and the pipeline), ``bench/infer_plain.py`` (frames/s including its model
  load and listing), and variants: the replica held to 1 thread (the job's default before
  docs/benchmarks.md), two replicas, the plain script in channels-last. CPU seconds per frame
  of every process of the run (Ray's included) and peak PSS.
- memory: peak PSS (and RSS) summed over the Ray cluster's and the job's processes, at 1k and 4k
  frames (a small model, so that the pipeline, not the model, sets the pace).
- scaling: the job and the plain script on 1 core (taskset, ray.init(num_cpus=1)) and on 2.

Every variant of a repetition runs back to back, in the same order, so that they share the
machine's load; ratios are per repetition, and the table shows their median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

FRAME_SIZE = (360, 480)  # CamVid's own frame size
MODELS = {"cpu": (16, (176, 240)), "paper": (64, (352, 480)), "tiny": (4, (176, 240))}
MODEL_BATCH = {"cpu": 16, "paper": 4, "tiny": 16}
PER_ARCHIVE = 100
DONE = re.compile(r"infer: done in ([\d.]+) s: (\d+) inputs this run \(([\d.]+) frames/s\)")

# name -> (script, extra args, model format for its ideal)
VARIANTS = {
    "ray": ("jobs/infer.py", [], "cl"),  # the job's CPU default: channels-last, a replica's threads = all cores
    "ray-1thread": ("jobs/infer.py", ["--threads", "1"], "cl"),  # the replica held to its reserved CPU
    "ray-2rep": ("jobs/infer.py", ["--num-replicas", "2", "--cpus-per-replica", "0.5"], "cl"),
    "plain": ("bench/infer_plain.py", [], "nchw"),
    "plain-cl": ("bench/infer_plain.py", ["--channels-last"], "cl"),
}
DEFAULT_VARIANTS = "ray,ray-1thread,ray-2rep,plain,plain-cl"


# ----------------------------------------------------------------------------- one-process measurements


def io_one(job: dict) -> dict:
    """t_io in this process (one thread): read, decode, resize, mask back, PNG, Parquet."""
    import numpy as np
    import pyarrow as pa

    import infer_plain
    from segray import frames, predictions, predictor, sources, storage
    from segray.camvid import NUM_CLASSES, VOID_INDEX
    from segray.preprocess import resize_label
    from segray.synthetic import render_scene

    size = tuple(job["size"])
    # A realistic predicted mask (a drawn street's label): PNG cost depends on the content.
    _, label = render_scene(np.random.default_rng(7), *FRAME_SIZE)
    pred = resize_label(np.where(label == VOID_INDEX, 0, label).astype(np.uint8), size)
    listing = sources.list_inputs(storage.normalize(job["images"]))
    rows = []
    with benchlib.timed() as t:
        for uri, data, _ in infer_plain.encoded(listing):
            _, h, w = frames.load_frame(data, uri, size)
            r = predictor.finish_frame(pred, (h, w), NUM_CLASSES, VOID_INDEX, None)
            rows.append({"uri": uri, "height": h, "width": w, "mask_png": r.mask_png,
                         "class_pixel_counts": r.class_pixel_counts, "label_uri": None, "confusion": None,
                         "pixel_accuracy": None})
            if len(rows) >= job["limit"]:
                break
        predictions.write_parquet(storage.join(job["output"], "predictions", "part-io.parquet"),
                             pa.Table.from_pylist(rows, schema=predictions.PREDICTIONS_SCHEMA))
    return {"frames": len(rows), "s_per_frame": t.wall_s / len(rows), "cpu_s_per_frame": t.cpu_s / len(rows)}


def model_one(job: dict) -> dict:
    """t_model in this process: pre-decoded frames -> masks, as the job's replica computes them."""
    import numpy as np
    import torch

    from segray import modelio
    from segray.model import DEFAULT_ARCH, build_network

    base, size = MODELS[job["model"]]
    torch.set_num_threads(job["threads"])
    model = build_network(DEFAULT_ARCH, {"base_channels": base}).eval()
    tuned = job["format"] == "cl"
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    frames = np.random.default_rng(0).integers(0, 256, (job["batch"], *size, 3), dtype=np.uint8)

    def step() -> None:
        with torch.inference_mode():
            model(modelio.images_to_tensor(frames, channels_last=tuned)).argmax(1).to(torch.uint8).numpy()

    times = benchlib.repeat(step, 50, warmup=1, max_seconds=job["seconds"])
    best, med = benchlib.best_and_median(times)
    return {"s_per_frame": med / job["batch"], "best_s_per_frame": best.wall_s / job["batch"], "calls": len(times),
            "cpu_share": benchlib.median(t.share(job["threads"]) for t in times)}


def run_one(kind: str, job: dict, cores: list[int] | None = None) -> dict:
    env = benchlib.malloc_env("thresholds")
    env["OMP_NUM_THREADS"] = str(job.get("threads", 1))
    r = benchlib.run_cmd([*benchlib.taskset(cores), sys.executable, __file__, f"--{kind}-one", json.dumps(job)],
                         env=env, timeout=900)
    docs = benchlib.parse_json_lines(r.out)
    if r.rc != 0 or not docs:
        raise RuntimeError(f"{kind} {job} failed (exit {r.rc}):\n{r.out[-3000:]}")
    return docs[-1]["result"]


# ----------------------------------------------------------------------------- inputs


class Inputs:
    """Models and frames below ``workdir`` (local) and in the moto bucket (s3), made once."""

    def __init__(self, workdir: Path, s3: bool, per_archive: int = PER_ARCHIVE) -> None:
        self.workdir = workdir
        self.s3 = s3
        self.per_archive = per_archive

    def model(self, name: str) -> str:
        path = self.workdir / "models" / name
        if not (path / "config.json").exists():
            base, size = MODELS[name]
            benchlib.export_model(str(path), base, size)
        return str(path)

    def frames(self, kind: str, n: int, where: str = "local") -> str:
        """Prefix of ``n`` frames: kind files or tar; where local or s3."""
        name = f"{kind}-{n}" if kind != "tar" or self.per_archive == PER_ARCHIVE else f"tar{self.per_archive}-{n}"
        local = self.workdir / "frames" / name
        marker = local.parent / f".{name}.complete"  # outside: every file below `local` is an input
        if not marker.exists():
            shutil.rmtree(local, ignore_errors=True)
            t0 = time.perf_counter()
            nbytes = benchlib.write_frames(str(local), n, FRAME_SIZE, per_archive=self.per_archive if kind == "tar" else 0)
            marker.write_text("")
            print(f"  wrote {n} frames ({kind}, {nbytes / 2**20:.0f} MiB) to {local} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        if where == "local":
            return str(local)
        uri = f"s3://{benchlib.BUCKET}/frames/{name}"
        from segray import storage

        if not storage.list_files(uri):
            from concurrent.futures import ThreadPoolExecutor

            files = [p for p in local.rglob("*") if p.is_file()]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda p: storage.write_bytes(f"{uri}/{p.relative_to(local)}", p.read_bytes()), files))
        return uri

    def output(self, tag: str, where: str) -> str:
        if where == "s3":
            return f"s3://{benchlib.BUCKET}/out/{tag}-{time.time_ns()}"
        path = self.workdir / "out" / tag
        shutil.rmtree(path, ignore_errors=True)
        return str(path)


# ----------------------------------------------------------------------------- end-to-end runs


def run_e2e(variant: str, images: str, output: str, model: str, address: str | None, cores: list[int] | None,
            threads: int, extra: list[str] | None = None, profile: Path | None = None) -> dict:
    """One run of ``variant``; frames/s as the job (or the plain script) reports it, CPU seconds
    of every process of the run, peak memory; with ``profile``, py-spy of the model replica."""
    script, args, fmt = VARIANTS[variant]
    cmd = benchlib.python(script, "--model", model, "--images", images, "--output", output, *args, *(extra or []))
    plain = script.endswith("infer_plain.py")
    if plain:
        cmd += ["--threads", str(threads)]
        cmd = [*benchlib.taskset(cores), *cmd]
    env = benchlib.job_env(None if plain else address)
    stop = threading.Event()
    spy = None
    if profile is not None and not plain:
        # 20 s after the start: past the replica's imports and model load, into the steady state.
        spy = benchlib.pyspy_record("Predictor", 30, profile, delay=20, stop=stop)
    children_cpu = benchlib.children_cpu_s()
    with benchlib.TreeMonitor(interval=0.5, new_only=plain) as mon:
        r = benchlib.run_cmd(cmd, env=env, timeout=3600)
    stop.set()
    if spy is not None:
        spy.join(timeout=120)
    # A plain run's CPU time is exact from the kernel's accounting of waited-for children.
    cpu_s = benchlib.children_cpu_s() - children_cpu if plain else mon.cpu_s
    benchlib.check(r, f"{variant} over {images}")
    row = {"variant": variant, "format": fmt, "wall_s": r.wall_s, "cpu_s": cpu_s,
           "peak_pss_mib": mon.peak_pss_mib, "peak_rss_mib": mon.peak_rss_mib, "base_pss_mib": mon.base_pss_mib}
    if plain:
        doc = benchlib.parse_json_lines(r.out)[-1]
        row.update(frames=doc["frames"], seconds=doc["seconds"] + doc["load_s"],
                   fps=doc["frames"] / (doc["seconds"] + doc["load_s"]))
    else:
        m = DONE.search(r.out)
        if not m:
            raise RuntimeError(f"{variant}: no 'infer: done' line in its output:\n{r.out[-3000:]}")
        row.update(frames=int(m.group(2)), seconds=float(m.group(1)), fps=float(m.group(3)))
        row["cpu_by_process"] = mon.cpu_by_process(10)
    row["cpu_s_per_frame"] = row["cpu_s"] / max(row["frames"], 1)
    row["fps_process"] = row["frames"] / r.wall_s  # including Python start-up and connecting to Ray
    if profile is not None and profile.exists():
        row["profile"] = benchlib.leaf_shares(profile)
    return row


def ideal(t_model: float, t_io: float, cores: int) -> float:
    return 1.0 / (t_model + t_io / cores)


# ----------------------------------------------------------------------------- scenarios


def run_pair(variant: str, small: str, big: str, n_small: int, n_big: int, tag: str, where: str, inp: Inputs,
             model: str, address: str | None, cores: list[int] | None, threads: int, extra: list[str],
             profile: Path | None = None) -> dict:
    """The variant over ``n_small`` then ``n_big`` frames: its total frames/s over ``n_big`` (what
    the job reports, start-up included), and from the difference of the two runs its steady
    frames/s and CPU per frame (start-up cancels out) and its fixed start-up seconds."""
    lo = run_e2e(variant, small, inp.output(f"{tag}-small", where), model, address, cores, threads, extra)
    hi = run_e2e(variant, big, inp.output(f"{tag}-big", where), model, address, cores, threads, extra, profile)
    dt = hi["seconds"] - lo["seconds"]
    steady = (n_big - n_small) / dt if dt > 0 else float("nan")
    startup = lo["seconds"] - n_small / steady if dt > 0 else float("nan")
    row = dict(hi)
    row.update(
        frames_small=lo["frames"], seconds_small=lo["seconds"], steady_fps=steady, startup_s=startup,
        cpu_ms_steady=1000 * (hi["cpu_s"] - lo["cpu_s"]) / (n_big - n_small),
        fps_at_4000=4000 / (max(startup, 0.0) + 4000 / steady) if dt > 0 else float("nan"),
    )
    return row


def scenario_throughput(inp: Inputs, sources: list[tuple[str, str]], model_name: str, n: int, n_small: int,
                        variants: list[str], repeats: int, cores: int, address: str, results: list[dict],
                        profile_dir: Path | None, extra: list[str] | None = None) -> None:
    """Every source x every variant, ``repeats`` times, with t_io and t_model in each repetition."""
    model = inp.model(model_name)
    _, size = MODELS[model_name]
    for rep in range(repeats):
        t_model = {fmt: run_one("model", {"model": model_name, "threads": cores, "batch": MODEL_BATCH[model_name],
                                          "format": fmt, "seconds": 20})
                   for fmt in ("nchw", "cl")}
        for kind, where in sources:
            big, small = inp.frames(kind, n, where), inp.frames(kind, n_small, where)
            io = run_one("io", {"images": big, "size": size, "limit": min(n, 200),
                                "output": inp.output(f"io-{kind}", where)})
            ideals = {fmt: ideal(t_model[fmt]["s_per_frame"], io["s_per_frame"], cores) for fmt in t_model}
            print(f"  [{model_name} {where} {kind} rep {rep + 1}] t_io {io['s_per_frame'] * 1000:.1f} ms/frame, "
                  f"t_model nchw {t_model['nchw']['s_per_frame'] * 1000:.0f} ms, channels-last "
                  f"{t_model['cl']['s_per_frame'] * 1000:.0f} ms/frame -> ideal {ideals['nchw']:.2f} / "
                  f"{ideals['cl']:.2f} frames/s", flush=True)
            rows = []
            for v in variants:
                prof = None
                if profile_dir is not None and rep == 0 and v in ("ray", "ray-1thread"):
                    prof = profile_dir / f"pyspy-{model_name}-{where}-{kind}-{v}.txt"
                row = run_pair(v, small, big, n_small, n, f"{model_name}-{where}-{kind}-{v}", where, inp, model,
                               address, None, cores, extra or [], prof)
                row.update(model=model_name, source=f"{where} {kind}", rep=rep + 1, cores=cores,
                           t_io_ms=io["s_per_frame"] * 1000, t_model_ms=t_model[row["format"]]["s_per_frame"] * 1000,
                           model_only_fps=1 / t_model[row["format"]]["s_per_frame"], ideal_fps=ideals[row["format"]])
                row["vs_ideal"] = row["steady_fps"] / row["ideal_fps"]
                row["total_vs_ideal"] = row["fps"] / row["ideal_fps"]
                row["vs_model_only"] = row["steady_fps"] / row["model_only_fps"]
                rows.append(row)
                print(f"    {v:24s} steady {row['steady_fps']:6.2f} frames/s ({row['vs_ideal']:.2f} x ideal), "
                      f"{n} frames {row['fps']:6.2f} frames/s, start-up {row['startup_s']:5.1f} s, "
                      f"{row['cpu_ms_steady']:.0f} CPU-ms/frame, peak PSS {row['peak_pss_mib']:.0f} MiB", flush=True)
            plain = next((r for r in rows if r["variant"] == "plain"), None)
            for row in rows:
                row["vs_plain"] = row["steady_fps"] / plain["steady_fps"] if plain else None
                row["total_vs_plain"] = row["fps"] / plain["fps"] if plain else None
            results.extend(rows)


def scenario_scaling(inp: Inputs, n: int, n_small: int, results: list[dict], repeats: int) -> None:
    """The job and the plain script on 1 core and on 2 (pinned), the CPU-default model."""
    model = inp.model("cpu")
    big, small = inp.frames("files", n), inp.frames("files", n_small)
    _, size = MODELS["cpu"]
    for rep in range(repeats):
        for ncores in (1, 2):
            cores = list(range(ncores))
            t_model = run_one("model", {"model": "cpu", "threads": ncores, "batch": 16, "format": "nchw",
                                        "seconds": 20}, cores)
            io = run_one("io", {"images": big, "size": size, "limit": min(n, 200),
                                "output": inp.output("io-scaling", "local")}, cores)
            ideal_fps = ideal(t_model["s_per_frame"], io["s_per_frame"], ncores)
            # Two scheduling slots even on one core: the replica takes one, decode tasks the other
            # (they share the core; the job refuses to leave less than one CPU for decoding).
            with benchlib.local_ray(max(2, ncores), cores) as address:
                for v in ("ray", "plain"):
                    extra = []
                    row = run_pair(v, small, big, n_small, n, f"scaling-{ncores}-{v}", "local", inp, model, address,
                                   cores, ncores, extra)
                    row.update(model="cpu", source="local files", rep=rep + 1, cores=ncores, ideal_fps=ideal_fps,
                               t_io_ms=io["s_per_frame"] * 1000, t_model_ms=t_model["s_per_frame"] * 1000,
                               model_only_fps=1 / t_model["s_per_frame"], scenario="scaling")
                    row["vs_ideal"] = row["steady_fps"] / ideal_fps
                    row["total_vs_ideal"] = row["fps"] / ideal_fps
                    results.append(row)
                    print(f"  [scaling {ncores} core(s) rep {rep + 1}] {v:6s} steady {row['steady_fps']:.2f} frames/s "
                          f"({row['vs_ideal']:.2f} x ideal {ideal_fps:.2f}), {n} frames {row['fps']:.2f}", flush=True)


def scenario_memory(inp: Inputs, sizes: list[int], address: str, results: list[dict], where: str = "local") -> None:
    """Peak memory of the job's processes at each number of frames (the tiny model)."""
    model = inp.model("tiny")
    big = max(sizes)
    root = inp.frames("files", big, where)
    for n in sizes:
        # files-<big> holds seq00, seq01, ... of 1000 frames each: seq00 is the first 1000.
        if n == big:
            images = root
        elif n == 1000:
            images = f"{root}/seq00"
        else:
            images = inp.frames("files", n, where)
        row = run_e2e("ray", images, inp.output(f"memory-{n}", where), model, address, None, 2)
        row.update(model="tiny", source=f"{where} files", frames_listed=n, scenario="memory")
        results.append(row)
        print(f"  [memory {n} frames] {row['fps']:.1f} frames/s, peak PSS {row['peak_pss_mib']:.0f} MiB "
              f"(idle cluster {row['base_pss_mib']:.0f} MiB), peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)


def scenario_archive(inp: Inputs, n: int, cores: int, results: list[dict]) -> None:
    """``n`` frames as one .tar archive vs as files, the tiny model (decoding sets the pace), on a
    cluster that offers 2 logical CPUs per core: room for several decode tasks beside the replica,
    as on a many-core node. A single archive used to be decoded by its one read task."""
    model = inp.model("tiny")
    sources = (("files", inp.frames("files", n)), ("one archive", Inputs(inp.workdir, False, per_archive=n).frames("tar", n)))
    with benchlib.local_ray(2 * cores) as address:
        for source, images in sources:
            row = run_e2e("ray", images, inp.output(f"archive-{source.replace(' ', '-')}", "local"), model, address,
                          None, 2)
            row.update(model="tiny", source=f"local {source}", scenario="archive", cores=cores)
            results.append(row)
            print(f"  [archive scenario, {source}] {row['fps']:.1f} frames/s, {row['cpu_s_per_frame'] * 1000:.0f} "
                  f"CPU-ms/frame", flush=True)


# ----------------------------------------------------------------------------- report


def summarize(results: list[dict]) -> list[dict]:
    """Median over repetitions per (scenario, model, source, cores, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r.get("scenario", "throughput"), r.get("model"), r.get("source"), r.get("cores"), r["variant"],
               r.get("frames_listed"))
        groups.setdefault(key, []).append(r)
    out = []
    for (scenario, model, source, cores, variant, _listed), rows in groups.items():
        def med(k: str) -> float | None:
            vals = [r[k] for r in rows if r.get(k) is not None]
            return benchlib.median(vals) if vals else None

        out.append({"scenario": scenario, "model": model, "source": source, "cores": cores, "variant": variant,
                    "frames": rows[0]["frames"], "reps": len(rows), "steady_fps": med("steady_fps"),
                    "ideal_fps": med("ideal_fps"), "vs_ideal": med("vs_ideal"), "vs_plain": med("vs_plain"),
                    "fps": med("fps"), "total_vs_ideal": med("total_vs_ideal"), "total_vs_plain": med("total_vs_plain"),
                    "startup_s": med("startup_s"), "fps_at_4000": med("fps_at_4000"),
                    "vs_model_only": med("vs_model_only"), "t_io_ms": med("t_io_ms"), "t_model_ms": med("t_model_ms"),
                    "cpu_ms_steady": med("cpu_ms_steady"), "peak_pss_mib": med("peak_pss_mib"),
                    "peak_rss_mib": med("peak_rss_mib"), "base_pss_mib": med("base_pss_mib")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="local,s3,paper,scaling,memory",
                   help="scenarios: local (files + tar), s3 (files + tar in moto), paper (64-channel model at "
                   "352x480, local files), scaling (1 vs 2 cores), memory (1k vs 4k frames), archive (one big .tar vs files, "
                   "tiny model; not in the default)")
    p.add_argument("--frames", type=int, default=300, help="frames of the big run, CPU-default model (default 300)")
    p.add_argument("--per-archive", type=int, default=PER_ARCHIVE,
                   help=f"frames per .tar archive of the tar inputs (default {PER_ARCHIVE}; the frame count: one archive)")
    p.add_argument("--small-frames", type=int, default=50,
                   help="frames of the small run: steady frames/s = (big - small) / (its seconds - small's) (default 50)")
    p.add_argument("--paper-frames", type=int, default=32, help="frames of the big run, paper model (default 32)")
    p.add_argument("--paper-small-frames", type=int, default=8, help="frames of the small run, paper model (default 8)")
    p.add_argument("--memory-frames", default="1000,4000", help="frame counts of the memory runs (default 1000,4000)")
    p.add_argument("--repeats", type=int, default=1, help="repetitions of each local comparison (default 1)")
    p.add_argument("--s3-repeats", type=int, default=1, help="repetitions of each S3 comparison (default 1)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    p.add_argument("--workdir", default="/tmp/segray-bench", help="models, frames and outputs (default /tmp/segray-bench)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the model replica for 30 s in the first repetition (ray, ray-1thread)")
    p.add_argument("--quick", action="store_true", help="local + memory only, 150 frames, 1 repetition")
    p.add_argument("--io-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.io_one:
        print(benchlib.JSON_PREFIX + json.dumps({"result": io_one(json.loads(args.io_one))}), flush=True)
        return 0
    if args.model_one:
        print(benchlib.JSON_PREFIX + json.dumps({"result": model_one(json.loads(args.model_one))}), flush=True)
        return 0
    if args.quick:
        args.what, args.frames, args.small_frames, args.repeats = "local,memory", 150, 30, 1

    what = set(args.what.split(","))
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    m = benchlib.machine()
    cores = m.cores
    workdir = Path(args.workdir)
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    profile_dir = workdir / "profiles" if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {m.describe()}; load average {os.getloadavg()}", flush=True)
    results: list[dict] = []
    t_start = time.perf_counter()

    with benchlib.moto_s3() if "s3" in what else contextlib.nullcontext() as _:
        inp = Inputs(workdir, s3="s3" in what, per_archive=args.per_archive)
        with benchlib.local_ray(cores) as address:
            if "local" in what:
                print(f"== local disk: {args.frames} frames, files and tar archives of {args.per_archive}", flush=True)
                scenario_throughput(inp, [("files", "local"), ("tar", "local")], "cpu", args.frames,
                                    args.small_frames, variants, args.repeats, cores, address, results, profile_dir)
            if "s3" in what:
                print(f"== moto S3: {args.frames} frames, files and tar archives", flush=True)
                scenario_throughput(inp, [("files", "s3"), ("tar", "s3")], "cpu", args.frames, args.small_frames,
                                    [v for v in variants if v in ("ray", "ray-1thread", "plain", "plain-cl")],
                                    args.s3_repeats, cores, address, results, None)
            if "paper" in what:
                print(f"== paper model (base 64, 352x480): {args.paper_frames} frames, local files", flush=True)
                # Batches of 4: a 64-channel batch of 16 at 352x480 holds GBs of activations per replica.
                scenario_throughput(inp, [("files", "local")], "paper", args.paper_frames, args.paper_small_frames,
                                    [v for v in variants if v in ("ray", "ray-1thread", "plain", "plain-cl")],
                                    1, cores, address, results, None, extra=["--batch-size", "4"])
            if "memory" in what:
                sizes = [int(s) for s in args.memory_frames.split(",")]
                print(f"== memory: {sizes} frames, tiny model, local files", flush=True)
                scenario_memory(inp, sizes, address, results)
        if "archive" in what:
            print(f"== archive: {args.frames} frames as one .tar vs files, tiny model, {2 * cores} logical CPUs",
                  flush=True)
            scenario_archive(inp, args.frames, cores, results)
        if "scaling" in what:
            print(f"== scaling: 1 and 2 cores, {min(args.frames, 200)} frames", flush=True)
            scenario_scaling(inp, min(args.frames, 200), args.small_frames, results, 1)

    table = summarize(results)
    cols = ["scenario", "model", "source", "cores", "variant", "frames", "reps", "steady_fps", "ideal_fps", "vs_ideal",
            "vs_plain", "fps", "total_vs_ideal", "total_vs_plain", "startup_s", "fps_at_4000", "t_io_ms", "t_model_ms",
            "cpu_ms_steady", "peak_pss_mib"]
    benchlib.print_table([r for r in table if r["scenario"] != "memory"], cols,
                         title="Inference end to end (medians over repetitions; ratios per repetition). steady: from "
                         "the difference of a small and a big run (start-up cancels); fps: the big run as the job "
                         "reports it; fps_at_4000: start-up + steady rate projected to 4000 frames")
    benchlib.print_table([r for r in table if r["scenario"] == "memory"],
                         ["source", "variant", "frames", "fps", "peak_pss_mib", "base_pss_mib", "peak_rss_mib"],
                         title="Memory: peak PSS/RSS summed over the Ray cluster's and the job's processes")
    mem = [r for r in table if r["scenario"] == "memory"]
    if len(mem) >= 2:
        lo, hi = min(mem, key=lambda r: r["frames"]), max(mem, key=lambda r: r["frames"])
        print(f"\nmemory: {hi['frames']} vs {lo['frames']} frames: peak PSS x{hi['peak_pss_mib'] / lo['peak_pss_mib']:.2f} "
              f"({lo['peak_pss_mib']:.0f} -> {hi['peak_pss_mib']:.0f} MiB)")
    for r in results:
        if r.get("profile"):
            print(f"\npy-spy of the model replica ({r['variant']}, {r['source']}): share of samples per leaf function")
            for name, share in r["profile"]:
                print(f"  {share * 100:5.1f}%  {name}")
        if r.get("cpu_by_process") and r.get("rep") == 1 and r["variant"] in ("ray", "ray-1thread") and \
                r.get("source") == "local files" and r.get("scenario") is None:
            print(f"\nCPU seconds by process, {r['variant']} over {r['frames']} frames ({r['model']}, "
                  f"{r['cpu_s']:.0f} s in all):")
            for name, seconds in r["cpu_by_process"]:
                print(f"  {seconds:7.1f} s  {name}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    benchlib.emit_json("infer", {"summary": table, "runs": results, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Video files and big archives through jobs/infer.py (issue #16), against files and plain loops.

    python bench/video_bench.py --out /tmp/video_bench.json    # ~9 minutes on 2 quiet cores, ~15 at load 8
    python bench/video_bench.py --frames 500 --repeats 1 --what video,memory --out /tmp/vb.json  # ~1-2 minutes

Everything runs on one Ray cluster of this process (``ray.init(num_cpus=--num-cpus)``, never
``ray start``), with the tiny model (base 4, 176x240), meant to let reading and decoding set
the pace (on video it does not: docs/benchmarks.md, "Video files and big archives"). Every
job run is ``jobs/infer.py --model M --images X --output O --frames-per-task F --rows-per-file
R`` with the job's defaults otherwise (one replica reserving 1 CPU, torch threads = cores).
The plain loops run in a process of their own with the CPU workers' allocator settings
(segray.runtime.CPU_MALLOC_ENV), as bench/infer_bench.py does.

1. archive vs files: one plain .tar of --frames synthetic 360x480 street scenes (PNG, 32 scenes
   repeated: decoding a repeated PNG costs what a new one does) against the same frames as files.
2. video vs a plain loop: one H.264 .mp4 of --frames frames (libx264, --gop, --bframes, --preset,
   --crf; the scene moves towards the camera and cuts every 100 frames; fixed-pattern sensor
   noise gives it a realistic ~1 Mbit/s), against one process that opens the file, decodes every
   frame (one decoder thread, as segray's tasks; PyAV's default threading reported beside it),
   ``to_ndarray("rgb24")`` and ``segray.preprocess.resize_image`` to the model's size. The same
   job with --frames-per-task above the frame count (ONE range) shows what the ranges buy, and
   ``plain-full`` (the job's whole per-frame work in one process: decode, resize, the model on
   every core, mask back to size, PNG, Parquet) what a user's script doing the same would get.
3. memory: the job over a video of --frames and one of --long-frames (default 2x) frames. Peak
   PSS and RSS summed over every process of the cluster and the job (sampled every 0.5 s,
   benchlib.TreeMonitor), and the largest per-process high-water mark (``VmHWM``, the kernel's
   own max RSS, no sampling miss) among the processes the run started (the job's driver,
   tasks' and actor's workers). Shared pages (libraries, the object store's /dev/shm) count in
   every RSS that touched them, so the sampler also sums ``RssAnon`` (private memory only) over
   the cluster, and keeps each new process's peak RssAnon (largest, and per stage in the JSON).
4. decode (a profile): the job's first stages alone (plan_units, one unit per block, load_units,
   built as segray.infer.run_pipeline builds them; the frames counted where they were decoded,
   no model, no postprocessing, no writing) over the video, with ranges and with ONE range,
   twice in one driver: a cold pass (a new job's Ray workers start on demand, as in every
   jobs/infer.py run) and a warm one (the workers are up).

While each job runs, a sampler attributes every process's CPU time to the Ray stage its process
title names (``ray::MapBatches(load_units)``, ...; every 0.5 s): that is the profile printed
after the table. The job's own frames/s (its summary line: listing, planning, start-up and the
pipeline) is compared; the video job's steady frames/s comes from the --frames and --long-frames
runs: (long - frames) / (their seconds' difference).

Each round runs every measurement once, in an order that alternates between rounds (A B ... B A);
ratios are per round, the table shows their medians. Temporary data (frames, videos, outputs)
live below --workdir and are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
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
import infer_bench  # noqa: E402  (Inputs, run_e2e, MODELS: the infer benchmark's helpers)

FRAME_SIZE = infer_bench.FRAME_SIZE  # (360, 480), CamVid's
MODEL = "tiny"
PREDICTED = re.compile(r"predicted\s+(\d+) frames \((\d+) this run\)")
ERRORS = re.compile(r"errors\s+(\d+) \((\d+) this run")
ONE_RANGE = 1 << 30  # --frames-per-task for ONE range of any video here


# ----------------------------------------------------------------------------- the video


def video_frames(n: int, size: tuple[int, int], scene_len: int = 100, noise: float = 3.0, seed: int = 0):
    """``n`` RGB frames: a synthetic street (segray.synthetic) the camera moves into (a zoom to
    1.25x and a pan over ``scene_len`` frames), a new street every ``scene_len`` frames, plus
    one of 8 fixed noise fields (a sensor's noise; without it x264 codes the drawn scenes at
    ~0.3 Mbit/s, unlike any camera's video)."""
    import numpy as np
    from PIL import Image

    from segray.synthetic import render_scene

    h, w = size
    fields = [np.random.default_rng([seed, 7, k]).normal(0, noise, (h, w, 3)).astype(np.int16) for k in range(8)]
    base = None
    for i in range(n):
        j = i % scene_len
        if j == 0:
            base = Image.fromarray(render_scene(np.random.default_rng([seed, i // scene_len]), h, w)[0])
        s = 1 + 0.25 * j / scene_len
        cw, ch = w / s, h / s
        x0, y0 = (w - cw) * (0.5 + 0.4 * (j / scene_len - 0.5)), (h - ch) / 2
        frame = np.asarray(base.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))
        yield np.clip(frame + fields[i % len(fields)], 0, 255).astype(np.uint8)


def encoder_settings(args: argparse.Namespace) -> dict:
    return {"codec": "libx264", "container": "mp4", "rate": args.rate, "pix_fmt": "yuv420p",
            "options": {"g": str(args.gop), "bf": str(args.bframes), "preset": args.preset, "crf": str(args.crf)}}


def make_video(path: Path, n: int, enc: dict) -> dict:
    """Encode ``n`` frames into ``path`` (once: a marker beside it says it is complete)."""
    import av

    marker = path.parent / f".{path.name}.json"
    if marker.exists() and path.exists():
        return json.loads(marker.read_text())
    h, w = FRAME_SIZE
    t0 = time.perf_counter()
    with av.open(str(path), "w", format=enc["container"]) as container:
        stream = container.add_stream(enc["codec"], rate=enc["rate"], options=dict(enc["options"]))
        stream.width, stream.height, stream.pix_fmt = w, h, enc["pix_fmt"]
        stream.gop_size = int(enc["options"]["g"])
        for array in video_frames(n, FRAME_SIZE):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = {"path": str(path), "frames": n, "bytes": path.stat().st_size, "encode_s": time.perf_counter() - t0,
            "kib_per_frame": path.stat().st_size / n / 1024,
            "mbit_s": path.stat().st_size * 8 * enc["rate"] / n / 1e6, **describe_video(path)}
    marker.write_text(json.dumps(info))
    print(f"  encoded {path.name}: {n} frames, {info['bytes'] / 2**20:.1f} MiB ({info['mbit_s']:.2f} Mbit/s at "
          f"{enc['rate']} fps), {info['keyframes']} keyframes, in {info['encode_s']:.0f} s", flush=True)
    return info


def describe_video(path: Path) -> dict:
    """What segray's planning sees: frames, keyframes, and B-frames (frames out of decode order)."""
    import av

    from segray import video

    index = video.index_video(str(path))
    with av.open(str(path)) as c:
        dts_order = [p.pts for p in c.demux(c.streams.video[0]) if p.size]
    reordered = sum(1 for a, b in zip(dts_order, dts_order[1:]) if b < a)
    return {"indexed_frames": index.frames, "keyframes": len(index.keyframes), "exact": index.exact,
            "packets_out_of_order": reordered}


def ranges_of(path: str, frames_per_task: int) -> list[int]:
    from segray import video

    return [r.count for r in video.plan_ranges(video.index_video(path), frames_per_task)]


# ----------------------------------------------------------------------------- plain loops (own process)


def loop_one(job: dict) -> dict:
    """In this process: the plain PyAV decode-and-resize loop, or with ``full`` the job's whole
    per-frame work (decode, resize, model, mask back to size, PNG, Parquet) in one process."""
    import av
    import numpy as np

    from segray.preprocess import resize_image

    size = tuple(job["size"])
    if not job.get("full"):
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        with av.open(job["video"]) as container:
            stream = container.streams.video[0]
            if job["threads"] is not None:  # None: PyAV's defaults, as a user's loop would leave them
                stream.codec_context.thread_count = job["threads"]
            for frame in container.decode(stream):
                resize_image(frame.to_ndarray(format="rgb24"), size)
                n += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"frames": n, "seconds": wall, "fps": n / wall, "cpu_s": cpu, "cores_used": cpu / wall}

    import pyarrow as pa
    import torch

    from segray import modelio, predictions, predictor, storage

    t0 = time.perf_counter()
    torch.set_num_threads(job["torch_threads"])
    model, spec = modelio.load_model(job["model"], "cpu")
    model = model.to(memory_format=torch.channels_last)  # the job's CPU format
    load_s = time.perf_counter() - t0
    rows: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()

    def flush(batch: list) -> None:
        x = np.stack([b[0] for b in batch])
        with torch.inference_mode():
            preds = model(modelio.images_to_tensor(x, spec.mean, spec.std, torch.device("cpu"), channels_last=True))
            preds = preds.argmax(1).to(torch.uint8).numpy()
        for (_, h, w, k), pred in zip(batch, preds):
            r = predictor.finish_frame(pred, (h, w), spec.num_classes, spec.void_index, None)
            rows.append({"uri": f"{job['video']}#frame={k}", "height": h, "width": w, "mask_png": r.mask_png,
                         "class_pixel_counts": r.class_pixel_counts, "label_uri": None, "confusion": None,
                         "pixel_accuracy": None})

    batch: list = []
    with av.open(job["video"]) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for k, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            batch.append((resize_image(rgb, size), rgb.shape[0], rgb.shape[1], k))
            if len(batch) == job["batch"]:
                flush(batch)
                batch = []
    if batch:
        flush(batch)
    predictions.write_parquet(storage.join(job["output"], "predictions", "part-0.parquet"),
                              pa.Table.from_pylist(rows, schema=predictions.PREDICTIONS_SCHEMA))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"frames": len(rows), "seconds": wall, "fps": len(rows) / wall, "load_s": load_s,
            "fps_with_load": len(rows) / (wall + load_s), "cpu_s": cpu, "cores_used": cpu / wall}


def decode_one(job: dict) -> dict:
    """In this process, a driver on the bench's cluster: the job's first stages only, as
    segray.infer.run_pipeline builds them (plan_units, one unit per block, load_units), the
    frames counted where they were decoded: does decoding alone use the cores?"""
    from segray import frames, infer, runtime, sources, storage

    runtime.init_ray(quiet=True)  # the job's connection: the CPU workers' allocator settings
    import ray

    def once() -> tuple[int, float]:
        t0 = time.perf_counter()
        images = storage.normalize(job["images"])
        listing = sources.list_inputs(images)
        ds = ray.data.from_arrow(frames.listing_tables(listing))
        ds = ds.map_batches(frames.plan_units, fn_kwargs={"frames_per_task": job["frames_per_task"],
                                                          "images_root": images, "labels": None, "every": None,
                                                          "fps": None},
                            batch_size=None, batch_format="pyarrow", num_cpus=infer.PLAN_CPUS)
        ds = ds.repartition(target_num_rows_per_block=1)
        ds = ds.map_batches(frames.load_units, fn_kwargs={"size": tuple(job["size"]), "images_root": images,
                                                          "labels": None},
                            batch_size=None, batch_format="pyarrow")
        n = ds.count()
        return n, time.perf_counter() - t0

    # Twice in one driver: a job's first pass starts its Ray workers (a new job's workers, with
    # the job's runtime environment, are new processes); the second finds them started.
    n, cold = once()
    n2, warm = once()
    return {"frames": n, "seconds": cold, "fps": n / cold, "seconds_warm": warm, "fps_warm": n2 / warm}


def run_decode(images: str, frames_per_task: int, size: tuple[int, int], address: str) -> dict:
    with StageSampler() as sampler:
        r = benchlib.run_cmd([sys.executable, __file__, "--decode-one", json.dumps(
            {"images": images, "frames_per_task": frames_per_task, "size": list(size)})],
            env=benchlib.job_env(address), timeout=1800)
    docs = benchlib.parse_json_lines(r.out)
    if r.rc != 0 or not docs:
        raise RuntimeError(f"decode-only pipeline over {images} failed (exit {r.rc}):\n{r.out[-3000:]}")
    row = docs[-1]["result"]
    row.update(sampler.summary(), profile=sampler.profile(), cpu_s=sum(sampler.cpu.values()))
    row["cpu_ms_per_frame"] = 1000 * row["cpu_s"] / max(2 * row["frames"], 1)  # both passes
    return row


def run_loop(job: dict) -> dict:
    env = benchlib.malloc_env("thresholds")  # what segray's CPU workers run with
    r = benchlib.run_cmd([sys.executable, __file__, "--loop-one", json.dumps(job)], env=env, timeout=1800)
    docs = benchlib.parse_json_lines(r.out)
    if r.rc != 0 or not docs:
        raise RuntimeError(f"loop {job} failed (exit {r.rc}):\n{r.out[-3000:]}")
    return docs[-1]["result"]


# ----------------------------------------------------------------------------- the job, profiled


def _stage(title: str) -> str:
    """A process's title -> its stage: Ray workers retitle themselves ``ray::<what runs>``."""
    if title.startswith("ray::"):
        return title.split(" ")[0][:90]
    if "jobs/infer.py" in title:
        return "driver (jobs/infer.py: Ray Data's executor)"
    if "--decode-one" in title:
        return "driver (decode-only pipeline)"
    if "default_worker.py" in title or "setup_worker.py" in title:
        return "Ray worker start-up (before its first task)"
    exe = title.split(" ")[0]
    return os.path.basename(exe) if exe else "?"


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/PID/status in KiB (VmHWM: peak RSS; RssAnon: private heap; RssShmem:
    shared memory, i.e. the object store's pages this process touched)."""
    out = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


LOAD_STAGE = "load_units"


class StageSampler:
    """Every ``interval`` s, over every descendant process (the cluster and the job):

    - each process's CPU seconds since the last sample, given to the stage its title names now
      (the profile); and how many processes were decoding (title with load_units, more than
      30 % of a core) at once;
    - the summed RssAnon (private memory: heaps, no shared libraries, no object store);
    - of each process the run started, its VmHWM (the kernel's peak RSS) and peak RssAnon."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.root = os.getpid()
        self.cpu: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.hwm: dict[int, tuple[int, str]] = {}  # pid -> (VmHWM KiB, its stage)
        self.anon: dict[int, tuple[int, str]] = {}  # pid -> (peak RssAnon KiB, its stage)
        self.peak_anon_kib = 0
        self.decoding: list[int] = []  # per sample: processes decoding
        self._last: dict[int, float] = {}
        self._stages: dict[int, str] = {}
        self._initial: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def sample(self) -> None:
        now = time.perf_counter() - self._t0
        anon_total = decoding = 0
        for pid in benchlib.descendants(self.root):
            c = benchlib.cpu_seconds(pid)
            if c is None:
                continue
            stage = _stage(benchlib.cmdline(pid))
            if stage != "ray::IDLE":
                self._stages[pid] = stage
            before = self._last.get(pid, c if pid in self._initial else 0.0)
            self._last[pid] = c
            used = c - before
            if used > 0:
                self.cpu[stage] = self.cpu.get(stage, 0.0) + used
                if used > 0.02:
                    self.first.setdefault(stage, now - self.interval)
                    self.last[stage] = now
                if LOAD_STAGE in stage and used > 0.3 * self.interval:
                    decoding += 1
            mem = _status_kib(pid, ("VmHWM", "RssAnon"))
            anon_total += mem["RssAnon"]
            if pid not in self._initial:
                named = self._stages.get(pid, stage)
                if mem["VmHWM"] >= self.hwm.get(pid, (0, ""))[0]:
                    self.hwm[pid] = (mem["VmHWM"], named)
                if mem["RssAnon"] >= self.anon.get(pid, (0, ""))[0]:
                    self.anon[pid] = (mem["RssAnon"], named)
        self.peak_anon_kib = max(self.peak_anon_kib, anon_total)
        self.decoding.append(decoding)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> StageSampler:
        self._t0 = time.perf_counter()
        self._initial = set(benchlib.descendants(self.root))
        for pid in self._initial:
            c = benchlib.cpu_seconds(pid)
            if c is not None:
                self._last[pid] = c
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()

    def profile(self, top: int = 9) -> list[dict]:
        """The stages by CPU seconds: from..to (s after the start) their processes used CPU, and
        the cores they used on average over that span."""
        out = []
        for stage, s in sorted(self.cpu.items(), key=lambda kv: -kv[1])[:top]:
            first, last = self.first.get(stage), self.last.get(stage)
            span = (last - first) if first is not None else 0
            out.append({"stage": stage, "cpu_s": s, "from_s": first, "to_s": last,
                        "cores": s / span if span >= 1 else None})
        return out

    def summary(self) -> dict:
        hwm = max(self.hwm.values(), default=(0, ""))
        anon = max(self.anon.values(), default=(0, ""))
        busy = [d for d in self.decoding if d]
        by_stage: dict[str, float] = {}
        for kib, stage in self.anon.values():
            by_stage[stage] = max(by_stage.get(stage, 0.0), kib / 1024)
        return {"process_anon_by_stage_mib": by_stage,"max_process_hwm_mib": hwm[0] / 1024, "max_process_hwm_stage": hwm[1],
                "max_process_anon_mib": anon[0] / 1024, "max_process_anon_stage": anon[1],
                "peak_anon_mib": self.peak_anon_kib / 1024,
                "decoding_max": max(self.decoding, default=0),
                "decoding_mean": sum(busy) / len(busy) if busy else None,
                "decoding_s": len(busy) * self.interval}


def run_job(images: str, tag: str, inp: infer_bench.Inputs, model: str, address: str, frames_per_task: int,
            rows_per_file: int, expect: int) -> dict:
    """One jobs/infer.py run (infer_bench.run_e2e: frames/s as the job reports it, summed
    PSS/RSS of the cluster), profiled by stage; its output is deleted afterwards."""
    output = inp.output(tag, "local")
    with StageSampler() as sampler:
        row = infer_bench.run_e2e("ray", images, output, model, address, None, benchlib.machine().cores,
                                  extra=["--frames-per-task", str(frames_per_task),
                                         "--rows-per-file", str(rows_per_file)])
    shutil.rmtree(output, ignore_errors=True)
    row.pop("cpu_by_process", None)
    row.update(sampler.summary(), profile=sampler.profile())
    if row["frames"] != expect:
        raise RuntimeError(f"{tag}: the job handled {row['frames']} inputs, expected {expect}")
    row["cpu_ms_per_frame"] = 1000 * row["cpu_s"] / row["frames"]
    return row


# ----------------------------------------------------------------------------- main


MEASUREMENTS = ("archive", "files", "loop", "loop-default", "video", "video-one-range", "decode", "decode-one-range",
                "plain-full", "video-long")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=2000,
                   help="frames of the archive, of the files and of the video (default %(default)s)")
    p.add_argument("--long-frames", type=int, default=None, help="frames of the long video of the memory "
                   "comparison (default 2 x --frames)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every measurement (default %(default)s)")
    p.add_argument("--what", default="archive,video,decode,memory",
                   help="archive (tar vs files), video (job vs loops, one range, plain-full), decode (the job's "
                   "planning and decoding stages alone, ranges and one range), memory (long video); default all")
    p.add_argument("--num-cpus", type=int, default=3,
                   help="logical CPUs of the Ray cluster (default %(default)s: the replica's 1 and 2 for decode tasks)")
    p.add_argument("--frames-per-task", type=int, default=500, help="the job's --frames-per-task (default %(default)s)")
    p.add_argument("--rows-per-file", type=int, default=1000, help="the job's --rows-per-file (default %(default)s)")
    p.add_argument("--gop", type=int, default=50, help="x264 keyframe interval, frames (default %(default)s)")
    p.add_argument("--bframes", type=int, default=3, help="x264 B-frames (default %(default)s)")
    p.add_argument("--preset", default="veryfast", help="x264 preset (default %(default)s)")
    p.add_argument("--crf", type=int, default=18, help="x264 constant rate factor (default %(default)s)")
    p.add_argument("--rate", type=int, default=30, help="frames per second of the video (default %(default)s)")
    p.add_argument("--workdir", default="/tmp/segray-video-bench", help="temporary data (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep --workdir (frames, videos, model) for a rerun")
    p.add_argument("--out", default="/tmp/segray-video-bench.json", help="JSON results (default %(default)s)")
    p.add_argument("--loop-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loop_one:
        print(benchlib.JSON_PREFIX + json.dumps({"result": loop_one(json.loads(args.loop_one))}), flush=True)
        return 0
    if args.decode_one:
        print(benchlib.JSON_PREFIX + json.dumps({"result": decode_one(json.loads(args.decode_one))}), flush=True)
        return 0
    what = set(args.what.split(","))
    if what - {"archive", "video", "decode", "memory"} or args.frames < 1 or args.repeats < 1:
        p.error("--what is a list of archive, video, decode, memory; --frames and --repeats are positive")
    n, n_long = args.frames, args.long_frames or 2 * args.frames
    m = benchlib.machine()
    cores = m.cores
    workdir = Path(args.workdir)
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    print(f"machine: {m.describe()}; load average {os.getloadavg()}", flush=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    try:
        inp = infer_bench.Inputs(workdir, False)
        model = inp.model(MODEL)
        _, size = infer_bench.MODELS[MODEL]
        enc = encoder_settings(args)
        inputs: dict[str, str] = {}
        videos: dict[str, dict] = {}
        if "archive" in what:
            inputs["files"] = inp.frames("files", n)
            inputs["archive"] = infer_bench.Inputs(workdir, False, per_archive=n).frames("tar", n)
        if what & {"video", "decode", "memory"}:
            (workdir / "videos").mkdir(exist_ok=True)
            videos["video"] = make_video(workdir / "videos" / f"clip-{n}.mp4", n, enc)
            inputs["video"] = videos["video"]["path"]
        if "memory" in what:
            videos["video-long"] = make_video(workdir / "videos" / f"clip-{n_long}.mp4", n_long, enc)
            inputs["video-long"] = videos["video-long"]["path"]
        for key, v in videos.items():
            v["ranges"] = ranges_of(v["path"], args.frames_per_task)
            print(f"  {key}: {v['indexed_frames']} frames, {v['keyframes']} keyframes, "
                  f"{v['packets_out_of_order']} packets out of presentation order (B-frames); "
                  f"--frames-per-task {args.frames_per_task}: ranges of {v['ranges']} frames", flush=True)

        plan = [k for k in MEASUREMENTS if (k in ("archive", "files") and "archive" in what)
                or (k in ("loop", "loop-default", "video", "video-one-range", "plain-full") and "video" in what)
                or (k in ("decode", "decode-one-range") and "decode" in what)
                or (k == "video-long" and "memory" in what)]
        if "memory" in what and "video" not in what:
            plan.insert(0, "video")
        runs: list[dict] = []
        with benchlib.local_ray(args.num_cpus) as address:
            print(f"Ray cluster: num_cpus={args.num_cpus} on {cores} cores; jobs: 1 replica x 1 CPU, "
                  f"--frames-per-task {args.frames_per_task}", flush=True)
            for rnd in range(1, args.repeats + 1):
                order = plan if rnd % 2 else plan[::-1]
                for k in order:
                    t0 = time.perf_counter()
                    if k in ("loop", "loop-default"):
                        row = run_loop({"video": inputs["video"], "size": list(size),
                                        "threads": 1 if k == "loop" else None})
                    elif k in ("decode", "decode-one-range"):
                        row = run_decode(inputs["video"], ONE_RANGE if k == "decode-one-range" else args.frames_per_task,
                                         size, address)
                    elif k == "plain-full":
                        out = inp.output("plain-full", "local")
                        row = run_loop({"video": inputs["video"], "size": list(size), "full": True, "model": model,
                                        "torch_threads": cores, "batch": infer_bench.MODEL_BATCH[MODEL],
                                        "output": out})
                        shutil.rmtree(out, ignore_errors=True)
                    else:
                        images = inputs[k if k != "video-one-range" else "video"]
                        fpt = ONE_RANGE if k == "video-one-range" else args.frames_per_task
                        row = run_job(images, k, inp, model, address, fpt, args.rows_per_file,
                                      n_long if k == "video-long" else n)
                    row.update(round=rnd, what=k)
                    runs.append(row)
                    extra = (f", peak PSS {row['peak_pss_mib']:.0f} MiB, RssAnon {row['peak_anon_mib']:.0f} MiB, "
                             f"process max {row['max_process_hwm_mib']:.0f} MiB, {row['cpu_ms_per_frame']:.0f} "
                             f"CPU-ms/frame, decoding processes at once: mean {row['decoding_mean'] or 0:.2f}"
                             if "peak_pss_mib" in row else
                             f", {row['cpu_ms_per_frame']:.0f} CPU-ms/frame; warm {row['fps_warm']:.1f} frames/s; "
                             f"decoding processes at once: mean {row['decoding_mean'] or 0:.2f}, max "
                             f"{row['decoding_max']}" if "fps_warm" in row else
                             f", {row['cores_used']:.2f} cores")
                    row["load_avg"] = os.getloadavg()[0]
                    print(f"  [round {rnd}] {k:16s} {row['frames']:5d} frames {row['fps']:7.1f} frames/s "
                          f"({row['seconds']:.1f} s{extra}) [{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    # ------------------------------------------------------------------ ratios per round, medians
    def get(rnd: int, k: str, field: str = "fps") -> float | None:
        row = next((r for r in runs if r["round"] == rnd and r["what"] == k), None)
        return row.get(field) if row else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    rounds = []
    for rnd in range(1, args.repeats + 1):
        t_n, t_long = get(rnd, "video", "seconds"), get(rnd, "video-long", "seconds")
        steady = (n_long - n) / (t_long - t_n) if t_n and t_long and t_long > t_n else None
        rounds.append({
            "round": rnd,
            "archive/files": ratio(get(rnd, "archive"), get(rnd, "files")),
            "video job/loop": ratio(get(rnd, "video"), get(rnd, "loop")),
            "video job/loop (PyAV default threads)": ratio(get(rnd, "video"), get(rnd, "loop-default")),
            "video job steady fps": steady,
            "video job steady/loop": ratio(steady, get(rnd, "loop")),
            "video ranges/one range": ratio(get(rnd, "video"), get(rnd, "video-one-range")),
            "video job/plain-full": ratio(get(rnd, "video"), get(rnd, "plain-full")),
            "decode stages/loop": ratio(get(rnd, "decode"), get(rnd, "loop")),
            "decode stages ranges/one range": ratio(get(rnd, "decode"), get(rnd, "decode-one-range")),
            "decode stages, warm/loop": ratio(get(rnd, "decode", "fps_warm"), get(rnd, "loop")),
            "decode stages, warm: ranges/one range": ratio(get(rnd, "decode", "fps_warm"),
                                                           get(rnd, "decode-one-range", "fps_warm")),
            "memory 2N/N peak PSS": ratio(get(rnd, "video-long", "peak_pss_mib"), get(rnd, "video", "peak_pss_mib")),
            "memory 2N/N peak RSS": ratio(get(rnd, "video-long", "peak_rss_mib"), get(rnd, "video", "peak_rss_mib")),
            "memory 2N/N process max": ratio(get(rnd, "video-long", "max_process_hwm_mib"),
                                             get(rnd, "video", "max_process_hwm_mib")),
            "memory 2N/N summed RssAnon": ratio(get(rnd, "video-long", "peak_anon_mib"),
                                                get(rnd, "video", "peak_anon_mib")),
            "memory 2N/N process max RssAnon": ratio(get(rnd, "video-long", "max_process_anon_mib"),
                                                     get(rnd, "video", "max_process_anon_mib")),
        })
    keys = [k for k in rounds[0] if k != "round" and any(r[k] is not None for r in rounds)]
    medians = {k: benchlib.median(r[k] for r in rounds if r[k] is not None) for k in keys}

    per_what = []
    for k in MEASUREMENTS:
        rows = [r for r in runs if r["what"] == k]
        if not rows:
            continue

        def med(field: str) -> float | None:
            vals = [r[field] for r in rows if r.get(field) is not None]
            return benchlib.median(vals) if vals else None

        per_what.append({"what": k, "frames": rows[0]["frames"], "runs": len(rows), "fps": med("fps"),
                         "fps_warm": med("fps_warm"), "seconds": med("seconds"), "cpu_ms_frame": med("cpu_ms_per_frame"),
                         "cores_used": med("cores_used"), "decoding_mean": med("decoding_mean"),
                         "decoding_max": med("decoding_max"), "peak_pss_mib": med("peak_pss_mib"),
                         "peak_rss_mib": med("peak_rss_mib"), "idle_pss_mib": med("base_pss_mib"),
                         "peak_anon_mib": med("peak_anon_mib"), "proc_hwm_mib": med("max_process_hwm_mib"),
                         "proc_anon_mib": med("max_process_anon_mib")})
    benchlib.print_table(per_what, title=f"Medians over {args.repeats} round(s); jobs on ray.init(num_cpus="
                         f"{args.num_cpus}), {cores} cores; fps: the job's own summary (listing and start-up "
                         "included), the loops' over their decode loop")
    benchlib.print_table([{"ratio": k, **{f"round {r['round']}": r[k] for r in rounds}, "median": medians[k]}
                          for k in keys],
                         title="Ratios per round and their median (targets: archive/files >= 0.9, video job/loop "
                         ">= 1.6, memory 2N/N ~ 1)")
    for r in runs:
        if r["round"] == 1 and r.get("profile"):
            passes = " (two passes: cold, warm)" if r["what"].startswith("decode") else ""
            print(f"\nCPU by stage, {r['what']}{passes} (round 1, {r['frames']} frames, {r['seconds']:.1f} s, "
                  f"{r['cpu_s']:.0f} CPU-s in all; decoding processes at once: mean {r.get('decoding_mean') or 0:.2f}, "
                  f"max {r.get('decoding_max')}): CPU-s, active from..to (s after the start), mean cores over it")
            for s in r["profile"]:
                cores_busy = f"{s['cores']:.2f}" if s["cores"] is not None else "-"
                span = f"{s['from_s']:.0f}..{s['to_s']:.0f}" if s["from_s"] is not None else "-"
                print(f"  {s['cpu_s']:7.1f}  {span:>9s}  {cores_busy:>5s}  {s['stage']}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s; load average at the start {load_start}, at the end {os.getloadavg()}")
    doc = {"args": vars(args), "machine": m.describe(), "date": benchlib.DATE,
           "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "total_s": total,
           "encoder": encoder_settings(args), "videos": videos, "summary": per_what, "rounds": rounds,
           "median_ratios": medians, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"JSON: {args.out}")
    benchlib.emit_json("video", {k: doc[k] for k in ("args", "encoder", "summary", "rounds", "median_ratios")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

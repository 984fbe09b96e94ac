"""What every bench script shares: the machine, tables and JSON lines, timers, process-tree
memory, a moto S3 server, an in-process local Ray cluster, synthetic frames and models.

Not a test helper and not part of the package: the bench scripts import it as ``benchlib``
(their own folder is on ``sys.path`` when run as ``python bench/NAME.py``).

Measurements on a shared machine: other processes take CPU time from us at random, so every
figure that is compared is measured in the same run as its baseline, interleaved where the
script can (A B A B ...), and reported as a ratio. ``cpu_share`` (process CPU seconds / wall
seconds / threads) says how much of the cores a measurement actually got.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATE = time.strftime("%Y-%m-%d", time.gmtime())  # UTC date of the run
BUCKET = "segray-bench"
JSON_PREFIX = "BENCH_JSON "

# Where the allocators live on Debian/Ubuntu (apt-get install libjemalloc2 libtcmalloc-minimal4).
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD", "MALLOC_CONF")


# ----------------------------------------------------------------------------- the machine


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


@dataclass(frozen=True)
class Machine:
    """The CPU as the OS reports it, and the assumptions that turn it into a peak FLOP/s."""

    model: str
    cores: int  # CPUs the OS gives us (vCPUs)
    threads_per_core: int
    mhz: float  # /proc/cpuinfo "cpu MHz": the TSC / nominal clock a KVM guest sees
    flags: frozenset[str]
    mem_gib: float
    vendor: str = ""
    family: str = ""
    model_id: str = ""

    @property
    def simd(self) -> str:
        return "avx512" if "avx512f" in self.flags else "avx2" if "avx2" in self.flags else "sse"

    @property
    def fp32_lanes(self) -> int:
        return {"avx512": 16, "avx2": 8}.get(self.simd, 4)

    @property
    def fma_units(self) -> int:
        # Zen 2/3/4 and Intel since Haswell issue two 256-bit FMAs a cycle (assumed, not read:
        # no OS interface reports it). Without the fma flag, a multiply and an add are separate.
        return 2 if "fma" in self.flags else 1

    def peak_gflops(self, ghz: float | None = None, cores: int | None = None) -> float:
        """fp32 peak: cores x FMA units x lanes x 2 (multiply + add) x clock."""
        ghz = ghz if ghz is not None else self.mhz / 1000
        return (cores or self.cores) * self.fma_units * self.fp32_lanes * 2 * ghz

    def describe(self) -> str:
        return f"{self.cores}-vCPU VM, {self.model} (family {self.family} model {self.model_id}), {self.mem_gib:.0f} GiB"


def machine() -> Machine:
    info = _lscpu()
    flags: set[str] = set()
    mhz = 0.0
    model = info.get("Model name", "unknown CPU")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    mem = 0.0
    with contextlib.suppress(OSError, ValueError):
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    return Machine(
        model=model,
        cores=os.cpu_count() or 1,
        threads_per_core=int(info.get("Thread(s) per core", "1") or 1),
        mhz=mhz,
        flags=frozenset(flags),
        mem_gib=mem,
        vendor=info.get("Vendor ID", ""),
        family=info.get("CPU family", ""),
        model_id=info.get("Model", ""),
    )


# ----------------------------------------------------------------------------- output


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> None:
    """Rows of dicts as an aligned text table (floats to 3 significant digits)."""
    if not rows:
        return
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def emit_json(bench: str, payload: dict[str, Any]) -> None:
    """One machine-readable line: ``BENCH_JSON {...}``."""
    m = machine()
    doc = {"bench": bench, "date": DATE, "machine": m.describe(), "load_avg": os.getloadavg(), **payload}
    print(JSON_PREFIX + json.dumps(doc, default=str), flush=True)


def parse_json_lines(text: str) -> list[dict]:
    return [json.loads(line[len(JSON_PREFIX):]) for line in text.splitlines() if line.startswith(JSON_PREFIX)]


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    wall_s: float
    cpu_s: float  # this process's user + system CPU seconds (all its threads)

    def share(self, threads: int) -> float:
        """Fraction of ``threads`` cores this measurement got (1.0: never descheduled)."""
        return self.cpu_s / self.wall_s / max(threads, 1) if self.wall_s > 0 else float("nan")


@contextlib.contextmanager
def timed() -> Iterator[Timing]:
    t = Timing(0.0, 0.0)
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t.wall_s, t.cpu_s = time.perf_counter() - w0, time.process_time() - c0


def children_cpu_s() -> float:
    r = os.times()
    return r.children_user + r.children_system


# ----------------------------------------------------------------------------- env and commands


def malloc_env(kind: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment with one allocator setting: glibc (defaults), thresholds (segray's
    CPU_MALLOC_ENV), jemalloc, tcmalloc. Other MALLOC_* / LD_PRELOAD variables are removed."""
    from segray.runtime import CPU_MALLOC_ENV

    env = {k: v for k, v in (base or os.environ).items() if k not in MALLOC_VARS}
    if kind == "glibc":
        pass
    elif kind == "thresholds":
        env.update(CPU_MALLOC_ENV)
    elif kind == "jemalloc":
        if not os.path.exists(JEMALLOC):
            raise FileNotFoundError(f"{JEMALLOC} not found; apt-get install libjemalloc2")
        env["LD_PRELOAD"] = JEMALLOC
        # Keep freed pages a while (PyTorch frees and re-allocates the same sizes every step).
        env["MALLOC_CONF"] = "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:10000"
    elif kind == "tcmalloc":
        if not os.path.exists(TCMALLOC):
            raise FileNotFoundError(f"{TCMALLOC} not found; apt-get install libtcmalloc-minimal4")
        env["LD_PRELOAD"] = TCMALLOC
    else:
        raise ValueError(f"unknown malloc setting {kind!r}; valid: glibc, thresholds, jemalloc, tcmalloc")
    return env


@dataclass
class CmdResult:
    rc: int
    out: str
    wall_s: float
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        rx = re.compile(pattern)
        for t, line in self.lines:
            m = rx.search(line)
            if m:
                return t, m
        return None


def run_cmd(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 900, echo: bool = False,
            cwd: Path = REPO) -> CmdResult:
    """Run a command, stdout and stderr merged, each line time-stamped as it arrives."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if echo:
                print("    | " + line.rstrip("\n"), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -9
    reader.join(timeout=10)
    return CmdResult(rc, "\n".join(line for _, line in lines), time.perf_counter() - start, lines)


def check(result: CmdResult, what: str) -> CmdResult:
    if result.rc != 0:
        raise RuntimeError(f"{what} failed (exit {result.rc}):\n{result.out[-4000:]}")
    return result


# ----------------------------------------------------------------------------- memory of a process tree


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ')'.
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        for k in kids.get(pid, []):
            out.append(k)
            todo.append(k)
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS splits shared pages (the object store's /dev/shm) between users."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class TreeMonitor:
    """Samples every descendant of ``root`` (the bench process's Ray cluster and job subprocesses;
    the bench process itself, which hosts moto, is left out): summed RSS and PSS, and the CPU
    seconds each process used while monitored (the last sample of a process that exits between
    samples is its last count; ``interval`` bounds what is lost)."""

    def __init__(self, root: int | None = None, interval: float = 1.0, new_only: bool = False) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        # new_only: only processes started after __enter__ (a plain script next to an idle cluster).
        self.new_only = new_only
        self._initial: set[int] = set()
        self.samples: list[tuple[float, int, int, int]] = []  # (t, processes, rss KiB, pss KiB)
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._series: dict[int, list[tuple[float, float]]] = {}  # pid -> (t, CPU seconds) samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self._started = False

    def sample(self) -> None:
        pids = [p for p in descendants(self.root) if p not in self._initial]
        rss = pss = 0
        for pid in pids:
            r, p = _mem_kib(pid)
            rss, pss = rss + r, pss + p
            c = cpu_seconds(pid)
            if c is not None:
                self._series.setdefault(pid, []).append((time.perf_counter() - self._t0, c))
                # A process first seen after the start began at 0 CPU seconds.
                self._cpu_first.setdefault(pid, c if not self._started else 0.0)
                self._cpu_last[pid] = c
                if pid not in self.names:
                    self.names[pid] = cmdline(pid)[:120]
        self.samples.append((time.perf_counter() - self._t0, len(pids), rss, pss))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._started = True
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMonitor:
        self._t0 = time.perf_counter()
        if self.new_only:
            self._initial = set(descendants(self.root))
        self.sample()
        self._started = True
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()
        for pid in self.names:  # Ray workers retitle themselves (ray::...) after they start
            title = cmdline(pid)
            if title:
                self.names[pid] = title[:120]

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu_last[p] - self._cpu_first.get(p, 0.0) for p in self._cpu_last)

    def cpu_by_process(self, top: int = 8) -> list[tuple[str, float]]:
        used = {p: self._cpu_last[p] - self._cpu_first.get(p, 0.0) for p in self._cpu_last}
        return [(self.names.get(p, str(p)), s) for p, s in sorted(used.items(), key=lambda kv: -kv[1])[:top]]

    def cpu_between(self, t0: float, t1: float, top: int = 8) -> list[tuple[str, float]]:
        """CPU seconds of each process between ``t0`` and ``t1`` (seconds since __enter__, to the
        nearest samples), largest first: the steady state of a run, without its start-up."""
        used = {}
        for pid, series in self._series.items():
            before = [c for t, c in series if t <= t0]
            inside = [c for t, c in series if t <= t1]
            if inside:
                used[pid] = inside[-1] - (before[-1] if before else 0.0)
        return [(self.names.get(p, str(p)), s) for p, s in sorted(used.items(), key=lambda kv: -kv[1])[:top]]

    @property
    def peak_pss_mib(self) -> float:
        return max((s[3] for s in self.samples), default=0) / 1024

    @property
    def peak_rss_mib(self) -> float:
        return max((s[2] for s in self.samples), default=0) / 1024

    @property
    def base_pss_mib(self) -> float:
        return self.samples[0][3] / 1024 if self.samples else 0.0


# ----------------------------------------------------------------------------- moto S3 and local Ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (a thread of this process); AWS_* point at it meanwhile.

    Start it before the Ray cluster: Ray workers inherit the raylet's environment."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_ray(num_cpus: int, cores: Sequence[int] | None = None) -> Iterator[str]:
    """A Ray cluster of this process only (never ``ray start``: that would stop other people's
    clusters on a shared machine). ``cores``: pin this process, hence the cluster it starts,
    to those CPUs. Yields the GCS address, for ``RAY_ADDRESS`` of job subprocesses."""
    import logging

    import ray

    saved = os.sched_getaffinity(0)
    if cores is not None:
        os.sched_setaffinity(0, set(cores))
    os.environ.pop("RAY_ADDRESS", None)
    try:
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                       configure_logging=True, log_to_driver=False)
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()
    finally:
        os.sched_setaffinity(0, saved)


def taskset(cores: Sequence[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores))] if cores else []


# ----------------------------------------------------------------------------- synthetic inputs


def export_model(dest: str, base_channels: int, size: tuple[int, int], depth: int = 4, seed: int = 0) -> str:
    """An exported model (modelio) with random weights: speed does not depend on the weights."""
    import torch

    from segray.model import DEFAULT_ARCH, network_config, build_model
    from segray.modelio import ModelSpec, save_model

    torch.manual_seed(seed)
    cfg = network_config(DEFAULT_ARCH, {"base_channels": base_channels, "depth": depth})
    save_model(dest, build_model(cfg).state_dict(), ModelSpec(model=cfg.to_dict(), input_height=size[0],
                                                               input_width=size[1]))
    return dest


def frame_bytes(n_unique: int, size: tuple[int, int], fmt: str = "PNG", seed: int = 0) -> list[bytes]:
    """``n_unique`` synthetic street scenes encoded as ``fmt`` (default PIL settings)."""
    import numpy as np
    from PIL import Image

    from segray.synthetic import render_scene

    out = []
    for i in range(n_unique):
        image, _ = render_scene(np.random.default_rng([seed, i]), *size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def write_frames(dest: str, n: int, size: tuple[int, int], per_archive: int = 0, n_unique: int = 32,
                 fmt: str = "PNG", threads: int = 8) -> int:
    """``n`` frames below ``dest`` (a local path or s3://): ``seqNN/frame_NNNNNN.png`` files, or
    with ``per_archive`` > 0 ``.tar`` archives of that many frames each. The ``n_unique`` scenes
    repeat: decoding a repeated PNG costs what decoding a new one does. Returns bytes written."""
    from concurrent.futures import ThreadPoolExecutor

    from segray import storage

    frames = frame_bytes(n_unique, size, fmt)
    ext = ".png" if fmt.upper() == "PNG" else ".jpg"
    jobs: list[tuple[str, bytes]] = []
    if per_archive:
        for a, start in enumerate(range(0, n, per_archive)):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i in range(start, min(n, start + per_archive)):
                    data = frames[i % n_unique]
                    info = tarfile.TarInfo(f"frame_{i:06d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            jobs.append((storage.join(dest, f"shard_{a:05d}.tar"), buf.getvalue()))
    else:
        jobs = [(storage.join(dest, f"seq{i // 1000:02d}", f"frame_{i:06d}{ext}"), frames[i % n_unique])
                for i in range(n)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda j: storage.write_bytes(*j), jobs))
    return sum(len(d) for _, d in jobs)


def job_env(address: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    if address:
        env["RAY_ADDRESS"] = address
    return env


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


def loop(fn: Callable[[], Any], seconds: float, min_iters: int = 2, warmup: int = 1) -> tuple[int, Timing]:
    """Call ``fn`` for about ``seconds`` after ``warmup`` calls; (calls, their timing)."""
    for _ in range(warmup):
        fn()
    calls = 0
    with timed() as t:
        start = time.perf_counter()
        while calls < min_iters or time.perf_counter() - start < seconds:
            fn()
            calls += 1
    return calls, t


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1, max_seconds: float | None = None) -> list[Timing]:
    """Time ``repeats`` calls of ``fn`` one by one (after ``warmup`` untimed calls).

    On a shared machine the fastest call is the best estimate of the uncontended speed (others
    only ever add time); the median says what a typical call got."""
    for _ in range(warmup):
        fn()
    out: list[Timing] = []
    start = time.perf_counter()
    for _ in range(repeats):
        with timed() as t:
            fn()
        out.append(t)
        if max_seconds is not None and time.perf_counter() - start > max_seconds and len(out) >= 2:
            break
    return out


def best_and_median(times: Sequence[Timing]) -> tuple[Timing, float]:
    best = min(times, key=lambda t: t.wall_s)
    return best, median(t.wall_s for t in times)


def pyspy_record(match: str, seconds: int, out: Path, root: int | None = None, delay: float = 0.0,
                 stop: threading.Event | None = None, timeout: float = 600) -> threading.Thread:
    """In a thread: wait ``delay`` s, then py-spy the first descendant of ``root`` whose command
    line contains ``match`` for ``seconds`` (raw collapsed stacks into ``out``)."""
    root = root or os.getpid()
    stop = stop or threading.Event()

    def run() -> None:
        if stop.wait(delay):
            return
        deadline = time.time() + timeout
        while not stop.is_set() and time.time() < deadline:
            for pid in descendants(root):
                if match in cmdline(pid):
                    subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50",
                                    "--format", "raw", "--output", str(out), "--nonblocking"],
                                   capture_output=True, timeout=seconds + 60)
                    return
            time.sleep(0.5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def leaf_shares(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """py-spy raw (collapsed) stacks -> the share of samples per leaf function, largest first."""
    if not path.exists():
        return []
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.split(";")[-1] or "<native code / waiting>"
        leaf = re.sub(r"\s*\(.*?:\d+\)", lambda m: m.group(0).split(":")[0] + ")", leaf)
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
        total += int(count)
    return [(k, v / total) for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]] if total else []

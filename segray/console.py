"""What a person sees while a job runs: segray's own lines, one progress display per stage, and
none of Ray's internal chatter (``--verbose`` shows everything, as Ray prints it).

Two parts:

- :func:`job_output` filters the job's standard output and error at the file-descriptor level
  (so that lines printed by Ray's C++ core and the lines Ray forwards from workers pass through
  it too): Ray's INFO/WARNING log lines and a list of known-harmless messages are dropped, the
  ``(RayTrainWorker pid=...)`` prefix is taken off segray's own lines, everything else is kept
  (errors above all). It only changes what is shown, never what a job does.
- :class:`Progress` counts one stage's work against an exact total: a live tqdm bar on a
  terminal, a plain line every :data:`PROGRESS_INTERVAL_ENV` seconds (and at the end) anywhere
  else (CI, ``ray job logs``). Tasks and training workers report into it through a small Ray
  actor (:func:`report`), so the driver shows what the cluster did.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import Any

VERBOSE_ENV = "SEGRAY_VERBOSE"  # "1": show everything (set by --verbose)
PROGRESS_INTERVAL_ENV = "SEGRAY_PROGRESS_INTERVAL"  # seconds between progress lines off a terminal
DEFAULT_INTERVAL_S = 30.0
POLL_S = 0.5  # how often the driver asks the cluster for progress

STAGES = ("prepare", "train", "infer", "evaluate", "demo")
# "(RayTrainWorker pid=123, ip=10.0.0.2) ", possibly coloured: the prefix of a line Ray forwards from a worker.
_RAY_PREFIX = re.compile(rb"^(?:\x1b\[[0-9;]*m)?\([^()\n]*?(?:pid=\d+|raylet|autoscaler[^)]*)[^()\n]*\)(?:\x1b\[[0-9;]*m)? ?")
_SEGRAY_LINE = re.compile(rb"^(?:" + b"|".join(s.encode() for s in STAGES) + rb"): ")
# Dropped unless --verbose: Ray's own INFO/WARNING lines, and messages known to be harmless here.
NOISE = tuple(
    re.compile(p)
    for p in (
        rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:DEBUG|INFO|WARNING) ",  # Ray's Python log format
        rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIW] \d+ \d+\] ",  # Ray's C++ (glog) INFO/WARNING
        rb"has constructor arguments in the object store and max_restarts > 0",  # ray#53727
        rb"^Reporting training result \d+: ",  # Ray Train, once per rank per epoch, whatever LoggingConfig says
        rb"^(?:Starting execution of|Execution plan of|Registered dataset logger for) [Dd]ataset",
        rb"Dataset \S+ execution finished in ",
        rb"A new progress UI is available",
        rb"^Data sink \S+ finished\.",
        rb"tqdm is not installed",
        rb"The Dataset job will hang unless more CPUs are freed up",
        rb"Ray deduplicates logs by default",
        rb"Tip: use `ray status` to view detailed cluster status",
        rb"^Progress bars disabled\. To enable, set",
        # abseil's lock diagnostics from a Ray worker exiting idle after its tasks (seen with Ray 2.60
        # on 2 cores, no task or row lost); a task that fails is reported by Ray on its own.
        rb"\[mutex\.cc : \d+\] RAW: (?:Lock blocking|Mutex corrupt)",
    )
)
# Ray's own actors whose every line is dropped: PlacementGroupCleaner's monitor thread dies with
# "Found multiple active Ray instances" where several local clusters share a machine (it looks
# the cluster up without its address); the training it watches is not affected.
_QUIET_ACTORS = re.compile(rb"^(?:\x1b\[[0-9;]*m)?\((?:PlacementGroupCleaner) pid=")
# A Python warning raised inside Ray's own code ("<path>/ray/...: SomeWarning: ..."); the
# indented source line that warnings print after it goes too.
_RAY_WARNING = re.compile(rb"/site-packages/ray/\S+:\d+: \w*Warning: ")

_lock = threading.RLock()  # one writer at a time on the terminal: lines and the bar


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class LineFilter:
    """Bytes in, the lines to show out (see the module docstring); one per stream."""

    def __init__(self) -> None:
        self._partial = b""
        self._skip_source_line = False

    def feed(self, data: bytes) -> bytes:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return b"".join(line + b"\n" for line in lines if self._keep(line))

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest if rest and self._keep(rest) else b""

    def _keep(self, line: bytes) -> bool:
        if _QUIET_ACTORS.match(line):
            return False
        body = _RAY_PREFIX.sub(b"", line.rstrip(b"\r"), count=1)
        if self._skip_source_line:
            self._skip_source_line = False
            if body.startswith(b"  "):
                return False
        if _RAY_WARNING.search(body):
            self._skip_source_line = True
            return False
        return not any(p.search(body) for p in NOISE)

    @staticmethod
    def tidy(line: bytes) -> bytes:
        """A segray line forwarded from a worker, without Ray's ``(... pid=...)`` prefix."""
        body = _RAY_PREFIX.sub(b"", line, count=1)
        return body if _SEGRAY_LINE.match(body) else line


class _Pump(threading.Thread):
    """Reads one redirected stream and writes what the filter keeps to the real one."""

    def __init__(self, read_fd: int, out_fd: int) -> None:
        super().__init__(daemon=True, name=f"segray-console-{out_fd}")
        self.read_fd, self.out_fd, self.filter = read_fd, out_fd, LineFilter()

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except OSError:
                break
            if not data:
                break
            self.busy = True
            self._write(self.filter.feed(data))
            self.busy = False
        self._write(self.filter.flush())

    busy = False

    def drained(self) -> bool:
        import fcntl
        import struct
        import termios

        try:
            pending = struct.unpack("i", fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return True
        return pending == 0 and not self.busy

    def _write(self, data: bytes) -> None:
        if data:
            lines = data.split(b"\n")
            _write_lines(self.out_fd, b"\n".join(LineFilter.tidy(x) for x in lines))


def _write_lines(fd: int, data: bytes) -> None:
    with _lock:
        bars = [p for p in Progress.live if p.bar is not None]
        for p in bars:
            p.bar.clear()
        while data:
            try:
                data = data[os.write(fd, data):]
            except InterruptedError:
                continue
            except OSError:
                break
        for p in bars:
            p.bar.refresh()


_terminal: dict[str, Any] = {}  # while job_output is active: the real stderr, for the bars


@contextlib.contextmanager
def job_output(show_all: bool = False):
    """Filter this process's stdout and stderr (module docstring) until the block ends; with
    ``show_all`` (--verbose) nothing is filtered. Nests: an inner call changes nothing."""
    if show_all:
        before = os.environ.get(VERBOSE_ENV)
        os.environ[VERBOSE_ENV] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(VERBOSE_ENV, None)
            else:
                os.environ[VERBOSE_ENV] = before
        return
    if _terminal:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    pumps = []
    for fd in (1, 2):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        pump = _Pump(r, saved[fd])
        pump.start()
        pumps.append((pump, r))
    _terminal["fd"] = saved[2]
    _terminal["pumps"] = [p for p, _ in pumps]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)  # the pipes' last writers in this process are gone
        for (pump, r), fd in zip(pumps, (1, 2)):
            # A child process that inherited a pipe can keep it open: give up on it after a moment,
            # leaving its two descriptors open (a pump still running writes to the real stream).
            pump.join(timeout=2.0)
            if not pump.is_alive():
                os.close(r)
                os.close(saved[fd])
        _terminal.clear()


def _display_fd() -> int:
    return _terminal.get("fd", 2)


def _settle(timeout_s: float = 1.0) -> None:
    """Wait (briefly) until every line printed so far is on the screen: a bar drawn before the
    lines above it would end up among them."""
    sys.stdout.flush()
    sys.stderr.flush()
    deadline = time.monotonic() + timeout_s
    while not all(p.drained() for p in _terminal.get("pumps", ())) and time.monotonic() < deadline:
        time.sleep(0.01)


# ----------------------------------------------------------------------------- progress


class Progress:
    """One stage's progress, ``done`` of ``total`` ``unit``s (module docstring). ``handle`` is
    what tasks and workers report into (None when Ray is not connected)."""

    live: list[Progress] = []

    def __init__(self, stage: str, what: str, total: int, unit: str, initial: int = 0) -> None:
        self.stage, self.what, self.unit = stage, what, unit
        self.total, self.done, self.initial = int(total), int(initial), int(initial)
        self.desc = what
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar = None
        self.handle = None
        self.final: int | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        fd = _display_fd()
        if os.isatty(fd) and not verbose():
            from tqdm import tqdm

            _settle()
            self._file = os.fdopen(os.dup(fd), "w", buffering=1)
            sized = os.get_terminal_size(fd).columns > 0  # a terminal of 0 columns (script(1)) gets 100
            self.bar = tqdm(total=self.total or None, initial=self.initial, desc=f"{stage}: {what}", unit=unit,
                            file=self._file, dynamic_ncols=sized, ncols=None if sized else 100, mininterval=0.2,
                            leave=True)

    # -- the driver's side
    def __enter__(self) -> Progress:
        with _lock:
            Progress.live.append(self)
        self.handle = _counter()
        if self.handle is not None:
            self._poller = threading.Thread(target=self._poll, daemon=True, name=f"segray-progress-{self.stage}")
            self._poller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()  # at most one fetch (its ray.get times out after 10 s)
        self._fetch()
        if self.final is not None and exc[0] is None:
            self.update(done=self.final, total=max(self.total, self.final))
        self.close(failed=exc[0] is not None)

    def finish(self, done: int) -> None:
        """What the stage itself counted at its end (its own total of rows, pairs or steps): the
        last line shows it, whatever task reports were still on their way to the actor."""
        self.final = int(done)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._fetch()

    def _fetch(self) -> None:
        if self.handle is None:
            return
        import ray

        try:
            done, total, desc = ray.get(self.handle.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is for show; the job goes on without it
            return
        self.update(done=max(done, self.initial) if done else None, total=self.total + total, desc=desc)
        if total:  # taken over: the actor keeps only what arrives after this
            self.handle.add.remote(total=-total)

    def update(self, done: int | None = None, total: int | None = None, desc: str | None = None,
               advance: int = 0) -> None:
        with _lock:
            if total is not None:
                self.total = int(total)
            if done is not None:
                self.done = int(done)
            self.done += advance
            if desc:
                self.desc = desc
            if self.bar is not None:
                self.bar.total = self.total or None
                self.bar.set_description_str(f"{self.stage}: {self.desc}", refresh=False)
                self.bar.update(self.done - self.bar.n)
                return
        # A full count is the final line's to show (close): a periodic one there would print it twice.
        if time.monotonic() - self.last_line >= interval_s() and not (self.total and self.done >= self.total):
            self._line()  # outside the lock: the line goes through job_output's pipe

    def line(self) -> str:
        from tqdm import tqdm

        return tqdm.format_meter(self.done, self.total or None, time.monotonic() - self.start, ncols=0,
                                 prefix=f"{self.stage}: {self.desc}", unit=self.unit, initial=self.initial)

    def _line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), flush=True)

    def close(self, failed: bool = False) -> None:
        with _lock:
            if self in Progress.live:
                Progress.live.remove(self)
            bar, self.bar = self.bar, None
            if bar is not None:
                bar.close()
                self._file.close()
        if bar is None and not failed:
            self._line()
        # Not killed: a late report from a task would become an "unhandled error" line there. The
        # actor ends with the last handle (this one, the tasks' and the dataset's).
        self.handle = None


def _counter():
    """A new progress actor on the connected cluster (no CPU reserved), or None without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.remote(num_cpus=0, max_restarts=0)(_Counter).remote()
    except Exception:  # noqa: BLE001 - no progress display is better than no job
        return None


class _Counter:
    """Sums what tasks report; the driver polls it (Progress._fetch)."""

    def __init__(self) -> None:
        self.done, self.total, self.desc = 0, 0, None

    def add(self, done: int = 0, total: int = 0) -> None:
        self.done += done
        self.total += total

    def set(self, done: int, desc: str | None = None) -> None:
        self.done = done
        self.desc = desc or self.desc

    def get(self) -> tuple[int, int, str | None]:
        return self.done, self.total, self.desc


def report(handle, done: int = 0, total: int = 0) -> None:
    """From a task: ``done`` more units finished, ``total`` more units planned. Never waits."""
    if handle is not None and (done or total):
        with contextlib.suppress(Exception):
            handle.add.remote(done=done, total=total)


def report_position(handle, done: int, desc: str | None = None) -> None:
    """From a training worker: ``done`` units finished in all (``desc``: e.g. the epoch). Never waits."""
    if handle is not None:
        with contextlib.suppress(Exception):
            handle.set.remote(done, desc)

"""The console (segray/console.py): which lines a job shows, and its progress display, without Ray.

The noisy lines below are copied from a real `python jobs/demo.py` on Ray 2.60 (before the filter).
The jobs' own output, filtered, is checked end to end in test_infer_e2e.py and test_train_e2e.py.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

from segray.console import LineFilter, Progress

from conftest import REPO

RAY_NOISE = [
    "2026-11-30 06:12:15,551\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray "
    "cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-11-30 06:12:18,738\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
    "\x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m",
    "2026-11-30 06:12:21,371\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0356_0. Full logs "
    "are in /tmp/ray/session_x/logs/ray-data",
    "2026-11-30 06:12:21,374\tWARNING tqdm_ray.py:319 -- tqdm is not installed. Progress bars will be disabled.",
    "\x1b[36m(TrainController pid=4816)\x1b[0m [2026-11-30 06:12:34,508 E 4816 4847] core_worker.cc:2465: Actor with "
    "class name: 'PreemptionWatcher' and ID: '0a3a' has constructor arguments in the object store and max_restarts > 0. "
    "If the arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "[2026-11-30 06:13:07,079 E 4008 4008] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(Predictor))'"
    " and ID: '0d51' has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
    "\x1b[36m(SplitCoordinator pid=5068)\x1b[0m Starting execution of Dataset train_0356_0. Full logs are in /tmp/x",
    "\x1b[36m(SplitCoordinator pid=5068)\x1b[0m Execution plan of Dataset train_0356_0: InputDataBuffer[Input] -> "
    "OutputSplitter[split(2, equal=True)]",
    "\x1b[36m(SplitCoordinator pid=5068)\x1b[0m [dataset]: A new progress UI is available. To enable, set "
    "`ray.data.DataContext.get_current().enable_rich_progress_bars = True`.",
    "\x1b[36m(SplitCoordinator pid=5068)\x1b[0m \u2714\ufe0f  Dataset train_0356_0 execution finished in 0.04 seconds",
    "\x1b[36m(SplitCoordinator pid=13602)\x1b[0m Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "\x1b[36m(RayTrainWorker pid=4897)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, "
    "metrics={'epoch': 1, 'train_loss': 2.16}, validation=False) from rank 0",
    "2026-11-30 06:12:26,278\tINFO dataset.py:6884 -- Data sink Parquet finished. 192 rows and 4.5MiB data written.",
    "\x1b[36m(PlacementGroupCleaner pid=12887)\x1b[0m Exception in thread PlacementGroupCleanerMonitor:",
    "\x1b[36m(PlacementGroupCleaner pid=12887)\x1b[0m ConnectionError: Found multiple active Ray instances",
    "(get_table_block_metadata_schema pid=4794) [mutex.cc : 452] RAW: Lock blocking 0x564e6bd7d240   @ 0x7ff95282b1a2",
]
KEPT = [
    "demo: [1/4] prepare",
    "  mIoU       0.4717   pixel accuracy 0.8663",
    "2026-11-30 06:13:07,051\tERROR worker.py:420 -- Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1')",
    "[2026-11-30 06:13:07,079 E 4008 4008] core_worker.cc:999: Some other error Ray's core printed",
    "\x1b[36m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error.",
    "\x1b[36m(MapWorker(MapBatches(Predictor)) pid=5287)\x1b[0m Traceback (most recent call last):",
    "Traceback (most recent call last):",
]


def _filtered(lines: list[str]) -> list[str]:
    f = LineFilter()
    out = f.feed("".join(line + "\n" for line in lines).encode()) + f.flush()
    return [LineFilter.tidy(x).decode() for x in out.split(b"\n")[:-1]]


def test_ray_chatter_is_dropped_and_everything_else_is_kept():
    assert _filtered(RAY_NOISE) == []
    assert _filtered(KEPT) == KEPT
    mixed = [x for pair in zip(RAY_NOISE, KEPT * 3) for x in pair]
    assert _filtered(mixed) == KEPT * 2 + KEPT[: len(RAY_NOISE) - 2 * len(KEPT)]


def test_a_segray_line_from_a_worker_loses_rays_prefix_and_other_lines_keep_it():
    line = "\x1b[36m(RayTrainWorker pid=4897, ip=10.0.0.3)\x1b[0m train: epoch 1/8  train_loss 2.1653"
    assert _filtered([line]) == ["train: epoch 1/8  train_loss 2.1653"]
    other = "\x1b[36m(RayTrainWorker pid=4897)\x1b[0m something a user's code printed"
    assert _filtered([other]) == [other]


def test_a_warning_from_rays_code_goes_with_its_source_line_and_only_that():
    lines = [
        "\x1b[36m(DatasetManager pid=4981)\x1b[0m /root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/ray/data/"
        "_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: `exclude_resources` is deprecated",
        "\x1b[36m(DatasetManager pid=4981)\x1b[0m   self.exclude_resources = exclude_resources",
        "  IoU        Sky 0.920, Building 0.749",
        "/work/segray/thing.py:3: UserWarning: a warning of segray's own",
        "  warnings.warn(...)",
    ]
    assert _filtered(lines) == lines[2:]


def test_lines_split_across_reads_are_judged_whole():
    f = LineFilter()
    noise = RAY_NOISE[1].encode() + b"\n"
    out = b""
    for k in range(0, len(noise) + len(b"infer: done\n"), 7):  # 7-byte reads
        out += f.feed((noise + b"infer: done\n")[k : k + 7])
    assert out + f.flush() == b"infer: done\n"


def test_progress_off_a_terminal_prints_lines_with_the_exact_total(capsys, monkeypatch):
    monkeypatch.setenv("SEGRAY_PROGRESS_INTERVAL", "0")
    p = Progress("infer", "frames", total=0, unit="frame")  # not entered: no actor, whether or not Ray is up
    assert p.bar is None  # pytest's output is no terminal
    p.update(total=7)
    for _ in range(7):
        p.update(advance=1)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    # One per update (interval 0: 0/7 .. 6/7), then the final line: a full count is printed once
    # (a periodic line at 100% and the final line doubled it in a loaded test run).
    assert len(lines) == 8 and sum(" 7/7 " in line for line in lines) == 1, lines
    assert re.fullmatch(r"infer: frames: +100% 7/7 \[.*frame/s\]", lines[-1])
    assert re.search(r" 3/7 ", lines[3])


def test_progress_lines_wait_for_the_interval(capsys, monkeypatch):
    monkeypatch.setenv("SEGRAY_PROGRESS_INTERVAL", "3600")
    p = Progress("prepare", "pairs", total=5, unit="pair")
    for _ in range(5):
        p.update(advance=1)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: pairs: 100% 5/5 [")  # the final line only


SCRIPT = r"""
import sys, time
from segray import console
with console.job_output():
    print("infer: before", flush=True)
    with console.Progress("infer", "frames", total=10, unit="frame") as p:
        for i in range(10):
            time.sleep(0.02)
            p.update(advance=1)
            if i == 4:
                print("infer: a line while the bar runs", flush=True)
                print("2026-11-30 06:12:18,738\tINFO worker.py:2029 -- Started a local Ray instance.", file=sys.stderr,
                      flush=True)
    print("infer: after", flush=True)
"""


def _run_on_a_terminal(code: str) -> bytes:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"})
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out


def test_on_a_terminal_a_live_bar_is_redrawn_below_the_lines_printed_meanwhile():
    out = _run_on_a_terminal(SCRIPT).decode()
    assert "Started a local Ray instance" not in out
    bars = [m.group(1) for m in re.finditer(r"\rinfer: frames: +\d+%\|[^|]*\| (\d+)/10 ", out)]
    assert bars[-1] == "10" and len(set(bars)) > 3  # drawn again and again, up to the exact total
    before, line, after = out.index("infer: before"), out.index("infer: a line while the bar runs"), out.index("infer: after")
    first_bar, last_bar = out.index("\rinfer: frames:"), out.rindex("\rinfer: frames:")
    assert before < first_bar < line < last_bar < after
    # The line is printed on a cleared bar line, and the bar comes back after it.
    assert re.search(r"\r +\rinfer: a line while the bar runs\r?\n\rinfer: frames:", out)

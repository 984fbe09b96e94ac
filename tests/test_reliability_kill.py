"""Processes killed for real (issue #7): SIGKILL, not an exception in a loop.

- an inference driver killed half-way: the same command completes the output, no duplicate,
  no missing row (default run);
- a Ray Train worker process killed mid-epoch during a 2-worker run with ``--max-failures 1``:
  the run recovers from the latest checkpoint and finishes (``-m slow``);
- a training driver killed mid-run: the same command resumes from the latest checkpoint and
  finishes with the epochs asked for (``-m slow``).

The jobs run as subprocesses against the session's Ray cluster (conftest.py); the worker to
kill is found among this test process's descendants (the session's raylet forks the workers),
so no other Ray instance on the machine is ever touched (read from /proc).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, REPO, latest_registered_checkpoint

from segray import storage

SIZE = (32, 48)


class Job:
    """``jobs/<name>.py`` started in the background, its output collected in a file."""

    def __init__(self, ray_address: str, name: str, *args: str, log_path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended ({self.proc.returncode}) before {what}:\n{self.output[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.output[-4000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and anything it forked, nothing else
        self.proc.wait(timeout=30)
        self._log.close()

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()


def epochs_printed(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"train: epoch (\d+)/\d+ ", text)]


# ----------------------------------------------------------------------------- inference driver


def test_killed_inference_driver_then_same_command_completes_the_output(run_job, ray_cluster, s3_prefix, tmp_path):
    from test_infer_e2e import MODEL_SIZE, encode, train_tiny_model

    from segray.synthetic import render_scene

    model = f"{s3_prefix}/run"
    train_tiny_model(f"{model}/model")
    images = f"{s3_prefix}/frames"
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(20):
        uri = f"{images}/seq{i % 3}/f{i:03d}.png"
        storage.write_bytes(uri, encode(render_scene(rng, *MODEL_SIZE)[0]))
        inputs.append(uri)
    for i in range(3):  # errors are outputs too: they must not be lost or doubled either
        storage.write_bytes(f"{images}/bad/b{i}.png", b"")
        inputs.append(f"{images}/bad/b{i}.png")
    out = f"{s3_prefix}/out"
    args = ("--model", model, "--images", images, "--output", out, "--batch-size", "2", "--rows-per-file", "2")

    job = Job(ray_cluster, "infer", *args, log_path=tmp_path / "infer.log")
    parts = lambda: [f for f in storage.list_files(f"{out}/predictions") if f.endswith(".parquet")]  # noqa: E731
    job.wait_for(lambda: len(parts()) >= 2, timeout=300, what="two prediction part files")
    job.kill()
    time.sleep(3)  # the raylet reaps the dead job's tasks
    assert not storage.exists(f"{out}/metrics.parquet"), "the first run finished: nothing was interrupted"
    written = sum(pq.read_metadata(storage.resolve(f)[1], filesystem=storage.resolve(f)[0]).num_rows for f in parts())
    assert 0 < written < 20, written

    second = run_job("infer", *args, check=True)
    assert re.search(r"(\d+) inputs already in", second.stdout) and int(
        re.search(r"(\d+) inputs already in", second.stdout).group(1)) >= written
    fs, _ = storage.resolve(out)
    uris = []
    for folder in ("predictions", "errors"):
        files = [storage.resolve(f)[1] for f in storage.list_files(f"{out}/{folder}") if f.endswith(".parquet")]
        uris += pq.ParquetDataset(files, filesystem=fs).read(columns=["uri"]).column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "a row was written twice"
    assert sorted(uris) == sorted(inputs), "a row is missing"
    overall = pq.read_table(storage.resolve(f"{out}/metrics.parquet")[1], filesystem=fs).to_pylist()[-1]
    assert (overall["images"], overall["error_images"]) == (20, 3)


# ----------------------------------------------------------------------------- training


TRAIN_ARGS = ["--num-workers", "2", "--batch-size", "4", "--base-channels", "8", "--lr", "0.003", "--seed", "0"]


@pytest.fixture(scope="module")
def prepared(s3_server, run_job) -> str:
    from segray.synthetic import write_dataset

    root = f"s3://{BUCKET}/kill-{uuid.uuid4().hex[:8]}"
    write_dataset(f"{root}/source", layout="segnet", counts={"train": 160, "val": 16}, size=SIZE, seed=0)
    run_job("prepare", "--source", f"{root}/source", "--dest", f"{root}/prepared", check=True)
    return root


def _descendants(root: int) -> list[int]:
    """PIDs below ``root`` in the process tree, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def train_workers() -> list[int]:
    """PIDs of the Ray Train worker processes of the session cluster (descendants of this process)."""
    found = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def check_finished_run(run: str, epochs: int, output: str) -> dict:
    metrics = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1)), "each epoch once in the history"
    assert output.count("train: done: ") == 1, "exported once"
    files = {storage.relative(f"{run}/model", f) for f in storage.list_files(f"{run}/model")}
    assert files == {"model.pt", "config.json"}
    from segray import modelio

    modelio.load_model(run)
    return metrics


@pytest.mark.slow
def test_killed_train_worker_recovers_from_the_latest_checkpoint(prepared, ray_cluster, tmp_path):
    data, runs, epochs = f"{prepared}/prepared", f"{prepared}/runs-worker", 3
    job = Job(ray_cluster, "train", "--data", data, "--storage", runs, "--name", "w", "--epochs", str(epochs),
              "--max-failures", "1", *TRAIN_ARGS, log_path=tmp_path / "train.log")
    job.wait_for(lambda: epochs_printed(job.output), timeout=400, what="the first epoch")
    time.sleep(2)  # epoch 1 reported and checkpointed; epoch 2 under way
    before = epochs_printed(job.output)
    workers = train_workers()
    assert len(workers) == 2, workers
    victim = max(workers)
    os.kill(victim, signal.SIGKILL)
    assert job.finish(timeout=500) == 0, job.output[-4000:]
    output = job.output
    assert victim not in train_workers()
    resumed = re.search(r"train: worker resumed after epoch (\d+) of", output)
    assert resumed, "the worker group was not restarted from a checkpoint:\n" + output[-4000:]
    k = int(resumed.group(1))
    # The kill came after epoch max(before) was printed, during the next one: at most that one is redone.
    assert max(before) - 1 <= k <= max(before) + 1, (before, k)
    after = epochs_printed(output[resumed.end():])
    assert after == list(range(k + 1, epochs + 1)), output[-4000:]
    check_finished_run(f"{runs}/w", epochs, output)


@pytest.mark.slow
def test_killed_train_worker_with_step_checkpoints_resumes_within_the_epoch(prepared, ray_cluster, tmp_path):
    """--checkpoint-every-steps 4: the worker killed right after a mid-epoch checkpoint of epoch 2;
    the restart resumes at that checkpoint's step, not at the epoch's start, and epoch 2's
    metrics still count every training image once (the steps before the checkpoint carried over)."""
    data, runs, epochs = f"{prepared}/prepared", f"{prepared}/runs-steps", 3
    run = f"{runs}/s"
    job = Job(ray_cluster, "train", "--data", data, "--storage", runs, "--name", "s", "--epochs", str(epochs),
              "--max-failures", "1", "--checkpoint-every-steps", "4", *TRAIN_ARGS, log_path=tmp_path / "train.log")

    registered: list[int] = []

    def a_step_checkpoint_of_epoch_2_registered() -> bool:
        name = latest_registered_checkpoint(run)  # a restart starts from it
        if name.startswith("checkpoint_epoch_0002_step_"):
            registered.append(int(name.rsplit("_", 1)[1]))
        return bool(registered)

    job.wait_for(a_step_checkpoint_of_epoch_2_registered, timeout=400, what="a registered mid-epoch checkpoint")
    workers = train_workers()
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    assert job.finish(timeout=500) == 0, job.output[-4000:]
    output = job.output
    resumed = re.search(r"train: worker resumed after epoch (\d+) and step (\d+) of epoch (\d+) of", output)
    assert resumed, "no restart from a mid-epoch checkpoint:\n" + output[-4000:]
    done, step, epoch = (int(g) for g in resumed.groups())
    # At or after the step checkpoint seen registered before the kill (160 rows / 2 / 4 = 20 steps).
    assert (done, epoch) == (1, 2) and step % 4 == 0 and registered[0] <= step < 20, (resumed.group(0), registered)
    assert epochs_printed(output[resumed.end():]) == [2, 3], output[-4000:]
    metrics = check_finished_run(run, epochs, output)
    assert [h["train_images"] for h in metrics["history"]] == [160, 160, 160]
    assert not any(n.startswith("checkpoint_epoch_0002_step_") for n in
                   {storage.relative(run, f).split("/")[0] for f in storage.list_files(run)}), "kept only while latest"


@pytest.mark.slow
def test_killed_train_driver_then_same_command_resumes(prepared, ray_cluster, run_job, tmp_path):
    data, runs, epochs = f"{prepared}/prepared", f"{prepared}/runs-driver", 3
    args = ("--data", data, "--storage", runs, "--name", "d", "--epochs", str(epochs), *TRAIN_ARGS)
    job = Job(ray_cluster, "train", *args, log_path=tmp_path / "train.log")
    job.wait_for(lambda: epochs_printed(job.output), timeout=400, what="the first epoch")
    time.sleep(2)
    before = epochs_printed(job.output)
    job.kill()
    assert not storage.exists(f"{runs}/d/metrics.json"), "the run finished before the kill"
    deadline = time.monotonic() + 60
    while train_workers() and time.monotonic() < deadline:  # the dead driver's actors go with it
        time.sleep(1)
    assert not train_workers(), "workers of the killed driver still alive"

    second = run_job("train", *args, check=True)
    out = second.stdout + second.stderr
    resumed = re.search(r"train: resuming \S+ after epoch (\d+);", second.stdout)
    assert resumed, out[-4000:]
    k = int(resumed.group(1))
    assert max(before) - 1 <= k <= max(before) + 1, (before, k)
    assert epochs_printed(out) == list(range(k + 1, epochs + 1)), out[-4000:]
    metrics = check_finished_run(f"{runs}/d", epochs, second.stdout)
    assert metrics["epochs"] == epochs

"""Every stage through `ray job submit` against a real local head (token auth on) and moto S3.

The head is started with cluster/local-head.sh in a temp dir of its own and stopped with
cluster/stop.sh, so the session's other Ray cluster is left alone. The head inherits this
process's AWS_* variables (pointing at the moto server), as the README tells users to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from segray import storage
from segray.synthetic import write_dataset
from conftest import REPO, free_port


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    temp_dir = tmp_path_factory.mktemp("head")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        ["bash", str(REPO / "cluster" / "local-head.sh"), "--port", str(port), "--dashboard-port", str(dashboard),
         "--temp-dir", str(temp_dir), "--num-cpus", "2", "--",
         "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--min-worker-port", "20100", "--max-worker-port", "20999"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    subprocess.run(["bash", str(REPO / "cluster" / "stop.sh"), "--temp-dir", str(temp_dir)], env=env,
                   capture_output=True, timeout=120)


def submit(env: dict, *job_args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python jobs/...`, exactly as a user types it."""
    return subprocess.run(
        ["ray", "job", "submit", "--working-dir", ".", "--", "python", *job_args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def assert_job_status(env: dict, proc: subprocess.CompletedProcess, expected: str) -> str:
    """Ask the Jobs API (not the submit command's own output) for the job's status; return its logs."""
    output = proc.stdout + proc.stderr
    job_id = next(line.split("'")[1] for line in output.splitlines() if "Job '" in line and "submitted" in line)
    # A client process with the submitter's environment (RAY_AUTH_MODE=token makes it send the token).
    script = ("import sys; from ray.job_submission import JobSubmissionClient as C; c = C(); "
              "print(c.get_job_status(sys.argv[1])); print(c.get_job_logs(sys.argv[1]))")
    asked = subprocess.run([sys.executable, "-c", script, job_id], env=env, capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0, asked.stderr[-2000:]
    status, _, logs = asked.stdout.partition("\n")
    assert status.endswith(expected), f"{job_id}: {status}\n{logs[-3000:]}"
    return logs


def test_all_stages_through_ray_job_submit(ray_head, s3_prefix):
    src, data, runs = f"{s3_prefix}/camvid", f"{s3_prefix}/prepared", f"{s3_prefix}/runs"
    write_dataset(src, layout="segnet", counts={"train": 12, "val": 4}, size=(32, 48), seed=5)

    proc = submit(ray_head, "jobs/prepare.py", "--source", src, "--dest", data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_job_status(ray_head, proc, "SUCCEEDED")
    assert json.loads(storage.read_bytes(f"{data}/dataset.json"))["splits"] == {"train": 12, "val": 4}

    proc = submit(ray_head, "jobs/train.py", "--data", data, "--storage", runs, "--name", "sub",
                  "--epochs", "1", "--num-workers", "1", "--base-channels", "4", "--batch-size", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_job_status(ray_head, proc, "SUCCEEDED")
    assert storage.exists(f"{runs}/sub/model/config.json")

    out = f"{s3_prefix}/pred"
    proc = submit(ray_head, "jobs/infer.py", "--model", f"{runs}/sub", "--images", f"{src}/val",
                  "--labels", f"{src}/valannot", "--output", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_job_status(ray_head, proc, "SUCCEEDED")
    fs, path = storage.resolve(f"{out}/predictions")
    predictions = pq.read_table(path, filesystem=fs)
    assert predictions.num_rows == 4
    fs, path = storage.resolve(f"{out}/metrics.parquet")
    overall = [r for r in pq.read_table(path, filesystem=fs).to_pylist() if r["class_name"] == "overall"][0]
    assert 0 <= overall["miou"] <= 1 and np.isfinite(overall["pixel_accuracy"])


# slow (~20 s): the default run submits every stage through `ray job submit` above; this is its failure path.
@pytest.mark.slow
def test_failed_stage_is_a_failed_job_with_its_message(ray_head, s3_prefix):
    proc = submit(ray_head, "jobs/train.py", "--data", f"{s3_prefix}/missing", "--storage", f"{s3_prefix}/runs",
                  "--name", "bad")
    assert proc.returncode != 0
    logs = assert_job_status(ray_head, proc, "FAILED")
    assert "train: error: DatasetError: --data" in logs and "missing: not found" in logs

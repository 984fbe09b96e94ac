"""Shared test infrastructure: one moto S3 *server* and one local Ray cluster per session.

moto's in-process mock does not reach pyarrow (C++) or Ray worker processes, so a real
ThreadedMotoServer listens on 127.0.0.1 and the standard AWS variables point at it. The Ray
cluster is started in this process (so it dies with the session) and the jobs under test run
as subprocesses that connect to it through RAY_ADDRESS, exactly as a user runs them.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUCKET = "segray-test"


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A plain tar archive of ``members`` (name -> bytes), in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def latest_registered_checkpoint(run: str) -> str:
    """The checkpoint folder Ray Train's controller registered last in ``run`` ("" before any):
    it registers a reported checkpoint when it polls the workers and records it in its
    snapshot, and a restart starts from that one (docs/scaling.md, "The exact resume rule")."""
    import json

    from segray import storage

    try:
        snapshot = json.loads(storage.read_bytes(f"{run}/checkpoint_manager_snapshot.json"))
    except Exception:  # noqa: BLE001 - not written yet
        return ""
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with bucket ``segray-test``; AWS_* point at it."""
    from moto.server import ThreadedMotoServer

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

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh ``s3://segray-test/<random>`` prefix for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster with 2 CPUs; yields its address for subprocess jobs (RAY_ADDRESS)."""
    import ray

    # Started after the S3 variables are set, so that every worker inherits them.
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = ctx.address_info["gcs_address"]
    yield address
    ray.shutdown()


@pytest.fixture(scope="session")
def run_job(ray_cluster):
    """Run ``jobs/<name>.py`` with arguments as a subprocess against the session's cluster."""

    def run(name: str, *args: str, timeout: float = 600, env: dict | None = None, check: bool = False):
        full_env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / f"{name}.py"), *args],
            cwd=REPO,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"jobs/{name}.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return run

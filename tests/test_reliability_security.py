"""Security (issue #7): no credential in code, logs, checkpoints or Parquet; no unpickling of
arbitrary objects; token authentication stays on in every cluster config.

The sentinel runs give the jobs secret credentials that moto accepts (any key works) and then
search every byte the jobs left behind: their stdout and stderr, every object they wrote
(Parquet, checkpoints, models, JSON), and the logs of the session's Ray cluster.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BUCKET, REPO

from segray import modelio, storage
from segray.model import UNetConfig, build_model

SENTINEL_KEY = "SENTINELKEY" + uuid.uuid4().hex[:9].upper()
SENTINEL_SECRET = "sentinel-secret-" + uuid.uuid4().hex
SENTINEL_TOKEN = "sentinel-session-token-" + uuid.uuid4().hex
SENTINELS = (SENTINEL_KEY, SENTINEL_SECRET, SENTINEL_TOKEN)


# ----------------------------------------------------------------------------- code


def test_no_credential_in_code():
    from test_cluster_configs import credential_problems

    roots = ["segray", "jobs", "cluster", "bench", "docs"]
    files = [p for r in roots for p in (REPO / r).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".sh", ".yaml"}]
    files += [REPO / "README.md", REPO / "pyproject.toml"]
    problems = {str(p.relative_to(REPO)): credential_problems(p.read_text(), is_config=False) for p in files}
    assert not {k: v for k, v in problems.items() if v}
    for p in files:  # nor any literal passed as a key to boto3 or pyarrow
        assert not re.search(r"(secret_key|aws_secret_access_key|access_key)\s*=\s*[\"'][^\"']+[\"']", p.read_text()), p


# ----------------------------------------------------------------------------- unpickling


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious model or checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_model_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    dest = str(tmp_path / "model")
    cfg = UNetConfig(base_channels=4, depth=2)
    modelio.save_model(dest, build_model(cfg).state_dict(), modelio.ModelSpec(model=cfg.to_dict(), input_height=16,
                                                                                input_width=16))
    modelio.load_model(dest)  # the honest file loads
    state = build_model(cfg).state_dict()
    state["extra"] = Payload(marker)
    torch.save(state, os.path.join(dest, modelio.WEIGHTS_FILE))
    with pytest.raises(modelio.ModelError, match=r"model\.pt: refused to load") as e:
        modelio.load_model(dest)
    assert "weights_only" in str(e.value) or "not a plain" in str(e.value)
    assert not marker.exists(), "the pickle ran code"


def test_a_malicious_checkpoint_is_refused_not_run(tmp_path):
    import ray.train

    from segray.worker import CHECKPOINT_FILE, _load_checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_epoch_0001"
    ckpt.mkdir()
    torch.save({"model": {}, "epoch": 1, "history": [], "x": Payload(marker)}, ckpt / CHECKPOINT_FILE)
    with pytest.raises(Exception, match=r"state\.pt: refused to load") as e:
        _load_checkpoint(ray.train.Checkpoint.from_directory(str(ckpt)))
    assert not marker.exists(), f"the pickle ran code ({e.value})"


# ----------------------------------------------------------------------------- cluster configs


def test_every_cluster_config_turns_token_auth_on():
    """Positively on, in each way a cluster is started (test_cluster_configs checks nothing turns it off)."""
    cluster = REPO / "cluster"
    assert "export RAY_AUTH_MODE=token" in (cluster / "local-head.sh").read_text()
    aws = yaml.safe_load((cluster / "aws.yaml").read_text())
    starts = aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c), starts
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    for name in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-infer.yaml"):
        doc = yaml.safe_load((cluster / "kuberay" / name).read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token", name


# ----------------------------------------------------------------------------- sentinel runs


def _session_log_dir() -> Path | None:
    import ray

    try:
        return Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 - no local node: nothing to search
        return None


def _log_snapshot(logs: Path | None) -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()} if logs else {}


def _leaks(text_or_bytes, where: str) -> list[str]:
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return [f"{where}: {s[:14]}..." for s in SENTINELS if s.encode() in data]


def _search_everything(procs, prefixes: list[str], logs: Path | None, before: dict[Path, int]) -> list[str]:
    found: list[str] = []
    for proc in procs:
        found += _leaks(proc.stdout + proc.stderr, f"output of {proc.args[1]}")
    searched = 0
    for prefix in prefixes:
        for uri in storage.list_files(prefix):
            found += _leaks(storage.read_bytes(uri), uri)
            searched += 1
    assert searched, "nothing written?"
    for path in _log_snapshot(logs):  # what the cluster logged during the runs
        with open(path, "rb") as f:
            f.seek(before.get(path, 0))
            found += _leaks(f.read(), str(path))
    return found


def _sentinel_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": SENTINEL_KEY, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET,
            "AWS_SESSION_TOKEN": SENTINEL_TOKEN}


@pytest.mark.slow  # ~60 s; tests/test_runtime.py guards the runtime_env leak it found, in the default run
def test_no_credential_in_outputs_or_logs_of_prepare_and_infer(run_job, s3_prefix):
    from segray.synthetic import write_dataset
    from test_infer_e2e import train_tiny_model

    write_dataset(f"{s3_prefix}/src", layout="segnet", counts={"train": 4, "val": 2}, size=(24, 32), seed=0)
    train_tiny_model(f"{s3_prefix}/run/model")
    logs = _log_snapshot(_session_log_dir())
    env = _sentinel_env()
    procs = [
        run_job("prepare", "--source", f"{s3_prefix}/src", "--dest", f"{s3_prefix}/prepared", env=env, check=True),
        run_job("infer", "--model", f"{s3_prefix}/run", "--images", f"{s3_prefix}/src/val", "--labels",
                f"{s3_prefix}/src/valannot", "--output", f"{s3_prefix}/pred", "--write-masks", env=env, check=True),
        # A failing job prints its error: that line must not carry a secret either.
        run_job("infer", "--model", f"{s3_prefix}/nothing", "--images", f"{s3_prefix}/src/val", "--output",
                f"{s3_prefix}/pred2", env=env),
    ]
    assert procs[-1].returncode == 1
    assert not _search_everything(procs, [f"{s3_prefix}/prepared", f"{s3_prefix}/pred"], _session_log_dir(), logs)


@pytest.mark.slow
def test_no_credential_in_checkpoints_models_or_logs_of_train(run_job, s3_prefix):
    from segray.synthetic import write_dataset

    write_dataset(f"{s3_prefix}/src", layout="segnet", counts={"train": 8, "val": 4}, size=(24, 32), seed=0)
    run_job("prepare", "--source", f"{s3_prefix}/src", "--dest", f"{s3_prefix}/prepared", check=True)
    logs = _log_snapshot(_session_log_dir())
    proc = run_job("train", "--data", f"{s3_prefix}/prepared", "--storage", f"{s3_prefix}/runs", "--name", "s",
                   "--epochs", "1", "--num-workers", "1", "--batch-size", "4", "--base-channels", "4",
                   env=_sentinel_env(), check=True)
    files = storage.list_files(f"{s3_prefix}/runs/s")
    assert any(f.endswith("state.pt") for f in files) and any(f.endswith("model/model.pt") for f in files)
    assert not _search_everything([proc], [f"{s3_prefix}/runs"], _session_log_dir(), logs)


def test_sentinel_search_finds_a_planted_secret(tmp_path):
    """The control: the search does see a secret where one is."""
    np.save(tmp_path / "x.npy", np.frombuffer(SENTINEL_SECRET.encode(), np.uint8))
    assert _leaks((tmp_path / "x.npy").read_bytes(), "x.npy")
    assert BUCKET  # the session bucket the sentinel runs write to

"""Reliability against a stumbling object store (issue #7): faults injected by tests/faultproxy.py.

The proxy sits on 127.0.0.1 in front of the session's moto server and answers a seeded share of
requests with ``503 SlowDown`` or drops the connection (before or after forwarding). The
protection is segray's own: storage.py builds every S3 filesystem with the AWS standard retry
strategy and ``S3_MAX_ATTEMPTS`` attempts, keeps that setting when the filesystem is pickled
to Ray tasks and Ray Train workers, and runtime.py forwards SEGRAY_S3_MAX_ATTEMPTS to them.

Default run: the proxy itself, segray.storage and a pickled filesystem through faults (a few
seconds, no Ray). ``-m slow``: prepare, train and infer through the proxy, outputs compared
with a fault-free run of the same commands.
"""

from __future__ import annotations

import io
import json
import pickle
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BUCKET, tar_bytes
from faultproxy import FAULTS, FaultProxy

from segray import storage

RATE = 0.2


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A 20 % fault proxy in front of moto; this process's S3 clients go through it."""
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], rate=RATE, seed=7) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def _client(url: str):
    """A boto3 client that tries once: what the proxy does is seen as it is."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, config=Config(retries={"max_attempts": 1, "mode": "standard"}))


def test_proxy_forwards_and_injects_each_fault(s3_server):
    import botocore.exceptions

    upstream = s3_server["AWS_ENDPOINT_URL"]
    key = f"proxy-{uuid.uuid4().hex[:8]}"
    with FaultProxy(upstream, rate=0.0) as p:
        _client(p.url).put_object(Bucket=BUCKET, Key=key, Body=b"hello")
        assert _client(p.url).get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"hello"
        assert p.counts["pass"] == 2
    with FaultProxy(upstream, rate=1.0, faults=("slowdown",)) as p:
        with pytest.raises(botocore.exceptions.ClientError) as info:
            _client(p.url).get_object(Bucket=BUCKET, Key=key)
        assert info.value.response["Error"]["Code"] == "SlowDown"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    for fault in ("drop", "drop_after"):
        with FaultProxy(upstream, rate=1.0, faults=(fault,)) as p:
            with pytest.raises((botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
                _client(p.url).put_object(Bucket=BUCKET, Key=key, Body=fault.encode())
            assert p.counts[fault] >= 1 and not p.counts["pass"]
    # drop_after forwarded the PUT before dropping the answer: the store acted, the client never heard.
    assert _client(upstream).get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"drop_after"
    # Seeded: the same seed gives the same faults in the same order.
    draws = []
    for _ in range(2):
        with FaultProxy(upstream, rate=0.5, seed=3) as p:
            draws.append([p.decide("GET", "/x") for _ in range(50)])
    assert draws[0] == draws[1] and {"pass", *FAULTS} == set(draws[0])


def _exercise(prefix: str, fs=None, n: int = 14) -> None:
    """Write, list, read back and delete ``n`` objects, and a Parquet file through ``fs``.

    Half the objects are smaller than S3's XML error body (the case read_bytes retries itself)."""
    sizes = [7 + 13 * i if i % 2 else 3000 + 97 * i for i in range(n)]
    payloads = {f"{prefix}/obj-{i:03d}.bin": np.random.default_rng(i).bytes(size) for i, size in enumerate(sizes)}
    for uri, data in payloads.items():
        storage.write_bytes(uri, data)
    assert storage.list_files(prefix) == sorted(payloads)
    for uri, data in payloads.items():
        assert storage.read_bytes(uri) == data
    table = pa.table({"x": np.arange(1000)})
    fs = fs or storage.resolve(prefix)[0]
    path = storage.resolve(f"{prefix}/t.parquet")[1]
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    storage.delete(prefix)
    assert storage.list_files(prefix) == []


def test_storage_rides_out_s3_faults(proxy, s3_prefix):
    _exercise(s3_prefix)
    assert proxy.injected >= 10 and all(proxy.counts[f] for f in FAULTS), proxy.counts


def test_pickled_filesystem_keeps_its_retries(s3_server, s3_prefix, monkeypatch):
    """What Ray sends to a write task or a Train worker is a pickled copy of the filesystem.

    Every request fails its first 3 tries: pyarrow's own pickle would leave the copy with
    pyarrow's default of 3 attempts and fail; segray's keeps S3_MAX_ATTEMPTS (10)."""
    assert storage.S3_MAX_ATTEMPTS > 4
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], fail_first=3, faults=("slowdown", "drop")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fs, _ = storage.resolve(s3_prefix)
        copy = pickle.loads(pickle.dumps(fs))
        table = pa.table({"x": np.arange(2000)})
        path = storage.resolve(f"{s3_prefix}/t.parquet")[1]
        pq.write_table(table, path, filesystem=copy)
        assert pq.ParquetFile(copy.open_input_file(path)).read().equals(table)
        assert proxy.injected >= 6, proxy.counts


def test_without_retries_the_faults_surface(proxy, s3_prefix, monkeypatch):
    """The control: with one attempt per request the same faults fail the same work."""
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 1)
    storage._s3_filesystem.cache_clear()
    try:
        with pytest.raises(OSError):
            _exercise(s3_prefix)
    finally:
        storage._s3_filesystem.cache_clear()


# ----------------------------------------------------------------------------- the stages, -m slow


def _table(uri: str, sort_by: str) -> pa.Table:
    fs, _ = storage.resolve(uri)
    files = [storage.resolve(f)[1] for f in storage.list_files(uri) if f.endswith(".parquet")]
    return pq.ParquetDataset(files, filesystem=fs).read().sort_by(sort_by)


def _weights(run: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(f"{run}/model/model.pt")), weights_only=True)


@pytest.mark.slow
def test_prepare_train_infer_through_s3_faults_match_a_fault_free_run(run_job, s3_server, s3_prefix):
    from segray.synthetic import write_dataset

    src = f"{s3_prefix}/src"
    write_dataset(src, layout="segnet", counts={"train": 24, "val": 8}, size=(24, 32), seed=0)
    outputs = {}
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], rate=RATE, seed=11) as proxy:
        for tag, env in (("clean", {}), ("faulty", {"AWS_ENDPOINT_URL": proxy.url})):
            root = f"{s3_prefix}/{tag}"
            run_job("prepare", "--source", src, "--dest", f"{root}/prepared", env=env, check=True)
            run_job("train", "--data", f"{root}/prepared", "--storage", f"{root}/runs", "--name", "r", "--epochs", "2",
                    "--num-workers", "1", "--batch-size", "4", "--base-channels", "4", "--seed", "0", env=env,
                    check=True)
            run_job("infer", "--model", f"{root}/runs/r", "--images", f"{src}/val", "--labels", f"{src}/valannot",
                    "--output", f"{root}/pred", "--batch-size", "4", "--rows-per-file", "3", env=env, check=True)
            outputs[tag] = root
        assert proxy.injected >= 20 and all(proxy.counts[f] for f in FAULTS), proxy.counts
    clean, faulty = outputs["clean"], outputs["faulty"]
    for split in ("train", "val"):
        assert _table(f"{faulty}/prepared/{split}", "name").equals(_table(f"{clean}/prepared/{split}", "name"))
    info = [json.loads(storage.read_bytes(f"{r}/prepared/dataset.json")) for r in (clean, faulty)]
    # Shards are named by their prepare run (dataset.json "files"): the same splits and counts, other names.
    files = [i.pop("files") for i in info]
    assert {k: len(v) for k, v in files[0].items()} == {k: len(v) for k, v in files[1].items()} and files[0]["train"]
    assert info[0] == info[1]
    w_clean, w_faulty = _weights(f"{clean}/runs/r"), _weights(f"{faulty}/runs/r")
    assert w_clean.keys() == w_faulty.keys() and all(torch.equal(w_clean[k], w_faulty[k]) for k in w_clean)
    history = [json.loads(storage.read_bytes(f"{r}/runs/r/metrics.json"))["history"] for r in (clean, faulty)]
    assert [h["val_miou"] for h in history[0]] == [h["val_miou"] for h in history[1]]
    keep = ["uri", "height", "width", "mask_png", "class_pixel_counts", "confusion", "pixel_accuracy"]
    assert _table(f"{faulty}/pred/predictions", "uri").select(keep).equals(
        _table(f"{clean}/pred/predictions", "uri").select(keep))
    metrics = [pq.read_table(storage.resolve(f"{r}/pred/metrics.parquet")[1], filesystem=storage.resolve(r)[0])
               for r in (clean, faulty)]
    assert metrics[0].equals(metrics[1])


def test_an_s3_archive_is_streamed_in_a_few_big_reads(s3_server, monkeypatch):
    # tarfile reads 512 B - 10 KiB at a time; unbuffered, every read was a GET of its own
    # (~30 per 300 KB frame). Counted at a pass-through proxy: a HEAD, then a GET per 8 MiB.
    from segray import sources

    rng = np.random.default_rng(0)
    frames = {f"f/{k:02d}.bin": rng.integers(0, 255, 100_000, dtype=np.uint8).tobytes() for k in range(40)}
    uri = f"s3://{BUCKET}/archives-{uuid.uuid4().hex[:8]}/a.tar"
    storage.write_bytes(uri, tar_bytes(frames))  # 4 MB
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], rate=0.0) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        members = {m.path: m.data for m in sources.iter_archive(uri)}
        assert members == frames
        assert p.counts["pass"] <= 4, p.counts

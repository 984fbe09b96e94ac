"""The stages on a cluster of several real nodes on this machine (tests/multinode.py: a head with
no CPU and two worker nodes of 2 CPUs), storage on the moto S3 server (``-m slow``).

- prepare and infer spread their work over both worker nodes, by the jobs' own records
  (dataset.json ``nodes``, the predictions' ``decode_node`` / ``predict_node``), and write exactly
  what the same command writes on the session's single-node cluster;
- a worker node that runs a model replica and decode tasks is killed in the middle of an infer
  run: the job goes on and finishes (exit 0) with every input exactly once (Ray restarts the
  replica on a live node, retries the lost tasks; part files are named by their URIs);
- local paths are used on a cluster whose nodes are all on this machine and refused with one
  line once a node with another address (127.0.0.2: another machine, as far as Ray can tell) joins.
"""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from segray import predictions, storage
from segray.dataset import load_info, split_files
from segray.synthetic import render_scene, write_dataset

from conftest import BUCKET
from multinode import node_ids, start_cluster
from test_infer_e2e import MODEL_SIZE, encode, train_tiny_model
from test_multinode import write_frames
from videos import h264_bframes, scenes

pytestmark = pytest.mark.slow

NODE_COLUMNS = (predictions.COL_DECODE_NODE, predictions.COL_PREDICT_NODE)


@pytest.fixture(scope="module")
def cluster(s3_server):
    with start_cluster(nodes=2, cpus=2) as c:
        yield c


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _split_table(dataset: str, split: str):
    info = load_info(dataset)
    fs, _ = storage.resolve(dataset)
    return pq.read_table([storage.resolve(u)[1] for u in split_files(dataset, info, split)], filesystem=fs).sort_by("name")


def _metrics(output: str):
    fs, path = storage.resolve(f"{output}/metrics.parquet")
    return pq.read_table(path, filesystem=fs)


def test_prepare_across_nodes_equals_one_node(cluster, run_job, s3_prefix):
    src = f"{s3_prefix}/camvid"
    write_dataset(src, layout="segnet", counts={"train": 40, "val": 16}, size=(32, 48), seed=3)  # 7 tasks of 8 pairs
    args = ["--source", src, "--size", "32x48"]
    _ok(cluster.run_job("prepare", *args, "--dest", f"{s3_prefix}/many"))
    _ok(run_job("prepare", *args, "--dest", f"{s3_prefix}/one"))
    many, one = (json.loads(storage.read_bytes(f"{s3_prefix}/{d}/dataset.json")) for d in ("many", "one"))
    workers = {n["node_id"] for n in cluster.workers}
    assert set(many["nodes"]) == workers and sum(many["nodes"].values()) == 56, many["nodes"]  # both worker nodes
    assert len(one["nodes"]) == 1 and sum(one["nodes"].values()) == 56
    # The same dataset: every field but where it ran and its shards' names, and the same rows.
    for info in (many, one):
        info.pop("nodes"), info.pop("files")
    assert many == one
    for split in ("train", "val"):
        assert _split_table(f"{s3_prefix}/many", split).equals(_split_table(f"{s3_prefix}/one", split))


def _collection(root: str) -> tuple[str, str, int]:
    """20 labelled image files and a 40-frame video (keyframes every 10 frames): (images, labels, inputs)."""
    rng = np.random.default_rng(7)
    images, labels = f"{root}/images", f"{root}/labels"
    for k in range(20):
        image, label = render_scene(rng, *MODEL_SIZE)
        storage.write_bytes(f"{images}/street/{k:02d}.png", encode(image))
        storage.write_bytes(f"{labels}/street/{k:02d}.png", encode(label))
    storage.write_bytes(f"{images}/drive.mp4", h264_bframes([f for f, _ in scenes(40, *MODEL_SIZE, seed=2)], gop=10))
    return images, labels, 60


def test_infer_across_nodes_equals_one_node(cluster, run_job, s3_prefix):
    model = f"{s3_prefix}/runs/tiny"
    train_tiny_model(f"{model}/model")
    images, labels, inputs = _collection(s3_prefix)
    # The same command on both clusters: 2 replicas of half a CPU leave a CPU for decoding on one node of 2.
    args = ["--model", model, "--images", images, "--labels", labels, "--num-replicas", "2", "--cpus-per-replica",
            "0.5", "--batch-size", "4", "--frames-per-task", "10", "--rows-per-file", "16"]
    _ok(cluster.run_job("infer", *args, "--output", f"{s3_prefix}/many"))
    _ok(run_job("infer", *args, "--output", f"{s3_prefix}/one"))
    many, one = (predictions.read_table(f"{s3_prefix}/{d}/predictions").sort_by("uri") for d in ("many", "one"))
    assert many.num_rows == inputs and len(set(many.column("uri").to_pylist())) == inputs
    workers = {n["node_id"] for n in cluster.workers}
    assert node_ids(many.column(predictions.COL_PREDICT_NODE)) == workers  # a replica on each worker node
    assert node_ids(many.column(predictions.COL_DECODE_NODE)) == workers  # 3 file tasks, 4 video ranges
    assert len(node_ids(one.column(predictions.COL_PREDICT_NODE))) == 1
    assert many.drop_columns(list(NODE_COLUMNS)).equals(one.drop_columns(list(NODE_COLUMNS)))
    assert _metrics(f"{s3_prefix}/many").equals(_metrics(f"{s3_prefix}/one"))
    assert not predictions.parquet_files(f"{s3_prefix}/many/errors")


def test_infer_survives_losing_a_node_that_runs_a_replica(cluster, s3_prefix, tmp_path):
    """Kill (not drain) a worker node while it predicts and decodes: the job finishes, exit 0, with
    every input exactly once. A node joins afterwards, so that the module's cluster is whole again."""
    count = 400
    model = f"{s3_prefix}/runs/tiny"
    train_tiny_model(f"{model}/model")
    images = write_frames(s3_prefix, count)
    out = f"{s3_prefix}/pred"
    # Small part files: rows (with the node that predicted them) appear while the job runs.
    args = ["--model", model, "--images", images, "--output", out, "--num-replicas", "2", "--batch-size", "4",
            "--rows-per-file", "8"]
    log_path = tmp_path / "infer.log"
    start = time.monotonic()
    try:
        with open(log_path, "w") as log:
            job = cluster.start_job("infer", *args, stdout=log)
            victim, written, removed_at = None, 0, None
            while job.poll() is None and time.monotonic() - start < 300:
                if victim is None and predictions.parquet_files(f"{out}/predictions"):
                    table = predictions.read_table(f"{out}/predictions")
                    busy = node_ids(table.column(predictions.COL_PREDICT_NODE))
                    victim, written = sorted(busy)[0], table.num_rows
                    cluster.remove_node(victim)
                    removed_at = time.monotonic() - start
                time.sleep(0.3)
            if job.poll() is None:
                job.kill()
            rc = job.wait()
        seconds = time.monotonic() - start
        output = log_path.read_text()
        assert victim is not None and written < count, f"the node was not removed mid-run ({written} rows):\n{output[-3000:]}"
        assert rc == 0, f"infer exited {rc} after losing node {victim[:12]}:\n{output[-4000:]}"
        table = predictions.read_table(f"{out}/predictions")
        uris = collections.Counter(table.column("uri").to_pylist())
        assert sorted(uris) == [f"{images}/f{k:03d}.png" for k in range(count)]  # every input...
        assert max(uris.values()) == 1  # ...exactly once
        assert not predictions.parquet_files(f"{out}/errors")
        overall = [r for r in _metrics(out).to_pylist() if r["class_name"] == "overall"][0]
        assert overall["images"] == count and overall["error_images"] == 0
        after = node_ids(table.column(predictions.COL_PREDICT_NODE)) - {victim}
        assert after, "no live node predicted anything"
        print(f"multinode: node {victim[:8]} killed {removed_at:.1f} s into infer with {written}/{count} rows written; "
              f"exit 0 after {seconds:.1f} s, {count} rows, no duplicate")
    finally:
        while len(cluster.workers) < 2:
            cluster.add_node(cpus=2)


def test_local_paths_work_on_one_machine_and_are_refused_on_two(cluster, tmp_path):
    root = tmp_path
    src, data, runs = root / "camvid", root / "prepared", root / "runs"
    write_dataset(str(src), layout="segnet", counts={"train": 16, "val": 8}, size=(32, 48), seed=4)
    # Every node on this machine (one address): local paths are shared, and used.
    _ok(cluster.run_job("prepare", "--source", str(src), "--dest", str(data)))
    assert set(json.loads((data / "dataset.json").read_text())["nodes"]) <= {n["node_id"] for n in cluster.workers}
    train_tiny_model(str(runs / "tiny" / "model"))

    far = cluster.add_node(cpus=1, ip="127.0.0.2")  # another address: another machine, as far as Ray can tell
    try:
        assert far["ip"] == "127.0.0.2"
        nodes = f"(the cluster has {len(cluster.nodes)} nodes on 2 machines)"
        cases = {
            "prepare": (["--source", str(src), "--dest", str(root / "again")], f"--source {src}", " (also for --dest)"),
            "train": (["--data", str(data), "--storage", str(runs), "--name", "r", "--epochs", "1", "--num-workers", "1",
                       "--base-channels", "4"], f"--data {data}", " (also for --storage)"),
            "infer": (["--model", str(runs / "tiny"), "--images", f"s3://{BUCKET}/none", "--output", str(root / "pred")],
                      f"--model {runs / 'tiny'}", " (also for --output)"),
        }
        for stage, (args, named, also) in cases.items():
            proc = cluster.run_job(stage, *args)
            assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines()[-1] == (
                f"{stage}: error: SharedStorageError: {named}: a local path is not shared between nodes {nodes}; "
                f"use s3://bucket/prefix, which every node reads{also}"), proc.stderr[-2000:]
        # Refused before anything was written (train made its run folder, empty, when it checked it was writable).
        assert not (root / "again").exists() and not (root / "pred").exists()
        assert not list((runs / "r").iterdir()) if (runs / "r").exists() else True
    finally:
        cluster.remove_node(far["node_id"])

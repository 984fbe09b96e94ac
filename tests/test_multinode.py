"""A Ray cluster of a head and two worker nodes on this machine (tests/multinode.py): a short
smoke test of infer spread over both nodes, and the local-path rule of segray/runtime.py.

The longer checks (every stage against a single-node run, a node lost under infer, the refusal
on a cluster of two machines) are in test_multinode_slow.py (``-m slow``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from segray import predictions, storage
from segray.runtime import local_path_problem
from segray.synthetic import render_scene

from multinode import node_ids, start_cluster
from test_infer_e2e import MODEL_SIZE, encode, train_tiny_model


def write_frames(root: str, count: int, seed: int = 0) -> str:
    """``count`` PNG frames of the model's size below ``<root>/frames``; returns that prefix."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        storage.write_bytes(f"{root}/frames/f{k:03d}.png", encode(render_scene(rng, *MODEL_SIZE)[0]))
    return f"{root}/frames"


@pytest.fixture(scope="module")
def cluster(s3_server):
    with start_cluster(nodes=2, cpus=2) as c:
        yield c


def test_infer_spreads_over_two_nodes(cluster, s3_prefix):
    start = time.monotonic()
    model = f"{s3_prefix}/runs/tiny"
    train_tiny_model(f"{model}/model")
    images = write_frames(s3_prefix, 24)  # two load tasks (16 files each at most)
    out = f"{s3_prefix}/pred"
    proc = cluster.run_job("infer", "--model", model, "--images", images, "--output", out, "--num-replicas", "2",
                           "--batch-size", "4", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = predictions.read_table(f"{out}/predictions")
    uris = table.column("uri").to_pylist()
    assert sorted(uris) == [f"{images}/f{k:03d}.png" for k in range(24)]  # every frame, once
    assert not predictions.parquet_files(f"{out}/errors")
    # The job's own record: which node's replica predicted each frame, which node decoded it.
    workers = {n["node_id"] for n in cluster.workers}
    predicted_on = node_ids(table.column(predictions.COL_PREDICT_NODE))
    decoded_on = node_ids(table.column(predictions.COL_DECODE_NODE))
    assert predicted_on == workers, (predicted_on, workers)  # one replica on each worker node
    assert decoded_on <= workers and decoded_on  # never the head: it has no CPU
    print(f"multinode smoke: infer of 24 frames on 2 nodes in {time.monotonic() - start:.1f} s; "
          f"decoded on {len(decoded_on)} nodes")


# ----------------------------------------------------------------------------- the local-path rule


def _node(node_id: str, ip: str, alive: bool = True) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive}


def test_local_paths_need_every_node_on_the_drivers_machine():
    one_machine = [_node("h", "10.0.0.1"), _node("w1", "10.0.0.1"), _node("w2", "10.0.0.1")]
    two_machines = one_machine + [_node("w3", "10.0.0.2")]
    local = {"--source": "s3://b/camvid", "--dest": "/data/prepared"}
    # Several nodes on one machine (a laptop, the tests' cluster) share its disk.
    assert local_path_problem(local, one_machine, "h") is None
    problem = local_path_problem(local, two_machines, "h")
    assert problem == ("--dest /data/prepared: a local path is not shared between nodes (the cluster has 4 nodes "
                       "on 2 machines); use s3://bucket/prefix, which every node reads")
    # Object storage everywhere: any cluster.
    assert local_path_problem({"--source": "s3://b/a", "--dest": "s3://b/c", "--labels": None}, two_machines, "h") is None
    # A dead node on another machine does not count; the driver's machine is its node's address.
    assert local_path_problem(local, one_machine + [_node("w3", "10.0.0.2", alive=False)], "h") is None
    assert local_path_problem(local, [_node("h", "10.0.0.2"), _node("w", "10.0.0.2")], "h") is None
    # A driver whose node is not listed: its own address decides.
    assert local_path_problem(local, one_machine, None, driver_ip="10.0.0.1") is None
    assert "on 2 machines" in local_path_problem(local, one_machine, None, driver_ip="10.0.0.9")
    # Every local flag counts, named in the order given.
    both = local_path_problem({"--data": "/d", "--storage": "/s"}, two_machines, "h")
    assert both.startswith("--data /d: ") and both.endswith("which every node reads (also for --storage)")

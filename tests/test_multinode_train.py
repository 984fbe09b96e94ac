"""Training across nodes (issue #18), on a cluster of real nodes on this machine (tests/multinode.py):
one training worker per node, and a worker node lost mid-epoch (its raylet killed, not drained).

Each node has one CPU, so the two workers of a run can only be placed one per node, and a run
that lost a node waits until one is back. Storage is the session's moto S3 server.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
import uuid

import pytest

from segray import storage

from conftest import BUCKET, REPO, latest_registered_checkpoint
from multinode import start_cluster

pytestmark = pytest.mark.slow

ARGS = ["--num-workers", "2", "--batch-size", "4", "--base-channels", "8", "--lr", "0.003", "--seed", "0"]
TRAIN_ROWS = 160  # 160 rows / 2 workers / batch 4 = 20 steps an epoch


@pytest.fixture(scope="module")
def prepared(s3_server, run_job) -> str:
    from segray.synthetic import write_dataset

    root = f"s3://{BUCKET}/mn-train-{uuid.uuid4().hex[:8]}"
    write_dataset(f"{root}/source", layout="segnet", counts={"train": TRAIN_ROWS, "val": 16}, size=(32, 48), seed=0)
    run_job("prepare", "--source", f"{root}/source", "--dest", f"{root}/prepared", check=True)
    return root


def history(run: str) -> list[dict]:
    return json.loads(storage.read_bytes(f"{run}/metrics.json"))["history"]


def test_training_puts_one_worker_on_each_node_and_equals_a_single_node_run(prepared, run_job):
    """The same command on two one-CPU nodes and on the session's single node: each rank gets the
    same rows wherever it runs (segray/ingest.py), so the runs are the same: the exported weights
    bitwise, every epoch's train loss and val mIoU exactly (val loss: val rows are dealt to the
    ranks as they ask, and float sums in another order differ in the last bits)."""
    import torch

    args = ("--data", f"{prepared}/prepared", "--storage", f"{prepared}/runs", "--epochs", "2", *ARGS)
    with start_cluster(nodes=2, cpus=1) as cluster:
        proc = cluster.run_job("train", *args, "--name", "spread", check=True)
        workers = {n["node_id"] for n in cluster.workers}
    assert "train: done:" in proc.stdout
    spread = history(f"{prepared}/runs/spread")
    for h in spread:
        assert len(h["nodes"]) == 2 and set(h["nodes"]) == workers, (h["nodes"], workers)
        assert h["train_images"] == TRAIN_ROWS
    run_job("train", *args, "--name", "single", check=True)
    single = history(f"{prepared}/runs/single")
    assert all(len(set(h["nodes"])) == 1 for h in single)
    for a, b in zip(spread, single):
        assert (a["train_loss"], a["val_miou"], a["val_iou"]) == (b["train_loss"], b["val_miou"], b["val_iou"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    weights = [torch.load(io.BytesIO(storage.read_bytes(f"{prepared}/runs/{n}/model/model.pt")), weights_only=True)
               for n in ("spread", "single")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_lost_node_costs_at_most_a_few_steps_and_the_run_finishes_once(prepared, tmp_path):
    """A worker node removed right after a mid-epoch checkpoint of epoch 2 registered: the run
    waits for a node (the one left has one CPU, the run needs two), resumes at that checkpoint's
    step once a node is added, finishes epoch 3 and exports once. The figures go to docs/scaling.md."""
    run = f"{prepared}/runs/lost"
    log = tmp_path / "train.log"
    with start_cluster(nodes=2, cpus=1) as cluster, open(log, "w") as out:
        job = subprocess.Popen(
            cluster.job_command("train", "--data", f"{prepared}/prepared", "--storage", f"{prepared}/runs", "--name",
                                "lost", "--epochs", "3", "--max-failures", "2", "--checkpoint-every-steps", "4", *ARGS),
            cwd=REPO, env=cluster.env(SEGRAY_PROGRESS_INTERVAL="0.5"), stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 600
            while not latest_registered_checkpoint(run).startswith("checkpoint_epoch_0002_step_"):
                assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.2)
            registered = latest_registered_checkpoint(run)
            shown = re.findall(r"train: epoch 2/3: +\d+% (\d+)/60 ", log.read_text())
            at_loss = int(shown[-1]) if shown else None  # steps done in all, as last shown (0.5 s old at most)
            victim = cluster.workers[-1]["node_id"]
            removed_at = time.monotonic()
            cluster.remove_node(victim)
            time.sleep(5)  # the run notices and waits: the node left holds one CPU, it needs two
            added = cluster.add_node(cpus=1)
            added_at = time.monotonic()
            while "worker resumed" not in log.read_text() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            resumed_at = time.monotonic()
            assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    output = log.read_text()
    resumed = re.search(r"train: worker resumed after epoch (\d+) and step (\d+) of epoch (\d+) of 3", output)
    assert resumed, output[-4000:]
    done, step, epoch = (int(g) for g in resumed.groups())
    assert (done, epoch) == (1, 2) and step >= int(registered.rsplit("_", 1)[1]), (resumed.group(0), registered)
    assert output.count("train: done: ") == 1 and len(history(run)) == 3
    h = history(run)
    assert [x["train_images"] for x in h] == [TRAIN_ROWS] * 3  # epoch 2's steps before the loss carried over
    assert victim not in h[2]["nodes"] and added["node_id"] in h[2]["nodes"], (h[2]["nodes"], victim, added)
    redone = None if at_loss is None else at_loss - (20 + step)  # 20 steps an epoch
    figures = {"registered": registered, "resumed_step": step, "steps_at_loss": at_loss, "steps_redone": redone,
               "s_loss_to_resumed": round(resumed_at - removed_at, 1), "s_node_added_to_resumed": round(resumed_at - added_at, 1)}
    print(f"SCALING_JSON {json.dumps(figures)}")
    assert at_loss is not None, "no progress line of epoch 2 before the loss"
    assert 0 <= redone <= 3 * 4 + 2, (at_loss, step)  # at most ~3 checkpoints' worth (docs/scaling.md)

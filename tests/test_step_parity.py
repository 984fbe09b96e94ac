"""The training loop's two rules (segray/worker.py), without Ray: step parity across DDP ranks,
and a mid-epoch resume that repeats the uninterrupted epoch exactly.

Parity runs two real processes joined by torch.distributed (gloo on 127.0.0.1), the ranks handed
unequal numbers of batches, as Ray Data's streaming iterator can (ray-project/ray#66085).
Without the guard the rank with more batches waits forever in DDP's all_reduce: the test then
fails at its timeout instead of hanging the suite.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from segray import worker
from segray.model import build_network
from segray.recipe import Augmentation, make_scheduler

from conftest import REPO, free_port

RANK_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from segray.recipe import Augmentation, make_scheduler
from segray.worker import train_one_epoch

rank, batches_here, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
net = torch.nn.Conv2d(3, 12, 3, padding=1)
model = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
sched = make_scheduler(opt, 0.1, "constant", [[0.0, 0.0], [1.0, 1.0]], 0, 5)
g = torch.Generator().manual_seed(rank)
batches = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 11, (2, 8, 8), generator=g))
           for _ in range(batches_here)]
steps_seen = []
totals = train_one_epoch(model, opt, sched, batches, None, 0, Augmentation(enabled=False), torch.device("cpu"), 11,
                         steps=5, after_step=lambda k, t: steps_seen.append(k))
w = [p.detach().sum().item() for p in net.parameters()]
print(json.dumps({"rank": rank, "steps": steps_seen, "images": totals[2].item(), "weights": w}), flush=True)
dist.destroy_process_group()
"""


def test_ranks_handed_unequal_batch_counts_run_the_same_steps_and_finish():
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(n), port], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, n in ((0, 5), (1, 3))]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        pytest.fail("a rank waited forever for a step the other never ran (no step parity)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [o["steps"] for o in outs] == [[1, 2, 3], [1, 2, 3]]  # both stop where the shorter one ends
    assert [o["images"] for o in outs] == [6.0, 6.0]
    assert outs[0]["weights"] == pytest.approx(outs[1]["weights"])  # DDP kept them in lock-step


def _shard(rows: int = 20, h: int = 16, w: int = 24):
    rng = np.random.default_rng(3)
    return (rng.integers(0, 255, (rows, h, w, 3), dtype=np.uint8), rng.integers(0, 12, (rows, h, w), dtype=np.uint8))


def _fresh(state: dict | None, position: float, steps: int):
    torch.manual_seed(0)
    model = build_network("unet", {"num_classes": 11, "base_channels": 4, "depth": 2})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    sched = make_scheduler(opt, 3e-3, "onecycle", [[0.0, 0.0], [1.0, 1.0]], position, steps)
    return model, opt, sched


def test_an_epoch_resumed_after_a_mid_epoch_checkpoint_repeats_the_uninterrupted_epoch_exactly():
    """What the worker does on a restart from ``checkpoint_epoch_NNNN_step_K``: the same batches
    from step K in the same order (``order[K * batch:]``), step K's augmentation seeded by K, the
    schedule at position K / steps, the summed loss of steps 0..K-1 carried over."""
    shard, batch, steps, cut = _shard(), 4, 5, 2
    order = np.random.default_rng(7).permutation(len(shard[0]))
    aug = Augmentation(enabled=True, crop=(16, 16), jitter=0.2)
    cpu = torch.device("cpu")

    def run(model, opt, sched, first, totals=None, after=None):
        batches = worker.array_batches(shard, batch, order[first * batch:], cpu, False)
        return worker.train_one_epoch(model, opt, sched, batches, None, 42, aug, cpu, 11, steps, first, totals, after)

    whole = _fresh(None, 0.0, steps)
    whole_totals = run(*whole, 0)

    saved = {}

    def checkpoint(k, totals):
        if k == cut:
            saved.update(model=whole_model_copy(first_pass[0]), optimizer=copy.deepcopy(first_pass[1].state_dict()),
                         totals=totals.clone())  # what torch.save writes at that moment

    def whole_model_copy(m):
        return {k: v.clone() for k, v in m.state_dict().items()}

    first_pass = _fresh(None, 0.0, steps)
    run(*first_pass, 0, after=checkpoint)  # the lost pass: its checkpoint after step 2 is what survives
    resumed = _fresh({"model": saved["model"], "optimizer": saved["optimizer"]}, cut / steps, steps)
    resumed_totals = run(*resumed, cut, saved["totals"])

    assert torch.equal(resumed_totals, whole_totals)
    for (name, a), b in zip(whole[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed[1].param_groups[0]["lr"] == whole[1].param_groups[0]["lr"]

"""The train stage's work in one plain PyTorch process: the baseline for jobs/train.py's epoch time.

Same model, data, loss, optimizer and augmentation as segray.train (its functions), without Ray:
the prepared Parquet shards read with pyarrow into memory, one process, torch on every core,
then a validation pass with the same confusion-matrix metric. With ``--world N`` the same loop runs as
N DDP processes over gloo (torch.multiprocessing, no Ray): the job's training minus Ray.

    MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=2000000000 \\
    python bench/train_plain.py --data /tmp/prep/camvid176 --base-channels 16 --batch-size 8 --epochs 1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from segray import storage  # noqa: E402
from segray.dataset import COL_IMAGE, COL_LABEL, load_info, rows_to_arrays, split_uri  # noqa: E402
from segray.metrics import summarize  # noqa: E402
from segray.model import DEFAULT_ARCH, build_network  # noqa: E402
from segray.recipe import augment, class_weights, weighted_loss_sum  # noqa: E402
from segray.worker import array_batches, evaluate  # noqa: E402


def load_split(data: str, split: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    fs, path = storage.resolve(split_uri(data, split))
    table = pq.read_table(path, filesystem=fs, columns=[COL_IMAGE, COL_LABEL])
    images, labels = rows_to_arrays(table.to_pydict(), height, width)
    return images.copy(), labels.copy()


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, order: np.ndarray):
    """The job's own batching of an in-memory shard (segray.worker.array_batches), on the CPU."""
    return array_batches((images, labels), batch_size, order, torch.device("cpu"), False)


def run(rank: int, args: argparse.Namespace) -> None:
    """One process of the loop: the whole job when ``--world 1``, else one rank of a gloo DDP group
    that trains on its 1/world share of every epoch's permutation (what a DDP worker of the job does,
    without Ray: its data feed, actors and scheduling)."""
    world = args.world
    if args.pin:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world)
    info = load_info(args.data)
    t0 = time.perf_counter()
    train_x, train_y = load_split(args.data, "train", info.height, info.width)
    val_x, val_y = load_split(args.data, "val", info.height, info.width)
    if rank == 0:
        print(f"plain: read {len(train_x)} train + {len(val_x)} val rows at {info.height}x{info.width} in "
              f"{time.perf_counter() - t0:.1f} s; {args.threads} threads" + (f" x {world} DDP ranks" if world > 1 else ""),
              flush=True)

    model = build_network(DEFAULT_ARCH, {"base_channels": args.base_channels, "num_classes": len(info.classes)})
    net = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    w = class_weights(args.class_weighting, info.class_pixel_counts)
    weight = None if w is None else torch.from_numpy(w)
    rng = np.random.default_rng(args.seed)  # the same permutation on every rank; each takes its slice
    generator = torch.Generator().manual_seed(args.seed + rank)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = rng.permutation(len(train_x))
        order = order[: len(order) // world * world][rank::world]  # equal shards, as the job's split
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        total, denom_total = 0.0, 0.0
        for x, y in batches(train_x, train_y, args.batch_size, order):
            if args.augment:
                x, y = augment(x, y, generator)
            loss_sum, denom = weighted_loss_sum(model(x), y, weight)
            loss = loss_sum / denom.clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, denom_total = total + loss.item() * denom.item(), denom_total + denom.item()
        if world > 1:
            dist.barrier()
        train_s = time.perf_counter() - t0
        images = len(order) * world
        cm, val_loss = evaluate(net, batches(val_x, val_y, args.batch_size, np.arange(len(val_x))), weight, torch.device("cpu"),
                                  len(info.classes), info.void_index)
        epoch_s = time.perf_counter() - t0
        s = summarize(cm, info.classes)
        if rank == 0:
            print(
                f"plain: epoch {epoch}/{args.epochs}  train_loss {total / max(denom_total, 1e-12):.4f}  "
                f"val_loss {val_loss[0].item() / max(val_loss[1].item(), 1e-12):.4f}  val_mIoU {s['miou']:.4f}  "
                f"pixel_acc {s['pixel_accuracy']:.4f}  train {train_s:.1f} s ({images / train_s:.4g} images/s, "
                f"{math.ceil(len(order) / args.batch_size)} steps)  epoch {epoch_s:.1f} s",
                flush=True,
            )
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared dataset (jobs/prepare.py --dest)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step and rank (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--class-weighting", default="sqrt_median_freq")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: all cores, or 1 with --world > 1)")
    parser.add_argument("--world", type=int, default=1,
                        help="DDP processes over gloo (torch.multiprocessing, no Ray); validation on rank 0's "
                        "whole split (default 1: a single process, no DDP)")
    parser.add_argument("--pin", action="store_true", help="pin rank r to core r (sched_setaffinity)")
    parser.add_argument("--port", type=int, default=29533, help="rendezvous port for --world > 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.world > 1 else os.cpu_count()
    if args.world == 1:
        run(0, args)
    else:
        torch.multiprocessing.spawn(run, args=(args,), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())

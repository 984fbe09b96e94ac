"""CPU training and validation speed of ``train --precision bf16`` against fp32, per U-Net width.

    python bench/precision_bench.py --rounds 3

The worker's own code path without Ray: one torch thread (a CPU worker's default), a U-Net of
each ``--widths`` base width, batches of ``--batch`` random 128x192 crops through
``segray.worker.train_one_epoch`` (the recipe's augmentation, AdamW, one-cycle) and whole
176x240 frames through ``segray.worker.evaluate``, each with ``precision`` fp32 and bf16 (bf16
also channels-last, as the worker does). Rounds are interleaved over the settings, so that load
on a shared machine falls on all of them alike; the figure is the median over rounds of each
setting's seconds per step, and the ratio is fp32's time over bf16's for the same width in the
same rounds. bf16 is only native on CPUs with AMX or AVX512-BF16 (segray.precision.native_bf16_cpu);
elsewhere the worker trains in fp32 and this script says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.benchlib import emit_json, median, print_table  # noqa: E402
from segray import worker  # noqa: E402
from segray.precision import native_bf16_cpu  # noqa: E402
from segray.model import build_network  # noqa: E402
from segray.recipe import Augmentation, make_scheduler  # noqa: E402

CPU = torch.device("cpu")
CLASSES, VOID = 11, 11


def _model(width: int, precision: str):
    torch.manual_seed(0)
    model = build_network("unet", {"num_classes": CLASSES, "base_channels": width})
    return model.to(memory_format=torch.channels_last) if precision == "bf16" else model


def _shard(rows: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (rows, h, w, 3), dtype=np.uint8), rng.integers(0, CLASSES + 1, (rows, h, w),
                                                                               dtype=np.uint8)


def train_s_per_step(width: int, precision: str, steps: int, batch: int, shard) -> float:
    model = _model(width, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = make_scheduler(opt, 3e-3, "onecycle", [[0.0, 0.0], [1.0, 1.0]], 0, steps + 1)
    aug = Augmentation(enabled=True, crop=(128, 192), scale_range=(0.8, 1.25))
    order = np.arange(batch * (steps + 1)) % len(shard[0])
    batches = list(worker.array_batches(shard, batch, order, CPU, precision == "bf16"))
    # The first step (oneDNN's kernel selection) is not timed.
    worker.train_one_epoch(model, opt, sched, batches[:1], None, 0, aug, CPU, VOID, 1, precision=precision)
    t = time.perf_counter()
    worker.train_one_epoch(model, opt, sched, batches[1:], None, 0, aug, CPU, VOID, steps, precision=precision)
    return (time.perf_counter() - t) / steps


def eval_s_per_batch(width: int, precision: str, batches_n: int, batch: int, shard) -> float:
    model = _model(width, precision)
    order = np.arange(batch * (batches_n + 1)) % len(shard[0])
    batches = list(worker.array_batches(shard, batch, order, CPU, precision == "bf16"))
    worker.evaluate(model, batches[:1], None, CPU, CLASSES, VOID, precision)
    t = time.perf_counter()
    worker.evaluate(model, batches[1:], None, CPU, CLASSES, VOID, precision)
    return (time.perf_counter() - t) / batches_n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="16,24,32", help="U-Net base widths (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per setting and round")
    ap.add_argument("--batch", type=int, default=4, help="images per step (the CPU recipe's per-worker batch)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a CPU worker's default: 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    native = native_bf16_cpu()
    print(f"native bf16 on this CPU (AMX or AVX512-BF16): {native}; MALLOC_MMAP_THRESHOLD_="
          f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}", flush=True)
    if not native:
        print("bf16 is emulated here: segray trains in fp32 on this CPU even with --precision bf16", flush=True)
    widths = [int(w) for w in args.widths.split(",")]
    train_shard = _shard(16, 176, 240)
    times: dict[tuple[int, str, str], list[float]] = {}
    for r in range(args.rounds):
        for width in widths:
            for precision in ("fp32", "bf16"):
                tr = train_s_per_step(width, precision, args.steps, args.batch, train_shard)
                ev = eval_s_per_batch(width, precision, args.steps, args.batch, train_shard)
                times.setdefault((width, precision, "train"), []).append(tr)
                times.setdefault((width, precision, "eval"), []).append(ev)
                print(f"round {r + 1} width {width} {precision}: train {tr * 1e3:.0f} ms/step, "
                      f"val {ev * 1e3:.0f} ms/batch", flush=True)
    rows = []
    base = median(times[(16, "fp32", "train")]) if 16 in widths else None
    for width in widths:
        row = {"width": width}
        for kind in ("train", "eval"):
            fp32, bf16 = median(times[(width, "fp32", kind)]), median(times[(width, "bf16", kind)])
            row[f"{kind} fp32 ms"] = fp32 * 1e3
            row[f"{kind} bf16 ms"] = bf16 * 1e3
            row[f"{kind} fp32/bf16"] = fp32 / bf16
        if base:
            row["train bf16 vs width 16 fp32"] = median(times[(width, "bf16", "train")]) / base
        rows.append(row)
    print_table(rows, title=f"median of {args.rounds} rounds; train: {args.batch} crops 128x192 per step; "
                f"val: {args.batch} frames 176x240 per batch; {args.threads} thread(s)")
    emit_json("precision_bench", {"native_bf16": native, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

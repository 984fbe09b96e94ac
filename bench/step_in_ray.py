"""Is a training step slower in a Ray worker than in a plain process, and why? One-thread train steps
of the U-Net for a fixed time, pinned to core 0, in: a plain process (main thread), a thread of a plain
process with the high malloc thresholds alone, the same with the CPU workers' full settings
(segray.runtime.CPU_MALLOC_ENV), a Ray task, and a thread of a Ray task (as Ray Train runs its
training loop). Page faults per step are printed beside the speed.

    python bench/step_in_ray.py --seconds 20                                   # base 16, 176x240, batch 8
    python bench/step_in_ray.py --seconds 30 --size 352x480 --batch-size 4     # activations of 40-90 MiB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.runtime import CPU_MALLOC_ENV  # noqa: E402


def steps_per_second(seconds: float, base: int, size: str, batch: int) -> tuple[float, float]:
    """(images/s, minor page faults per step) of one-thread train steps on core 0, in the calling thread."""
    import torch

    from segray.model import DEFAULT_ARCH, build_network

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h, w = (int(v) for v in size.split("x"))
    model = build_network(DEFAULT_ARCH, {"base_channels": base})
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(batch, 3, h, w), torch.randint(0, 11, (batch, h, w))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    rate = steps * batch / (time.perf_counter() - t0)
    return rate, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps


def in_thread(*args) -> tuple[float, float]:
    out: list[tuple[float, float]] = []
    t = threading.Thread(target=lambda: out.append(steps_per_second(*args)))
    t.start()
    t.join()
    return out[0]


def plain(args, env: dict[str, str], thread: bool) -> tuple[float, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cmd = [sys.executable, __file__, "--one", "thread" if thread else "main", "--seconds", str(args.seconds),
           "--base-channels", str(args.base_channels), "--size", args.size, "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout.splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--size", default="176x240")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--one", choices=("main", "thread"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = (args.seconds, args.base_channels, args.size, args.batch_size)
    if args.one:
        print(json.dumps((in_thread if args.one == "thread" else steps_per_second)(*work)))
        return 0
    thresholds = {k: v for k, v in CPU_MALLOC_ENV.items() if "THRESHOLD" in k}
    rows = [("plain process, main thread", plain(args, dict(CPU_MALLOC_ENV), False)),
            ("plain process, a thread, thresholds only", plain(args, thresholds, True)),
            ("plain process, a thread, CPU_MALLOC_ENV", plain(args, dict(CPU_MALLOC_ENV), True))]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(CPU_MALLOC_ENV)})
    remote = ray.remote(num_cpus=1)
    rows.append(("Ray task", ray.get(remote(steps_per_second).remote(*work))))
    rows.append(("thread of a Ray task", ray.get(remote(in_thread).remote(*work))))
    ray.shutdown()
    base = rows[0][1][0]
    print(f"one-thread train steps, base {args.base_channels}, {args.size}, batch {args.batch_size} "
          f"(CPU_MALLOC_ENV = {CPU_MALLOC_ENV}):")
    for name, (rate, faults) in rows:
        print(f"  {name:42s} {rate:7.3f} images/s  {rate / base:5.2f}x  {faults:9.0f} page faults/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())

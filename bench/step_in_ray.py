"""Is a Ray worker process slower at a training step than a plain process? One-thread train steps
of the CPU default U-Net (base 16, batch 8, 176x240) for a fixed time, pinned to core 0, in:
a plain process, a Ray task, and a thread of a Ray task (as Ray Train runs its training loop).

    python bench/step_in_ray.py --seconds 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.runtime import CPU_MALLOC_ENV  # noqa: E402


def steps_per_second(seconds: float) -> float:
    """Images/s of one-thread train steps on core 0, in the calling thread."""
    import torch

    from segray.model import UNetConfig, build_model

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(UNetConfig(base_channels=16))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(8, 3, 176, 240), torch.randint(0, 11, (8, 176, 240))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    step()
    t0, images = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        images += 8
    return images / (time.perf_counter() - t0)


def in_thread(seconds: float) -> float:
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(steps_per_second(seconds)))
    t.start()
    t.join()
    return out[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_only:
        print(f"{steps_per_second(args.seconds):.3f}")
        return 0
    env = {**os.environ, **CPU_MALLOC_ENV}
    plain = float(subprocess.run([sys.executable, __file__, "--plain-only", "--seconds", str(args.seconds)],
                                 env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(CPU_MALLOC_ENV)})
    task = ray.get(ray.remote(num_cpus=1)(steps_per_second).remote(args.seconds))
    thread = ray.get(ray.remote(num_cpus=1)(in_thread).remote(args.seconds))
    ray.shutdown()
    print(f"one-thread train step, images/s: plain process {plain:.2f}, Ray task {task:.2f} ({task / plain:.2f}x), "
          f"thread of a Ray task {thread:.2f} ({thread / plain:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

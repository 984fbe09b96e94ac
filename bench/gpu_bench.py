"""The model and inference benchmarks on a GPU node: bf16 autocast, channels_last, replicas per GPU.

    python bench/gpu_bench.py                          # on a machine with a CUDA GPU, ~10 minutes
    python bench/gpu_bench.py --what matmul,model      # the model-only part
    python bench/gpu_bench.py --device cpu --smoke     # check the code paths on a CPU box (tiny sizes)

1. Peak: the GPU's dense bf16 tensor-core peak from its name (table below; the vendor's
   datasheet figure, without sparsity) and the attainable one, a bf16 matmul (8192^3) measured.
2. model: model-only forward (pre-decoded uint8 frames -> normalise -> U-Net -> argmax, as the
   job's GPU replica) for the CPU-default U-Net (base 16, 176x240) and the paper's (base 64,
   352x480): fp32 vs bf16 autocast, NCHW vs channels_last, batch sizes; images/s, TFLOP/s,
   % of the datasheet peak and of the matmul.
3. train: train step (forward, cross-entropy, backward, AdamW) with bf16 autocast + channels_last,
   as the job's GPU workers.
4. replicas: 1, 2, 4 processes sharing the GPU, each running the forward loop; the total
   images/s says whether several model replicas per GPU help (small models leave it idle
   between kernel launches).
5. e2e: ``jobs/infer.py --use-gpu`` on a local Ray cluster (this process's own) vs
   ``bench/infer_plain.py --device cuda`` and the ideal pipeline 1 / (t_model + t_io / cores)
   over synthetic 360x480 frames on local disk (bench/infer_bench.py's inputs and measurements).

Timings synchronise the device (torch.cuda.synchronize) before reading the clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

MODELS = {"cpu": (16, (176, 240)), "paper": (64, (352, 480))}
# Dense bf16 tensor-core TFLOP/s (datasheets, no sparsity). A name not listed: measured matmul only.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def datasheet_peak(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_loop(step, device, seconds: float, warmup: int = 3, min_calls: int = 5) -> tuple[int, float]:
    for _ in range(warmup):
        step()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        step()
        calls += 1
    sync(device)
    return calls, time.perf_counter() - t0


def matmul_tflops(device, n: int, seconds: float) -> float:
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    calls, s = timed_loop(lambda: a @ b, device, seconds)
    return 2 * n**3 * calls / s / 1e12


def build(model_name: str, device, channels_last: bool, train: bool):
    import torch

    from segray.model import DEFAULT_ARCH, build_network

    base, size = MODELS[model_name]
    torch.manual_seed(0)
    model = build_network(DEFAULT_ARCH, {"base_channels": base}).to(device)
    model.train(train)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, size


def forward_step(model, frames, device, bf16: bool, channels_last: bool):
    import torch

    from segray import modelio

    def step():
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            x = modelio.images_to_tensor(frames, device=device, channels_last=channels_last)
            return model(x).argmax(dim=1).to(torch.uint8)

    return step


def measure_model(model_name: str, device, batches, seconds: float, flops_fwd: float) -> list[dict]:
    import numpy as np
    import torch

    rows = []
    for bf16 in (False, True):
        for cl in (False, True):
            model, size = build(model_name, device, cl, train=False)
            for batch in batches:
                frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8))
                if device.type == "cuda":
                    frames = frames.pin_memory()
                try:
                    calls, s = timed_loop(forward_step(model, frames, device, bf16, cl), device, seconds)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    continue
                ips = calls * batch / s
                rows.append({"model": model_name, "mode": "infer", "bf16": bf16, "channels_last": cl, "batch": batch,
                             "images_per_s": ips, "tflops": ips * flops_fwd / 1e12})
                print(f"  {model_name} forward bf16={int(bf16)} cl={int(cl)} batch {batch:3d}: {ips:8.1f} images/s",
                      flush=True)
            del model
    return rows


def measure_train(model_name: str, device, batches, seconds: float, flops_train: float) -> list[dict]:
    import numpy as np
    import torch

    from segray import modelio
    from segray.recipe import weighted_loss_sum

    rows = []
    for cl in (False, True):
        model, size = build(model_name, device, cl, train=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for batch in batches:
            rng = np.random.default_rng(0)
            frames = torch.from_numpy(rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)).to(device)
            labels = torch.from_numpy(rng.integers(0, 11, (batch, *size))).long().to(device)

            def step():
                x = modelio.images_to_tensor(frames, device=device, channels_last=cl)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                    logits = model(x)
                loss_sum, denom = weighted_loss_sum(logits, labels, None)
                opt.zero_grad(set_to_none=True)
                (loss_sum / denom).backward()
                opt.step()

            try:
                calls, s = timed_loop(step, device, seconds)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            ips = calls * batch / s
            rows.append({"model": model_name, "mode": "train", "bf16": True, "channels_last": cl, "batch": batch,
                         "images_per_s": ips, "tflops": ips * flops_train / 1e12})
            print(f"  {model_name} train bf16=1 cl={int(cl)} batch {batch:3d}: {ips:8.1f} images/s", flush=True)
        model = opt = None  # free the device memory before the next format
    return rows


def _replica_worker(model_name: str, device_name: str, batch: int, seconds: float, barrier, queue) -> None:
    import numpy as np
    import torch

    device = torch.device(device_name)
    model, size = build(model_name, device, True, train=False)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8))
    if device.type == "cuda":
        frames = frames.pin_memory()
    step = forward_step(model, frames, device, device.type == "cuda", True)
    for _ in range(3):
        step()
    sync(device)
    barrier.wait()
    calls, s = timed_loop(step, device, seconds, warmup=0)
    queue.put(calls * batch / s)


def measure_replicas(model_name: str, device, counts, batch: int, seconds: float) -> list[dict]:
    """Total images/s of N processes sharing the device, each with its own model replica."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = []
    for n in counts:
        barrier, queue = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_replica_worker, args=(model_name, str(device), batch, seconds, barrier, queue))
                 for _ in range(n)]
        for p in procs:
            p.start()
        rates = [queue.get(timeout=seconds * 10 + 300) for _ in procs]
        for p in procs:
            p.join()
        rows.append({"model": model_name, "replicas": n, "batch": batch, "images_per_s": sum(rates)})
        print(f"  {model_name}: {n} replica(s) x batch {batch}: {sum(rates):.1f} images/s in total", flush=True)
    return rows


def measure_e2e(workdir: Path, frames: int, repeats: int) -> list[dict]:
    """jobs/infer.py --use-gpu vs infer_plain --device cuda vs the ideal, local files."""
    import infer_bench

    infer_bench.VARIANTS["ray-gpu"] = ("jobs/infer.py", ["--use-gpu"], "gpu")
    infer_bench.VARIANTS["ray-gpu-bs64"] = ("jobs/infer.py", ["--use-gpu", "--batch-size", "64"], "gpu")
    infer_bench.VARIANTS["plain-gpu"] = ("bench/infer_plain.py", ["--device", "cuda"], "gpu")
    m = benchlib.machine()
    inp = infer_bench.Inputs(workdir, s3=False)
    model = inp.model("cpu")
    rows = []
    with benchlib.local_ray(m.cores) as address:
        for rep in range(repeats):
            t_model = run_gpu_model_only("cpu", 16)
            for kind in ("files", "tar"):
                images = inp.frames(kind, frames)
                io = infer_bench.run_one("io", {"images": images, "size": MODELS["cpu"][1], "limit": min(frames, 300),
                                                "output": inp.output(f"gpu-io-{kind}", "local")})
                ideal = infer_bench.ideal(t_model, io["s_per_frame"], m.cores)
                plain_fps = None
                for v in ("ray-gpu", "ray-gpu-bs64", "plain-gpu"):
                    row = infer_bench.run_e2e(v, images, inp.output(f"gpu-{kind}-{v}", "local"), model, address,
                                              None, m.cores)
                    row.update(rep=rep + 1, source=f"local {kind}", ideal_fps=ideal, t_io_ms=io["s_per_frame"] * 1e3,
                               t_model_ms=t_model * 1e3, vs_ideal=row["fps"] / ideal)
                    if v == "plain-gpu":
                        plain_fps = row["fps"]
                    rows.append(row)
                    print(f"  [e2e {kind} rep {rep + 1}] {v:12s} {row['fps']:.1f} frames/s ({row['vs_ideal']:.2f} x "
                          f"ideal {ideal:.1f})", flush=True)
                for row in rows[-3:]:
                    row["vs_plain"] = row["fps"] / plain_fps if plain_fps else None
    return rows


def run_gpu_model_only(model_name: str, batch: int) -> float:
    """Seconds per frame of the job's GPU replica computation (bf16, channels_last), in-process."""
    import numpy as np
    import torch

    device = torch.device("cuda")
    model, size = build(model_name, device, True, train=False)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8))
    calls, s = timed_loop(forward_step(model, frames, device, True, True), device, 10)
    return s / (calls * batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="matmul,model,train,replicas,e2e")
    p.add_argument("--models", default="cpu,paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    p.add_argument("--e2e-frames", type=int, default=2000, help="frames per end-to-end run (default 2000)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/segray-bench")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and times: check the code paths (e.g. on CPU)")
    args = p.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU node, "
              "or pass --device cpu --smoke to check the code paths", file=sys.stderr)
        return 1
    what = set(args.what.split(","))
    models = args.models.split(",")
    if args.smoke:
        args.seconds, args.e2e_frames = 0.2, 32
        MODELS["cpu"], MODELS["paper"] = (4, (64, 96)), (8, (64, 96))
        what.discard("e2e") if device.type != "cuda" else None
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = datasheet_peak(name) if device.type == "cuda" else None
    import flops

    fl = {m: (flops.count_flops(*MODELS[m], train=False)[0], flops.count_flops(*MODELS[m], train=True)[0])
          for m in models}
    print(f"device: {name}; datasheet bf16 dense peak: {peak or 'unknown'} TFLOP/s; torch {torch.__version__}",
          flush=True)
    out: dict = {"device": name, "datasheet_bf16_tflops": peak, "flops_per_image": fl}
    if "matmul" in what:
        n = 1024 if args.smoke else 8192
        out["matmul_tflops"] = matmul_tflops(device, n, args.seconds)
        print(f"  bf16 matmul {n}^3: {out['matmul_tflops']:.1f} TFLOP/s", flush=True)
    rows = []
    for m in models:
        if "model" in what:
            batches = (2,) if args.smoke else (8, 16, 32, 64) if m == "cpu" else (4, 8, 16)
            rows += measure_model(m, device, batches, args.seconds, fl[m][0])
        if "train" in what:
            batches = (2,) if args.smoke else (8, 16, 32) if m == "cpu" else (2, 4, 8)
            rows += measure_train(m, device, batches, args.seconds, fl[m][1])
    for r in rows:
        if peak:
            r["pct_peak"] = 100 * r["tflops"] / peak
        if out.get("matmul_tflops"):
            r["pct_matmul"] = 100 * r["tflops"] / out["matmul_tflops"]
    if rows:
        benchlib.print_table(rows, title="Model-only (forward) and train step")
    out["model"] = rows
    if "replicas" in what:
        rep_rows = []
        for m in models:
            rep_rows += measure_replicas(m, device, (1, 2, 4) if not args.smoke else (1, 2),
                                         2 if args.smoke else 16 if m == "cpu" else 4, args.seconds * 2)
        benchlib.print_table(rep_rows, title="Replicas sharing one device")
        out["replicas"] = rep_rows
    if "e2e" in what:
        e2e = measure_e2e(Path(args.workdir), args.e2e_frames, args.repeats)
        benchlib.print_table(e2e, ["source", "variant", "rep", "frames", "fps", "ideal_fps", "vs_ideal", "vs_plain",
                                   "t_io_ms", "t_model_ms", "cpu_s_per_frame", "peak_pss_mib"],
                             title="Inference end to end on the GPU node")
        out["e2e"] = e2e
    benchlib.emit_json("gpu", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

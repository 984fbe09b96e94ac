"""Hardware ceiling of the U-Net on this CPU: FLOPs per image, measured conv FLOP/s, peak FLOP/s.

    python bench/flops.py                 # the full sweep, ~15 minutes on 2 shared cores
    python bench/flops.py --quick         # CPU-default model only, fewer rounds, ~4 minutes
    python bench/flops.py --models cpu --modes infer --rounds 4

1. FLOPs per image, counted with torch.utils.flop_counter.FlopCounterMode (2 FLOPs per
   multiply-add; every FLOP it counts in the U-Net is aten.convolution or its backward):
   forward, and train step (forward + backward), for the CPU default (base 16 at 176x240) and
   the paper's width (base 64) at 352x480.
2. The CPU's fp32 peak = cores x FMA units x SIMD lanes x 2 x clock. Lanes from the flags
   (avx512f: 16, avx2: 8); 2 FMA units assumed (Zen 2/3/4, Intel since Haswell; no OS
   interface reports them); the clock is the nominal one /proc/cpuinfo reports (a KVM guest
   sees the TSC rate, not the boost clock; --clock-ghz to assume another). A 2048^3 MKL sgemm
   measured in the same process gives the attainable peak of the moment.
3. Settings vary one dimension at a time around a base (batch, threads, channels_last,
   BatchNorm folded into the convs for inference): model-only forward (inference_mode,
   normalise, argmax) or train step (forward, cross-entropy, backward, AdamW) on random
   tensors. All settings of one process run interleaved, round after round, so that they see
   the same contention; the fastest round of each is the estimate of its uncontended speed
   (other processes only ever add time) and the median is shown too. Allocators (glibc
   defaults, segray's thresholds, jemalloc, tcmalloc) need a fresh process each: those
   processes alternate, --malloc-rounds times, and each setting keeps its fastest step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

MODELS = {  # name -> (base channels, (height, width))
    "cpu": (16, (176, 240)),
    "paper": (64, (352, 480)),
}
BASE_BATCH = {"cpu": 8, "paper": 2}
BATCHES = {"cpu": (1, 4, 16), "paper": (1, 4)}
MALLOCS = ("glibc", "thresholds", "jemalloc", "tcmalloc")
SGEMM_N = 2048


def count_flops(base: int, size: tuple[int, int], train: bool) -> tuple[float, dict[str, float]]:
    """FLOPs of one image (batch 1): forward, or forward + backward; and per aten op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segray.model import DEFAULT_ARCH, build_network

    model = build_network(DEFAULT_ARCH, {"base_channels": base})
    model.train(train)
    x = torch.randn(1, 3, *size)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    per_op = {str(k): float(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return float(counter.get_total_flops()), per_op


def fold_batchnorm(model):
    """Inference only: every Conv2d followed by a BatchNorm2d in a Sequential becomes one conv
    with the BN folded into its weights and bias (the BN becomes Identity). Same outputs."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for mod in model.modules():
        if isinstance(mod, torch.nn.Sequential):
            names = list(mod._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = mod._modules[a], mod._modules[b]
                if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                    mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                    mod._modules[b] = torch.nn.Identity()
    return model


def conv_time_fraction(step, iters: int = 1) -> float:
    """Share of the step's operator time spent in convolution kernels (torch.profiler self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    total = conv = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if "conv" in e.key or "mkldnn" in e.key:
            conv += e.self_cpu_time_total
    return conv / total if total else float("nan")


def make_step(cfg: dict):
    """A closure that runs one forward (infer) or train step of ``cfg`` on random data."""
    import numpy as np
    import torch

    from segray import modelio
    from segray.model import DEFAULT_ARCH, build_network
    from segray.recipe import weighted_loss_sum

    base, size = MODELS[cfg["model"]]
    batch, cl = cfg["batch"], cfg["channels_last"]
    torch.manual_seed(0)
    model = build_network(DEFAULT_ARCH, {"base_channels": base})
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 11, (batch, *size))).long()
    if cfg["mode"] == "infer":
        model.eval()
        if cfg.get("fold_bn"):
            model = fold_batchnorm(model)
        if cl:
            model = model.to(memory_format=torch.channels_last)

        def step() -> None:
            with torch.inference_mode():
                x = modelio.images_to_tensor(frames, channels_last=cl)
                model(x).argmax(dim=1).to(torch.uint8)

        return step
    model.train()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def train_step() -> None:
        x = modelio.images_to_tensor(frames, channels_last=cl)
        loss_sum, denom = weighted_loss_sum(model(x), labels, None)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / denom).backward()
        optimizer.step()

    return train_step


def sgemm_step():
    import torch

    a, b = torch.randn(SGEMM_N, SGEMM_N), torch.randn(SGEMM_N, SGEMM_N)
    return lambda: a @ b


def measure_group(job: dict) -> list[dict]:
    """In this fresh process: every setting of ``job`` interleaved for ``rounds`` rounds."""
    import torch

    settings = job["settings"]
    threads = sorted({s["threads"] for s in settings})
    steps = [make_step(s) for s in settings]
    sgemm = sgemm_step()
    timings: list[list] = [[] for _ in settings]
    sg: dict[int, list] = {t: [] for t in threads}
    for r in range(job["rounds"] + 1):  # round 0 warms up every setting
        for t in threads:
            torch.set_num_threads(t)
            with benchlib.timed() as tm:
                sgemm()
            if r:
                sg[t].append(tm)
        for i, (s, step) in enumerate(zip(settings, steps)):
            torch.set_num_threads(s["threads"])
            with benchlib.timed() as tm:
                step()
            if r:
                timings[i].append(tm)
    out = []
    for s, step, times in zip(settings, steps, timings):
        torch.set_num_threads(s["threads"])
        best, med = benchlib.best_and_median(times)
        sg_best = min(sg[s["threads"]], key=lambda t: t.wall_s)
        sg_cpu = min(t.cpu_s for t in sg[s["threads"]])
        out.append({
            **s,
            "malloc": job["malloc"],
            "step_s": best.wall_s,
            "step_s_median": med,
            "cpu_share": best.share(s["threads"]),
            "sgemm_gflops": 2 * SGEMM_N**3 / sg_best.wall_s / 1e9,
            # CPU seconds (all threads): what a step costs whoever else runs; robust to contention.
            "cpu_s": min(t.cpu_s for t in times),
            "sgemm_gflops_per_cpu_s": 2 * SGEMM_N**3 / sg_cpu / 1e9,
            "conv_time_fraction": conv_time_fraction(step) if s.get("profile") else None,
            "rounds": len(times),
        })
    return out


def settings_for(model: str, mode: str, vary: set[str], cores: int) -> list[dict]:
    """The base setting of (model, mode), then one dimension varied at a time."""
    base = {"model": model, "mode": mode, "batch": BASE_BATCH[model], "threads": cores, "channels_last": True,
            "fold_bn": False}
    out = [{**base, "profile": True}]
    if "channels_last" in vary:
        out.append({**base, "channels_last": False, "profile": True})
    if "fold_bn" in vary and mode == "infer":
        out.append({**base, "fold_bn": True})
    if "threads" in vary:
        out += [{**base, "threads": t} for t in range(1, cores)]
    if "batch" in vary:
        out += [{**base, "batch": b} for b in BATCHES[model] if not (model == "paper" and mode == "train" and b > 2)]
    return out


def run_group(job: dict, timeout: float = 1800) -> list[dict]:
    env = benchlib.malloc_env(job["malloc"])
    r = benchlib.run_cmd([sys.executable, __file__, "--one", json.dumps(job)], env=env, timeout=timeout)
    docs = benchlib.parse_json_lines(r.out)
    if r.rc != 0 or not docs:
        raise RuntimeError(f"settings {job} failed (exit {r.rc}):\n{r.out[-3000:]}")
    return docs[-1]["result"]


def key_of(s: dict) -> str:
    return json.dumps({k: s[k] for k in ("model", "mode", "batch", "threads", "channels_last", "fold_bn", "malloc")},
                      sort_keys=True)


def merge_best(rows: list[dict]) -> list[dict]:
    """Rows of the same setting from several processes -> the fastest, with all rounds' median."""
    best: dict[str, dict] = {}
    medians: dict[str, list[float]] = {}
    for r in rows:
        k = key_of(r)
        medians.setdefault(k, []).append(r["step_s_median"])
        if k not in best or r["step_s"] < best[k]["step_s"]:
            cpu = min(r["cpu_s"], best[k]["cpu_s"]) if k in best else r["cpu_s"]
            sg = max(r["sgemm_gflops_per_cpu_s"], best[k]["sgemm_gflops_per_cpu_s"]) if k in best else \
                r["sgemm_gflops_per_cpu_s"]
            best[k] = dict(r, cpu_s=cpu, sgemm_gflops_per_cpu_s=sg)
        else:
            best[k]["cpu_s"] = min(best[k]["cpu_s"], r["cpu_s"])
            best[k]["sgemm_gflops_per_cpu_s"] = max(best[k]["sgemm_gflops_per_cpu_s"], r["sgemm_gflops_per_cpu_s"])
    fractions = {key_of(r): r["conv_time_fraction"] for r in rows if r.get("conv_time_fraction") is not None}
    for k, r in best.items():
        r["step_s_median"] = benchlib.median(medians[k])
        r["conv_time_fraction"] = fractions.get(k)
    return list(best.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cpu,paper", help="cpu (base 16, 176x240) and/or paper (base 64, 352x480)")
    p.add_argument("--modes", default="infer,train", help="infer (forward) and/or train (step)")
    p.add_argument("--vary", default="channels_last,fold_bn,threads,batch,malloc",
                   help="dimensions varied one at a time around the base setting")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per setting, CPU-default model (default 6)")
    p.add_argument("--paper-rounds", type=int, default=2, help="timed rounds per setting, paper model (default 2)")
    p.add_argument("--malloc-rounds", type=int, default=2,
                   help="alternating processes per allocator (default 2); each runs --rounds rounds")
    p.add_argument("--quick", action="store_true", help="CPU-default model only, 3 rounds, 1 process per allocator")
    p.add_argument("--clock-ghz", type=float, default=None,
                   help="clock for the theoretical peak (default: /proc/cpuinfo's nominal MHz)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one process's settings -> JSON
    args = p.parse_args(argv)

    if args.one:
        print(benchlib.JSON_PREFIX + json.dumps({"result": measure_group(json.loads(args.one))}), flush=True)
        return 0
    if args.quick:
        args.models, args.rounds, args.malloc_rounds = "cpu", 3, 1

    m = benchlib.machine()
    ghz = args.clock_ghz or m.mhz / 1000
    peak, peak_core = m.peak_gflops(ghz), m.peak_gflops(ghz, cores=1)
    print(f"machine: {m.describe()}; {m.simd}, fma={'fma' in m.flags}; nominal clock {m.mhz:.0f} MHz")
    print(f"peak fp32 = {m.cores} cores x {m.fma_units} FMA units x {m.fp32_lanes} lanes x 2 x {ghz:.3f} GHz "
          f"= {peak:.1f} GFLOP/s ({peak_core:.1f} per core)", flush=True)

    models = [s for s in args.models.split(",") if s]
    modes = [s for s in args.modes.split(",") if s]
    vary = set(args.vary.split(","))
    flops: dict[str, dict[str, float]] = {}
    rows = []
    for name in models:
        base, size = MODELS[name]
        fwd, per_op = count_flops(base, size, train=False)
        trn, _ = count_flops(base, size, train=True)
        flops[name] = {"infer": fwd, "train": trn}
        rows.append({"model": name, "base": base, "size": f"{size[0]}x{size[1]}", "GFLOP fwd/img": fwd / 1e9,
                     "GFLOP train/img": trn / 1e9, "conv share of FLOPs": per_op.get("aten.convolution", 0) / fwd,
                     "peak img/s fwd": peak * 1e9 / fwd, "peak img/s train": peak * 1e9 / trn})
    benchlib.print_table(rows, title="FLOPs per image (FlopCounterMode) and the theoretical frames/s ceiling")

    cores = m.cores
    raw: list[dict] = []
    for name in models:
        for mode in modes:
            rounds = args.rounds if name == "cpu" else args.paper_rounds
            v = vary if name == "cpu" else vary - {"threads", "batch"} if mode == "train" else vary - {"batch"}
            job = {"malloc": "thresholds", "rounds": rounds, "settings": settings_for(name, mode, v, cores)}
            print(f"measuring {name}/{mode}: {len(job['settings'])} settings x {rounds} rounds", flush=True)
            raw += run_group(job)
    if "malloc" in vary and "cpu" in models:
        base_settings = []
        for mode in modes:
            b = {"model": "cpu", "mode": mode, "batch": BASE_BATCH["cpu"], "threads": cores, "fold_bn": False}
            base_settings += [{**b, "channels_last": True}, {**b, "channels_last": False}]
        for rnd in range(args.malloc_rounds):
            for kind in MALLOCS:
                try:
                    print(f"measuring allocator {kind} (process {rnd + 1}/{args.malloc_rounds})", flush=True)
                    raw += run_group({"malloc": kind, "rounds": args.rounds, "settings": base_settings})
                except FileNotFoundError as e:
                    print(f"  skipped: {e}")

    results = merge_best(raw)
    for r in results:
        fl = flops[r["model"]][r["mode"]]
        r["images_per_s"] = r["batch"] / r["step_s"]
        r["images_per_s_median"] = r["batch"] / r["step_s_median"]
        r["gflops"] = r["images_per_s"] * fl / 1e9
        r["pct_peak"] = 100 * r["gflops"] / m.peak_gflops(ghz, cores=r["threads"])
        r["pct_sgemm"] = 100 * r["gflops"] / r["sgemm_gflops"]
        r["cpu_ms_per_image"] = 1000 * r["cpu_s"] / r["batch"]
        r["gflops_per_cpu_s"] = fl * r["batch"] / r["cpu_s"] / 1e9
        r["pct_core_peak_cpu_s"] = 100 * r["gflops_per_cpu_s"] / peak_core
        r["pct_sgemm_cpu_s"] = 100 * r["gflops_per_cpu_s"] / r["sgemm_gflops_per_cpu_s"]
    results.sort(key=lambda r: (r["model"], r["mode"], r["malloc"] != "thresholds", -r["threads"], r["batch"],
                                not r["channels_last"], r["fold_bn"], r["malloc"]))
    cols = ["model", "mode", "batch", "threads", "channels_last", "fold_bn", "malloc", "images_per_s",
            "images_per_s_median", "gflops", "pct_peak", "sgemm_gflops", "pct_sgemm", "cpu_share", "cpu_ms_per_image",
            "gflops_per_cpu_s", "pct_core_peak_cpu_s", "pct_sgemm_cpu_s", "conv_time_fraction"]
    benchlib.print_table(results, cols, title="Measured: fastest step of the rounds (median alongside); sgemm = the "
                         "fastest 2048^3 sgemm of the same process and threads. Wall-clock figures hold only where "
                         "cpu_share ~ 1 (the step got its cores); per-CPU-second figures (cheapest step's CPU "
                         "seconds, all threads) hold whatever else ran")
    best: dict[str, dict] = {}
    for r in results:
        k = f"{r['model']}/{r['mode']}"
        if k not in best or r["images_per_s"] > best[k]["images_per_s"]:
            best[k] = r
    summary = [{"model/mode": k, "img/s": v["images_per_s"], "GFLOP/s": v["gflops"], "% peak": v["pct_peak"],
                "% sgemm": v["pct_sgemm"], "setting": f"batch {v['batch']}, {v['threads']} threads, channels_last="
                f"{int(v['channels_last'])}, fold_bn={int(v['fold_bn'])}, {v['malloc']}"} for k, v in best.items()]
    benchlib.print_table(summary, title="Best setting per model and mode: the measured frames/s upper bound")
    benchlib.emit_json("flops", {
        "peak_gflops": peak, "clock_ghz": ghz, "simd": m.simd, "fma_units": m.fma_units, "lanes": m.fp32_lanes,
        "flops_per_image": flops, "results": results, "best": best,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

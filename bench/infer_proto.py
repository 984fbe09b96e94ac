"""jobs/infer.py with the CPU changes proposed in docs/benchmarks.md, to measure them before they
are made in segray/infer.py. Everything but the model replica is segray.infer's own code.

    python bench/infer_proto.py --model M --images I --output O [jobs/infer.py flags] \\
        [--threads all|N] [--channels-last] [--fold-bn] [--stats FILE]

Changes, on CPU replicas only (a GPU replica is segray.infer.Predictor unchanged):
- ``--threads``: torch threads of a replica: ``all`` = every CPU this process may run on, N;
  default: segray's rule (the CPUs Ray reserved for the replica).
- ``--channels-last``: model and input batch in NHWC: oneDNN's fast convolution layout.
- ``--fold-bn``: BatchNorm folded into the preceding conv at load time (eval mode only).
- ``--stats FILE``: write the Dataset's ``ds.stats()`` (per-operator wall, CPU and UDF time) there.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from segray import infer, modelio, sources  # noqa: E402
from segray.jobs import run_job  # noqa: E402


def fold_batchnorm(model):
    """Every Conv2d followed by a BatchNorm2d (eval) in a Sequential -> one conv; BN -> Identity."""
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


class CpuTunedPredictor(infer.Predictor):
    """segray.infer.Predictor, plus threads / channels_last / folded BN on CPU."""

    def __init__(self, model_uri: str, use_gpu: bool = False, loader=modelio.load_model, threads: str = "",
                 channels_last: bool = False, fold_bn: bool = False) -> None:
        super().__init__(model_uri, use_gpu, loader)
        self.cpu_channels_last = False
        if use_gpu:
            return
        torch = self.torch
        if threads:
            n = len(os.sched_getaffinity(0)) if threads == "all" else int(threads)
            torch.set_num_threads(max(1, n))
        if fold_bn:
            self.model = fold_batchnorm(self.model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.cpu_channels_last = True
        print(f"infer_proto: replica pid {os.getpid()}: {torch.get_num_threads()} torch threads, "
              f"channels_last={channels_last}, fold_bn={fold_bn}", flush=True)

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.use_gpu or not self.cpu_channels_last:
            return super().predict(images)
        torch = self.torch
        with torch.inference_mode():
            x = modelio.images_to_tensor(images, self.spec.mean, self.spec.std, self.device, channels_last=True)
            return self.model(x).argmax(dim=1).to(torch.uint8).numpy()


def make_run_pipeline(threads: str, channels_last: bool, fold_bn: bool, stats_file: str | None):
    """segray.infer.run_pipeline with CpuTunedPredictor; the rest of the plan is the same."""

    def run_pipeline(config, listing: sources.Listing, spec, loader=modelio.load_model):
        import ray

        num_classes = spec.unet.num_classes
        ds = ray.data.from_arrow(infer.listing_tables(listing))
        ds = ds.map_batches(
            infer.load_frames,
            fn_kwargs={"size": spec.input_size, "images_root": config.images,
                       "labels": listing.labels if listing.archives else None},
            batch_size=None,
            batch_format="pyarrow",
        )
        ds = ds.repartition(target_num_rows_per_block=config.batch_size)
        ds = ds.map_batches(
            CpuTunedPredictor,
            fn_constructor_kwargs={"model_uri": config.model, "use_gpu": config.use_gpu, "loader": loader,
                                   "threads": threads, "channels_last": channels_last, "fold_bn": fold_bn},
            compute=ray.data.ActorPoolStrategy(size=config.num_replicas),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            num_gpus=1 if config.use_gpu else None,
            num_cpus=1 if config.use_gpu else config.cpus_per_replica,
        )
        ds = ds.map_batches(
            infer.postprocess,
            fn_kwargs={
                "model_size": spec.input_size,
                "num_classes": num_classes,
                "void_index": spec.void_index,
                "color_table": infer.color_table(config.labels),
                "palette": spec.palette,
                "images_root": config.images,
                "output": config.output,
                "write_masks": config.write_masks,
            },
            batch_size=None,
            batch_format="pyarrow",
        )
        ds = ds.repartition(target_num_rows_per_block=config.rows_per_file)
        sink = infer._datasink_class()(config.output, num_classes, config.rows_per_file)
        ds.write_datasink(sink)
        if stats_file:
            with open(stats_file, "w") as f:
                f.write(ds.stats())
        return sink.totals

    return run_pipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--labels", default=None)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--write-masks", action="store_true")
    p.add_argument("--threads", default="", help="torch threads per CPU replica: all, or a number (default: segray's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fold-bn", action="store_true")
    p.add_argument("--stats", default=None, help="write ds.stats() to this file")
    args = p.parse_args(argv)

    def body() -> None:
        infer.run_pipeline = make_run_pipeline(args.threads, args.channels_last, args.fold_bn, args.stats)
        infer.infer(infer.InferConfig(
            model=args.model, images=args.images, output=args.output, labels=args.labels, use_gpu=args.use_gpu,
            batch_size=args.batch_size, num_replicas=args.num_replicas, cpus_per_replica=args.cpus_per_replica,
            write_masks=args.write_masks, rows_per_file=args.rows_per_file,
        ))

    return run_job("infer", body)


if __name__ == "__main__":
    sys.exit(main())

"""The whole pipeline on embedded defaults: local Ray, local files, minutes on 2 CPU cores.

    python jobs/demo.py                         # synthetic CamVid-format street scenes
    python jobs/demo.py --camvid ../shared/camvid --size 176x240 --epochs 20 --base-channels 16

Each data source gets its own run, named ``demo-synthetic-<hash>`` or ``demo-camvid-<hash>``: the
hash covers what the run is made from (the CamVid path, or the generated scenes' counts and
seed; the size, --base-channels, --batch-size and --seed), so a demo never resumes another's run.
Everything of a run lives under ``<workdir>/{sources,prepared,runs,predictions,report}/<name>``.
Rerunning the same command resumes (and with a higher --epochs extends) its run and reuses its
prepared dataset (delete ``<workdir>/prepared/<name>`` to prepare it again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

from segray.jobs import add_version, defaults, run_job
from segray.preprocess import parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run prepare -> train -> infer -> report end to end on a local Ray instance: on generated "
        "CamVid-format street scenes (default) or on real CamVid (--camvid), then print the metrics and "
        "where every output is.",
    )
    parser.add_argument("--workdir", default="demo-output", help="folder for every output (default ./demo-output)")
    parser.add_argument("--camvid", default=None, metavar="PATH",
                        help="a CamVid source (SegNet or original layout) instead of generated scenes")
    parser.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                        help="training size (default 64x96 generated, 176x240 with --camvid)")
    parser.add_argument("--train-images", type=int, default=192, help="generated training scenes (default 192)")
    parser.add_argument("--val-images", type=int, default=48, help="generated validation scenes (default 48)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8 generated, 20 CamVid)")
    from segray.train import TrainConfig

    d = defaults(TrainConfig)
    parser.add_argument("--base-channels", type=int, default=16,
                        help="width of the network (default 16, the CPU recipe's; jobs/train.py --base-channels)")
    parser.add_argument("--num-workers", type=int, default=d["num_workers"],
                        help="training workers (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="images per worker and step (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="random seed (default %(default)s)")
    add_version(parser)
    args = parser.parse_args(argv)
    return run_job("demo", lambda: run_demo(args), verbose=args.verbose)


def demo_name(args: argparse.Namespace, source: str | None, size: tuple[int, int]) -> str:
    """``demo-synthetic-<hash>`` or ``demo-camvid-<hash>`` (``source``: the normalized CamVid path,
    None for generated scenes): one run per data source and per setting that a resume cannot change."""
    kind = "camvid" if source else "synthetic"
    key = {"size": list(size), "base_channels": args.base_channels, "batch_size": args.batch_size, "seed": args.seed}
    key.update({"camvid": source} if source else {"train_images": args.train_images, "val_images": args.val_images})
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"demo-{kind}-{digest}"


def run_demo(args: argparse.Namespace) -> None:
    from segray import storage
    from segray.dataset import DATASET_FILE
    from segray.evaluate import build_report
    from segray.infer import InferConfig, infer
    from segray.prepare import PrepareConfig, prepare
    from segray.synthetic import write_dataset
    from segray.train import TrainConfig, train

    start = time.perf_counter()
    work = storage.normalize(args.workdir)
    if args.camvid:
        source = storage.normalize(args.camvid)
        size = args.size or (176, 240)
        epochs = args.epochs or 20
        name = demo_name(args, source, size)
    else:
        size = args.size or (64, 96)
        epochs = args.epochs or 8
        name = demo_name(args, None, size)
        source = storage.join(work, "sources", name)

    data, runs = storage.join(work, "prepared", name), storage.join(work, "runs")
    predictions, report = storage.join(work, "predictions", name), storage.join(work, "report", name)
    print(f"demo: run {name} (rerunning this command resumes it; --epochs N extends it)", flush=True)

    # A prepared dataset is reused: preparing again would give it a new identity (dataset.json),
    # and the training run would refuse to resume on it.
    reuse = storage.exists(storage.join(data, DATASET_FILE))
    if not args.camvid and not (reuse and storage.exists(storage.join(source, "val"))):
        counts = {"train": args.train_images, "val": args.val_images}
        print(f"demo: generating {sum(counts.values())} street scenes in {source}", flush=True)
        write_dataset(source, layout="segnet", counts=counts, size=(size[0] * 2, size[1] * 2), seed=args.seed)

    if reuse:
        print(f"demo: [1/4] prepare: reusing {data} (delete it to prepare again)", flush=True)
    else:
        print("demo: [1/4] prepare", flush=True)
        prepare(PrepareConfig(source=source, dest=data, size=size))

    print("demo: [2/4] train", flush=True)
    train(TrainConfig(data=data, storage=runs, name=name, epochs=epochs, num_workers=args.num_workers,
                      batch_size=args.batch_size, base_channels=args.base_channels, seed=args.seed))
    run = storage.join(runs, name)

    print("demo: [3/4] infer on the validation frames", flush=True)
    storage.delete(predictions)  # a fresh output: this run's model, not an earlier one's
    images, labels = storage.join(source, "val"), storage.join(source, "valannot")
    if not (storage.is_dir(images) and storage.is_dir(labels)):
        # Original-layout CamVid keeps frames and their NAME_L.png labels side by side.
        images = labels = source
        print(f"demo: no val/ and valannot/ in {source}: inferring on every frame there, paired with NAME_L.png",
              flush=True)
    infer(InferConfig(model=run, images=images, labels=labels, output=predictions, write_masks=True))

    print("demo: [4/4] report", flush=True)
    page = build_report(predictions, report, run=run, title="segray demo")

    print(f"demo: finished in {time.perf_counter() - start:.0f} s. Outputs:")
    for what, uri in [
        ("source frames", source),
        ("prepared dataset", data),
        ("training run (checkpoints, model/, metrics.json)", run),
        ("predictions, errors, metrics.parquet, masks", predictions),
        ("report (open in a browser)", page),
    ]:
        print(f"  {what:50s} {uri}")


if __name__ == "__main__":
    sys.exit(main())

"""Train stage: a segmentation network (--arch) on a prepared dataset with Ray Train (DDP),
checkpoints in object storage.

    python jobs/train.py --data s3://bucket/prepared --storage s3://bucket/runs --name unet --epochs 40

Rerunning the same command (same --storage and --name) resumes after the latest checkpoint. A
rerun that changes what the run is made from (--data or its content, --lr, --weight-decay,
--lr-schedule, --batch-size, --class-weighting, --lovasz, --ema, --logit-adjust, an
augmentation setting, --seed, --arch and its arguments, --base-channels) is refused before any
worker starts; a higher --epochs continues the LR schedule without a jump (segray/recipe.py's
docstring).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from segray.jobs import add_version, defaults, run_job
from segray.preprocess import parse_size
from segray.precision import PRECISION_HELP, PRECISIONS
from segray.train import CLASS_WEIGHTINGS, EXPORTS, SCHEDULES, TrainConfig, TrainError

D = defaults(TrainConfig)  # every flag's default comes from TrainConfig
A = D["augmentation"]  # and every augmentation setting's from recipe.Augmentation


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI, e.g. 0.75,1.5") from None
    return lo, hi


def _arch_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. depth=3")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from segray.model import NETWORKS, network_names

    networks = "; ".join(f"{n}: {NETWORKS[n].description}" for n in network_names())
    parser = argparse.ArgumentParser(
        description="Train a segmentation network on a prepared dataset (jobs/prepare.py --dest) with Ray Train: one "
        "data shard and one DDP replica per worker, validation (mIoU, pixel accuracy) and a checkpoint every epoch in "
        "<storage>/<name>/, the best model exported to <storage>/<name>/model/ and the history to metrics.json. The "
        "classes come from the dataset (its classes.json, else CamVid's 11).",
        epilog="Rerunning the same command resumes after the latest checkpoint; a higher --epochs trains on, "
        "the rest of the LR schedule stretched over the new epochs (no jump). A rerun with another --data (or the "
        "same one re-prepared), --arch or its arguments, --lr, --weight-decay, --lr-schedule, --batch-size, "
        "--class-weighting, --lovasz, --ema, --logit-adjust, an augmentation setting or --seed is refused: pass the "
        "recorded value (run.json in the run folder) or a new --name. --num-workers, --use-gpu, --precision, --cpus-per-worker, "
        "--threads, --max-failures and --keep-checkpoints may change. URIs are s3://bucket/prefix or local paths; "
        "S3 settings come from the AWS_* environment; SEGRAY_SHARD_CACHE_BYTES (default %d) caps the shard a worker keeps in "
        "memory (0: stream every epoch)." % D["shard_cache_bytes"],
    )
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="a recipe file (.yaml, .yml or .toml; local or s3://): flag names as keys (batch-size "
                        "or batch_size), e.g. recipes/cpu-camvid.yaml; flags on the command line override it")
    parser.add_argument("--data", required=True, help="prepared dataset (the --dest of jobs/prepare.py)")
    parser.add_argument("--storage", required=True, help="where run folders live (s3://... or a local path)")
    parser.add_argument("--name", required=True,
                        help="run folder name below --storage; the same name resumes (with the same recipe)")
    parser.add_argument("--epochs", type=int, default=D["epochs"], help="total epochs of the run (default %(default)s)")
    parser.add_argument("--num-workers", type=int, default=D["num_workers"],
                        help="Ray Train workers, one model replica each (default %(default)s)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (bf16, SyncBatchNorm, channels_last)")
    parser.add_argument("--precision", choices=PRECISIONS, default=D["precision"], help=PRECISION_HELP)
    parser.add_argument("--batch-size", type=int, default=D["batch_size"],
                        help="images per worker and step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=D["lr"], help="Adam learning rate (default %(default)s)")
    parser.add_argument("--lr-schedule", choices=SCHEDULES, default=D["lr_schedule"],
                        help="learning rate over the run (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=D["weight_decay"],
                        help="decoupled weight decay, AdamW (default %(default)s)")
    parser.add_argument("--ema", type=float, default=D["ema"], metavar="DECAY",
                        help="validate, checkpoint and export an exponential moving average of the weights (and "
                        "BatchNorm statistics), updated every step with this decay after a warm-up, e.g. 0.998 "
                        "(default %(default)s: off, the trained weights)")
    parser.add_argument("--arch", default=D["arch"], metavar="NAME",
                        help=f"the network, by name (default %(default)s). {networks}")
    parser.add_argument("--arch-arg", dest="arch_args", type=_arch_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="an argument of the network, e.g. depth=3 (repeatable)")
    parser.add_argument("--base-channels", type=int, default=D["base_channels"],
                        help="shorthand for --arch-arg base_channels=N: channels of the first level (the network's "
                        "default; 16 is the CPU recipe of docs/quality.md)")
    parser.add_argument("--class-weighting", choices=CLASS_WEIGHTINGS, default=D["class_weighting"],
                        help="cross-entropy class weights from dataset.json pixel counts: median_freq (median/freq, "
                        "capped at 50), sqrt_median_freq (its square root: softer, the default: +0.06 val mIoU on CamVid, "
                        "docs/quality.md), none")
    parser.add_argument("--lovasz", type=float, default=D["lovasz"], metavar="WEIGHT",
                        help="add WEIGHT x the Lovász-softmax loss (a convex surrogate of 1 - IoU per class, Berman et "
                        "al. 2018) to the training cross-entropy, e.g. 1; train_loss stays the cross-entropy "
                        "(default %(default)s: off)")
    parser.add_argument("--logit-adjust", type=float, default=D["logit_adjust"], metavar="TAU",
                        help="validation and the exported model subtract TAU x log(class weight) from the logits "
                        "before the argmax: 1 undoes the shift toward rare classes that --class-weighting teaches, "
                        "keeping its effect on what is learned (fewer false poles, fences and cars on unseen streets, "
                        "docs/quality.md); model/config.json holds the bias (default %(default)s: off)")
    parser.add_argument("--no-augment", dest="enabled", action="store_false",
                        help="turn off random flip, scale-crop and colour jitter of training images")
    parser.add_argument("--scale-range", type=_scale_range, default=A.scale_range, metavar="LO,HI",
                        help="random scale of the scale-crop augmentation, log-uniform (default %s,%s)" % A.scale_range)
    parser.add_argument("--crop", type=parse_size, default=A.crop, metavar="HxW",
                        help="train on random HxW windows of the (scaled) frames: a cheaper step, more epochs in "
                        "the same time; validation uses whole frames (default: whole frames)")
    parser.add_argument("--flip-prob", type=float, default=A.flip_prob,
                        help="probability of a horizontal flip of a training image (default %(default)s)")
    parser.add_argument("--jitter", type=float, default=A.jitter,
                        help="colour jitter: brightness, contrast, saturation scaled by up to 1 +- this (default "
                        "%(default)s; 0: off)")
    parser.add_argument("--classmix", type=float, default=A.classmix, metavar="P",
                        help="ClassMix (Olsson et al. 2021): with probability P a training image receives the pixels "
                        "of half the classes of another image of its batch, labels alike (default %(default)s: off)")
    parser.add_argument("--seed", type=int, default=D["seed"],
                        help="random seed of weights, shuffling, augmentation (default %(default)s)")
    parser.add_argument("--max-failures", type=int, default=D["max_failures"],
                        help="restart the workers from the latest checkpoint this many times on failure (default "
                        "%(default)s)")
    parser.add_argument("--cpus-per-worker", type=int, default=D["cpus_per_worker"],
                        help="CPUs reserved per worker (default %(default)s)")
    parser.add_argument("--threads", type=int, default=D["threads"],
                        help="torch threads per CPU worker (default: --cpus-per-worker)")
    parser.add_argument("--keep-checkpoints", type=int, default=D["keep_checkpoints"],
                        help="checkpoints kept, the best by val mIoU; the latest is kept too (default %(default)s)")
    parser.add_argument("--checkpoint-every-steps", type=int, default=D["checkpoint_every_steps"], metavar="N",
                        help="also checkpoint every N training steps within an epoch, so that a lost worker or node "
                        "costs at most N steps (a restart resumes at the step after the checkpoint; default: at the "
                        "end of each epoch only)")
    parser.add_argument("--export", choices=EXPORTS, default=D["export"],
                        help="the epoch model/ holds: best (by val mIoU), last, or auto (default): best, unless the "
                        "dataset's val frames are also in train (prepare --train-on-val), then last")
    add_version(parser)
    return parser


def recipe_defaults(parser: argparse.ArgumentParser, uri: str) -> dict:
    """The flag values of the recipe file at ``uri``, as the parser's dests, each converted by its
    flag's type (``crop: 128x192``, ``scale-range: [0.8, 1.25]``, ``arch-arg: {depth: 3}``,
    ``augment: false``). Raises TrainError naming the file and the key that is not a flag."""
    from segray import storage

    try:
        text = storage.read_bytes(uri).decode("utf-8")
        if uri.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        elif uri.lower().endswith(".toml"):
            import tomllib

            data = tomllib.loads(text)
        else:
            raise TrainError(f"--recipe {uri}: a recipe is a .yaml, .yml or .toml file")
    except TrainError:
        raise
    except Exception as e:  # noqa: BLE001 - not found, not UTF-8, a syntax error: one line naming the file
        raise TrainError(f"--recipe {uri}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TrainError(f"--recipe {uri}: expected a mapping of flag names to values, got {type(data).__name__}")
    # A key is a flag's name (dashes or underscores) or its dest; "augment: false" is --no-augment.
    by_name = {}
    for a in parser._actions:
        if a.dest not in ("help", "version", "verbose", "recipe"):
            by_name.update({o.lstrip("-").replace("-", "_"): a for o in a.option_strings})
            by_name.setdefault(a.dest, a)
    by_name["augment"] = by_name["no_augment"]
    values: dict = {}
    for key, value in data.items():
        action = by_name.get(str(key).replace("-", "_"))
        if action is None:
            known = ", ".join(sorted({a.option_strings[0].lstrip("-") for a in by_name.values()}))
            raise TrainError(f"--recipe {uri}: {key!r} is not a flag of jobs/train.py; known: {known}")
        dest = action.dest
        try:
            if dest == "enabled":
                value = bool(value) if str(key).replace("-", "_") == "augment" else not value
            elif dest == "arch_args":
                value = [(k, v) for k, v in dict(value).items()]
            elif dest == "scale_range" and isinstance(value, (list, tuple)):
                value = (float(value[0]), float(value[1]))
            elif isinstance(value, str) and action.type is not None or action.type in (int, float):
                value = action.type(value)  # "128x192" as on the command line; 4 or 3e-3 as numbers
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise TrainError(f"--recipe {uri}: {key}: {value!r} is not a valid value ({e})") from None
        if action.choices is not None and value not in action.choices:
            raise TrainError(f"--recipe {uri}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        values[dest] = value
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, over the values of ``--recipe FILE`` when one is given (flags win)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe:
        values = recipe_defaults(parser, recipe)
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, environ=os.environ) -> TrainConfig:
    """The TrainConfig of parsed flags plus the environment: the one place either is read."""
    from segray.train import check_augmentation

    values = vars(args).copy()
    values.pop("recipe", None)
    values.pop("verbose", None)
    augmentation = check_augmentation(**{f.name: values.pop(f.name) for f in dataclasses.fields(A)})
    values["arch_args"] = dict(values["arch_args"])
    cache = environ.get("SEGRAY_SHARD_CACHE_BYTES")
    if cache is not None:
        try:
            values["shard_cache_bytes"] = int(cache)
        except ValueError:
            raise TrainError(f"SEGRAY_SHARD_CACHE_BYTES={cache!r} is not a whole number of bytes") from None
    return TrainConfig(**values, augmentation=augmentation)


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace()

    def parse() -> None:  # a bad --recipe fails as any job does: one line
        vars(args).update(vars(parse_args(argv)))

    def body() -> None:
        from segray.train import train

        config = config_from_args(args)
        if args.recipe:  # printed once: what the file and the flags made together
            settings = dataclasses.asdict(config)
            print(f"train: recipe {args.recipe}; effective settings: {json.dumps(settings, default=str)}", flush=True)
        train(config)

    # train() connects to Ray itself, after the checks that need no cluster.
    pre = argparse.ArgumentParser(add_help=False)  # --verbose (or an abbreviation) before the parse, which runs in the job
    pre.add_argument("--verbose", action="store_true")
    verbose = pre.parse_known_args(argv)[0].verbose
    return run_job("train", body, connect=False, preflight=parse, verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())

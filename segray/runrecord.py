"""What a training run is made from (its *recipe*), and when a resume would mix two runs.

The recipe is the dataset (normalized URI and the sha256 of its ``dataset.json`` bytes, which a
re-prepare always rewrites), its input size and classes, the network (``--arch`` and its
arguments, ``--base-channels``) and the training settings that shape the weights: ``--lr``,
``--weight-decay``, ``--lr-schedule``, ``--batch-size`` (per worker), ``--class-weighting``,
``--lovasz``, ``--ema``, ``--logit-adjust``, every augmentation setting (recipe.Augmentation) and
``--seed``. A resume that changed one would train one set of weights with two recipes, and
metrics.json would name only the last: --lr, --weight-decay, --lr-schedule sized the optimizer
steps so far; --batch-size the step's gradient noise and the steps per epoch; --class-weighting
and --lovasz the loss; --ema which weights are validated and exported; --logit-adjust how
validation scores them and what the export predicts; augmentation the training distribution;
--seed the shuffling and augmentation draws of every epoch.

Every checkpoint's ``meta.json`` holds the recipe (the record that travels with the weights) and
``run.json`` holds it from the moment the run starts. A resume whose recipe differs from the
latest checkpoint's is refused before any worker starts, with one line naming each setting, its
recorded and its new value, and the fix (the same value, or a new ``--name``). Checkpoints written
before recipes existed are compared on what their ``config`` recorded (no dataset content
identity); recipes written before a setting existed (``arch``, ``flip_prob``, ``jitter``) are
not compared on it. No Ray here: segray/train.py reads the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from segray import storage
from segray.dataset import DATASET_FILE
from segray.errors import SegrayError
from segray.model import network_config
from segray.recipe import augmentation_names
from segray.tensorboard import TENSORBOARD_DIR

if TYPE_CHECKING:
    from segray.dataset import DatasetInfo
    from segray.train import TrainConfig

RUN_FILE = "run.json"  # the run's recipe, written before any worker starts
CONFIG_FILE = "config.yaml"  # the latest command's effective settings, as a --recipe file
RUN_FORMAT = "segray-train-run/1"


class RunFolderError(SegrayError, ValueError):
    """A run folder that holds someone else's files; the message names one and the fix."""

# TrainConfig fields of the recipe besides the dataset, the network and the augmentation:
# (field, name in messages).
TRAINING_SETTINGS: tuple[tuple[str, str], ...] = (
    ("lr", "--lr"),
    ("weight_decay", "--weight-decay"),
    ("lr_schedule", "--lr-schedule"),
    ("batch_size", "--batch-size"),
    ("class_weighting", "--class-weighting"),
    ("lovasz", "--lovasz"),
    ("ema", "--ema"),
    ("logit_adjust", "--logit-adjust"),
    ("seed", "--seed"),
)
# Every compared setting, (recipe key, name in messages), in the order messages list them.
RECIPE_SETTINGS: tuple[tuple[str, str], ...] = TRAINING_SETTINGS[:5] + augmentation_names() + TRAINING_SETTINGS[5:]


def finite(x: Any, default: float | None = None) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else default


def jsonable(x: Any) -> Any:
    """The value as it comes back from JSON: tuples -> lists and NaN/inf -> None, recursively."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return finite(x)


def recipe(config: TrainConfig, info: DatasetInfo, dataset_sha256: str) -> dict:
    """What the run ``config`` on the dataset ``info`` is made from (module docstring), as JSON."""
    return {
        "data": storage.normalize(config.data),
        "dataset_sha256": dataset_sha256,
        "input_size": [info.height, info.width],
        "classes": list(info.classes),
        "arch": config.arch,
        "model": config.model_args(len(info.classes)),
        **{field: jsonable(getattr(config, field)) for field, _ in TRAINING_SETTINGS},
        **config.augmentation.record(),
    }


def legacy_recipe(meta: dict) -> dict:
    """The recipe of a checkpoint written before recipes existed, from what its meta.json has:
    only the keys it recorded (an absent key is not compared; there is no dataset identity)."""
    config = meta.get("config") or {}
    out = {k: v for k, v in (("data", config.get("data")), ("classes", meta.get("classes")),
                             ("model", meta.get("model_config"))) if v is not None}
    out.update({field: jsonable(config[field]) for field, _ in RECIPE_SETTINGS if field in config})
    return out


def _show(field: str, value: Any) -> str:
    if field == "crop":
        return "whole frames" if value is None else f"{value[0]}x{value[1]}"
    if field == "scale_range":
        return f"{value[0]!r},{value[1]!r}"
    if field == "augment":
        return "on" if value else "off"
    return str(value)


def _facts(r: dict) -> str:
    """'32x48, dataset.json sha256 1a2b3c4d5e6f' (what is known of it)."""
    facts = []
    if r.get("input_size"):
        facts.append(f"{r['input_size'][0]}x{r['input_size'][1]}")
    if r.get("dataset_sha256"):
        facts.append(f"dataset.json sha256 {r['dataset_sha256'][:12]}")
    if r.get("classes") is not None and "dataset_sha256" not in r:
        facts.append(f"{len(r['classes'])} classes")
    return ", ".join(facts)


def _with_defaults(arch: str, args: dict) -> dict:
    """The network arguments ``args`` with the defaults of those it lacks (an argument added
    after the run was recorded, e.g. the U-Net's dropout); as given when they do not parse."""
    try:
        return network_config(arch, args).to_dict()
    except SegrayError:
        return args


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def resume_refusal(run_uri: str, recorded: dict, current: dict) -> str | None:
    """The one-line refusal of a resume whose recipe ``current`` differs from the ``recorded``
    one (keys absent from ``recorded`` are unknown and not compared), or None when it may resume.

    ``<run> cannot resume: <setting> was <recorded>, this command has <new>[; ...]; pass the same
    <settings> to resume it, or a new --name to start a new run``; a dataset re-prepared at the
    same URI reads ``--data <uri> was re-prepared since the run used it (<then>; now <now>)``
    and its fix ``pass the dataset it was trained on``."""
    clauses: list[str] = []
    same: list[str] = []
    content_changed = False

    def differs(key: str) -> bool:
        return key in recorded and jsonable(recorded[key]) != jsonable(current.get(key))

    if differs("data"):
        was, now = _facts(recorded), _facts(current)
        clauses.append(f"--data was {recorded['data']}{f' ({was})' if was else ''}, "
                       f"this command has {current.get('data')}{f' ({now})' if now else ''}")
        same.append("--data")
    elif any(differs(k) for k in ("dataset_sha256", "input_size", "classes")):
        content_changed = True
        clauses.append(f"--data {current.get('data')} was re-prepared since the run used it "
                       f"({_facts(recorded)}; now {_facts(current)})")
    if differs("arch"):
        clauses.append(f"--arch was {recorded['arch']}, this command has {current.get('arch')}")
        same.append("--arch")
    old_model, new_model = recorded.get("model"), current.get("model") or {}
    if old_model is not None and not differs("arch"):
        # An argument added since the run was recorded is compared as its default, what it trained with.
        arch = current.get("arch") or "unet"
        old_model, new_model = _with_defaults(arch, old_model), _with_defaults(arch, new_model)
        for key in sorted(set(old_model) | set(new_model)):
            if jsonable(old_model.get(key)) != jsonable(new_model.get(key)):
                name = "--base-channels" if key == "base_channels" else f"--arch-arg {key}"
                clauses.append(f"{name} was {old_model.get(key)}, this command has {new_model.get(key)}")
                same.append(name)
    for field, name in RECIPE_SETTINGS:
        if differs(field):
            clauses.append(f"{name} was {_show(field, recorded[field])}, "
                           f"this command has {_show(field, current.get(field))}")
            same.append(name)
    if not clauses:
        return None
    fixes = ([f"the same {_and(same)}"] if same else []) + (["the dataset it was trained on"] if content_changed else [])
    return (f"{run_uri} cannot resume: {'; '.join(clauses)}; pass {' and '.join(fixes)} to resume it, "
            "or a new --name to start a new run")


def dataset_sha256(data_uri: str) -> str:
    """The identity of a prepared dataset: the sha256 of its dataset.json bytes (a re-prepare
    rewrites them: new counts, new file names)."""
    return hashlib.sha256(storage.read_bytes(storage.join(data_uri, DATASET_FILE))).hexdigest()


def write_run_file(run_uri: str, current: dict, previous_meta: dict | None) -> None:
    """``<run>/run.json``: the recipe, before any worker starts. A new run (no checkpoint) writes
    it, replacing the record of a run killed before its first checkpoint; a resumed run keeps its
    own (the recipe matched) and writes one only if it has none."""
    uri = storage.join(run_uri, RUN_FILE)
    if previous_meta is not None and storage.exists(uri):
        return
    if previous_meta is None and storage.exists(uri):
        try:
            old = json.loads(storage.read_bytes(uri)).get("recipe")
        except (ValueError, AttributeError):
            old = None
        if old != current:
            print(f"train: {run_uri} has no checkpoint to resume; starting it afresh (run.json replaced)",
                  flush=True)
    doc = {"format": RUN_FORMAT, "run": run_uri, "recipe": current}
    storage.write_bytes(uri, (json.dumps(doc, indent=2) + "\n").encode())


def check_run_folder(run_uri: str) -> None:
    """The run folder is new, or an earlier segray run (``run.json``, or Ray Train's snapshot of a
    run from before run.json): export writes ``model/`` and ``metrics.json`` there, and nobody's
    files of those names may be overwritten. Event files in ``tensorboard/`` overwrite nothing (each
    training attempt writes a new name, segray/tensorboard.py) and are not counted."""
    def ours(rel: str) -> bool:  # segray's own probe, or an event file of an earlier attempt
        return ".segray-write-probe-" in rel or (rel.startswith(f"{TENSORBOARD_DIR}/") and rel.count("/") == 1
                                                 and rel.split("/")[1].startswith("events.out.tfevents."))

    files = [f for f in storage.list_files(run_uri) if not ours(storage.relative(run_uri, f))]
    if not files:
        return
    tops = {storage.relative(run_uri, f).split("/", 1)[0] for f in files}
    if RUN_FILE in tops or "checkpoint_manager_snapshot.json" in tops:
        return
    raise RunFolderError(
        f"{run_uri} holds {len(files)} files (e.g. {files[0]}) but no segray training run ({RUN_FILE}); "
        "training would write model/ and metrics.json there: choose another --name or --storage"
    )


def recipe_file_values(config: dict) -> dict:
    """A TrainConfig (``to_dict()``) as the mapping of a ``--recipe`` file: flag names, values as
    the file takes them. Left out: None (the flag's default) and shard_cache_bytes (the environment's)."""
    out: dict[str, Any] = {}
    flat = dict(config)
    augmentation = dict(flat.pop("augmentation", None) or {})
    if augmentation:
        flat = {**flat, "augment": bool(augmentation.pop("enabled", True)), **augmentation}
    for key, value in flat.items():
        if value is None or key == "shard_cache_bytes":
            continue
        if key == "crop":
            value = f"{value[0]}x{value[1]}"
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[key.replace("_", "-")] = value
    return out


def write_config_file(run_uri: str, config: dict) -> str:
    """``<run>/config.yaml``: the effective settings of the latest command on this run (recipe file
    and flags together), which ``segray train --recipe <run>/config.yaml`` repeats. Returns its URI."""
    import yaml

    uri = storage.join(run_uri, CONFIG_FILE)
    text = ("# segray train: the effective settings of the latest command on this run (its --recipe file and\n"
            "# flags together). `segray train --recipe <this file>` repeats it; flags given with it win.\n")
    storage.write_bytes(uri, (text + yaml.safe_dump(recipe_file_values(config), sort_keys=False)).encode())
    return uri

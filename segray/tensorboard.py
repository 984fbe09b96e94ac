"""Training curves as TensorBoard event files in the run folder: ``<run>/tensorboard/``.

Optional (``pip install 'segray[tensorboard]'``): without the ``tensorboard`` package training runs
as before and rank 0 prints one line saying so. Rank 0 of every training attempt (a first run, a
resume, a restart after a failure) writes its own event file, named by torch's SummaryWriter with a
random suffix, so no attempt overwrites another's; TensorBoard merges the files of one folder,
so ``tensorboard --logdir <storage>/<name>`` shows the whole run. Per epoch (global step = epoch):
:data:`SCALARS` and the IoU of each class as ``val_iou/<class>``. SummaryWriter writes to a local
temporary folder; after every epoch the file is flushed and copied into the run folder (local or
S3, segray.storage), so the curves grow while the run trains. An epoch is logged after its
checkpoint was reported: the curves hold the epochs a resume carries over, and a restart from the
latest checkpoint repeats none of them. Failed uploads are reported and retried the next epoch;
they never stop training.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Callable

from segray import storage

TENSORBOARD_DIR = "tensorboard"  # in the run folder
INSTALL_HINT = "pip install 'segray[tensorboard]'"
SCALARS = ("train_loss", "val_loss", "val_miou", "val_pixel_accuracy", "lr", "images_per_s")
IOU_GROUP = "val_iou"
_UNSAFE = re.compile(r"[^\w.\-]+")
_said_missing = False  # the missing-package line is printed once per process


def safe_tag(name: str) -> str:
    """A class name as one tag part: letters and digits (any script), '_', '.', '-'; every other
    run (spaces, '/' that would nest groups, punctuation, control characters) -> '_'."""
    return _UNSAFE.sub("_", str(name)).strip("_") or "class"


def class_tags(names) -> dict[str, str]:
    """{class name: ``val_iou/<safe name>``}, unique: a name that another's safe form already took
    gets its class index appended (``a b`` and ``a/b`` -> ``val_iou/a_b``, ``val_iou/a_b_1``)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for i, name in enumerate(names):
        base = tag = f"{IOU_GROUP}/{safe_tag(name)}"
        k = i
        while tag in taken:  # the suffixed form may be taken too ("a_b_2" beside "a b" and "a/b")
            tag, k = f"{base}_{k}", k + len(names)
        taken.add(tag)
        out[name] = tag
    return out


def run_folder(config: dict) -> str | None:
    """The run folder of a TrainConfig dict (WorkerPayload.config), or None if it does not say."""
    if not config.get("storage") or not config.get("name"):
        return None
    return storage.join(storage.normalize(config["storage"]), config["name"])


def _summary_writer():
    """torch's SummaryWriter class, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class Curves:
    """The event file of one training attempt; ``log`` each epoch's metrics, ``close`` at the end.
    Disabled (every call does nothing) without a run folder, off rank 0, or without tensorboard."""

    def __init__(self, run_uri: str | None, enabled: bool = True, say: Callable[[str], None] = print) -> None:
        global _said_missing
        self.say = say
        self.dest = storage.join(run_uri, TENSORBOARD_DIR) if run_uri and enabled else None
        self._writer_class = _summary_writer() if self.dest else None
        if self.dest and self._writer_class is None:
            if not _said_missing:
                say(f"train: tensorboard is not installed: no training curves in {self.dest} "
                    f"(for them: {INSTALL_HINT})")
                _said_missing = True
            self.dest = None
        self._local: tempfile.TemporaryDirectory | None = None
        self._writer = None
        self._tags: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.dest is not None

    def log(self, metrics: dict) -> None:
        """Scalars of one epoch (``metrics["epoch"]`` is the step), then flush and upload."""
        if not self.enabled:
            return
        if self._writer is None:  # created at the first epoch: an attempt that logs nothing leaves no file
            self._local = tempfile.TemporaryDirectory(prefix="segray-tensorboard-")
            self._writer = self._writer_class(log_dir=self._local.name, filename_suffix=f".{uuid.uuid4().hex[:8]}")
        step = int(metrics["epoch"])
        for key in SCALARS:
            if metrics.get(key) is not None:
                self._writer.add_scalar(key, float(metrics[key]), step)
        ious = metrics.get(IOU_GROUP) or {}
        if set(ious) - set(self._tags):
            self._tags = class_tags(list(self._tags) + [n for n in ious if n not in self._tags])
        for name, value in ious.items():
            if value is not None:  # None: the class is absent from val
                self._writer.add_scalar(self._tags[name], float(value), step)
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        for name in sorted(os.listdir(self._local.name)):
            try:
                storage.write_file(storage.join(self.dest, name), os.path.join(self._local.name, name))
            except (OSError, storage.StorageError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.say(f"train: warning: could not copy training curves to {self.dest} ({first}); "
                         "retrying after the next epoch")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._upload()
            self._writer = None
        if self._local is not None:
            self._local.cleanup()
            self._local = None

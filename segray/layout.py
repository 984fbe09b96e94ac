"""Find CamVid image/label pairs in a source prefix and tell which layout it uses.

Two layouts are recognised (docs/design.md, "Input layouts"):

- **SegNet**: ``train/ trainannot/ val/ valannot/ test/ testannot/``; a label has the same
  relative path as its image under the ``annot`` folder (extension may differ). An optional
  ``classes.json`` at the source root names the classes the labels' indices stand for
  (:mod:`segray.classes`); without it they are CamVid's 11 classes and void 11.
- **Original**: RGB frames ``NAME.png`` and colour-coded labels ``NAME_L.png`` anywhere below
  the source, plus ``label_colors.txt``. Frames are assigned to splits by ``train.txt``,
  ``val.txt``, ``test.txt`` at the source root when present (one name or path a line), else
  by the deterministic rule of :func:`split_of`. The labels are CamVid's 11 classes
  (``label_colors.txt`` maps the 32 original colours to them); ``classes.json`` is refused here.
"""

from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass, replace

from segray.errors import SegrayError
from segray import storage
from segray.camvid import ORIGINAL_COLORS, ORIGINAL_TO_11, parse_label_colors
from segray.classes import CAMVID, CLASSES_FILE, ClassTable, ClassTableError, load_classes_file

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
SEGNET = "segnet"
ORIGINAL = "original"
LABEL_COLORS_FILE = "label_colors.txt"


class LayoutError(SegrayError, ValueError):
    """The source is not a usable CamVid layout; the message says what was found."""


@dataclass(frozen=True)
class Pair:
    split: str
    name: str  # relative path of the image without extension, '/'-separated
    image: str  # URI
    label: str  # URI


@dataclass(frozen=True)
class Layout:
    kind: str  # SEGNET or ORIGINAL
    pairs: tuple[Pair, ...]
    # colour -> class index, only for the original layout
    label_colors: tuple[tuple[tuple[int, int, int], int], ...] = ()
    ignored_files: int = 0  # files that are neither images nor layout metadata
    classes: ClassTable = CAMVID  # the SegNet layout's classes.json, else CamVid's 11 classes

    def split_counts(self) -> dict[str, int]:
        return {s: sum(p.split == s for p in self.pairs) for s in SPLITS if any(p.split == s for p in self.pairs)}


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _stem(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def split_of(name: str) -> str:
    """Deterministic split for a frame without a split list: crc32 of its stem (the file name
    without folders or extension) modulo 100: below 70 train, below 85 val, else test."""
    bucket = zlib.crc32(posixpath.basename(name).encode("utf-8", "surrogateescape")) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def detect(source: str, files: list[str] | None = None) -> Layout:
    """List ``source`` (unless ``files`` are given as URIs below it) and pair images with labels."""
    if files is None:
        files = storage.list_files(source)
    if not files:
        raise LayoutError(f"{source}: no files found; expected a CamVid source (SegNet or original layout)")
    rels = [storage.relative(source, f) for f in files]
    tops = sorted({r.split("/", 1)[0] for r in rels if "/" in r})
    if any(f"{s}annot" in tops for s in SPLITS):
        return _segnet(source, rels)
    if any(is_image(r) and _stem(r).endswith("_L") for r in rels):
        return _original(source, rels)
    examples = ", ".join(rels[:3])
    raise LayoutError(
        f"{source}: neither CamVid layout: found {len(rels)} files (e.g. {examples}; top-level folders: "
        f"{', '.join(tops) or 'none'}); expected train/ + trainannot/ (SegNet) or NAME.png + NAME_L.png "
        f"+ {LABEL_COLORS_FILE} (original)"
    )


def _segnet(source: str, rels: list[str]) -> Layout:
    pairs: list[Pair] = []
    problems: list[str] = []
    ignored = 0
    for split in SPLITS:
        images = {_stem(r[len(split) + 1:]): r for r in rels if r.startswith(f"{split}/") and is_image(r)}
        labels = {_stem(r[len(split) + 6:]): r for r in rels if r.startswith(f"{split}annot/") and is_image(r)}
        ignored += sum(1 for r in rels if r.startswith((f"{split}/", f"{split}annot/")) and not is_image(r))
        for name in sorted(images.keys() - labels.keys()):
            problems.append(f"{storage.join(source, images[name])} has no label in {split}annot/")
        for name in sorted(labels.keys() - images.keys()):
            problems.append(f"{storage.join(source, labels[name])} has no image in {split}/")
        for name in sorted(images.keys() & labels.keys()):
            pairs.append(Pair(split, name, storage.join(source, images[name]), storage.join(source, labels[name])))
    _raise_problems(source, problems)
    if not pairs:
        raise LayoutError(f"{source}: SegNet layout with no image/label pairs (train/ trainannot/ ... are empty)")
    classes = _read_classes(source) if CLASSES_FILE in rels else CAMVID
    return Layout(SEGNET, tuple(pairs), ignored_files=ignored, classes=classes)


def _read_classes(source: str) -> ClassTable:
    """The source's ``classes.json``, validated; LayoutError naming its URI otherwise."""
    uri = storage.join(source, CLASSES_FILE)
    try:
        return load_classes_file(storage.read_bytes(uri), uri)
    except ClassTableError as e:
        raise LayoutError(str(e)) from None


def _original(source: str, rels: list[str]) -> Layout:
    if CLASSES_FILE in rels:
        raise LayoutError(
            f"{storage.join(source, CLASSES_FILE)}: classes.json is read only in the SegNet layout (train/ "
            f"trainannot/ ... with index labels); this source is in the original CamVid layout (NAME_L.png colour "
            f"labels), whose {LABEL_COLORS_FILE} maps to CamVid's 11 classes: remove classes.json, or convert the "
            f"source to the SegNet layout"
        )
    colors_rel = sorted((r for r in rels if posixpath.basename(r) == LABEL_COLORS_FILE), key=len)
    if colors_rel:
        uri = storage.join(source, colors_rel[0])
        table = parse_label_colors(storage.read_bytes(uri).decode("utf-8", "replace"), source=uri)
    else:
        # The release ships label_colors.txt; without it, the official table is the only sensible one.
        table = {rgb: ORIGINAL_TO_11[name] for rgb, name in ORIGINAL_COLORS}
    images: dict[str, str] = {}
    labels: dict[str, str] = {}
    problems: list[str] = []
    for r in rels:
        if not is_image(r):
            continue
        stem = posixpath.basename(_stem(r))
        target, key = (labels, stem[:-2]) if stem.endswith("_L") else (images, stem)
        if key in target:
            problems.append(f"two files for frame {key!r}: {target[key]} and {r}")
        target[key] = r
    for key in sorted(images.keys() - labels.keys()):
        problems.append(f"{storage.join(source, images[key])} has no label {key}_L.png")
    for key in sorted(labels.keys() - images.keys()):
        problems.append(f"{storage.join(source, labels[key])} has no image {key}.png")
    _raise_problems(source, problems)
    split_lists = _read_split_lists(source, rels)
    pairs = []
    for key in sorted(images.keys() & labels.keys()):
        split = split_lists.get(key) if split_lists else split_of(key)
        if split is None:
            # A frame missing from every split list is still used, never dropped silently.
            split = split_of(key)
        pairs.append(Pair(split, _stem(images[key]), storage.join(source, images[key]), storage.join(source, labels[key])))
    ignored = sum(1 for r in rels if not is_image(r) and posixpath.basename(r) != LABEL_COLORS_FILE)
    return Layout(ORIGINAL, tuple(pairs), tuple(sorted(table.items())), ignored_files=ignored)


def _read_split_lists(source: str, rels: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for split in SPLITS:
        if f"{split}.txt" in rels:
            text = storage.read_bytes(storage.join(source, f"{split}.txt")).decode("utf-8", "replace")
            for line in text.split():
                out[posixpath.basename(_stem(line))] = split
    return out


def _raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LayoutError(f"{problems[0]}{more}; every image needs its label and every label its image")


def label_color_table(labels_root: str | None) -> tuple:
    """Colour -> class table of colour-coded ``_L.png`` labels below ``labels_root``: its
    ``label_colors.txt`` if there is one, else the original CamVid table (sorted (rgb, index) pairs)."""
    if labels_root:
        uri = storage.join(labels_root, LABEL_COLORS_FILE)
        if storage.exists(uri):
            return tuple(sorted(parse_label_colors(storage.read_bytes(uri).decode("utf-8", "replace"), uri).items()))
    return tuple(sorted((rgb, ORIGINAL_TO_11[name]) for rgb, name in ORIGINAL_COLORS))


def parse_holdout(text: str) -> tuple[str, ...]:
    """``--holdout`` as given: comma-separated name prefixes (``0006R0`` or ``0006R0,0001TP``), or
    ``@URI`` of a file with one name or prefix a line (blank lines and ``#`` comments skipped)."""
    if text.startswith("@"):
        uri = text[1:]
        try:
            raw = storage.read_bytes(uri).decode("utf-8")
        except (storage.StorageError, UnicodeDecodeError) as e:
            raise LayoutError(f"--holdout {text}: cannot read the list ({e}); pass @FILE with one name a line") from None
        entries = [line.split("#", 1)[0].strip() for line in raw.splitlines()]
    else:
        entries = [e.strip() for e in text.split(",")]
    entries = tuple(dict.fromkeys(e for e in entries if e))
    if not entries:
        raise LayoutError(f"--holdout {text!r} names nothing; pass name prefixes such as 0006R0, or @FILE")
    return entries


def _held_out(name: str, holdout: tuple[str, ...]) -> bool:
    base = posixpath.basename(name)
    return any(name.startswith(e) or base.startswith(e) for e in holdout)


def resplit(layout: Layout, holdout: tuple[str, ...] = (), train_on_val: bool = False) -> Layout:
    """The layout with its train and val pairs split again (docs/design.md, "Validation on unseen streets").

    ``holdout``: name prefixes (a CamVid sequence such as ``0006R0``) or names. Every train or val
    pair whose name (its path below the split folder, without extension), or whose file name,
    starts with one of them becomes val; every other train or val pair becomes train, so that
    the model never sees a frame of a held-out sequence. Test pairs stay test.
    ``train_on_val``: train also gets every val pair (after the holdout, if any); val stays as it
    is, a record of fit rather than a held-out measure. For a final model trained with an epoch
    count fixed beforehand (``jobs/train.py --export last``).
    Raises LayoutError for an entry that matches no pair (a typo would otherwise validate on
    nothing new), for an empty train or val, and for a name in two splits that would meet."""
    if not holdout and not train_on_val:
        return layout
    pairs = list(layout.pairs)
    pool = [p for p in pairs if p.split in ("train", "val")]
    seen: dict[str, str] = {}
    for p in pool:
        if p.name in seen:
            raise LayoutError(f"{p.name} is in both {seen[p.name]}/ and {p.split}/ of the source: --holdout or "
                              "--train-on-val would put the two into one split; rename one of them")
        seen[p.name] = p.split
    if holdout:
        for entry in holdout:
            if not any(_held_out(p.name, (entry,)) for p in pool):
                examples = ", ".join(sorted({posixpath.basename(p.name) for p in pool})[:3])
                raise LayoutError(f"--holdout {entry!r} matches no train or val frame (names look like {examples})")
        pairs = [Pair("val" if _held_out(p.name, holdout) else "train", p.name, p.image, p.label)
                 if p.split in ("train", "val") else p for p in pairs]
    counts = {s: sum(p.split == s for p in pairs) for s in ("train", "val")}
    for split, n in counts.items():
        if n == 0:
            raise LayoutError(f"no {split} frame left{' after --holdout' if holdout else ''}: train and val both need "
                              "frames; hold out fewer sequences")
    if train_on_val:
        pairs += [Pair("train", p.name, p.image, p.label) for p in pairs if p.split == "val"]
    order = {s: i for i, s in enumerate(SPLITS)}
    return replace(layout, pairs=tuple(sorted(pairs, key=lambda p: (order[p.split], p.name))))

"""The classes a dataset is labelled with, as data: names, colours and the void index.

A source in the SegNet layout may carry ``classes.json`` at its root::

    {"classes": [{"name": "road", "color": [128, 64, 128]}, ...], "void": 255}

Its label PNGs then hold class indices ``0..K-1`` and the void index; without the file a
source is CamVid's (:data:`CAMVID`: 11 classes, void 11, from :mod:`segray.camvid`).

The same table travels through ``dataset.json`` and the model's ``config.json`` as the fields
``classes`` (names), ``palette`` (K class colours, then the void colour), ``void_index`` and
``void_name`` (:meth:`ClassTable.to_fields` / :meth:`ClassTable.from_fields`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray.errors import SegrayError
from segray import camvid

CLASSES_FILE = "classes.json"
MIN_CLASSES = 2
MAX_CLASSES = 255  # label PNGs are 8-bit: K classes plus a void index must fit in 0..255
DEFAULT_VOID = 255  # classes.json without "void"
# 255 classes of long names are a few tens of KB; anything far bigger is not a classes.json.
MAX_CLASSES_FILE_BYTES = 1_000_000

_EXAMPLE = '{"classes": [{"name": "road", "color": [128, 64, 128]}, {"name": "car", "color": [64, 0, 128]}], "void": 255}'


class ClassTableError(SegrayError, ValueError):
    """A class table (classes.json, or the class fields of dataset.json/config.json) that cannot
    be used; the message says what is wrong and how to fix it."""


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _color(value: Any, what: str) -> tuple[int, int, int]:
    """``value`` as an ``(r, g, b)`` tuple of ints 0..255, or ClassTableError naming ``what``."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, np.ndarray))
        or len(value) != 3
        or not all(_is_int(c) and 0 <= c <= 255 for c in value)
    ):
        raise ClassTableError(f"{what} is {value!r}: a colour must be 3 integers 0..255, e.g. [128, 64, 128]")
    return (int(value[0]), int(value[1]), int(value[2]))


def _check_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, (Sequence, np.ndarray)):
        raise ClassTableError(f"class names must be a list of strings, got {type(names).__name__}")
    names = tuple(names)
    k = len(names)
    if not MIN_CLASSES <= k <= MAX_CLASSES:
        raise ClassTableError(
            f"{k} classes: a class table needs {MIN_CLASSES} to {MAX_CLASSES} classes (labels are 8-bit PNGs "
            f"holding class indices 0..K-1 and a void index)"
        )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ClassTableError(f"class {i} has name {name!r}: a class name must be a string, e.g. \"road\"")
        if not name.strip():
            raise ClassTableError(f"class {i} has an empty name: give every class a name, e.g. \"road\"")
        if name in seen:
            raise ClassTableError(
                f"class {i} is named {name!r} like class {seen[name]}: class names must be unique; rename one"
            )
        seen[name] = i
    return names


@dataclass(frozen=True)
class ClassTable:
    """K classes (index ``i`` is ``names[i]`` drawn in ``colors[i]``) and the void index.

    Void is the label value of pixels that belong to no class: no loss, no metric counts them.
    It is never a class index (``void_index >= K``). Validated on construction: a table that
    exists is usable.
    """

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    void_index: int
    void_name: str = "Void"
    void_color: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        names = _check_names(self.names)
        k = len(names)
        colors = self.colors
        if isinstance(colors, (str, bytes)) or not isinstance(colors, (Sequence, np.ndarray)):
            raise ClassTableError(f"class colours must be a list of [R, G, B], got {type(colors).__name__}")
        if len(colors) != k:
            raise ClassTableError(f"{len(colors)} colours for {k} classes: give every class exactly one colour")
        colors = tuple(_color(c, f"the colour of class {i} ({names[i]!r})") for i, c in enumerate(colors))
        void = self.void_index
        if not _is_int(void) or not 0 <= void <= 255:
            raise ClassTableError(f"void index {void!r} is not an integer 0..255: labels are 8-bit; e.g. 255")
        if void < k:
            raise ClassTableError(
                f"void index {void} is the index of class {void} ({names[void]!r}): void must not be a class "
                f"index (0..{k - 1}); use a value {k}..255 that no class uses, e.g. 255"
            )
        if not isinstance(self.void_name, str) or not self.void_name.strip():
            raise ClassTableError(f"void name {self.void_name!r} must be a non-empty string, e.g. \"Void\"")
        void_color = _color(self.void_color, "the void colour")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colors", colors)
        object.__setattr__(self, "void_index", int(void))
        object.__setattr__(self, "void_color", void_color)

    @property
    def num_classes(self) -> int:
        """K, the number of real classes (void not included)."""
        return len(self.names)

    @property
    def palette(self) -> list[list[int]]:
        """K class colours, then the void colour: the ``palette`` field of dataset.json/config.json."""
        return [list(c) for c in self.colors] + [list(self.void_color)]

    def lut(self) -> np.ndarray:
        """``(256, 3) uint8`` colour of every label value: classes at their index, void at the void
        index, black elsewhere. ``lut()[mask]`` colourises a mask."""
        out = np.zeros((256, 3), dtype=np.uint8)
        out[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        out[self.void_index] = self.void_color
        return out

    def valid_values(self) -> np.ndarray:
        """``(256,) bool``: True for the label values a label may hold (class indices and void)."""
        out = np.zeros(256, dtype=bool)
        out[: self.num_classes] = True
        out[self.void_index] = True
        return out

    def describe_values(self) -> str:
        """The values a label may hold, in words: ``0..11`` or ``class indices 0..3 and void 255``."""
        k = self.num_classes
        if self.void_index == k:
            return f"0..{k}"
        return f"class indices 0..{k - 1} and void {self.void_index}"

    # --- dataset.json / config.json ---------------------------------------------------------------

    def to_fields(self) -> dict[str, Any]:
        """The class fields of dataset.json and config.json: classes, palette, void_index, void_name."""
        return {
            "classes": list(self.names),
            "palette": self.palette,
            "void_index": self.void_index,
            "void_name": self.void_name,
        }

    @classmethod
    def from_fields(
        cls,
        classes: Sequence[str],
        palette: Sequence[Sequence[int]],
        void_index: int,
        void_name: str = "Void",
        *,
        source: str | None = None,
    ) -> ClassTable:
        """The table of dataset.json/config.json fields. ``palette`` holds K class colours then the
        void colour (K+1 entries), or just the K class colours (void black). ``source`` (a URI) is
        put in front of error messages."""
        try:
            names = _check_names(classes)
            if isinstance(palette, (str, bytes)) or not isinstance(palette, (Sequence, np.ndarray)):
                raise ClassTableError(f"palette must be a list of [R, G, B], got {type(palette).__name__}")
            k = len(names)
            if len(palette) == k + 1:
                colors, void_color = tuple(palette[:k]), _color(palette[k], "the void colour (last palette entry)")
            elif len(palette) == k:
                colors, void_color = tuple(palette), (0, 0, 0)
            else:
                raise ClassTableError(
                    f"palette has {len(palette)} colours for {k} classes: expected {k + 1} (one per class, then "
                    f"void) or {k}"
                )
            return cls(names, colors, void_index, void_name, void_color)
        except ClassTableError as e:
            if source:
                raise ClassTableError(f"{source}: {e}") from None
            raise

    # --- classes.json -----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The table as a ``classes.json`` text, one class a line (void name and colour are not part
        of the format)."""
        lines = [
            "  " + json.dumps({"name": n, "color": list(c)}, ensure_ascii=False) for n, c in zip(self.names, self.colors)
        ]
        return '{\n  "classes": [\n  ' + ",\n  ".join(lines) + f'\n  ],\n  "void": {self.void_index}\n}}\n'

    @classmethod
    def from_json(cls, text: str, source: str = CLASSES_FILE) -> ClassTable:
        """Parse and validate a ``classes.json`` text; errors are ClassTableError naming ``source``."""
        try:
            return cls._from_json(text)
        except ClassTableError as e:
            raise ClassTableError(f"{source}: {e}") from None

    @classmethod
    def _from_json(cls, text: str) -> ClassTable:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ClassTableError(
                f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected e.g. {_EXAMPLE}"
            ) from None
        if not isinstance(doc, dict):
            raise ClassTableError(f"expected a JSON object with \"classes\" (and optionally \"void\"), e.g. {_EXAMPLE}")
        unknown = sorted(set(doc) - {"classes", "void"})
        if unknown:
            raise ClassTableError(f"unknown key {unknown[0]!r}: the known keys are \"classes\" and \"void\"")
        if "classes" not in doc:
            raise ClassTableError(f"no \"classes\" list; expected e.g. {_EXAMPLE}")
        entries = doc["classes"]
        if not isinstance(entries, list):
            raise ClassTableError(f"\"classes\" must be a list of {{\"name\": ..., \"color\": [R, G, B]}}, e.g. {_EXAMPLE}")
        names: list[str] = []
        colors: list[Any] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ClassTableError(f"class {i} is {entry!r}: expected {{\"name\": ..., \"color\": [R, G, B]}}")
            extra = sorted(set(entry) - {"name", "color"})
            if extra:
                raise ClassTableError(f"class {i} has unknown key {extra[0]!r}: a class has \"name\" and \"color\"")
            if "name" not in entry:
                raise ClassTableError(f"class {i} has no name: add \"name\": \"...\"")
            if "color" not in entry:
                raise ClassTableError(f"class {i} ({entry['name']!r}) has no color: add \"color\": [R, G, B]")
            names.append(entry["name"])
            colors.append(entry["color"])
        void = doc.get("void", DEFAULT_VOID)
        names_t = _check_names(names)  # before the colours: a count or a name problem is said first
        colors_t = tuple(_color(c, f"the color of class {i} ({names_t[i]!r})") for i, c in enumerate(colors))
        if not _is_int(void):
            raise ClassTableError(f"\"void\" is {void!r}: it must be an integer 0..255 that is not a class index, e.g. 255")
        return cls(names_t, colors_t, void)


def load_classes_file(data: bytes, uri: str) -> ClassTable:
    """A ``classes.json`` file's bytes -> its table; ClassTableError naming ``uri`` otherwise."""
    if not data:
        raise ClassTableError(f"{uri}: empty file; expected e.g. {_EXAMPLE}")
    if len(data) > MAX_CLASSES_FILE_BYTES:
        raise ClassTableError(
            f"{uri}: {len(data)} bytes is over the {MAX_CLASSES_FILE_BYTES} limit for a class table "
            f"({MAX_CLASSES} classes take a few KB)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClassTableError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSON") from None
    return ClassTable.from_json(text, uri)


# CamVid's 11 classes and void 11: the table of every source without classes.json.
CAMVID = ClassTable(
    names=camvid.CLASSES,
    colors=camvid.PALETTE[: camvid.NUM_CLASSES],
    void_index=camvid.VOID_INDEX,
    void_name=camvid.VOID_NAME,
    void_color=camvid.VOID_COLOR,
)

"""Pure image functions: decode, convert, resize. No Ray, no storage.

Images are ``(H, W, 3) uint8`` RGB; label masks are ``(H, W) uint8`` class indices 0..K-1 and
the void index of a :class:`segray.classes.ClassTable` (CamVid's by default: 0..10, void 11).
Images are resized with PIL's BILINEAR filter, which PIL widens by the scale factor when
shrinking (i.e. it antialiases); labels only ever with NEAREST, so every output value is a
value of the source mask. Training and inference both resize through here, so a model sees
the same pixels in both.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from segray.errors import SegrayError
from segray.camvid import VOID_INDEX
from segray.classes import CAMVID, ClassTable

IMAGE_RESAMPLE = Image.Resampling.BILINEAR
# A 4K frame is 8.3 Mpx; anything over this is refused as a likely decompression bomb.
MAX_PIXELS = 64_000_000


class BadInputError(SegrayError, ValueError):
    """An input file that cannot be used; the message names it and says why."""


def parse_size(text: str) -> tuple[int, int]:
    """``"176x240"`` -> ``(176, 240)`` (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not HxW, e.g. 176x240") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size {text!r} must be positive, e.g. 176x240")
    return h, w


def _open(data: bytes, name: str) -> Image.Image:
    if not data:
        raise BadInputError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise BadInputError(
                    f"{name}: {img.width}x{img.height} pixels is over the {MAX_PIXELS} limit (decompression bomb?)"
                )
            img.load()
    except BadInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInputError(f"{name}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadInputError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return img


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode any PNG/JPEG (grayscale, RGBA, 16-bit, palette) into ``(H, W, 3) uint8`` RGB."""
    img = _open(data, name)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the top 8 bits so the picture looks the same.
        arr = np.asarray(img, dtype=np.uint32)
        scale = 257 if arr.max(initial=0) > 255 else 1
        arr = (arr // scale).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


ColorLookup = tuple[np.ndarray, np.ndarray]  # a color_lookup result: sorted packed colours, indices


def decode_label(
    data: bytes,
    name: str,
    classes: ClassTable = CAMVID,
    colors: ColorLookup | dict | tuple | None = None,
) -> tuple[np.ndarray, int]:
    """Decode a label file into ``(mask (H, W) uint8, unmapped_pixel_count)``: the one label
    decoder of prepare, infer and evaluate.

    Without ``colors`` the PNG holds class indices (grey, palette PNGs read by index, 16-bit, or
    RGB with equal channels; a colour RGB is refused), and a value that is neither a class index
    ``0..K-1`` nor ``classes.void_index`` is refused; the count is 0. With ``colors`` (a
    :func:`color_lookup` result, or the colour table it is made from) the label is colour-coded,
    e.g. CamVid's original ``NAME_L.png``: colours map to indices, colours not in the table become
    void and are counted. Raises BadInputError naming ``name``.
    """
    if colors is not None:
        lookup = _as_lookup(colors, classes)
        return colors_to_index(decode_image(data, name), lookup, classes.void_index)
    img = _open(data, name)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise BadInputError(
                f"{name}: label is a colour image; expected single-channel class indices {classes.describe_values()}"
            )
        arr = arr[..., 0]
    elif img.mode in ("L", "P"):
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("I"))
    k, void = classes.num_classes, classes.void_index
    if arr.dtype == np.uint8:
        # The common cases in one pass over the pixels: every value a class index, or (CamVid)
        # the classes and void as one range 0..K. Only other labels pay for the full check.
        top = int(arr.max(initial=0))
        if top < k or (top == void == k):
            return arr.astype(np.uint8), 0  # a copy, writable and contiguous, as below
        bad_pixels = ~classes.valid_values()[arr]
    else:  # 16/32-bit: values over 255 are never a class
        wide = arr.astype(np.int64)
        bad_pixels = (wide < 0) | (wide > 255) | ~classes.valid_values()[wide.clip(0, 255)]
    if bad_pixels.any():
        bad = np.unique(arr[bad_pixels])
        shown = ", ".join(str(int(v)) for v in bad[:5])
        more = f" (and {bad.size - 5} more)" if bad.size > 5 else ""
        raise BadInputError(f"{name}: label values outside {classes.describe_values()}: {shown}{more}")
    return arr.astype(np.uint8), 0


def decode_index_label(data: bytes, name: str = "<bytes>", classes: ClassTable = CAMVID) -> np.ndarray:
    """Decode a SegNet-style label PNG of class indices into ``(H, W) uint8``.

    Palette PNGs are read by index, not by colour. Raises BadInputError for values that are
    neither a class of ``classes`` nor its void index (:func:`decode_label` without colours)."""
    return decode_label(data, name, classes)[0]


def _as_lookup(colors: ColorLookup | dict | tuple, classes: ClassTable) -> ColorLookup:
    """A color_lookup result (or a table to make one of) whose indices are all ``classes``' values."""
    is_lookup = (
        isinstance(colors, tuple) and len(colors) == 2 and all(isinstance(c, np.ndarray) for c in colors)
    )
    lookup = colors if is_lookup else color_lookup(colors)
    values = lookup[1]
    bad = np.unique(values[~classes.valid_values()[values]]) if values.size else values
    if bad.size:
        raise ValueError(
            f"colour table maps to {', '.join(str(int(v)) for v in bad[:5])}, which is neither a class nor void "
            f"({classes.describe_values()})"
        )
    return lookup


def color_lookup(table: dict[tuple[int, int, int], int] | tuple) -> tuple[np.ndarray, np.ndarray]:
    """A colour table (rgb -> index) as sorted packed keys and values, for :func:`colors_to_index`."""
    items = sorted(dict(table).items())
    keys = np.array([(r << 16) | (g << 8) | b for (r, g, b), _ in items], dtype=np.int64)
    values = np.array([v for _, v in items], dtype=np.uint8)
    return keys, values


def colors_to_index(
    rgb: np.ndarray, lookup: tuple[np.ndarray, np.ndarray], void_index: int = VOID_INDEX
) -> tuple[np.ndarray, int]:
    """Map an ``(H, W, 3)`` colour-coded label to ``(H, W) uint8`` indices.

    Colours not in the table become ``void_index``; returns ``(mask, number_of_unmapped_pixels)``.
    """
    keys, values = lookup
    if keys.size == 0:
        return np.full(rgb.shape[:2], void_index, dtype=np.uint8), int(rgb.shape[0] * rgb.shape[1])
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pos = np.searchsorted(keys, packed).clip(0, len(keys) - 1)
    found = keys[pos] == packed
    out = np.where(found, values[pos], void_index).astype(np.uint8)
    return out, int((~found).sum())


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(h, w, 3) uint8`` with an antialiased bilinear filter."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), IMAGE_RESAMPLE))


def resize_label(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W) uint8`` -> ``(h, w) uint8`` with NEAREST: no new class values are invented."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))


def colorize(mask: np.ndarray, palette_or_table: ClassTable | list | tuple = CAMVID) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3) uint8`` colours.

    With a ClassTable: class colours, the void colour at its void index, black elsewhere. With a
    palette list: ``palette[i]`` at value ``i``, black beyond the list."""
    if isinstance(palette_or_table, ClassTable):
        lut = palette_or_table.lut()
    else:
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(palette_or_table)] = np.asarray(palette_or_table, dtype=np.uint8).reshape(-1, 3)
    return lut[mask]


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

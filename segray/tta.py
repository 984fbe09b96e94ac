"""Test-time options of infer, in plain torch (no Ray): flip and multi-scale averaging, tiling.

Every function takes ``forward``, a callable ``(N, 3, h, w) float -> (N, C, h, w) logits``: the
model with whatever the replica wraps around it (bf16 autocast on GPU, channels-last). Each
pass's logits are taken to float32 before anything is added, so averages are float32 whatever
precision the model ran in; the caller argmaxes the result.

- ``--tta flip``: the logits of ``x`` and ``flip(logits(flip(x)))`` (horizontal flip), averaged:
  2 passes.
- ``--scales s1,s2,...``: for each factor s, the batch resized (bilinear, align_corners=False) to
  ``round(s*h) x round(s*w)``, its logits resized back to ``h x w`` (bilinear), all averaged
  (flipped too with ``--tta flip``): model time about the sum of s^2 (times 2 with flip).
- ``--tile HxW --overlap PX``: the frame at its own size, cut into HxW windows on a grid of
  stride ``H-PX`` / ``W-PX`` whose last window in each dimension is aligned to the frame's edge
  (a side shorter than the tile is one window of the frame's size there); windows go through the
  model ``batch_size`` at a time, their logits are summed into a frame-sized map on the model's
  device and divided by how many windows cover each pixel. Default ``--overlap``: a quarter of
  the tile's smaller side (:func:`default_overlap`). With ``--tta flip`` each window is flipped.
  Model time: the number of windows (each the tile's size). Tiling with ``--scales`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from segray.errors import SegrayError

FLIP = "flip"
TTA_CHOICES = (FLIP,)

Forward = Callable[[torch.Tensor], torch.Tensor]


class TTAError(SegrayError, ValueError):
    """A test-time option that cannot be used; the message names its flag."""


# ----------------------------------------------------------------------------- options


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.75,1,1.25"`` -> ``(0.75, 1.0, 1.25)``, checked (:func:`check_scales`)."""
    parts = [p.strip() for p in str(text).split(",")]
    values = []
    for p in parts:
        try:
            values.append(float(p))
        except ValueError:
            raise TTAError(f"--scales {text!r}: {p!r} is not a number; pass factors such as 0.75,1,1.25") from None
    return check_scales(values)


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """At least one factor, each positive and finite, no two equal; returns them as a tuple of floats."""
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise TTAError(f"--scales must be numbers such as 0.75,1,1.25, got {scales!r}") from None
    if not values:
        raise TTAError("--scales needs at least one factor, e.g. 0.75,1,1.25")
    for s in values:
        if not (math.isfinite(s) and s > 0):
            raise TTAError(f"--scales: every factor must be a positive finite number, got {s:g}")
    if len(set(values)) != len(values):
        dup = next(s for s in values if values.count(s) > 1)
        raise TTAError(f"--scales: factor {dup:g} is given twice; pass each factor once")
    return values


def parse_tile(text: str) -> tuple[int, int]:
    """``"176x240"`` -> ``(176, 240)`` (height, width), both positive."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise TTAError(f"--tile {text!r} is not HxW in pixels, e.g. 176x240") from None
    return check_tile((h, w))


def check_tile(tile: Sequence[int]) -> tuple[int, int]:
    try:
        ok = len(tile) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tile)
    except TypeError:
        ok = False
    if not ok:
        shown = "x".join(map(str, tile)) if isinstance(tile, (list, tuple)) else repr(tile)
        raise TTAError(f"--tile must be two positive integers HxW, got {shown}")
    return int(tile[0]), int(tile[1])


def default_overlap(tile: tuple[int, int]) -> int:
    """The overlap of windows when ``--tile`` comes without ``--overlap``: a quarter of the smaller side."""
    return min(tile) // 4


def check_options(tta: str | None, scales: Sequence[float] | None, tile: Sequence[int] | None,
                  overlap: int | None) -> tuple[tuple[float, ...] | None, tuple[int, int] | None, int | None]:
    """Validate the test-time options together; returns (scales, tile, overlap) normalised (tuples;
    the overlap resolved to :func:`default_overlap` with a tile). Raises TTAError naming the flag."""
    if tta is not None and tta not in TTA_CHOICES:
        raise TTAError(f"--tta {tta!r}: the only test-time augmentation is {FLIP!r}")
    scales = check_scales(scales) if scales is not None else None
    if tile is None:
        if overlap is not None:
            raise TTAError("--overlap is the overlap of --tile windows; pass --tile HxW with it")
        return scales, None, None
    tile = check_tile(tile)
    if scales is not None:
        raise TTAError("--tile and --scales cannot be combined: tiling runs at the frame's own resolution; "
                       "pass one of them")
    if overlap is None:
        overlap = default_overlap(tile)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < min(tile):
        raise TTAError(f"--overlap must be an integer from 0 to less than both sides of --tile "
                       f"{tile[0]}x{tile[1]}, got {overlap!r}")
    return scales, tile, overlap


def passes(tta: str | None, scales: Sequence[float] | None) -> int:
    """Model calls per frame (or per window) of these options."""
    return (2 if tta == FLIP else 1) * (len(scales) if scales else 1)


def describe(tta: str | None, scales: Sequence[float] | None, tile: Sequence[int] | None,
             overlap: int | None) -> str:
    """The options in words, for the job's output; "" when none is used."""
    parts = []
    if tta == FLIP:
        parts.append("flip")
    if scales:
        parts.append("scales " + ",".join(f"{s:g}" for s in scales))
    if tile:
        parts.append(f"tile {tile[0]}x{tile[1]} overlap {overlap} (frames at their own size)")
    if not parts:
        return ""
    return ", ".join(parts) + f"; {passes(tta, scales)} model pass(es) per {'window' if tile else 'frame'}"


RECORD_KEYS = ("tta", "scales", "tile", "overlap")  # in infer.json, each named like its flag


def record(tta: str | None, scales: Sequence[float] | None, tile: Sequence[int] | None,
           overlap: int | None) -> dict:
    """The options as ``infer.json`` holds them: null when off, lists, the overlap resolved."""
    return {"tta": tta, "scales": list(scales) if scales else None, "tile": list(tile) if tile else None,
            "overlap": overlap}


def shown(key: str, value) -> str:
    """A recorded option's value as its flag takes it (``0.75,1``, ``64x64``), "none" when off."""
    if value is None or value == "":
        return "none"
    if key in ("scales", "tile") and isinstance(value, (list, tuple)):
        return ("x" if key == "tile" else ",").join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
    return str(value)


# ----------------------------------------------------------------------------- flip and scales


def augmented_logits(forward: Forward, x: torch.Tensor, flip: bool = False,
                     scales: Sequence[float] | None = None) -> torch.Tensor:
    """``(N, 3, h, w)`` -> ``(N, C, h, w)`` float32: the mean of the logits of every pass (each
    scale, each flipped with ``flip``), every pass brought back to ``h x w``."""
    h, w = x.shape[-2:]
    total: torch.Tensor | None = None
    count = 0
    for s in scales or (1.0,):
        size = (max(1, round(s * h)), max(1, round(s * w)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = forward(xs).float()
        if flip:
            logits = logits + forward(xs.flip(-1)).float().flip(-1)
        if size != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        total = logits if total is None else total.add_(logits)
        count += 2 if flip else 1
    assert total is not None
    return total.div_(count)


# ----------------------------------------------------------------------------- tiling


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of windows of ``window`` pixels along ``length``: 0, stride, 2*stride, ... and a last
    one at ``length - window`` (the edge); a single window at 0 when ``window >= length``."""
    if window >= length:
        return [0]
    return [*range(0, length - window, stride), length - window]


def window_grid(size: tuple[int, int], tile: tuple[int, int], overlap: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The windows of a frame of ``size`` (h, w): their common size (the tile, clipped to the
    frame) and their top-left corners, row by row."""
    (h, w), (th, tw) = size, tile
    wh, ww = min(th, h), min(tw, w)
    ys = window_starts(h, wh, th - overlap)
    xs = window_starts(w, ww, tw - overlap)
    return (wh, ww), [(y, x) for y in ys for x in xs]


def window_count(size: tuple[int, int], tile: tuple[int, int], overlap: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``(h, w)`` float32: how many windows cover each pixel."""
    (wh, ww), corners = window_grid(size, tile, overlap)
    count = torch.zeros(size, dtype=torch.float32, device=device)
    for y, x in corners:
        count[y : y + wh, x : x + ww] += 1
    return count


def tiled_logits(forward: Forward, x: torch.Tensor, tile: tuple[int, int], overlap: int, batch_size: int,
                 flip: bool = False) -> torch.Tensor:
    """``(N, 3, H, W)`` frames of one size -> ``(N, C, H, W)`` float32 logits, averaged over the
    windows covering each pixel; windows of all N frames go ``batch_size`` at a time through
    ``forward`` (each also flipped with ``flip``). Sums stay on ``x``'s device."""
    n, _, h, w = x.shape
    (wh, ww), corners = window_grid((h, w), tile, overlap)
    jobs = [(i, y, c) for i in range(n) for y, c in corners]
    total: torch.Tensor | None = None
    for k in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[k : k + batch_size]
        windows = torch.stack([x[i, :, y : y + wh, c : c + ww] for i, y, c in chunk])
        logits = augmented_logits(forward, windows, flip=flip)
        if total is None:
            total = torch.zeros((n, logits.shape[1], h, w), dtype=torch.float32, device=logits.device)
        for (i, y, c), piece in zip(chunk, logits):
            total[i, :, y : y + wh, c : c + ww] += piece
    assert total is not None
    return total.div_(window_count((h, w), tile, overlap, total.device))

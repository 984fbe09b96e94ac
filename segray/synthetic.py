"""Procedurally drawn CamVid-style street scenes, for tests and the demo.

A scene is a one-point-perspective street: sky, buildings lining both sides, a road with lane
markings running to a vanishing point, pavements, and in front of them trees, poles with signs,
fences, cars, pedestrians and bicyclists, plus a few void patches. Every class keeps one colour
family and one texture from image to image (and objects sit where they would in a street), so a
small U-Net learns the data within a few epochs; positions, sizes, colours, lighting and noise
vary so that it has to generalise.

    python -m segray.synthetic --dest /tmp/camvid-synth --layout original --train 40 --val 10

Geometry, in one place: the horizon is row ``hy`` and the vanishing point column ``vx``. For a
pixel below the horizon, ``L = (x - vx) / (y - hy)`` is its lateral offset on the ground in
camera heights (constant along every line to the vanishing point), so the road is
``|L| < road`` and the pavement ``road <= |L| < walk``. An object standing on the ground at row
``yb`` is drawn ``u = yb - hy`` pixels per camera height, which makes far things small.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from types import MappingProxyType

import numpy as np
from PIL import Image

from segray import storage
from segray.camvid import ORIGINAL_COLORS, ORIGINAL_TO_11, format_label_colors
from segray.classes import CLASSES_FILE, ClassTable
from segray.layout import LABEL_COLORS_FILE, ORIGINAL, SEGNET, SPLITS, split_of
from segray.preprocess import encode_png, parse_size

LAYOUTS: tuple[str, ...] = (SEGNET, ORIGINAL)
DEFAULT_COUNTS: Mapping[str, int] = MappingProxyType({"train": 24, "val": 8})
DEFAULT_SIZE: tuple[int, int] = (96, 128)
# Below this the thinnest objects (poles, sign symbols) no longer have a pixel to live in.
MIN_SIDE = 16
# CamVid labels one frame a second of 30 fps video, so its frame numbers step by 30.
FRAME_STEP = 30
SEQUENCE = "Seq01"

# Name of an original CamVid class -> its row in ORIGINAL_COLORS. Every pixel is painted under
# one of these names; its 11-class label is ORIGINAL_TO_11[name], so the two labellings agree.
_ORIGINAL_INDEX: Mapping[str, int] = MappingProxyType({name: i for i, (_, name) in enumerate(ORIGINAL_COLORS)})

Color = tuple[float, float, float]


# ----------------------------------------------------------------------------------- canvas


@dataclass(frozen=True)
class _Window:
    """A clipped rectangle of the canvas; ``ys`` (h, 1) and ``xs`` (1, w) are pixel centres."""

    rows: slice
    cols: slice
    ys: np.ndarray
    xs: np.ndarray


class _Canvas:
    """A scene being drawn, one value a pixel: a *material* (an RGB colour painted under one
    original CamVid class name) and a *shade* factor (texture, shadows).

    Colour, 11-class label and original label are all looked up from the material at the end.
    Painting thus touches two (H, W) arrays instead of three colour channels plus two label
    maps (numpy is slow on a trailing axis of 3), and a pixel's label can never disagree with
    what was painted there.
    """

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.material = np.zeros((height, width), np.uint16)
        self.shade = np.ones((height, width), np.float32)
        self.colors: list[np.ndarray] = []
        self.names: list[str] = []
        # The sky's additive light (clouds, haze): (material, (rows, W) float32) or None.
        self.glow: tuple[int, np.ndarray] | None = None
        self.add((0, 0, 0), "Void")  # material 0: anything never painted is void

    def add(self, color: Color | np.ndarray, name: str) -> int:
        """Register a material; returns its id."""
        self.colors.append(np.asarray(color, np.float32))
        self.names.append(name)
        return len(self.colors) - 1

    def add_many(self, colors: np.ndarray, name: str) -> np.ndarray:
        """Register ``(n, 3)`` colours under one name; returns their ids, ``(n,) uint16``."""
        first = len(self.colors)
        for color in colors:
            self.add(color, name)
        return np.arange(first, len(self.colors), dtype=np.uint16)

    def window(self, y0: float, y1: float, x0: float, x1: float) -> _Window | None:
        """The pixels whose centres may fall in [y0, y1) x [x0, x1), or None if off-canvas."""
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        if r0 >= r1 or c0 >= c1:
            return None
        ys = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5)
        xs = np.arange(c0, c1, dtype=np.float32)[None, :] + np.float32(0.5)
        return _Window(slice(r0, r1), slice(c0, c1), ys, xs)

    def full(self) -> _Window:
        return _Window(slice(0, self.h), slice(0, self.w),
                       np.arange(self.h, dtype=np.float32)[:, None] + np.float32(0.5),
                       np.arange(self.w, dtype=np.float32)[None, :] + np.float32(0.5))

    def paint(self, win: _Window | None, mask: np.ndarray | bool, material: int | np.ndarray,
              shade: float | np.ndarray = 1.0) -> None:
        """Set ``material`` (an id, or ids broadcastable to the window) and ``shade`` where
        ``mask`` holds."""
        if win is None:
            return
        mask = np.asarray(mask, bool)
        np.copyto(self.material[win.rows, win.cols], material, casting="unsafe", where=mask)
        np.copyto(self.shade[win.rows, win.cols], shade, casting="unsafe", where=mask)

    def darken(self, win: _Window | None, mask: np.ndarray, factor: float) -> None:
        """Multiply the shade by ``factor`` where ``mask`` holds; materials stay (shadows)."""
        if win is None:
            return
        view = self.shade[win.rows, win.cols]
        np.multiply(view, np.float32(factor), out=view, where=np.asarray(mask, bool))

    def finish(self, gain: np.ndarray, light: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, ...]:
        """Image ``(H, W, 3) uint8`` = material colour x ``gain`` (3,) x shade x ``light``
        (H, W), plus the sky's glow and ``noise`` (H, W, 3); with label and original index
        ``(H, W) uint8``."""
        palette = np.stack(self.colors) * gain.astype(np.float32)  # (N, 3)
        image = np.take(palette, self.material, axis=0)
        image *= (self.shade * light)[..., None]
        if self.glow is not None:
            sky, glow = self.glow
            rows = glow.shape[0]
            add = np.where(self.material[:rows] == sky, glow * light[:rows], np.float32(0))
            image[:rows] += add[..., None] * gain.astype(np.float32)
        image += noise
        np.clip(image, 0, 255, out=image)
        label_of = np.asarray([ORIGINAL_TO_11[n] for n in self.names], np.uint8)
        original_of = np.asarray([_ORIGINAL_INDEX[n] for n in self.names], np.uint8)
        return image.astype(np.uint8), np.take(label_of, self.material), np.take(original_of, self.material)


# ----------------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """(H, W) float32 value noise in 0..1 with features about ``cell`` pixels wide: a coarse
    random grid, bilinearly upsampled (by PIL, in C: several times faster than numpy gathers)."""
    cell = max(float(cell), 1.0)
    grid = rng.random((int(np.ceil(height / cell)) + 1, int(np.ceil(width / cell)) + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR))


def _gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise, quantised to 256 levels: random bytes through the normal's inverse CDF.
    Several times faster than ``standard_normal``, and the same thing at 8 bits a channel."""
    levels = NormalDist(0.0, sigma)
    lut = np.asarray([levels.inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)
    return np.take(lut, rng.integers(0, 256, shape, dtype=np.uint8))


def _frac(x: np.ndarray) -> np.ndarray:
    # x - floor(x) rather than x % 1: numpy's float modulo is ~20 times slower.
    return x - np.floor(x)


def _jitter_many(rng: np.random.Generator, choices: tuple[Color, ...], n: int, spread: float) -> np.ndarray:
    """``(n, 3)`` colours, each one of ``choices`` with its own brightness and a small tint."""
    base = np.asarray(choices, np.float32)[rng.integers(len(choices), size=n)]
    base *= rng.uniform(1 - spread, 1 + spread, (n, 1)).astype(np.float32)
    base *= rng.uniform(0.93, 1.07, (n, 3)).astype(np.float32)
    return np.clip(base, 0, 255)


def _jitter(rng: np.random.Generator, color: Color | np.ndarray, spread: float) -> np.ndarray:
    """A colour near ``color``, ``(3,) float32``."""
    return _jitter_many(rng, (tuple(color),), 1, spread)[0]  # type: ignore[arg-type]


def _pick(rng: np.random.Generator, options: Mapping[str, float]) -> str:
    """One key of ``options``, drawn with the given weights."""
    names = list(options)
    p = np.asarray(list(options.values()), np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _ellipse(win: _Window, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((win.ys - cy) / max(ry, 0.5)) ** 2 + ((win.xs - cx) / max(rx, 0.5)) ** 2 <= 1


def _rect(win: _Window, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    # Grow sub-pixel extents to one pixel so that far, thin things do not vanish between centres.
    if x1 - x0 < 1:
        x0, x1 = (x0 + x1) / 2 - 0.5, (x0 + x1) / 2 + 0.5
    if y1 - y0 < 1:
        y0, y1 = (y0 + y1) / 2 - 0.5, (y0 + y1) / 2 + 0.5
    return (win.ys >= y0) & (win.ys < y1) & (win.xs >= x0) & (win.xs < x1)


def _segment(win: _Window, p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of the segment p0-p1 (points are (y, x))."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((win.ys - y0) * dy + (win.xs - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
    dist2 = (win.ys - y0 - t * dy) ** 2 + (win.xs - x0 - t * dx) ** 2
    return dist2 <= max(width / 2, 0.5) ** 2


def _saturated(rng: np.random.Generator, hues: tuple[tuple[float, float], ...], s: tuple[float, float],
               v: tuple[float, float]) -> Color:
    lo, hi = hues[int(rng.integers(len(hues)))]
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(lo, hi) % 1.0, rng.uniform(*s), rng.uniform(*v))
    return (r * 255, g * 255, b * 255)


# ----------------------------------------------------------------------------------- palette
# One colour family per class, kept apart so that colour alone already says a lot; shapes and
# textures say the rest.

SKY_TOP: Color = (70, 125, 205)
SKY_HORIZON: Color = (185, 205, 230)
BUILDINGS: tuple[Color, ...] = ((120, 112, 105), (135, 100, 80), (150, 135, 115), (105, 105, 110), (140, 85, 70))
WINDOW: Color = (45, 55, 70)
ROAD: Color = (78, 78, 82)
LANE_WHITE: Color = (225, 225, 220)
LANE_YELLOW: Color = (225, 190, 70)
PAVEMENT: Color = (172, 160, 148)
CURB: Color = (195, 192, 185)
LEAVES: Color = (62, 120, 45)
TRUNK: Color = (85, 62, 42)
POLE: Color = (150, 155, 160)
FENCE: Color = (150, 105, 62)
TIRE: Color = (25, 25, 28)
GLASS: Color = (40, 52, 68)
SKIN: Color = (220, 175, 140)
HAIR: Color = (45, 35, 25)
CLOTHES: tuple[Color, ...] = ((35, 40, 70), (90, 30, 35), (40, 40, 42), (70, 60, 50), (30, 70, 90), (120, 110, 40))
# Car paint: saturated and bright (dark reds read as brick), away from the greens of trees and the
# blue-greys of sky and buildings.
CAR_HUES: tuple[tuple[float, float], ...] = ((-0.04, 0.07), (0.55, 0.7), (0.8, 0.95))
SIGN_RED: Color = (205, 30, 35)
SIGN_BLUE: Color = (20, 70, 190)
SIGN_GREEN: Color = (30, 110, 60)
SIGN_YELLOW: Color = (240, 200, 30)
SIGN_WHITE: Color = (240, 240, 240)
LAMPS: tuple[Color, ...] = ((220, 30, 30), (240, 150, 20), (40, 220, 90))
HOUSING: Color = (30, 30, 32)
BONNET: Color = (40, 40, 45)


# ----------------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class _Street:
    """Where the street lies: horizon row, vanishing column, and per side (left, right) the
    road edge and the pavement's outer edge as lateral ground offsets |L| in camera heights."""

    hy: float
    vx: float
    road: tuple[float, float]
    walk: tuple[float, float]

    def edge(self, side: int, which: tuple[float, float]) -> float:
        return which[0] if side < 0 else which[1]


def _sample_street(rng: np.random.Generator, h: int, w: int) -> _Street:
    hy = h * rng.uniform(0.36, 0.5)
    vx = w * rng.uniform(0.36, 0.64)
    depth = h - hy  # rows between horizon and bottom: u of an object standing on the bottom row
    # Half-widths where the street meets the bottom row, as fractions of the image width.
    road = (w * rng.uniform(0.35, 0.6) / depth, w * rng.uniform(0.35, 0.6) / depth)
    walk = (road[0] + w * rng.uniform(0.15, 0.45) / depth, road[1] + w * rng.uniform(0.15, 0.45) / depth)
    return _Street(hy, vx, road, walk)


def _draw_sky(c: _Canvas, rng: np.random.Generator, st: _Street) -> None:
    """A blue that pales towards the horizon, with clouds: shade keeps part of the blue and
    the glow adds white for the rest."""
    sky = c.add(_jitter(rng, SKY_TOP, 0.12), "Sky")
    c.paint(c.full(), True, sky)  # the whole frame; everything else is drawn over it
    rows = min(int(np.ceil(st.hy)) + 1, c.h)
    win = c.window(0, rows, 0, c.w)
    pale = rng.uniform(0.35, 0.65)
    t = np.clip(win.ys / np.float32(max(st.hy, 1.0)), 0, 1)  # (rows, 1): 0 at the top, 1 at the horizon
    cover = rng.uniform(0.0, 0.7)  # from clear to overcast
    clouds = _smooth_noise(rng, rows, c.w, c.w / rng.uniform(4, 9))
    amount = np.clip((clouds - np.float32(1 - cover)) * 3, 0, 0.9)
    keep = (1 - np.float32(pale) * t) * (1 - amount)
    c.paint(win, True, sky, keep)
    c.glow = (sky, np.float32(rng.uniform(225, 245)) * (1 - keep))


def _column_blocks(rng: np.random.Generator, n_cols: int, min_w: float, max_w: float) -> np.ndarray:
    """(n_cols,) block index of each column, for blocks of random widths in [min_w, max_w)."""
    widths = rng.uniform(min_w, max_w, int(n_cols / max(min_w, 1.0)) + 2)
    return np.searchsorted(np.cumsum(widths), np.arange(n_cols) + 0.5)


def _draw_far_buildings(c: _Canvas, rng: np.random.Generator, st: _Street) -> None:
    """Low buildings at the end of the street, hazy (mixed with the horizon's colour)."""
    block = _column_blocks(rng, c.w, c.w * 0.03, c.w * 0.1)
    n = int(block.max()) + 1
    heights = (rng.uniform(0.01, 0.1, n) * c.h * (rng.random(n) < 0.85)).astype(np.float32)
    haze = np.float32(0.3)
    colors = _jitter_many(rng, BUILDINGS, n, 0.1) * (1 - haze) + np.asarray(SKY_HORIZON, np.float32) * haze
    ids = c.add_many(colors, "Building")
    win = c.window(st.hy - float(heights.max()) - 1, st.hy + 1, 0, c.w)
    if win is not None:
        c.paint(win, win.ys >= st.hy - heights[block][None, :], ids[block][None, :])


def _draw_facades(c: _Canvas, rng: np.random.Generator, st: _Street, grain: np.ndarray) -> None:
    """Building fronts on both sides, in perspective: a block's top edge and its rows of windows
    run towards the vanishing point. For a column ``d`` pixels from the vanishing point, depth
    along the street is ``W * walk / d`` and height on the facade ``(hy - y) * walk / d``, both
    in camera heights (focal length = image width)."""
    for side in (-1, 1):
        win = c.window(0, c.h, 0, st.vx + 1) if side < 0 else c.window(0, c.h, st.vx - 1, c.w)
        if win is None:
            continue
        d = (st.vx - win.xs) * -side  # (1, w), > 0 on this side
        on_side = d > 0.5
        d = np.maximum(d, np.float32(0.5))
        walk = np.float32(st.edge(side, st.walk))
        # Blocks are equally long in log(d), i.e. in depth: near ones wide, far ones narrow.
        edges = np.log(c.w) - np.cumsum(rng.uniform(0.25, 0.6, 64))  # decreasing
        block = np.searchsorted(-edges, -np.log(d))  # (1, w) block of each column
        n = int(block.max()) + 1
        v_top = rng.uniform(0.2, 1.2, n) * np.where(rng.random(n) < 0.15, 0.15, 1.0)  # some gaps
        floors = rng.uniform(0.8, 1.2, n)  # window rows per camera height
        bays = rng.uniform(0.6, 1.2, n)  # window columns per camera height of depth
        name = _pick(rng, {"Building": 0.85, "Wall": 0.15})
        walls = c.add_many(_jitter_many(rng, BUILDINGS, n, 0.18), name)
        glass = c.add_many(_jitter_many(rng, (WINDOW,), n, 0.25), name)

        dy = win.ys - np.float32(st.hy)  # (H, 1)
        v = -dy / d  # (H, w): height above the eye over distance to the facade
        mask = on_side & (v <= v_top[block]) & (dy * walk < d)
        bays_here = _frac(c.w * walk / d * bays[block]) < 0.55  # (1, w)
        windows = bays_here & (_frac(v * walk * floors[block] + 0.2) < 0.45)
        c.paint(win, mask, np.where(windows, glass[block], walls[block]), 0.92 + 0.16 * grain[win.rows, win.cols])


def _draw_ground(c: _Canvas, rng: np.random.Generator, st: _Street, grain: np.ndarray) -> None:
    """Road, lane markings, curbs and tiled pavements below the horizon."""
    win = c.window(st.hy + 0.5, c.h, 0, c.w)
    if win is None:
        return
    dy = win.ys - np.float32(st.hy)  # (h, 1) > 0
    lat = (win.xs - np.float32(st.vx)) / dy  # L: lateral ground offset, camera heights
    left = win.xs < st.vx
    road = np.where(left, np.float32(st.road[0]), np.float32(st.road[1]))  # (1, w)
    walk = np.where(left, np.float32(st.walk[0]), np.float32(st.walk[1]))
    a = np.abs(lat)
    depth = c.w / dy  # distance along the ground, camera heights (focal length = image width)
    tex = grain[win.rows, win.cols]

    road_mask = a < road
    c.paint(win, road_mask, c.add(_jitter(rng, ROAD, 0.15), "Road"), 0.9 + 0.2 * tex)

    # Lane markings are road (CamVid's LaneMkgsDriv), so a model must learn to look past them.
    center = rng.uniform(-0.25, 0.25) * min(st.road)
    lane_w = rng.uniform(0.04, 0.07)
    dashes = _frac(depth / rng.uniform(4, 8) + rng.random()) < rng.uniform(0.35, 0.6)  # (h, 1)
    lane = c.add(_jitter(rng, LANE_YELLOW if rng.random() < 0.3 else LANE_WHITE, 0.05), "LaneMkgsDriv")
    c.paint(win, (np.abs(lat - center) < lane_w) & dashes & road_mask, lane)
    if rng.random() < 0.6:
        edge_line = (a > road - 0.08 - 0.9 * lane_w) & (a < road - 0.08)
        c.paint(win, edge_line, c.add(_jitter(rng, LANE_WHITE, 0.05), "LaneMkgsNonDriv"))

    walk_mask = (a >= road) & (a < walk)
    tile = rng.uniform(0.35, 0.6)
    # Grout lines fade out where a tile is under ~6 pixels: finer texture would only alias.
    fine = np.clip((tile * dy - 3) / 3, 0, 1)  # (h, 1)
    grout = (_frac(depth / tile) < 0.12) | (_frac(lat / tile) < 0.12)
    name = _pick(rng, {"Sidewalk": 0.85, "RoadShoulder": 0.1, "ParkingBlock": 0.05})
    c.paint(win, walk_mask, c.add(_jitter(rng, PAVEMENT, 0.1), name), (1 - 0.25 * grout * fine) * (0.94 + 0.12 * tex))
    c.paint(win, (a >= road) & (a < road + 0.06), c.add(_jitter(rng, CURB, 0.05), "Sidewalk"))
    if rng.random() < 0.4:
        # The buildings on one side shade its pavement and half the road.
        sunny = 1 if rng.random() < 0.5 else -1
        c.darken(win, (lat * sunny < 0) & (a < walk), rng.uniform(0.7, 0.85))


# ----------------------------------------------------------------------------------- objects


def _draw_fence(c: _Canvas, rng: np.random.Generator, st: _Street, side: int) -> None:
    """A wooden fence along the back of the pavement: from the ground line up ``tall`` camera
    heights, between two depths, with dark gaps between slats."""
    walk = st.edge(side, st.walk) * 0.97
    u_far, u_near = sorted(rng.uniform(0.08, 1.1, 2) * (c.h - st.hy))
    x_far, x_near = st.vx + side * walk * u_far, st.vx + side * walk * u_near
    tall = rng.uniform(0.35, 0.7)
    win = c.window(st.hy - tall * u_near - 1, st.hy + u_near + 1, min(x_far, x_near), max(x_far, x_near))
    if win is None:
        return
    u = np.maximum(np.abs(win.xs - st.vx) / walk, 1e-3)  # (1, w): u of the ground line under each column
    rel = (st.hy + u - win.ys) / u  # height above the ground, camera heights
    slats = _frac(c.w / u * rng.uniform(3, 6)) < 0.3  # (1, w): slats repeat along depth
    rails = _frac(rel / (tall / 2)) < 0.12
    wood = _jitter(rng, FENCE, 0.15)
    ids = c.add_many(np.stack([wood, wood * 0.45]), "Fence")
    gaps = slats & ~rails & (u > 6)  # no gaps where slats are under a few pixels wide
    c.paint(win, (rel >= 0) & (rel < tall), np.where(gaps, ids[1], ids[0]))


def _draw_tree(c: _Canvas, rng: np.random.Generator, x: float, yb: float, u: float, leaves: np.ndarray) -> None:
    trunk_h = u * rng.uniform(1.0, 1.6)
    trunk_w = max(u * rng.uniform(0.06, 0.1), 1.0)
    r = u * rng.uniform(0.45, 0.8)
    cy = yb - trunk_h - r * 0.4
    blobs = [(cy + r * rng.uniform(-0.3, 0.3), x + r * rng.uniform(-0.6, 0.6), r * rng.uniform(0.6, 1.0))
             for _ in range(int(rng.integers(2, 5)))]
    name = "Tree" if rng.random() < 0.85 else "VegetationMisc"
    win = c.window(yb - trunk_h, yb, x - trunk_w / 2, x + trunk_w / 2)
    if win is not None:
        c.paint(win, _rect(win, yb - trunk_h, yb, x - trunk_w / 2, x + trunk_w / 2),
                c.add(_jitter(rng, TRUNK, 0.15), name))
    green = c.add(_jitter(rng, LEAVES, 0.2), name)
    win = c.window(cy - 2 * r, cy + 2 * r, x - 2.2 * r, x + 2.2 * r)
    if win is None:
        return
    tex = leaves[win.rows, win.cols]
    mask = np.zeros((win.ys.shape[0], win.xs.shape[1]), bool)
    for by, bx, br in blobs:
        # A ragged outline: the leaf texture pushes the edge in and out.
        mask |= ((win.ys - by) ** 2 + (win.xs - bx) ** 2) * np.float32(1 / br**2) <= 0.75 + 0.5 * tex
    c.paint(win, mask, green, 0.55 + 0.8 * tex)


def _draw_pole(c: _Canvas, rng: np.random.Generator, x: float, yb: float, u: float) -> None:
    """A pole; most carry a sign, a traffic light or a text board."""
    top = yb - u * rng.uniform(2.0, 3.2)
    w = max(u * rng.uniform(0.04, 0.07), 1.0)
    win = c.window(top, yb, x - w / 2 - 0.5, x + w / 2 + 0.5)
    metal = c.add(_jitter(rng, POLE, 0.12), "Column_Pole")
    if win is not None:
        shine = np.where(win.xs < x, np.float32(1.1), np.float32(0.85))  # lit from the left: a cylinder
        c.paint(win, _rect(win, top, yb, x - w / 2, x + w / 2), metal, shine)
    if rng.random() < 0.85:
        # At the top of the pole, or lower down where the top is out of the picture.
        y = max(top, min(yb - 1.4 * u, u * 0.25))
        _draw_sign(c, rng, x, y, u)


def _draw_sign(c: _Canvas, rng: np.random.Generator, x: float, y: float, u: float) -> None:
    kind = _pick(rng, {"round": 0.35, "triangle": 0.2, "board": 0.2, "light": 0.25})
    r = max(u * rng.uniform(0.16, 0.24), 1.5)
    cy = y + r * 0.8
    win = c.window(cy - 1.5 * r, cy + 1.5 * r, x - 1.5 * r, x + 1.5 * r)
    if win is None:
        return
    if kind == "round":
        ring, face = (SIGN_RED, SIGN_WHITE) if rng.random() < 0.6 else (SIGN_BLUE, SIGN_BLUE)
        ids = c.add_many(np.asarray([ring, face], np.float32), "SignSymbol")
        inner = _ellipse(win, cy, x, 0.65 * r, 0.65 * r)
        c.paint(win, _ellipse(win, cy, x, r, r), np.where(inner, ids[1], ids[0]))
    elif kind == "triangle":
        # Apex up: inside where the half-width at each row exceeds |x - centre|.
        rel = (win.ys - (cy - r)) / (2 * r)
        tri = (rel >= 0) & (rel <= 1) & (np.abs(win.xs - x) <= rel * r * 1.15)
        inner = (rel >= 0.3) & (rel <= 0.85) & (np.abs(win.xs - x) <= (rel - 0.15) * r * 0.8)
        ids = c.add_many(np.asarray([SIGN_RED, SIGN_YELLOW], np.float32), "SignSymbol")
        c.paint(win, tri, np.where(inner, ids[1], ids[0]))
    elif kind == "board":
        base = SIGN_BLUE if rng.random() < 0.5 else SIGN_GREEN
        ids = c.add_many(np.asarray([base, SIGN_WHITE], np.float32), "Misc_Text")
        board = _rect(win, cy - 0.7 * r, cy + 0.7 * r, x - 1.4 * r, x + 1.4 * r)
        text = (_frac((win.ys - cy) / max(r * 0.5, 2)) < 0.4) & _rect(win, cy - 0.5 * r, cy + 0.5 * r,
                                                                       x - 1.1 * r, x + 1.1 * r)
        c.paint(win, board, np.where(text, ids[1], ids[0]))
    else:
        lit = int(rng.integers(3))
        colors = [HOUSING] + [tuple(np.float32(lamp) * (1.0 if i == lit else 0.35)) for i, lamp in enumerate(LAMPS)]
        ids = c.add_many(np.asarray(colors, np.float32), "TrafficLight")
        mat = np.full((win.ys.shape[0], win.xs.shape[1]), ids[0], np.uint16)
        for i, off in enumerate((-0.8, 0.0, 0.8)):
            mat[_ellipse(win, cy + off * r, x, 0.35 * r, 0.35 * r)] = ids[1 + i]
        c.paint(win, _rect(win, cy - 1.3 * r, cy + 1.3 * r, x - 0.55 * r, x + 0.55 * r), mat)


def _car_materials(c: _Canvas, rng: np.random.Generator, name: str) -> np.ndarray:
    """Ids of paint, glass, tyre, tail light, plate."""
    paint = _jitter(rng, _saturated(rng, CAR_HUES, (0.6, 0.95), (0.55, 0.9)), 0.05)
    colors = [paint, _jitter(rng, GLASS, 0.15), TIRE, (200, 25, 25), (220, 220, 205)]
    return c.add_many(np.asarray(colors, np.float32), name)


def _draw_car(c: _Canvas, rng: np.random.Generator, x: float, yb: float, u: float) -> None:
    """A car seen from behind (or, crossing, from the side): body, cabin with dark glass,
    black tyres, tail lights and plate; a shadow on the road underneath."""
    name = _pick(rng, {"Car": 0.65, "SUVPickupTruck": 0.22, "Truck_Bus": 0.13})
    paint, glass_id, tyre, light, plate_id = _car_materials(c, rng, name)
    if u < 0.4 * (c.h - yb + u) and rng.random() < 0.3:  # crossing traffic, only far ahead
        _draw_car_side(c, rng, x, yb, u, name, (paint, glass_id, tyre))
        return
    w, h = {"Car": (1.1, 0.85), "SUVPickupTruck": (1.2, 1.05), "Truck_Bus": (1.5, 1.6)}[name]
    w, h = w * u * rng.uniform(0.9, 1.1), h * u * rng.uniform(0.9, 1.1)
    win = c.window(yb - h, yb + 0.1 * h, x - w / 2, x + w / 2)
    if win is None:
        return
    c.darken(win, _ellipse(win, yb, x, 0.06 * h, 0.55 * w), 0.55)
    body = _rect(win, yb - 0.62 * h, yb - 0.12 * h, x - w / 2, x + w / 2)
    tyres = (_rect(win, yb - 0.25 * h, yb, x - w * 0.46, x - w * 0.28)
             | _rect(win, yb - 0.25 * h, yb, x + w * 0.28, x + w * 0.46))
    if name == "Truck_Bus":
        cabin = _rect(win, yb - h, yb - 0.6 * h, x - w / 2, x + w / 2)
        glass = _rect(win, yb - 0.95 * h, yb - 0.75 * h, x - 0.4 * w, x + 0.4 * w)
    else:
        rel = (win.ys - (yb - h)) / (0.4 * h)  # 0 at the roof, 1 at the waist
        cabin = (rel >= 0) & (rel < 1) & (np.abs(win.xs - x) <= w * (0.33 + 0.14 * rel))
        glass = (rel >= 0.15) & (rel < 0.85) & (np.abs(win.xs - x) <= w * (0.26 + 0.14 * rel))
    lights = (_rect(win, yb - 0.55 * h, yb - 0.42 * h, x - w * 0.48, x - w * 0.36)
              | _rect(win, yb - 0.55 * h, yb - 0.42 * h, x + w * 0.36, x + w * 0.48))
    plate = _rect(win, yb - 0.36 * h, yb - 0.26 * h, x - w * 0.1, x + w * 0.1)
    mat = np.full(body.shape, paint, np.uint16)
    mat[glass] = glass_id
    mat[lights] = light
    mat[plate] = plate_id
    mat[tyres & ~body] = tyre
    c.paint(win, body | cabin | tyres, mat)


def _draw_car_side(c: _Canvas, rng: np.random.Generator, x: float, yb: float, u: float, name: str,
                   ids: tuple[int, int, int]) -> None:
    paint, glass_id, tyre = ids
    length, h = u * rng.uniform(2.2, 2.8), u * rng.uniform(0.75, 0.95)
    wheel = 0.24 * h
    win = c.window(yb - h, yb + 1, x - length / 2, x + length / 2)
    if win is None:
        return
    body = _rect(win, yb - 0.6 * h, yb - wheel * 0.6, x - length / 2, x + length / 2)
    cabin = _rect(win, yb - h, yb - 0.6 * h, x - length * 0.28, x + length * 0.22)
    glass = _rect(win, yb - 0.92 * h, yb - 0.64 * h, x - length * 0.25, x + length * 0.19)
    glass &= np.abs(win.xs - (x - length * 0.03)) > max(length * 0.02, 0.5)  # the pillar between windows
    wheels = (_ellipse(win, yb - wheel, x - length * 0.3, wheel, wheel)
              | _ellipse(win, yb - wheel, x + length * 0.3, wheel, wheel))
    mat = np.full(body.shape, paint, np.uint16)
    mat[glass] = glass_id
    mat[wheels] = tyre
    c.paint(win, body | cabin | wheels, mat)


def _draw_pedestrian(c: _Canvas, rng: np.random.Generator, x: float, yb: float, u: float) -> None:
    """A standing figure: head with hair, coat, two legs."""
    child = rng.random() < 0.15
    tall = u * (rng.uniform(0.65, 0.8) if child else rng.uniform(1.05, 1.25))
    apart = rng.uniform(0.03, 0.12)  # half the stride, in heights
    coat, trousers = _jitter_many(rng, CLOTHES, 2, 0.2)
    ids = c.add_many(np.asarray([coat, trousers * 0.6, _jitter(rng, SKIN, 0.25), _jitter(rng, HAIR, 0.3)]),
                     "Child" if child else "Pedestrian")
    head = tall * 0.075
    top, hip = yb - tall, yb - tall * 0.47
    win = c.window(top, yb, x - tall * 0.25, x + tall * 0.25)
    if win is None:
        return
    skull = _ellipse(win, top + head, x, head, head * 0.85)
    body = _rect(win, top + 1.9 * head, hip + tall * 0.03, x - tall * 0.12, x + tall * 0.12)
    leg_w = max(tall * 0.08, 1.0)
    legs = (_segment(win, (hip, x - tall * 0.05), (yb - 0.5, x - tall * apart), leg_w)
            | _segment(win, (hip, x + tall * 0.05), (yb - 0.5, x + tall * apart), leg_w)) & (win.ys >= hip)
    mat = np.full(body.shape, ids[0], np.uint16)
    mat[legs] = ids[1]
    mat[skull] = ids[2]
    mat[skull & (win.ys < top + head * 0.8)] = ids[3]
    c.paint(win, skull | body | legs, mat)


def _draw_bicyclist(c: _Canvas, rng: np.random.Generator, x: float, yb: float, u: float) -> None:
    """A rider seen from the side: two wheel rings, a frame, and a figure leaning forward."""
    name = "Bicyclist" if rng.random() < 0.85 else "MotorcycleScooter"
    facing = 1 if rng.random() < 0.5 else -1
    r = u * rng.uniform(0.2, 0.25)
    gap = u * rng.uniform(0.55, 0.65)
    thick = max(r * (0.5 if name == "MotorcycleScooter" else 0.25), 1.0)
    tall = u * rng.uniform(1.15, 1.3)
    clothes = _jitter_many(rng, CLOTHES, 1, 0.2)[0]
    bike = _jitter(rng, _saturated(rng, CAR_HUES, (0.5, 0.9), (0.5, 0.9)), 0.05)
    ids = c.add_many(np.asarray([clothes, bike, TIRE, _jitter(rng, SKIN, 0.25)], np.float32), name)
    win = c.window(yb - tall, yb, x - gap / 2 - r - 1, x + gap / 2 + r + 1)
    if win is None:
        return
    back, front, hub = (yb - r, x - facing * gap / 2), (yb - r, x + facing * gap / 2), (yb - r, x)
    wheels = np.zeros((win.ys.shape[0], win.xs.shape[1]), bool)
    for cy, cx in (back, front):
        d2 = (win.ys - cy) ** 2 + (win.xs - cx) ** 2
        wheels |= (d2 <= r * r) & (d2 >= (r - thick) ** 2)
    saddle = (yb - 2.3 * r, x - facing * gap * 0.12)
    bars = (yb - 2.6 * r, x + facing * gap * 0.42)
    fw = max(r * 0.15, 1.0)
    frame = (_segment(win, back, saddle, fw) | _segment(win, saddle, bars, fw) | _segment(win, bars, front, fw)
             | _segment(win, back, hub, fw) | _segment(win, hub, saddle, fw))
    shoulder = (yb - tall * 0.8, x + facing * gap * 0.05)
    head = tall * 0.075
    skull = _ellipse(win, shoulder[0] - 1.3 * head, shoulder[1] + facing * head * 0.5, head, head * 0.9)
    rider = (_segment(win, saddle, shoulder, max(tall * 0.13, 1.0))
             | _segment(win, shoulder, bars, max(tall * 0.05, 1.0))
             | _segment(win, saddle, (yb - r, x + facing * r * 0.3), max(tall * 0.08, 1.0)))
    mat = np.full(wheels.shape, ids[0], np.uint16)
    mat[frame] = ids[1]
    mat[wheels] = ids[2]
    mat[skull] = ids[3]
    c.paint(win, wheels | frame | rider | skull, mat)


def _draw_void(c: _Canvas, rng: np.random.Generator) -> None:
    """Unlabelled pixels, as CamVid has: a few patches of clutter, sometimes the ego car's bonnet."""
    clutter = c.add_many(rng.uniform(0, 255, (6, 3)), "Void")
    for _ in range(int(rng.integers(1, 4))):
        ph, pw = c.h * rng.uniform(0.015, 0.05), c.w * rng.uniform(0.015, 0.05)
        y, x = rng.uniform(0, c.h - ph), rng.uniform(0, c.w - pw)
        win = c.window(y, y + ph + 1, x, x + pw + 1)
        if win is not None:
            c.paint(win, True, clutter[rng.integers(len(clutter), size=(win.ys.shape[0], win.xs.shape[1]))])
    if rng.random() < 0.3:
        rows = max(int(c.h * rng.uniform(0.02, 0.06)), 1)
        c.paint(c.window(c.h - rows, c.h, 0, c.w), True, c.add(_jitter(rng, BONNET, 0.3), "Void"))


def _place(rng: np.random.Generator, st: _Street, w: int, u_range: tuple[float, float],
           lat_range: tuple[float, float], side: int) -> tuple[float, float, float]:
    """Where an object stands: ``(x, yb, u)`` for a random depth ``u`` in ``u_range`` (pixels per
    camera height) and a lateral offset in ``lat_range`` (camera heights) on ``side``; brought
    nearer the vanishing point when needed so that it stays in the picture."""
    lat = rng.uniform(*lat_range)
    room = (st.vx if side < 0 else w - st.vx) - 0.04 * w  # columns between vanishing point and frame edge
    u = min(rng.uniform(*u_range), max(room, 1.0) / max(lat, 1e-3))
    return st.vx + side * lat * u, st.hy + u, u


def _draw_objects(c: _Canvas, rng: np.random.Generator, st: _Street, leaves: np.ndarray) -> None:
    """Everything standing in the street, drawn far to near so that near things occlude."""
    depth = c.h - st.hy
    objects: list[tuple[float, Callable[[], None]]] = []

    def side() -> int:
        return -1 if rng.random() < 0.5 else 1

    def pavement(s: int, lo: float, hi: float) -> tuple[float, float]:
        """Lateral band from ``lo`` to ``hi`` across the pavement (0: curb, 1: buildings)."""
        r, w = st.edge(s, st.road), st.edge(s, st.walk)
        return r + lo * (w - r), r + hi * (w - r)

    def add(draw: Callable, u_range: tuple[float, float], lat: Callable[[int], tuple[float, float]]) -> None:
        s = side()
        x, yb, u = _place(rng, st, c.w, (u_range[0] * depth, u_range[1] * depth), lat(s), s)
        objects.append((yb, lambda: draw(c, rng, x, yb, u)))

    for s in (-1, 1):
        if rng.random() < 0.35:
            _draw_fence(c, rng, st, s)  # fences stand at the back: drawn before everything else
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.85 else 0):
        add(lambda c, rng, x, yb, u: _draw_tree(c, rng, x, yb, u, leaves), (0.1, 0.8),
            lambda s: pavement(s, 0.75, 0.95))
    # Small classes in almost every image, so that a model sees enough of them.
    for _ in range(int(rng.integers(1, 4))):
        add(_draw_pole, (0.1, 0.9), lambda s: pavement(s, 0.1, 0.35))
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.92 else 0):
        add(_draw_pedestrian, (0.12, 0.9), lambda s: pavement(s, 0.2, 0.8))
    for _ in range(int(rng.integers(1, 3)) if rng.random() < 0.9 else 0):
        add(_draw_bicyclist, (0.15, 0.9), lambda s: (st.edge(s, st.road) * 0.55, st.edge(s, st.road) * 0.85))
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.9 else 0):
        add(_draw_car, (0.08, 1.05), lambda s: (0.0, st.edge(s, st.road) * 0.55))

    objects.sort(key=lambda o: o[0])  # stable: ties keep their order, so output stays deterministic
    for _, draw in objects:
        draw()


def _render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8, label (H, W) uint8 in 0..11, and original index (H, W) uint8 into
    ORIGINAL_COLORS (the same pixels as the label, with the finer 32 classes)."""
    c = _Canvas(height, width)
    st = _sample_street(rng, height, width)
    grain = _smooth_noise(rng, height, width, max(width / 60, 1.5))  # asphalt, paving, plaster
    leaves = _smooth_noise(rng, height, width, max(width / 100, 1.0))  # foliage: small clumps
    _draw_sky(c, rng, st)
    _draw_far_buildings(c, rng, st)
    _draw_facades(c, rng, st, grain)
    _draw_ground(c, rng, st, grain)
    _draw_objects(c, rng, st, leaves)
    _draw_void(c, rng)
    # Lighting: exposure and white balance, a soft large-scale shading (clouds' shadows), sensor noise.
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.94, 1.06, 3)
    light = 0.9 + 0.2 * _smooth_noise(rng, height, width, width / 3)
    noise = _gaussian_noise(rng, (height, width, 3), rng.uniform(2, 7))
    return c.finish(gain, light, noise)


def _check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < MIN_SIDE:
            raise ValueError(f"image {name} must be an int >= {MIN_SIDE}, got {v!r}; e.g. size=(96, 128)")


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one random street scene.

    Returns ``(image, label)``: image ``(height, width, 3) uint8`` RGB and label
    ``(height, width) uint8`` class indices 0..10 of camvid.CLASSES, 11 = void. The same
    generator state gives byte-identical output.
    """
    _check_size(height, width)
    image, label, _ = _render(rng, int(height), int(width))
    return image, label


# ----------------------------------------------------------------------------------- dataset


def _frame_rng(seed: int, frame: int) -> np.random.Generator:
    # Each frame has its own stream, so frame N looks the same whatever else is written.
    return np.random.default_rng([seed, frame])


def _assign_names(counts: Mapping[str, int], by_rule: bool) -> list[tuple[str, str, int]]:
    """``(split, name, frame_number)`` for every pair to write.

    ``by_rule``: names are kept only for the split that layout.split_of gives them, so that an
    original-layout source without split lists is read back with exactly ``counts``.
    """
    out: list[tuple[str, str, int]] = []
    need = {s: counts.get(s, 0) for s in SPLITS}
    frame = 0
    while any(need.values()):
        name = f"{SEQUENCE}_{frame * FRAME_STEP:06d}"
        split = split_of(name) if by_rule else next(s for s in SPLITS if need[s])
        if need[split]:
            out.append((split, name, frame))
            need[split] -= 1
        frame += 1
    return out


def _check_counts(counts: Mapping[str, int]) -> None:
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} in counts; valid splits are {list(SPLITS)}")
    for split, n in counts.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"count for split {split!r} must be a non-negative int, got {n!r}")
    if not sum(counts.values()):
        raise ValueError(f"counts {dict(counts)} ask for no images; give at least one split a positive count")


def write_dataset(
    dest: str,
    layout: str = SEGNET,
    counts: Mapping[str, int] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    split_lists: bool = False,
) -> dict[str, int]:
    """Write a synthetic CamVid source to ``dest`` (``s3://bucket/prefix`` or a local path).

    ``layout="segnet"``: ``<split>/NAME.png`` RGB and ``<split>annot/NAME.png`` single-channel
    (mode L) class indices 0..11. ``layout="original"``: ``frames/NAME.png`` RGB,
    ``labels/NAME_L.png`` RGB colour-coded with the 32 original colours, and ``label_colors.txt``.

    ``counts``: pairs per split (default ``{"train": 24, "val": 8}``); ``size``: (height, width)
    of every image. ``split_lists``: also write ``train.txt``/``val.txt``/``test.txt`` at the
    root (original: one frame name a line; SegNet: ``split/NAME.png splitannot/NAME.png`` as in
    the SegNet tutorial). Without lists, original-layout names are chosen so that
    layout.split_of puts each in its split. Names look like CamVid's: frame ``i`` is named
    ``Seq01_{30 * i:06d}`` and drawn by ``render_scene(np.random.default_rng([seed, i]), *size)``,
    so a frame's picture does not depend on the counts or the layout.

    Returns the number of pairs written per split (splits with none left out).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts are {', '.join(LAYOUTS)}")
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise ValueError(f"size must be (height, width), got {size!r}; e.g. (96, 128)")
    height, width = size
    _check_size(height, width)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    _check_counts(counts)

    pairs = _assign_names(counts, by_rule=(layout == ORIGINAL and not split_lists))
    # One (N, 3) lookup from original class index to its colour.
    original_rgb = np.asarray([rgb for rgb, _ in ORIGINAL_COLORS], np.uint8)
    for split, name, frame in pairs:
        image, label, original = _render(_frame_rng(int(seed), frame), int(height), int(width))
        if layout == SEGNET:
            storage.write_bytes(storage.join(dest, split, f"{name}.png"), encode_png(image))
            storage.write_bytes(storage.join(dest, f"{split}annot", f"{name}.png"), encode_png(label))
        else:
            storage.write_bytes(storage.join(dest, "frames", f"{name}.png"), encode_png(image))
            storage.write_bytes(storage.join(dest, "labels", f"{name}_L.png"), encode_png(original_rgb[original]))

    if layout == ORIGINAL:
        storage.write_bytes(storage.join(dest, LABEL_COLORS_FILE), format_label_colors().encode())
    if split_lists:
        for split in SPLITS:
            names = [name for s, name, _ in pairs if s == split]
            if not names:
                continue
            if layout == SEGNET:
                lines = [f"{split}/{n}.png {split}annot/{n}.png" for n in names]
            else:
                lines = names
            storage.write_bytes(storage.join(dest, f"{split}.txt"), ("\n".join(lines) + "\n").encode())
    written = {s: sum(p[0] == s for p in pairs) for s in SPLITS}
    return {s: n for s, n in written.items() if n}


def write_grouped_dataset(
    dest: str,
    classes: ClassTable,
    groups: Sequence[Sequence[int]],
    counts: Mapping[str, int] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
) -> dict[str, int]:
    """A synthetic SegNet-layout source with its own classes: ``classes.json`` at the root and
    labels whose class ``i`` is the union of the CamVid classes ``groups[i]``; every other pixel
    (CamVid's other classes and void) is ``classes.void_index``. Frames are those of
    :func:`write_dataset` with the same seed. Returns the pairs written per split."""
    if len(groups) != classes.num_classes:
        raise ValueError(f"{len(groups)} groups for {classes.num_classes} classes: give each class its CamVid classes")
    lut = np.full(256, classes.void_index, np.uint8)
    for index, members in enumerate(groups):
        for camvid_class in members:
            lut[camvid_class] = index
    written = write_dataset(dest, SEGNET, counts, size, seed)
    for split, name, _ in _assign_names(dict(DEFAULT_COUNTS if counts is None else counts), by_rule=False):
        uri = storage.join(dest, f"{split}annot", f"{name}.png")
        label = np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))))
        storage.write_bytes(uri, encode_png(lut[label]))
    storage.write_bytes(storage.join(dest, CLASSES_FILE), classes.to_json().encode())
    return written


# ----------------------------------------------------------------------------------- CLI


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; give 0 or more")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segray.synthetic",
        description="Write a synthetic CamVid-format dataset of procedurally drawn street scenes "
        "(11 classes + void), for tests and demos.",
        epilog="URIs are s3://bucket/prefix or local paths; S3 settings come from the AWS_* environment.",
    )
    parser.add_argument("--dest", required=True, help="where to write (s3://bucket/prefix or a local path)")
    parser.add_argument("--layout", choices=LAYOUTS, default=SEGNET,
                        help="segnet: train/ trainannot/ ... with index labels; original: frames/ + "
                        "colour-coded labels/NAME_L.png + label_colors.txt (default: segnet)")
    parser.add_argument("--train", type=_count, default=DEFAULT_COUNTS["train"], metavar="N",
                        help=f"training pairs (default {DEFAULT_COUNTS['train']})")
    parser.add_argument("--val", type=_count, default=DEFAULT_COUNTS["val"], metavar="N",
                        help=f"validation pairs (default {DEFAULT_COUNTS['val']})")
    parser.add_argument("--test", type=_count, default=0, metavar="N", help="test pairs (default 0)")
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, metavar="HxW",
                        help=f"image size (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    parser.add_argument("--seed", type=_count, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--split-lists", action="store_true",
                        help="also write train.txt / val.txt / test.txt at the root")
    args = parser.parse_args(argv)

    counts = {"train": args.train, "val": args.val, "test": args.test}
    try:
        written = write_dataset(args.dest, args.layout, counts, args.size, args.seed, args.split_lists)
    except Exception as e:  # noqa: BLE001 - a command ends with one clear line, whatever went wrong
        from segray.errors import one_line

        print(f"synthetic: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    summary = ", ".join(f"{n} {s}" for s, n in written.items())
    h, w = args.size
    print(f"synthetic: wrote {summary} image/label pairs ({args.layout} layout, {h}x{w}, seed {args.seed}) "
          f"to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""segray/tta.py: flip and scale averaging, the window grid and tiled inference, option checks.

Plain torch with tiny models whose logits are known in closed form; no Ray."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from segray import tta


class XRamp(torch.nn.Module):
    """Logits that depend on the pixel's column, so a flip changes them: class c at (y, x) is
    ``w[c] * img[0] + a[c] * x``."""

    def __init__(self, w=(1.0, -2.0, 0.5), a=(0.3, -0.1, 0.0)) -> None:
        super().__init__()
        self.w = torch.tensor(w).view(1, -1, 1, 1)
        self.a = torch.tensor(a).view(1, -1, 1, 1)

    def forward(self, x):
        cols = torch.arange(x.shape[-1], dtype=torch.float32).view(1, 1, 1, -1)
        return self.w * x[:, :1] + self.a * cols


class InputSize(torch.nn.Module):
    """Class 0 everywhere = the input's height, class 1 = its width: which size each pass ran at."""

    def forward(self, x):
        n, _, h, w = x.shape
        out = torch.empty((n, 2, h, w))
        out[:, 0], out[:, 1] = float(h), float(w)
        return out


class Counting:
    """A forward that records the batch shape of every call."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        return self.model(x)


def test_flip_averages_the_logits_of_x_and_of_its_mirror():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    model = XRamp()
    got = tta.augmented_logits(model, x, flip=True)
    # By hand: w*img + a*col, and mirrored back w*img + a*(W-1-col); their mean is w*img + a*(W-1)/2.
    expected = model.w * x[:, :1] + model.a * (7 - 1) / 2
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, model(x))  # the flip did change the logits
    assert torch.allclose(tta.augmented_logits(model, x), model(x))  # no option: the model's own logits


def test_flip_with_a_mirror_symmetric_model_changes_nothing():
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 6, 9)
    with torch.no_grad():
        assert torch.allclose(tta.augmented_logits(conv, x, flip=True), conv(x), atol=1e-6)


def test_scales_run_each_size_and_average():
    x = torch.zeros(2, 3, 18, 30)
    forward = Counting(InputSize())
    got = tta.augmented_logits(forward, x, scales=(0.75, 1.0, 1.25))
    sizes = [(round(s * 18), round(s * 30)) for s in (0.75, 1.0, 1.25)]  # (14, 22), (18, 30), (22, 38)
    assert [c[2:] for c in forward.calls] == sizes
    assert got.shape == (2, 2, 18, 30)
    assert torch.allclose(got[:, 0], torch.tensor(sum(h for h, _ in sizes) / 3))
    assert torch.allclose(got[:, 1], torch.tensor(sum(w for _, w in sizes) / 3))
    # With flip: every scale twice, the mean unchanged (the logits are mirror-symmetric here).
    forward.calls.clear()
    flipped = tta.augmented_logits(forward, x, flip=True, scales=(0.75, 1.0, 1.25))
    assert len(forward.calls) == 6 == tta.passes("flip", (0.75, 1.0, 1.25))
    assert torch.allclose(flipped, got)


def test_scale_averaging_of_a_per_pixel_linear_model_equals_the_hand_computed_mean():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(1, 3, 16, 20)
    scales = (0.5, 1.0, 1.5)
    with torch.no_grad():
        got = tta.augmented_logits(conv, x, scales=scales)
        expected = torch.zeros_like(got)
        for s in scales:
            size = (round(s * 16), round(s * 20))
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            expected += F.interpolate(conv(xs), size=(16, 20), mode="bilinear", align_corners=False)
        expected /= len(scales)
        assert torch.allclose(got, expected, atol=1e-5)
        # Bilinear weights sum to one, so a 1x1 conv commutes with resizing: a constant image gives
        # the model's own logits at every scale.
        flat = torch.ones(1, 3, 16, 20) * torch.tensor([0.2, -1.0, 3.0]).view(1, 3, 1, 1)
        assert torch.allclose(tta.augmented_logits(conv, flat, scales=scales), conv(flat), atol=1e-5)


def test_averages_are_float32_whatever_the_model_returns():
    x = torch.randn(1, 3, 8, 8)
    half = lambda t: XRamp()(t).to(torch.bfloat16)  # noqa: E731 - what autocast gives on GPU
    assert tta.augmented_logits(half, x, flip=True, scales=(1.0, 0.5)).dtype == torch.float32
    assert tta.tiled_logits(half, x, (4, 4), 1, 4, flip=True).dtype == torch.float32


# ----------------------------------------------------------------------------- the window grid


@pytest.mark.parametrize("tile", [(1, 1), (4, 4), (8, 5), (16, 24), (32, 48)])
def test_the_grid_covers_every_pixel_with_windows_inside_the_frame(tile):
    for h, w in itertools.product([1, 3, 7, 16, 17, 33, 50], [1, 5, 24, 25, 49, 97]):
        for overlap in sorted({0, 1, min(tile) // 4, min(tile) - 1}):
            if overlap >= min(tile):
                continue
            (wh, ww), corners = tta.window_grid((h, w), tile, overlap)
            assert (wh, ww) == (min(tile[0], h), min(tile[1], w))
            count = tta.window_count((h, w), tile, overlap)
            assert count.min() >= 1, (h, w, tile, overlap)
            assert len(set(corners)) == len(corners)
            ys, xs = sorted({y for y, _ in corners}), sorted({x for _, x in corners})
            assert ys[0] == 0 and xs[0] == 0 and ys[-1] + wh == h and xs[-1] + ww == w  # the edges
            assert all(0 < b - a <= tile[0] - overlap for a, b in zip(ys, ys[1:]))
            assert all(0 < b - a <= tile[1] - overlap for a, b in zip(xs, xs[1:]))
            assert len(corners) == len(ys) * len(xs)


def test_window_starts_by_hand():
    assert tta.window_starts(10, 4, 3) == [0, 3, 6]  # the stride divides: no extra window
    assert tta.window_starts(11, 4, 3) == [0, 3, 6, 7]  # it does not: the last at the edge
    assert tta.window_starts(8, 4, 4) == [0, 4]  # overlap 0
    assert tta.window_starts(3, 4, 3) == [0] == tta.window_starts(4, 4, 1)  # frame not bigger than the window


# ----------------------------------------------------------------------------- tiled inference


class WindowStart(torch.nn.Module):
    """A known constant per window: the value of its top-left input pixel (channel 0 holds the
    row index, channel 1 the column index), everywhere in the window."""

    def forward(self, x):
        return x[:, :2, :1, :1].expand(-1, -1, x.shape[2], x.shape[3]).clone()


def coordinates(h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([rows, cols, torch.zeros(h, w)])[None]


def test_tiled_logits_average_the_windows_where_they_overlap():
    # 4x11 frame, 4x4 tiles, overlap 1: windows at columns [0,4) [3,7) [6,10) [7,11), one row.
    got = tta.tiled_logits(WindowStart(), coordinates(4, 11), (4, 4), 1, batch_size=2)
    expected_cols = torch.tensor([0, 0, 0, (0 + 3) / 2, 3, 3, (3 + 6) / 2, (6 + 7) / 2, (6 + 7) / 2,
                                  (6 + 7) / 2, 7])
    assert torch.equal(got[0, 1], expected_cols.expand(4, 11))
    assert torch.equal(got[0, 0], torch.zeros(4, 11))  # one window row, starting at row 0
    # Two dimensions, overlap 2: rows [0,5) [3,8) [4,9) on a 9-row frame.
    got = tta.tiled_logits(WindowStart(), coordinates(9, 5), (5, 5), 2, batch_size=8)
    expected_rows = torch.tensor([0, 0, 0, (0 + 3) / 2, (0 + 3 + 4) / 3, (3 + 4) / 2, (3 + 4) / 2, (3 + 4) / 2, 4])
    assert torch.allclose(got[0, 0], expected_rows.view(9, 1).expand(9, 5))


def test_tiled_logits_of_a_per_pixel_model_equal_the_whole_frame():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for (h, w), tile, overlap in [((37, 53), (16, 16), 4), ((20, 30), (8, 12), 0), ((5, 70), (16, 24), 6),
                                      ((9, 9), (32, 32), 0), ((21, 19), (16, 16), 15)]:
            x = torch.randn(2, 3, h, w)
            got = tta.tiled_logits(model, x, tile, overlap, batch_size=5)
            assert got.shape == (2, 4, h, w)
            assert torch.allclose(got, model(x), atol=1e-5), (h, w, tile, overlap)
            flipped = tta.tiled_logits(model, x, tile, overlap, batch_size=5, flip=True)
            assert torch.allclose(flipped, model(x), atol=1e-5)  # a per-pixel model is mirror-symmetric


def test_tiled_logits_of_a_3x3_conv_net_equal_the_whole_frame_away_from_window_seams():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3, padding=1))
    r = 2  # receptive field radius
    h, w, tile, overlap = 30, 41, (12, 16), 6
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        got, whole = tta.tiled_logits(net, x, tile, overlap, batch_size=3), net(x)
    # Pixels every covering window sees with its full receptive field (or the frame's own edge).
    (wh, ww), corners = tta.window_grid((h, w), tile, overlap)
    clean = torch.ones(h, w, dtype=torch.bool)
    for y, c in corners:
        inner = torch.zeros(h, w, dtype=torch.bool)
        inner[y : y + wh, c : c + ww] = True
        safe = torch.zeros(h, w, dtype=torch.bool)
        safe[y + (r if y > 0 else 0) : y + wh - (r if y + wh < h else 0),
             c + (r if c > 0 else 0) : c + ww - (r if c + ww < w else 0)] = True
        clean &= ~inner | safe
    assert clean.float().mean() > 0.3
    assert torch.allclose(got[..., clean], whole[..., clean], atol=1e-5)
    assert not torch.allclose(got, whole, atol=1e-3)  # the seams do differ: the check above is not vacuous


def test_tiled_windows_go_through_the_model_batch_size_at_a_time():
    forward = Counting(XRamp())
    x = torch.randn(3, 3, 20, 20)
    (_, _), corners = tta.window_grid((20, 20), (8, 8), 2)  # starts 0, 6, 12: 9 windows a frame
    assert len(corners) == 9
    tta.tiled_logits(forward, x, (8, 8), 2, batch_size=4)
    assert [c[0] for c in forward.calls] == [4] * 6 + [3]  # 27 windows of three frames
    assert all(c[2:] == (8, 8) for c in forward.calls)
    forward.calls.clear()
    tta.tiled_logits(forward, x, (8, 8), 2, batch_size=4, flip=True)
    assert len(forward.calls) == 14  # every chunk also flipped


def test_tiled_flip_flips_each_window():
    # XRamp's logits depend on the column inside the window: a flipped window sees a*(ww-1-col).
    x = torch.randn(1, 3, 6, 10)
    got = tta.tiled_logits(XRamp(), x, (6, 10), 0, batch_size=1, flip=True)  # one window: the frame
    assert torch.allclose(got, tta.augmented_logits(XRamp(), x, flip=True), atol=1e-6)
    # Two windows of width 6 at columns 0 and 4: each window's own mean ramp a*(6-1)/2.
    model = XRamp()
    got = tta.tiled_logits(model, x, (6, 6), 2, batch_size=2, flip=True)
    assert torch.allclose(got, model.w * x[:, :1] + model.a * 2.5, atol=1e-6)


# ----------------------------------------------------------------------------- options


def test_parse_and_check_options():
    assert tta.parse_scales("0.75,1,1.25") == (0.75, 1.0, 1.25)
    assert tta.parse_scales(" 2 ") == (2.0,)
    assert tta.parse_tile("176x240") == (176, 240) == tta.parse_tile("176X240")
    assert tta.check_options(None, None, None, None) == (None, None, None)
    assert tta.check_options("flip", [1, 0.5], None, None) == ((1.0, 0.5), None, None)
    assert tta.check_options(None, None, [64, 96], None) == (None, (64, 96), 16)  # default: min side // 4
    assert tta.default_overlap((10, 7)) == 1
    assert tta.check_options("flip", None, (8, 8), 0) == (None, (8, 8), 0)


@pytest.mark.parametrize("call, message", [
    (lambda: tta.parse_scales(""), "--scales '': '' is not a number"),
    (lambda: tta.parse_scales("1,a"), "--scales '1,a': 'a' is not a number"),
    (lambda: tta.parse_scales("1,0"), "--scales: every factor must be a positive finite number, got 0"),
    (lambda: tta.parse_scales("-1"), "--scales: every factor must be a positive finite number, got -1"),
    (lambda: tta.parse_scales("inf"), "--scales: every factor must be a positive finite number, got inf"),
    (lambda: tta.parse_scales("nan"), "--scales: every factor must be a positive finite number, got nan"),
    (lambda: tta.parse_scales("1,1.0"), "--scales: factor 1 is given twice"),
    (lambda: tta.check_scales([]), "--scales needs at least one factor"),
    (lambda: tta.parse_tile("64"), "--tile '64' is not HxW"),
    (lambda: tta.parse_tile("0x8"), "--tile must be two positive integers HxW, got 0x8"),
    (lambda: tta.check_options("mirror", None, None, None), "--tta 'mirror'"),
    (lambda: tta.check_options(None, None, None, 4), "--overlap is the overlap of --tile windows"),
    (lambda: tta.check_options(None, None, (8, 16), 8), "--overlap must be an integer from 0 to less than both "
                                                        "sides of --tile 8x16, got 8"),
    (lambda: tta.check_options(None, None, (8, 16), -1), "--overlap must be"),
    (lambda: tta.check_options(None, (1.0,), (8, 16), None), "--tile and --scales cannot be combined"),
])  # fmt: skip
def test_bad_options_are_refused_naming_the_flag(call, message):
    with pytest.raises(tta.TTAError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


def test_the_record_and_its_words():
    assert tta.record(None, None, None, None) == {"tta": None, "scales": None, "tile": None, "overlap": None}
    assert tta.record("flip", (0.75, 1.0), (64, 96), 16) == {"tta": "flip", "scales": [0.75, 1.0], "tile": [64, 96],
                                                            "overlap": 16}
    assert tta.shown("scales", [0.75, 1.0]) == "0.75,1" and tta.shown("tile", [64, 96]) == "64x96"
    assert tta.shown("overlap", 0) == "0" and tta.shown("tta", None) == "none"
    assert tta.describe(None, None, None, None) == ""
    assert tta.describe("flip", (0.5, 1.0), None, None) == "flip, scales 0.5,1; 4 model pass(es) per frame"

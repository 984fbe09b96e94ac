"""Pictures for people: mask overlays and error maps (numpy), and the report's charts (matplotlib):
the confusion matrix, the training curves and the labelled panels of a frame.

The numpy functions take ``(H, W, 3) uint8`` images and ``(H, W) uint8`` masks; the infer
stage's overlay videos use them on Ray workers. matplotlib is imported inside the chart functions
only, so importing this module stays cheap. Charts use matplotlib's object-oriented ``Figure``
with the Agg canvas: no pyplot, no global figure or backend state (a notebook keeps its
backend), safe in threads, no display needed. The classes are always the caller's (a
:class:`segray.classes.ClassTable`): nothing here assumes CamVid's.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from segray.classes import ClassTable
from segray.preprocess import colorize

ERROR_COLOR = (220, 20, 20)  # error map: a labelled pixel predicted wrong
UNSCORED_COLOR = (60, 60, 60)  # error map: void (or any unlabelled) pixel, counted by no metric
# The history keys of metrics.json, as the charts' legends spell them.
SERIES_LABELS = {
    "train_loss": "train loss",
    "val_loss": "validation loss",
    "val_miou": "validation mIoU",
    "val_pixel_accuracy": "validation pixel accuracy",
    "lr": "learning rate",
}
_SVG_LOCK = threading.Lock()


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    alpha: float = 0.5,
    palette: ClassTable | list | tuple | None = None,
    void_index: int | None = None,
) -> np.ndarray:
    """Blend the colourised ``mask`` over ``image``; void pixels keep the image as is.

    ``palette``: the ClassTable of the mask (its colours and void index), or a palette list
    (``palette[i]`` colours value ``i``) with ``void_index`` (default: the last entry, as in the
    ``palette`` field of dataset.json: K class colours, then void)."""
    if palette is None:
        raise TypeError("overlay needs the mask's classes: pass palette=<ClassTable> (or a palette list)")
    if isinstance(palette, ClassTable):
        void = palette.void_index if void_index is None else void_index
    else:
        void = len(palette) - 1 if void_index is None else void_index
    if image.shape[:2] != mask.shape:
        image = np.asarray(Image.fromarray(image).resize((mask.shape[1], mask.shape[0]), Image.Resampling.BILINEAR))
    colours = colorize(mask, palette).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = mask == void
    out[keep] = image[keep]
    return out.round().clip(0, 255).astype(np.uint8)


def side_by_side(*panels: np.ndarray, gap: int = 4, palette: ClassTable | list | tuple | None = None) -> np.ndarray:
    """Concatenate ``(H, W, 3)`` panels of equal height left to right with white gaps.

    A 2-D panel is a mask, colourised with ``palette`` (a ClassTable or a palette list), which
    must then be given."""
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if p.ndim == 2:
            if palette is None:
                raise TypeError("side_by_side got a mask panel: pass palette=<ClassTable> to colour it")
            p = colorize(p, palette)
        if p.shape[0] != h:
            p = np.asarray(Image.fromarray(p).resize((round(p.shape[1] * h / p.shape[0]), h)))
        parts.append(p)
        if i < len(panels) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``image`` as RGB at the mask's ``(H, W)`` (bilinear), as overlay() shows it."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[:2] != tuple(shape):
        image = np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    return image


def error_mask(pred: np.ndarray, label: np.ndarray, void_index: int, num_classes: int | None = None) -> np.ndarray:
    """``(H, W) bool``: True exactly where a labelled pixel is predicted wrong (``pred != label``).

    A pixel is labelled when its label is not ``void_index`` (and, with ``num_classes``, is a
    class index 0..K-1: what segray.metrics counts); the rest is scored by no metric."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction of shape {pred.shape} and label of shape {label.shape}; expected one shape")
    labelled = label != void_index
    if num_classes is not None:
        labelled &= label < num_classes
    return labelled & (pred != label)


def error_map(image: np.ndarray, pred: np.ndarray, label: np.ndarray, classes: ClassTable) -> np.ndarray:
    """The frame in light grey, its wrongly predicted labelled pixels in ERROR_COLOR and its void
    (unscored) pixels in UNSCORED_COLOR: where the model errs, at a glance."""
    label = np.asarray(label)
    image = _fit(image, label.shape).astype(np.float32)
    luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = (150 + 0.4 * luma).round().clip(0, 255).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, axis=2)
    out[(label == classes.void_index) | (label >= classes.num_classes)] = UNSCORED_COLOR
    out[error_mask(pred, label, classes.void_index, classes.num_classes)] = ERROR_COLOR
    return out


# ----------------------------------------------------------------------------- charts (matplotlib)


def new_figure(width_in: float, height_in: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot), 100 pixels an inch, constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """The figure as PNG or SVG bytes. SVG keeps its text as ``<text>`` (searchable, crisp at any
    zoom) rather than glyph outlines, and carries no date, so equal charts give equal files."""
    buf = io.BytesIO()
    if fmt == "svg":
        import matplotlib

        # matplotlib reads these settings while saving; they hold for this save only, one at a time.
        with _SVG_LOCK, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "segray"}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
    elif fmt == "png":
        fig.savefig(buf, format="png")
    else:
        raise ValueError(f"figure format {fmt!r}; expected 'png' or 'svg'")
    return buf.getvalue()


def figure_array(fig) -> np.ndarray:
    """The figure drawn as an ``(H, W, 3) uint8`` RGB array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _names(names: Sequence[str] | ClassTable) -> list[str]:
    return [str(n) for n in (names.names if isinstance(names, ClassTable) else names)]


def confusion_figure(cm: np.ndarray, names: Sequence[str] | ClassTable):
    """Row-normalised confusion matrix (true rows, predicted columns: where each true class's
    pixels went) as a heat map with the class names on both axes and a percent colour bar.

    Cells hold their percentage up to 16 classes; rows of classes absent from the labels are
    grey. Names label every row and column up to 64 classes, class indices beyond."""
    from matplotlib import colormaps
    from matplotlib.ticker import PercentFormatter

    names = _names(names)
    cm = np.asarray(cm, dtype=np.float64)
    k = len(names)
    if k == 0 or cm.shape != (k, k):
        raise ValueError(f"{k} class names for a confusion matrix of shape {cm.shape}; expected ({k}, {k})")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.full_like(cm, np.nan)
    np.divide(cm, rows, out=norm, where=rows > 0)
    named = k <= 64
    cell = 0.48 if k <= 12 else 0.34 if k <= 32 else 10.5 / k
    side = min(11.0, max(4.0, cell * k))
    label_in = (0.09 if k <= 16 else 0.07) * min(24, max(len(n) for n in names)) + 0.5 if named else 0.5
    height = min(12.9, side + label_in + 0.8)
    fig = new_figure(height + 1.4, height)
    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="#dddddd")
    im = ax.imshow(norm, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    size = 10 if k <= 16 else 8 if k <= 40 else 6
    if named:
        ticks = np.arange(k)
        ax.set_xticks(ticks, labels=names, rotation=45 if k <= 16 else 90, ha="right", rotation_mode="anchor",
                      fontsize=size)
        ax.set_yticks(ticks, labels=names, fontsize=size)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    else:
        ticks = np.arange(0, k, math.ceil(k / 32))
        ax.set_xticks(ticks, labels=[str(t) for t in ticks], rotation=90, fontsize=size)
        ax.set_yticks(ticks, labels=[str(t) for t in ticks], fontsize=size)
        ax.set_xlabel("predicted class (index)")
        ax.set_ylabel("true class (index)")
    if k <= 40:
        ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    if k <= 16:
        for i in range(k):
            for j in range(k):
                v = norm[i, j]
                if np.isfinite(v) and v >= 0.005:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=9 if k <= 12 else 7,
                            color="white" if v > 0.55 else "#222222")
    ax.set_title("Where each true class's pixels went (% of the row)", fontsize=11)
    bar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02, format=PercentFormatter(1.0))
    bar.set_label("share of the true class's labelled pixels")
    return fig


def confusion_image(cm: np.ndarray, names: Sequence[str] | ClassTable) -> np.ndarray:
    """confusion_figure() drawn as an ``(H, W, 3) uint8`` RGB array (at most 1300 pixels high)."""
    return figure_array(confusion_figure(cm, names))


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, h in enumerate(history):
        v = h.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            x = h.get("epoch", i + 1)
            xs.append(x if isinstance(x, (int, float)) else i + 1)
            ys.append(float(v))
    return xs, ys


def training_figure(history: list[dict], best_epoch: int | None = None):
    """Loss, validation mIoU and pixel accuracy, and the learning rate (where the history has
    them) per epoch, one panel each with labelled axes and a legend of full names; None when
    the history has none of them. ``best_epoch``: marked on the validation panel."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    panels = []
    for title, ylabel, keys in (("Loss", "cross-entropy loss", ("train_loss", "val_loss")),
                                ("Validation", "score (0 to 1)", ("val_miou", "val_pixel_accuracy")),
                                ("Learning rate", "learning rate", ("lr",))):
        lines = [(k, *_series(history, k)) for k in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((title, ylabel, lines))
    if not panels:
        return None
    fig = new_figure(3.9 * len(panels) + 0.3, 3.5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ylabel, lines) in zip(axes, panels):
        for key, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3.5, linewidth=1.8,
                    label=SERIES_LABELS.get(key, key))
        if title == "Validation":
            ax.set_ylim(0.0, 1.0)
            if best_epoch is not None:
                ax.axvline(best_epoch, color="#777777", linestyle="--", linewidth=1,
                           label=f"best epoch ({best_epoch})")
        if title == "Learning rate":
            values = [y for _, _, ys in lines for y in ys if y > 0]
            if values and max(values) / min(values) > 20:
                ax.set_yscale("log")
            else:
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="best")
    return fig


def frame_figure(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, classes: ClassTable, title: str):
    """A frame's labelled panels: the frame, its label and prediction overlaid, and the error
    map (2 x 2; frame and prediction only without a label), with ``title`` above and a legend
    of the classes in the masks below."""
    from matplotlib.patches import Patch

    pred = np.asarray(pred)
    image = _fit(image, pred.shape)
    panels = [("frame", image), ("prediction", overlay(image, pred, palette=classes))]
    if label is not None and label.shape == pred.shape:
        wrong = error_mask(pred, label, classes.void_index, classes.num_classes)
        scored = int(((label != classes.void_index) & (label < classes.num_classes)).sum())
        share = f"{wrong.sum() / scored:.1%} of labelled pixels" if scored else "no labelled pixels"
        panels = [panels[0], ("label (ground truth)", overlay(image, label, palette=classes)), panels[1],
                  (f"errors: {share} wrong (red)", error_map(image, pred, label, classes))]
        present = np.union1d(np.unique(pred), np.unique(label))
    else:
        present = np.unique(pred)
    h, w = pred.shape
    pw = min(max(w, 320), 480) / 100  # panel width in inches: small frames scaled up, large ones down
    ph = pw * h / w
    handles = [Patch(facecolor=np.asarray(classes.colors[c]) / 255, edgecolor="#555555", label=classes.names[c])
               for c in present if c < classes.num_classes]
    if len(panels) == 4:
        handles += [Patch(facecolor=np.asarray(ERROR_COLOR) / 255, label="wrong"),
                    Patch(facecolor=np.asarray(UNSCORED_COLOR) / 255, label=f"{classes.void_name} (not scored)")]
    width = 2 * pw + 0.3
    # Legend columns that fit the width: an entry is its patch, a gap and about 0.07 inch a character.
    entry = 0.55 + 0.07 * max((len(h.get_label()) for h in handles), default=1)
    ncols = max(1, min(len(handles), int((width - 0.2) // entry)))
    rows = math.ceil(len(panels) / 2)
    fig = new_figure(width, rows * (ph + 0.35) + 0.45 + 0.2 * math.ceil(len(handles) / ncols))
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture, interpolation="nearest" if w < 320 else "antialiased")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11, fontweight="bold")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    return fig

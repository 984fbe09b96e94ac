"""Video files as containers of frames: index, ranges, decode (PyAV, i.e. FFmpeg).

A video ``<uri>`` holds frames ``<uri>#frame=<k>``, k = 0, 1, ... in the order the decoder gives
them (presentation order). A video is read in two steps, both in Ray tasks, never on the driver:

1. :func:`index_video` demuxes the whole file without decoding (cheap: packets only) and keeps
   every frame's presentation timestamp (pts) and the keyframes. Frame k is the k-th smallest
   pts. The index also tells whether the file ends before its container says it should.
2. :func:`plan_ranges` cuts the frames into ranges of about ``frames_per_task`` frames at
   keyframes; range r owns the frames whose pts lies in ``[cut_r, cut_r+1)``, so every frame
   belongs to exactly one range whatever the GOP structure (B-frames, open GOPs) or frame rate
   (variable included). :func:`decode_range` seeks to the range's keyframe, checks that the
   demuxer really landed at or before it (some AVI indexes do not; then it decodes from the
   start), decodes until every frame it owns is out, and identifies each frame by its pts.

A file whose packets lack timestamps or repeat one is not split: it is one range and its frames
are numbered as they come out of the decoder. Damage never raises past a range: frames decoded
before it are yielded, then :class:`VideoDamage` names the first frame that was not.

Inputs are opened through a Python file object with the demuxer chosen by the extension, so a
file can never make FFmpeg open another file or URL (an HLS playlist named ``.mp4`` is refused
as not being an MP4).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from segray import storage
from segray.errors import SegrayError, describe
from segray.preprocess import MAX_PIXELS, resize_image

# Extension -> the FFmpeg demuxer that reads it (never probed from the bytes: see the module doc).
VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "matroska", ".avi": "avi"}
VIDEO_EXTENSIONS: tuple[str, ...] = tuple(VIDEO_FORMATS)
FRAME_MARK = "#frame="
# Bytes per read from an object store while demuxing (one ranged GET on S3).
READ_AHEAD = 8 * 2**20


class VideoError(SegrayError, ValueError):
    """A file that cannot be read as a video at all (not a video, no video stream, no decoder)."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri


class VideoDamage(SegrayError, ValueError):
    """Decoding of a range stopped before its last frame: ``index`` is the first frame not decoded."""

    def __init__(self, uri: str, index: int, message: str) -> None:
        super().__init__(f"{uri}: decoding stopped at frame {index}: {message}")
        self.uri = uri
        self.index = index


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def frame_uri(video_uri: str, index: int) -> str:
    return f"{video_uri}{FRAME_MARK}{index}"


def split_frame_uri(uri: str) -> tuple[str, int] | None:
    """``<video>#frame=<k>`` -> (``<video>``, k); None for any other URI."""
    head, mark, tail = uri.rpartition(FRAME_MARK)
    if mark and tail.isascii() and tail.isdigit() and is_video(head):
        return head, int(tail)
    return None


def frame_mask_rel(video_rel: str, index: int) -> str:
    """Frame k of the video at ``a/clip.mp4`` -> its mask ``a/clip.mp4/<k>.png`` below masks/."""
    return f"{video_rel}/{index}.png"


def video_folder(video_rel: str) -> str:
    """``a/b/clip.mp4`` -> ``a/b/clip``: the folder whose ``<k>.png`` label frame k."""
    lower = video_rel.lower()
    ext = max((e for e in VIDEO_EXTENSIONS if lower.endswith(e)), key=len, default="")
    return video_rel[: len(video_rel) - len(ext)]


class _ReadAhead:
    """A seekable file over a pyarrow RandomAccessFile that reads READ_AHEAD bytes at a time, so
    that FFmpeg's small reads are a few large ranged GETs on an object store."""

    def __init__(self, f) -> None:
        self.f = f
        self.size = f.size()
        self.pos = 0
        self.block_start = 0
        self.block = b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        offset = self.pos - self.block_start
        if not 0 <= offset < len(self.block):
            self.block_start = self.pos
            self.block = self.f.read_at(max(READ_AHEAD, n), self.pos) if self.pos < self.size else b""
            offset = 0
        data = self.block[offset : offset + n]
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


@contextlib.contextmanager
def open_video(uri: str):
    """``(container, stream)`` of the first video stream of ``uri``, decoding single-threaded (a
    Ray task holds one CPU). Raises VideoError when it is not a readable video, StorageError or
    FileNotFoundError when the object cannot be read."""
    import av

    fmt = VIDEO_FORMATS.get(next((e for e in VIDEO_EXTENSIONS if uri.lower().endswith(e)), ""), None)
    fs, path = storage.resolve(uri)
    try:
        raw = fs.open_input_file(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise storage.StorageError(f"{uri}: cannot be read ({describe(e)})") from e
    with raw:
        try:
            container = av.open(_ReadAhead(raw), mode="r", format=fmt)
        except Exception as e:  # noqa: BLE001 - FFmpeg's errors for bytes that are not this format
            hint = "; an MP4 or MOV cut short loses its index (moov) and cannot be read" if fmt in ("mp4", "mov") else ""
            raise VideoError(uri, f"not a readable {fmt or 'video'} file ({describe(e)}){hint}") from None
        with container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
                raise VideoError(uri, f"no video stream (streams: {kinds})")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx is None or not ctx.name:
                raise VideoError(uri, "its video codec is not one this FFmpeg build can decode")
            if (stream.width or 0) * (stream.height or 0) > MAX_PIXELS:
                raise VideoError(uri, f"{stream.width}x{stream.height} frames are over the {MAX_PIXELS} pixels limit")
            ctx.thread_count = 1
            yield container, stream


@dataclass(frozen=True)
class VideoIndex:
    """Every frame's pts (ascending: frame k's is ``pts[k]``) and the keyframes' pts."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    time_base: Fraction
    exact: bool  # False: timestamps missing or repeated; one range, frames numbered as decoded
    average_rate: float  # frames per second the container states (0 when unknown)
    ending: str = ""  # why the file ends before its container says it should, or ""

    @property
    def frames(self) -> int:
        return len(self.pts)

    def seconds(self, pts: int) -> float:
        return float(pts * self.time_base)


def _expected_end(container, stream, n: int, end_s: float) -> str:
    """Why ``n`` frames ending at ``end_s`` seconds are fewer than the container states, or ""."""
    if stream.frames and n < stream.frames:
        return f"the container announces {stream.frames} frames, {n} are in the file (truncated?)"
    if stream.duration and stream.time_base:
        announced = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        announced = container.duration / 1e6
    else:
        return ""
    rate = float(stream.average_rate or 0) or 25.0
    if end_s < announced - max(0.1, 2.0 / rate):
        return f"the file ends at {end_s:.2f} s of the {announced:.2f} s its container announces (truncated?)"
    return ""


def index_video(uri: str) -> VideoIndex:
    """Demux ``uri`` (no decoding) into a VideoIndex. A demuxer error after some packets keeps
    them and says so in ``ending``; no frame at all is a VideoError."""
    import av

    with open_video(uri) as (container, stream):
        try:
            av.codec.Codec(stream.codec_context.name, "r")
        except Exception:  # noqa: BLE001 - UnknownCodecError and the like
            raise VideoError(uri, f"no decoder for its codec {stream.codec_context.name!r} in this FFmpeg build") from None
        stamps: list[int | None] = []
        keys: list[int] = []
        last_end = None
        damage = ""
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue  # the demuxer's end-of-stream packet
                p = packet.pts if packet.pts is not None else packet.dts
                stamps.append(p)
                if packet.is_keyframe and p is not None:
                    keys.append(p)
                if p is not None:
                    end = p + (packet.duration or 0)
                    last_end = end if last_end is None else max(last_end, end)
        except Exception as e:  # noqa: BLE001 - a damaged container: keep what was demuxed
            damage = f"the container is damaged after frame {len(stamps) - 1} ({describe(e)})"
        if not stamps:
            raise VideoError(uri, damage or "no frames in its video stream")
        tb = stream.time_base or Fraction(1, 1)
        exact = None not in stamps and len(set(stamps)) == len(stamps)
        pts = tuple(sorted(stamps)) if exact else tuple(range(len(stamps)))
        ending = damage or (_expected_end(container, stream, len(stamps), float(last_end * tb))
                            if last_end is not None else "")
        return VideoIndex(pts, tuple(sorted(keys)) if exact else (), tb, exact,
                          float(stream.average_rate or 0), ending)


def select_frames(index: VideoIndex, every: int | None = None, fps: float | None = None) -> list[int] | None:
    """The frame indices ``--every N`` or ``--fps F`` keep (None: all frames).

    ``--fps F``: for each instant ``t0 + j/F`` (t0 the first frame's time) up to the last frame,
    the frame whose time is nearest (the earlier one on a tie), each frame at most once."""
    n = index.frames
    if every:
        return list(range(0, n, every))
    if not fps:
        return None
    if not index.exact:
        step = (index.average_rate or fps) / fps
        return sorted({min(n - 1, round(j * step)) for j in range(int((n - 1) / step) + 1)})
    times = [index.seconds(p) for p in index.pts]
    chosen: set[int] = set()
    j = 0
    while True:
        t = times[0] + j / fps
        if t > times[-1] + 0.5 / fps:
            break
        k = bisect.bisect_left(times, t)
        if k == n or (k > 0 and t - times[k - 1] <= times[k] - t):
            k -= 1
        chosen.add(k)
        j += 1
    return sorted(chosen)


@dataclass(frozen=True)
class VideoRange:
    """Frames ``start .. start+count-1`` of a video: the decoder starts at the keyframe ``seek``
    (None: the file's start) and keeps the frames whose pts are ``pts`` (empty: not exact, every
    decoded frame in order)."""

    start: int
    count: int
    seek: int | None
    pts: tuple[int, ...]
    last: bool

    def to_dict(self) -> dict:
        return {"start": self.start, "count": self.count, "seek": self.seek, "pts": list(self.pts), "last": self.last}

    @classmethod
    def from_dict(cls, d: dict) -> VideoRange:
        return cls(d["start"], d["count"], d["seek"], tuple(d["pts"]), d["last"])


def plan_ranges(index: VideoIndex, frames_per_task: int) -> list[VideoRange]:
    """Cut the video into ranges of at least ``frames_per_task`` frames, each starting at a
    keyframe (a GOP longer than that is one range); one range when it is not exact."""
    n = index.frames
    if not index.exact:
        return [VideoRange(0, n, None, (), True)]
    cuts: list[tuple[int, int | None]] = [(0, None)]  # (first frame, keyframe pts to seek to)
    for key in index.keyframes:
        i = bisect.bisect_left(index.pts, key)
        if i - cuts[-1][0] >= frames_per_task and n - i > 0:
            cuts.append((i, key))
    ranges = []
    for r, (i, seek) in enumerate(cuts):
        end = cuts[r + 1][0] if r + 1 < len(cuts) else n
        ranges.append(VideoRange(i, end - i, seek, index.pts[i:end], r == len(cuts) - 1))
    return ranges


@dataclass(frozen=True)
class DecodedFrame:
    index: int
    timestamp_s: float | None
    image: np.ndarray  # (h, w, 3) uint8 at the requested size
    height: int  # the frame's own size
    width: int


class _Missed(SegrayError):
    """The demuxer landed after the keyframe it was asked to seek to."""


def _frames(container, stream, seek: int | None, owned_last: int | None, errors: list[str]) -> Iterator:
    """Decoded frames from the keyframe at or before pts ``seek`` (None: the file's start) until
    no later packet can hold a frame with pts <= ``owned_last`` (None: the end), then the
    decoder's delayed frames. Raises _Missed, before any frame, when the seek landed after.

    A packet the decoder refuses (a damaged or cut one) is passed over, as a player does, and
    its error appended to ``errors``: the frames it held are missing, the others still come."""
    if seek is not None:
        container.seek(seek, backward=True, any_frame=False, stream=stream)
    checked = seek is None
    for packet in container.demux(stream):
        if not packet.size:
            continue
        if not checked:
            checked = True
            landed = packet.pts if packet.pts is not None else packet.dts
            if not packet.is_keyframe or landed is None or landed > seek:
                raise _Missed()
        if owned_last is not None and packet.dts is not None and packet.dts > owned_last:
            break  # every later packet's frame has pts >= its dts > the range's last pts
        try:
            decoded = packet.decode()
        except Exception as e:  # noqa: BLE001 - FFmpeg's InvalidDataError and kin
            errors.append(describe(e))
            continue
        yield from decoded
    try:
        yield from stream.decode(None)
    except Exception as e:  # noqa: BLE001
        errors.append(describe(e))


def decode_range(
    uri: str,
    rng: VideoRange,
    size: tuple[int, int] | None,
    keep: Collection[int] | None = None,
    time_base: Fraction | None = None,
    ending: str = "",
) -> Iterator[DecodedFrame]:
    """Yield the frames of ``rng`` whose index is in ``keep`` (all when None), in order, resized
    to ``size`` ``(h, w)`` with the same filter as image files (None: at their own size).

    Raises VideoDamage (after the frames decoded before it) naming the first frame of the range
    that never came out of the decoder, or, for the last range of a file that ends before its
    container says (``ending``), the first frame past the end. VideoError, StorageError and
    FileNotFoundError when the file cannot be opened at all."""
    exact = bool(rng.pts)
    produced: set[int] = set()
    problem = ""
    errors: list[str] = []
    counter = rng.start
    try:
        for seek in (rng.seek, None) if rng.seek is not None else (None,):
            try:
                with open_video(uri) as (container, stream):
                    for frame in _frames(container, stream, seek, rng.pts[-1] if exact else None, errors):
                        if exact:
                            j = bisect.bisect_left(rng.pts, frame.pts) if frame.pts is not None else len(rng.pts)
                            if j == len(rng.pts) or rng.pts[j] != frame.pts:
                                continue  # another range's frame
                            k = rng.start + j
                        else:
                            k, counter = counter, counter + 1
                        if k in produced:
                            continue
                        produced.add(k)
                        if keep is None or k in keep:
                            rgb = frame.to_ndarray(format="rgb24")
                            ts = (float(frame.pts * time_base) if time_base is not None and frame.pts is not None
                                  else frame.time)
                            image = resize_image(rgb, size) if size else rgb
                            yield DecodedFrame(k, ts, image, rgb.shape[0], rgb.shape[1])
                break
            except _Missed:
                continue  # raised before any frame: decode from the start instead
    except (VideoError, storage.StorageError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - the demuxer cannot go on: the range stops here
        problem = describe(e)
    problem = problem or (errors[0] if errors else "")
    end = rng.start + rng.count
    missing = next((k for k in range(rng.start, end) if k not in produced), None)
    tail = ending if rng.last else ""
    if missing is not None:
        why = problem or f"the decoder gave no frame for {end - missing} of the frames to {end - 1}"
        raise VideoDamage(uri, missing, f"{why}; {tail}" if tail else why)
    if tail:
        raise VideoDamage(uri, end, tail)


def read_frame(uri: str, index: int) -> np.ndarray:
    """Frame ``index`` of the video at ``uri``, ``(H, W, 3) uint8`` at its own size (for a few
    frames, e.g. a report's pictures: the video is indexed on every call). Raises VideoError,
    VideoDamage or IndexError."""
    vi = index_video(uri)
    if not 0 <= index < vi.frames:
        raise IndexError(f"{uri}: no frame {index} (it has {vi.frames})")
    rng = next(r for r in plan_ranges(vi, 1) if r.start <= index < r.start + r.count)
    for frame in decode_range(uri, rng, None, {index}, vi.time_base):
        return frame.image
    raise VideoDamage(uri, index, "the decoder gave no frame for it")

"""Frame sources: a video file or an image sequence, read as a stream of RGB frames.

`open_source(path)` probes the input once (a PyAV demux: cheap, no decoding except the first frame) and
returns a `FrameSource`. Frames are then decoded lazily, one at a time, so memory stays flat however long
the clip is, and a FrameSource holds no open file: it can be pickled and sent to another process, which
opens its own reader (decord readers must never be shared across threads or a fork, dmlc/decord#294).

Video frames come from decord when it agrees with PyAV about the clip, from PyAV otherwise. decord trusts
the container's frame count and can deadlock when fewer frames are decodable (dmlc/decord#373), so it is
only opened after the PyAV demux has confirmed the count, and is then cross-checked on frame count,
timestamps and the first frame's pixels. Clips with alpha or more than 8 bits always go through PyAV,
since decord decodes to 8-bit RGB only.

Frame images are HxWx3 uint8 RGB in the stored (coded) orientation; `VideoInfo.rotation` says how a
player would turn them, and the sink writes the same rotation back.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np

from models.errors import UserError
from pipeline.video_probe import DEFAULT_SEQUENCE_FPS, VideoInfo, frame_pts, one_line, probe_video

__all__ = ["Frame", "FrameSource", "ImageSequenceSource", "VideoFileSource", "VideoInfo", "open_source",
           "is_pattern", "parse_fps", "read_alpha", "alpha_plane", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr", ".bmp", ".webp")
PATTERN_FIELD = re.compile(r"%0?\d*d")  # the printf number field of a frame pattern: %d, %06d

# FFmpeg's codes for "not tagged" (AVCOL_RANGE_UNSPECIFIED, AVCOL_SPC/PRI/TRC_UNSPECIFIED).
UNSPECIFIED_RANGE = 0
UNSPECIFIED_COLOUR = 2


@dataclass
class Frame:
    index: int
    pts: int
    image: np.ndarray  # HxWx3 uint8 RGB
    alpha: np.ndarray | None = None  # HxW uint8, or None when the source has no alpha


def open_source(path: str, fps: Fraction | int | str | None = None, backend: str = "auto",
                strict: bool = True) -> FrameSource:
    """Open a video file, an image folder or a printf pattern like `frames/%06d.png`.

    A path that exists is that file or folder, whatever its name holds ("speed 100%.mp4"); a name with a number
    field (%d, %06d) that is not a file is a pattern. `fps` sets the rate of an image sequence (default 24/1); a
    video file keeps its own rate. `backend` is "auto" (decord if it agrees with PyAV), "decord" (same checks) or
    "pyav". `strict=False` reads the decodable frames of a damaged video (`VideoInfo.damage` says what is missing;
    pipeline/video_probe.py); `strict` refuses it.
    """
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(path)) or path
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', not {backend!r}")
    if is_pattern(path):
        return ImageSequenceSource(path, _pattern_files(path), _sequence_fps(path, fps))
    if os.path.isdir(path):
        return ImageSequenceSource(path, _folder_files(path), _sequence_fps(path, fps))
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        raise UserError(
            f"{path}: is a single image, not a video; pass its folder or a pattern like frames/%06d.png"
        )
    if fps is not None:
        raise UserError(f"{name}: fps applies to image sequences only; a video file keeps its own frame rate")
    return VideoFileSource(path, backend, strict)


def is_pattern(path: str) -> bool:
    """Whether `path` names an image sequence by a printf pattern: it is not an existing file or folder and its
    name holds a number field (%d, %06d)."""
    return not os.path.lexists(path) and PATTERN_FIELD.search(os.path.basename(path)) is not None


class FrameSource:
    """Common frame selection; subclasses decode."""

    info: VideoInfo
    backend: str

    def frames(
        self, start: int = 0, end: int | None = None, every_nth: int = 1, max_frames: int | None = None
    ) -> Iterator[Frame]:
        """Yield frames start, start+every_nth, ... before `end` (exclusive), at most `max_frames` of them."""
        wanted = self.select(start, end, every_nth, max_frames)
        if len(wanted) == 0:
            return iter(())
        return self._decode(wanted)

    def select(
        self, start: int = 0, end: int | None = None, every_nth: int = 1, max_frames: int | None = None
    ) -> range:
        """The frame indices `frames()` would yield, with the same checks."""
        name = os.path.basename(self.info.path)
        count = self.info.num_frames
        if start < 0 or (end is not None and end < 0):
            raise UserError(f"{name}: start and end must be >= 0 (got start={start}, end={end})")
        if every_nth < 1:
            raise UserError(f"{name}: every_nth must be >= 1 (got {every_nth})")
        if max_frames is not None and max_frames < 0:
            raise UserError(f"{name}: max_frames must be >= 0 (got {max_frames})")
        if start >= count:
            raise UserError(f"{name}: start={start} is past the last frame (the clip has {count} frames)")
        stop = count if end is None else min(end, count)
        wanted = range(start, max(stop, start), every_nth)
        return wanted if max_frames is None else wanted[:max_frames]

    def read(self, indices: Sequence[int]) -> list[Frame]:
        """Random access: the frames at `indices`, in the order asked."""
        name = os.path.basename(self.info.path)
        for index in indices:
            if not 0 <= index < self.info.num_frames:
                raise UserError(f"{name}: frame {index} does not exist (the clip has {self.info.num_frames} frames)")
        found = self._read_sorted(sorted(set(indices)))
        return [found[index] for index in indices]

    def _decode(self, wanted: range) -> Iterator[Frame]:
        raise NotImplementedError

    def _read_sorted(self, indices: list[int]) -> dict[int, Frame]:
        raise NotImplementedError


# --- Video files -------------------------------------------------------------------------------------


class VideoFileSource(FrameSource):
    def __init__(self, path: str, backend: str = "auto", strict: bool = True):
        self.info, self._keyframes, first_image = probe_video(path, strict)
        self._index_of_pts = {pts: index for index, pts in enumerate(self.info.pts)}
        # Why frames come from PyAV rather than decord (None when decord is used).
        if backend == "pyav":
            self.fallback_reason = "PyAV was asked for"
        else:
            self.fallback_reason = _decord_disagreement(self.info, first_image)
        self.backend = "pyav" if self.fallback_reason else "decord"

    def _decode(self, wanted: range) -> Iterator[Frame]:
        if self.backend == "decord":
            return self._decode_decord(wanted)
        return self._decode_pyav(wanted)

    def _read_sorted(self, indices: list[int]) -> dict[int, Frame]:
        if self.backend == "decord":
            return self._read_decord(indices)
        return self._read_pyav(indices)

    # decord

    def _decode_decord(self, wanted: range) -> Iterator[Frame]:
        reader = _decord_call(self.info.path, wanted.start, lambda: _open_decord(self.info.path))
        try:
            # Sequential next() keeps memory flat; get_batch grows it (dmlc/decord#197) and seeking
            # for every batch re-decodes the GOP.
            if wanted.start:
                reader.seek_accurate(wanted.start)
            position = wanted.start
            for index in wanted:
                if index > position:
                    reader.skip_frames(index - position)
                image = _decord_call(self.info.path, index, lambda: reader.next().asnumpy())
                position = index + 1
                yield Frame(index, self.info.pts[index], image)
        finally:
            del reader

    def _read_decord(self, indices: list[int]) -> dict[int, Frame]:
        reader = _decord_call(self.info.path, indices[0], lambda: _open_decord(self.info.path))
        try:
            batch = _decord_call(self.info.path, indices[0], lambda: reader.get_batch(indices).asnumpy())
            reader.seek(0)  # releases get_batch's buffers (dmlc/decord#197)
        finally:
            del reader
        return {index: Frame(index, self.info.pts[index], image.copy()) for index, image in zip(indices, batch)}

    # PyAV

    def _decode_pyav(self, wanted: range) -> Iterator[Frame]:
        for index, frame in self._decode_pyav_from(wanted.start):
            if index in wanted:
                yield self._to_frame(index, frame)
            if index >= wanted[-1]:
                return

    def _read_pyav(self, indices: list[int]) -> dict[int, Frame]:
        found = {}
        for run in self._runs_within_one_gop(indices):
            for index, frame in self._decode_pyav_from(run[0]):
                if index in run:
                    found[index] = self._to_frame(index, frame)
                if index >= run[-1]:
                    break
        return found

    def _runs_within_one_gop(self, indices: list[int]) -> list[list[int]]:
        """Group sorted indices so that each group is decoded in one pass without seeking."""
        runs: list[list[int]] = []
        for index in indices:
            gop_start = self._keyframes[bisect.bisect_right(self._keyframes, index) - 1]
            if runs and gop_start <= runs[-1][-1]:
                runs[-1].append(index)
            else:
                runs.append([index])
        return runs

    def _decode_pyav_from(self, start: int, seek: bool = True) -> Iterator[tuple[int, av.VideoFrame]]:
        """Yield (index, frame) for every frame from `start` on, seeking to the keyframe before it."""
        name = os.path.basename(self.info.path)
        expected = start
        seek_missed = False
        try:
            with av.open(self.info.path) as container:
                stream = container.streams[self.info.stream_index]
                stream.thread_type = "AUTO"
                if seek and start > 0:
                    container.seek(self.info.pts[start], stream=stream, backward=True)
                for frame in container.decode(stream):
                    index = self._index_of_pts.get(frame_pts(frame))
                    if index is None or index < expected:
                        continue  # before the seek target, or dropped by an edit list
                    if index > expected:
                        if seek and start > 0 and expected == start:
                            seek_missed = True  # the container's index put us past the target
                            break
                        raise UserError(f"{name}: frame {expected} could not be decoded; the file is damaged")
                    expected += 1
                    yield index, frame
        except av.FFmpegError as error:
            raise UserError(f"{name}: cannot decode frame {expected}: {one_line(error)}") from None
        if seek_missed:
            yield from self._decode_pyav_from(start, seek=False)
        elif expected < self.info.num_frames:
            raise UserError(
                f"{name}: only {expected} of {self.info.num_frames} frames could be decoded;"
                " the file is damaged or truncated"
            )

    def _to_frame(self, index: int, frame: av.VideoFrame) -> Frame:
        alpha = read_alpha(frame) if self.info.has_alpha else None
        return Frame(index, self.info.pts[index], frame.to_ndarray(format="rgb24"), alpha)


def alpha_plane(frame: av.VideoFrame) -> tuple[np.ndarray, int] | None:
    """A writable view of a planar frame's own alpha plane and its full-scale value, else None.

    swscale truncates deep alpha when converting to 8 bits, losing a level per generation through
    ProRes 4444; scaling the plane directly keeps 8-bit alpha exact through any number of round trips.
    """
    component = next((c for c in frame.format.components if c.is_alpha), None)
    if component is None or not frame.format.is_planar:
        return None
    plane = frame.planes[component.plane]
    dtype = np.dtype(np.uint16 if component.bits > 8 else np.uint8)
    dtype = dtype.newbyteorder(">" if frame.format.is_big_endian else "<")
    view = np.frombuffer(plane, dtype).reshape(plane.height, -1)[:, : plane.width]
    return view, (1 << component.bits) - 1


def read_alpha(frame: av.VideoFrame) -> np.ndarray:
    """The frame's alpha as HxW uint8."""
    planar = alpha_plane(frame)
    if planar is None:
        return np.ascontiguousarray(frame.to_ndarray(format="rgba")[..., 3])
    view, full_scale = planar
    return np.round(view * (255 / full_scale)).astype(np.uint8)


def _decord_disagreement(info: VideoInfo, first_image: np.ndarray) -> str | None:
    """Why decord must not be used for this file, or None when it agrees with PyAV."""
    if info.note:
        return "the file has several video streams (decord reads the one it picks)"
    if info.damage:
        return "the file is damaged (decord trusts its header)"
    if info.has_alpha:
        return "the video has alpha (decord decodes RGB only)"
    if info.bit_depth > 8:
        return f"the video is {info.bit_depth}-bit (decord decodes 8-bit only)"
    try:
        import decord  # noqa: F401  (only asks whether it is installed)
    except ImportError:
        return "decord is not installed"
    try:
        reader = _open_decord(info.path)
        try:
            if len(reader) != info.num_frames:
                return f"decord counts {len(reader)} frames, PyAV {info.num_frames}"
            decord_starts = reader.get_frame_timestamp(np.arange(info.num_frames))[:, 0]
            pyav_starts = (np.array(info.pts) - info.pts[0]) * float(info.time_base)
            if np.abs(decord_starts - decord_starts[0] - pyav_starts).max() > 1e-3:
                return "decord's frame timestamps differ from the container's"
            image = reader.next().asnumpy()
        finally:
            del reader
    except Exception as error:  # decord raises assorted native errors; any of them means "use PyAV"
        return f"decord cannot read it ({one_line(error)})"
    if image.shape != first_image.shape or np.abs(image.astype(np.int16) - first_image).max() > 1:
        return "decord's first frame differs from PyAV's"
    return None


def _open_decord(path: str):
    import decord  # imported late: only needed when decord is the backend

    return decord.VideoReader(path, ctx=decord.cpu(0))


def _decord_call(path: str, index: int, call):
    try:
        return call()
    except Exception as error:  # decord's native errors have no common base class worth naming
        raise UserError(f"{os.path.basename(path)}: decord cannot decode frame {index} ({one_line(error)})") from None


# --- Image sequences ---------------------------------------------------------------------------------


class ImageSequenceSource(FrameSource):
    backend = "opencv"

    def __init__(self, path: str, files: list[str], fps: Fraction):
        self.files = files
        image, alpha, bit_depth = _read_image(files[0])
        height, width = image.shape[:2]
        count = len(files)
        self.info = VideoInfo(
            path=path,
            width=width,
            height=height,
            num_frames=count,
            fps=fps,
            time_base=1 / fps,
            pts=list(range(count)),
            end_pts=count,
            duration_s=float(count / fps),
            is_vfr=False,
            has_audio=False,
            has_alpha=alpha is not None,
            pix_fmt=("rgba" if alpha is not None else "rgb24") if bit_depth == 8 else f"rgb{bit_depth}",
            bit_depth=bit_depth,
            color_range=UNSPECIFIED_RANGE,
            colorspace=UNSPECIFIED_COLOUR,
            color_primaries=UNSPECIFIED_COLOUR,
            color_trc=UNSPECIFIED_COLOUR,
            rotation=0,
            codec=os.path.splitext(files[0])[1].lstrip(".").lower(),
            is_image_sequence=True,
        )

    def _decode(self, wanted: range) -> Iterator[Frame]:
        for index in wanted:
            yield self._load(index)

    def _read_sorted(self, indices: list[int]) -> dict[int, Frame]:
        return {index: self._load(index) for index in indices}

    def _load(self, index: int) -> Frame:
        path = self.files[index]
        image, alpha, _ = _read_image(path)
        if image.shape[:2] != (self.info.height, self.info.width):
            raise UserError(
                f"{path}: is {image.shape[1]}x{image.shape[0]} but the sequence is {self.info.width}x{self.info.height}"
            )
        if self.info.has_alpha and alpha is None:
            alpha = np.full(image.shape[:2], 255, np.uint8)
        return Frame(index, index, image, alpha if self.info.has_alpha else None)


def _read_image(path: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """An image file as (RGB uint8, alpha uint8 or None, bits per channel on disk)."""
    array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if array is None:
        if path.lower().endswith(".exr"):
            raise UserError(f"{path}: cannot read EXR: this OpenCV build has no OpenEXR support")
        raise UserError(f"{path}: not a readable image")
    bit_depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(array.dtype, 32)
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[2]
    colour = array[..., 2::-1] if channels >= 3 else np.repeat(array[..., :1], 3, axis=2)  # BGR -> RGB
    alpha = array[..., 3] if channels == 4 else array[..., 1] if channels == 2 else None
    return _to_uint8(colour, path), None if alpha is None else _to_uint8(alpha, path), bit_depth


def _to_uint8(array: np.ndarray, path: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if array.dtype.kind == "f":
        # Float images (EXR, float TIFF) are taken as display-referred 0..1; no tone mapping is applied.
        return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    raise UserError(f"{path}: unsupported pixel type {array.dtype}")


def _sequence_fps(path: str, fps: Fraction | int | str | None) -> Fraction:
    if fps is None:
        return DEFAULT_SEQUENCE_FPS
    return parse_fps(path, fps)


def parse_fps(path: str, fps: Fraction | int | float | str) -> Fraction:
    """An exact frame rate from 24, '30000/1001', Fraction(...); anything else is a UserError naming `path`."""
    try:
        rate = Fraction(fps)
    except (ValueError, ZeroDivisionError):
        rate = Fraction(0)
    if rate <= 0:
        raise UserError(f"{path}: fps must be a positive number like 24 or 30000/1001 (got {fps!r})")
    return rate


def _folder_files(folder: str) -> list[str]:
    names = [
        name
        for name in os.listdir(folder)
        if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, name))
    ]
    if not names:
        raise UserError(f"{folder}: no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    extensions = sorted({os.path.splitext(name)[1].lower() for name in names})
    if len(extensions) > 1:
        raise UserError(f"{folder}: mixes image types ({', '.join(extensions)}); keep one type per sequence")
    return [os.path.join(folder, name) for name in sorted(names, key=_natural_key)]


def _natural_key(name: str) -> list:
    """frame2.png sorts before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _pattern_files(pattern: str) -> list[str]:
    """Files matching a printf pattern such as frames/%06d.png, numbered without gaps."""
    folder, base = os.path.split(pattern)
    folder = folder or "."
    match = re.fullmatch(r"(.*)%(0?)(\d*)d(.*)", base)
    if not match or "%" in match.group(1) + match.group(4):
        raise UserError(f"{pattern}: the pattern needs exactly one number field like %06d")
    if not os.path.isdir(folder):
        raise UserError(f"{pattern}: folder {folder} does not exist")
    prefix, zero_pad, width, suffix = match.groups()
    digits = rf"\d{{{width},}}" if zero_pad and width else r"\d+"
    file_re = re.compile(re.escape(prefix) + f"({digits})" + re.escape(suffix))
    numbered = sorted(
        (int(found.group(1)), name)
        for name in os.listdir(folder)
        if (found := file_re.fullmatch(name))
    )
    if not numbered:
        raise UserError(f"{pattern}: no files match this pattern")
    numbers = [number for number, _ in numbered]
    for previous, number in zip(numbers, numbers[1:]):
        if number != previous + 1:
            raise UserError(
                f"{pattern}: frame {previous + 1} is missing (the sequence runs {numbers[0]}..{numbers[-1]})"
            )
    return [os.path.join(folder, name) for _, name in numbered]

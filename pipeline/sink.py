"""Frame sink: encode RGB frames into a video file or an image sequence, atomically.

Everything is written under a hidden temporary name in the output's own folder and renamed onto the
output path only when `close()` has finished, so the output path never holds a half-written file. Any
refusal (output is an input, missing folder, existing output) happens before anything is created.

Timing: with `like` (the source's VideoInfo) and no `fps`, each frame keeps its own pts in the source's
time base, so the frame rate, VFR timing and the sync with the passed-through audio are the source's.
With `fps`, or without `like`, frames are renumbered 0, 1, 2, ... at that rate (24 if neither is given).

Alpha is kept by prores (4444), ffv1 and PNG/EXR sequences; h264 and hevc drop it.

Threads: the encoder gets an explicit thread count (`threads`; 0: one per core, at most MAX_ENCODER_THREADS) and
FFmpeg's thread type "AUTO": frame threads where the encoder has them (x264, x265), else slice threads (ffv1).
Encoders such as x264 write different bits for different thread counts, so runs that must match bit for bit (a
batch's chunks, rendered on any machine) fix the count. x264's own default, 1.5 threads per core, would crowd the
stylizer's stages that run beside the encoder (pipeline/stylizer.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from fractions import Fraction

import av
import cv2
import numpy as np

from models.errors import UserError
from pipeline.source import PATTERN_FIELD, alpha_plane, is_pattern, parse_fps

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv")
SEQUENCE_FORMATS = ("png", "exr")
ENCODERS = {"h264": "libx264", "hevc": "libx265", "prores": "prores_ks", "ffv1": "ffv1"}
DEFAULT_SEQUENCE_PATTERN = "%06d"
SEQUENCE_METADATA_FILE = "metadata.json"
MAX_ENCODER_THREADS = 16  # threads 0: one per core up to this; x264's frame threads gain little beyond it at 1080p

# FFmpeg can mux PCM and a few other audio codecs into .mp4, but common players do not play them there.
MP4_AUDIO_CODECS = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}

# sws/encoder colour matrices that reformat() understands, keyed by the FFmpeg AVColorSpace value.
RESAMPLE_COLORSPACES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020"}
RGB_PIX_FMTS = ("bgr0", "bgra")


class FrameSink:
    def __init__(
        self,
        path: str,
        like=None,
        codec: str | None = None,
        crf: int = 18,
        pix_fmt: str | None = None,
        fps: Fraction | int | str | None = None,
        audio_from: str | None = None,
        metadata: dict | None = None,
        overwrite: bool = False,
        codec_options: dict | None = None,
        protect: tuple[str, ...] = (),
        end_pts: int | None = None,
        threads: int = 0,
    ):
        """Prepare to write `path`: a .mp4/.m4v/.mov/.mkv file, a folder, or a pattern like out/%06d.png.

        `codec` is h264 (default for files), hevc, prores, ffv1, or png (default for sequences) / exr.
        `like` is the source's VideoInfo: its fps, timestamps, colour tags and rotation are copied.
        `audio_from` is a file whose audio streams are copied alongside (remuxed, not re-encoded).
        `metadata` (the job settings) is stored as JSON in the container's `comment` tag, or in
        metadata.json inside an image-sequence folder.
        `protect`: more inputs (the style images) that the output may never replace or hold.
        `end_pts` (with `like`): where the last frame ends, when it stands for more than its own source frame
        (every n-th frame); default: where its source frame ends.
        `threads`: the video encoder's thread count (0: `encoder_threads(0)`, one per core up to 16).

        With `overwrite`, a file output is replaced; a frames folder only when it holds nothing but what this tool
        wrote there, as recorded on the folder (`_written_here`), never another file.
        """
        self.path = os.fspath(path)
        self.like = like
        self.metadata = metadata
        self.frames_written = 0
        self._done = False
        self.overwrite = overwrite

        kind, self.target, self.codec, pattern = _classify_output(self.path, codec)
        if kind == "video" and pix_fmt is not None:
            _check_pix_fmt_known(self.path, self.codec, pix_fmt)
        _refuse_unsafe_target(self.target, kind, [like.path if like else None, audio_from, *protect], overwrite)
        # Hidden, next to the target (so the final rename stays on one filesystem), keeping a video's
        # extension so that FFmpeg picks the right container.
        suffix = os.path.splitext(self.target)[1] if kind == "video" else ""
        folder, name = os.path.split(os.path.abspath(self.target))
        self._temp = os.path.join(folder, f".{name}.{os.getpid()}.partial{suffix}")
        try:
            if kind == "sequence":
                self._writer = _SequenceWriter(self._temp, pattern, self.codec)
            else:
                rate = _frame_rate(self.path, fps) if fps is not None else (like.fps if like else Fraction(24))
                self._writer = _VideoWriter(
                    self._temp, self.path, self.codec, crf, pix_fmt, like, rate,
                    keep_pts=like is not None and fps is None, audio_from=audio_from,
                    metadata=metadata, codec_options=codec_options or {}, end_pts=end_pts,
                    threads=encoder_threads(threads),
                )
        except (OSError, av.FFmpegError) as error:
            _remove(self._temp)
            raise UserError(f"{self.path}: cannot write here ({_os_problem(error)})") from None

    def write(self, frame) -> None:
        """Add one frame: anything with `.image` (HxWx3 uint8 RGB), optional `.alpha` and `.pts`."""
        if self._done:
            raise RuntimeError(f"{self.path}: write() after close() or abort()")
        image = frame.image
        alpha = getattr(frame, "alpha", None)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{self.path}: frames must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
        if alpha is not None and (alpha.dtype != np.uint8 or alpha.shape != image.shape[:2]):
            raise ValueError(f"{self.path}: alpha must be HxW uint8 like the image, got {alpha.dtype} {alpha.shape}")
        try:
            self._writer.write(image, alpha, getattr(frame, "pts", None))
        except (OSError, av.FFmpegError) as error:
            raise UserError(f"{self.path}: {self._failure(error)}") from None
        self.frames_written += 1

    def close(self) -> None:
        """Finish encoding, copy the audio, and move the result onto the output path."""
        if self._done:
            return
        if not self.frames_written:
            self.abort()
            raise UserError(f"{self.path}: no frames were written")
        try:
            try:
                self._writer.finish(self.metadata)
                _move_into_place(self._temp, self.target, self.overwrite)
            except (OSError, av.FFmpegError) as error:
                raise UserError(f"{self.path}: {self._failure(error)}") from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _failure(self, error: Exception) -> str:
        """An encoder's or the OS's error while writing, in words."""
        if isinstance(error, av.FFmpegError) and not isinstance(error, OSError):
            return f"the {self.codec} encoder failed ({_os_problem(error)})"
        return f"writing failed ({_os_problem(error)})"

    def abort(self) -> None:
        """Drop everything written so far; the output path is left as it was."""
        if self._done:
            return
        self._done = True
        try:
            self._writer.discard()
        finally:
            _remove(self._temp)

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encoder_threads(threads: int) -> int:
    """The encoder thread count for a `threads` setting: itself, or for 0 one per core up to MAX_ENCODER_THREADS."""
    return threads or min(os.cpu_count() or 1, MAX_ENCODER_THREADS)


def _remove(path: str) -> None:
    """Delete a temporary file or folder, if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def _os_problem(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split())[:200] or type(error).__name__


def _check_pix_fmt_known(path: str, codec: str, pix_fmt: str) -> None:
    """A pix_fmt that exists and that the codec's encoder takes, checked before anything is written."""
    try:
        av.VideoFormat(pix_fmt)
    except (ValueError, TypeError):
        raise UserError(f"{path}: {str(pix_fmt)[:40]!r} is not a pixel format (e.g. yuv420p, yuv444p10le)") from None
    if codec not in ENCODERS:
        return
    try:
        taken = [f.name for f in av.codec.Codec(ENCODERS[codec], "w").video_formats or ()]
    except (av.FFmpegError, ValueError):
        return
    if taken and pix_fmt not in taken:
        raise UserError(f"{path}: the {codec} encoder does not take pix_fmt {pix_fmt}; it takes {', '.join(taken)}")


def _frame_rate(path: str, fps) -> Fraction:
    return parse_fps(path, fps)


def _classify_output(path: str, codec: str | None) -> tuple[str, str, str, str | None]:
    """(kind, target path to create, codec, file-name pattern for sequences)."""
    base = os.path.basename(path)
    extension = os.path.splitext(base)[1].lower()
    if PATTERN_FIELD.search(base) and extension.lstrip(".") in SEQUENCE_FORMATS and not os.path.lexists(path):
        if not os.path.dirname(path):
            raise UserError(f"{path}: give the frames a folder of their own, e.g. frames/{base}")
        image_format = extension.lstrip(".")
        if image_format not in SEQUENCE_FORMATS or (codec and codec != image_format):
            raise UserError(f"{path}: image sequences are written as .png or .exr (pattern like frames/%06d.png)")
        return "sequence", os.path.dirname(path), image_format, base
    if extension in VIDEO_EXTENSIONS:
        codec = codec or "h264"
        if codec not in ENCODERS:
            raise UserError(f"{path}: unknown video codec {codec!r}; choose one of {', '.join(ENCODERS)}")
        return "video", path, codec, None
    if extension == "":
        image_format = codec or "png"
        if image_format not in SEQUENCE_FORMATS:
            raise UserError(f"{path}: a folder output takes png or exr frames, not {image_format!r}")
        return "sequence", path.rstrip(os.sep) or path, image_format, f"{DEFAULT_SEQUENCE_PATTERN}.{image_format}"
    raise UserError(
        f"{path}: unknown output type {extension!r}; use .mp4, .mov, .mkv, a folder or a pattern like frames/%06d.png"
    )


def _refuse_unsafe_target(target: str, kind: str, inputs: list[str | None], overwrite: bool) -> None:
    real_target = os.path.realpath(target)
    for source in filter(None, inputs):
        real_source = os.path.realpath(os.path.dirname(source) if is_pattern(source) else source)
        if real_source == real_target or real_source.startswith(real_target + os.sep):
            raise UserError(f"{target}: this would overwrite the input {source}; choose another output")
    parent = os.path.dirname(real_target)
    if not os.path.isdir(parent):
        raise UserError(f"{target}: the folder {os.path.dirname(target) or parent} does not exist")
    if not os.path.lexists(target):
        return
    if kind == "video" and os.path.isdir(target):
        raise UserError(f"{target}: is a folder; give a file name such as {os.path.join(target, 'out.mp4')}")
    if kind == "sequence" and not os.path.isdir(target):
        raise UserError(f"{target}: is a file, not a folder for the frames")
    if kind == "sequence" and not os.listdir(target):
        return  # an empty folder made ahead of time is fine
    if not overwrite:
        raise UserError(f"{target}: already exists; pass overwrite to replace it")
    if kind == "sequence":
        ours = _written_here(target)
        strangers = sorted(name for name in os.listdir(target) if name not in ours)
        if strangers:
            raise UserError(f"{target}: holds files that are not frames this tool wrote there (e.g. {strangers[0]}); "
                            f"not replacing it: choose a new or empty folder")


WRITTEN_XATTR = "user.mambast.written"  # on a frames folder: the names this tool wrote there (JSON list)


def _written_here(folder: str) -> set[str]:
    """The names this tool wrote in a frames folder: the list on the folder's extended attribute, else the list in
    its metadata.json's "mambast" record. On a filesystem without extended attributes and no such metadata, the
    frames a sink names itself (000001.png, 000002.png, ... without a gap) and metadata.json."""
    names = None
    try:
        names = json.loads(os.getxattr(folder, WRITTEN_XATTR))
    except OSError as error:
        no_xattrs = error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    except ValueError:
        no_xattrs = False
    else:
        no_xattrs = False
    if names is None:
        try:
            with open(os.path.join(folder, SEQUENCE_METADATA_FILE)) as file:
                names = json.load(file)["mambast"]["written"]
        except (OSError, ValueError, KeyError, TypeError):
            names = None
    if names is None and no_xattrs:
        present = set(os.listdir(folder))
        names = [name for n in range(1, len(present) + 1) for name in (_default_frame_name(n, present),) if name]
    if not isinstance(names, list):
        return set()
    return {name for name in names if isinstance(name, str) and os.sep not in name} | {SEQUENCE_METADATA_FILE}


def _default_frame_name(number: int, present: set[str]) -> str | None:
    for image_format in SEQUENCE_FORMATS:
        name = f"{DEFAULT_SEQUENCE_PATTERN % number}.{image_format}"
        if name in present:
            return name
    return None


def _move_into_place(temp: str, target: str, overwrite: bool) -> None:
    """Rename the finished temporary onto the target. Without `overwrite` the target must still not exist (it is
    checked at this moment, atomically: another run may have written it since the sink was opened)."""
    try:
        if os.path.isdir(temp) and os.path.isdir(target) and os.listdir(target):
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "exists", target)
            # A non-empty folder cannot be renamed over: move the old one aside, then delete it.
            aside = temp + ".old"
            os.rename(target, aside)
            os.rename(temp, target)
            shutil.rmtree(aside)
        elif overwrite or os.path.isdir(temp):
            os.replace(temp, target)
        else:
            os.link(temp, target)  # fails if the target exists: no run replaces what another just wrote
            os.remove(temp)
    except FileExistsError:
        raise UserError(f"{target}: already exists (written while this run was working); "
                        f"pass overwrite to replace it") from None


class _SequenceWriter:
    def __init__(self, folder: str, pattern: str, image_format: str):
        if image_format == "exr" and not cv2.haveImageWriter("frame.exr"):
            raise UserError(f"{pattern}: cannot write EXR: this OpenCV build has no OpenEXR support; use png")
        os.mkdir(folder)
        self.folder = folder
        self.pattern = pattern
        self.image_format = image_format
        self.number = 0
        self.written: list[str] = []

    def write(self, image: np.ndarray, alpha: np.ndarray | None, pts: int | None) -> None:
        self.number += 1  # ffmpeg numbers sequences from 1
        pixels = image[..., ::-1] if alpha is None else np.dstack((image[..., ::-1], alpha))  # OpenCV wants BGR(A)
        if self.image_format == "exr":
            pixels = pixels.astype(np.float32) / 255
        name = self.pattern % self.number
        if not cv2.imwrite(os.path.join(self.folder, name), np.ascontiguousarray(pixels)):
            raise UserError(f"{name}: OpenCV could not write this frame")
        self.written.append(name)

    def finish(self, metadata: dict | None) -> None:
        if metadata:
            if isinstance(metadata.get("mambast"), dict):  # our own record lists what --overwrite may replace
                metadata = {**metadata, "mambast": {**metadata["mambast"], "written": self.written}}
            with open(os.path.join(self.folder, SEQUENCE_METADATA_FILE), "w") as file:
                json.dump(metadata, file, indent=2, sort_keys=True, default=str)
        try:
            os.setxattr(self.folder, WRITTEN_XATTR, json.dumps(self.written).encode())
        except OSError:
            pass  # a filesystem without extended attributes: metadata.json or the frame names tell (_written_here)

    def discard(self) -> None:
        pass  # the folder is removed by FrameSink.abort


class _VideoWriter:
    def __init__(self, temp, path, codec, crf, pix_fmt, like, rate, keep_pts, audio_from, metadata, codec_options,
                 end_pts=None, threads=1):
        self.path = path
        self.end_pts = end_pts if keep_pts else None
        self.codec = codec
        self.crf = crf
        self.requested_pix_fmt = pix_fmt
        self.like = like
        self.rate = rate
        self.keep_pts = keep_pts
        self.time_base = like.time_base if keep_pts else 1 / rate
        self.codec_options = codec_options
        self.threads = threads
        self.stream = None  # made at the first frame, once the size and alpha are known
        self.pending = None  # the last frame, held back until the next one gives its duration
        self.first_pts = self.previous_pts = None
        self.durations = {}  # pts -> duration of the frames inside the encoder
        self.audio = AudioPassthrough(audio_from) if audio_from else None
        # Keep timestamps as given: by default Matroska shifts every stream when audio starts before 0.
        self.container = av.open(temp, "w", options={"avoid_negative_ts": "disabled"})
        if codec not in self.container.supported_codecs:
            self.discard()
            if os.path.exists(temp):
                os.remove(temp)
            raise UserError(f"{path}: {codec} cannot be stored in {os.path.splitext(path)[1]}; use .mov or .mkv")
        if metadata:
            self.container.metadata["comment"] = json.dumps(metadata, sort_keys=True, default=str)

    def write(self, image: np.ndarray, alpha: np.ndarray | None, pts: int | None) -> None:
        if self.stream is None:
            self._start(image, alpha)
        if image.shape[:2] != (self.stream.height, self.stream.width):
            size = f"{image.shape[1]}x{image.shape[0]}"
            raise ValueError(f"{self.path}: frame is {size}, the video {self.stream.width}x{self.stream.height}")
        if not self.keep_pts:
            pts = 0 if self.previous_pts is None else self.previous_pts + 1
        elif pts is None:
            raise ValueError(f"{self.path}: frame has no pts; give the sink an fps to number frames instead")
        if self.previous_pts is not None and pts <= self.previous_pts:
            raise ValueError(f"{self.path}: pts {pts} does not follow {self.previous_pts}; frames must be in order")
        if self.pending:
            self._encode(*self.pending, duration=pts - self.previous_pts)
        if self.first_pts is None:
            self.first_pts = pts
            if self.audio and self.keep_pts and pts != self.like.pts[0]:
                self.audio.trim_start = pts * self.time_base  # a render that starts late gets no earlier audio
        self.pending = (image, alpha, pts)
        self.previous_pts = pts

    def finish(self, metadata: dict | None) -> None:
        image, alpha, pts = self.pending
        self._encode(image, alpha, pts, duration=self._last_duration(pts))
        self._mux_video(self.stream.encode())
        if self.audio:
            self.audio.finish(self._audio_end(pts))
        self.container.close()

    def discard(self) -> None:
        if self.audio:
            self.audio.close()
        try:
            self.container.close()
        except av.FFmpegError:
            pass  # an unfinished file; it is deleted next

    def _start(self, image: np.ndarray, alpha: np.ndarray | None) -> None:
        height, width = image.shape[:2]
        like = self.like
        self.keep_alpha = alpha is not None and self.codec in ("prores", "ffv1")
        pix_fmt = self.requested_pix_fmt or _default_pix_fmt(
            self.codec, width, height, self.keep_alpha, like.bit_depth if like else 8
        )
        _check_pix_fmt_fits(self.path, pix_fmt, width, height)
        stream = self.container.add_stream(ENCODERS[self.codec], rate=self.rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = self.time_base
        stream.codec_context.time_base = self.time_base
        # Without B-frames, MP4's decode-order durations are the frames' own: VFR timing survives exactly.
        no_b_frames = self.keep_pts and like.is_vfr
        stream.options = {**_encoder_options(self.codec, self.crf, pix_fmt, no_b_frames), **self.codec_options}
        stream.codec_context.thread_count = self.threads
        stream.codec_context.thread_type = "AUTO"  # frame threads where the encoder has them, else slices
        if self.codec == "hevc":
            stream.codec_context.codec_tag = "hvc1"  # Apple players refuse the default hev1 tag
        self.colour = _colour_tags(like, pix_fmt)
        for name, value in self.colour.items():
            setattr(stream.codec_context, name, value)
        if like and like.rotation:
            stream.set_display_rotation(like.rotation)
        if like and like.sample_aspect_ratio:
            stream.codec_context.sample_aspect_ratio = like.sample_aspect_ratio
        self.stream = stream
        if self.audio:
            self.audio.add_streams_to(self.container, mp4=self.path.lower().endswith((".mp4", ".m4v")))

    def _encode(self, image: np.ndarray, alpha: np.ndarray | None, pts: int, duration: int) -> None:
        if self.keep_alpha:
            if alpha is None:
                alpha = np.full(image.shape[:2], 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(np.dstack((image, alpha)), format="rgba")
        else:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame = frame.reformat(
            format=self.stream.pix_fmt,
            dst_colorspace=RESAMPLE_COLORSPACES.get(self.colour.get("colorspace")),
            dst_color_range=self.colour.get("color_range") or None,
        )
        if self.keep_alpha and (planar := alpha_plane(frame)):
            view, full_scale = planar
            view[:] = np.round(alpha * (full_scale / 255))
        for name, value in self.colour.items():
            setattr(frame, name, value)
        frame.pts = pts
        frame.time_base = self.time_base
        frame.duration = duration
        self.durations[pts] = duration
        self._mux_video(self.stream.encode(frame))
        if self.audio:
            self.audio.copy_until(pts * self.time_base)

    def _mux_video(self, packets) -> None:
        for packet in packets:
            # Encoders drop frame durations; the muxer needs them for the last frame and for Matroska blocks.
            packet.duration = self.durations.pop(packet.pts, packet.duration)
            self.container.mux(packet)

    def _last_duration(self, pts: int) -> int:
        if self.end_pts is not None and self.end_pts > pts:
            return self.end_pts - pts
        if self.keep_pts and pts in self.like.pts:
            return self.like.frame_end_pts(self.like.pts.index(pts)) - pts
        return 1 if not self.keep_pts else max(1, round(1 / (self.rate * self.time_base)))

    def _audio_end(self, last_pts: int) -> Fraction | None:
        """Where audio stops: under the last frame for a partial render; a full render keeps all of it."""
        if not self.keep_pts or last_pts == self.like.pts[-1]:
            return None
        if self.end_pts is not None and self.end_pts >= self.like.end_pts:
            return None
        return (last_pts + self._last_duration(last_pts)) * self.time_base


def _default_pix_fmt(codec: str, width: int, height: int, alpha: bool, bit_depth: int) -> str:
    if codec == "ffv1":
        return "bgra" if alpha else "bgr0"  # RGB storage: lossless for our RGB frames
    if codec == "prores":
        # 4:2:2 needs an even width; 4444 takes any size and carries alpha.
        return "yuva444p10le" if alpha else ("yuv444p10le" if width % 2 else "yuv422p10le")
    deep = bit_depth > 8
    if width % 2 or height % 2:
        return "yuv444p10le" if deep else "yuv444p"  # 4:2:0 cannot hold an odd width or height
    return "yuv420p10le" if deep else "yuv420p"


def _check_pix_fmt_fits(path: str, pix_fmt: str, width: int, height: int) -> None:
    needs_even_width = "420" in pix_fmt or "422" in pix_fmt
    needs_even_height = "420" in pix_fmt
    if (needs_even_width and width % 2) or (needs_even_height and height % 2):
        raise UserError(f"{path}: pix_fmt {pix_fmt} cannot hold {width}x{height} (odd size); use a 4:4:4 format")


def _encoder_options(codec: str, crf: int, pix_fmt: str, no_b_frames: bool) -> dict[str, str]:
    params = "log-level=error" + (":bframes=0" if no_b_frames else "")
    if codec == "h264":
        return {"crf": str(crf), "preset": "medium", "x264-params": params}
    if codec == "hevc":
        return {"crf": str(crf), "preset": "medium", "x265-params": params}
    if codec == "prores":
        # profile 4 is 4444 (needed for 4:4:4 and alpha), 3 is 422 HQ; vendor apl0 for Apple decoders.
        return {"profile": "4" if "444" in pix_fmt else "3", "vendor": "apl0"}
    return {}  # ffv1 is lossless; crf does not apply


def _colour_tags(like, pix_fmt: str) -> dict[str, int]:
    """The source's colour tags, minus the YUV matrix and range when the output is stored as RGB."""
    if like is None:
        return {}
    tags = {"color_primaries": like.color_primaries, "color_trc": like.color_trc}
    if pix_fmt not in RGB_PIX_FMTS:
        tags.update(colorspace=like.colorspace, color_range=like.color_range)
    return tags


class AudioPassthrough:
    """Copies every audio stream of a file into the output, interleaved with the video as it is written."""

    def __init__(self, path: str):
        name = os.path.basename(path)
        try:
            self.input = av.open(path)
        except av.FFmpegError as error:
            raise UserError(f"{name}: cannot read its audio ({str(error).splitlines()[0]})") from None
        self.routes = {}  # input stream index -> (output stream, whether it is transcoded to AAC)
        self.pending = None
        self.packets = iter(())
        self.trim_start = None

    def add_streams_to(self, output, mp4: bool) -> None:
        allowed = output.supported_codecs & MP4_AUDIO_CODECS if mp4 else output.supported_codecs
        for stream in self.input.streams.audio:
            if stream.codec_context.name in allowed:
                self.routes[stream.index] = (output.add_stream_from_template(stream), False)
            else:
                source = stream.codec_context
                encoder = output.add_stream("aac", rate=source.sample_rate, layout=source.layout)
                self.routes[stream.index] = (encoder, True)
        if self.routes:
            self.packets = self.input.demux(*self.input.streams.audio)

    def copy_until(self, until_s: Fraction | None, end_s: Fraction | None = None) -> None:
        """Mux the audio packets that start before `until_s` (all if None), dropping those from `end_s` on."""
        while True:
            packet = self.pending or next(self.packets, None)
            self.pending = None
            if packet is None:
                return
            if not packet.size or packet.dts is None:
                continue  # demuxer flush markers carry no data
            start = (packet.pts if packet.pts is not None else packet.dts) * packet.time_base
            if until_s is not None and start >= until_s:
                self.pending = packet
                return
            if end_s is not None and start >= end_s:
                continue
            if self.trim_start is not None and start + (packet.duration or 0) * packet.time_base <= self.trim_start:
                continue
            self._mux(packet)

    def finish(self, end_s: Fraction | None) -> None:
        self.copy_until(None, end_s)
        for output_stream, transcoded in self.routes.values():
            if transcoded:
                for packet in output_stream.encode():
                    output_stream.container.mux(packet)
        self.close()

    def close(self) -> None:
        self.input.close()

    def _mux(self, packet) -> None:
        output_stream, transcoded = self.routes[packet.stream.index]
        if not transcoded:
            packet.stream = output_stream
            output_stream.container.mux(packet)
            return
        for frame in packet.decode():
            for encoded in output_stream.encode(frame):
                output_stream.container.mux(encoded)

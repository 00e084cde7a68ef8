"""The in-process pipeline (no Ray): a video file in, a stylized video out, in constant memory.

    FrameReader thread ─► queue ─► ChunkStylizer ─► queue ─► FrameWriter thread
    (decodes the selected    (a ClipStylizer per chunk; lead-in      (FrameSink: encodes in order,
     frames)                   frames warm it up and are dropped)      audio, timestamps, metadata)

`run_local(job)` runs a `StylizeJob` in this process; pipeline/ray_runner.py runs the same job with the same plain
classes (`FrameDecoder`, `ChunkStylizer`) inside Ray actors and gives the same frames bit for bit.

Everything the user can get wrong is checked before any frame is stylized (`open_render`): the input decodes, the
selection holds frames, the style is an image, the output is writable and is not the input. From the moment the
sink exists (a hidden temporary file beside the output) every failure aborts it, so the output path is either
the finished file or untouched.

Frames keep their source timestamps: the output has the source's frame rate as an exact fraction, its VFR timing
and its audio in sync. A partial selection keeps the audio under the selected frames (the sink trims it);
with `every_nth` each kept frame is shown for the n source frames it stands for, so the clip plays in real time
at 1/n of the frame rate and its audio stays in sync. Only an image-sequence output drops the audio.
"""
from __future__ import annotations

import ctypes
import os
import platform
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import chain, islice
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load_model
from models.errors import UserError
from pipeline.api import resolve_device
from pipeline.images import contact_sheet, save_png
from pipeline.sink import VIDEO_EXTENSIONS, FrameSink
from pipeline.source import Frame, FrameSource, open_source
from pipeline.styles import StyleCodes, parse_style
from pipeline.stylizer import ClipStylizer, StylizerConfig
from pipeline.temporal import TemporalConfig

DECODE_QUEUE_FRAMES = 8    # decoded frames waiting for the stylizer: enough to hide decode jitter, no more
DEFAULT_CHUNK_FRAMES = 64  # kept frames per chunk where a runner splits the clip (Ray); the lead-in is the overhead
# decord's VideoReader keeps decoding ahead into an unbounded queue while its consumer is slower than it, as a
# stylizer always is: one `next()` then 3 s of waiting grew a 1000-frame 640x272 clip's reader to 584 MB, and a
# local run's peak RSS went 547 -> 1034 MB from 100 to 1000 frames (PyAV: 489 -> 495 MB). Both runners decode
# with the same backend, so that their frames agree bit for bit.
DECODE_BACKEND = "pyav"
M_ARENA_MAX, MALLOC_ARENAS = -8, 2  # glibc's mallopt parameter number, and the cap (see limit_malloc_arenas)


@dataclass
class StylizeJob:
    """One stylization: what to read, how to stylize it, where to write it.

    `temporal_strength` 0 turns temporal smoothing off. `chunk_frames` 0 lets the runner choose (one piece for the
    local runner, DEFAULT_CHUNK_FRAMES for Ray); chunked output equals one-piece output bit for bit.
    `style` is an image path, or anything `pipeline.styles.parse_style` takes (a blend, a schedule).
    """

    input: str
    style: str
    output: str
    weights: str | None = None        # None: the bundled weights
    working_size: int = 512           # short side the model runs at; 0 = the source size
    start: int = 0
    end: int | None = None            # exclusive
    every_nth: int = 1
    max_frames: int | None = None
    codec: str | None = None          # None: from the output's extension (h264 for video files, png for folders)
    crf: int = 18
    pix_fmt: str | None = None        # None: the sink picks one that fits the size, alpha and bit depth
    seed: int = 0
    audio: bool = True
    overwrite: bool = False
    temporal_strength: float = 0.8
    flow_preset: str = TemporalConfig.flow_preset
    style_strength: float = 1.0       # 0 = the content, 1 = full style (models/style_controls.py)
    preserve_color: bool = False      # keep the source's colours, take the style's texture
    batch_size: int = 4
    chunk_frames: int = 0
    device: str = "auto"

    def __post_init__(self):
        self.input, self.output = os.fspath(self.input), os.fspath(self.output)
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 0:
            raise UserError(f"chunk_frames: must be a non-negative integer (0 = the runner's choice), "
                            f"got {self.chunk_frames!r}")
        if not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise UserError(f"crf: must be an integer from 0 (best) to 51, got {self.crf!r}")

    def stylizer_config(self) -> StylizerConfig:
        temporal = TemporalConfig(strength=float(self.temporal_strength), flow_preset=self.flow_preset)
        return StylizerConfig(working_size=self.working_size, batch_size=self.batch_size, seed=self.seed,
                              temporal=temporal, temporal_enabled=self.temporal_strength > 0,
                              strength=float(self.style_strength), preserve_color=bool(self.preserve_color))


@dataclass
class Summary:
    output: str
    frames: int
    seconds: float          # wall time of the whole run
    render_seconds: float   # from the first frame asked for to the output closed: no probing, model or Ray start
    runner: str
    audio: str              # what happened to the audio, in words

    @property
    def fps(self) -> float:
        return self.frames / self.render_seconds if self.render_seconds > 0 else 0.0

    def line(self) -> str:
        return (f"wrote {self.output}: {self.frames} frames at {self.fps:.2f} fps, {self.seconds:.1f} s wall "
                f"({self.runner} runner; audio {self.audio})")


class Chunk(NamedTuple):
    """Selected frame indices: `lead_in` warms a fresh stylizer up and is dropped, `kept` is written."""

    lead_in: Sequence[int]
    kept: Sequence[int]

    @property
    def indices(self) -> Sequence[int]:
        """Lead-in then kept indices; one range when both are ranges (they follow each other)."""
        if isinstance(self.lead_in, range) and isinstance(self.kept, range):
            first = self.lead_in.start if len(self.lead_in) else self.kept.start
            return range(first, self.kept.stop, self.kept.step)
        return [*self.lead_in, *self.kept]


def plan_chunks(selected: Sequence[int], chunk_frames: int, lead_in: int) -> list[Chunk]:
    """Split the selected frames into chunks of at most `chunk_frames` kept frames.

    Each chunk's lead-in is the (up to) `lead_in` selected frames just before it, so that chunks count in the
    *selected* sequence: with every_nth > 1 the stylizer sees the selected frames as consecutive frames.

    >>> plan_chunks(range(0, 20, 2), chunk_frames=4, lead_in=2)
    [Chunk(lead_in=range(0, 0, 2), kept=range(0, 8, 2)), Chunk(lead_in=range(4, 8, 2), kept=range(8, 16, 2)),
     Chunk(lead_in=range(12, 16, 2), kept=range(16, 20, 2))]
    """
    if chunk_frames < 1 or lead_in < 0:
        raise ValueError(f"chunk_frames must be >= 1 and lead_in >= 0, got {chunk_frames} and {lead_in}")
    return [Chunk(selected[max(0, first - lead_in):first], selected[first:first + chunk_frames])
            for first in range(0, len(selected), chunk_frames)]


# ----------------------------------------------------------------------------------------------------------
# Validating a job: everything that can be refused is refused here, before the first frame is stylized


@dataclass
class Render:
    """A checked job: its source, selection, parsed style and settings, and the sink it writes to."""

    job: StylizeJob
    source: FrameSource
    selection: range
    style: object           # StyleImage | StyleBlend | StyleSchedule
    config: StylizerConfig
    audio: str
    sink: FrameSink | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.source.info.height, self.source.info.width

    def chunks(self, default_chunk_frames: int) -> list[Chunk]:
        size = self.job.chunk_frames or default_chunk_frames or len(self.selection)
        return plan_chunks(self.selection, size, self.config.lead_in)

    def summary(self, runner: str, render_started: float) -> Summary:
        now = time.perf_counter()
        return Summary(self.job.output, self.sink.frames_written, now - self.started, now - render_started,
                       runner, self.audio)


def check_job(job: StylizeJob) -> Render:
    """Open the source and the style and check the settings; creates nothing."""
    started = time.perf_counter()
    source = open_source(job.input, backend=DECODE_BACKEND)
    selection = source.select(job.start, job.end, job.every_nth, job.max_frames)
    if len(selection) == 0:
        raise UserError(f"{job.input}: the selection (start={job.start}, end={job.end}, max_frames={job.max_frames}) "
                        f"holds no frames")
    style = parse_style(job.style, fps=source.info.fps)
    config = job.stylizer_config()
    return Render(job, source, selection, style, config, audio_plan(job, source), started=started)


def open_render(job: StylizeJob, runner: str) -> Render:
    """`check_job`, then open the sink (a hidden temporary file): from here on, failures must `sink.abort()`."""
    render = check_job(job)
    audio_from = job.input if render.audio == "kept" else None
    render.sink = FrameSink(job.output, like=render.source.info, codec=job.codec, crf=job.crf, pix_fmt=job.pix_fmt,
                            audio_from=audio_from, metadata=job_metadata(render, runner), overwrite=job.overwrite)
    return render


def audio_plan(job: StylizeJob, source: FrameSource) -> str:
    """'kept', or why the output has no audio."""
    if not source.info.has_audio:
        return "none (the source has none)"
    if not job.audio:
        return "off (--no-audio)"
    if not job.output.lower().endswith(VIDEO_EXTENSIONS):
        return "dropped (an image sequence has no audio track)"
    return "kept"


def job_metadata(render: Render, runner: str) -> dict:
    """The settings stored in the output (the container's comment tag, or metadata.json beside frames)."""
    job = asdict(render.job)
    job["weights"] = job["weights"] or "bundled"
    return {"mambast": {"job": job, "runner": runner, "stylizer": asdict(render.config),
                        "frames": {"selected": len(render.selection), "first": render.selection[0],
                                   "last": render.selection[-1], "every_nth": render.selection.step}}}


# ----------------------------------------------------------------------------------------------------------
# The stages, as plain classes (pipeline/ray_runner.py puts them into actors)


class FrameDecoder:
    """Decodes runs of selected frames from a source; the decode stage of the Ray runner."""

    def __init__(self, source: FrameSource):
        self.source = source

    def read(self, indices: Sequence[int]) -> list[Frame]:
        if isinstance(indices, range) and len(indices):
            return list(self.source.frames(indices.start, indices.stop, indices.step))
        return self.source.read(list(indices))


class FrameReader:
    """Decodes the selected frames on a background thread into a small bounded queue.

    Iterate it for the frames in order. A decode error is raised in the iterating thread; `close()` (or leaving
    the `with` block) stops the decoder and joins its thread, also when the consumer gives up early. The decoder
    (and any decord reader it opens) lives entirely in that one thread.
    """

    _END = object()

    def __init__(self, source: FrameSource, selection: range, depth: int = DECODE_QUEUE_FRAMES):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._decode, args=(source, selection), name="mambast-decode",
                                        daemon=True)
        self._thread.start()

    def _decode(self, source: FrameSource, selection: range) -> None:
        frames = iter(())
        try:
            frames = source.frames(selection.start, selection.stop, selection.step)
            for frame in frames:
                if not self._put(frame):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, who raises it
            self._put(error)
        finally:
            if hasattr(frames, "close"):
                frames.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FrameWriter:
    """Writes frames to a sink from a background thread, so that encoding overlaps stylizing (PyAV lets go of the
    GIL while it converts and encodes).

    `write` raises, in the caller, an error the writer thread met; `finish()` waits until every frame is written.
    The sink itself stays the caller's: `close()` or `abort()` it after `finish()` or after leaving the `with`
    block, which stops and joins the thread.
    """

    _END = object()

    def __init__(self, sink: FrameSink, depth: int = DECODE_QUEUE_FRAMES):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, args=(sink,), name="mambast-encode", daemon=True)
        self._thread.start()

    def _write(self, sink: FrameSink) -> None:
        try:
            while not self._stop.is_set():
                try:
                    frame = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if frame is self._END:
                    return
                sink.write(frame)
        except BaseException as error:  # raised again in the caller's thread
            self._error = error

    def write(self, frame) -> None:
        while True:
            if not self._thread.is_alive():
                raise self._error or RuntimeError("the encoder thread has stopped")
            try:
                self._queue.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.write(self._END)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class ChunkStylizer:
    """One model and one style, stylizing a clip chunk by chunk.

    Every chunk gets a fresh `ClipStylizer` (its temporal state starts empty; the style codes are shared), is fed
    its lead-in frames first and drops their outputs, and every model call gets exactly `batch_size` frames
    (`stylize`): chunked output is bit-identical to one-piece output. The stylized frames keep the source frames'
    index, pts and alpha.
    """

    def __init__(self, model, style, frame_shape: tuple[int, int], config: StylizerConfig):
        self.model = model
        self.style = style
        self.frame_shape = tuple(frame_shape)
        self.config = config
        self.codes = StyleCodes(model, seed=config.seed)

    @classmethod
    def load(cls, weights: str | None, style, frame_shape: tuple[int, int], config: StylizerConfig,
             device: str = "auto", threads: int | None = None) -> ChunkStylizer:
        if threads:
            torch.set_num_threads(threads)
        return cls(load_model(weights, device=resolve_device(device)), style, frame_shape, config)

    def __call__(self, chunk: Chunk, frames: list[Frame]) -> list[Frame]:
        """A whole chunk at once: `frames` are its lead-in then its kept frames; returns the kept ones."""
        if [f.index for f in frames] != list(chunk.indices):
            raise ValueError("frames do not match the chunk's lead-in and kept indices")
        return self.stylize(self.clip(chunk), frames)[len(chunk.lead_in):]

    def clip(self, chunk: Chunk) -> ClipStylizer:
        first = chunk.lead_in[0] if len(chunk.lead_in) else chunk.kept[0]
        return ClipStylizer(self.model, self.style, self.frame_shape, self.config, codes=self.codes,
                            start_frame=first)

    def stylize(self, clip: ClipStylizer, frames: list[Frame]) -> list[Frame]:
        """The frames through `clip`, in model calls of exactly `batch_size` frames.

        The model's numbers depend on the batch size (on CPU a batch of one differs from larger batches in the
        last bits), and chunks cut the clip into batches differently from a one-piece run: so a short last batch
        is padded with copies of its last frame, whose outputs are dropped. They come after every real frame, so
        the causal smoothers give the real frames the same outputs.
        """
        padding = -len(frames) % self.config.batch_size
        images = [f.image for f in frames] + [frames[-1].image] * padding
        indices = [f.index for f in frames] + [frames[-1].index] * padding  # the same style code as the last
        outputs = clip(images, indices)
        return [Frame(f.index, f.pts, image, f.alpha) for f, image in zip(frames, outputs)]

    def stream(self, frames: Iterator[Frame], chunks: list[Chunk]) -> Iterator[Frame]:
        """Chunks from one ordered stream of the selected frames, a batch at a time; memory stays flat.

        A chunk's lead-in frames are the last frames of the one before, kept in a short memory rather than decoded
        again. Batches start at each chunk's first lead-in frame, as in `__call__`, so both give the same batches.
        """
        lead_in = max((len(c.lead_in) for c in chunks), default=0)
        recent: deque[Frame] = deque(maxlen=max(lead_in, 1))
        for chunk in chunks:
            clip = self.clip(chunk)
            lead = list(recent)[len(recent) - len(chunk.lead_in):] if len(chunk.lead_in) else []
            if [f.index for f in lead] != list(chunk.lead_in):
                raise ValueError("a chunk's lead-in must be the frames just before it in the selected sequence")
            chunk_frames = chain(lead, _take(frames, chunk.kept, recent))
            position = 0
            while batch := list(islice(chunk_frames, self.config.batch_size)):
                for frame in self.stylize(clip, batch):
                    if position >= len(lead):
                        yield frame
                    position += 1


def _take(frames: Iterator[Frame], indices: Sequence[int], recent: deque) -> Iterator[Frame]:
    """The next frames of the stream, which must be `indices`; each is also remembered in `recent`."""
    for expected in indices:
        frame = next(frames, None)
        if frame is None or frame.index != expected:
            raise RuntimeError(f"the decoder gave frame {getattr(frame, 'index', None)}, expected {expected}")
        recent.append(frame)
        yield frame


# ----------------------------------------------------------------------------------------------------------
# Running a job


def progress_bar(total: int, enabled: bool = True, desc: str = "stylize") -> tqdm:
    """Frames done, frames/s and ETA on stderr; off when not `enabled` or with MAMBAST_QUIET=1."""
    quiet = os.environ.get("MAMBAST_QUIET", "") not in ("", "0")
    return tqdm(total=total, unit="frame", desc=desc, disable=quiet or not enabled, dynamic_ncols=True,
                smoothing=0.1)


def run_local(job: StylizeJob, progress: bool = True) -> Summary:
    """Stylize `job` in this process: decode thread → stylizer → encode thread."""
    limit_malloc_arenas()
    render = open_render(job, "local")
    try:
        stylizer = ChunkStylizer.load(job.weights, render.style, render.frame_shape, render.config, job.device)
        render_started = time.perf_counter()
        with (FrameReader(render.source, render.selection) as reader, FrameWriter(render.sink) as writer,
              progress_bar(len(render.selection), progress) as bar):
            for frame in stylizer.stream(iter(reader), render.chunks(default_chunk_frames=0)):
                writer.write(frame)
                bar.update(1)
            writer.finish()
        render.sink.close()
    except BaseException:
        render.sink.abort()
        raise
    return render.summary("local", render_started)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas for this process (a no-op with another C library).

    glibc gives threads arenas of their own, and frames allocated in one pipeline thread and freed in another
    leave them fragmented: a local run's peak RSS grew from 415 to 626 MB between 100 and 1000 frames of
    320x240. With two arenas it stays at 398 / 405 MB, at the same speed.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if platform.libc_ver()[0] == "glibc" else None
    if mallopt is not None:
        mallopt(M_ARENA_MAX, arenas)


def run_preview(job: StylizeJob, count: int, progress: bool = True) -> Summary:
    """Stylize `count` frames spread evenly over the selection and write a contact sheet (source | stylized).

    The frames are far apart, so each is stylized on its own (no temporal smoothing). `job.output` is a .png.
    """
    if count < 1:
        raise UserError(f"preview: needs at least 1 frame, got {count}")
    check_preview_output(job)
    render = check_job(replace(job, temporal_strength=0))
    picks = spread(render.selection, count)
    stylizer = ChunkStylizer.load(job.weights, render.style, render.frame_shape, render.config, job.device)
    render_started = time.perf_counter()
    clip = stylizer.clip(Chunk([], picks))  # temporal smoothing is off: frames do not affect each other
    frames = render.source.read(picks)
    rows, labels = [], []
    with progress_bar(len(picks), progress, desc="preview") as bar:
        for first in range(0, len(frames), render.config.batch_size):
            batch = frames[first:first + render.config.batch_size]
            for source, stylized in zip(batch, stylizer.stylize(clip, batch)):
                seconds = (source.pts - render.source.info.pts[0]) * render.source.info.time_base
                rows.append([source.image, stylized.image])
                labels.append([f"frame {source.index} ({float(seconds):.2f} s)", "stylized"])
                bar.update(1)
    save_png(job.output, contact_sheet(rows, labels))
    now = time.perf_counter()
    return Summary(job.output, len(picks), now - render.started, now - render_started, "preview",
                   "none (a contact sheet)")


def spread(selection: Sequence[int], count: int) -> list[int]:
    """`count` indices of `selection` spread evenly from its first to its last (all of them if fewer)."""
    n = len(selection)
    if count >= n:
        return list(selection)
    if count == 1:
        return [selection[n // 2]]
    return [selection[round(i * (n - 1) / (count - 1))] for i in range(count)]


def check_preview_output(job: StylizeJob) -> None:
    output = job.output
    if not output.lower().endswith(".png"):
        raise UserError(f"{output}: a preview is a contact sheet image; give a .png output")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise UserError(f"{output}: the folder {os.path.dirname(output) or folder} does not exist")
    for given in (job.input, job.style):
        if os.path.exists(given) and os.path.realpath(given) == os.path.realpath(output):
            raise UserError(f"{output}: this would overwrite the input {given}; choose another output")
    if os.path.lexists(output) and not job.overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")


def decode_frames(source: FrameSource, selection: range) -> list[np.ndarray]:
    """The selected frames as RGB arrays, in memory (for benchmarks and small tests)."""
    with FrameReader(source, selection) as reader:
        return [frame.image for frame in reader]

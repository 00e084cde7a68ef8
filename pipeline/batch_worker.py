"""The batch worker: one chunk task → one chunk file, on any node, the same bits however often it is retried.

    ChunkTask (clip, style spec, Settings, Chunk, chunk file path)
      │ decode_chunk (PyAV; the chunk's lead-in then kept frames)          on the stylizer's feeding thread
      │ ChunkStylizer.stylize (pipeline/chunks.py: lead-in outputs dropped)  its stages, a thread each
      ▼ FrameSink: the chunk file in the final codec, starting with a keyframe ──► ChunkDone (a small record)

Bit-identical results whatever the worker and however often a chunk is retried: workers pin their torch/OpenCV
thread count (the job's `threads`) and encoders get a fixed thread count (`encoder_threads`), so a retry on a
machine with another core count computes the same bits; every worker decodes with PyAV.

Chunks are encoded with the final codec and joined by copying packets (pipeline/batch_join.py). ISO-BMFF
(.mov/.mp4) rounds a file's start offset to the movie timescale (1/1000 s), so .mov chunks are written with
timestamps relative to their first frame and shifted at the join in the stream's own time base (an exact integer
shift); Matroska keeps only millisecond ticks, so FFV1 chunks (.mkv) keep the source's absolute timestamps, rounded
the same way as a one-piece file.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction

import av

from models.errors import UserError
from pipeline.chunks import DECODE_BACKEND, Chunk, ChunkStylizer, decode_chunk
from pipeline.settings import Settings
from pipeline.sink import FrameSink
from pipeline.source import FrameSource, VideoInfo, open_source
from pipeline.styles import parse_style

FAULT_ENV = "MAMBAST_FARM_FAULT"         # test hook, see FaultPlan


def chunk_format(codec: str) -> tuple[str, bool]:
    """(extension of the chunk files, whether their timestamps start at 0) for a codec; see the module docstring."""
    if codec == "ffv1":
        return ".mkv", False
    return ".mov", True


@dataclass(frozen=True)
class ChunkTask:
    item: int
    clip: str
    style: str               # a parse_style spec
    settings: Settings
    chunk: Chunk
    path: str                # the chunk file to write
    attempt: int = 1


@dataclass(frozen=True)
class ChunkDone:
    item: int
    index: int
    path: str
    frames: int
    bytes: int
    seconds: float
    attempt: int
    worker: str              # host:pid that rendered it
    node: str = ""           # the Ray node, filled in by the actor


@dataclass(frozen=True)
class FaultPlan:
    """Test hook (MAMBAST_FARM_FAULT), read by the driver and handed to every worker. ';'-separated:

    * `exit:ITEM:CHUNK`: the worker process exits (os._exit) halfway through that chunk, on its first attempt only;
    * `slow:SECONDS`: sleep that long after each kept frame (gives tests time to kill things mid-job).
    """

    exit_at: tuple[int, int] | None = None
    slow: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan:
        plan = cls()
        for part in filter(None, (p.strip() for p in (text or "").split(";"))):
            kind, _, rest = part.partition(":")
            try:
                if kind == "exit":
                    item, chunk = rest.split(":")
                    plan = dataclasses.replace(plan, exit_at=(int(item), int(chunk)))
                elif kind == "slow":
                    plan = dataclasses.replace(plan, slow=float(rest))
                else:
                    raise ValueError
            except ValueError:
                raise UserError(f"{FAULT_ENV}: {part!r} is not exit:ITEM:CHUNK or slow:SECONDS") from None
        return plan

    @classmethod
    def from_env(cls) -> FaultPlan:
        return cls.parse(os.environ.get(FAULT_ENV))


class ChunkRenderer:
    """Renders chunk tasks of any item with one ChunkStylizer: decode → stylize → encode one chunk file.

    Keeps small caches across chunks: the last sources opened (a probe demuxes the whole clip) and parsed styles
    (the ChunkStylizer keeps the style codes).
    """

    SOURCES_KEPT = 2
    STYLES_KEPT = 8

    def __init__(self, stylizer: ChunkStylizer, fault: FaultPlan | None = None):
        self.stylizer = stylizer
        self.fault = fault or FaultPlan()
        self._sources: OrderedDict[str, FrameSource] = OrderedDict()
        self._styles: OrderedDict[tuple[str, Fraction], object] = OrderedDict()

    def render(self, task: ChunkTask) -> ChunkDone:
        started = time.perf_counter()
        source = self._source(task.clip, task.settings.strict)
        info, chunk, settings = source.info, task.chunk, task.settings
        config = settings.stylizer_config()
        if len(chunk.lead_in) < min(config.lead_in, chunk.kept.start):
            raise ValueError(f"chunk {chunk.index}: lead-in {len(chunk.lead_in)} is shorter than the stylizer's "
                             f"{config.lead_in}")
        timing, shift = chunk_timing(info, chunk, relative=chunk_format(settings.video_codec)[1])
        sink = FrameSink(task.path, like=timing, codec=settings.video_codec, crf=settings.crf,
                         pix_fmt=settings.pix_fmt, overwrite=True, threads=settings.encoder_threads)
        try:
            frames = decode_chunk(source, chunk)  # decoded on the stylizer's feeding thread, ahead of the model
            style = self._style(task.style, info.fps)
            with closing(self.stylizer.stylize(chunk, frames, style, (info.height, info.width), config)) as stylized:
                for frame in stylized:  # encoded here while the stylizer's stages work on the next frames
                    sink.write(dataclasses.replace(frame, pts=frame.pts - shift))
                    self._fault_hook(task, sink.frames_written)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        frames = count_video_packets(task.path)
        if frames != chunk.frames:
            raise RuntimeError(f"{task.path}: holds {frames} frames, the chunk has {chunk.frames}")
        return ChunkDone(task.item, chunk.index, task.path, frames, os.path.getsize(task.path),
                         time.perf_counter() - started, task.attempt, f"{socket.gethostname()}:{os.getpid()}")

    def _fault_hook(self, task: ChunkTask, written: int) -> None:
        if self.fault.slow:
            time.sleep(self.fault.slow)
        if (self.fault.exit_at == (task.item, task.chunk.index) and task.attempt == 1
                and written == max(1, task.chunk.frames // 2)):
            os._exit(70)  # a crash mid-chunk: the partial chunk file stays behind under its temporary name

    def _source(self, path: str, strict: bool) -> FrameSource:
        return _least_recently_used(self._sources, (path, strict),
                                    lambda: open_source(path, backend=DECODE_BACKEND, strict=strict),
                                    self.SOURCES_KEPT)

    def _style(self, spec: str, fps: Fraction):
        return _least_recently_used(self._styles, (spec, fps), lambda: parse_style(spec, fps=fps), self.STYLES_KEPT)


def _least_recently_used(cache: OrderedDict, key, make, kept: int):
    """`cache[key]`, made with `make()` when missing; keeps the `kept` most recently used entries."""
    if key not in cache:
        cache[key] = make()
        while len(cache) > kept:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def chunk_timing(info: VideoInfo, chunk: Chunk, relative: bool) -> tuple[VideoInfo, int]:
    """The VideoInfo a chunk's sink copies (its frames' timestamps and durations), and the shift applied to pts."""
    start, end = chunk.kept.start, chunk.kept.stop
    shift = info.pts[start] if relative else 0
    pts = [p - shift for p in info.pts[start:end]]
    end_pts = info.frame_end_pts(end - 1) - shift
    return dataclasses.replace(info, pts=pts, end_pts=end_pts, num_frames=chunk.frames,
                               duration_s=float((end_pts - pts[0]) * info.time_base)), shift


def count_video_packets(path: str) -> int:
    """Frames in a file's video stream, counted packet by packet (no decoding)."""
    with av.open(path) as container:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)

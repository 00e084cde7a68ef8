"""The chunk engine: a clip cut into chunks that any worker stylizes, and the worker that stylizes them.

    selected frames (+ shot cuts: scan_clip) ──plan_chunks──► Chunks (kept frames; the lead-in frames just before them)
                                       │ per chunk, in any process: decode_chunk (lead-in + kept Frames)
                                       ▼
    ChunkStylizer.stylize(chunk, frames, style, frame_shape, config) ──► the kept Frames, stylized
        frames ─► prepare ─► motion ─► model ─► post ─► (download) ─► kept Frames     the ClipStylizer's stages,
                  a thread each, a couple of batches queued between them              pipeline/stylizer.py

A chunk gets a fresh `ClipStylizer` (its temporal state starts empty; style codes are cached per seed across
chunks) that starts at the chunk's first lead-in frame and whose lead-in outputs are dropped; frames go to the model
`batch_size` at a time from that first frame. The smoothers have a finite memory (pipeline/temporal.py), so a
chunk's kept frames equal those of a one-piece run bit for bit, whichever worker runs it and however often.

The stages run pipelined (StylizerConfig.pipelined): the frames are pulled from the caller's iterator by the first
stage's feeding thread (so a lazy decoder decodes there, ahead of the model), flow and post-processing overlap the
model, and the caller gets the kept frames in order while it encodes. Every runner and actor drives this engine,
so every one of them gets the overlap; its threads are joined when the chunk is done or given up.

Everyone drives this one engine: the local runner (pipeline/local_runner.py, its chunks from one decoded stream),
`stylize --runner ray` (pipeline/ray_clip.py, frames sent to and from Ray actors) and `batch`
(pipeline/batch_worker.py, each chunk decoded from the clip and encoded to a chunk file). The worker is plain Python;
pipeline/stylizer_actor.py is the one Ray actor around it.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import cv2
import torch

from models.checkpoint import load_model
from pipeline.api import resolve_device
from pipeline.shots import DEFAULT_THRESHOLD, ShotDetector
from pipeline.source import Frame, FrameSource, open_source
from pipeline.styles import StyleCodes
from pipeline.stylizer import ClipStylizer, StylizerConfig

DECODE_BACKEND = "pyav"  # every runner and worker decodes with PyAV: FFmpeg's decode is bit-exact, decord's may
# differ by one level, and decord's reader decodes ahead into an unbounded queue (584 MB for a 1000-frame clip)


@dataclass(frozen=True)
class Chunk:
    """Selected frames `kept` are written; the `lead_in` selected frames just before them warm a fresh stylizer
    up and are dropped. Both are ranges of clip frame indices with the selection's step."""

    index: int
    lead_in: range
    kept: range

    @property
    def frames(self) -> int:
        return len(self.kept)

    @property
    def first(self) -> int:
        """Clip index of the chunk's first frame (its first lead-in frame, if it has any)."""
        return self.lead_in.start if len(self.lead_in) else self.kept.start

    @property
    def indices(self) -> range:
        """Lead-in then kept indices."""
        return range(self.first, self.kept.stop, self.kept.step)

    def to_list(self) -> list[int]:
        """[index, first, start, stop, step]: how a manifest stores it (`from_list` reads it back)."""
        return [self.index, self.first, self.kept.start, self.kept.stop, self.kept.step]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Chunk:
        index, first, start, stop, step = values
        return cls(index, range(first, start, step), range(start, stop, step))


def plan_chunks(selected: range, cuts: Sequence[int], chunk_frames: int, lead_in: int) -> list[Chunk]:
    """Split the selected frames at shot cuts into chunks of at most `chunk_frames` kept frames.

    Chunks count in the *selected* sequence (with every_nth > 1 the stylizer sees the selected frames as consecutive).
    `cuts` are clip indices that start a new shot. Shots longer than `chunk_frames` are cut into near-equal pieces,
    then consecutive pieces share a chunk while they fit (no tiny chunks for short shots): every chunk ends at a
    shot cut or, inside a long shot, at an even split point. Each chunk's lead-in is the (up to) `lead_in` selected
    frames just before it.

    >>> [(c.kept.start, c.kept.stop, len(c.lead_in)) for c in plan_chunks(range(100), (30, 40), 25, 8)]
    [(0, 15, 0), (15, 40, 8), (40, 60, 8), (60, 80, 8), (80, 100, 8)]
    """
    if chunk_frames < 1 or lead_in < 0:
        raise ValueError(f"chunk_frames must be >= 1 and lead_in >= 0, got {chunk_frames} and {lead_in}")
    count = len(selected)
    positions = sorted({bisect_left(selected, cut) for cut in cuts})  # where each shot starts in the selection
    bounds = [0, *(p for p in positions if 0 < p < count), count] if count else []
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        parts = -(-(end - start) // chunk_frames)
        edges = [start + round(k * (end - start) / parts) for k in range(parts + 1)]
        pieces.extend(zip(edges, edges[1:]))
    spans: list[tuple[int, int]] = []
    for start, end in pieces:
        if spans and end - spans[-1][0] <= chunk_frames:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return [Chunk(i, selected[max(0, start - lead_in):start], selected[start:end])
            for i, (start, end) in enumerate(spans)]


@dataclass(frozen=True)
class ClipPlan:
    frames: int
    cuts: tuple[int, ...]   # frames that start a new shot (frame 0 is not listed)
    damage: str | None = None  # what a damaged clip is missing (read anyway: not strict)


def scan_clip(path: str, shot_threshold: float = DEFAULT_THRESHOLD, strict: bool = True) -> ClipPlan:
    """Count the clip's frames and find its shot cuts (one decode pass, one frame in memory at a time)."""
    source = open_source(path, backend=DECODE_BACKEND, strict=strict)
    cuts = ShotDetector(shot_threshold).find_cuts(frame.image for frame in source.frames())
    return ClipPlan(source.info.num_frames, tuple(cuts), source.info.damage)


def decode_chunk(source: FrameSource, chunk: Chunk) -> Iterator[Frame]:
    """The chunk's frames, lead-in first, decoded from the source."""
    return source.frames(chunk.first, chunk.kept.stop, chunk.kept.step)


def chunks_from_stream(frames: Iterator[Frame], chunks: Sequence[Chunk]) -> Iterator[tuple[Chunk, Iterator[Frame]]]:
    """Each chunk with its frames, from one ordered stream of the selected frames (memory stays flat).

    A chunk's lead-in frames are the last frames of the one before, kept in a short memory rather than decoded
    again. Consume each chunk's frames before asking for the next chunk.
    """
    recent: deque[Frame] = deque(maxlen=max((len(c.lead_in) for c in chunks), default=0) or 1)

    def kept(chunk: Chunk) -> Iterator[Frame]:
        for expected in chunk.kept:
            frame = next(frames, None)
            if frame is None or frame.index != expected:
                raise RuntimeError(f"the decoder gave frame {getattr(frame, 'index', None)}, expected {expected}")
            recent.append(frame)
            yield frame

    for chunk in chunks:
        lead = list(recent)[len(recent) - len(chunk.lead_in):] if len(chunk.lead_in) else []
        if [f.index for f in lead] != list(chunk.lead_in):
            raise ValueError("a chunk's lead-in must be the frames just before it in the selected sequence")
        yield chunk, chain(lead, kept(chunk))


def pin_threads(threads: int) -> None:
    """The same thread count on every worker: CPU float reductions then add up in the same order everywhere."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already set once in this process; it does not change results
    cv2.setNumThreads(threads)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class ChunkStylizer:
    """One model, stylizing chunks of any clip in any style: a chunk's Frames in, its kept Frames out.

    The stylized Frames keep the source frames' index, pts and alpha.
    """

    def __init__(self, model):
        self.model = model
        self._codes: dict[int, StyleCodes] = {}  # per seed: style codes shared by every chunk

    @classmethod
    def load(cls, weights: str | None, device: str = "auto", threads: int | None = None) -> ChunkStylizer:
        """The model from `weights` (None: the bundled ones); `threads` pins this process's thread counts."""
        if threads:
            pin_threads(threads)
        return cls(load_model(weights, device=resolve_device(device)))

    def codes(self, seed: int) -> StyleCodes:
        if seed not in self._codes:
            self._codes[seed] = StyleCodes(self.model, seed=seed)
        return self._codes[seed]

    def clip(self, style, frame_shape: tuple[int, int], config: StylizerConfig, start_frame: int) -> ClipStylizer:
        """A fresh ClipStylizer (empty temporal state) from clip frame `start_frame` on."""
        return ClipStylizer(self.model, style, frame_shape, config, codes=self.codes(config.seed),
                            start_frame=start_frame)

    def stylize(self, chunk: Chunk, frames: Iterable[Frame], style, frame_shape: tuple[int, int],
                config: StylizerConfig) -> Iterator[Frame]:
        """The chunk's kept frames, stylized; `frames` are its lead-in then its kept frames, in order.

        The frames go through the ClipStylizer's stages (pipelined unless `config.pipelined` is off), read from
        `frames` as the first stage asks for them. Close the iterator when leaving it early (contextlib.closing):
        that stops the stage threads.
        """
        clip = self.clip(style, frame_shape, config, chunk.first)
        for frame in clip.stylize_stream(checked_frames(chunk, frames)):
            if frame.index >= chunk.kept.start:
                yield frame


def checked_frames(chunk: Chunk, frames: Iterable[Frame]) -> Iterator[Frame]:
    """`frames`, checked to be the chunk's lead-in then kept frames, no more and no fewer."""
    expected = iter(chunk.indices)
    for frame in frames:
        if frame.index != next(expected, None):
            raise ValueError(f"chunk {chunk.index}: frames do not match its lead-in and kept indices")
        yield frame
    if next(expected, None) is not None:
        raise ValueError(f"chunk {chunk.index}: fewer frames than its lead-in and kept indices")

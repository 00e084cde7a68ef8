"""The local runner (no Ray): a video file in, a stylized video out, in constant memory.

    FrameReader thread ─► queue ─► ChunkStylizer, chunk by chunk ─────────────► queue ─► FrameWriter thread
    (decodes the selected    (pipeline/chunks.py; one chunk unless chunk_frames      (FrameSink: encodes in order,
     frames)                   is set; lead-ins dropped)                             audio, timestamps, metadata)
                               prepare ─► motion ─► model ─► post ─► (download)
                               the stylizer's stages, a thread each (pipelined),
                               a couple of batches queued between them

Every stage works at once on its own batch or frame; `pipelined: false` runs the stylizer's stages one after another
instead (the same frames, bit for bit). The overlap pays where cores would otherwise idle: beside a GPU, or on a
quiet CPU. On the shared, busy 2-core development box (1080p, working size 512, smoothing on, bundled weights, 2
torch threads, runs alternated) the pipelined runner reached 1.3-2.5x the serial fps (median 2.0), but mostly
because its model runs on a thread of its own: libgomp, with more OpenMP threads than cores, then stops
spin-waiting, which on a busy machine costs a serial run 4-6x the CPU it needs (7-13 s per frame instead of ~2).
With OMP_WAIT_POLICY=PASSIVE both modes took ~2 s of CPU per frame and, the cores being taken by other work, about
the same time (pipelined 0.8-0.9x serial).

`run_local(job)` runs a `StylizeJob` in this process; pipeline/ray_clip.py runs the same job's chunks on Ray actors
with the same ChunkStylizer and gives the same frames bit for bit. `run_preview` writes a contact sheet instead.
"""
from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from models.errors import UserError
from pipeline.chunks import ChunkStylizer, chunks_from_stream
from pipeline.frame_threads import FrameReader, FrameWriter
from pipeline.images import contact_sheet, save_png
from pipeline.source import FrameSource
from pipeline.styles import images_at
from pipeline.stylize_job import StylizeJob, Summary, check_job, open_render, tune

M_ARENA_MAX, MALLOC_ARENAS = -8, 2  # glibc's mallopt parameter number, and the cap (see limit_malloc_arenas)


def progress_bar(total: int, enabled: bool = True, desc: str = "stylize", unit: str = "frame") -> tqdm:
    """Units done, units/s and ETA on stderr; off when not `enabled` or with MAMBAST_QUIET=1."""
    quiet = os.environ.get("MAMBAST_QUIET", "") not in ("", "0")
    return tqdm(total=total, unit=unit, desc=desc, disable=quiet or not enabled, dynamic_ncols=True,
                smoothing=0.1)


def run_local(job: StylizeJob, progress: bool = True) -> Summary:
    """Stylize `job` in this process: decode thread → stylizer → encode thread."""
    limit_malloc_arenas()
    render = open_render(job, "local")
    try:
        stylizer = ChunkStylizer.load(render.weights, job.device)
        render_started = time.perf_counter()
        with (FrameReader(render.source, render.selection) as reader, FrameWriter(render.sink) as writer,
              progress_bar(len(render.selection), progress) as bar):
            for chunk, frames in chunks_from_stream(iter(reader), render.chunks(default_chunk_frames=0)):
                stylized = stylizer.stylize(chunk, frames, render.style, render.frame_shape, render.config)
                with closing(stylized):  # a failed write stops the stage threads before the reader stops
                    for frame in stylized:
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
    """Stylize `count` frames spread evenly over the selection and write a contact sheet: source | stylized, with
    the style beside the first row and beside any row where it changed (the heaviest image of a blend or of a
    schedule's morph, with its share).

    The frames are far apart, so each is stylized on its own (no temporal smoothing). `job.output` is a .png.
    """
    if count < 1:
        raise UserError(f"preview: needs at least 1 frame, got {count}")
    check_preview_output(job)
    render = check_job(replace(job, settings=replace(job.settings, temporal_strength=0)))
    tune(render)
    picks = spread(render.selection, count)
    stylizer = ChunkStylizer.load(render.weights, job.device)
    render_started = time.perf_counter()
    # temporal smoothing is off: frames do not affect each other, however far apart
    clip = stylizer.clip(render.style, render.frame_shape, render.config, start_frame=picks[0])
    frames = render.source.read(picks)
    rows, labels, shown_style = [], [], None
    with progress_bar(len(picks), progress, desc="preview") as bar:
        for first in range(0, len(frames), render.config.batch_size):
            batch = frames[first:first + render.config.batch_size]
            for source, stylized in zip(batch, clip.stylize_frames(batch)):
                seconds = (source.pts - render.source.info.pts[0]) * render.source.info.time_base
                rows.append([source.image, stylized.image])
                labels.append([f"frame {source.index} ({float(seconds):.2f} s)", "stylized"])
                style, weight = images_at(render.style, source.index)[0]
                if (style.key, weight) != shown_style:  # the painting once, and again where a schedule changes it
                    rows[-1].append(style.image)
                    labels[-1].append(style.name if weight == 1.0 else f"{style.name} {weight:.0%}")
                    shown_style = (style.key, weight)
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

"""Joining a batch item: its chunk files' packets copied, in order, into the output, with the clip's audio.

    chunk files (pipeline/batch_worker.py) ──join_chunks──► the output: packets copied, timestamps shifted
                                                             exactly, the source's audio remuxed once, written
                                                             under a hidden name and renamed into place
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import av

from models.errors import UserError
from pipeline.batch_worker import chunk_format
from pipeline.chunks import DECODE_BACKEND
from pipeline.sink import AudioPassthrough
from pipeline.source import open_source


def join_chunks(chunks: list[tuple[str, int]], output: str, clip: str, codec: str, audio: bool,
                expected_frames: int, metadata: dict | None = None, strict: bool = True,
                overwrite: bool = True) -> int:
    """Copy the chunks' packets, in order, into `output`, with the clip's audio remuxed once; returns the frames.

    `chunks` holds (chunk file, clip index of its first kept frame). Written under a hidden name beside `output`
    and renamed onto it only when complete; without `overwrite` only if nothing is at `output` at that moment.
    """
    info = open_source(clip, backend=DECODE_BACKEND, strict=strict).info
    relative = chunk_format(codec)[1]
    extension = os.path.splitext(output)[1].lower()
    folder, name = os.path.split(output)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.join{extension}")
    passthrough = AudioPassthrough(clip) if audio and info.has_audio else None
    container = av.open(temp, "w", options={"avoid_negative_ts": "disabled"})
    try:
        with av.open(chunks[0][0]) as first:
            template = first.streams.video[0]
            stream = container.add_stream_from_template(template)
            extradata = template.codec_context.extradata
        stream.codec_context.framerate = info.fps
        if codec == "hevc" and extension in (".mp4", ".m4v", ".mov"):
            stream.codec_tag = "hvc1"  # as the sink tags it: Apple players refuse hev1
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        if metadata:
            container.metadata["comment"] = json.dumps(metadata, sort_keys=True, default=str)
        if passthrough:
            passthrough.add_streams_to(container, mp4=extension in (".mp4", ".m4v"))
        written = 0
        for path, start in chunks:
            shift = info.pts[start] if relative else 0
            written += _copy_chunk(path, shift, info.time_base, extradata, stream, container, passthrough)
        if written != expected_frames:
            raise RuntimeError(f"{output}: joined {written} frames, expected {expected_frames}")
        if passthrough:
            passthrough.finish(None)
        container.close()
        if overwrite:
            os.replace(temp, output)
        else:
            try:
                os.link(temp, output)  # atomic: fails if another run has put a file there since
            except FileExistsError:
                raise UserError(f"{output}: already exists (written by another run meanwhile); "
                                f"set overwrite: true to replace it") from None
            os.remove(temp)
    except BaseException:
        if passthrough:
            passthrough.close()
        try:
            container.close()
        except av.FFmpegError:
            pass
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return written


def _copy_chunk(path: str, shift: int, clip_time_base: Fraction, extradata, stream, container, passthrough) -> int:
    count = 0
    with av.open(path) as chunk:
        source = chunk.streams.video[0]
        if source.codec_context.extradata != extradata:
            raise RuntimeError(f"{path}: encoded with other codec parameters than the first chunk "
                               f"(different FFmpeg/x264 builds on the workers?)")
        ticks = shift * clip_time_base / source.time_base
        if ticks.denominator != 1:
            raise RuntimeError(f"{path}: time base {source.time_base} cannot express the shift {shift} exactly")
        for packet in chunk.demux(source):
            if not packet.size:
                continue
            if count == 0 and not packet.is_keyframe:
                raise RuntimeError(f"{path}: does not start with a keyframe; it cannot be joined by stream copy")
            packet.pts += int(ticks)
            if packet.dts is not None:
                packet.dts += int(ticks)
            if passthrough:
                passthrough.copy_until((packet.dts if packet.dts is not None else packet.pts) * source.time_base)
            packet.stream = stream
            container.mux(packet)
            count += 1
    return count

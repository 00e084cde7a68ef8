"""Probing a video file: which stream is the video, its exact timing and format, and whether it is damaged.

    probe_video(path, strict) ──► VideoInfo (every frame's pts, counted packet by packet), keyframe indices,
                                  the first frame (for the decord cross-check in pipeline/source.py)

Which stream: ffmpeg's rule. Attached pictures (cover art, `disposition.attached_pic`) are never the video; of the
others the one with the most pixels × frames wins, ties to the first. `VideoInfo.note` says which was taken when
there was a choice.

Damaged but decodable (a header that lists more frames, or a longer duration, than the file holds; frames at the
end that no longer decode): with `strict` it is refused in one line; otherwise the clip is the frames that decode,
in order from the first, and `VideoInfo.damage` says what is missing (the stylize job warns once and records it in
the output's metadata), as ffmpeg decodes what is there and warns. A file with no decodable frame is refused
either way.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from models.errors import UserError

DEFAULT_SEQUENCE_FPS = Fraction(24)
ATTACHED_PIC = 1024  # AV_DISPOSITION_ATTACHED_PIC: cover art stored as a one-frame video stream


@dataclass
class VideoInfo:
    path: str
    width: int
    height: int
    num_frames: int  # counted packet by packet, never taken from the container header
    fps: Fraction
    time_base: Fraction
    pts: list[int]  # every frame's presentation timestamp in time_base units, ascending
    end_pts: int  # where the last frame ends: pts[-1] + its duration
    duration_s: float
    is_vfr: bool
    has_audio: bool
    has_alpha: bool
    pix_fmt: str
    bit_depth: int
    color_range: int  # PyAV/FFmpeg enum values: 0 = unspecified, 1 = tv (MPEG), 2 = pc (JPEG)
    colorspace: int  # 1 = bt709, 2 = unspecified, 5/6 = bt601, 9 = bt2020nc, ...
    color_primaries: int
    color_trc: int
    rotation: int  # degrees counter-clockwise from the display matrix, 0 when there is none
    codec: str
    sample_aspect_ratio: Fraction | None = None
    is_image_sequence: bool = False
    stream_index: int = 0  # the container's index of the video stream read (see `video_stream`)
    note: str | None = None  # which stream was taken, when the file has several
    damage: str | None = None  # what is missing from a damaged file that is read anyway (strict=False)

    def frame_end_pts(self, index: int) -> int:
        """The pts at which frame `index` stops being shown (the next frame's pts, or end_pts)."""
        return self.pts[index + 1] if index + 1 < self.num_frames else self.end_pts


def video_stream(container, name: str) -> tuple[object, str | None]:
    """(the video stream to read, a note naming it when there was a choice): ffmpeg's rule, see the docstring."""
    streams = list(container.streams.video)
    if not streams:
        what = "it has only audio" if container.streams.audio else "it has no video stream"
        raise UserError(f"{name}: not a video ({what})")
    real = [s for s in streams if not int(s.disposition) & ATTACHED_PIC]
    if not real:
        raise UserError(f"{name}: not a video (its only video stream is an attached picture)")
    frames = _frame_counts(container, real) if len(real) > 1 else {real[0].index: 1}
    best = max(real, key=lambda s: (s.codec_context.width * s.codec_context.height * frames[s.index], -s.index))
    if len(streams) == 1:
        return best, None

    def described(stream) -> str:
        if int(stream.disposition) & ATTACHED_PIC:
            return f"#{stream.index} (an attached picture)"
        size = f"{stream.codec_context.width}x{stream.codec_context.height}"
        return f"#{stream.index} ({size}, {frames[stream.index]} frame{'s' if frames[stream.index] != 1 else ''})"

    others = ", ".join(described(s) for s in streams if s is not best)
    return best, f"{name}: {len(streams)} video streams; reading {described(best)}, not {others}"


def _frame_counts(container, streams) -> dict[int, int]:
    """Packets per stream, counted by demuxing (headers often leave the count out); the container is rewound."""
    counts = {stream.index: 0 for stream in streams}
    try:
        for packet in container.demux(*streams):
            if packet.size:
                counts[packet.stream.index] += 1
        container.seek(0)
    except av.FFmpegError:
        pass  # a damaged file: what was counted decides
    return counts


def probe_video(path: str, strict: bool = True) -> tuple[VideoInfo, list[int], np.ndarray]:
    """Demux the whole video stream (no decoding) plus decode its first frame.

    Returns the info, the indices of the keyframes, and the first frame as RGB (for the decord check).
    """
    name = os.path.basename(path)
    first, index, note = _first_frame(path)
    try:
        with av.open(path) as container:
            stream = container.streams[index]
            packets, discarded = _demux(container, stream, name)
            has_audio = bool(container.streams.audio)
            time_base = Fraction(stream.time_base)
            claimed_frames = stream.frames
            claimed_duration = _claimed_duration_s(stream)
            fps = stream.average_rate or stream.guessed_rate or stream.base_rate
            sample_aspect_ratio = stream.sample_aspect_ratio or None
            codec = stream.codec_context.name
    except av.FFmpegError as error:
        raise UserError(f"{name}: cannot read the video ({one_line(error)})") from None

    damage = None
    if claimed_frames and len(packets) + discarded < claimed_frames:
        damage = (f"the file is truncated: its header lists {claimed_frames} frames but only "
                  f"{len(packets) + discarded} are present")
    # A stream cut mid-GOP starts with frames that no decoder outputs; the clip starts at the first one it does.
    first_pts = frame_pts(first)
    if first_pts is not None:
        packets = [packet for packet in packets if packet[0] >= first_pts]
    if not packets:
        raise UserError(f"{name}: the video stream has no frames")
    packets.sort()
    pts = [packet_pts for packet_pts, _, _ in packets]
    if len(set(pts)) < len(pts):
        raise UserError(f"{name}: several frames share one timestamp; remux it (ffmpeg -fflags +genpts)")
    intervals = np.diff(pts)
    typical_interval = int(np.median(intervals)) if len(intervals) else round(1 / (Fraction(fps or 24) * time_base))
    # MP4 stores durations in decode order, so with B-frames a packet's duration is not its frame's;
    # the furthest end is the clip's end either way.
    end_pts = max(packet_pts + (duration or typical_interval) for packet_pts, duration, _ in packets)
    if claimed_duration is not None and not claimed_frames and damage is None:
        slack = 2 * typical_interval * time_base + Fraction(1, 1000)
        if end_pts * time_base + slack < claimed_duration:
            damage = (f"the file is truncated: its header says {float(claimed_duration):.3f} s of video"
                      f" but the video stops at {float(end_pts * time_base):.3f} s")
    if damage is not None:
        if strict:
            raise UserError(f"{name}: {damage}")
        decodable = _count_decodable(path, index, set(pts))
        if decodable == 0:
            raise UserError(f"{name}: {damage}, and none of its frames decodes")
        if decodable < len(pts):
            damage += f"; {len(pts) - decodable} more do not decode"
            packets = [packet for packet in packets if packet[0] <= pts[decodable - 1]]
            pts = pts[:decodable]
            intervals = np.diff(pts)
            end_pts = pts[-1] + typical_interval
    duration = (end_pts - pts[0]) * time_base
    if not fps:
        fps = (len(pts) - 1) / ((pts[-1] - pts[0]) * time_base) if len(pts) > 1 else DEFAULT_SEQUENCE_FPS

    decoded_format = first.format
    colour_bits = [component.bits for component in decoded_format.components if not component.is_alpha]
    info = VideoInfo(
        path=path,
        width=first.width,
        height=first.height,
        num_frames=len(pts),
        fps=Fraction(fps),
        time_base=time_base,
        pts=pts,
        end_pts=end_pts,
        duration_s=float(duration),
        is_vfr=bool(len(intervals) and intervals.max() - intervals.min() > max(1, typical_interval // 100)),
        has_audio=has_audio,
        has_alpha=any(component.is_alpha for component in decoded_format.components),
        pix_fmt=decoded_format.name,
        bit_depth=max(colour_bits),
        color_range=int(first.color_range),
        colorspace=int(first.colorspace),
        color_primaries=int(first.color_primaries),
        color_trc=int(first.color_trc),
        rotation=int(round(first.rotation or 0)) % 360,
        codec=codec,
        sample_aspect_ratio=Fraction(sample_aspect_ratio) if sample_aspect_ratio else None,
        stream_index=index,
        note=note,
        damage=damage,
    )
    keyframes = [index for index, (_, _, is_key) in enumerate(packets) if is_key]
    if not keyframes or keyframes[0] != 0:
        keyframes.insert(0, 0)  # decoding from the very start always works
    return info, keyframes, first.to_ndarray(format="rgb24")


def _count_decodable(path: str, index: int, known_pts: set[int]) -> int:
    """How many frames decode, in order from the first, before the first that does not (a damaged file only)."""
    count = 0
    try:
        with av.open(path) as container:
            for frame in container.decode(container.streams[index]):
                if frame_pts(frame) in known_pts:
                    count += 1
    except av.FFmpegError:
        pass  # the rest of the file is damaged: what decoded so far is the clip
    return count


def _first_frame(path: str) -> tuple[av.VideoFrame, int, str | None]:
    """Open the file and decode its video stream's first frame, turning every failure into a one-line UserError.

    Returns the frame, the stream's index and the note naming the stream when there was a choice."""
    name = os.path.basename(path)
    try:
        container = av.open(path)
    except av.FFmpegError as error:
        raise UserError(f"{name}: not a readable video ({one_line(error)})") from None
    with container:
        stream, note = video_stream(container, name)
        try:
            for frame in container.decode(stream):
                return frame, stream.index, note
        except av.FFmpegError as error:
            raise UserError(f"{name}: cannot decode the first frame ({one_line(error)})") from None
    raise UserError(f"{name}: the video stream has no frames")


def _demux(container, stream, name: str) -> tuple[list[tuple[int, int, bool]], int]:
    """(pts, duration, is_keyframe) of every video packet, plus how many an edit list discards."""
    packets = []
    discarded = 0
    for packet in container.demux(stream):
        if not packet.size:
            continue  # the demuxer's end-of-stream marker
        if packet.is_discard:
            discarded += 1
            continue
        pts = packet.pts if packet.pts is not None else packet.dts
        if pts is None:
            raise UserError(f"{name}: the video has no timestamps; remux it into .mp4 or .mkv")
        packets.append((pts, packet.duration or 0, packet.is_keyframe))
    return packets, discarded


def _claimed_duration_s(stream) -> Fraction | None:
    """The video track's duration as a Matroska/WebM file's tags record it, if they do.

    Only this tag is trusted: other containers' durations may be estimated from the bitrate.
    """
    tag = stream.metadata.get("DURATION")
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", tag or "")
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)


def frame_pts(frame: av.VideoFrame) -> int | None:
    return frame.pts if frame.pts is not None else frame.dts


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

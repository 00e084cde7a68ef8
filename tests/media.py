"""Small real media files that several test modules make: audio tones, test-pattern clips, bad inputs."""
from fractions import Fraction

import av
import numpy as np

from pipeline.sink import FrameSink
from pipeline.source import open_source

AUDIO_RATE = 48000


def write_sine(container, stream, seconds):
    samples = round(seconds * AUDIO_RATE)
    t = np.arange(samples) / AUDIO_RATE
    wave = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).astype(np.float32) * 0.3
    for start in range(0, samples, 1024):
        chunk = wave[:, start : start + 1024]
        if stream.codec_context.name.startswith("pcm"):
            interleaved = (chunk.T.reshape(1, -1) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_RATE, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def make_text(folder):
    (folder / "notes.mp4").write_text("not a video")
    return folder / "notes.mp4"


def make_zero_frames(folder):
    with av.open(str(folder / "empty.avi"), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return folder / "empty.avi"


def make_audio_only(folder):
    with av.open(str(folder / "voice.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=AUDIO_RATE)
        stream.layout = "stereo"
        write_sine(container, stream, 0.2)
    return folder / "voice.m4a"


def write_h264(container, images, size=None, rate=25):
    """Encode RGB uint8 frames (all of one size) as a quiet libx264 stream of `container`, pts 0, 1, 2, ...
    `size` (width, height) is needed only for a stream with no frames."""
    width, height = size or (images[0].shape[1], images[0].shape[0])
    encode_frames(container, add_h264(container, width, height, rate), images)


def add_h264(container, width, height, rate=25):
    """A quiet libx264 yuv420p stream of `container` (add every stream before encoding into any)."""
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"x264-params": "log-level=error"}
    return stream


def encode_frames(container, stream, images):
    """RGB uint8 frames into `stream` with pts 0, 1, 2, ..., then flushed."""
    for i, image in enumerate(images):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def make_truncated(name, options=None):
    """A maker of `name`: 30 h264 frames (a square moving over a gradient) with the last 40 % of the file cut
    off. `options` are the muxer's (e.g. {"movflags": "faststart"} puts the mp4 index in front)."""
    def make(folder):
        whole = folder / ("whole_" + name)
        y, x = np.mgrid[0:48, 0:64]
        images = []
        for i in range(30):
            image = np.stack([x * 4, y * 5, np.full_like(x, i * 23 % 256)], axis=2).astype(np.uint8)
            image[:12, i * 3 % 52: i * 3 % 52 + 12] = 255
            images.append(image)
        with av.open(str(whole), "w", options=options or {}) as container:
            write_h264(container, images)
        data = whole.read_bytes()
        (folder / name).write_bytes(data[: len(data) * 6 // 10])
        whole.unlink()
        return folder / name

    return make


def pattern(index, width, height, with_alpha=False):
    """A frame that differs from its neighbours: gradients, a moving white square, a per-frame blue level."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, index * 23 % 256)], axis=2
    ).astype(np.uint8)
    side = max(2, min(width, height) // 4)
    left = index * 3 % max(1, width - side)
    image[:side, left : left + side] = 255
    if not with_alpha:
        return image
    alpha = ((x * 200 // max(1, width - 1)) + index * 5).astype(np.uint8)
    return np.dstack((image, alpha))


def write_clip(
    path,
    count=12,
    size=(64, 48),
    codec="libx264",
    pix_fmt="yuv420p",
    time_base=Fraction(1, 25),
    pts=None,
    last_duration=None,
    rate=None,
    images=None,
    colour=None,
    rotation=0,
    audio=None,
    options=None,
):
    """Encode a clip with PyAV; returns the RGB(A) images that went in. Packet durations are set exactly."""
    width, height = size
    pts = pts or list(range(count))
    durations = [b - a for a, b in zip(pts, pts[1:])] + [last_duration or (pts[1] - pts[0] if len(pts) > 1 else 1)]
    has_alpha = "a" in pix_fmt.replace("yuv", "").replace("gray", "") and pix_fmt != "bgr0"
    images = images if images is not None else [pattern(i, width, height, has_alpha) for i in range(len(pts))]
    duration_of = dict(zip(pts, durations))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate or 1 / time_base)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"x264-params": "log-level=error", **(options or {})} if codec == "libx264" else options or {}
        for name, value in (colour or {}).items():
            setattr(stream.codec_context, name, value)
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = container.add_stream(audio, rate=AUDIO_RATE) if audio else None
        if audio_stream:
            audio_stream.layout = "stereo"

        def mux(packets):
            for packet in packets:
                packet.duration = duration_of.get(packet.pts, packet.duration)
                container.mux(packet)

        for image, frame_pts in zip(images, pts):
            frame = av.VideoFrame.from_ndarray(image, format="rgba" if image.shape[2] == 4 else "rgb24")
            for name, value in (colour or {}).items():
                setattr(frame, name, value)
            frame.pts, frame.time_base = frame_pts, time_base
            mux(stream.encode(frame))
        mux(stream.encode())
        if audio_stream:
            seconds = float((pts[-1] + durations[-1]) * time_base)
            write_sine(container, audio_stream, seconds)
    return images


def render(source_path, output_path, start=0, end=None, **sink_args):
    """Copy frames start..end of a file through open_source and FrameSink; returns (source info, output info)."""
    source = open_source(source_path)
    audio = str(source_path) if source.info.has_audio else None
    with FrameSink(str(output_path), like=source.info, audio_from=audio, **sink_args) as sink:
        for frame in source.frames(start=start, end=end):
            sink.write(frame)
    return source.info, open_source(output_path).info


def times(info):
    """A clip's frame timestamps in seconds, as exact fractions."""
    return [p * info.time_base for p in info.pts]


def audio_packets(path):
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [(p.pts * p.time_base, p.duration * p.time_base, bytes(p)) for p in container.demux(stream) if p.size]
        return stream.codec_context.name, packets


def audio_span(packets):
    return packets[0][0], packets[-1][0] + packets[-1][1]


def decode_all(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def clip_maker(folder):
    """`clip(name, **write_clip_arguments)` -> (path, images): each named clip written once into `folder`."""
    made = {}

    def clip(name, **kwargs):
        if name not in made:
            path = folder / name
            made[name] = (path, write_clip(path, **kwargs))
        return made[name]

    return clip


def ntsc(clips):
    return clips("ntsc.mp4", count=10, time_base=Fraction(1001, 30000), rate=Fraction(30000, 1001))[0]


def gops(clips):
    # Short GOPs and B-frames, so seeking and reordering both matter.
    return clips("gops.mp4", count=14, options={"x264-params": "log-level=error:keyint=4:min-keyint=1:bframes=2"})[0]


def vfr(clips):
    pts = [0, 40, 80, 200, 210, 260, 400, 401, 450, 600]
    return clips("vfr.mp4", pts=pts, last_duration=70, time_base=Fraction(1, 1000), rate=24,
                 options={"x264-params": "log-level=error:bframes=0"})[0]


def with_audio(clips):
    return clips("audio.mp4", count=25, audio="aac")[0]

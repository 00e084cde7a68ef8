"""Small real media files that several test modules make: audio tones and bad inputs."""
import av
import numpy as np

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
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"x264-params": "log-level=error"}
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

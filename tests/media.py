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

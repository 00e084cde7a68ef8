"""Writing video (pipeline/sink.py) and still images (pipeline/images.py), on real files encoded here with PyAV:
round trips that keep timing, audio, colour, alpha and sizes; outputs refused or failed leave nothing behind.
Reading is tests/test_video_source.py; the clips are made by tests/media.py."""

import json
import os
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from models.errors import UserError
from pipeline.images import contact_sheet, load_image, save_png
from pipeline.sink import FrameSink
from pipeline.source import Frame, open_source
from tests.media import (AUDIO_RATE, audio_packets, audio_span, clip_maker, decode_all, gops, ntsc, pattern, render,
                         times, vfr, with_audio, write_clip)

AAC_FRAME_S = 1024 / AUDIO_RATE
BT709_TV = dict(color_range=1, colorspace=1, color_primaries=1, color_trc=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return clip_maker(tmp_path_factory.mktemp("clips"))


# --- Round trips ---------------------------------------------------------------------------------


def test_round_trip_keeps_count_fps_and_duration(clips, tmp_path):
    source, output = render(ntsc(clips), tmp_path / "out.mp4")
    assert output.num_frames == source.num_frames
    assert output.fps == source.fps == Fraction(30000, 1001)
    assert output.duration_s == source.duration_s
    assert times(output) == times(source)


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mov", "hevc")])
def test_vfr_round_trip_keeps_every_timestamp(clips, tmp_path, suffix, codec):
    source, output = render(vfr(clips), tmp_path / f"out{suffix}", codec=codec)
    assert output.is_vfr
    assert times(output) == times(source)
    assert output.duration_s == pytest.approx(source.duration_s, abs=1e-9)


def test_partial_render_keeps_source_timestamps(clips, tmp_path):
    source, output = render(gops(clips), tmp_path / "part.mp4", start=3, end=9)
    assert times(output) == times(source)[3:9]


def test_audio_is_remuxed_unchanged(clips, tmp_path):
    path = with_audio(clips)
    _, output = render(path, tmp_path / "out.mp4")
    assert output.has_audio
    assert audio_packets(tmp_path / "out.mp4") == audio_packets(path)


def test_audio_into_matroska_keeps_video_timestamps(clips, tmp_path):
    path = with_audio(clips)
    source, output = render(path, tmp_path / "out.mkv")
    assert times(output) == times(source)  # Matroska would otherwise shift everything by the AAC priming
    _, before = audio_packets(path)
    codec, after = audio_packets(tmp_path / "out.mkv")
    assert codec == "aac"
    assert [p[2] for p in after] == [p[2] for p in before]
    for edge_before, edge_after in zip(audio_span(before), audio_span(after)):
        assert abs(edge_after - edge_before) <= AAC_FRAME_S


def test_pcm_audio_is_transcoded_for_mp4(tmp_path):
    path = tmp_path / "pcm.mov"
    write_clip(path, count=25, audio="pcm_s16le")
    render(path, tmp_path / "out.mp4")
    codec, after = audio_packets(tmp_path / "out.mp4")
    _, before = audio_packets(path)
    assert codec == "aac"
    start, end = audio_span(after)
    assert abs(max(start, 0) - audio_span(before)[0]) <= AAC_FRAME_S
    assert abs(end - audio_span(before)[1]) <= AAC_FRAME_S


def test_partial_render_keeps_only_the_audio_under_its_frames(clips, tmp_path):
    render(with_audio(clips), tmp_path / "part.mp4", start=5, end=15)
    _, packets = audio_packets(tmp_path / "part.mp4")
    start, end = audio_span(packets)
    assert Fraction(5, 25) - AAC_FRAME_S <= start <= Fraction(5, 25)
    assert Fraction(15, 25) <= end <= Fraction(15, 25) + AAC_FRAME_S


@pytest.mark.parametrize(
    "size, codec, suffix",
    [
        ((642, 361), "h264", ".mp4"),
        ((65, 49), "hevc", ".mp4"),
        ((65, 49), "prores", ".mov"),
        ((48, 64), "h264", ".mp4"),
    ],
)
def test_odd_and_portrait_sizes_are_kept_exactly(tmp_path, size, codec, suffix):
    path = tmp_path / "odd.mkv"
    images = write_clip(path, count=3, size=size, codec="ffv1", pix_fmt="bgr0")
    _, output = render(path, tmp_path / f"out{suffix}", codec=codec)
    assert (output.width, output.height) == size
    decoded = decode_all(tmp_path / f"out{suffix}")
    assert decoded[0].shape == (size[1], size[0], 3)
    assert np.abs(decoded[0].astype(int) - images[0]).mean() < 3


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mov", "prores"), (".mkv", "hevc")])
def test_colour_tags_and_colours_are_kept(clips, tmp_path, suffix, codec):
    path, _ = clips("bt709.mp4", count=3, colour=BT709_TV, options={"crf": "0"})
    source, output = render(path, tmp_path / f"out{suffix}", codec=codec, crf=0)
    tags = lambda info: (info.color_range, info.colorspace, info.color_primaries, info.color_trc)  # noqa: E731
    assert tags(source) == tags(output) == (1, 1, 1, 1)
    # Chroma subsampling alone costs ~1-2 levels here; re-encoding with the BT.601 matrix costs ~7.5.
    before, after = decode_all(path)[1], decode_all(tmp_path / f"out{suffix}")[1]
    assert np.abs(before.astype(int) - after).mean() < 3


def test_rotation_is_kept(clips, tmp_path):
    path, _ = clips("rotated.mp4", count=3, rotation=90)
    source, output = render(path, tmp_path / "out.mp4")
    assert source.rotation == output.rotation == 90
    assert (output.width, output.height) == (64, 48)  # frames stay in stored orientation


def test_prores_4444_keeps_alpha(clips, tmp_path):
    path, images = clips("alpha.mov", count=4, codec="prores_ks", pix_fmt="yuva444p10le", options={"profile": "4"})
    frames = list(open_source(path).frames())
    assert all(f.alpha is not None for f in frames)
    assert np.array_equal(frames[2].alpha, images[2][..., 3])
    _, output = render(path, tmp_path / "out.mov", codec="prores")
    assert output.has_alpha and output.pix_fmt.startswith("yuva444")
    render(tmp_path / "out.mov", tmp_path / "again.mov", codec="prores")
    for generation in ["out.mov", "again.mov"]:
        frames = list(open_source(tmp_path / generation).frames())
        assert np.array_equal(frames[2].alpha, images[2][..., 3])


@pytest.mark.parametrize("with_alpha", [False, True])
def test_ffv1_round_trip_is_bit_exact(tmp_path, with_alpha):
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (36, 50, 4 if with_alpha else 3), dtype=np.uint8) for _ in range(5)]
    path = tmp_path / "noise.mkv"
    write_clip(path, codec="ffv1", pix_fmt="bgra" if with_alpha else "bgr0", size=(50, 36), images=images)
    for frame, image in zip(open_source(path).frames(), images, strict=True):
        assert np.array_equal(frame.image, image[..., :3])
        assert (frame.alpha is not None) == with_alpha
    render(path, tmp_path / "out.mkv", codec="ffv1")
    for frame, image in zip(open_source(tmp_path / "out.mkv").frames(), images, strict=True):
        assert np.array_equal(frame.image, image[..., :3])
        if with_alpha:
            assert np.array_equal(frame.alpha, image[..., 3])


def write_png_sequence(folder, count=5, size=(40, 30)):
    folder.mkdir()
    images = [pattern(i, *size, with_alpha=True) for i in range(count)]
    for number, image in enumerate(images, start=1):
        cv2.imwrite(str(folder / f"{number:06d}.png"), cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA))
    return images


@pytest.mark.parametrize("output_name", ["frames_out", "frames_out/%06d.png"])
def test_png_sequence_keeps_alpha_exactly(tmp_path, output_name):
    images = write_png_sequence(tmp_path / "frames")
    for input_path in [tmp_path / "frames", tmp_path / "frames" / "%06d.png"]:
        source = open_source(str(input_path), fps="30000/1001")
        assert source.info.num_frames == 5 and source.info.has_alpha
        assert source.info.fps == Fraction(30000, 1001)
    source, output = render(tmp_path / "frames", tmp_path / output_name, metadata={"style": "a.png"})
    out_folder = tmp_path / "frames_out"
    assert sorted(os.listdir(out_folder)) == [f"{n:06d}.png" for n in range(1, 6)] + ["metadata.json"]
    assert json.loads((out_folder / "metadata.json").read_text()) == {"style": "a.png"}
    for frame, image in zip(open_source(str(out_folder)).frames(), images, strict=True):
        assert np.array_equal(frame.image, image[..., :3])
        assert np.array_equal(frame.alpha, image[..., 3])


def test_metadata_goes_into_the_container(clips, tmp_path):
    settings = {"style": "starry.jpg", "strength": 0.8, "seed": 1}
    for suffix in [".mp4", ".mov", ".mkv"]:
        render(gops(clips), tmp_path / f"out{suffix}", metadata=settings)
        with av.open(str(tmp_path / f"out{suffix}")) as container:
            tags = {key.lower(): value for key, value in container.metadata.items()}
        assert json.loads(tags["comment"]) == settings


def test_overwrite_replaces_the_output_atomically(clips, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    render(gops(clips), out, overwrite=True)
    assert open_source(out).info.num_frames == 14
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_overwriting_a_frame_folder_replaces_all_of_it(clips, tmp_path):
    render(gops(clips), tmp_path / "frames")
    render(gops(clips), tmp_path / "frames", end=5, overwrite=True)
    assert sorted(os.listdir(tmp_path / "frames")) == [f"{n:06d}.png" for n in range(1, 6)]
    assert os.listdir(tmp_path) == ["frames"]


def test_retiming_with_fps_numbers_frames_from_zero(clips, tmp_path):
    source = open_source(gops(clips))
    with FrameSink(str(tmp_path / "out.mp4"), like=source.info, fps=Fraction(24000, 1001)) as sink:
        for frame in source.frames(every_nth=2):
            sink.write(frame)
    output = open_source(tmp_path / "out.mp4").info
    assert output.fps == Fraction(24000, 1001) and output.num_frames == 7
    assert times(output) == [Fraction(1001 * i, 24000) for i in range(7)]


# --- Refused and failed outputs: one clear line, nothing at the output ----------------------------


def test_sink_refuses_unsafe_outputs_before_writing(clips, tmp_path):
    path = gops(clips)
    info = open_source(path).info
    original = path.read_bytes()
    (tmp_path / "taken.mp4").write_bytes(b"keep me")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    refusals = [
        ({"path": str(path)}, "overwrite the input"),
        ({"path": str(path), "overwrite": True}, "overwrite the input"),
        ({"path": str(path.parent)}, "overwrite the input"),  # a frames folder holding the input
        ({"path": str(tmp_path / "no_such_folder" / "out.mp4")}, "does not exist"),
        ({"path": str(tmp_path / "taken.mp4")}, "already exists"),
        ({"path": str(tmp_path / "mixed"), "overwrite": True}, "not frames"),
        ({"path": str(tmp_path / "out.mp4"), "codec": "prores"}, "cannot be stored in .mp4"),
        ({"path": str(tmp_path / "out.avi")}, "unknown output type"),
        ({"path": str(tmp_path / "out.mp4"), "codec": "vp9"}, "unknown video codec"),
    ]
    before = sorted(os.listdir(tmp_path))
    for arguments, problem in refusals:
        with pytest.raises(UserError, match=problem):
            FrameSink(like=info, **arguments)
    assert path.read_bytes() == original
    assert (tmp_path / "taken.mp4").read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == before


def test_exr_output_works_or_is_refused_clearly(clips, tmp_path):
    if cv2.haveImageWriter("x.exr"):
        render(gops(clips), tmp_path / "exr", codec="exr")
        assert len(os.listdir(tmp_path / "exr")) == 14
    else:
        with pytest.raises(UserError, match="OpenEXR"):
            FrameSink(str(tmp_path / "exr" / "%06d.exr"))
        assert os.listdir(tmp_path) == []


def test_failure_mid_write_leaves_nothing(clips, tmp_path):
    source = open_source(gops(clips))
    with pytest.raises(RuntimeError, match="stylizer crashed"):
        with FrameSink(str(tmp_path / "out.mp4"), like=source.info) as sink:
            for frame in source.frames():
                sink.write(frame)
                if frame.index == 5:
                    raise RuntimeError("stylizer crashed")
    assert os.listdir(tmp_path) == []


def test_sink_errors_during_writing_leave_nothing(tmp_path):
    with pytest.raises(UserError, match="cannot hold 65x49"):
        with FrameSink(str(tmp_path / "out.mp4"), pix_fmt="yuv420p") as sink:
            sink.write(Frame(0, 0, np.zeros((49, 65, 3), np.uint8)))
    with pytest.raises(UserError, match="no frames were written"):
        with FrameSink(str(tmp_path / "empty.mp4")):
            pass
    assert os.listdir(tmp_path) == []


# --- Still images --------------------------------------------------------------------------------


def test_load_image_normalises_every_kind_of_file(tmp_path):
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((6, 8), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((6, 8), 257 * 200, np.uint16))
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)  # opaque blue on the left, transparent on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    upright = Image.new("RGB", (8, 6), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 8, 1))  # white top row
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", exif=exif, quality=100)

    assert np.array_equal(load_image(tmp_path / "gray.png"), np.full((6, 8, 3), 100, np.uint8))
    assert np.array_equal(load_image(tmp_path / "deep.png"), np.full((6, 8, 3), 200, np.uint8))
    assert np.abs(load_image(tmp_path / "cmyk.jpg")[3, 4].astype(int) - (255, 0, 0)).max() < 10
    alpha = load_image(tmp_path / "alpha.png")
    assert tuple(alpha[0, 0]) == (0, 0, 255) and tuple(alpha[0, 7]) == (255, 255, 255)  # composited on white
    assert tuple(load_image(tmp_path / "anim.gif")[0, 0]) == (255, 0, 0)
    assert tuple(load_image(tmp_path / "anim.webp")[0, 0]) == (255, 0, 0)
    turned = load_image(tmp_path / "turned.jpg")
    assert turned.shape == (6, 8, 3) and turned[0].mean() > 200 and turned[3].mean() < 50
    for image in [alpha, turned]:
        assert image.dtype == np.uint8 and image.ndim == 3


def test_load_image_refuses_non_images(tmp_path):
    (tmp_path / "style.jpg").write_text("not an image")
    for path in [tmp_path / "style.jpg", tmp_path / "absent.png"]:
        with pytest.raises(UserError, match=path.name) as caught:
            load_image(path)
        assert "\n" not in str(caught.value)


def test_save_png_round_trips_and_is_atomic(tmp_path):
    rgba = pattern(3, 20, 10, with_alpha=True)
    save_png(tmp_path / "a.png", rgba)
    save_png(tmp_path / "b.png", rgba[..., :3])
    written = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(load_image(tmp_path / "b.png"), rgba[..., :3])
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    with pytest.raises(UserError, match="does not exist"):
        save_png(tmp_path / "nope" / "c.png", rgba)


def test_contact_sheet_builds_a_labelled_grid():
    rows = [
        [np.zeros((30, 60, 3), np.uint8), np.full((50, 20), 128, np.uint8), np.ones((10, 10, 3), np.float32)],
        [pattern(0, 64, 48)],
    ]
    labels = [["content", "style", "a label far too long to fit in one small cell"], ["stylised"]]
    sheet = contact_sheet(rows, labels, cell=64)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    label_height, gap = 14, 2
    # row 1 is as tall as its tallest image (64), row 2 only as tall as its 64 x 48 frame
    assert sheet.shape == (gap + (64 + label_height + gap) + (48 + label_height + gap), gap + 3 * (64 + gap), 3)
    label_strip = sheet[gap + 64 : gap + 64 + label_height, gap : gap + 64]
    assert label_strip.min() < 128  # text was drawn
    assert (sheet[-5:, -5:] == 255).all()  # background
    assert np.array_equal(contact_sheet(rows, labels, cell=64), sheet)  # deterministic

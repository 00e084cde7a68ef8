"""Live mode: the adaptive working size, and `mambast live` run headless on a small clip made here."""
from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
import torch

from pipeline.packaged_media import skimage_photo
from jobs.cli import main as cli_main
from models.checkpoint import save_model
from pipeline.images import load_image, save_png
from pipeline.camera import AdaptiveWorkingSize, Window, size_ladder
from pipeline.source import open_source
from tiny_models import tiny_model

torch.set_num_threads(1)

WIDTH, HEIGHT, FRAMES = 96, 64, 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a style image and a 12-frame clip (a slow pan across a photo), as real files."""
    folder = tmp_path_factory.mktemp("live")
    weights = save_model(tiny_model(), folder / "weights")
    style = folder / "style.png"
    save_png(str(style), cv2.resize(load_image(str(skimage_photo("coffee"))), (80, 60), interpolation=cv2.INTER_AREA))
    wide = cv2.resize(load_image(str(skimage_photo("rocket"))), (WIDTH + 2 * FRAMES, HEIGHT),
                      interpolation=cv2.INTER_AREA)
    clip = folder / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv444p"
        stream.options = {"crf": "0"}
        for i in range(FRAMES):
            frame = np.ascontiguousarray(wide[:, 2 * i: 2 * i + WIDTH])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return {"weights": str(weights), "style": str(style), "clip": str(clip), "folder": folder}


# ---------------------------------------------------------------------------------------------------- the ladder


def test_size_ladder():
    assert size_ladder(512, short_side=720) == [512, 384, 256, 192, 128]
    assert size_ladder(0, short_side=272, floor=96) == [272, 256, 192, 128, 96]
    assert size_ladder(512, short_side=64, floor=128) == [64]  # a frame below the floor runs at its own size
    assert size_ladder(300, short_side=1080, floor=192) == [300, 256, 192]


def test_adaptive_size_steps_down_to_the_floor_when_too_slow():
    sizes = AdaptiveWorkingSize([512, 384, 256], target_fps=25, settle=3)
    changes = [sizes.update(0.1) for _ in range(20)]  # 10 fps, far below 25
    made = [c for c in changes if c is not None]
    assert [(c.old, c.new) for c in made] == [(512, 384), (384, 256)]
    assert changes.index(made[0]) == 3  # the first frame (style encode) is left out, then 2 more settle
    assert sizes.size == 256 and "down" in str(made[0]) and "10.0 fps" in str(made[0])


def test_adaptive_size_steps_up_only_with_ample_headroom():
    sizes = AdaptiveWorkingSize([512, 384, 256], target_fps=10, settle=3, up_after=10, up_margin=0.75)
    sizes.rung = 2  # at 256
    assert all(sizes.update(0.040) is None for _ in range(30))  # 384 would take 0.09 s: > 0.75 × 0.1 s
    sizes.average, sizes.frames_here = None, 0
    changes = [sizes.update(0.020) for _ in range(12)]  # 384 would take 0.045 s: room to spare
    assert [(c.old, c.new) for c in changes if c] == [(256, 384)]
    assert changes.index(next(c for c in changes if c)) == 10  # not before up_after frames at this size


def test_no_window_without_a_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert Window.open() is None


# ---------------------------------------------------------------------------------------------------- the job


def test_live_writes_every_frame_and_degrades_to_keep_up(files, capsys):
    out = files["folder"] / "live.mp4"
    rc = cli_main(["live", "--input", files["clip"], "--output", str(out), "--weights", files["weights"],
                   "--style", files["style"], "--working-size", "0", "--min-working-size", "32",
                   "--target-fps", "100000"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "working sizes [64, 48, 32]" in printed
    assert "working size 64 -> 48 (down" in printed and "working size 48 -> 32 (down" in printed
    assert f"live: {FRAMES} frames in" in printed and "last working size 32" in printed
    result = open_source(str(out))
    assert (result.info.num_frames, result.info.width, result.info.height) == (FRAMES, WIDTH, HEIGHT)
    assert result.info.pts == open_source(files["clip"]).info.pts  # the source's timing kept


def test_live_max_frames_to_an_image_folder(files, capsys):
    out = files["folder"] / "frames"
    rc = cli_main(["live", "--input", files["clip"], "--output", str(out), "--weights", files["weights"],
                   "--style", files["style"], "--max-frames", "3", "--style-strength", "0.5", "--preserve-color"])
    assert rc == 0
    assert sorted(p.suffix for p in out.iterdir() if p.suffix == ".png") == [".png"] * 3
    assert "working sizes [64]" in capsys.readouterr().out  # 512 asked, the frame is smaller


def test_live_follows_a_schedule_in_seconds(files, capsys):
    out = files["folder"] / "scheduled.mp4"
    other = files["folder"] / "other.png"
    save_png(str(other), cv2.resize(load_image(str(skimage_photo("chelsea"))), (60, 50)))
    rc = cli_main(["live", "--input", files["clip"], "--output", str(out), "--weights", files["weights"],
                   "--style", f"0:{files['style']},0.2s:{other}", "--max-frames", "6"])  # 0.2 s = frame 5 at 25 fps
    assert rc == 0 and open_source(str(out)).info.num_frames == 6


@pytest.mark.parametrize("extra, message", [
    ([], "nothing to do: pass --output"),
    (["--show"], "--show: no display here"),
    (["--output", "x.mp4", "--max-frames", "0"], "--max-frames: must be >= 1"),
    (["--output", "x.mp4", "--style-strength", "3"], "strength: must be from 0"),
])
def test_live_refuses_bad_arguments_in_one_line(files, monkeypatch, capsys, extra, message):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(files["folder"])
    rc = cli_main(["live", "--input", files["clip"], "--weights", files["weights"], "--style", files["style"], *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1

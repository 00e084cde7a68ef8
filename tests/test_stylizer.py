"""ClipStylizer: chunks started `lead_in` frames early equal a one-piece run bit for bit, whatever the batching;
the working size shrinks large frames and enlarges small ones."""
import cv2
import numpy as np
import pytest

from pipeline.stylizer import ClipStylizer, StylizerConfig, to_working_size, working_shape
from tests.tiny_models import tiny_model


def moving_clip(n=11, h=40, w=56):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w + 2 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[:, 2 * i:2 * i + w]) for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("split", [4, 6, 7])
def test_chunked_equals_one_piece(batch_size, split):
    model = tiny_model()
    frames = moving_clip()
    style = np.full((32, 32, 3), (200, 80, 30), np.uint8)
    config = StylizerConfig(batch_size=batch_size, seed=3, pad_batches=True)
    whole = ClipStylizer(model, style, frames[0].shape[:2], config)(frames)
    first = ClipStylizer(model, style, frames[0].shape[:2], config)(frames[:split])
    start = max(0, split - config.lead_in)
    second = ClipStylizer(model, style, frames[0].shape[:2], config)(frames[start:])[split - start:]
    for a, b in zip(whole, first + second):
        assert np.array_equal(a, b)


def test_working_shape_sets_the_short_side_both_ways():
    assert working_shape(1080, 1920, 512) == (512, 910)
    assert working_shape(240, 320, 512) == (512, 683)   # enlarged, as the official Resize(512) does
    assert working_shape(320, 240, 512) == (683, 512)
    assert working_shape(240, 320, 0) == working_shape(240, 320, 240) == (240, 320)


def test_a_small_frame_runs_enlarged_and_comes_back_at_its_own_size():
    model = tiny_model()
    frame = moving_clip(n=1, h=24, w=40)[0]
    style = np.full((32, 32, 3), (200, 80, 30), np.uint8)
    config = StylizerConfig(working_size=48, temporal_enabled=False)
    out = ClipStylizer(model, style, frame.shape[:2], config)([frame])[0]
    assert out.shape == frame.shape
    # the same as stylizing the enlarged frame at its own size, then averaging back down (up to rounding)
    big = to_working_size(frame, (48, 80))
    at_big = ClipStylizer(model, style, big.shape[:2], StylizerConfig(temporal_enabled=False))([big])[0]
    down = cv2.resize(at_big.astype(np.float32), (40, 24), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(np.float32) - down).max() <= 1.0
    at_own = ClipStylizer(model, style, frame.shape[:2], StylizerConfig(temporal_enabled=False))([frame])[0]
    assert np.abs(out.astype(int) - at_own.astype(int)).mean() > 1  # the working size matters

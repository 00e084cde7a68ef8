"""ClipStylizer: chunks started `lead_in` frames early equal a one-piece run bit for bit, whatever the batching."""
import numpy as np
import pytest

from pipeline.stylizer import ClipStylizer, StylizerConfig
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
    config = StylizerConfig(batch_size=batch_size, seed=3)
    whole = ClipStylizer(model, style, frames[0].shape[:2], config)(frames)
    first = ClipStylizer(model, style, frames[0].shape[:2], config)(frames[:split])
    start = max(0, split - config.lead_in)
    second = ClipStylizer(model, style, frames[0].shape[:2], config)(frames[start:])[split - start:]
    for a, b in zip(whole, first + second):
        assert np.array_equal(a, b)

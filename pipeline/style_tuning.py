"""Weights tuned to one style on one clip's frames (models/style_tuning.py), made once and kept on disk.

    tuned_weights(weights, style, frames, tuning) -> a checkpoint folder: `--weights` for everything downstream

The tuned model is an ordinary checkpoint, so the local and Ray runners load it the way they load any weights:
every worker and every retry reads the same file and stylizes with the same bits. Folders are named by a hash of
what made them (the base weights' bytes, the style's pixels, the frames' pixels, the tuning settings), under
$MAMBAST_CACHE (default ~/.cache/mambast)/tuned; a second run of the same job finds its weights there.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import BUNDLED_DIR, load_model, save_model
from models.errors import UserError
from models.style_tuning import StyleTuning, tune_to_style
from pipeline.local_runner import progress_bar, spread
from pipeline.source import FrameSource
from pipeline.stylizer import image_to_tensor, to_working_size, working_shape

TUNING_FRAMES = 8  # frames spread over the selection that the tuning crops from


def cache_root() -> Path:
    return Path(os.environ.get("MAMBAST_CACHE") or Path.home() / ".cache" / "mambast") / "tuned"


def tuning_frames(source: FrameSource, selection: range, working_size: int,
                  count: int = TUNING_FRAMES) -> list[np.ndarray]:
    """`count` frames spread evenly over the selection (all of it when shorter), at the working size."""
    picks = spread(selection, count)
    shape = working_shape(source.info.height, source.info.width, working_size)
    return [to_working_size(frame.image, shape) for frame in source.read(picks)]


def weights_digest(weights: str | os.PathLike | None) -> str:
    """sha256 of a checkpoint's weights file (the bundled ones when None)."""
    path = Path(weights) if weights is not None else BUNDLED_DIR
    file = path / "model.safetensors" if path.is_dir() else path
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tuning_key(weights: str | os.PathLike | None, style: np.ndarray, frames: Sequence[np.ndarray],
               tuning: StyleTuning) -> str:
    h = hashlib.sha256()
    h.update(weights_digest(weights).encode())
    for image in (style, *frames):
        h.update(repr(image.shape).encode())
        h.update(np.ascontiguousarray(image).tobytes())
    h.update(json.dumps(asdict(tuning), sort_keys=True).encode())
    return h.hexdigest()[:32]


def tuned_weights(weights: str | os.PathLike | None, style: np.ndarray, frames: Sequence[np.ndarray],
                  tuning: StyleTuning, device: str | torch.device = "cpu", name: str = "style",
                  show_progress: bool = True) -> Path:
    """The checkpoint folder of `weights` tuned to `style` (RGB uint8) on `frames` (RGB uint8, at the working size):
    from the cache, else tuned now (with a progress bar) and written there atomically (a temporary folder, renamed)."""
    folder = cache_root() / tuning_key(weights, style, frames, tuning)
    if (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file():
        return folder
    model = load_model(weights, device=device)
    try:  # before the tuning: an unwritable cache is refused at once, not after a minute of work
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as error:
        raise UserError(f"{folder.parent}: cannot keep the tuned weights there ({error.strerror}); set "
                        f"MAMBAST_CACHE to a writable folder") from None
    bar = progress_bar(tuning.steps, show_progress, desc=f"tuning to {name}", unit="step")

    def progress(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.1f}", refresh=False)
        bar.update(1)

    try:
        with bar:
            tuned = tune_to_style(model, image_to_tensor(style).to(device),
                                  [image_to_tensor(f)[0].to(device) for f in frames], tuning, progress=progress)
        meta = {**getattr(model, "meta", {}), "tuned_to": name, "base_weights": str(weights or "bundled"),
                "tuning": json.loads(json.dumps(asdict(tuning)))}
        save_model(tuned, staging, meta=meta)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished the same folder first: theirs is the same model
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder

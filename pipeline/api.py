"""The Python API: stylize images, batches and frame streams from a notebook or a script, without Ray.

    >>> from pipeline import Stylizer
    >>> stylizer = Stylizer(style="starry.jpg", working_size=256)        # bundled weights; CUDA when present
    >>> out = stylizer.stylize(frame)                  # numpy HxWx3 uint8 -> numpy HxWx3 uint8
    >>> outs = stylizer.stylize(batch)                 # numpy BxHxWx3, or torch (B)x3xHxW: independent images
    >>> for out in stylizer.stream(frames):            # any iterable of frames: temporal smoothing on
    ...     show(out)
    >>> stylizer.set_style({"starry.jpg": 0.7, "wave.png": 0.3})         # a blend, mixed in the style code
    >>> stylizer.set_style("0:starry.jpg,120:wave.png")                  # a schedule over frame indices
    >>> stylizer.strength, stylizer.preserve_color = 0.5, True

Frames: numpy arrays are channel-last (HxWx3 or BxHxWx3), torch tensors channel-first (3xHxW or Bx3xHxW), as
torchvision has them; uint8 in 0..255 or float in [0, 1]. Each result has the input's kind, layout, dtype and
device. Frames are processed as 8-bit RGB.

The stylizer keeps no global state: the model, its settings and a cache of style codes keyed by style (a hash of
its pixels) and token grid, so switching back to a style or a frame size encodes nothing.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from fractions import Fraction

import numpy as np
import torch

from models.checkpoint import load_model
from models.errors import UserError
from models.mambast import MambaST
from models.style_controls import check_strength
from pipeline.stylizer import ClipStylizer, StylizerConfig
from pipeline.styles import StyleBlend, StyleCodes, StyleImage, StyleSchedule, parse_style
from pipeline.temporal import TemporalConfig


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as torch names it ('cpu', 'cuda:1')."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device: {device!r} is not a torch device (use 'auto', 'cpu' or 'cuda')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {device} asked for, but CUDA is not available")
    return device


def _setting(name: str, check, doc: str) -> property:
    """A `Stylizer` attribute read from and written to its `config` (through `check` when given); a change restarts
    a running stream's clip."""

    def read(self):
        return getattr(self.config, name)

    def write(self, value) -> None:
        self._configure(**{name: value if check is None else check(value)})

    return property(read, write, doc=doc)


class Stylizer:
    """Mamba-ST style transfer for images and frame streams, with strength, colour, blend and schedule controls.

    weights: a checkpoint folder / .safetensors file (loaded onto `device`), a loaded `MambaST` (used on its own
    device, in eval mode), or None for the bundled weights.
    style: see `set_style` (default: The Starry Night from opencv-doc's example data).
    working_size: short side the model runs at (0 = the frame's own size); results come back at the input size.
    strength: 0 = the content, 1 = full style. preserve_color: keep the content's colours.
    temporal: smoothing in `stream`: True/False, a smoothing strength in [0, 1], or a TemporalConfig.
    seed: fixes the style token permutations (same seed, same pictures).

    >>> stylizer = Stylizer("runs/small/final", style=["starry.jpg", "wave.png"], strength=0.8)
    >>> stylizer.stylize(torch.rand(3, 240, 320)).shape
    torch.Size([3, 240, 320])
    """

    def __init__(self, weights: str | os.PathLike | MambaST | None = None, style=None, working_size: int = 0,
                 strength: float = 1.0, preserve_color: bool = False,
                 temporal: bool | float | TemporalConfig = True, seed: int = 0, device: str | torch.device = "auto",
                 batch_size: int = 4):
        if isinstance(weights, MambaST):
            self.model = weights.eval()
        else:
            self.model = load_model(weights, device=resolve_device(device))
        self.config = StylizerConfig(working_size=working_size, batch_size=batch_size, seed=seed,
                                     temporal=_temporal_config(temporal), temporal_enabled=temporal is not False,
                                     strength=check_strength(strength), preserve_color=bool(preserve_color))
        self.codes = StyleCodes(self.model, seed=seed)
        self._generation = 0  # bumped by every change of style or settings: a running stream restarts its clip
        self.set_style(style)

    # --- settings -------------------------------------------------------------------------------------------

    def set_style(self, style=None, fps: Fraction | float | None = None) -> None:
        """Use another style from the next frame on (style codes already computed stay cached).

        style: a path; an HxWx3 RGB array; a list of those (an equal blend); a dict {path: weight} (a weighted
        blend); a blend string "a.jpg*0.7+b.png*0.3"; a schedule string "0:a.jpg,120:b.png" (keyframes are frame
        indices of `stream`; "5s:b.png" needs `fps`); a StyleImage/StyleBlend/StyleSchedule; None for The Starry
        Night.

        >>> stylizer.set_style({"starry.jpg": 2, "wave.png": 1})
        """
        if style is None:
            from pipeline.packaged_media import starry_night

            style = starry_night()
        self.style: StyleImage | StyleBlend | StyleSchedule = parse_style(style, fps)
        self._generation += 1

    working_size = _setting("working_size", None, "short side the model runs at (0 = the frame's own size)")
    strength = _setting("strength", check_strength, "0 = the content, 1 = full style")
    preserve_color = _setting("preserve_color", bool, "keep the content's colours")

    def _configure(self, **changes) -> None:
        config = replace(self.config, **changes)
        if config != self.config:
            self.config = config
            self._generation += 1

    # --- images ---------------------------------------------------------------------------------------------

    def stylize(self, images, frame: int = 0):
        """Stylize one image or a batch of independent images (no temporal smoothing).

        images: numpy HxWx3 / BxHxWx3, torch 3xHxW / Bx3xHxW, or a list of frames (sizes may differ); returns
        the same kind. `frame`: the frame index a schedule style is taken at.

        >>> stylizer.stylize(np.zeros((240, 320, 3), np.uint8)).shape
        (240, 320, 3)
        """
        frames, restore = _to_rgb8_batch(images)
        config = replace(self.config, temporal_enabled=False)
        out: list[np.ndarray | None] = [None] * len(frames)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            by_shape.setdefault(f.shape[:2], []).append(i)
        for shape, positions in by_shape.items():
            clip = ClipStylizer(self.model, self.style, shape, config, codes=self.codes, start_frame=frame)
            for i, result in zip(positions, clip([frames[i] for i in positions], [frame] * len(positions))):
                out[i] = result
        return restore(out)

    def stream(self, frames: Iterable) -> Iterator:
        """Stylize frames in order as they come, with temporal smoothing; yields one result per frame.

        Frames may be any mix of numpy/torch single frames. A frame of a new size starts a new clip (its style
        code is recomputed for the new token grid, or taken from the cache; the temporal state restarts), and so
        does a change of style or settings made while streaming (`set_style`, `working_size = ...`).

        >>> for out in stylizer.stream(open_source("clip.mp4").frames()):     # pipeline.source Frames work too
        ...     sink.write(out)
        """
        try:
            frames = iter(frames)
        except TypeError:
            raise UserError(f"frames: expected an iterable of frames, got {type(frames).__name__}") from None
        clip, clip_key, index = None, None, 0
        for frame in frames:
            image = getattr(frame, "image", frame)  # a pipeline.source.Frame
            rgb, restore = _to_rgb8_single(image)
            key = (rgb.shape[:2], self._generation)
            if key != clip_key:
                clip = ClipStylizer(self.model, self.style, rgb.shape[:2], self.config, codes=self.codes,
                                    start_frame=index)
                clip_key = key
            yield restore(clip([rgb], [index])[0])
            index += 1


def _temporal_config(temporal: bool | float | TemporalConfig) -> TemporalConfig:
    if isinstance(temporal, TemporalConfig):
        return temporal
    if isinstance(temporal, bool):
        return TemporalConfig()
    if isinstance(temporal, (int, float)):
        return TemporalConfig(strength=float(temporal))  # checks the range
    raise UserError(f"temporal: expected True/False, a strength in [0, 1] or a TemporalConfig, got {temporal!r}")


# ----------------------------------------------------------------------------------------------------------
# Frame conversion: numpy channel-last / torch channel-first, uint8 or float -> RGB uint8 HxWx3, and back


def _to_rgb8_batch(images):
    """-> (list of HxWx3 uint8, restore(list) -> the input's kind)."""
    if isinstance(images, (list, tuple, np.ndarray, torch.Tensor)) and len(images) == 0:
        raise UserError(f"images: an empty {'list' if isinstance(images, (list, tuple)) else 'batch'}")
    if isinstance(images, (list, tuple)):
        pairs = [_to_rgb8_single(im) for im in images]
        return [p[0] for p in pairs], lambda outs: [restore(o) for (_, restore), o in zip(pairs, outs)]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        frames = [_to_rgb8_single(im)[0] for im in images]
        _, restore_one = _to_rgb8_single(images[0])
        return frames, lambda outs: np.stack([restore_one(o) for o in outs])
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        frames = [_to_rgb8_single(im)[0] for im in images]
        _, restore_one = _to_rgb8_single(images[0])
        return frames, lambda outs: torch.stack([restore_one(o) for o in outs])
    rgb, restore = _to_rgb8_single(images)
    return [rgb], lambda outs: restore(outs[0])


def _to_rgb8_single(image):
    """One frame -> (HxWx3 uint8 RGB, restore(HxWx3 uint8) -> the input's kind, dtype and device)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"frame: a numpy frame must be HxWx3 RGB (channel-last), got shape {image.shape}")
        if image.dtype == np.uint8:
            return np.ascontiguousarray(image), lambda out: out
        if not np.issubdtype(image.dtype, np.floating):
            raise UserError(f"frame: numpy frames must be uint8 or float in [0, 1], got {image.dtype}")
        dtype = image.dtype
        return _quantise(image), lambda out: (out.astype(np.float32) / 255.0).astype(dtype)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"frame: a torch frame must be 3xHxW RGB (channel-first), got shape {tuple(image.shape)}")
        dtype, device = image.dtype, image.device
        hwc = image.detach().permute(1, 2, 0).cpu().numpy()
        if dtype == torch.uint8:
            return np.ascontiguousarray(hwc), lambda out: torch.from_numpy(out).permute(2, 0, 1).contiguous().to(device)
        if not dtype.is_floating_point:
            raise UserError(f"frame: torch frames must be uint8 or float in [0, 1], got {dtype}")
        return _quantise(hwc), lambda out: (torch.from_numpy(out).permute(2, 0, 1).float() / 255.0).to(device, dtype)
    raise UserError(f"frame: expected a numpy array or a torch tensor, got {type(image).__name__}")


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)

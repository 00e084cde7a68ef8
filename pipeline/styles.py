"""Styles as users name them (an image, a blend, a schedule), and the cache that turns them into style codes.

Text forms, as taken by `parse_style` and the CLI's --style::

    starry.jpg                               one image
    starry.jpg*0.7+wave.png*0.3              a blend: weights >= 0, normalised to sum 1
    0:starry.jpg,120:wave.png                a schedule: keyframes (frame index: style); between two keyframes the
                                             style morphs with a smoothstep, before the first and after the last it
                                             holds; repeat a style to hold it: 0:a.jpg,100:a.jpg,130:b.jpg
    0:starry.jpg,5s:starry.jpg*0.5+wave.png*0.5     keyframes in seconds ("5s", "2.5s") need the clip's fps

A path that exists is always taken as a path, so a file may be called "0:odd.jpg". Paths may not contain ","
inside a schedule, nor "+" / "*" inside a blend.

Python objects do the same without text: `StyleImage` (one image), `StyleBlend` (images and weights) and
`StyleSchedule` (keyframes). `StyleCodes` caches their codes per token grid (the style is fitted to the frames'
grid, see `MambaST.encode_style`), so each style is encoded once per grid and a schedule's morph frames only mix
cached codes (`models.style_controls.mix_style_codes`).

    >>> codes = StyleCodes(model, seed=0)
    >>> schedule = StyleSchedule.parse("0:starry.jpg,120:wave.png")
    >>> code = schedule.code_at(60, codes, grid=(34, 80))     # halfway: 0.5·starry + 0.5·wave, mixed once
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import available_memory
from models.errors import UserError
from models.mambast import MambaST, StyleCode
from models.style_controls import mix_style_codes, normalise_weights, smoothstep
from pipeline.images import load_image

_KEYFRAME = re.compile(r"^\s*(\d+(?:\.\d+)?)(s?)\s*:(.*)$")
_BLEND_PART = re.compile(r"^(.+?)\*\s*([^*]+?)\s*$")


# ----------------------------------------------------------------------------------------------------------
# Style objects


@dataclass(frozen=True, eq=False)
class StyleImage:
    """One style image (RGB uint8), identified by a hash of its pixels: the same picture is one cache entry."""

    name: str
    image: np.ndarray
    key: str
    path: str | None = None  # the file it was read from, if any (an output may never replace it)

    @classmethod
    def from_array(cls, image: np.ndarray, name: str = "array") -> StyleImage:
        """An HxWx3 uint8 RGB array (copied). A float array is taken as RGB in [0, 1]."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            shape = getattr(image, "shape", None)
            raise UserError(f"style {name}: expected an HxWx3 RGB image array, got {type(image).__name__} {shape}")
        if image.dtype != np.uint8:
            image = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
        image = np.ascontiguousarray(image).copy()
        image.setflags(write=False)
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(repr(image.shape).encode())
        return cls(name, image, digest.hexdigest())

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> StyleImage:
        path = os.fspath(path)
        image = cls.from_array(load_image(path), name=os.path.basename(path))
        return dataclasses.replace(image, path=path)

    def __repr__(self) -> str:
        return f"StyleImage({self.name!r}, {self.image.shape[1]}x{self.image.shape[0]})"


@dataclass(frozen=True, eq=False)
class StyleBlend:
    """Several styles mixed in the style code, with weights (normalised to sum 1)."""

    images: tuple[StyleImage, ...]
    weights: tuple[float, ...]

    @classmethod
    def of(cls, images: Sequence[StyleImage], weights: Sequence[float]) -> StyleBlend:
        if len(images) != len(weights):
            raise UserError(f"blend: {len(images)} styles but {len(weights)} weights")
        return cls(tuple(images), tuple(normalise_weights(weights, [im.name for im in images])))

    @property
    def key(self) -> str:
        return "+".join(f"{im.key}*{w!r}" for im, w in zip(self.images, self.weights))

    @property
    def name(self) -> str:
        return "+".join(f"{im.name}*{w:.3g}" for im, w in zip(self.images, self.weights))


Style = StyleImage | StyleBlend


@dataclass(frozen=True, eq=False)
class StyleSchedule:
    """Keyframes (frame index, style), strictly increasing; smoothstep morphs between neighbours.

    >>> schedule = StyleSchedule([(0, starry), (120, wave)])      # StyleImage or StyleBlend per keyframe
    >>> schedule.weights_at(30)                                  # [(starry, 0.84375), (wave, 0.15625)]
    """

    keyframes: tuple[tuple[int, Style], ...]

    def __post_init__(self):
        object.__setattr__(self, "keyframes", tuple((int(f), s) for f, s in self.keyframes))
        frames = [f for f, _ in self.keyframes]
        if not frames:
            raise UserError("style schedule: needs at least one keyframe")
        for frame, style in self.keyframes:
            if frame < 0:
                raise UserError(f"style schedule: keyframe {frame} is negative")
            if not isinstance(style, (StyleImage, StyleBlend)):
                raise UserError(f"style schedule: the style at frame {frame} must be a StyleImage or StyleBlend, "
                                f"got {type(style).__name__}")
        for a, b in zip(frames, frames[1:]):
            if b <= a:
                raise UserError(f"style schedule: keyframes must increase, got frame {b} after {a}")

    @classmethod
    def parse(cls, text: str, fps: Fraction | float | None = None) -> StyleSchedule:
        """From "0:starry.jpg,120:wave.png" (see the module docstring); images are loaded once per path."""
        loaded: dict[str, StyleImage] = {}

        def image(path: str) -> StyleImage:
            if path not in loaded:
                loaded[path] = StyleImage.from_path(path)
            return loaded[path]

        keyframes = []
        for frame, spec in parse_schedule(text, fps):
            if isinstance(spec, str):
                keyframes.append((frame, image(spec)))
            else:
                keyframes.append((frame, StyleBlend.of([image(p) for p, _ in spec], [w for _, w in spec])))
        return cls(tuple(keyframes))

    def weights_at(self, frame: int) -> list[tuple[Style, float]]:
        """The one or two keyframe styles in effect at `frame`, with their weights (summing to 1)."""
        frames = [f for f, _ in self.keyframes]
        if frame <= frames[0]:
            return [(self.keyframes[0][1], 1.0)]
        if frame >= frames[-1]:
            return [(self.keyframes[-1][1], 1.0)]
        i = next(i for i, f in enumerate(frames) if f > frame) - 1
        (f0, s0), (f1, s1) = self.keyframes[i], self.keyframes[i + 1]
        w = smoothstep((frame - f0) / (f1 - f0))
        if w == 0.0 or s0.key == s1.key:
            return [(s0, 1.0)]
        if w == 1.0:
            return [(s1, 1.0)]
        return [(s0, 1.0 - w), (s1, w)]

    def code_at(self, frame: int, codes: StyleCodes, grid: tuple[int, int]) -> StyleCode:
        """The style code at `frame`: a keyframe's cached code, or the smoothstep mix of two (mixed once)."""
        parts = self.weights_at(frame)
        if len(parts) == 1:
            return codes.code(parts[0][0], grid)
        return codes.morph(parts, grid)

    @property
    def name(self) -> str:
        return ",".join(f"{f}:{s.name}" for f, s in self.keyframes)


def style_files(style) -> tuple[str, ...]:
    """The image files a StyleImage, StyleBlend or StyleSchedule was read from (inputs an output must not replace)."""
    if isinstance(style, StyleImage):
        return (style.path,) if style.path else ()
    if isinstance(style, StyleBlend):
        return tuple(path for image in style.images for path in style_files(image))
    if isinstance(style, StyleSchedule):
        return tuple(dict.fromkeys(path for _, part in style.keyframes for path in style_files(part)))
    return ()


def images_at(style, frame: int = 0) -> list[tuple[StyleImage, float]]:
    """The style images in effect at `frame` with their total weights, heaviest first (what a contact sheet shows
    beside the stylized frame). A StyleImage is itself with weight 1."""
    if isinstance(style, StyleImage):
        return [(style, 1.0)]
    parts = style.weights_at(frame) if isinstance(style, StyleSchedule) else [(style, 1.0)]
    totals: dict[str, list] = {}
    for part, weight in parts:
        shares = [(part, 1.0)] if isinstance(part, StyleImage) else zip(part.images, part.weights)
        for image, share in shares:
            totals.setdefault(image.key, [image, 0.0])[1] += weight * share
    return sorted(map(tuple, totals.values()), key=lambda pair: -pair[1])


# ----------------------------------------------------------------------------------------------------------
# The code cache


class StyleCodes:
    """Style codes of one model and seed, cached by (style, token grid), least recently used dropped first.

    `budget_gb` bounds the cached tensors (default: 4 × the model's `state_cache_gb`, at most a quarter of the
    memory available when the cache is made: an evaluation over dozens of paintings at 512² would otherwise hold
    ~15 GB of codes); the code asked for last is always kept.

    >>> codes = StyleCodes(model, seed=0)
    >>> code = codes.code(StyleImage.from_path("starry.jpg"), grid=(32, 32))     # encoded
    >>> code is codes.code(StyleImage.from_path("starry.jpg"), grid=(32, 32))    # cached
    True
    """

    MORPHS_KEPT = 2  # morph codes kept: a frame asked twice (a chunk's lead-in, a retry) is mixed once

    def __init__(self, model: MambaST, seed: int = 0, budget_gb: float | None = None):
        self.model = model
        self.seed = int(seed)
        if budget_gb is None:
            self.budget = min(4 * model.cfg.state_cache_gb * 2**30, available_memory() / 4)
        else:
            self.budget = budget_gb * 2**30
        self._codes: OrderedDict[tuple, tuple[StyleCode, int]] = OrderedDict()
        self._morphs: OrderedDict[tuple, StyleCode] = OrderedDict()

    def __len__(self) -> int:
        return len(self._codes)

    def code(self, style: Style, grid: tuple[int, int]) -> StyleCode:
        key = (style.key, tuple(grid))
        if key in self._codes:
            self._codes.move_to_end(key)
            return self._codes[key][0]
        if isinstance(style, StyleBlend):
            code = mix_style_codes(self.model, [self.code(im, grid) for im in style.images], list(style.weights))
        elif isinstance(style, StyleImage):
            device = next(self.model.parameters()).device
            image = torch.from_numpy(style.image.copy()).permute(2, 0, 1)[None].float().div(255.0).to(device)
            code = self.model.encode_style(image, tuple(grid), seed=self.seed)
        else:
            raise TypeError(f"expected a StyleImage or StyleBlend, got {type(style).__name__}")
        self._codes[key] = (code, _nbytes(code))
        self._evict()
        return code

    def morph(self, parts: Sequence[tuple[Style, float]], grid: tuple[int, int]) -> StyleCode:
        """The mix of cached codes at one frame of a morph (kept apart from `code`'s cache: each frame differs)."""
        key = (tuple((style.key, w) for style, w in parts), tuple(grid))
        if key not in self._morphs:
            self._morphs[key] = mix_style_codes(self.model, [self.code(style, grid) for style, _ in parts],
                                                [w for _, w in parts])
            while len(self._morphs) > self.MORPHS_KEPT:
                self._morphs.popitem(last=False)
        self._morphs.move_to_end(key)
        return self._morphs[key]

    def _evict(self) -> None:
        total = sum(n for _, n in self._codes.values())
        while total > self.budget and len(self._codes) > 1:
            _, (_, n) = self._codes.popitem(last=False)
            total -= n


def _nbytes(code: StyleCode) -> int:
    """Bytes a code keeps alive; a blend's parts count too (they stay alive while it does)."""
    layers = [part for layer in code.layers for part in ([layer] + [p for p, _ in layer.mix])]
    tensors = [code.tokens] + [t for layer in layers for t in (layer.skip, layer.states, layer.u, layer.delta, layer.B)
                               if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# Parsing


def parse_blend(text: str) -> list[tuple[str, float]]:
    """"a.jpg*0.7+b.png*0.3" -> [("a.jpg", 0.7), ("b.png", 0.3)] (weights as given; a part without "*w" weighs 1)."""
    parts = []
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise UserError(f"style blend {text!r}: empty part (a stray '+')")
        m = _BLEND_PART.match(part)
        path, weight = (m.group(1).strip(), m.group(2)) if m else (part, "1")
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"style blend {text!r}: weight {weight!r} of {path} is not a number") from None
        parts.append((path, w))
    normalise_weights([w for _, w in parts], [p for p, _ in parts])  # checks: >= 0, finite, not all 0
    return parts


def parse_schedule(text: str, fps: Fraction | float | None = None) -> list[tuple[int, str | list[tuple[str, float]]]]:
    """"0:starry.jpg,120:wave.png" -> [(0, "starry.jpg"), (120, "wave.png")]; a blend gives [(path, weight), ...].

    Keyframes are frame indices, or seconds with an "s" ("2.5s:wave.png"), which need `fps` (rounded to the
    nearest frame). Frames must be whole numbers and strictly increasing.

    >>> parse_schedule("0:a.jpg,2s:a.jpg*0.5+b.jpg*0.5", fps=24)
    [(0, 'a.jpg'), (48, [('a.jpg', 0.5), ('b.jpg', 0.5)])]
    """
    keyframes = []
    for part in text.split(","):
        m = _KEYFRAME.match(part)
        if not m or not m.group(3).strip():
            raise UserError(f"style schedule: {part.strip()!r} is not FRAME:STYLE (e.g. 0:starry.jpg or 5s:wave.png)")
        number, seconds, spec = m.group(1), m.group(2), m.group(3).strip()
        if seconds:
            if fps is None:
                raise UserError(f"style schedule: {part.strip()!r} is in seconds, which needs the clip's frame rate")
            frame = round(float(number) * float(fps))
        elif "." in number:
            raise UserError(f"style schedule: {part.strip()!r}: a frame index must be a whole number "
                            f"(write {number}s for seconds)")
        else:
            frame = int(number)
        if keyframes and frame <= keyframes[-1][0]:
            raise UserError(f"style schedule: {part.strip()!r} (frame {frame}) must come after frame {keyframes[-1][0]}")
        is_blend = ("+" in spec or "*" in spec) and not os.path.exists(spec)
        keyframes.append((frame, parse_blend(spec) if is_blend else spec))
    return keyframes


def is_schedule(text: str) -> bool:
    """Whether a --style string is a schedule ("0:a.jpg,..."), not a path or a blend."""
    return not os.path.exists(text) and _KEYFRAME.match(text.split(",")[0]) is not None


def parse_style(spec, fps: Fraction | float | None = None) -> StyleImage | StyleBlend | StyleSchedule:
    """Anything a user may give as a style -> a StyleImage, StyleBlend or StyleSchedule.

    * a path (str or Path), a blend string "a.jpg*0.7+b.png*0.3", or a schedule string "0:a.jpg,120:b.png";
    * an HxWx3 RGB array (uint8, or float in [0, 1]);
    * a list of paths/arrays: an equal-weight blend; a dict {path: weight}: a weighted blend;
    * a StyleImage, StyleBlend or StyleSchedule, returned as it is.

    >>> parse_style({"starry.jpg": 2, "wave.png": 1})    # StyleBlend(weights=(0.667, 0.333))
    """
    if isinstance(spec, (StyleImage, StyleBlend, StyleSchedule)):
        return spec
    if isinstance(spec, np.ndarray):
        return StyleImage.from_array(spec)
    if isinstance(spec, torch.Tensor):
        raise UserError("style: pass a numpy HxWx3 RGB array or a path, not a torch tensor")
    if isinstance(spec, Path):
        return StyleImage.from_path(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if os.path.exists(text):
            return StyleImage.from_path(text)
        if is_schedule(text):
            return StyleSchedule.parse(text, fps)
        if "+" in text or "*" in text:
            parts = parse_blend(text)
            return StyleBlend.of([StyleImage.from_path(p) for p, _ in parts], [w for _, w in parts])
        return StyleImage.from_path(text)  # a missing file: load_image names it
    if isinstance(spec, dict):
        if not spec:
            raise UserError("style: an empty blend dict")
        return StyleBlend.of([_single(s) for s in spec], list(spec.values()))
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise UserError("style: an empty list of styles")
        if len(spec) == 1:
            return _single(spec[0])
        return StyleBlend.of([_single(s) for s in spec], [1.0] * len(spec))
    raise UserError(f"style: expected a path, an RGB array, a list, a dict or a schedule string, "
                    f"got {type(spec).__name__}")


def _single(spec) -> StyleImage:
    if isinstance(spec, StyleImage):
        return spec
    if isinstance(spec, np.ndarray):
        return StyleImage.from_array(spec)
    if isinstance(spec, (str, Path)):
        return StyleImage.from_path(spec)
    raise UserError(f"style: a blend part must be a path or an RGB array, got {type(spec).__name__}")

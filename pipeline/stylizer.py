"""The stylizer stage: the model, one clip's cached style, and frames in → stylized frames out.

    frames (RGB uint8, source size)
      │ resize to the working size (aspect kept; --working-size is the short side; smaller frames are enlarged)
      │ model.stylize_tokens, a batch at a time         (content encoder + MSTD readout of the cached style states;
      │                                                   strength < 1: lerp with the identity pass, models/style_controls.py)
      │ TokenSmoother, frame by frame                   (temporal state smoothing at token level, pipeline/temporal.py)
      │ model.decode_stylized, a batch at a time        (CNN decoder; strength < 1: + the fading content residual)
      │ back to the source size                          (guided upsampling when the working size is smaller: 4K
      │                                                   stays sharp; area averaging when it is larger)
      │ colour preservation (optional)                  (stylized luma, the source frame's own chroma, at full size)
      │ OutputSmoother, frame by frame                  (occlusion-aware blend with the warped previous output)
    stylized frames (RGB uint8, source size)

The output smoother runs last, at the source size, with flow from the source frames: guided upsampling gives each
frame the source's own edges and sensor noise, so smoothing before it (at the working size) leaves that flicker in
(vtest, 60 frames, warping error ratio to per-frame 0.82 before upsampling vs 0.48 after; bikes 0.74 vs 0.51).

The style is one image, a `StyleBlend`, a `StyleSchedule` (a style per frame index: batches are split where the
code changes) or a ready `StyleCode` (pipeline/styles.py).

A `ClipStylizer` is sequential in time (the smoothers carry state), so it is the unit of work per chunk: a runner
gives each chunk its own instance, starting `lead_in` frames early and discarding those outputs, which makes
chunked output bit-identical to one-piece output (pipeline/temporal.py explains why).

Everything here is plain Python and works without Ray; pipeline/chunks.py drives it chunk by chunk.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch

from models.checkpoint import available_memory
from models.errors import UserError
from models.mambast import MambaST, MambaSTConfig, StyleCode, pad_to_multiple
from models.style_controls import check_strength, preserve_colors
from pipeline.source import Frame
from pipeline.styles import StyleBlend, StyleCodes, StyleImage, StyleSchedule
from pipeline.temporal import MotionEstimator, OutputSmoother, TemporalConfig, TokenSmoother


@dataclass(frozen=True)
class StylizerConfig:
    working_size: int = 0         # short side of the working resolution in pixels; 0 = the source size
    batch_size: int = 4
    seed: int = 0                 # fixes the style token permutations: same seed, same frames
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    temporal_enabled: bool = True
    # The token-level stage (the output-level stage runs whenever temporal is on). Off by default: with the
    # bundled weights it fades the style (`mambast bench temporal --frames 60 [--token-smoothing]`, ratio of
    # warping error to per-frame / style distance change: vtest 0.58 / -0.4 % without, 0.56 / -0.2 % with;
    # bikes 0.50 / +1.8 % without, 0.47 / +5.9 % with: averaged tokens decode into flatter brushwork).
    token_smoothing: bool = False
    guide_radius: int = 4         # guided upsampling window, in working-resolution pixels
    guide_eps: float = 1e-3
    strength: float = 1.0         # style strength: 0 = the content, 1 = full style (models/style_controls.py)
    preserve_color: bool = False  # keep the content's colours, transfer the style's texture (luma only)
    # Clips (the chunk engine: Settings.stylizer_config) pad every short batch to batch_size so that chunk
    # boundaries never change a frame's bits; single images and live streams run the frames they have (one frame
    # costs one frame, not batch_size: issue 23, measured in the closing note).
    pad_batches: bool = False

    def __post_init__(self):
        check_strength(self.strength)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"seed: must be an integer, got {str(self.seed)[:40]!r}")
        if not isinstance(self.working_size, int) or isinstance(self.working_size, bool) or self.working_size < 0:
            raise UserError(f"working_size: must be a non-negative integer (0 = source size), got {self.working_size!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise UserError(f"batch_size: must be a positive integer, got {self.batch_size!r}")

    @property
    def lead_in(self) -> int:
        """Frames a chunk must start early so that its kept frames equal a one-piece run bit for bit."""
        if not self.temporal_enabled or self.temporal.strength == 0:
            return 0
        return self.temporal.chunk_lead_in(2 if self.token_smoothing else 1)


def working_shape(height: int, width: int, working_size: int) -> tuple[int, int]:
    """(h, w) at the working resolution: short side = working_size (0: the source's), aspect kept.

    Frames smaller than the working size are enlarged to it, as the official test transform does (`Resize(512)`):
    the model sees the world in 8-pixel patches, so its strokes and the detail it keeps are counted in working
    pixels. A 256² image run at 256² is 32×32 tokens and loses its content to blocky strokes (`mambast eval
    quality --working-size 256`, bundled weights: content distance 2.14, worse than a σ = 3 blur's 1.57); run at
    512² and averaged back down it keeps it (1.54). The price is the model's time for the larger frame.
    """
    short = min(height, width)
    if working_size <= 0 or working_size == short:
        return height, width
    s = working_size / short
    return max(1, round(height * s)), max(1, round(width * s))


def work_memory(cfg: MambaSTConfig, shape: tuple[int, int], batch_size: int) -> int:
    """About how many bytes stylizing frames of `shape` (h, w at the working size) takes, `batch_size` at a time:
    the clip's cached style states (per MSTD layer, 4 scan directions) plus, per frame in a batch, the decoder's
    activations and the scan's states. Measured with the bundled weights (256x512): 1.2 KB per pixel for the
    style, 0.6 KB per pixel and frame; this gives 0.8 and 1.0 KB."""
    pixels = shape[0] * shape[1]
    tokens_per_pixel = 1 / cfg.patch_size ** 2
    style = 4 * cfg.d_inner * cfg.d_state * cfg.n_decoder_layers * 4 * tokens_per_pixel
    c1, c2, c3 = cfg.decoder_channels
    frame = 4 * (3 * c3 + 3 * c2 / 4 + 3 * c1 / 16 + 4 * cfg.d_inner * (1 + cfg.d_state) * tokens_per_pixel)
    return int(pixels * (style + batch_size * frame))


def check_work_fits(cfg: MambaSTConfig, frame_shape: tuple[int, int], working_size: int, batch_size: int,
                    where: str = "frames") -> None:
    """Refuse, before anything is allocated, work that does not fit in the memory available, saying what would."""
    work = working_shape(*frame_shape, working_size)
    needed, free = work_memory(cfg, work, batch_size), available_memory()
    if needed <= free:
        return
    fits = [size for size in range(min(work), 0, -8 if min(work) > 64 else -1)
            if work_memory(cfg, working_shape(*frame_shape, size), batch_size) <= free]
    h, w = frame_shape
    advice = (f"a working size of at most {fits[0]} fits" if fits and working_size and fits[0] >= 16
              else "no working size fits these frames (the long side is too long for this machine)")
    raise UserError(f"{where}: {w}x{h} frames at working size {working_size or min(h, w)} run at "
                    f"{work[1]}x{work[0]}, about {needed / 2**30:.1f} GB for a batch of {batch_size}; "
                    f"{free / 2**30:.1f} GB is available: {advice}")


def to_working_size(frame: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """RGB uint8 frame -> (h, w) = shape: area averaging to shrink, bicubic to enlarge."""
    h, w = shape
    if frame.shape[:2] == (h, w):
        return frame
    shrink = h * w < frame.shape[0] * frame.shape[1]
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def to_source_size(stylized: np.ndarray, low: np.ndarray, full: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Stylized float frame at the working size -> the size of the source frame `full` (its working copy: `low`)."""
    H, W = full.shape[:2]
    if stylized.shape[:2] == (H, W):
        return stylized
    if stylized.shape[0] * stylized.shape[1] > H * W:
        return cv2.resize(stylized, (W, H), interpolation=cv2.INTER_AREA)
    return guided_upsample(stylized, to_gray01(low), to_gray01(full), radius, eps)


def guided_upsample(low_out: np.ndarray, low_guide: np.ndarray, full_guide: np.ndarray,
                    radius: int, eps: float) -> np.ndarray:
    """Joint upsampling with a guided filter (He et al.; "fast guided filter", Wu et al. 2018).

    At working resolution, fit out ≈ a·I + b per window of the gray guide I (a, b per channel), then upsample a and
    b smoothly and apply them to the full-resolution guide: the output gets the source's edges and detail at full
    size. Inputs float32 in [0, 1]: low_out (h, w, 3), low_guide (h, w), full_guide (H, W).
    """
    k = (2 * radius + 1, 2 * radius + 1)
    box = lambda x: cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT)
    mean_i = box(low_guide)
    var_i = box(low_guide * low_guide) - mean_i * mean_i
    H, W = full_guide.shape
    out = np.empty((H, W, 3), np.float32)
    for c in range(3):
        p = low_out[..., c]
        mean_p = box(p)
        cov_ip = box(low_guide * p) - mean_i * mean_p
        a = cov_ip / (var_i + eps)
        b = mean_p - a * mean_i
        a = cv2.resize(box(a), (W, H), interpolation=cv2.INTER_LINEAR)
        b = cv2.resize(box(b), (W, H), interpolation=cv2.INTER_LINEAR)
        out[..., c] = a * full_guide + b
    return out


def to_gray01(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


class ClipStylizer:
    """Stylizes the frames of one clip (or one chunk of it), in order, with the clip's style computed once.

    >>> stylizer = ClipStylizer(model, style_rgb, frame_shape=(272, 640), config=StylizerConfig(working_size=256))
    >>> outputs = stylizer(list_of_rgb_uint8_frames)      # as many frames out as in, same size

    With a schedule, frames need their clip index: a chunk passes `start_frame`, or `indices` per call.

    >>> schedule = StyleSchedule.parse("0:starry.jpg,120:wave.png")
    >>> stylizer = ClipStylizer(model, schedule, (272, 640), config, start_frame=96)   # a chunk from frame 96
    >>> outputs = stylizer(frames)                                   # frames 96, 97, ... of the clip

    `codes` shares a style-code cache between stylizers (chunks, size changes); its seed must be the config's.
    """

    def __init__(self, model: MambaST, style: np.ndarray | StyleCode | StyleImage | StyleBlend | StyleSchedule,
                 frame_shape: tuple[int, int], config: StylizerConfig | None = None, *,
                 codes: StyleCodes | None = None, start_frame: int = 0):
        self.model = model
        self.config = config or StylizerConfig()
        self.frame_shape = tuple(frame_shape)
        if not isinstance(start_frame, int) or isinstance(start_frame, bool) or start_frame < 0:
            raise UserError(f"frame: the clip index must be an integer >= 0, got {str(start_frame)[:40]!r}")
        if len(self.frame_shape) != 2 or min(self.frame_shape) < 1:
            raise UserError(f"frames: must be at least 1x1 pixels, got {'x'.join(map(str, self.frame_shape[::-1]))}")
        check_work_fits(model.cfg, self.frame_shape, self.config.working_size, self.config.batch_size)
        self.work_shape = working_shape(*self.frame_shape, self.config.working_size)
        self.device = next(model.parameters()).device
        self.grid = model.token_grid(*self.work_shape)
        if codes is not None and codes.seed != self.config.seed:
            raise ValueError(f"style code cache has seed {codes.seed}, the config {self.config.seed}")
        self.codes = codes if codes is not None else StyleCodes(model, seed=self.config.seed)
        self.schedule = style if isinstance(style, StyleSchedule) else None
        if isinstance(style, StyleCode):
            if tuple(style.grid) != self.grid:
                raise ValueError(f"style code is for token grid {style.grid}, frames need {self.grid}")
            self.style = style
        elif isinstance(style, np.ndarray):
            self.style = self.codes.code(StyleImage.from_array(style, "style"), self.grid)
        elif isinstance(style, (StyleImage, StyleBlend)):
            self.style = self.codes.code(style, self.grid)
        elif self.schedule is not None:
            self.style = self.schedule.code_at(start_frame, self.codes, self.grid)
        else:
            raise TypeError(f"style: expected an RGB array, StyleImage, StyleBlend, StyleSchedule or StyleCode, "
                            f"got {type(style).__name__}")
        self.next_index = start_frame  # clip index of the next frame, when `__call__` is given no indices
        smooth = self.config.temporal_enabled and self.config.temporal.strength > 0
        self.motion = MotionEstimator(self.config.temporal) if smooth else None
        self.token_smoother = TokenSmoother(self.config.temporal) if smooth and self.config.token_smoothing else None
        self.output_smoother = OutputSmoother(self.config.temporal) if smooth else None
        self.smoothing_seconds = 0.0  # time spent in flow and smoothing (benchmarks report it as the smoothing cost)

    def reset(self) -> None:
        """Forget the temporal state (a new shot or a new chunk)."""
        for part in (self.motion, self.token_smoother, self.output_smoother):
            if part is not None:
                part.reset()

    def code_at(self, index: int) -> StyleCode:
        """The style code for clip frame `index` (the same code for every frame unless the style is a schedule)."""
        return self.style if self.schedule is None else self.schedule.code_at(index, self.codes, self.grid)

    def __call__(self, frames: list[np.ndarray], indices: list[int] | None = None) -> list[np.ndarray]:
        """RGB uint8 frames of the source size, in clip order -> stylized RGB uint8 frames of the same size.

        `indices`: the frames' indices in the clip (only schedules use them); default: counting on from the
        previous call (from `start_frame` on the first).
        """
        if indices is None:
            indices = list(range(self.next_index, self.next_index + len(frames)))
        elif len(indices) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(indices)} indices")
        if indices:
            self.next_index = indices[-1] + 1
        self._check_sizes(frames)
        if self.config.strength == 0:
            return [f.copy() for f in frames]  # strength 0 is the content itself
        out, batch, code = [], [], None
        for frame, index in zip(frames, indices):
            frame_code = self.code_at(index)
            if batch and (len(batch) == self.config.batch_size or frame_code is not code):
                out.extend(self._batch(batch, code))
                batch = []
            batch.append(frame)
            code = frame_code
        if batch:
            out.extend(self._batch(batch, code))
        return out

    def stylize_frames(self, frames: Sequence[Frame]) -> list[Frame]:
        """Source Frames in clip order -> stylized Frames with the same index, pts and alpha."""
        images = self([f.image for f in frames], [f.index for f in frames])
        return [replace(frame, image=image) for frame, image in zip(frames, images)]

    def _check_sizes(self, frames: list[np.ndarray]) -> None:
        for f in frames:
            if f.shape[:2] != self.frame_shape:
                raise UserError(f"frame size changed mid-clip: {f.shape[1]}x{f.shape[0]}, "
                                f"expected {self.frame_shape[1]}x{self.frame_shape[0]}")

    def _batch(self, frames: list[np.ndarray], code: StyleCode) -> list[np.ndarray]:
        h, w = self.work_shape
        small = [to_working_size(f, (h, w)) for f in frames]
        x = torch.cat([image_to_tensor(f) for f in small]).to(self.device)
        # With pad_batches every model call sees a full batch (short batches padded with the last frame, outputs
        # dropped): CPU kernels round differently for different batch sizes (~1e-6), and chunk boundaries or
        # schedule keyframes must not change a frame's bits. Without it a short batch costs only its frames.
        n = len(small)
        missing = self.config.batch_size - n if self.config.pad_batches else 0
        x_full = torch.cat([x, x[-1:].expand(missing, -1, -1, -1)]) if missing > 0 else x
        x_pad, _ = pad_to_multiple(x_full, self.model.cfg.patch_size)
        with torch.no_grad():
            tokens, identity = self.model.stylize_tokens(x_pad, code, self.config.strength)
            t = time.perf_counter()
            motions = [self.motion.step(f) for f in frames] if self.motion is not None else [None] * len(frames)
            if self.token_smoother is not None:
                grids = tokens.permute(0, 3, 1, 2)
                smoothed = [self.token_smoother.step(f, grids[i:i + 1], motion=m)
                            for i, (f, m) in enumerate(zip(small, motions))]
                tokens = torch.cat(smoothed + [grids[n:]]).permute(0, 2, 3, 1)
            if self.motion is not None:
                self.smoothing_seconds += time.perf_counter() - t
            images = self.model.decode_stylized(tokens, identity, x_full, self.config.strength)[:n].clamp(0, 1)
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        out = []
        for full, low, stylized, m in zip(frames, small, images, motions):
            stylized = to_source_size(stylized, low, full, self.config.guide_radius, self.config.guide_eps)
            if self.config.preserve_color:
                stylized = preserve_colors(torch.from_numpy(np.ascontiguousarray(stylized)).permute(2, 0, 1)[None],
                                           image_to_tensor(full))[0].permute(1, 2, 0).numpy()
            if self.output_smoother is not None:
                t = time.perf_counter()
                stylized = self.output_smoother.step(full, stylized, motion=m)
                self.smoothing_seconds += time.perf_counter() - t
            out.append(np.clip(np.rint(stylized * 255.0), 0, 255).astype(np.uint8))
        return out

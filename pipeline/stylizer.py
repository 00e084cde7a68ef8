"""The stylizer: the model, one clip's cached style, and frames in → stylized frames out, in stages.

    frames (RGB uint8, source size), in clip order, a batch at a time
      │ prepare   resize to the working size (aspect kept; --working-size is the short side; smaller frames are
      │           enlarged) and upload, uint8 (pinned memory, non_blocking on CUDA)
      │ motion    MotionEstimator.steps: DIS flow both ways + occlusion mask from the *input* frames, the batch's
      │           frames on a thread each (pipeline/temporal.py); needs nothing from the model, so it runs ahead of it
      │ model     model.stylize_tokens                 (content encoder + MSTD readout of the cached style states;
      │                                                 strength < 1: lerp with the identity pass, models/style_controls.py)
      │           TokenSmoother, frame by frame        (optional: temporal state smoothing at token level)
      │           model.decode_stylized                (CNN decoder; strength < 1: + the fading content residual)
      │ post      back to the source size               (guided upsampling when the working size is smaller: 4K
      │                                                  stays sharp; area averaging when it is larger)
      │           colour preservation (optional)        (stylized luma, the source frame's own chroma, at full size)
      │           OutputSmoother, frame by frame        (occlusion-aware blend with the warped previous output)
      │           uint8                                  on the host (OpenCV: HostPostprocessor) or on the model's
      │                                                  device (pipeline/device_post.py), per StylizerConfig.post
      │ download  uint8 frames back to the host          (device post only; the host post's frames are there)
    stylized frames (RGB uint8, source size)

Pipelined (StylizerConfig.pipelined, the default), every stage runs on a thread of its own with a couple of
batches queued between stages (pipeline/frame_threads.run_stages): the flow and the host post-processing of one
batch overlap the model's work on the next; OpenCV, PyAV and torch let go of the GIL. Serial, the same stage
objects run one after another in the caller: the oracle, whose frames the pipelined run equals bit for bit. Each
piece of temporal state lives in exactly one stage (the motion estimator in motion, the token smoother in model,
the output smoother in post) and sees the frames in order, so threads change no result.

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

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch

from models.checkpoint import available_memory
from models.errors import UserError
from models.mambast import MambaST, MambaSTConfig, StyleCode, pad_to_multiple
from models.style_controls import check_strength, preserve_colors
from pipeline.device_post import DevicePostprocessor, download_uint8, upload_uint8
from pipeline.frame_threads import run_stages
from pipeline.source import Frame
from pipeline.styles import StyleBlend, StyleCodes, StyleImage, StyleSchedule
from pipeline.temporal import FrameMotion, MotionEstimator, OutputSmoother, TemporalConfig, TokenSmoother

POST_PLACES = ("auto", "device", "host")
STAGE_THREADS = 6  # a pipelined ClipStylizer's threads at most: feeding + prepare, motion, model, post, download


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
    # The stages on threads of their own, overlapped (False: one after another in the caller, the same frames).
    pipelined: bool = True
    # Where post-processing runs: "device" (pipeline/device_post.py, on the model's device), "host" (OpenCV) or
    # "auto": the device on CUDA, the host on CPU.
    post: str = "auto"

    def __post_init__(self):
        check_strength(self.strength)
        if self.post not in POST_PLACES:
            raise UserError(f"post: must be one of {', '.join(POST_PLACES)}, got {str(self.post)[:40]!r}")
        if not isinstance(self.pipelined, bool):
            raise UserError(f"pipelined: must be true or false, got {str(self.pipelined)[:40]!r}")
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
    """HxWx3 uint8 -> 1x3xHxW float in [0, 1]. A read-only frame (a decoder's buffer) is copied first: torch does
    not wrap read-only memory."""
    image = np.ascontiguousarray(image) if image.flags.writeable else image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


@dataclass
class Batch:
    """The frames of one model call on their way through the stages; each stage fills in its fields."""

    frames: list[Frame]                      # the source frames, RGB uint8, in clip order
    code: StyleCode                          # their style
    small: list[np.ndarray] | None = None    # prepare: the working-size copies, on the host
    work: torch.Tensor | None = None         # prepare: the same as one (n, h, w, 3) uint8 tensor on the device
    full: torch.Tensor | None = None         # prepare, device post only: the frames, (n, H, W, 3) uint8 on the device
    motions: list[FrameMotion | None] | None = None   # motion: per frame (None without smoothing)
    stylized: torch.Tensor | None = None     # model: (n, 3, h, w) float in [0, 1] on the device
    output: torch.Tensor | None = None       # device post: (n, H, W, 3) uint8 on the device
    images: list[np.ndarray] | None = None   # post (host) or download: the stylized frames, RGB uint8 on the host


class HostPostprocessor:
    """The post stage with OpenCV on the host: the model's float frames -> stylized RGB uint8 frames of the source
    size (guided upsampling, colour preservation, the output smoother, rounding), one frame at a time, in order.

    The same call as pipeline/device_post.py's DevicePostprocessor, with the frames on the host: the smoother's state
    lives here, so one instance serves one clip (or chunk) from its first frame on.
    """

    on_device = False  # takes the working-size and source frames as host arrays, returns host frames

    def __init__(self, config: StylizerConfig):
        self.config = config
        smooth = config.temporal_enabled and config.temporal.strength > 0
        self.smoother = OutputSmoother(config.temporal) if smooth else None
        self.smoothing_seconds = 0.0

    def reset(self) -> None:
        if self.smoother is not None:
            self.smoother.reset()

    def __call__(self, stylized: torch.Tensor, small: Sequence[np.ndarray], full: Sequence[np.ndarray],
                 motions: Sequence[FrameMotion | None]) -> list[np.ndarray]:
        """(n, 3, h, w) float in [0, 1] on any device, the n working-size and source frames -> n RGB uint8 frames."""
        images = stylized.permute(0, 2, 3, 1).float().cpu().numpy()
        out = []
        for frame, low, image, motion in zip(full, small, images, motions):
            image = to_source_size(image, low, frame, self.config.guide_radius, self.config.guide_eps)
            if self.config.preserve_color:
                image = preserve_colors(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None],
                                        image_to_tensor(frame))[0].permute(1, 2, 0).numpy()
            if self.smoother is not None:
                started = time.perf_counter()
                image = self.smoother.step(frame, image, motion=motion)
                self.smoothing_seconds += time.perf_counter() - started
            out.append(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))
        return out


def make_postprocessor(config: StylizerConfig, frame_shape: tuple[int, int], work_shape: tuple[int, int],
                       device: torch.device):
    """The post stage `config.post` asks for: on the model's device, or on the host (auto: the device on CUDA)."""
    place = config.post if config.post != "auto" else ("device" if device.type == "cuda" else "host")
    if place == "host":
        return HostPostprocessor(config)
    return DevicePostprocessor(config, frame_shape, work_shape, device)


class ClipStylizer:
    """Stylizes the frames of one clip (or one chunk of it), in order, with the clip's style computed once.

    >>> stylizer = ClipStylizer(model, style_rgb, frame_shape=(272, 640), config=StylizerConfig(working_size=256))
    >>> outputs = stylizer(list_of_rgb_uint8_frames)      # as many frames out as in, same size
    >>> for frame in stylizer.stylize_stream(frames):      # pipeline.source Frames in clip order, as they come
    ...     sink.write(frame)

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
        # the batch's flows at once, a thread per frame (pipeline/temporal.py: one thread alone caps a GPU at 1080p)
        flow_workers = min(self.config.batch_size, os.cpu_count() or 1)
        self.motion = MotionEstimator(self.config.temporal, workers=flow_workers) if smooth else None
        self.token_smoother = TokenSmoother(self.config.temporal) if smooth and self.config.token_smoothing else None
        self.post = make_postprocessor(self.config, self.frame_shape, self.work_shape, self.device)
        self.motion_seconds = self.token_seconds = 0.0  # written by the motion and model stages

    @property
    def smoothing_seconds(self) -> float:
        """Time spent in flow and smoothing (benchmarks report it as the smoothing cost)."""
        return self.motion_seconds + self.token_seconds + getattr(self.post, "smoothing_seconds", 0.0)

    def reset(self) -> None:
        """Forget the temporal state (a new shot or a new chunk)."""
        for part in (self.motion, self.token_smoother, self.post):
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
        return [f.image for f in self.stylize_stream(Frame(i, i, image) for i, image in zip(indices, frames))]

    def stylize_frames(self, frames: Sequence[Frame]) -> list[Frame]:
        """Source Frames in clip order -> stylized Frames with the same index, pts and alpha."""
        return list(self.stylize_stream(frames))

    def stylize_stream(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        """Source Frames in clip order, as they come -> stylized Frames (same index, pts and alpha), in order.

        The frames go through the stages a batch at a time (`config.batch_size`; a schedule's keyframe starts a
        new batch), pipelined or serial as the config says. Close the iterator (or read it to the end) to stop
        the stage threads; leaving early stops them too.
        """
        if self.config.strength == 0:  # strength 0 is the content itself
            for frame in frames:
                self._check_size(frame.image)
                self.next_index = frame.index + 1
                yield replace(frame, image=frame.image.copy())
            return
        for batch in run_stages(self._batches(frames), self.stages(), self.config.pipelined):
            yield from (replace(frame, image=image) for frame, image in zip(batch.frames, batch.images))

    def stages(self) -> list:
        """The stages a batch goes through, in order (each is `Batch -> Batch`)."""
        motion = [self.estimate_motion] if self.motion is not None else []
        download = [self.download] if self.post.on_device else []
        return [self.prepare, *motion, self.run_model, self.postprocess, *download]

    def _batches(self, frames: Iterable[Frame]) -> Iterator[Batch]:
        """Frames grouped into model calls: `batch_size` at most, one style code each."""
        batch: list[Frame] = []
        code = None
        for frame in frames:
            self._check_size(frame.image)
            self.next_index = frame.index + 1
            frame_code = self.code_at(frame.index)
            if batch and (len(batch) == self.config.batch_size or frame_code is not code):
                yield Batch(batch, code)
                batch = []
            batch.append(frame)
            code = frame_code
        if batch:
            yield Batch(batch, code)

    def _check_size(self, image: np.ndarray) -> None:
        if image.shape[:2] != self.frame_shape:
            raise UserError(f"frame size changed mid-clip: {image.shape[1]}x{image.shape[0]}, "
                            f"expected {self.frame_shape[1]}x{self.frame_shape[0]}")

    # --- the stages, in order ------------------------------------------------------------------------------

    def prepare(self, batch: Batch) -> Batch:
        batch.small = [to_working_size(f.image, self.work_shape) for f in batch.frames]
        batch.work = upload_uint8(batch.small, self.device)
        if self.post.on_device:
            batch.full = upload_uint8([f.image for f in batch.frames], self.device)
        return batch

    def estimate_motion(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        batch.motions = self.motion.steps([f.image for f in batch.frames])
        self.motion_seconds += time.perf_counter() - started
        return batch

    def run_model(self, batch: Batch) -> Batch:
        n = len(batch.frames)
        motions = batch.motions or [None] * n
        x = batch.work.permute(0, 3, 1, 2).contiguous().float() / 255.0
        # With pad_batches every model call sees a full batch (short batches padded with the last frame, outputs
        # dropped): CPU kernels round differently for different batch sizes (~1e-6), and chunk boundaries or
        # schedule keyframes must not change a frame's bits. Without it a short batch costs only its frames.
        missing = self.config.batch_size - n if self.config.pad_batches else 0
        x_full = torch.cat([x, x[-1:].expand(missing, -1, -1, -1)]) if missing > 0 else x
        x_pad, _ = pad_to_multiple(x_full, self.model.cfg.patch_size)
        with torch.no_grad():
            tokens, identity = self.model.stylize_tokens(x_pad, batch.code, self.config.strength)
            if self.token_smoother is not None:
                started = time.perf_counter()
                grids = tokens.permute(0, 3, 1, 2)
                smoothed = [self.token_smoother.step(low, grids[i:i + 1], motion=m)
                            for i, (low, m) in enumerate(zip(batch.small, motions))]
                tokens = torch.cat(smoothed + [grids[n:]]).permute(0, 2, 3, 1)
                self.token_seconds += time.perf_counter() - started
            batch.stylized = self.model.decode_stylized(tokens, identity, x_full, self.config.strength)[:n].clamp(0, 1)
        return batch

    def postprocess(self, batch: Batch) -> Batch:
        motions = batch.motions or [None] * len(batch.frames)
        with torch.no_grad():
            if self.post.on_device:
                batch.output = self.post(batch.stylized, batch.work, batch.full, motions)
            else:
                batch.images = self.post(batch.stylized, batch.small, [f.image for f in batch.frames], motions)
        batch.stylized = batch.work = batch.full = None  # device memory goes back as soon as it can
        return batch

    def download(self, batch: Batch) -> Batch:
        batch.images = download_uint8(batch.output)
        batch.output = None
        return batch

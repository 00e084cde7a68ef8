"""Temporal consistency metrics of stylized video: the warping error, drift and per-frame style distance.

The warping error of Lai et al. 2018 ("Learning Blind Video Temporal Consistency"):

    E_warp(O_t, O_u) = Σ_i M(i)·‖O_t(i) − warp(O_u, F_{t→u})(i)‖² / (3 Σ_i M(i))      (RGB in [0, 1])

averaged over all pairs u = t + d, for d = 1 (short range) and d = 10 (long range). The flow F and the
non-occlusion mask M (forward-backward check + motion boundaries + out-of-frame) come from the INPUT video, with
DIS 'medium' at full resolution: deliberately not the smoother's own flow (DIS 'fast', frames up to 576 px short side), since
evaluating with the flow used for blending flatters the blending (team notes video.md, key fact 4). Pairs that cross a shot
cut (found on the input) are skipped, as are fully occluded pairs. The input's own warping error is reported as
the floor that real content reaches.

Drift (`evaluate_temporal(..., drift=(a, b))`, e.g. the smoothed output against the per-frame stylization without
smoothing) is the mean absolute difference in [0, 1] between two videos: how far smoothing moved away from what
the stylizer produced.

    frames (input, videos) -> evaluate_temporal -> TemporalResult -> means / write_plot
                               per pair: pair_motion (input) -> warping_error (each video)

Used by `mambast eval temporal` (jobs/evaluate.py) and `mambast bench temporal` (jobs/bench_temporal.py). The
smoothing these metrics judge is pipeline/temporal.py.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import cv2
import numpy as np

from models.errors import UserError
from pipeline.flow import estimate_flow, occlusion_mask, warp
from pipeline.shots import ShotDetector

DISTANCES = (1, 10)
EVAL_FLOW = {"method": "DIS", "preset": "medium", "scale": 1.0}


def pair_motion(input_t: np.ndarray, input_u: np.ndarray, preset: str = EVAL_FLOW["preset"],
                scale: float = EVAL_FLOW["scale"]) -> tuple[np.ndarray, np.ndarray]:
    """Flow t -> u on t's grid and the non-occlusion mask (H x W bool), from two INPUT frames (RGB uint8)."""
    flow = estimate_flow(input_t, input_u, preset, scale)
    back = estimate_flow(input_u, input_t, preset, scale)
    return flow, ~occlusion_mask(flow, back)


def to_unit(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [0, 1]; float frames are taken as already in [0, 1]."""
    return frame.astype(np.float32) / 255.0 if frame.dtype == np.uint8 else frame.astype(np.float32)


def warping_error(out_t: np.ndarray, out_u: np.ndarray, flow: np.ndarray, valid: np.ndarray) -> float | None:
    """Lai et al. E_warp(O_t, O_u): masked MSE of O_t against O_u warped back by `flow` (t -> u), values in [0, 1].

    None when no pixel is valid.
    """
    visible = valid.astype(np.float32)[..., None]
    count = float(visible.sum()) * out_t.shape[2]
    if count == 0:
        return None
    diff = warp(to_unit(out_u), flow) - to_unit(out_t)
    return float(np.sum(visible * np.square(diff)) / count)


@dataclass
class TemporalResult:
    """Per-pair warping errors of several videos judged against one input's motion."""

    frames: int = 0
    size: tuple[int, int] = (0, 0)                      # (width, height) at which the metric was computed
    cuts: list[int] = field(default_factory=list)       # input frames that start a new shot
    errors: dict = field(default_factory=dict)          # distance -> video name -> [(t, E_warp(O_t, O_{t+d}))]
    drift_sum: float = 0.0
    drift_count: int = 0

    def mean(self, distance: int, name: str) -> float | None:
        values = [e for _, e in self.errors.get(distance, {}).get(name, [])]
        return float(np.mean(values)) if values else None

    def pairs(self, distance: int) -> int:
        per_video = self.errors.get(distance, {})
        return len(next(iter(per_video.values()), []))

    @property
    def drift(self) -> float | None:
        return self.drift_sum / self.drift_count if self.drift_count else None


def evaluate_temporal(input_frames: Iterable[np.ndarray], videos: dict[str, Iterable[np.ndarray]],
                      distances: Iterable[int] = DISTANCES, preset: str = EVAL_FLOW["preset"],
                      scale: float = EVAL_FLOW["scale"], detector: ShotDetector | None = None,
                      drift: tuple[str, str] | None = None, sources: dict[str, str] | None = None) -> TemporalResult:
    """Warping errors of the input and of every video in `videos` (name -> frames of the input's size).

    Streams through the frames, holding only max(distances) + 1 of each video. The input's own errors are under
    the name "input". `drift` = (name_a, name_b) also accumulates their mean absolute difference in [0, 1].
    `sources` (name -> file, "input" included) only names files in the error raised when frame counts differ.
    """
    distances = sorted(set(distances))
    detector = detector or ShotDetector()
    streams = {"input": input_frames, **videos}
    names = list(streams)
    result = TemporalResult(errors={d: {name: [] for name in names} for d in distances})
    history: deque = deque(maxlen=distances[-1] + 1)   # {name: frame} per frame, oldest first
    last_cut = 0
    for u, frames_u in enumerate(aligned(streams, sources or {})):
        if u == 0:
            result.size = (frames_u["input"].shape[1], frames_u["input"].shape[0])
        elif detector.is_cut(history[-1]["input"], frames_u["input"]):
            result.cuts.append(u)
            last_cut = u
        history.append(frames_u)
        for d in distances:
            t = u - d
            if t < last_cut:            # no earlier frame in this shot at that distance
                continue
            frames_t = history[-1 - d]
            flow, valid = pair_motion(frames_t["input"], frames_u["input"], preset, scale)
            for name in names:
                error = warping_error(frames_t[name], frames_u[name], flow, valid)
                if error is not None:
                    result.errors[d][name].append((t, error))
        if drift is not None:
            a, b = (to_unit(frames_u[name]) for name in drift)
            result.drift_sum += float(np.abs(a - b).mean())
            result.drift_count += 1
        result.frames = u + 1
    return result


def aligned(streams: dict[str, Iterable[np.ndarray]], sources: dict[str, str]) -> Iterator[dict[str, np.ndarray]]:
    """Zip named frame streams into {name: frame}; a stream shorter or longer than the first raises UserError."""
    iterators = {name: iter(frames) for name, frames in streams.items()}
    (first_name, first), *others = iterators.items()
    label = lambda name: sources.get(name, name)  # noqa: E731
    for frame in first:
        row = {first_name: frame}
        for name, iterator in others:
            row[name] = next(iterator, None)
            if row[name] is None:
                raise UserError(f"{label(name)}: has fewer frames than {label(first_name)}")
        yield row
    for name, iterator in others:
        if next(iterator, None) is not None:
            raise UserError(f"{label(name)}: has more frames than {label(first_name)}")


def style_distances(frames: Iterable[np.ndarray], style: np.ndarray, net) -> list[float]:
    """Per frame: Σ_taps ‖μ − μ_s‖² + ‖σ − σ_s‖² of the perceptual features of the frame and of the style image,
    both resized to 256 px short side (EfficientNet-Lite0 in the CLI and the benchmark: not the training network)."""
    import torch

    from pipeline.quality_metrics import meanstd_per_tap

    def prep(img):
        h, w = img.shape[:2]
        s = 256 / min(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255

    with torch.no_grad():
        target = net.features(prep(style))
        return [float(meanstd_per_tap(net.features(prep(frame)), target).sum()) for frame in frames]


# Curve colour and legend label per video name; the CLI's names (input/baseline/stylized) and the benchmark's.
PLOT_STYLES = {"input": ("0.5", "input"), "baseline": ("tab:red", "per-frame"), "per_frame": ("tab:red", "per-frame"),
               "stylized": ("tab:blue", "stylized"), "smoothed": ("tab:blue", "smoothed")}


def write_plot(result: TemporalResult, path: str, title: str) -> list[str]:
    """Per-frame warping error of every video in `result`, one panel per distance; returns the legend labels."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(9, 3 * len(result.errors)))
    axes = fig.subplots(len(result.errors), 1, sharex=True, squeeze=False)
    labels = []
    for ax, (d, per_video) in zip(axes[:, 0], result.errors.items()):
        for i, name in enumerate(per_video):
            color, label = PLOT_STYLES.get(name, (f"C{i + 2}", name))
            if per_video.get(name):
                curve = np.full(result.frames, np.nan)   # NaN gaps break the line at skipped pairs (cuts)
                for t, error in per_video[name]:
                    curve[t] = error
                mean = result.mean(d, name)
                ax.plot(np.arange(result.frames), curve, color=color, lw=1.2, label=f"{label} (mean {mean:.5f})")
                labels.append(f"d={d} {label}")
        for cut in result.cuts:
            ax.axvline(cut, color="k", ls=":", lw=0.8)
        ax.set_ylabel(f"E_warp, d={d}")
        if any(per_video.values()):
            ax.legend(fontsize=8, loc="upper right")
        else:
            ax.text(0.5, 0.5, f"no frame pairs {d} apart within a shot", ha="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("frame t (pair t, t+d); dotted: shot cuts")
    axes[0, 0].set_title(f"warping error: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return labels

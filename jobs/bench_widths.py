"""`mambast bench widths`: per-frame time of wider variants of a model config at one frame size, in one run.

The question it answers (issue 20's capacity item): what does a wider model cost per frame on this machine, at the
demo's working size? Each variant is the base config with `d_model` (and optionally the CNN decoder's widths and
the number of MSTD blocks) changed, random weights (only the cost matters), the cached-style inference path, the
variants interleaved so a busy machine slows them alike. Prints parameters, fp16 weight size and best-of-runs time with its ratio to the
first variant; the last line is one JSON object.
"""
from __future__ import annotations

import json
import time

import torch

DEMO_SIZE = "1208x512"  # bikes.mp4 (640x272) enlarged to the default working size 512


def register_widths_bench(benches) -> None:
    p = benches.add_parser("widths", help="per-frame time of wider variants of a model config")
    p.add_argument("--config", default="small", help="base model config (default: small, the bundled widths)")
    p.add_argument("--variants", default="64,64/6,96,128,128:256-128-64",
                   help="comma-separated d_model[:decoder widths a-b-c][/MSTD blocks] "
                        "(default: 64,64/6,96,128,128:256-128-64)")
    p.add_argument("--size", default=DEMO_SIZE, help=f"frame WxH (default {DEMO_SIZE}: the demo at working size 512)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=run_widths_bench)


def run_widths_bench(args) -> int:
    from models.checkpoint import model_config
    from models.mambast import MambaST

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    models = {}
    for spec in args.variants.split(","):
        cfg = model_config(args.config)
        widths, _, blocks = spec.partition("/")
        d_model, _, decoder = widths.partition(":")
        cfg.d_model = int(d_model)
        if decoder:
            cfg.decoder_channels = [int(c) for c in decoder.split("-")]
        if blocks:
            cfg.n_decoder_layers = int(blocks)
        models[spec] = MambaST(cfg).eval()
    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, height, width, generator=g), torch.rand(1, 3, height, width, generator=g)
    times: dict[str, list[float]] = {spec: [] for spec in models}
    with torch.no_grad():
        codes = {spec: m.encode_style(style, m.token_grid(height, width), seed=0) for spec, m in models.items()}
        for _ in range(args.runs):
            for spec, m in models.items():
                start = time.perf_counter()
                m.stylize(content, codes[spec])
                times[spec].append(time.perf_counter() - start)
    first = min(next(iter(times.values())))
    report = {}
    for spec, m in models.items():
        params = sum(p.numel() for p in m.parameters())
        best = min(times[spec])
        report[spec] = {"params_m": round(params / 1e6, 3), "fp16_mib": round(params * 2 / 2**20, 2),
                        "best_s": round(best, 3), "ratio": round(best / first, 3), "runs_s": times[spec]}
        print(f"  {spec:18s} {params / 1e6:5.2f} M params  {params * 2 / 2**20:5.1f} MiB fp16  "
              f"{best:6.2f} s/frame  {best / first:4.2f}x")
    print(json.dumps({"size": [width, height], "threads": args.threads, "config": args.config, "variants": report}))
    return 0

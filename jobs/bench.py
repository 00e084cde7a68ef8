"""`mambast bench BENCH`: performance measurements on this machine; each prints a summary, then one JSON line.

Each bench is one `register_*(benches)` function in BENCHES, which adds its sub-subcommand:

    bench model       jobs/bench_model.py     the model's paths (cached style, reference scan, no cache)
    bench pipeline    jobs/bench_pipeline.py  stylize fps against the bare model's; peak RSS against clip length
    bench temporal    jobs/bench_temporal.py  flicker, drift and style distance of the temporal smoothing
    bench one-frame   jobs/bench_one_frame.py one image through the API, unpadded vs padded to a batch
    bench widths      jobs/bench_widths.py    per-frame time of wider variants of a model config
    bench gpu         jobs/bench_gpu.py       per-stage ms/frame on the device (decode .. encode), end-to-end fps
"""
from __future__ import annotations

from jobs.bench_gpu import register_gpu_bench
from jobs.bench_model import register_model_bench
from jobs.bench_one_frame import register_one_frame_bench
from jobs.bench_pipeline import register_pipeline_bench
from jobs.bench_widths import register_widths_bench
from jobs.bench_temporal import register_temporal_bench

BENCHES = [register_model_bench, register_pipeline_bench, register_temporal_bench, register_one_frame_bench,
           register_widths_bench, register_gpu_bench]


def register(sub) -> None:
    parser = sub.add_parser("bench", help="performance measurements (pipeline, ...)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for add in BENCHES:
        add(benches)

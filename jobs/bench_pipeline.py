"""`bench pipeline`: is the pipeline around the model free, and is its memory flat?
  * throughput: frames/s of `stylize` (local runner, temporal smoothing on) on the demo clip, from the first frame
    decoded to the output closed, against the model's frames/s on the same frames decoded into memory beforehand
    (same process, same working size, same ClipStylizer settings). Target: ratio >= 0.9.
  * memory: peak RSS of `stylize` on a 100-frame and a 1000-frame clip (the demo clip looped, at its own size),
    each in a fresh process. The model runs at a small working size there (--rss-working-size, 64) so that 1000
    frames take minutes, not an hour on a CPU; decoding, smoothing, upsampling and encoding stay full size.
    Target: the long clip within 10 % of the short one.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from dataclasses import replace

import torch

from pipeline.packaged_media import demo_clip
from jobs.demo import demo_painting
from pipeline.chunks import ChunkStylizer
from pipeline.local_runner import decode_frames, run_local
from pipeline.settings import Settings
from pipeline.sink import FrameSink
from pipeline.source import Frame, open_source
from pipeline.stylize_job import StylizeJob, check_job

THROUGHPUT_TARGET = 0.9   # stylize fps / model fps
RSS_TARGET = 1.10         # peak RSS of the long clip / the short one
RSS_CLIPS = (100, 1000)


# ----------------------------------------------------------------------------------------------------------
# bench pipeline


def register_pipeline_bench(benches) -> None:
    p = benches.add_parser("pipeline", help="stylize fps vs model fps on the same frames; peak RSS vs clip length",
                           description=__doc__.split("`bench pipeline`: ", 1)[1])
    p.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    p.add_argument("--frames", type=int, default=48, help="frames of the demo clip for the throughput run (48)")
    p.add_argument("--working-size", type=int, default=256, help="short side the model runs at (256)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)")
    p.add_argument("--rss-frames", default=",".join(map(str, RSS_CLIPS)),
                   help="clip lengths for the memory runs, comma-separated; empty to skip (100,1000)")
    p.add_argument("--rss-working-size", type=int, default=64, help="working size of the memory runs (64)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=run_pipeline_bench)


def run_pipeline_bench(args) -> int:
    torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.json else print
    clip, painting = demo_clip(), demo_painting()
    rss_lengths = [int(n) for n in str(args.rss_frames).split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="mambast-bench-") as scratch:
        job = StylizeJob(input=str(clip), style=str(painting), output=os.path.join(scratch, "out.mp4"),
                         settings=Settings(working_size=args.working_size), weights=args.weights,
                         max_frames=args.frames)
        say(f"bench pipeline: {clip.name}, {args.frames} frames, working size {args.working_size}, "
            f"{args.threads} torch threads")
        e2e_fps, model_fps = measure_throughput(job)
        say(f"  stylize (decode + model + smoothing + encode): {e2e_fps:7.2f} fps")
        say(f"  model on frames in memory:                     {model_fps:7.2f} fps")
        say(f"  ratio {e2e_fps / model_fps:.3f} (target >= {THROUGHPUT_TARGET})")
        rss = {}
        for length in rss_lengths:
            path = looped_clip(clip, length, scratch)
            small = replace(job.settings, working_size=args.rss_working_size)
            rss[length] = peak_rss_mb(replace(job, input=path, max_frames=None, settings=small,
                                              output=os.path.join(scratch, f"rss{length}.mp4")), args.threads)
            say(f"  peak RSS, {length:5d}-frame clip: {rss[length]:8.1f} MB")
    report = {
        "bench": "pipeline", "clip": str(clip), "style": str(painting), "weights": args.weights or "bundled",
        "frames": args.frames, "working_size": args.working_size, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "stylize_fps": round(e2e_fps, 3), "model_fps": round(model_fps, 3),
        "fps_ratio": round(e2e_fps / model_fps, 3), "fps_ratio_target": THROUGHPUT_TARGET,
        "rss_working_size": args.rss_working_size, "peak_rss_mb": {str(n): round(mb, 1) for n, mb in rss.items()},
    }
    if len(rss) >= 2:
        lengths = sorted(rss)
        report["rss_ratio"] = round(rss[lengths[-1]] / rss[lengths[0]], 3)
        report["rss_ratio_target"] = RSS_TARGET
        say(f"  RSS ratio {report['rss_ratio']:.3f} (target <= {RSS_TARGET})")
    print(json.dumps(report))
    return 0


def measure_throughput(job: StylizeJob) -> tuple[float, float]:
    """(stylize fps, model fps) on the same frames, each run with a fresh stylizer after a common warm-up.

    The model is timed before and after the stylize run and the better time is kept: this machine's noise then
    counts against the pipeline, not for it.
    """
    render = check_job(job)
    stylizer = ChunkStylizer.load(job.weights, job.device)
    frames = decode_frames(render.source, render.selection)
    warm = min(len(frames), render.config.batch_size)
    first = render.selection[0]
    stylizer.clip(render.style, render.frame_shape, render.config, first)(frames[:warm])  # one-off kernel setup

    def model_seconds() -> float:
        fresh = ChunkStylizer(stylizer.model)  # style encoded anew
        started = time.perf_counter()
        fresh.clip(render.style, render.frame_shape, render.config, first)(frames, list(render.selection))
        return time.perf_counter() - started

    before = model_seconds()
    summary = run_local(job, progress=False)
    model_fps = len(frames) / min(before, model_seconds())
    return summary.fps, model_fps


def looped_clip(clip, length: int, folder: str) -> str:
    """The clip's frames repeated to `length` frames, encoded to an .mp4 at the clip's frame rate."""
    source = open_source(str(clip))
    path = os.path.join(folder, f"loop{length}.mp4")
    written = 0
    with FrameSink(path, fps=source.info.fps, crf=23) as sink:
        while written < length:
            for frame in source.frames(max_frames=length - written):
                sink.write(Frame(written, written, frame.image))
                written += 1
    return path


def peak_rss_mb(job: StylizeJob, threads: int) -> float:
    """Peak RSS of `run_local(job)` in a fresh process, as that process measures it (its VmHWM)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_stylize_and_report_rss, args=(job, threads, results))
    child.start()
    outcome = results.get()
    child.join()
    if isinstance(outcome, str):
        raise RuntimeError(f"memory run on {os.path.basename(job.input)} failed: {outcome}")
    return outcome


def _stylize_and_report_rss(job: StylizeJob, threads: int, results) -> None:
    try:
        torch.set_num_threads(threads)
        run_local(job, progress=False)
        results.put(own_peak_rss_mb())
    except Exception as error:  # reported, so that the parent does not wait forever
        results.put(f"{type(error).__name__}: {error}")


def own_peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over exec, so a spawned child reports at least
    the RSS its parent had when it forked (a parent that had just encoded a test clip made a flat child look
    50 % bigger). VmHWM belongs to the process's own memory map."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; no /proc elsewhere

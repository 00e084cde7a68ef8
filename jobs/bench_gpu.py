"""`mambast bench gpu`: where a frame's time goes, stage by stage, on this machine's device, and what the stylize job
achieves end to end. The one script to run the day a GPU is lent; the same code runs on a CPU.

The clip: the demo clip's frames enlarged to the bench size (1080p by default) and encoded with x264 into a
temporary folder. The stages are the stylizer's own (ClipStylizer's stage methods, pipeline/stylizer.py) with
decode and encode around them, each timed over the same N frames, one stage at a time over every batch (the job's
batch size), after one untimed batch through everything (kernel set-up, lazily loaded CUDA modules, cached tables).
Two routes, by where post-processing runs (StylizerConfig.post), share decode, flow, model and encode:

    stage           on              what
    decode          host            PyAV -> RGB uint8 frames (pipeline/source.py open_source)
    prepare_host    host -> device  working-size copies (OpenCV), uploaded uint8: the host route's prepare
    prepare_device  host -> device  the same, and the frames themselves uploaded: the device route's prepare
    upload          host -> device  that upload of the frames alone (uint8, pinned on CUDA): part of prepare_device
    flow            host            MotionEstimator.step: DIS both ways, occlusions (pipeline/temporal.py)
    model           device          stylize_tokens + decode_stylized (the style encoded beforehand)
    post_host       host            the float frames downloaded, guided upsampling, output smoother, uint8 (OpenCV)
    post_device     device          the same as torch ops on the device (pipeline/device_post.py)
    download        device -> host  the device route's finished uint8 frames
    encode          host            FrameSink, x264, to the file closed (pipeline/sink.py)

On a CPU "device" is the CPU too, and uploads and downloads are copies or nothing. CUDA runs asynchronously:
every timed pass is bracketed by `torch.cuda.synchronize`, so a stage's time is its work's, not its launches'.
Per-frame work that is off by default (colour preservation, the token smoother) is not timed.

Projections per route: serial, 1000 / the sum of its stages' ms, and perfectly overlapped, 1000 / its slowest
stage's ms (every stage its own worker: a ceiling, since stages share the CPU cores and the GPU).

End to end: `run_local` on the clip (decode thread, the stylizer's stages, encode thread; frames per second from
the first frame asked for to the output closed), in this process after the stages (kernels warm), with the job's
default post (the device on CUDA), serial and pipelined (`Settings.pipelined`), alternated, each the best of two
runs, and their ratio (what the overlap alone buys; where cores would otherwise idle, beside a GPU, it is the
lever; on a 2-core CPU whose model already takes both cores, little).

`--baseline REV` adds the stylize job as a user runs it, today's against an earlier revision's: `mambast stylize`
of this tree and of REV (its models/, pipeline/, jobs/ and configs/, extracted to a temporary folder that comes
first on the child's import path), each in a fresh process with its own defaults (today's: pipelined) and the
environment `mambast` was started with, the same weights, clip and working size, alternated, each the best of
one more run than the modes above and of 3x as many frames (a fresh process's first batch sets up kernels); fps as
each prints it (render time, no start-up). Issue 22's target: today >= 1.3x the code before it (6ed159a) at 1080p
with the bundled weights on the 2-core CPU.

`--config NAME` benchmarks random weights of a model config (configs/model/NAME.yaml, e.g. official): only the
cost matters there. The official widths take minutes per frame at 1080p on a CPU, so few frames by default, one
run per mode, and an ETA after the warm-up. The summary is a table, then one JSON line (with --json, only that).
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import av
import cv2
import torch
import yaml

from jobs.bench_model import REPO_ROOT, extract_code
from jobs.cli import LAUNCH_ENVIRONMENT
from jobs.demo import demo_painting
from models.checkpoint import BUNDLED_DIR, load_model, model_config, read_model_config, save_model
from models.errors import UserError
from models.mambast import MambaST, MambaSTConfig
from pipeline.api import resolve_device
from pipeline.device_post import upload_uint8
from pipeline.local_runner import progress_bar, run_local
from pipeline.packaged_media import demo_clip
from pipeline.settings import Settings
from pipeline.sink import FrameSink
from pipeline.source import open_source
from pipeline.stylize_job import StylizeJob
from pipeline.styles import StyleCodes, StyleImage
from pipeline.stylizer import Batch, ClipStylizer

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "1440p": (2560, 1440), "2160p": (3840, 2160)}
# Frames per stage and per stylize run without --frames: a 1080p frame takes the bundled weights 4-10 s on the 2-core
# CPU (the official widths several times that), milliseconds on a GPU.
DEFAULT_FRAMES = {"cuda": {"weights": 64, "config": 16}, "cpu": {"weights": 8, "config": 4}}
BASELINE_TARGET = 1.3                         # issue 22: today's stylize fps / the code before it (6ed159a)
BASELINE_FOLDERS = ("models", "pipeline", "jobs", "configs")  # what `mambast stylize` of a revision runs
BASELINE_FRAMES = 3  # × --frames per run against the baseline: a fresh process's first batch sets up kernels
HOST, DEVICE, UP, DOWN = "host", "device", "host->device", "device->host"
ROUTES = {
    "host": ("decode", "prepare_host", "flow", "model", "post_host", "encode"),
    "device": ("decode", "prepare_device", "flow", "model", "post_device", "download", "encode"),
}


def register_gpu_bench(benches) -> None:
    p = benches.add_parser("gpu", help="per-stage ms/frame on the device (decode .. encode) and end-to-end fps",
                           description=__doc__.split("`mambast bench gpu`: ", 1)[1])
    model = p.add_mutually_exclusive_group()
    model.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    model.add_argument("--config", help="random weights of this model config (e.g. official): only the cost matters")
    p.add_argument("--size", default="1080p", help=f"frame size: {', '.join(SIZES)} or WxH (default 1080p)")
    p.add_argument("--working-size", type=int, default=Settings.working_size,
                   help=f"short side the model runs at ({Settings.working_size})")
    p.add_argument("--frames", type=int, help="frames timed per stage and per stylize run (default: "
                   + "; ".join(f"{kind} {n['weights']}, {n['config']} with --config" for kind, n in DEFAULT_FRAMES.items())
                   + ")")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(auto: CUDA when there)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)")
    p.add_argument("--baseline", metavar="REV", help="also time `mambast stylize` of git revision REV against "
                   "today's, in fresh processes, alternated (issue 22: 6ed159a, the code before it)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=run_gpu_bench)


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Stage:
    name: str
    where: str            # HOST, DEVICE, UP or DOWN
    seconds: float        # for all the frames
    frames: int
    what: str
    part_of: str | None = None  # a part of another stage, timed on its own (not in the routes' sums)

    @property
    def ms_per_frame(self) -> float:
        return 1000 * self.seconds / self.frames


def run_gpu_bench(args) -> int:
    torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.json else print
    width, height = parse_size(args.size)
    device = resolve_device(args.device)
    frames = DEFAULT_FRAMES[device.type]["config" if args.config else "weights"] if args.frames is None else args.frames
    if frames < 1:
        raise UserError(f"--frames: must be at least 1, got {frames}")
    settings = Settings(working_size=args.working_size)
    painting = demo_painting()
    with tempfile.TemporaryDirectory(prefix="mambast-bench-gpu-") as scratch:
        baseline_code = (extract_code(args.baseline, Path(scratch) / "baseline", BASELINE_FOLDERS)
                         if args.baseline else None)  # a bad revision is refused before any work
        weights = args.weights
        if args.config:  # random weights, saved so that the stylize job loads them like any checkpoint
            weights = str(save_model(MambaST(model_config(args.config)).eval(), Path(scratch) / "weights"))
        model = load_model(weights, device=device)
        clip = enlarged_demo_clip(width, height, BASELINE_FRAMES * frames if args.baseline else frames,
                                  os.path.join(scratch, "clip.mp4"))
        say(f"bench gpu: {frames} frames of {width}x{height} ({demo_clip().name} enlarged), working size "
            f"{args.working_size}, {describe_model(args)}")
        say(f"  host: {host_name(args.threads)}; device: {device_name(device, args.threads)}")
        repeats = 1 if args.config else 2  # the slow widths run each mode once; the target is on the bundled weights
        stages, peak_mb = measure_stages(model, clip, painting, settings, frames, device, scratch,
                                         len(end_to_end_order(repeats)))
        del model
        job = StylizeJob(input=clip, style=str(painting), output=os.path.join(scratch, "out.mp4"), settings=settings,
                         weights=weights, max_frames=frames, device=str(device), overwrite=True)
        end_to_end = measure_end_to_end(job, repeats)
        end_to_end["measured_on"] = device_name(device, args.threads)
        end_to_end["post"] = "device" if device.type == "cuda" else "host"  # the job's default, post: auto
        if args.baseline:
            end_to_end["against_baseline"] = measure_against_baseline(
                replace(job, max_frames=BASELINE_FRAMES * frames), weights, args.baseline, baseline_code, repeats + 1,
                scratch)
    stage_ms = {name: round(stage.ms_per_frame, 4) for name, stage in stages.items()}  # the projections use these
    routes = {name: project(stage_ms, route) for name, route in ROUTES.items()}
    report = {
        "bench": "gpu", "clip": f"{demo_clip().name} enlarged to {width}x{height}", "size": [width, height],
        "frames": frames, "working_size": args.working_size, "style": str(painting),
        "weights": args.weights or (None if args.config else "bundled"),
        "config": args.config, "random_weights": bool(args.config),
        "host": host_name(args.threads), "device": device_name(device, args.threads), "threads": args.threads,
        "torch": torch.__version__,
        "stages": {name: {"ms_per_frame": stage_ms[name], "on": s.where, "what": s.what, "part_of": s.part_of,
                          "measured_on": measured_on(s.where, device, args.threads)} for name, s in stages.items()},
        "projected": routes, "end_to_end": end_to_end,
    }
    if peak_mb is not None:
        report["device_peak_mb"] = round(peak_mb, 1)
    if not args.json:
        print_summary(report)
    print(json.dumps(report))
    return 0


def parse_size(text: str) -> tuple[int, int]:
    if text.lower() in SIZES:
        return SIZES[text.lower()]
    width, x, height = text.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit() and int(width) >= 16 and int(height) >= 16):
        raise UserError(f"--size: expected {', '.join(SIZES)} or WxH of at least 16x16, got {text[:40]!r}")
    return int(width), int(height)


def describe_model(args) -> str:
    if args.config:
        return f"random weights of model config {args.config} (only the cost matters)"
    return f"weights {args.weights}" if args.weights else "the bundled weights"


def host_name(threads: int) -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads)"


def device_name(device: torch.device, threads: int) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else host_name(threads)


def measured_on(where: str, device: torch.device, threads: int) -> str:
    """A stage's figure labelled with the hardware it ran on (on a CPU, a transfer is a copy in its memory)."""
    host, dev = host_name(threads), device_name(device, threads)
    if device.type == "cpu":
        return host
    return {HOST: host, DEVICE: dev, UP: f"{host} -> {dev}", DOWN: f"{dev} -> {host}"}[where]


def enlarged_demo_clip(width: int, height: int, frames: int, path: str) -> str:
    """The demo clip's first `frames` frames (looped if it is shorter) enlarged to width x height, x264 in `path`.

    Written with PyAV directly (tests/media.py is test code): the bench's decode stage then reads a real h264
    file of the bench size, as the stylize job would.
    """
    source = open_source(str(demo_clip()))
    images = []
    while len(images) < frames:
        images.extend(f.image for f in source.frames(max_frames=frames - len(images)))
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=source.info.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "x264-params": "log-level=error"}
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC),
                                               format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


# ----------------------------------------------------------------------------------------------------------
# the stages


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work):
    """(seconds, result) of `work()`, with the device's queued work finished before the start and at the end."""
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


class Stages:
    """Stage times over the same frames, one stage at a time over every batch (each batch's fields filled in by the
    stages before it, as in the stylizer), with the device's queued work finished around each timed pass."""

    def __init__(self, device: torch.device, frames: int):
        self.device, self.frames = device, frames
        self.times: dict[str, Stage] = {}

    def add(self, name: str, where: str, what: str, seconds: float, part_of: str | None = None) -> None:
        self.times[name] = Stage(name, where, seconds, self.frames, what, part_of)

    def run(self, name: str, where: str, what: str, stage, batches: list[Batch], progress: bool = False) -> None:
        def every_batch():
            with progress_bar(self.frames, progress, desc=f"bench gpu: {name}") as bar:
                for batch in batches:
                    stage(batch)
                    if progress:
                        synchronize(self.device)
                        bar.update(len(batch.frames))
        seconds, _ = timed(self.device, every_batch)
        self.add(name, where, what, seconds)


def measure_stages(model: MambaST, clip: str, painting, settings: Settings, count: int, device: torch.device,
                   scratch: str, end_to_end_runs: int) -> tuple[dict[str, Stage], float | None]:
    """Both routes' stages over the clip's first `count` frames: the stylizer's own stage methods (ClipStylizer
    prepare, estimate_motion, run_model, postprocess, download) on batches of the job's size, decode and encode
    around them. Flow and model are the same work on both routes: timed once, their results given to both.

    Returns the stages in STAGE_ORDER and the device's peak memory in MB (CUDA only). `end_to_end_runs` (the
    stylize runs to come) serves the ETA printed after the warm-up.
    """
    stages = Stages(device, count)
    source = open_source(clip, backend="pyav")
    seconds, frames = timed(device, lambda: list(source.frames(max_frames=count)))
    stages.add("decode", HOST, "PyAV decode to RGB uint8 (open_source)", seconds)

    config = settings.stylizer_config()
    codes = StyleCodes(model, seed=config.seed)  # the style encoded once, for the working token grid, untimed
    style = StyleImage.from_path(painting)

    def stylizer(post: str) -> ClipStylizer:  # its stages are called here one by one: `pipelined` plays no part
        return ClipStylizer(model, style, frames[0].image.shape[:2], replace(config, post=post, pipelined=False),
                            codes=codes)

    # Warm-up: the first batch through every stage of both routes (kernel set-up, lazily loaded CUDA modules,
    # cached tables), on stylizers of its own so that the timed ones start fresh, as a job's do.
    first = frames[:config.batch_size]
    warm = {post: timed(device, lambda: list(stylizer(post).stylize_stream(first)))[0] for post in ("host", "device")}
    print_eta(warm, -(-count // config.batch_size), end_to_end_runs, "device" if device.type == "cuda" else "host")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    on_host, on_device = stylizer("host"), stylizer("device")
    host_batches, device_batches = ([Batch(frames[i:i + config.batch_size], on_host.style)
                                     for i in range(0, count, config.batch_size)] for _ in range(2))
    working = f"{on_host.work_shape[1]}x{on_host.work_shape[0]}"
    stages.run("prepare_host", UP, f"to the working size {working} (cv2), uploaded", on_host.prepare, host_batches)
    stages.run("prepare_device", UP, f"to the working size {working} (cv2), uploaded with the frames",
               on_device.prepare, device_batches)
    seconds, _ = timed(device, lambda: [upload_uint8([f.image for f in batch.frames], device)
                                        for batch in device_batches])
    stages.add("upload", UP, "the frames, uint8 (upload_uint8)", seconds, part_of="prepare_device")
    stages.run("flow", HOST, f"MotionEstimator.step: DIS {config.temporal.flow_preset} both ways, short side at "
               f"most {config.temporal.flow_size} px", on_device.estimate_motion, device_batches)
    stages.run("model", DEVICE, f"stylize_tokens + decode_stylized, batches of {config.batch_size}",
               on_device.run_model, device_batches, progress=True)
    for host_batch, device_batch in zip(host_batches, device_batches):
        host_batch.motions, host_batch.stylized = device_batch.motions, device_batch.stylized
    stages.run("post_host", HOST, "float download, guided upsampling, OutputSmoother, uint8 (HostPostprocessor)",
               on_host.postprocess, host_batches)
    stages.run("post_device", DEVICE, "guided upsampling, smoother, uint8 (DevicePostprocessor)",
               on_device.postprocess, device_batches)
    stages.run("download", DOWN, "the stylized frames, uint8 (download_uint8)", on_device.download, device_batches)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    sink = FrameSink(os.path.join(scratch, "encoded.mp4"), like=source.info, crf=settings.crf, overwrite=True)

    def encode():
        for batch in host_batches:
            for frame, image in zip(batch.frames, batch.images):
                sink.write(replace(frame, image=image))
        sink.close()  # x264 holds frames back (lookahead) until the file is closed
    seconds, _ = timed(device, encode)
    stages.add("encode", HOST, f"x264 crf {settings.crf}, to the file closed (FrameSink)", seconds)
    return {name: stages.times[name] for name in STAGE_ORDER}, peak_mb


STAGE_ORDER = ("decode", "prepare_host", "prepare_device", "upload", "flow", "model", "post_host", "post_device",
               "download", "encode")


def print_eta(warm: dict[str, float], batches: int, end_to_end_runs: int, job_post: str) -> None:
    """The rest of the run, guessed from the warm-up batch's time through each route: the stages (both routes),
    then the stylize runs (the job's route, `job_post`)."""
    total = batches * (sum(warm.values()) + end_to_end_runs * warm[job_post])
    rest = f"{total:.0f} s" if total < 120 else f"{total / 60:.0f} min"
    print(f"bench gpu: the warm-up batch took {sum(warm.values()):.1f} s; about {rest} to go "
          f"(ETA {time.strftime('%H:%M', time.localtime(time.time() + total))})", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# projections and the end-to-end runs


def project(stage_ms: dict[str, float], route: tuple[str, ...]) -> dict:
    """fps of a route's stages run one after the other, and overlapped perfectly (the slowest stage sets the pace)."""
    ms = {name: stage_ms[name] for name in route}
    slowest = max(ms, key=ms.get)
    return {"stages": list(route), "serial_ms": round(sum(ms.values()), 3), "slowest": slowest,
            "slowest_ms": round(ms[slowest], 3), "serial_fps": round(1000 / sum(ms.values()), 3),
            "overlapped_fps": round(1000 / ms[slowest], 3)}


MODES = {"serial": {"pipelined": False}, "pipelined": {"pipelined": True}}  # Settings for the stylize runs


def end_to_end_order(repeats: int) -> list[str]:
    """The stylize runs: each mode `repeats` times, alternated (serial, pipelined, pipelined, serial, ...), so that
    the machine's drift hits both alike."""
    return [mode for turn in range(repeats) for mode in (list(MODES) if turn % 2 == 0 else list(MODES)[::-1])]


def measure_end_to_end(job: StylizeJob, repeats: int) -> dict:
    """fps of `run_local(job)` serial and pipelined, each the best of its runs (noise only ever slows a run)."""
    seconds: dict[str, float] = {}
    for mode in end_to_end_order(repeats):
        summary = run_local(replace(job, settings=replace(job.settings, **MODES[mode])), progress=True)
        seconds[mode] = min(seconds.get(mode, float("inf")), summary.render_seconds)
    fps = {mode: summary.frames / value for mode, value in seconds.items()}
    return {"frames": summary.frames, "runs_per_mode": repeats,
            "seconds": {mode: round(value, 4) for mode, value in seconds.items()},
            "fps": {mode: round(value, 3) for mode, value in fps.items()},
            "pipelined_over_serial": round(fps["pipelined"] / fps["serial"], 3)}


# ----------------------------------------------------------------------------------------------------------
# today's stylize command against an earlier revision's


STYLIZE_LINE = re.compile(r": (\d+) frames at ([0-9.]+) fps")  # Summary.line(), the same since before issue 22


def measure_against_baseline(job: StylizeJob, weights: str | None, rev: str, baseline_code: Path, repeats: int,
                             scratch: str) -> dict:
    """fps of `mambast stylize` with today's code and with revision `rev`'s (extracted to `baseline_code`), each in
    fresh processes with its own defaults, alternated (today, baseline, baseline, today, ...), each the best of
    `repeats` runs."""
    code = {"today": REPO_ROOT, "baseline": baseline_code}
    weights_for = {"today": weights or str(BUNDLED_DIR),
                   "baseline": weights_without_defaults(weights or BUNDLED_DIR, Path(scratch) / "baseline-weights")}
    fps: dict[str, float] = {}
    for turn in range(repeats):
        for who in (("today", "baseline") if turn % 2 == 0 else ("baseline", "today")):
            fps[who] = max(fps.get(who, 0.0), stylize_fps(job, code[who], weights_for[who], who, rev))
    return {"revision": rev, "runs_each": repeats, "frames": job.max_frames,
            "fps": {who: round(value, 3) for who, value in fps.items()},
            "today_over_baseline": round(fps["today"] / fps["baseline"], 3), "target": BASELINE_TARGET}


def weights_without_defaults(weights: str | os.PathLike, into: Path) -> str:
    """The checkpoint `weights` as a folder whose config names only the fields that differ from today's defaults:
    an older revision fills in its own defaults for the rest and does not trip over fields added since (precision)."""
    cfg, tensors = read_model_config(weights), Path(weights)
    into.mkdir(parents=True, exist_ok=True)
    os.symlink((tensors / "model.safetensors" if tensors.is_dir() else tensors).resolve(), into / "model.safetensors")
    defaults = MambaSTConfig().to_dict()
    model = {key: value for key, value in cfg.to_dict().items() if defaults.get(key) != value}
    (into / "config.yaml").write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    return str(into)


def stylize_fps(job: StylizeJob, code_root: Path, weights: str, who: str, rev: str) -> float:
    """`mambast stylize` of `job` by the code under `code_root`, in a fresh process: the fps it reports."""
    command = [sys.executable, "-P", "-m", "jobs.cli", "stylize", job.input, "--style", job.style, "-o", job.output,
               "--weights", weights, "--max-frames", str(job.max_frames), "--working-size",
               str(job.settings.working_size), "--device", job.device, "--runner", "local", "--overwrite"]
    print(f"bench gpu: mambast stylize, {who}" + (f" ({rev})" if who == "baseline" else ""), file=sys.stderr,
          flush=True)
    # as the user started `mambast` (before jobs/cli.py set its defaults), so that each revision sets its own;
    # -P: the working directory does not shadow PYTHONPATH
    env = {**LAUNCH_ENVIRONMENT, "PYTHONPATH": str(code_root)}
    proc = subprocess.run(command, env=env, cwd=code_root, capture_output=True, text=True)
    found = STYLIZE_LINE.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise UserError(f"--baseline: {who}'s mambast stylize failed: {detail[:300]}")
    return float(found.group(2))


def print_summary(report: dict) -> None:
    print(f"  {'stage':14s} {'on':14s} {'ms/frame':>10s}  {'fps alone':>9s}")
    for name, stage in report["stages"].items():
        ms = stage["ms_per_frame"]
        part = f"  (part of {stage['part_of']})" if stage["part_of"] else ""
        print(f"  {name:14s} {stage['on']:14s} {ms:10.1f}  {1000 / ms:9.2f}{part}")
    print(f"  (host = {report['host']}; device = {report['device']})")
    for name, route in report["projected"].items():
        print(f"  {name} route ({' + '.join(route['stages'])}): serial {route['serial_fps']:.2f} fps "
              f"({route['serial_ms']:.1f} ms), stages overlapped {route['overlapped_fps']:.2f} fps "
              f"(slowest: {route['slowest']}, {route['slowest_ms']:.1f} ms)")
    e2e = report["end_to_end"]
    fps = ", ".join(f"{mode} {value:.2f} fps" for mode, value in e2e["fps"].items())
    print(f"  stylize job end to end on {e2e['measured_on']} ({e2e['frames']} frames, post on the {e2e['post']}, best "
          f"of {e2e['runs_per_mode']} alternated runs): {fps}")
    print(f"  pipelined / serial {e2e['pipelined_over_serial']:.3f} (what the overlap alone buys here)")
    if "against_baseline" in e2e:
        against = e2e["against_baseline"]
        print(f"  mambast stylize, today vs {against['revision']} ({against['frames']} frames, fresh processes, "
              f"best of {against['runs_each']} alternated runs): {against['fps']['today']:.2f} vs {against['fps']['baseline']:.2f} fps, "
              f"{against['today_over_baseline']:.3f}x (issue 22's target: >= {against['target']})")
    if report["random_weights"]:
        print(f"  (random weights of {report['config']}: only the cost is meaningful, not the pictures)")
    if "device_peak_mb" in report:
        print(f"  device memory peak over the stages: {report['device_peak_mb']:.0f} MB")

"""`mambast live`: stylize a camera or a file frame by frame, as fast as it comes, shown in a window or written out.

    mambast live --camera 0 --style starry.jpg --show
    mambast live --input clip.mp4 --style "0:starry.jpg,5s:wave.png" --output out.mp4 --target-fps 25

The working size adapts to keep up with the source (or --target-fps): it steps down a ladder of short sides when
frames take too long and back up when there is ample headroom (pipeline/camera.py); each change restarts the
temporal smoothing, and style codes are cached per token grid, so returning to a size encodes nothing. Frame rate
and size changes are printed; with --show the frame rate is drawn on the picture (q or Esc quits).

A file is read in full (no frame is dropped, so the output keeps every frame and its timing); a camera is read
live. Ctrl-C stops and still finishes the output file.
"""
from __future__ import annotations

import itertools
import time
from fractions import Fraction

from models.errors import UserError
from pipeline.api import Stylizer
from pipeline.camera import DEFAULT_FLOOR, AdaptiveWorkingSize, Window, camera_frames, size_ladder
from pipeline.sink import FrameSink
from pipeline.source import Frame, open_source
from pipeline.styles import parse_style, style_files

REPORT_EVERY_S = 2.0  # seconds between frame-rate lines


def register(sub):
    p = sub.add_parser("live", help="stylize a camera or a file in real time, adapting the working size")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--camera", type=int, metavar="INDEX", help="camera index (e.g. 0)")
    source.add_argument("--input", metavar="FILE", help="a video file or an image sequence")
    p.add_argument("--style", default=None,
                   help="image, blend 'a.jpg*0.7+b.png*0.3' or schedule '0:a.jpg,5s:b.png' (default: Starry Night)")
    p.add_argument("--output", metavar="FILE_OR_FOLDER", help="write the stylized frames (video file or folder)")
    p.add_argument("--show", action="store_true", help="show the frames in a window (needs a display)")
    p.add_argument("--target-fps", type=float, help="frame rate to keep up with (default: the source's)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--working-size", type=int, default=512,
                   help="starting (and largest) working size, short side in pixels; 0 = the source size (default 512)")
    p.add_argument("--min-working-size", type=int, default=DEFAULT_FLOOR,
                   help=f"the working size never goes below this (default {DEFAULT_FLOOR})")
    p.add_argument("--style-strength", type=float, default=1.0, help="how much style, 0 (the content) to 1 (default)")
    p.add_argument("--preserve-color", action="store_true", help="keep the source's colours")
    p.add_argument("--no-temporal", action="store_true", help="no temporal smoothing")
    p.add_argument("--weights", help="model folder or .safetensors (default: the bundled weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.output and not args.show:
        raise UserError("live: nothing to do: pass --output FILE_OR_FOLDER and/or --show")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames: must be >= 1, got {args.max_frames}")
    if args.working_size < 0:
        raise UserError(f"--working-size: must be >= 0, got {args.working_size}")
    window = Window.open() if args.show else None
    if args.show and window is None:
        if not args.output:
            raise UserError("--show: no display here (or OpenCV without a GUI); use --output instead")
        print("live: no display here; --show ignored")

    # 1. The source: Frames with indices and timestamps, its size and rate
    if args.camera is not None:
        images, fps = camera_frames(args.camera)
        frames = (Frame(i, i, image) for i, image in enumerate(images))
        info, name = None, f"camera {args.camera}"
        first = next(frames, None)
        if first is None:
            raise UserError(f"{name}: gave no frame")
        frames = itertools.chain([first], frames)
        height, width = first.image.shape[:2]
    else:
        source = open_source(args.input)
        info, name = source.info, args.input
        frames, fps = source.frames(max_frames=args.max_frames), float(info.fps)
        height, width = info.height, info.width
    if args.max_frames is not None:
        frames = itertools.islice(frames, args.max_frames)
    target = args.target_fps if args.target_fps is not None else fps
    sizes = AdaptiveWorkingSize(size_ladder(args.working_size, min(height, width), args.min_working_size), target)

    # 2. The stylizer, at the ladder's top size
    style = parse_style(args.style, fps=fps) if args.style is not None else None  # "5s:" keyframes need the fps
    stylizer = Stylizer(args.weights, style=style, working_size=sizes.size, strength=args.style_strength,
                        preserve_color=args.preserve_color, temporal=not args.no_temporal, seed=args.seed)
    print(f"live: {name}, {width}x{height} at {fps:.3g} fps; target {target:.3g} fps; "
          f"working sizes {sizes.ladder}", flush=True)

    # 3. Frames in, stylized frames out, the working size adjusted between frames
    sink = None
    if args.output:
        record = {"mambast": {"live": {"input": name, "style": args.style or "default", "seed": args.seed,
                                       "style_strength": args.style_strength, "weights": args.weights or "bundled"}}}
        common = dict(overwrite=args.overwrite, metadata=record, protect=style_files(style) if style else ())
        sink = (FrameSink(args.output, like=info, **common) if info is not None
                else FrameSink(args.output, fps=Fraction(fps).limit_denominator(1001), **common))
    done, started = 0, time.perf_counter()
    try:
        done = _loop(stylizer, frames, sizes, sink, window)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        if window is not None:
            window.close()
    if sink is not None:
        sink.close()
    elapsed = time.perf_counter() - started
    print(f"live: {done} frames in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} fps overall), "
          f"last working size {sizes.size}" + (f"; wrote {args.output}" if sink is not None else ""), flush=True)
    return 0


def _loop(stylizer: Stylizer, frames, sizes: AdaptiveWorkingSize, sink: FrameSink | None,
          window: Window | None) -> int:
    """Stylize until the source ends, the window closes or Ctrl-C; returns the number of frames done."""
    inputs, originals = itertools.tee(frames)  # the stream reads `inputs`; `originals` keeps pts and alpha
    done, last_report = 0, time.perf_counter()
    tick = time.perf_counter()
    try:
        for frame, out in zip(originals, stylizer.stream(inputs)):
            if sink is not None:
                sink.write(Frame(frame.index, frame.pts, out, frame.alpha))
            now = time.perf_counter()
            change = sizes.update(now - tick)
            tick, done = now, done + 1
            if window is not None and not window.show(out, f"{sizes.fps:.1f} fps  {stylizer.working_size}px"):
                break
            if change is not None:
                print(f"live: frame {frame.index}: {change}", flush=True)
                stylizer.working_size = change.new
            if now - last_report >= REPORT_EVERY_S:
                print(f"live: frame {frame.index}: {sizes.fps:.1f} fps at working size {sizes.size}", flush=True)
                last_report = now
    except KeyboardInterrupt:
        print("live: stopped", flush=True)
    return done

"""`mambast tune`: weights tuned to one style on frames of one or more clips, written as a checkpoint folder.

`mambast stylize` tunes on its own (`--tune-steps`, cached). This command is for the work that reuses one style:
a batch job over many clips (give the folder as the job's `weights:`), or a live session (`--weights`).

    mambast tune --style starry.jpg --clips a.mp4 b.mp4 -o tuned/starry
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from models.errors import UserError
from models.style_tuning import StyleTuning
from pipeline.chunks import DECODE_BACKEND
from pipeline.images import load_image
from pipeline.source import open_source
from pipeline.style_tuning import TUNING_FRAMES, tuned_weights, tuning_frames


def register(sub) -> None:
    p = sub.add_parser("tune", help="tune the model to one style on frames of clips; writes a weights folder",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--style", required=True, help="the style image")
    p.add_argument("--clips", nargs="+", required=True, metavar="CLIP",
                   help="videos, image folders or frame patterns to tune on (frames spread over each)")
    p.add_argument("-o", "--output", required=True, help="folder to write (model.safetensors + config.yaml)")
    p.add_argument("--weights", help="weights to start from (default: the bundled weights)")
    p.add_argument("--steps", type=int, default=StyleTuning.steps, help=f"tuning steps ({StyleTuning.steps})")
    p.add_argument("--working-size", type=int, default=512,
                   help="short side the frames are seen at, as `mambast stylize --working-size` (512)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=run_tune)


def run_tune(args) -> int:
    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1, got {args.steps}")
    if args.working_size < 0:
        raise UserError(f"--working-size: must be >= 0, got {args.working_size}")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    for given in (args.style, *args.clips):
        if os.path.exists(given) and os.path.realpath(given) == os.path.realpath(out):
            raise UserError(f"{out}: this would overwrite the input {given}; choose another output")
    style = load_image(args.style)
    frames = []
    per_clip = max(2, TUNING_FRAMES // len(args.clips))
    for clip in args.clips:
        source = open_source(clip, backend=DECODE_BACKEND)
        frames += tuning_frames(source, source.select(), args.working_size, per_clip)
    from pipeline.api import resolve_device

    cached = tuned_weights(args.weights, style, frames, StyleTuning(steps=args.steps),
                           device=resolve_device(args.device), name=os.path.basename(args.style))
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(cached, staging)
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    os.replace(staging, out)
    print(f"wrote {out}: weights tuned to {os.path.basename(args.style)} on {len(frames)} frames of "
          f"{len(args.clips)} clip(s) ({args.steps} steps)")
    return 0

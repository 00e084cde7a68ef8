"""`mambast demo`: stylize the packaged demo clip with a famous painting, to see the product work in one command.

Writes OUT/demo.mp4 (the first N frames, with the clip's audio if it has any) and OUT/demo_sheet.png (a few
source | stylized pairs, the painting beside them). Both belong to the demo and are replaced on every run.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.packaged_media import demo_clip, gcompris_paintings, starry_night
from models.errors import UserError
from models.style_tuning import StyleTuning
from pipeline.settings import Settings
from pipeline.local_runner import run_local, run_preview
from pipeline.stylize_job import StylizeJob

SHEET_FRAMES = 4


def register(sub) -> None:
    p = sub.add_parser("demo", help="stylize the packaged demo clip with a painting",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="out", help="folder for demo.mp4 and demo_sheet.png (made if missing; out)")
    p.add_argument("--weights", help="checkpoint folder or .safetensors file (default: the bundled weights)")
    p.add_argument("--frames", type=int, default=60, help="how many frames of the clip to stylize (60)")
    p.add_argument("--tune-steps", type=int, default=StyleTuning.steps, metavar="N",
                   help=f"tune the model to the painting on the clip's frames first, 0 = off ({StyleTuning.steps})")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    if args.frames < 1:
        raise UserError(f"--frames: must be at least 1, got {args.frames}")
    settings = Settings(tune_steps=args.tune_steps)  # a UserError for a negative count
    clip, painting = demo_clip(), demo_painting()
    out = Path(args.out)
    made_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    video = StylizeJob(input=str(clip), style=str(painting), output=str(out / "demo.mp4"), weights=args.weights,
                       max_frames=args.frames, overwrite=True, settings=settings)
    print(f"demo: {clip.name} (first {args.frames} frames) in the style of {painting.name}")
    try:
        summary = run_local(video)
        sheet = run_preview(StylizeJob(input=video.input, style=video.style, output=str(out / "demo_sheet.png"),
                                       weights=args.weights, max_frames=args.frames, overwrite=True,
                                       settings=settings), SHEET_FRAMES)
    except BaseException:
        if made_folder and not any(out.iterdir()):
            out.rmdir()  # leave no trace of a demo that did not run
        raise
    print(summary.line())
    print(f"video:         {os.path.abspath(summary.output)}")
    print(f"contact sheet: {os.path.abspath(sheet.output)}")
    return 0


def demo_painting() -> Path:
    """The Starry Night from opencv-doc, else the first gcompris painting."""
    try:
        return starry_night()
    except UserError:
        paintings = gcompris_paintings()
        if not paintings:
            raise UserError("demo: no painting found; run `apt-get install opencv-doc`") from None
        return paintings[0]

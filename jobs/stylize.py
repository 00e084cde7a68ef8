"""`mambast stylize INPUT --style IMAGE -o OUTPUT`: stylize a video (or an image sequence) with one style.

Settings: the built-in defaults (shown with each flag), overridden by a preset (`--preset NAME` for
configs/presets/NAME.yaml, or a YAML path; an unknown key is an error), overridden by the flags given. The final
settings are stored in the output's metadata.

Runners: `local` stylizes in this process; `ray` spreads chunks of the clip over Ray actors (a local cluster bound
to loopback, or `--address`); `auto` (the default) takes `local` when the selected frames fit in one chunk and no
`--address` is given, `ray` otherwise. Both give the same frames.

`--preview N` stylizes N frames spread evenly over the selection (each on its own, without temporal smoothing)
and writes a contact sheet, source | stylized with the style beside it, to OUTPUT, which must then be a .png.

--style takes one image, a blend or a keyframe schedule (quote it in the shell):
  --style painting.jpg                     one image
  --style "a.jpg*0.7+b.jpg*0.3"            a blend: weights >= 0, normalised to sum 1 (a part without *w weighs 1)
  --style "0:a.jpg,5s:b.jpg"               a schedule: a style per keyframe, in frames (120) or seconds (5s);
                                           between keyframes it morphs, after the last it holds
  --style "0:a.jpg,120:a.jpg*0.5+b.jpg*0.5"  keyframes may be blends
A path that exists is always that file, whatever characters its name holds.

A damaged input (a header listing more frames than the file holds, frames at the end that no longer decode) is
stylized as far as it decodes, with one warning, recorded in the output's metadata; --strict refuses it.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from models.errors import UserError
from models.style_tuning import StyleTuning
from pipeline.chunks import DECODE_BACKEND
from pipeline.local_runner import run_local, run_preview
from pipeline.settings import RUN_KEYS, Settings, preset_names, read_preset
from pipeline.source import open_source
from pipeline.stylize_job import RAY_CHUNK_FRAMES, StylizeJob

RUNNERS = ("auto", "local", "ray")
# what a preset and the flags may set; a stylize command tunes to its style unless told not to (the Settings
# default, 0, is the library's and batch jobs')
DEFAULTS = asdict(Settings()) | {"tune_steps": StyleTuning.steps} | RUN_KEYS


def register(sub) -> None:
    p = sub.add_parser("stylize", help="stylize a video with a style image",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="video file, image folder, or a pattern like frames/%%06d.png "
                                                  "(a file that exists is that file, %% in its name or not)")
    p.add_argument("--style", required=True, metavar="STYLE",
                   help="a style image, a blend 'a.jpg*0.7+b.jpg*0.3' or a keyframe schedule '0:a.jpg,5s:b.jpg' "
                        "(see above)")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help=".mp4/.mov/.mkv, a folder or frames/%%06d.png for PNG frames; .png with --preview")
    p.add_argument("--weights", help="checkpoint folder or .safetensors file (default: the bundled weights)")
    p.add_argument("--preset", help=f"settings preset: a name in configs/presets ({', '.join(preset_names())}) "
                                    f"or a YAML file")
    frames = p.add_argument_group("frames")
    frames.add_argument("--start", type=int, default=0, help="first frame (0-based)")
    frames.add_argument("--end", type=int, help="stop before this frame")
    frames.add_argument("--every-nth", type=int, default=1, help="take every n-th frame; each is shown n frames long")
    frames.add_argument("--max-frames", type=int, help="at most this many frames")
    frames.add_argument("--preview", type=int, metavar="N", help="write a contact sheet of N frames instead")
    frames.add_argument("--strict", action="store_const", const=True,
                        help="refuse a damaged input instead of stylizing the frames that decode")
    look = p.add_argument_group("stylization (defaults: the preset, else the values shown)")
    look.add_argument("--working-size", type=int, help=f"short side the model runs at (smaller frames are enlarged to it), 0 = source size "
                                                       f"({DEFAULTS['working_size']})")
    look.add_argument("--temporal-strength", dest="temporal_strength", type=float, metavar="S",
                      help=f"temporal smoothing 0..1, 0 turns it off ({DEFAULTS['temporal_strength']})")
    look.add_argument("--style-strength", type=float, metavar="S",
                      help=f"how much style, 0 (the content) to 1 ({DEFAULTS['style_strength']})")
    look.add_argument("--preserve-color", action="store_const", const=True,
                      help="keep the source's colours, take only the style's texture")
    look.add_argument("--seed", type=int, help=f"style token permutation seed ({DEFAULTS['seed']})")
    look.add_argument("--batch-size", type=int, help=f"frames per model call ({DEFAULTS['batch_size']})")
    look.add_argument("--tune-steps", type=int, metavar="N",
                      help=f"tune the model to the style for N steps on the clip's frames first, 0 = off "
                           f"({DEFAULTS['tune_steps']}; cached, so a second run starts at once)")
    look.add_argument("--device", help="auto, cpu or cuda (auto)")
    out = p.add_argument_group("output (defaults: the preset, else the values shown)")
    out.add_argument("--codec", help="h264, hevc, prores, ffv1; png or exr for frames (from the extension)")
    out.add_argument("--crf", type=int, help=f"quality for h264/hevc, lower is better ({DEFAULTS['crf']})")
    out.add_argument("--pix-fmt", help="e.g. yuv420p, yuv444p10le (chosen to fit the size, alpha and bit depth)")
    out.add_argument("--no-audio", dest="audio", action="store_const", const=False, help="leave the audio out")
    out.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    run = p.add_argument_group("runner")
    run.add_argument("--runner", choices=RUNNERS, help="auto: local for clips of one chunk, else ray (auto)")
    run.add_argument("--address", help="join the Ray cluster at this address (implies --runner ray)")
    run.add_argument("--chunk-frames", type=int, help=f"frames per Ray chunk ({RAY_CHUNK_FRAMES})")
    p.set_defaults(func=run_stylize)


def run_stylize(args) -> int:
    values = resolve_settings(args)
    runner, device = values.pop("runner"), values.pop("device")
    job = StylizeJob(input=args.input, style=args.style, output=args.output, settings=Settings(**values),
                     weights=args.weights, start=args.start, end=args.end, every_nth=args.every_nth,
                     max_frames=args.max_frames, overwrite=args.overwrite, device=device)
    if args.preview is not None:
        summary = run_preview(job, args.preview)
    elif choose_runner(job, runner, args.address) == "ray":
        from pipeline.ray_clip import run_ray  # imports Ray, which only this path needs

        summary = run_ray(job, address=args.address)
    else:
        summary = run_local(job)
    print(summary.line())
    return 0


def resolve_settings(args) -> dict:
    """Defaults, then the preset, then the flags given."""
    settings = dict(DEFAULTS)
    if args.preset:
        settings.update(read_preset(args.preset))
    settings.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key, None) is not None})
    if settings["runner"] not in RUNNERS:
        raise UserError(f"runner: must be one of {', '.join(RUNNERS)}, got {settings['runner']!r}")
    return settings


def choose_runner(job: StylizeJob, runner: str, address: str | None) -> str:
    if runner != "auto":
        if address and runner == "local":
            raise UserError("--address joins a Ray cluster; it does not go with --runner local")
        return runner
    if address:
        return "ray"
    source = open_source(job.input, backend=DECODE_BACKEND, strict=job.settings.strict)
    selected = source.select(job.start, job.end, job.every_nth, job.max_frames)
    return "local" if len(selected) <= (job.settings.chunk_frames or RAY_CHUNK_FRAMES) else "ray"

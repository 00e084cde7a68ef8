"""`mambast eval quality`: does the model carry the style while keeping the content? Held-out pairs, baselines.

For every held-out content × style pair (the `val` splits of a `mambast data build` folder), at 256×256:

- style distance of an image X to the style S, on a perceptual network NOT used by the training loss
  (EfficientNet-Lite0 by default; the bundled model trains on MobileNetV2):
    mean/std: Σ_taps ‖μ(φ(X)) − μ(φ(S))‖² + ‖σ(φ(X)) − σ(φ(S))‖²   (per tap, normalised by the tap's value for the
              content image, so each tap counts equally and 1.0 means "as far as the content image")
    Gram:     Σ_taps ‖G(φ(X)) − G(φ(S))‖², normalised the same way
- content distance to the content C: ‖norm(φ_deep(X)) − norm(φ_deep(C))‖² on the two deepest taps.

The model runs as `mambast stylize` runs it: through `pipeline.Stylizer` (no temporal smoothing) at a working
size, by default the default preset's (512: the images are enlarged to 512², stylized, and averaged back to 256²,
as the official test transform `Resize(512)` does). `model_at_256` is the model run at the images' own 256²,
a diagnostic: its 32×32 token grid is what the working size is for (pipeline/stylizer.py, `working_shape`).

With `--clip`, the contents are that many frames spread over a video instead of the held-out photos, each at a
short side of 256 with its own aspect (the style distance still reads the painting at 256²): what a clip's frames
get, with the style fitted to a grid of another shape than the painting's (models/mambast.py, `fit_style`).

Rows: the model's output; with `--teacher magenta`, the distillation teacher's (models/teacher.py: Magenta's
arbitrary stylization network at its own 384 px, the trade-off to compare against); the content image itself (style-distance baseline: 1.0 by construction); a plain
colour-statistics transfer (Reinhard et al. 2001: per-channel mean/std in Lab); and, for content distance only,
the content blurred with a Gaussian of σ = 3 px, the bound below which the content is still recognisable.
A diagnostic row, `model_identity`, is the model's reconstruction of each content with itself as the style
(what the identity losses train): a stylization is not expected to keep the content better, so while its content
distance is above the blur's, retuning the style/content weights alone is unlikely to pass the content check.

Pass criteria (issue 3): model mean/std style distance ≤ 0.5 (half the content's), model style distance below the
colour-transfer baseline's, model content distance below the blurred content's. Every row is also broken down
by the held-out styles' source (the `source_group` that `mambast data build` writes into its manifest: gcompris,
wesnoth, stellarium, …). Writes a contact sheet (content | style | colour transfer | [teacher |] model) and
prints one JSON object last.

With `--inception/--alexnet/--lpips/--vgg19` weight files, the paper's metrics (FID, LPIPS, ArtFID, CFSD;
models/paper_metrics.py, models/paper_metric_nets.py) are added.
The distances and the per-pair loop live in pipeline/quality_metrics.py; this module is the command.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load_model
from models.errors import UserError
from models.style_tuning import StyleTuning
from models.teacher import load_teacher
from pipeline.api import Stylizer
from pipeline.images import contact_sheet, load_image, save_png
from pipeline.quality_metrics import SIZE, evaluate_quality, short_side, square, summarise, to_tensor
from pipeline.settings import read_preset

def style_sources(data: Path, styles: list[Path]) -> list[str]:
    """Each style file's source group from DIR/manifest.json ("all" where the manifest does not say)."""
    manifest = Path(data) / "manifest.json"
    groups = {}
    if manifest.is_file():
        try:
            groups = {f["path"]: f.get("source_group", "all") for f in json.loads(manifest.read_text())["files"]}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{manifest}: not a `mambast data build` manifest ({e})") from None
    return [groups.get(p.relative_to(data).as_posix(), "all") for p in styles]


def held_out(data: Path, kind: str, count: int) -> list[Path]:
    """The first `count` held-out images of `kind` ("content" or "style") of a `mambast data build` folder."""
    from jobs.train import image_files
    found = image_files(data / kind / "val")[:count]
    if not found:
        raise UserError(f"{data}: no held-out {kind}/val images (build them with `mambast data build {data}`)")
    return found


def clip_frames(path: str, count: int) -> list[np.ndarray]:
    """`count` frames spread evenly over a clip, short side SIZE, their aspect kept."""
    from pipeline.local_runner import spread
    from pipeline.source import open_source
    source = open_source(path)
    return [short_side(frame.image, SIZE) for frame in source.read(spread(range(source.info.num_frames), count))]


def register_quality(metrics) -> None:
    p = metrics.add_parser("quality", help="style/content distances on held-out pairs, with baselines and a sheet")
    p.add_argument("--weights", help="model weights folder (default: the bundled weights)")
    p.add_argument("--data", default="data/train", help="folder from `mambast data build` (its val splits)")
    p.add_argument("--net", default="efficientnet_lite0", help="perceptual network for the distances")
    p.add_argument("--working-size", type=int, default=None,
                   help="short side the model runs at (default: the default preset's, 512; 0 or 256 = the images' 256)")
    p.add_argument("--max-contents", type=int, default=16, help="held-out photos, or frames of --clip")
    p.add_argument("--clip", help="a video: its frames, spread over it, are the contents instead of the photos")
    p.add_argument("--max-styles", type=int, default=8)
    p.add_argument("--sheet", default="out/quality_sheet.png", help="contact sheet PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-steps", type=int, default=0, metavar="N",
                   help="add the row model_tuned: the model tuned to each style for N steps on the contents "
                        "(models/style_tuning.py; mambast stylize's default is %d)" % StyleTuning.steps)
    p.add_argument("--teacher", choices=["magenta"], help="add the distillation teacher's row and sheet column "
                   "(a training extra: pip install -e '.[train]')")
    for name in ("inception", "alexnet", "lpips", "vgg19"):
        p.add_argument(f"--{name}", help=f"{name} weights for the paper's metrics (optional)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run_quality)


def run_quality(args) -> int:
    for flag, value in (("--max-contents", args.max_contents), ("--max-styles", args.max_styles)):
        if value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if args.tune_steps < 0:
        raise UserError(f"--tune-steps: must be >= 0, got {args.tune_steps}")
    torch.manual_seed(args.seed)
    model = load_model(args.weights)
    style_paths = held_out(Path(args.data), "style", args.max_styles)
    if args.clip:
        contents = clip_frames(args.clip, args.max_contents)
    else:
        contents = [square(load_image(p)) for p in held_out(Path(args.data), "content", args.max_contents)]
    styles = [square(load_image(p)) for p in style_paths]
    working_size = read_preset("default")["working_size"] if args.working_size is None else args.working_size
    teacher = load_teacher(args.teacher) if args.teacher else None
    tuning = StyleTuning(steps=args.tune_steps) if args.tune_steps else None
    with tqdm(total=len(styles), desc="styles", unit="style") as bar:
        rows, sheet = evaluate_quality(model, contents, styles, args.net, working_size=working_size, seed=args.seed,
                                       teacher=teacher, sources=style_sources(Path(args.data), style_paths),
                                       tuning=tuning, progress=lambda _: bar.update(1))
    summary = summarise(rows)
    summary.update(pairs=len(contents) * len(styles), size=SIZE, working_size=working_size, net=args.net,
                   weights=args.weights or "bundled", contents=args.clip or "held-out photos")
    if any(getattr(args, n) for n in ("inception", "alexnet", "lpips", "vgg19")):
        summary["paper_metrics"] = _paper_metrics(args, model, contents, styles, working_size)
    Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
    labels = ["content", "style", "colour transfer", *(["teacher"] if teacher else []),
              *(["Mamba-ST tuned"] if tuning else []), "Mamba-ST"]
    save_png(args.sheet, contact_sheet(sheet, labels=[labels] * len(sheet)))
    shown = ("model", "model_tuned", "model_at_256", "teacher", "content", "colour_transfer", "blur_sigma3")
    for method in shown:
        if method not in summary:
            continue
        s = summary[method]
        print(f"  {method:16s} style mean/std {s['style_meanstd']:.3f}  gram {s['style_gram']:.3f}  "
              f"content {s['content_distance']:.3f}")
    for source, methods in summary["by_source"].items():
        n = len({r["style"] for r in rows if r.get("source") == source})
        cells = "  ".join(f"{m} {methods[m]['style_meanstd']:.3f}/{methods[m]['content_distance']:.2f}"
                          for m in ("model", "model_tuned", "teacher", "colour_transfer") if m in methods)
        print(f"  source {source} ({n} styles), style/content: {cells}")
    print(f"  {'model_identity':16s} content {summary['model_identity']['content_distance']:.3f}  "
          f"(the model's reconstruction with the content as its own style)")
    print("  checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in summary["checks"].items()))
    print(f"  sheet: {args.sheet}")
    print(json.dumps(summary))
    return 0


def _paper_metrics(args, model, contents, styles, working_size: int) -> dict:
    from models.paper_metrics import load_paper_metric_nets, paper_metrics
    nets = load_paper_metric_nets(inception=args.inception, alexnet=args.alexnet, lpips_lin=args.lpips,
                                  vgg19=args.vgg19)
    stylizer = Stylizer(model, working_size=working_size, temporal=False, seed=args.seed)
    outs, cs, ss = [], [], []
    for style in styles:
        stylizer.set_style(style)
        outs.append(to_tensor(stylizer.stylize(list(contents))))
        cs.append(to_tensor(contents))
        ss.append(to_tensor([style]).expand(len(contents), -1, -1, -1))
    return paper_metrics(torch.cat(cs), torch.cat(ss), torch.cat(outs), nets)

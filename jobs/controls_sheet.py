"""`mambast controls-sheet -o out/controls.png`: one contact sheet showing every style control, for the README.

Rows (each made with the Python API, `pipeline.Stylizer`, from packaged images):

    strength      content | 0 | 0.25 | 0.5 | 0.75 | 1
    colour        content | style | preserve colour off | on
    blend         style A | style B | A | A·0.5 + B·0.5 | B        (mixed in the style code, not the outputs)
    schedule      frames 0, 10, 20, 30, 40 of the morph "0:A,40:B" (smoothstep between keyframes)

Defaults: scikit-image's astronaut photo, The Starry Night (opencv-doc) and The Great Wave (gcompris-qt-data).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from pipeline.packaged_media import gcompris_paintings, skimage_photo, starry_night
from models.errors import UserError
from pipeline.api import Stylizer
from pipeline.images import contact_sheet, load_image, save_png
from pipeline.styles import StyleBlend, StyleImage, StyleSchedule

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MORPH_FRAMES = (0, 10, 20, 30, 40)


def register(sub):
    p = sub.add_parser("controls-sheet", help="a contact sheet of the style controls (strength, colour, blend, "
                                              "schedule)")
    p.add_argument("-o", "--output", required=True, help="PNG to write, e.g. out/controls.png")
    p.add_argument("--weights", help="model folder or .safetensors (default: the bundled weights)")
    p.add_argument("--content", help="content image (default: scikit-image's astronaut)")
    p.add_argument("--styles", nargs=2, metavar=("A", "B"),
                   help="two style images (default: The Starry Night and The Great Wave)")
    p.add_argument("--size", type=int, default=256, help="short side of the content, in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.output.lower().endswith(".png"):
        raise UserError(f"{args.output}: the contact sheet is a PNG; name it *.png")
    if args.size < 16:
        raise UserError(f"--size: must be at least 16 pixels, got {args.size}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UserError(f"{args.output}: the folder {folder} does not exist")
    content = _short_side(load_image(args.content or str(skimage_photo("astronaut"))), args.size)
    a, b = (StyleImage.from_path(p) for p in (args.styles or _default_styles()))
    sheet = controls_sheet(Stylizer(args.weights, style=a, seed=args.seed), content, a, b)
    save_png(args.output, sheet)
    print(f"wrote {args.output} ({sheet.shape[1]}x{sheet.shape[0]})")
    return 0


def controls_sheet(stylizer: Stylizer, content: np.ndarray, a: StyleImage, b: StyleImage, cell: int = 192) -> np.ndarray:
    """The sheet as an RGB uint8 image: one row per control (see the module docstring)."""
    rows, labels = [], []

    stylizer.set_style(a)
    row = [content]
    for s in STRENGTHS:
        stylizer.strength = s
        row.append(stylizer.stylize(content))
    rows.append(row)
    labels.append(["content"] + [f"strength {s:g}" for s in STRENGTHS])
    stylizer.strength = 1.0

    row = [content, a.image]
    for keep in (False, True):
        stylizer.preserve_color = keep
        row.append(stylizer.stylize(content))
    rows.append(row)
    labels.append(["content", f"style: {a.name}", "colour: style's", "colour: content's"])
    stylizer.preserve_color = False

    row = [a.image, b.image]
    for weight_b in (0.0, 0.5, 1.0):
        stylizer.set_style(StyleBlend.of([a, b], [1.0 - weight_b, weight_b]))
        row.append(stylizer.stylize(content))
    rows.append(row)
    labels.append([f"A: {a.name}", f"B: {b.name}", "blend B 0", "blend B 0.5", "blend B 1"])

    stylizer.set_style(StyleSchedule(((MORPH_FRAMES[0], a), (MORPH_FRAMES[-1], b))))
    rows.append([stylizer.stylize(content, frame=f) for f in MORPH_FRAMES])
    labels.append([f"morph A->B, frame {f}" for f in MORPH_FRAMES])
    return contact_sheet(rows, labels, cell=cell)


def _default_styles() -> list[Path]:
    wave = [p for p in gcompris_paintings() if p.stem == "great_wave"]
    if not wave:
        raise UserError("The Great Wave: not among the gcompris paintings; pass --styles A B")
    return [starry_night(), wave[0]]


def _short_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = size / min(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)

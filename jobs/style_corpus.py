"""The style corpus of `mambast data build --styles corpus`: hundreds of style images from large Debian packages.

These packages (≈600 MB together) are for training only; install.sh and CI never fetch them (docs/assets.md §3.5):

    wesnoth-1.16-data + 16 campaigns  painted story scenes, the world map    -> group "wesnoth_story"
                                      painted portraits (one house style)    -> group "wesnoth_portrait" (capped)
    stellarium-data                   sky-culture figures of free cultures   -> group "stellarium" (cropped, capped)
    krita-data                        paper, canvas, hatching patterns       -> group "krita" (.png and GIMP .pat)
    hedgewars-data                    land textures and skies of the themes  -> group "hedgewars"
    gnome-backgrounds                 wallpapers (.webp)                     -> group "gnome"

    corpus_items()  every candidate as a style `Item` (licence, source package and path in its info)
        -> select_usable(items, seed)  drop the images LOOKED_AT_AND_SKIPPED; open the rest once: drop tiny,
                                       near-blank and mostly-black images and exact duplicates; cap the
                                       shares of the portraits and the sky figures by a seeded draw; join near-identical images (same
                                       family name or perceptual hash) into one `family`
        -> jobs/data.py splits by family and writes the files

Every package root is a module constant so tests can point it at a small fake tree.
"""
from __future__ import annotations

import configparser
import fnmatch
import hashlib
import random
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from jobs.dataset_item import Item
from models.errors import UserError

WESNOTH_DATA = Path("/usr/share/games/wesnoth/1.16/data")
STELLARIUM_SKYCULTURES = Path("/usr/share/stellarium/skycultures")
KRITA_PATTERNS = Path("/usr/share/krita/patterns")
HEDGEWARS_THEMES = Path("/usr/share/games/hedgewars/Data/Themes")
GNOME_BACKGROUNDS = Path("/usr/share/backgrounds/gnome")
DEBIAN_DOCS = Path("/usr/share/doc")  # DEBIAN_DOCS/<package>/copyright

WESNOTH_CAMPAIGNS = {  # apt package -> campaign folder under WESNOTH_DATA/campaigns
    "wesnoth-1.16-did": "Descent_Into_Darkness", "wesnoth-1.16-dm": "Delfadors_Memoirs",
    "wesnoth-1.16-dw": "Dead_Water", "wesnoth-1.16-ei": "Eastern_Invasion",
    "wesnoth-1.16-httt": "Heir_To_The_Throne", "wesnoth-1.16-l": "Liberty",
    "wesnoth-1.16-low": "Legend_of_Wesmere", "wesnoth-1.16-nr": "Northern_Rebirth",
    "wesnoth-1.16-sof": "Sceptre_of_Fire", "wesnoth-1.16-sota": "Secrets_of_the_Ancients",
    "wesnoth-1.16-sotbe": "Son_Of_The_Black_Eye", "wesnoth-1.16-thot": "The_Hammer_of_Thursagan",
    "wesnoth-1.16-trow": "The_Rise_Of_Wesnoth", "wesnoth-1.16-tsg": "The_South_Guard",
    "wesnoth-1.16-ttb": "Two_Brothers", "wesnoth-1.16-utbs": "Under_the_Burning_Suns",
}
WESNOTH_LICENCE = "GPL-2.0-or-later (Battle for Wesnoth; debian/copyright)"
# Secrets of the Ancients' story images are screenshots of the game's hex map, not paintings.
WESNOTH_STORY_SKIPPED_CAMPAIGNS = ("Secrets_of_the_Ancients",)
GNOME_ADWAITA_LICENCE = "CC-BY-SA-3.0 (Jakub Steiner; debian/copyright)"
GNOME_OTHER_LICENCE = ("CC-BY-SA-3.0 or GPL-2+ (gnome-backgrounds 43: the package's two licences; "
                       "debian/copyright itemises only adwaita*)")

# Opened by hand on a contact sheet of a corpus build and found unusable as styles (source_path -> why).
LOOKED_AT_AND_SKIPPED = {
    **{f"{HEDGEWARS_THEMES}/{theme}/Sky.png": "a flat night sky with only a moon or a silhouette"
       for theme in ("Castle", "Cave", "CrazyMission", "EarthRise", "Halloween", "Island")},
    **{f"{GNOME_BACKGROUNDS}/pixels-{variant}.webp": "application icons scattered on a flat colour"
       for variant in "dl"},
    **{f"{GNOME_BACKGROUNDS}/symbolic-{variant}.webp": "a flat colour with faint UI symbols" for variant in "dl"},
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MIN_SHORT_SIDE = 192  # px, any image as found (stellarium and portraits: after the crop to the art)
MIN_SHORT_SIDE_BY_GROUP = {"stellarium": 160, "krita": 256}
MIN_COLOUR_STD = 3.0  # largest per-channel std at 256 px; below: a flat image
MIN_DETAIL = 1.0  # mean |horizontal| + |vertical| grey step at 256 px; below: a smooth gradient
MIN_ART_SHARE = 0.15  # figures on black (stellarium, portraits): share of non-black pixels after the crop
CROPPED_GROUPS = ("stellarium", "wesnoth_portrait")  # figures on black or transparency: cropped to the art
# Groups drawn in one house style are capped, as a share of the whole style set: wesnoth's portraits (one
# painter's look), stellarium's figures (mostly grey drawings on black; 71 of them one artist's western set).
GROUP_CAPS = {"wesnoth_portrait": 0.25, "stellarium": 0.20}
NEAR_IDENTICAL_BITS = 4  # difference hashes this close (of 64 bits) are one picture


def required_packages() -> dict[str, Path]:
    """apt package -> a folder that exists once it is installed."""
    return {
        "wesnoth-1.16-data": WESNOTH_DATA / "core",
        **{package: WESNOTH_DATA / "campaigns" / folder for package, folder in WESNOTH_CAMPAIGNS.items()},
        "stellarium-data": STELLARIUM_SKYCULTURES,
        "krita-data": KRITA_PATTERNS,
        "hedgewars-data": HEDGEWARS_THEMES,
        "gnome-backgrounds": GNOME_BACKGROUNDS,
    }


def check_installed() -> None:
    missing = [package for package, folder in required_packages().items() if not folder.is_dir()]
    if missing:
        raise UserError(f"--styles corpus: {len(missing)} Debian package(s) missing; "
                        f"run `apt-get install {' '.join(missing)}`")


def corpus_items() -> list[Item]:
    """Every candidate style image of the packages, in a fixed order (see the module docstring)."""
    check_installed()
    items = wesnoth_items() + stellarium_items() + krita_items() + hedgewars_items() + gnome_items()
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise UserError(f"style corpus: two images would be written as {twice[0]}.png (unexpected package layout)")
    return items


# ---------------------------------------------------------------------------------------------------------
# Sources: one function per package family, each returning unscreened Items


def wesnoth_items() -> list[Item]:
    story, portraits = [], []
    core = WESNOTH_DATA / "core" / "images"
    story += [(path, "core") for path in _images_in(core / "story")]
    story += [(path, "core") for path in _images_in(core / "maps") if path.stem != "background"]  # wood texture
    portraits += [(path, "core") for path in _images_in(core / "portraits", recursive=True)]
    for package, campaign in WESNOTH_CAMPAIGNS.items():
        images = WESNOTH_DATA / "campaigns" / campaign / "images"
        short = package.removeprefix("wesnoth-1.16-")
        if campaign not in WESNOTH_STORY_SKIPPED_CAMPAIGNS:
            story += [(path, short) for path in _images_in(images / "story") if "logo" not in path.stem]  # text
        portraits += [(path, short) for path in _images_in(images / "portraits", recursive=True)]
        for folder in ("characters", "portraits"):  # full-size portraits shown in story screens
            portraits += [(path, short) for path in _images_in(images / "story" / folder)]

    def item(group: str, path: Path, where: str) -> Item:
        package = "wesnoth-1.16-data" if where == "core" else f"wesnoth-1.16-{where}"
        return Item(_slug(f"{group}_{where}_{path.relative_to(path.parents[1]).with_suffix('')}"), "style", group,
                    _opener(path, crop=group in CROPPED_GROUPS),
                    _source(package, path, WESNOTH_LICENCE),
                    family=f"{group}:{_slug(path.stem)}")

    return ([item("wesnoth_story", path, where) for path, where in story]
            + [item("wesnoth_portrait", path, where) for path, where in portraits])


def stellarium_items() -> list[Item]:
    """Constellation figures (those constellationsart.fab names) of the sky cultures whose info.ini licence is
    free; the others are skipped. Images a culture shows elsewhere (book covers, star charts) are left out."""
    items = []
    for culture in sorted(p for p in STELLARIUM_SKYCULTURES.iterdir() if (p / "constellationsart.fab").is_file()):
        licence = stellarium_licence(culture)
        if not licence_is_free(licence):
            continue
        for file in _fab_images(culture / "constellationsart.fab"):
            path = culture / file
            items.append(Item(_slug(f"stellarium_{culture.name}_{Path(file).stem}"), "style", "stellarium",
                              _opener(path, crop=True),
                              {**_source("stellarium-data", path, licence), "sky_culture": culture.name},
                              family=f"stellarium:{_slug(Path(file).stem)}"))  # one figure, several cultures
    return items


def stellarium_cultures() -> dict[str, dict[str, str]]:
    """{"kept": {culture: licence}, "skipped": {culture: licence}} over the cultures that carry figure art."""
    cultures = {"kept": {}, "skipped": {}}
    for culture in sorted(p for p in STELLARIUM_SKYCULTURES.iterdir() if (p / "constellationsart.fab").is_file()):
        licence = stellarium_licence(culture)
        cultures["kept" if licence_is_free(licence) else "skipped"][culture.name] = licence or "(none in info.ini)"
    return cultures


def stellarium_licence(culture: Path) -> str:
    """The `license` of the culture's info.ini, "" when it names none."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string((culture / "info.ini").read_text(encoding="utf-8-sig"))  # some start with a BOM
    except (OSError, configparser.Error) as e:
        raise UserError(f"{culture / 'info.ini'}: cannot read the sky culture's licence ({e})") from None
    return parser.get("info", "license", fallback="").strip()


def licence_is_free(licence: str) -> bool:
    """GPL, CC BY-SA and the Free Art License are free; anything NoDerivs or NonCommercial is not."""
    text = licence.upper()
    if re.search(r"\bND\b|\bNC\b|NO-?DERIV|NON-?COMMERCIAL", text.replace("-", " ")):
        return False
    return bool(re.search(r"\bGPL\b|\bBY[- ]SA\b|FREE ART", text))


def krita_items() -> list[Item]:
    licence = debian_licence("krita-data", "krita/data/patterns/")  # what debian/copyright says of the patterns
    items = []
    for path in sorted(KRITA_PATTERNS.iterdir()):
        if path.suffix.lower() not in (*IMAGE_SUFFIXES, ".pat"):
            continue
        load = (lambda path=path: read_gimp_pattern(path).convert("RGB")) if path.suffix == ".pat" else _opener(path)
        items.append(Item(_slug(f"krita_{path.stem}"), "style", "krita", load, _source("krita-data", path, licence),
                          family=f"krita:{_slug(path.stem)}"))
    return items


def hedgewars_items() -> list[Item]:
    """Each theme's land texture and sky. Left out: LandBackTex (a darkened LandTex) and horizont (silhouettes
    on transparency)."""
    items = []
    for theme in sorted(p for p in HEDGEWARS_THEMES.iterdir() if p.is_dir()):
        for file in ("LandTex.png", "Sky.png"):
            path = theme / file
            if not path.is_file():
                continue
            licence = debian_licence("hedgewars-data", f"share/hedgewars/Data/Themes/{theme.name}/{file}")
            items.append(Item(_slug(f"hedgewars_{theme.name}_{path.stem}"), "style", "hedgewars", _opener(path),
                              _source("hedgewars-data", path, licence),
                              family=f"hedgewars:{theme.name}"))
    return items


def gnome_items() -> list[Item]:
    """The bitmap wallpapers; each comes in a light and a dark variant (one family). SVGs need a renderer: left out."""
    items = []
    for path in sorted(GNOME_BACKGROUNDS.glob("*.webp")):
        licence = GNOME_ADWAITA_LICENCE if path.name.startswith("adwaita") else GNOME_OTHER_LICENCE
        items.append(Item(_slug(f"gnome_{path.stem}"), "style", "gnome", _opener(path),
                          _source("gnome-backgrounds", path, licence),
                          family=f"gnome:{re.sub(r'-[dl]$', '', path.stem)}"))
    return items


def debian_licence(package: str, path_in_source: str) -> str:
    """The License of the last stanza of DEBIAN_DOCS/package/copyright (DEP-5) whose Files match the path."""
    copyright_file = DEBIAN_DOCS / package / "copyright"
    try:
        text = copyright_file.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{copyright_file}: cannot read ({e.strerror})") from None
    licence = ""
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", stanza, re.MULTILINE)
        licence_line = re.search(r"^License:[ \t]*(\S.*)$", stanza, re.MULTILINE)
        if files and licence_line and any(fnmatch.fnmatchcase(path_in_source, pattern)
                                          for pattern in files.group(1).split()):
            licence = licence_line.group(1).strip()
    if not licence:
        raise UserError(f"{copyright_file}: no Files stanza covers {path_in_source}")
    return licence


# ---------------------------------------------------------------------------------------------------------
# Reading and preparing images


def read_gimp_pattern(path: Path) -> Image.Image:
    """A GIMP pattern (.pat): big-endian u32 header size, version (1), width, height, bytes per pixel (1–4),
    the magic "GPAT", a UTF-8 name up to the header's end, then the raw pixels row by row."""
    blob = Path(path).read_bytes()
    if len(blob) < 24 or blob[20:24] != b"GPAT":
        raise UserError(f"{path}: not a GIMP pattern (no GPAT header)")
    header_size, version, width, height, depth = struct.unpack(">5I", blob[:20])
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    if version != 1 or depth not in modes or not width or not height:
        raise UserError(f"{path}: unsupported GIMP pattern (version {version}, {depth} bytes per pixel)")
    pixels = blob[header_size: header_size + width * height * depth]
    if len(pixels) != width * height * depth:
        raise UserError(f"{path}: truncated GIMP pattern ({len(pixels)} of {width * height * depth} pixel bytes)")
    return Image.frombytes(modes[depth], (width, height), pixels)


def flatten_on_black(image: Image.Image) -> Image.Image:
    """RGB; transparent parts become black (the background of the figure art)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def crop_to_art(image: Image.Image, threshold: int = 24, margin: float = 0.05) -> Image.Image:
    """The bounding box of the pixels brighter than `threshold` (any channel), widened by `margin` of its size
    (at least 4 px) on every side; the image itself when it holds no such pixel."""
    bright = np.asarray(image.convert("RGB")).max(axis=2) > threshold
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    if not rows.size:
        return image
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pad_y, pad_x = max(4, round(margin * (bottom - top))), max(4, round(margin * (right - left)))
    return image.crop((max(0, left - pad_x), max(0, top - pad_y),
                       min(image.width, right + pad_x), min(image.height, bottom + pad_y)))


def _opener(path: Path, crop: bool = False) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(path) as image:
                image.load()
                flat = flatten_on_black(image)
        except OSError as e:
            raise UserError(f"{path}: cannot read image ({e})") from None
        return crop_to_art(flat) if crop else flat

    return load


# ---------------------------------------------------------------------------------------------------------
# Screening: usable images, no duplicates, capped portraits, near-identical images in one family


def unusable_reason(image: Image.Image, group: str, cropped: bool) -> str | None:
    """Why `image` (as prepared for the set) cannot serve as a style, or None."""
    min_side = MIN_SHORT_SIDE_BY_GROUP.get(group, MIN_SHORT_SIDE)
    if min(image.size) < min_side:
        return f"short side {min(image.size)} px < {min_side}"
    rgb = np.asarray(_downscaled(image, 256), dtype=np.float32)
    spread = rgb.reshape(-1, 3).std(axis=0).max()
    if spread < MIN_COLOUR_STD:
        return f"near-blank (colour std {spread:.1f})"
    grey = rgb.mean(axis=2)
    detail = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    if detail < MIN_DETAIL:
        return f"near-blank (a smooth gradient, detail {detail:.2f})"
    if cropped:
        art = (rgb.max(axis=2) > 24).mean()
        if art < MIN_ART_SHARE:
            return f"mostly black ({art:.0%} art after the crop)"
    return None


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: is each pixel of a 9×8 grey thumbnail brighter than its right neighbour?"""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (grey[:, :-1] > grey[:, 1:]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def select_usable(items: list[Item], seed: int, progress: Callable = lambda items: items
                  ) -> tuple[list[Item], list[dict]]:
    """(kept items, dropped [{source, reason}]): see the module docstring. Kept items get the family of their
    near-identical set (the alphabetically first family name in it) and `perceptual_hash` in their info."""
    kept, dropped, first_by_pixels, hashes = [], [], {}, {}
    for item in progress(items):
        skipped_because = LOOKED_AT_AND_SKIPPED.get(item.info.get("source_path", ""))
        if skipped_because:
            dropped.append({"source": item.info["source"], "reason": skipped_because})
            continue
        image = item.load()
        reason = unusable_reason(image, item.group, cropped=item.group in CROPPED_GROUPS)
        pixels = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
        if reason is None and pixels in first_by_pixels:
            reason = f"duplicate of {first_by_pixels[pixels].info['source']}"
        if reason:
            dropped.append({"source": item.info["source"], "reason": reason})
            continue
        first_by_pixels[pixels] = item
        hashes[item.name] = difference_hash(image)
        kept.append(item)

    kept, capped = _cap_groups(kept, seed)
    dropped += [{"source": item.info["source"], "reason": f"{item.group} cap ({GROUP_CAPS[item.group]:.0%} of the set)"}
                for item in capped]
    _join_near_identical(kept, hashes)
    for item in kept:
        item.info["perceptual_hash"] = f"{hashes[item.name]:016x}"
    return kept, dropped


def _cap_groups(items: list[Item], seed: int) -> tuple[list[Item], list[Item]]:
    """(kept, capped): each group of GROUP_CAPS at most its share of the kept set, drawn with the seed.

    With U images in groups whose cap does not bind, the kept set has N = U / (1 − Σ share of the binding
    caps) images; a cap binds when its group has more than share·N. Found by shrinking the binding set."""
    members = {group: [item for item in items if item.group == group] for group in GROUP_CAPS}
    binding = {group for group in GROUP_CAPS if members[group]}
    while True:
        free = len(items) - sum(len(members[group]) for group in binding)
        total = free / (1 - sum(GROUP_CAPS[group] for group in binding))
        loose = {group for group in binding if len(members[group]) <= GROUP_CAPS[group] * total}
        if not loose:
            break
        binding -= loose
    dropped: set[str] = set()
    for group in sorted(binding):
        limit = int(GROUP_CAPS[group] * total)
        chosen = {item.name for item in random.Random(f"{seed}:{group}").sample(members[group], limit)}
        dropped |= {item.name for item in members[group] if item.name not in chosen}
    return ([item for item in items if item.name not in dropped], [item for item in items if item.name in dropped])


def _join_near_identical(items: list[Item], hashes: dict[str, int]) -> None:
    """Union the families of items whose difference hashes differ in at most NEAR_IDENTICAL_BITS bits."""
    parent = {item.family: item.family for item in items}

    def root(family: str) -> str:
        while parent[family] != family:
            parent[family] = parent[parent[family]]
            family = parent[family]
        return family

    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if bin(hashes[a.name] ^ hashes[b.name]).count("1") <= NEAR_IDENTICAL_BITS:
                first, second = sorted((root(a.family), root(b.family)))
                parent[second] = first
    for item in items:
        item.family = root(item.family)


# ---------------------------------------------------------------------------------------------------------
# Small helpers of this module


def _source(package: str, path: Path, licence: str) -> dict:
    """An Item's info: where the file comes from (its installed path) and its licence."""
    return {"source": f"{package} {path}", "source_package": package, "source_path": str(path), "licence": licence}


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in folder (and below it, skipping translated l10n copies), sorted; [] if it does not exist."""
    if not folder.is_dir():
        return []
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "l10n" not in p.parts)


def _fab_images(fab: Path) -> list[str]:
    """Image files named by a constellationsart.fab (lines: abbreviation, image file, anchor stars...)."""
    files = []
    for line in fab.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and not line.lstrip().startswith("#") and fields[1].lower().endswith(IMAGE_SUFFIXES):
            files.append(fields[1])
    return sorted(set(files))


def _downscaled(image: Image.Image, size: int) -> Image.Image:
    """RGB, at most `size` px on its long side."""
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BILINEAR)
    return small


def _slug(text: object) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")

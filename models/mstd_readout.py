"""MSTD readout: scan the style once, read it out for a whole batch of frames.

In the Mamba-ST decoder (MSTD, models/mambast.py) the scanned input u, the step Δ and B come only from the
(cached) style; only C_t comes from each content frame b:

    h_t     = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t      one state sequence, the same for every frame
    y_b,t   = ⟨C_b,t, h_t⟩ (+ skip_t)                  read out per frame

Shapes (Dch = K·d_inner channels, G groups: group g drives channels [g·Dch/G, (g+1)·Dch/G), as in SS2D):

    u, delta   (1, Dch, L)      delta already biased and soft-plussed
    A          (Dch, N)
    B          (1, G, N, L)     or (1, N, L) for one group
    C          (batch, G, N, L) or (batch, N, L); the same number of groups as B
    skip       (1, Dch, L)      optional, the style's D-skip D ⊙ u, added to every frame
    -> y       (batch, Dch, L)  fp32, a view of time-major (L, batch, Dch) memory: the order the scan makes it in

Storing every h_t (models/selective_scan.py `scan_states`: L·Dch·N fp32, 7.9 GiB per MSTD layer at 1080p at the
official widths) or re-running the whole scan per frame with stride-0 expanded style inputs (batch times the
work) are the two obvious ways; this module does neither. Backends, all inference-only (no autograd):

- `mstd_readout_ref`: the oracle, `selective_scan_ref` with the style inputs expanded to the batch.
- `mstd_readout_chunked`: torch, any device. Walks L in chunks of `CHUNK` steps, scans the chunk's states for
  the one style, and reads them out with one batched matmul per chunk and tile of frames: the cached readout on
  a (CHUNK, Dch, N) window instead of the (L, Dch, N) cache, so memory is O(CHUNK) and the scan runs once.
- `mstd_readout_triton`: the fused kernel `_mstd_readout_kernel`. One program per tile of BLOCK_D channels
  (inside one group) and FRAME_TILE frames walks t = 0..L-1 with h (BLOCK_D, N) in registers and writes
  each frame's y_t (+ skip) straight out; no state is stored at any size. The 4-direction merge, LayerNorm
  and gate stay in torch: the merge sums outputs of different time steps of different programs (fusing it needs
  atomic adds, whose order, hence bits, vary run to run), and the gate comes after a LayerNorm over all d_inner
  channels of a token, which spans programs.

- `mstd_readout_cpu`: the same walk as the Triton kernel, compiled for the CPU (models/scan_kernel_cpu.py): per
  block of 8 channels the states stay in registers and each frame's y_t is written at step t.

`mstd_readout(..., backend="auto")` picks 'triton' for CUDA tensors when triton imports, 'cpu' for CPU tensors
when the C loop builds, else 'chunked'.
triton is imported on first use only, so this module imports without it (`pip install 'mambast-video[triton]'`).
'triton' can be forced on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported), which is how the
tests run the kernel without a GPU.

Determinism: frames are read out in tiles of a fixed FRAME_TILE frames (the last tile padded with zero frames),
so the matmul or program that reads a frame out has the same shape whatever the batch size. One matmul over the
whole batch does not give that: MKL rounded a frame of an n-frame product differently from a 1-frame one for
n = 5..7, 9.. (measured; tests/test_mstd_readout.py checks the tiles). So a frame's bits do not depend on its
batch companions, and a clip cut into chunks gives the same frames as one piece (pipeline/chunks.py).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from models.scan_kernel_cpu import kernel_takes, readout_forward_cpu, readout_kernel
from models.selective_scan import selective_scan_ref, without_autocast

CHUNK = 16  # time steps per chunk of `mstd_readout_chunked`: (CHUNK, Dch, N) fp32 is 4 MB at Dch=4096, N=16
FRAME_TILE = 4  # frames read out together: one matmul (torch) or one program (Triton) per tile, the last padded
BLOCK_D = 32  # most channels per Triton program (fewer when a group has fewer)
BACKENDS = ("ref", "chunked", "triton", "cpu")


# ----------------------------------------------------------------------------------------------------------
# The oracle


def mstd_readout_ref(u, delta, A, B, C, skip=None):
    """Obviously right: the full scan per frame, the style's u, Δ and B expanded to the batch. (batch, Dch, L)."""
    _check_shapes(u, delta, A, B, C, skip)
    batch = C.shape[0]
    y = selective_scan_ref(u.expand(batch, -1, -1), delta.expand(batch, -1, -1), A,
                           B.expand(batch, *B.shape[1:]), C)
    return y if skip is None else y + skip.float()


def _check_shapes(u, delta, A, B, C, skip):
    """One line naming the first argument whose shape does not fit the contract in the module docstring."""
    if A.dim() != 2:
        raise ValueError(f"mstd_readout: A has shape {tuple(A.shape)}, expected (Dch, N)")
    dim, n = A.shape
    length = u.shape[-1]
    B_groups = B.shape[1] if B.dim() == 4 else 1
    C_groups = C.shape[1] if C.dim() == 4 else 1
    checks = [
        ("u", u, u.dim() == 3 and tuple(u.shape) == (1, dim, length), f"(1, {dim}, L)"),
        ("delta", delta, tuple(delta.shape) == (1, dim, length), f"(1, {dim}, {length})"),
        ("B", B, B.dim() in (3, 4) and B.shape[0] == 1 and tuple(B.shape[-2:]) == (n, length)
         and dim % B_groups == 0, f"(1, G, {n}, {length}) with G dividing {dim}"),
        ("C", C, C.dim() == B.dim() and C_groups == B_groups and tuple(C.shape[-2:]) == (n, length),
         f"(batch, {B_groups}, {n}, {length})" if B.dim() == 4 else f"(batch, {n}, {length})"),
        ("skip", skip, skip is None or tuple(skip.shape) == (1, dim, length), f"(1, {dim}, {length})"),
    ]
    for name, tensor, ok, expected in checks:
        if not ok:
            raise ValueError(f"mstd_readout: {name} has shape {tuple(tensor.shape)}, expected {expected}")
    for name, tensor in (("delta", delta), ("A", A), ("B", B), ("C", C), ("skip", skip)):
        if tensor is not None and tensor.device != u.device:
            raise ValueError(f"mstd_readout: {name} is on {tensor.device}, u on {u.device}")


def _as_groups(M):
    """(batch, N, L) -> (batch, 1, N, L); grouped stays as it is."""
    return M.unsqueeze(1) if M.dim() == 3 else M


# ----------------------------------------------------------------------------------------------------------
# torch: chunked states of the one style, one matmul per chunk and frame tile


@torch.no_grad()
def mstd_readout_chunked(u, delta, A, B, C, skip=None):
    """Same contract as `mstd_readout_ref`; never holds more than CHUNK states.

    States are laid out (G, N, c), a group's c channels innermost: every elementwise pass runs along rows of c
    contiguous channels, and a tile's readout is (FRAME_TILE, N) @ (N, c) per group and step, which BLAS does
    much faster than (c, N) @ (N, FRAME_TILE).
    """
    _check_shapes(u, delta, A, B, C, skip)
    u, delta, A = u.float(), delta.float(), A.float()
    B, C = _as_groups(B.float()), _as_groups(C.float())
    batch, groups, n, length = C.shape
    dim = u.shape[1]
    c = dim // groups
    tiles = -(-batch // FRAME_TILE)
    A = A.view(groups, c, n).transpose(1, 2).contiguous()  # (G, N, c)
    # Time-major and contiguous, so that each step reads contiguous slices.
    dt_all = delta[0].t().contiguous().view(length, groups, 1, c)  # Δ_t
    x_all = dt_all * u[0].t().contiguous().view(length, groups, 1, c)  # Δ_t u_t
    B_all = B[0].permute(2, 0, 1).contiguous().unsqueeze(-1)  # (L, G, N, 1)
    # C as frame tiles, (tiles, L, G, FRAME_TILE, N), the last tile padded with zero frames
    C_tiles = C.new_zeros((tiles * FRAME_TILE, groups, n, length))
    C_tiles[:batch] = C
    C_tiles = C_tiles.view(tiles, FRAME_TILE, groups, n, length).permute(0, 4, 2, 1, 3).contiguous()
    # Two buffers for all chunks: fresh multi-MB tensors every chunk cost page faults and cache misses.
    decay_buf = u.new_empty((min(CHUNK, length), groups, n, c))
    states_buf = torch.empty_like(decay_buf)
    tile_buf = u.new_empty((min(CHUNK, length), groups, FRAME_TILE, c))
    y = u.new_empty((length, tiles * FRAME_TILE, groups, c))  # time-major (L, frames, Dch)
    h = u.new_zeros((groups, n, c))
    for t0 in range(0, length, CHUNK):
        t1 = min(t0 + CHUNK, length)
        decay, states, tile = decay_buf[:t1 - t0], states_buf[:t1 - t0], tile_buf[:t1 - t0]
        torch.mul(dt_all[t0:t1], A, out=decay).exp_()  # exp(Δ_t A)
        torch.mul(x_all[t0:t1], B_all[t0:t1], out=states)  # the inputs Δ_t u_t B_t, turned into the states in place
        torch.addcmul(states[0], decay[0], h, out=states[0])
        for t in range(1, t1 - t0):
            torch.addcmul(states[t], decay[t], states[t - 1], out=states[t])
        h.copy_(states[-1])  # the buffers are overwritten by the next chunk
        for k in range(tiles):  # (T·G, FRAME_TILE, N) @ (T·G, N, c): a tile of frames reads the states at once
            torch.bmm(C_tiles[k, t0:t1].view(-1, FRAME_TILE, n), states.view(-1, n, c),
                      out=tile.view(-1, FRAME_TILE, c))
            y[t0:t1, k * FRAME_TILE:(k + 1) * FRAME_TILE] = tile.transpose(1, 2)
    y = y[:, :batch].contiguous().view(length, batch, dim).permute(1, 2, 0)  # the real frames
    return y if skip is None else y.add_(skip.float())


# ----------------------------------------------------------------------------------------------------------
# Triton: the fused kernel, defined on first use


tl = None  # triton.language once `_triton_kernel` ran: the kernel's body looks `tl` up in this module's globals


@functools.cache
def _triton_kernel():
    """The jitted `_mstd_readout_kernel`, or None when triton does not import."""
    global tl
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _mstd_readout_kernel(
            u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, skip_ptr, y_ptr,
            length, batch, channels_per_group, tiles_per_group,
            stride_u_d, stride_u_t, stride_delta_d, stride_delta_t, stride_A_d, stride_A_n,
            stride_B_g, stride_B_n, stride_B_t, stride_C_b, stride_C_g, stride_C_n, stride_C_t,
            stride_skip_d, stride_skip_t, stride_y_b, stride_y_d, stride_y_t,
            N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
            HAS_SKIP: tl.constexpr):
        # This program: channels d (a tile inside one group, so B_t and C_t are one N-vector each) and frames f.
        group = tl.program_id(0) // tiles_per_group
        d_in_group = (tl.program_id(0) % tiles_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d_in_group < channels_per_group
        d = (group * channels_per_group + d_in_group).to(tl.int64)
        n = tl.arange(0, BLOCK_N)
        n_ok = n < N  # N padded to a power of two: A, B and C are 0 there, so h stays 0
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = f < batch
        f = f.to(tl.int64)

        A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        # Pointers at t = 0, advanced by one time step per iteration (64-bit pointer arithmetic, no overflow).
        u_ptrs = u_ptr + d * stride_u_d
        delta_ptrs = delta_ptr + d * stride_delta_d
        B_ptrs = B_ptr + group * stride_B_g + n * stride_B_n
        C_ptrs = C_ptr + f[None, :] * stride_C_b + group * stride_C_g + n[:, None] * stride_C_n  # (BLOCK_N, BLOCK_F)
        skip_ptrs = skip_ptr + d * stride_skip_d
        y_ptrs = y_ptr + f[None, :] * stride_y_b + d[:, None] * stride_y_d  # (BLOCK_D, BLOCK_F)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for _ in range(length):
            dt = tl.load(delta_ptrs, mask=d_ok, other=0.0)
            x = dt * tl.load(u_ptrs, mask=d_ok, other=0.0)
            Bt = tl.load(B_ptrs, mask=n_ok, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + x[:, None] * Bt[None, :]
            Ct = tl.load(C_ptrs, mask=n_ok[:, None] & f_ok[None, :], other=0.0)
            y = tl.sum(h[:, :, None] * Ct[None, :, :], axis=1)  # (BLOCK_D, BLOCK_F): ⟨C_f,t, h_t⟩ per frame
            if HAS_SKIP:
                y += tl.load(skip_ptrs, mask=d_ok, other=0.0)[:, None]
            tl.store(y_ptrs, y, mask=d_ok[:, None] & f_ok[None, :])
            u_ptrs += stride_u_t
            delta_ptrs += stride_delta_t
            B_ptrs += stride_B_t
            C_ptrs += stride_C_t
            skip_ptrs += stride_skip_t
            y_ptrs += stride_y_t

    return _mstd_readout_kernel


def triton_available() -> bool:
    return _triton_kernel() is not None


@torch.no_grad()
def mstd_readout_triton(u, delta, A, B, C, skip=None):
    """Same contract as `mstd_readout_ref`, in one Triton kernel: CUDA tensors, or CPU under TRITON_INTERPRET=1."""
    _check_shapes(u, delta, A, B, C, skip)
    kernel = _triton_kernel()
    if kernel is None:
        raise RuntimeError("mstd_readout backend 'triton' needs triton: pip install 'mambast-video[triton]'")
    if u.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"mstd_readout backend 'triton' runs on CUDA tensors (got {u.device.type}); "
                           "on CPU only under TRITON_INTERPRET=1")
    B, C = _as_groups(B.float()), _as_groups(C.float())
    batch, groups, n, length = C.shape
    dim = u.shape[1]
    c = dim // groups
    # Time-major copies, so that each step's loads and stores are contiguous runs of channels (coalesced).
    u_t = u[0].float().t().contiguous()  # (L, Dch)
    delta_t = delta[0].float().t().contiguous()
    B_t = B[0].permute(2, 0, 1).contiguous()  # (L, G, N)
    C_t = C.permute(3, 0, 1, 2).contiguous()  # (L, batch, G, N)
    skip_t = skip[0].float().t().contiguous() if skip is not None else u_t  # u_t: a placeholder, never read
    A = A.float().contiguous()
    y_t = u.new_empty((length, batch, dim), dtype=torch.float32)  # (L, batch, Dch)
    block_d = min(BLOCK_D, _next_power_of_2(c))
    tiles_per_group = -(-c // block_d)
    grid = (groups * tiles_per_group, -(-batch // FRAME_TILE))
    on_device = torch.cuda.device(u.device) if u.device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # triton launches on the current CUDA device
        kernel[grid](
            u_t, delta_t, A, B_t, C_t, skip_t, y_t,
            length, batch, c, tiles_per_group,
            u_t.stride(1), u_t.stride(0), delta_t.stride(1), delta_t.stride(0), A.stride(0), A.stride(1),
            B_t.stride(1), B_t.stride(2), B_t.stride(0), C_t.stride(1), C_t.stride(2), C_t.stride(3), C_t.stride(0),
            skip_t.stride(1), skip_t.stride(0), y_t.stride(1), y_t.stride(2), y_t.stride(0),
            N=n, BLOCK_N=_next_power_of_2(n), BLOCK_D=block_d, BLOCK_F=FRAME_TILE,
            HAS_SKIP=skip is not None, enable_fp_fusion=True)
    return y_t.permute(1, 2, 0)


def _next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# Dispatch


def resolve_readout_backend(name: str, device: torch.device | str) -> str:
    """'auto' -> 'triton' for CUDA tensors when triton imports, 'cpu' for CPU tensors when the compiled loop
    builds, else 'chunked'."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return "triton" if triton_available() else "chunked"
        return "cpu" if readout_kernel() is not None else "chunked"
    if name not in BACKENDS:
        raise ValueError(f"unknown mstd_readout backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name


@without_autocast  # the states stay fp32 inside a bf16 autocast region (models/mambast.py precision)
def mstd_readout(u, delta, A, B, C, skip=None, backend: str = "auto"):
    """y_b,t = ⟨C_b,t, h_t⟩ (+ skip) for every frame b, h_t the one style's states: (batch, Dch, L) fp32."""
    fn = {"ref": mstd_readout_ref, "chunked": mstd_readout_chunked, "triton": mstd_readout_triton,
          "cpu": mstd_readout_cpu}
    return fn[resolve_readout_backend(backend, u.device)](u, delta, A, B, C, skip)


@torch.no_grad()
def mstd_readout_cpu(u, delta, A, B, C, skip=None):
    """Same contract as `mstd_readout_ref`, in the compiled CPU loop (models/scan_kernel_cpu.py): per block of 8
    channels the style's states live in registers and every frame of the batch reads them out at each step.
    Shapes it does not take (channels not in blocks of 8 per group, N > 64) run `mstd_readout_chunked`."""
    _check_shapes(u, delta, A, B, C, skip)
    B, C = _as_groups(B), _as_groups(C)
    if u.device.type != "cpu" or not kernel_takes(u, A, B):
        return mstd_readout_chunked(u, delta, A, B, C, skip)
    return readout_forward_cpu(u, delta, A, B, C, skip)

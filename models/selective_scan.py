"""Selective scan (the S6 recurrence of Mamba) with interchangeable backends.

All backends share mamba-ssm's `selective_scan_fn` signature:

    u, delta      (batch, D, L)      input sequence and step size Δ (before delta_bias / softplus)
    A             (D, N)             state matrix (real, negative)
    B, C          (batch, N, L) or (batch, G, N, L)   input-dependent, grouped: group g drives D/G channels
    D             (D,)               skip, z (batch, D, L) optional gate, delta_bias (D,)

    Δ = softplus(delta + delta_bias)                    (when delta_softplus)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t            (per channel d and state n)
    y_t = ⟨C_t, h_t⟩ + D u_t,   out = y ⊙ SiLU(z)

Backends:
- `selective_scan_ref`: a loop over L, transcribed from mamba-ssm's reference. Obviously right; the oracle.
- `selective_scan_chunked`: ours. Processes L in chunks; inside a chunk the recurrence is one fused
  `addcmul` per time step over contiguous (batch, D, N) slices, so nothing of size (batch, D, L, N) exists at
  once. Its custom backward recomputes each chunk from the saved chunk-boundary states and runs the adjoint
  recurrence in reverse, so training on CPU costs O(L) vectorised steps instead of a per-slice autograd graph.
  For inference (no autograd) it applies the bias and softplus of Δ and the D skip chunk by chunk as well.
- `selective_scan_cpu`: inference on the CPU through a compiled loop (models/scan_kernel_cpu.py: the steps of a
  block of channels fused, its states in registers), built on first use with the system's C compiler; under
  autograd, or where it cannot be built, the chunked scan. What `auto` picks on the CPU.
- `selective_scan_cuda`: mamba-ssm's CUDA kernel, used automatically for CUDA tensors when installed.

`selective_scan(..., backend="auto")` picks one. The MSTD style cache also uses `scan_states` (the whole
state sequence h_t, for reuse across frames) and `read_out_states` (y_t = ⟨C_t, h_t⟩ + D u_t).

Precision: every entry point runs with autocast off (`without_autocast`) and casts its inputs to fp32, so
inside a caller's bf16 autocast region (models/mambast.py's precision 'bf16') the recurrence, its states and
the readouts stay fp32: rounding h_t to 8 bits would compound over thousands of steps.

Memory layout of the chunked scan (CPU speed, no effect on the maths):
- A state h holds a group's c channels innermost, (…, G, N, c). Every elementwise pass then runs along rows of
  c contiguous channels, and the readout y_t = C_tᵀ h_t is a row vector times an (N, c) matrix per group,
  which BLAS does ~7× faster than the (c, N) matrix times an N-vector (the time of the 1 GiB-per-layer state
  cache readout halves). `scan_states` returns that layout; `read_out_states` reads it.
- Time-major sequences: u and Δ may be any strided (batch, D, L) views, and the scan is fastest when they are
  views of (L, batch, D) memory, as models/mambast.py passes them; the output is always such a view.
- A chunk's decays and states live in two buffers reused from chunk to chunk (CHUNK steps: 4 MB at D = 4096,
  N = 16, so they stay in cache between the passes over them); fresh tensors cost page faults every chunk.

Determinism: a frame's outputs never depend on the other frames of its batch. Every readout is a product of
the frame's own (see `read_out_states`), and the elementwise passes treat each frame's slice alike.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from models.scan_kernel_cpu import kernel_takes, scan_forward_cpu, scan_kernel

CHUNK = 16  # time steps per chunk: (CHUNK, batch, D, N) fp32 is 4 MB at D=4096, N=16
READOUT_CHUNK = 64  # time steps per chunk of `read_out_states`: 64 states are 17 MB at D=4096, N=16


def without_autocast(fn):
    """Run `fn` with autocast off on the device of its first tensor argument (see the module docstring)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------------------
# The oracle


@without_autocast
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential reference scan (fp32). Shapes as in the module docstring; returns out (batch, D, L)."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B, C = _expand_groups(B.float(), dim), _expand_groups(C.float(), dim)  # (batch, D, N, L)
    x = A.new_zeros((batch, dim, dstate), dtype=torch.float32)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    y = torch.stack(ys, dim=2)  # (batch, D, L)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def _expand_groups(M, dim):
    """(batch, N, L) or (batch, G, N, L) -> (batch, D, N, L), group g repeated for its D/G channels."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    batch, groups, n, length = M.shape
    return M.repeat_interleave(dim // groups, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Our fast scan


def under_autograd(*tensors) -> bool:
    """Whether a result of these (None allowed) needs a backward pass."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _as_groups(M):
    """(batch, N, L) -> (batch, 1, N, L); grouped stays as it is."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _channels_innermost(A, groups):
    """A (D, N) -> (G, N, c), the layout of the states (see the module docstring)."""
    dim, n = A.shape
    return A.view(groups, dim // groups, n).transpose(1, 2).contiguous()


def _step_sizes(delta, delta_bias=None, delta_softplus=False):
    """Δ = softplus(delta + delta_bias), the parts asked for; delta (batch, D, L), delta_bias (D,)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _time_major(M):
    """B or C (batch, G, N, L) -> (L, batch, G, N), contiguous: a chunk of steps is then a plain slice."""
    return M.permute(3, 0, 1, 2).contiguous()


def _chunk_terms(u, delta, A, B, t0, t1, out=None, delta_bias=None, delta_softplus=False):
    """Decay a_t = exp(Δ_t A) and input x_t = Δ_t u_t B_t for steps [t0, t1), each (T, batch, G, N, c).

    A comes as (G, N, c) (`_channels_innermost`), B time-major (`_time_major`); Δ is `_step_sizes(delta,
    delta_bias, delta_softplus)`. Written into `out` = (a, x) when given: the forward passes reuse two chunk
    buffers, since fresh multi-MB tensors for every chunk cost page faults and cache misses.
    """
    batch, groups, c = u.shape[0], B.shape[2], u.shape[1] // B.shape[2]
    # Time-major and contiguous, so each step of the loop reads one contiguous slice (strided slices are ~15×
    # slower; a reshape of a permuted tensor may stay a strided view, hence the explicit .contiguous()). Only
    # (T, batch, D) is copied, and nothing when u and Δ are time-major already.
    dt = _step_sizes(delta[:, :, t0:t1], delta_bias, delta_softplus)
    dt = dt.permute(2, 0, 1).contiguous().view(-1, batch, groups, 1, c)  # (T, b, G, 1, c)
    uu = u[:, :, t0:t1].permute(2, 0, 1).contiguous().view(-1, batch, groups, 1, c)
    Bt = B[t0:t1].unsqueeze(-1)  # (T, b, G, N, 1)
    a, x = out if out is not None else (None, None)
    a = torch.mul(dt, A, out=a).exp_()
    x = torch.mul(dt * uu, Bt, out=x)
    return a, x, dt, uu, Bt


def _scan_chunk(a, x, h):
    """h_t = a_t h_{t-1} + x_t over the chunk, one fused op per step, written over x: returns x, now the states."""
    for t in range(x.shape[0]):
        h = torch.addcmul(x[t], a[t], h, out=x[t])
    return x


def _read_out(C, H, out):
    """y = C_tᵀ h_t for C (..., N) and states H (..., N, c), into out (..., c): a batched matmul of (1 × N)(N × c)
    products, one per frame, step and group, so each frame's outputs come from products of its own."""
    return torch.matmul(C.unsqueeze(-2), H, out=out.unsqueeze(-2))


def _scan_forward(u, delta, A, B, C, boundaries=None, delta_bias=None, delta_softplus=False, D=None):
    """y = scan(u, Δ, A, B, C) + D u -> (batch, D, L); A (D, N), B and C grouped (b, G, N, L).

    y is a view of time-major (L, batch, D) memory: each chunk's readout y_t = C_tᵀ h_t lands there as it is
    computed. Inference passes mamba's prologue and epilogue in too (Δ = softplus(delta + delta_bias), + D u),
    so they run chunk by chunk on cached slices instead of as four passes over (batch, D, L) tensors; under
    autograd they stay outside, where torch differentiates them. `boundaries`, when given ((chunks, b, G, N, c)),
    receives the state before each chunk, for the backward pass.
    """
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    c = dim // groups
    A, B, C = _channels_innermost(A, groups), _time_major(B), _time_major(C)
    D = None if D is None else D.view(groups, c)
    y = u.new_empty((length, batch, groups, c))
    buffers = [u.new_empty((min(CHUNK, length), batch, groups, n, c)) for _ in range(2)]
    h = u.new_zeros((batch, groups, n, c))
    for k, t0 in enumerate(range(0, length, CHUNK)):
        t1 = min(t0 + CHUNK, length)
        if boundaries is not None:
            boundaries[k] = h
        a, x, _, uu, _ = _chunk_terms(u, delta, A, B, t0, t1, [buf[:t1 - t0] for buf in buffers],
                                      delta_bias, delta_softplus)
        H = _scan_chunk(a, x, h)
        _read_out(C[t0:t1], H, out=y[t0:t1])
        if D is not None:
            y[t0:t1].addcmul_(uu.squeeze(3), D)
        h = H[-1].clone()  # the buffers are overwritten by the next chunk
    return y.view(length, batch, dim).permute(1, 2, 0)


class _ChunkedScan(torch.autograd.Function):
    """y = scan(u, Δ, A, B, C) without skip/gate; Δ already biased and soft-plussed. B, C grouped (b, G, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        boundaries = u.new_empty((-(-length // CHUNK), batch, groups, n, dim // groups))
        y = _scan_forward(u, delta, A, B, C, boundaries)
        ctx.save_for_backward(u, delta, A, B, C, boundaries)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, boundaries = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        c = dim // groups
        A, Bt_all, Ct_all = _channels_innermost(A, groups), _time_major(B), _time_major(C)
        gu, gdelta = torch.zeros_like(u), torch.zeros_like(delta)
        gA, gB, gC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        g = u.new_zeros((batch, groups, n, c))  # adjoint of h at the end of the current chunk
        a_next = u.new_zeros((batch, groups, n, c))  # a_{t1} of the chunk after this one (0 past the end)
        gy = gy.reshape(batch, groups, c, length)
        starts = list(range(0, length, CHUNK))
        for k in reversed(range(len(starts))):
            t0, t1 = starts[k], min(starts[k] + CHUNK, length)
            a, x, dt, uu, Bt = _chunk_terms(u, delta, A, Bt_all, t0, t1)
            H = _scan_chunk(a, x, boundaries[k])
            Ct = Ct_all[t0:t1].unsqueeze(-1)  # (T, b, G, N, 1)
            gyt = gy[:, :, :, t0:t1].permute(3, 0, 1, 2).contiguous().unsqueeze(3)  # (T, b, G, 1, c)
            gH = gyt * Ct  # ∂L/∂h_t through y_t only
            # adjoint recurrence, backwards: g_t = gH_t + a_{t+1} g_{t+1}
            G_ = torch.empty(gH.shape, dtype=gH.dtype, device=gH.device)
            for t in reversed(range(t1 - t0)):
                g = torch.addcmul(gH[t], a_next, g, out=G_[t])
                a_next = a[t]
            # ∂L/∂(Δ A) per (t, n, d) = g_t h_{t-1} a_t; h_{t-1} is the chunk's boundary state for t = 0
            ga = G_ * a
            ga[1:] *= H[:-1]
            ga[0] *= boundaries[k]
            gA += (ga * dt).sum(dim=(0, 1))
            # G_ is ∂L/∂x_t with x_t = Δ_t u_t B_t; contractions over N or c are matmuls (no full-size temporaries)
            gx_B = torch.matmul(Bt.transpose(-1, -2), G_)  # Σ_n B g: (T, b, G, 1, c)
            gdelta_t = (ga * A).sum(-2, keepdim=True) + gx_B * uu
            gu_t = gx_B * dt
            gdelta[:, :, t0:t1] = gdelta_t.permute(1, 2, 3, 4, 0).reshape(batch, dim, -1)
            gu[:, :, t0:t1] = gu_t.permute(1, 2, 3, 4, 0).reshape(batch, dim, -1)
            gB[:, :, :, t0:t1] = torch.matmul(G_, (dt * uu).transpose(-1, -2)).squeeze(-1).permute(1, 2, 3, 0)
            gC[:, :, :, t0:t1] = torch.matmul(H, gyt.transpose(-1, -2)).squeeze(-1).permute(1, 2, 3, 0)
        return gu, gdelta, gA.transpose(1, 2).reshape(dim, n), gB, gC


@without_autocast
def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """Fast pure-PyTorch scan (fp32, differentiable); same contract as `selective_scan_ref`. Any strides; the
    output is a view of time-major (L, batch, D) memory, and the whole scan runs fastest on such views."""
    dtype_in = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    B, C = _as_groups(B.float()), _as_groups(C.float())
    delta_bias = None if delta_bias is None else delta_bias.float()
    D = None if D is None else D.float()
    if under_autograd(u, delta, A, B, C, delta_bias, D):
        out = _ChunkedScan.apply(u, _step_sizes(delta, delta_bias, delta_softplus), A, B, C)
        if D is not None:
            out = out + u * D[:, None]
    else:  # inference: no chunk-boundary states kept for a backward pass
        out = _scan_forward(u, delta, A, B, C, None, delta_bias, delta_softplus, D)
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    if return_last_state:
        last = scan_states(u, _step_sizes(delta, delta_bias, delta_softplus), A, B)[:, -1]  # (batch, G, N, c)
        return out, last.transpose(-1, -2).reshape(u.shape[0], -1, A.shape[1])  # (batch, D, N)
    return out


# ----------------------------------------------------------------------------------------------------------
# State sequences, for the MSTD style cache


@without_autocast
@torch.no_grad()
def scan_states(u, delta, A, B):
    """All states h_t of the recurrence, (batch, L, G, N, c) (channels innermost, see the module docstring).

    `delta` must already be biased and soft-plussed. B may be grouped (ungrouped: G = 1). The result is a view
    of time-major (L, batch, ...) memory (the same memory for batch 1): each chunk is scanned in place there.
    """
    u, delta = u.float(), delta.float()
    B = _as_groups(B.float())
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    A, B = _channels_innermost(A.float(), groups), _time_major(B)
    out = u.new_empty((length, batch, groups, n, dim // groups))
    decay = u.new_empty((min(CHUNK, length), batch, groups, n, dim // groups))
    h = u.new_zeros((batch, groups, n, dim // groups))
    for t0 in range(0, length, CHUNK):
        t1 = min(t0 + CHUNK, length)
        a, x, *_ = _chunk_terms(u, delta, A, B, t0, t1, out=(decay[:t1 - t0], out[t0:t1]))
        h = _scan_chunk(a, x, h)[-1]
    return out.transpose(0, 1)


@without_autocast
def read_out_states(states, C, skip=None):
    """y_t = C_tᵀ h_t (+ skip): states (1 or batch, L, G, N, c) from `scan_states`, C (batch, G, N, L) or
    (batch, N, L) -> (batch, D, L), a view of time-major (L, batch, D) memory.

    One style's states serve a whole batch of frames: READOUT_CHUNK steps at a time (the chunk stays in cache
    while every frame reads it), one matmul per frame. Never the frames as the rows of one product: a matmul picks
    its kernel, hence its rounding, by its number of rows, and a frame's bits must not depend on how many frames
    share its call (pipeline/chunks.py cuts clips into batches anywhere).
    """
    C = _as_groups(C.float())
    batch, groups, n, length = C.shape
    S = states.transpose(0, 1)  # (L, 1 or batch, G, N, c)
    Ct = C.permute(3, 0, 1, 2)  # (L, batch, G, N)
    y = C.new_empty((length, batch, groups, states.shape[-1]))
    for t0 in range(0, length, READOUT_CHUNK):
        t1 = min(t0 + READOUT_CHUNK, length)
        for i in range(batch):
            _read_out(Ct[t0:t1, i], S[t0:t1, i if S.shape[1] > 1 else 0], out=y[t0:t1, i])
    y = y.view(length, batch, -1).permute(1, 2, 0)
    return y if skip is None else y + skip


# ----------------------------------------------------------------------------------------------------------
# The compiled CPU loop, for inference


@without_autocast
def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The scan through models/scan_kernel_cpu.py; same contract as `selective_scan_ref`. What the kernel does not
    cover (autograd, the last state, shapes it does not take, no C compiler) runs `selective_scan_chunked`."""
    B, C = _as_groups(B), _as_groups(C)
    if under_autograd(u, delta, A, B, C, D, z, delta_bias) or return_last_state or not kernel_takes(u, A, B):
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out = scan_forward_cpu(u.float(), delta.float(), A.float(), B.float(), C.float(), *(
        None if x is None else x.float() for x in (D, delta_bias)), delta_softplus)
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(u.dtype)


# ----------------------------------------------------------------------------------------------------------
# mamba-ssm's CUDA kernel, when installed


@functools.cache
def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or the CUDA extension missing / built for another torch
        return None
    return selective_scan_fn


@without_autocast
def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    fn = _mamba_ssm_scan()
    if fn is None:
        raise RuntimeError("scan backend 'cuda' needs mamba-ssm with its CUDA extension: "
                           "pip install 'mambast-video[cuda]' --no-build-isolation (on a CUDA machine)")
    return fn(u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias, delta_softplus, return_last_state)


BACKENDS = {"ref": selective_scan_ref, "chunked": selective_scan_chunked, "cpu": selective_scan_cpu,
            "cuda": selective_scan_cuda}


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' -> 'cuda' for CUDA tensors when mamba-ssm imports, else 'chunked' (on CUDA with a warning, once);
    on the CPU 'cpu' when its kernel builds, else 'chunked'."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            if scan_kernel() is not None:
                return "cpu"
            _warn_slow_cpu_scan()
            return "chunked"
        if _mamba_ssm_scan() is not None:
            return "cuda"
        _warn_slow_cuda_scan()
        return "chunked"
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name


@functools.cache  # once per process
def _warn_slow_cuda_scan() -> None:
    warnings.warn("CUDA device, but mamba-ssm's CUDA kernel does not import: the selective scans run the "
                  "pure-PyTorch chunked scan, many times slower on a GPU. Install it on the CUDA machine: "
                  "pip install 'mambast-video[cuda]' --no-build-isolation", RuntimeWarning, stacklevel=3)


@functools.cache  # once per process
def _warn_slow_cpu_scan() -> None:
    warnings.warn("the CPU scan kernel could not be built (it needs a C compiler, cc or $CC, and a writable "
                  "$MAMBAST_CACHE or ~/.cache/mambast): the selective scans run the pure-PyTorch chunked scan, "
                  "about 2x slower at the bundled widths (models/scan_kernel_cpu.py)",
                  RuntimeWarning, stacklevel=3)


def selective_scan(*args, backend: str = "auto", **kwargs):
    return BACKENDS[resolve_backend(backend, args[0].device)](*args, **kwargs)

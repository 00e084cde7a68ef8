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
- `selective_scan_cuda`: mamba-ssm's CUDA kernel, used automatically for CUDA tensors when installed.

`selective_scan(..., backend="auto")` picks one. The MSTD style cache also uses `scan_states` (the whole
state sequence h_t, for reuse across frames) and `read_out_states` (y_t = ⟨C_t, h_t⟩ + D u_t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # time steps per chunk: (CHUNK, batch, D, N) fp32 is ~17 MB at D=4096, N=16


# ----------------------------------------------------------------------------------------------------------
# The oracle


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


def _as_groups(M):
    """(batch, N, L) -> (batch, 1, N, L); grouped stays as it is."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _chunk_terms(u, delta, A, B, t0, t1):
    """Decay a_t = exp(Δ_t A) and input x_t = Δ_t u_t B_t for steps [t0, t1), laid out (T, batch, G, c, N)."""
    batch, groups, c = u.shape[0], B.shape[1], u.shape[1] // B.shape[1]
    # Time-major and contiguous, so each step of the loop reads one contiguous slice (strided slices are ~15×
    # slower; a reshape of a permuted tensor may stay a strided view, hence the explicit .contiguous()).
    dt = delta[:, :, t0:t1].permute(2, 0, 1).contiguous().view(-1, batch, groups, c, 1)  # (T, b, G, c, 1)
    uu = u[:, :, t0:t1].permute(2, 0, 1).contiguous().view(-1, batch, groups, c, 1)
    Bt = B[:, :, :, t0:t1].permute(3, 0, 1, 2).contiguous().unsqueeze(3)  # (T, b, G, 1, N)
    a = torch.exp(dt * A.view(groups, c, -1))  # (T, b, G, c, N)
    x = (dt * uu) * Bt
    return a, x, dt, uu, Bt


def _scan_chunk(a, x, h):
    """h_t = a_t h_{t-1} + x_t over the chunk, one fused op per step; returns all states (T, ...)."""
    H = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for t in range(x.shape[0]):
        h = torch.addcmul(x[t], a[t], h, out=H[t])
    return H


def _read_out(H, Ct):
    """y_t = ⟨C_t, h_t⟩: H (T, b, G, c, N), Ct (T, b, G, N) -> (T, b, G, c)."""
    return torch.matmul(H, Ct.unsqueeze(-1)).squeeze(-1)


class _ChunkedScan(torch.autograd.Function):
    """y = scan(u, Δ, A, B, C) without skip/gate; Δ already biased and soft-plussed. B, C grouped (b, G, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        h = u.new_zeros((batch, groups, dim // groups, n))
        boundaries, ys = [], []
        for t0 in range(0, length, CHUNK):
            t1 = min(t0 + CHUNK, length)
            boundaries.append(h)
            a, x, *_ = _chunk_terms(u, delta, A, B, t0, t1)
            H = _scan_chunk(a, x, h)
            h = H[-1].clone()
            ys.append(_read_out(H, C[:, :, :, t0:t1].permute(3, 0, 1, 2).contiguous()))
        y = torch.cat(ys).permute(1, 2, 3, 0).reshape(batch, dim, length)
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(boundaries))
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, boundaries = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n = B.shape[1], A.shape[1]
        c = dim // groups
        gu, gdelta = torch.zeros_like(u), torch.zeros_like(delta)
        gA, gB, gC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        g = u.new_zeros((batch, groups, c, n))  # adjoint of h at the end of the current chunk
        a_next = u.new_zeros((batch, groups, c, n))  # a_{t1} of the chunk after this one (0 past the end)
        gy = gy.reshape(batch, groups, c, length)
        starts = list(range(0, length, CHUNK))
        for k in reversed(range(len(starts))):
            t0, t1 = starts[k], min(starts[k] + CHUNK, length)
            a, x, dt, uu, Bt = _chunk_terms(u, delta, A, B, t0, t1)
            H = _scan_chunk(a, x, boundaries[k])
            Ct = C[:, :, :, t0:t1].permute(3, 0, 1, 2).contiguous()  # (T, b, G, N)
            gyt = gy[:, :, :, t0:t1].permute(3, 0, 1, 2).contiguous().unsqueeze(-1)  # (T, b, G, c, 1)
            gH = gyt * Ct.unsqueeze(3)  # ∂L/∂h_t through y_t only
            # adjoint recurrence, backwards: g_t = gH_t + a_{t+1} g_{t+1}
            G_ = torch.empty(gH.shape, dtype=gH.dtype, device=gH.device)
            for t in reversed(range(t1 - t0)):
                g = torch.addcmul(gH[t], a_next, g, out=G_[t])
                a_next = a[t]
            # ∂L/∂(Δ A) per (t, d, n) = g_t h_{t-1} a_t; h_{t-1} is the chunk's boundary state for t = 0
            ga = G_ * a
            ga[1:] *= H[:-1]
            ga[0] *= boundaries[k]
            gA += (ga * dt).sum(dim=(0, 1)).reshape(dim, n)
            # G_ is ∂L/∂x_t with x_t = Δ_t u_t B_t; contractions over N or c are matmuls (no full-size temporaries)
            gx_B = torch.matmul(G_, Bt.transpose(-1, -2)).squeeze(-1)  # Σ_n g B: (T, b, G, c)
            gdelta_t = (ga * A.view(groups, c, n)).sum(-1) + gx_B * uu.squeeze(-1)
            gu_t = gx_B * dt.squeeze(-1)
            gdelta[:, :, t0:t1] = gdelta_t.permute(1, 2, 3, 0).reshape(batch, dim, -1)
            gu[:, :, t0:t1] = gu_t.permute(1, 2, 3, 0).reshape(batch, dim, -1)
            gB[:, :, :, t0:t1] = torch.matmul((dt * uu).transpose(-1, -2), G_).squeeze(3).permute(1, 2, 3, 0)
            gC[:, :, :, t0:t1] = torch.matmul(gyt.transpose(-1, -2), H).squeeze(3).permute(1, 2, 3, 0)
        return gu, gdelta, gA, gB, gC


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """Fast pure-PyTorch scan (fp32, differentiable); same contract as `selective_scan_ref`."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = _as_groups(B.float()).contiguous(), _as_groups(C.float()).contiguous()
    y = _ChunkedScan.apply(u.contiguous(), delta.contiguous(), A.float().contiguous(), B, C)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    if return_last_state:
        return out, scan_states(u, delta, A, B)[:, -1]  # (batch, D, N)
    return out


# ----------------------------------------------------------------------------------------------------------
# State sequences, for the MSTD style cache


@torch.no_grad()
def scan_states(u, delta, A, B):
    """All states h_t of the recurrence as (batch, L, D, N): L-major, so a frame's readout is one matmul.

    `delta` must already be biased and soft-plussed. B may be grouped.
    """
    u, delta, A = u.float(), delta.float(), A.float()
    B = _as_groups(B.float())
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    out = u.new_empty((batch, length, groups, dim // groups, n))
    h = u.new_zeros((batch, groups, dim // groups, n))
    for t0 in range(0, length, CHUNK):
        t1 = min(t0 + CHUNK, length)
        a, x, *_ = _chunk_terms(u, delta, A, B, t0, t1)
        H = _scan_chunk(a, x, h)
        h = H[-1]
        out[:, t0:t1] = H.transpose(0, 1)
    return out.view(batch, length, dim, n)


def read_out_states(states, C, skip=None):
    """y_t = ⟨C_t, h_t⟩ (+ skip): states (1 or batch, L, D, N), C (batch, G, N, L) -> (batch, D, L).

    The states of one style serve a whole batch of frames: the batch goes into the matmul's last axis.
    """
    C = _as_groups(C.float())
    batch, groups, n, length = C.shape
    dim = states.shape[2]
    c = dim // groups
    if states.shape[0] == 1:
        S = states[0].view(length, groups, c, n)  # (L, G, c, N)
        Cm = C.permute(3, 1, 2, 0)  # (L, G, N, batch)
        y = torch.matmul(S, Cm)  # (L, G, c, batch)
        y = y.permute(3, 1, 2, 0).reshape(batch, dim, length)
    else:
        S = states.view(batch, length, groups, c, n)
        y = torch.matmul(S, C.permute(0, 3, 1, 2).unsqueeze(-1)).squeeze(-1)  # (b, L, G, c)
        y = y.permute(0, 2, 3, 1).reshape(batch, dim, length)
    return y if skip is None else y + skip


# ----------------------------------------------------------------------------------------------------------
# mamba-ssm's CUDA kernel, when installed


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or the CUDA extension missing / built for another torch
        return None
    return selective_scan_fn


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    fn = _mamba_ssm_scan()
    if fn is None:
        raise RuntimeError("scan backend 'cuda' needs mamba-ssm with its CUDA extension: "
                           "pip install 'mambast-video[cuda]' --no-build-isolation (on a CUDA machine)")
    return fn(u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias, delta_softplus, return_last_state)


BACKENDS = {"ref": selective_scan_ref, "chunked": selective_scan_chunked, "cuda": selective_scan_cuda}


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' -> 'cuda' for CUDA tensors when mamba-ssm imports, else 'chunked'."""
    if name == "auto":
        return "cuda" if torch.device(device).type == "cuda" and _mamba_ssm_scan() is not None else "chunked"
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name


def selective_scan(*args, backend: str = "auto", **kwargs):
    return BACKENDS[resolve_backend(backend, args[0].device)](*args, **kwargs)

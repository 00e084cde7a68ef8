"""Mamba-ST (Botti et al., WACV 2025) for video: one file that reads like the paper.

    Ic, Is (B×3×H×W, RGB in [0,1])
      │ PatchEmbed: Conv 8×8 / stride 8            -> token maps B×h×w×d_model   (h = H/8, w = W/8)
      │ encoder_c(content), encoder_s(style)       3 + 3 VSS blocks (SS2D: 4-direction selective scan)
      │ decoder (MSTD): 3 cross blocks + LayerNorm  u, Δ, B from the shuffled style; C and the gate from the content
      │ CNN decoder ×8                              -> B×3×H×W (no output activation)

Module and parameter names follow the official checkpoints (`../shared/official-mambast-keys.json`), so
`embedding.*`, `mamba.*` and `decode.*` load the three official files with strict=True. Known exceptions to
"every parameter is used", kept only for strict loading: `skip_scale2`, `in_style_proj` in encoder blocks,
`new_ps` (the unused StyTR-2 positional encoding).

Video inference splits the work (see `encode_style` / `stylize`): in the MSTD the scanned input, Δ and B come
only from the style, so for a fixed style and a fixed token permutation the whole state sequence h_t is the
same for every frame. It is computed once per clip (`StyleCode`), and each frame only reads it out with its own
C_t: y_t = ⟨C_t, h_t⟩ + D·s_t.

Token maps are channel-last (B, h, w, C) throughout the Mamba part; sequences for the scan are (B, C, L) with
row-major token order (index = i·w + j), as in the official code.

Memory layout (CPU speed only; shapes and maths are the official ones): the sequences are (B, C, L)-shaped views
of time-major (L, B, C) memory, from the channels_last depthwise conv through `cross_scan`, the scan
(models/selective_scan.py, which reads one contiguous slice per step and writes its output time-major) and
`cross_merge` to the LayerNorm, so no transpose copies happen on the way. The CNN decoder runs channels_last too.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mstd_readout import mstd_readout, resolve_readout_backend
from models.scan_kernel_cpu import cross_kernels_take, cross_readout_cpu, cross_scan_forward_cpu
from models.selective_scan import read_out_states, resolve_backend, scan_states, selective_scan, under_autograd


PRECISIONS = ("fp32", "bf16")


@dataclass
class MambaSTConfig:
    d_model: int = 512          # token width (official 512)
    d_state: int = 16           # N, SSM state size per channel
    expand: int = 2             # d_inner = expand · d_model
    patch_size: int = 8
    n_encoder_layers: int = 3   # per stream (content and style)
    n_decoder_layers: int = 3   # MSTD blocks
    dt_rank: int = 0            # 0 -> ceil(d_model / 16), as in the official code
    decoder_channels: tuple[int, int, int] = (256, 128, 64)  # CNN decoder widths (official: 256, 128, 64)
    drop_path: float = 0.1      # MSTD blocks only, training only
    scan_backend: str = "auto"  # auto | chunked | ref | cuda
    style_cache: str = "auto"   # auto | states | projections: what `encode_style` keeps per MSTD layer
    state_cache_gb: float = 4.0  # 'auto' caches the full state sequence when it fits in this budget
    precision: str = "fp32"     # fp32 | bf16: numerics of the inference methods (see `MambaST.precision`)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.decoder_channels = tuple(self.decoder_channels)
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @classmethod
    def from_dict(cls, d: dict) -> "MambaSTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d


# ----------------------------------------------------------------------------------------------------------
# Cross-scan: the 4 directions (row-major, column-major, and both reversed), and the sum merge


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4, C, L): row-major, column-major, and both reversed.

    The result is a view of time-major (L, B, 4, C) memory, which the scan reads one step at a time; x is read
    fastest when it is channels_last (token-major), as `SS2D._conv` leaves it.
    """
    B, C, h, w = x.shape
    tokens = x.permute(2, 3, 0, 1)  # (h, w, B, C)
    seqs = x.new_empty((h * w, B, 4, C))
    seqs[:, :, 0].view(h, w, B, C).copy_(tokens)
    seqs[:, :, 1].view(w, h, B, C).copy_(tokens.transpose(0, 1))
    seqs[:, :, 2:] = seqs[:, :, :2].flip(0)
    return seqs.permute(1, 2, 3, 0)


def cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4, C, L) -> (B, L, C), tokens row-major: undo each direction's permutation and sum.

    Works in time-major (L, B, 4, C) memory, where the scan leaves its output (other layouts are copied there);
    the result is a view of (L, B, C) memory, token-major for the LayerNorm that follows.
    """
    B, _, C, L = y.shape
    seqs = y.permute(3, 0, 1, 2).contiguous()  # (L, B, 4, C)
    pairs = seqs[:, :, :2] + seqs[:, :, 2:].flip(0)  # each direction plus its reverse, in that direction's order
    merged = pairs[:, :, 0].reshape(h, w, B, C) + pairs[:, :, 1].reshape(w, h, B, C).transpose(0, 1)
    return merged.reshape(L, B, C).transpose(0, 1)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


# ----------------------------------------------------------------------------------------------------------
# Modules


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MambaSTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, img):  # (B, 3, H, W) -> (B, h, w, d_model)
        return self.proj(img).permute(0, 2, 3, 1)


@dataclass
class StyleLayerCode:
    """What one MSTD layer needs of the style, computed once per clip.

    Either the full state sequence (`states`, (1, L, K, N, d_inner) from `scan_states`, plus the D-skip `skip`),
    or the style-side scan inputs (`u`, `delta` already biased and soft-plussed, `B`), which models/mstd_readout.py
    scans once per batch of frames and reads out for every frame: where a fused readout runs (Triton on CUDA, the
    compiled loop on CPU: it keeps the states in registers), or when the states would not fit the budget. A blend
    of codes of that second form is `mix`: its parts and weights, read out one by one and summed (the readout is
    linear in the states and the skip, models/style_controls.py), with nothing of its own.
    """
    skip: torch.Tensor | None = None         # D ⊙ s, (1, K·d_inner, L)
    states: torch.Tensor | None = None
    u: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    B: torch.Tensor | None = None
    mix: tuple[tuple[StyleLayerCode, float], ...] = ()


class SS2D(nn.Module):
    """2-D selective scan. `cross=True` makes it the MSTD's ST-VSSM: u, Δ, B from the style, C from the content."""

    K = 4  # scan directions

    def __init__(self, cfg: MambaSTConfig, cross: bool):
        super().__init__()
        self.cfg, self.cross = cfg, cross
        d, di, n, r, K = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, self.K
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.in_style_proj = nn.Linear(d, di, bias=False)
        self.conv2d = nn.Conv2d(di, di, kernel_size=3, padding=1, groups=di, bias=True)  # depthwise, 2-D
        if cross:
            self.style_proj_weight = nn.Parameter(torch.empty(K, r + n, di))  # style -> (δ, B)
            self.x_proj_weight = nn.Parameter(torch.empty(K, n, di))  # content -> C
        else:
            self.x_proj_weight = nn.Parameter(torch.empty(K, r + 2 * n, di))  # x -> (δ, B, C)
        self.dt_projs_weight = nn.Parameter(torch.empty(K, di, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, di))
        self.A_logs = nn.Parameter(torch.empty(K * di, n))
        self.Ds = nn.Parameter(torch.ones(K * di))
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, d, bias=False)

    def _conv(self, x):  # (B, h, w, d_inner) -> SiLU(DWConv3x3(x)) as (B, d_inner, h, w), channels_last
        # channels_last: the depthwise conv runs ~3× faster on CPU than on NCHW, and cross_scan reads tokens
        return F.silu(self.conv2d(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)))

    @staticmethod
    def _project(seqs, weight):  # (B, K, d_inner, L) time-major, (K, c, d_inner) -> (B, K, c, L), per direction
        # indexed token-major ('lb…'), the sequences' memory order, so that einsum's matmul can read them in place
        return torch.einsum("lbkd,kcd->lbkc", seqs.permute(3, 0, 1, 2), weight).permute(1, 2, 3, 0)

    def _dt(self, dts):  # (B, K, r, L) -> (B, K·d_inner, L), a view of time-major (L, B, K·d_inner) memory
        delta = torch.einsum("lbkr,kdr->lbkd", dts.permute(3, 0, 1, 2), self.dt_projs_weight).contiguous()
        return delta.flatten(2).permute(1, 2, 0)

    def _finish(self, y, z, h, w):
        """Merge the K directions, out-norm, gate with SiLU(z), project. y (B, K·d_inner, L) -> (B, h, w, d)."""
        B = y.shape[0]
        y = cross_merge(y.view(B, self.K, -1, h * w), h, w)  # (B, L, d_inner)
        return self._gate_out(y.reshape(B, h, w, -1), z)

    def _gate_out(self, y, z):  # merged (B, h, w, d_inner) -> out-norm, gate with SiLU(z), project
        return self.out_proj(self.out_norm(y) * F.silu(z))

    # --- CPU inference on the token grid: the four directions scanned in place by models/scan_kernel_cpu.py ---

    def _on_token_grid(self, u) -> bool:
        """Whether this call scans on the token grid: inference in fp32 on the CPU with the compiled loop. There
        the directions are index maps inside the kernel, not copies (cross_scan's two copies and a flip, the
        merge's flip and transpose, the projections' layout copies: at the official widths at 512² they took
        more time than the scan); everything else, and the oracle for this path, cross-scans copies."""
        cfg = self.cfg
        return (u.device.type == "cpu" and u.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not under_autograd(u, *self.parameters()) and resolve_backend(cfg.scan_backend, u.device) == "cpu"
                and cross_kernels_take(cfg.d_inner, cfg.d_state))

    def _tokens(self, x):  # (B, h, w, d_inner) -> SiLU(DWConv3x3(x)) as (B, L, d_inner) tokens, row-major
        B, h, w, di = x.shape
        return self._conv(x).permute(0, 2, 3, 1).reshape(B, h * w, di)  # channels_last: a view

    def _project_tokens(self, tokens, weight):  # (B, L, d_inner), (K, c, d_inner) -> (B, L, K, c), per token
        di = tokens.shape[-1]
        return (tokens.reshape(-1, di) @ weight.reshape(-1, di).t()).view(*tokens.shape[:2], self.K, weight.shape[1])

    def _forward_on_grid(self, u):
        B, h, w, _ = u.shape
        cfg, K = self.cfg, self.K
        x, z = self.in_proj(u).chunk(2, dim=-1)
        tokens = self._tokens(x)
        proj = self._project_tokens(tokens, self.x_proj_weight)  # (B, L, K, δ | B | C)
        dts = proj.view(B * h * w, K, -1)[:, :, :cfg.dt_rank].transpose(0, 1)  # (K, B·L, r)
        delta = torch.bmm(dts, self.dt_projs_weight.transpose(1, 2)).view(K, B, h * w, cfg.d_inner)  # pre-bias
        y = cross_scan_forward_cpu(tokens, delta, -torch.exp(self.A_logs), proj, self.Ds, self.dt_projs_bias.flatten(),
                                   (h, w), b_off=cfg.dt_rank, c_off=cfg.dt_rank + cfg.d_state)  # (B, L, K, d_inner)
        return self._gate_out(y.sum(2).view(B, h, w, cfg.d_inner), z)

    def forward(self, u, style=None):
        """u: (B, h, w, d) normed content tokens; style: (B, h, w, d) shuffled style tokens (cross only)."""
        if not self.cross and self._on_token_grid(u):
            return self._forward_on_grid(u)
        B, h, w, _ = u.shape
        cfg, A = self.cfg, -torch.exp(self.A_logs.float())
        x, z = self.in_proj(u).chunk(2, dim=-1)
        xs = cross_scan(self._conv(x))  # (B, K, d_inner, L)
        if self.cross:
            ss = cross_scan(self._conv(self.in_style_proj(style)))
            Cs = self._project(xs, self.x_proj_weight)  # C from the content
            dts, Bs = self._project(ss, self.style_proj_weight).split([cfg.dt_rank, cfg.d_state], 2)
            seq = ss  # the scanned input is the style
        else:
            dts, Bs, Cs = self._project(xs, self.x_proj_weight).split(
                [cfg.dt_rank, cfg.d_state, cfg.d_state], 2)
            seq = xs
        y = selective_scan(seq.flatten(1, 2).float(), self._dt(dts).float(), A, Bs.float(), Cs.float(),
                           self.Ds.float(), delta_bias=self.dt_projs_bias.flatten().float(), delta_softplus=True,
                           backend=cfg.scan_backend)
        return self._finish(y.to(u.dtype), z, h, w)

    # --- the cached MSTD path: style side once per clip, content side per frame ---------------------------

    @torch.no_grad()
    def encode_style(self, style, keep_states: bool) -> StyleLayerCode:
        """style: (1, h, w, d) shuffled style tokens -> everything of the scan that depends only on the style."""
        cfg = self.cfg
        ss = cross_scan(self._conv(self.in_style_proj(style))).flatten(1, 2).float()  # (1, K·d_inner, L)
        dts, Bs = self._project(ss.view(1, self.K, cfg.d_inner, -1), self.style_proj_weight).split(
            [cfg.dt_rank, cfg.d_state], 2)
        delta = F.softplus(self._dt(dts).float() + self.dt_projs_bias.flatten().float()[:, None])
        skip = ss * self.Ds.float()[:, None]
        if keep_states:
            states = scan_states(ss, delta, -torch.exp(self.A_logs.float()), Bs.float())
            return StyleLayerCode(skip=skip, states=states)
        return StyleLayerCode(skip=skip, u=ss, delta=delta, B=Bs.float().contiguous())

    def forward_cached(self, u, code: StyleLayerCode):
        """Content side of the ST-VSSM for a batch of frames, reading the style from `code`."""
        B, h, w, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)
        A = -torch.exp(self.A_logs.float())
        if code.states is None and self._on_token_grid(u):
            Cs = self._project_tokens(self._tokens(x), self.x_proj_weight)  # (B, L, K, N)
            y = _mixed(code, lambda part: cross_readout_cpu(part.u, part.delta, A, part.B, Cs, part.skip, (h, w)))
            return self._gate_out(y.sum(2).view(B, h, w, self.cfg.d_inner), z)
        xs = cross_scan(self._conv(x))
        Cs = self._project(xs, self.x_proj_weight).float()  # (B, K, N, L)
        if code.states is not None:
            y = read_out_states(code.states, Cs, skip=code.skip)
        else:
            y = _mixed(code, lambda part: mstd_readout(part.u, part.delta, A, part.B, Cs, skip=part.skip,
                                                       backend=readout_backend(self.cfg.scan_backend)))
        return self._finish(y.to(u.dtype), z, h, w)


def _mixed(code: StyleLayerCode, read_out) -> torch.Tensor:
    """read_out(code), or for a blend Σ_i w_i read_out(part_i), its parts' weights in order."""
    if not code.mix:
        return read_out(code)
    y = None
    for part, weight in code.mix:
        y = read_out(part).mul_(weight) if y is None else y.add_(read_out(part), alpha=weight)
    return y


def readout_backend(scan_backend: str) -> str:
    """The MSTD readout's backend (models/mstd_readout.py) for the model's scan backend: the same torch or CPU path
    when one is forced, else 'auto' (mamba-ssm's plain scan has no readout: on CUDA 'auto' picks Triton)."""
    return scan_backend if scan_backend in ("ref", "chunked", "cpu") else "auto"


class VSSBlock(nn.Module):
    """x_next = LN_norm(x ⊙ skip_scale + DropPath(SS2D(LN_1(x)))) + x  (style enters the MSTD un-normalised)."""

    def __init__(self, cfg: MambaSTConfig, cross: bool, drop_path: float = 0.0):
        super().__init__()
        d = cfg.d_model
        self.skip_scale = nn.Parameter(torch.ones(d))
        self.skip_scale2 = nn.Parameter(torch.ones(d))  # in the checkpoints, unused
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = SS2D(cfg, cross)
        self.norm = nn.LayerNorm(d)
        self.drop_path = drop_path

    def forward(self, x, style=None):
        o = self.self_attention(self.ln_1(x), style)
        return self.norm(x * self.skip_scale + drop_path(o, self.drop_path, self.training)) + x

    def forward_cached(self, x, code: StyleLayerCode):
        o = self.self_attention.forward_cached(self.ln_1(x), code)
        return self.norm(x * self.skip_scale + o) + x


class Encoder(nn.Module):
    def __init__(self, cfg: MambaSTConfig):
        super().__init__()
        self.layers = nn.ModuleList([VSSBlock(cfg, cross=False) for _ in range(cfg.n_encoder_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    """MSTD: cross blocks reading a shuffled style memory, then a final LayerNorm."""

    def __init__(self, cfg: MambaSTConfig):
        super().__init__()
        self.layers = nn.ModuleList([VSSBlock(cfg, cross=True, drop_path=cfg.drop_path)
                                     for _ in range(cfg.n_decoder_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, content, style, perms):
        """content, style: (B, h, w, d); perms: one permutation of the L style tokens per layer."""
        B, h, w, d = style.shape
        flat = style.reshape(B, h * w, d)
        for layer, perm in zip(self.layers, perms):
            content = layer(content, flat[:, perm].view(B, h, w, d))
        return self.norm(content)


class MambaBody(nn.Module):
    """The official `mamba_iter_*.pth` module: two encoders and the MSTD (+ the unused `new_ps`)."""

    def __init__(self, cfg: MambaSTConfig):
        super().__init__()
        self.encoder_c = Encoder(cfg)
        self.encoder_s = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.new_ps = nn.Conv2d(cfg.d_model, cfg.d_model, 1)  # in the checkpoints, unused


def cnn_decoder(cfg: MambaSTConfig) -> nn.Sequential:
    """The StyTR-2 decoder, ×8 upsampling; Sequential indices match the official `decoder_iter_*.pth`."""
    c1, c2, c3 = cfg.decoder_channels

    def conv(cin, cout):
        return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)]

    up = nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Sequential(
        *conv(cfg.d_model, c1), nn.ReLU(), up,
        *conv(c1, c1), nn.ReLU(), *conv(c1, c1), nn.ReLU(), *conv(c1, c1), nn.ReLU(),
        *conv(c1, c2), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        *conv(c2, c2), nn.ReLU(), *conv(c2, c3), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        *conv(c3, c3), nn.ReLU(), *conv(c3, 3),
    )


# ----------------------------------------------------------------------------------------------------------
# The model


@dataclass
class StyleCode:
    """Everything that depends only on the style, for one token grid: computed once per clip."""
    grid: tuple[int, int]                     # (h, w) token grid of the padded content
    seed: int
    tokens: torch.Tensor                      # style encoder output on that grid, (1, h, w, d), before shuffling
    perms: list[torch.Tensor]                 # fixed token permutation per MSTD layer
    layers: list[StyleLayerCode] = field(default_factory=list)


def style_permutations(n_layers: int, length: int, seed: int) -> list[torch.Tensor]:
    """One fixed permutation of the style tokens per MSTD layer, from a private CPU generator.

    The official code draws argsort(rand(L)) from the global RNG on every call; a seeded private generator
    gives the same distribution, identical on every worker and retry, and never disturbs the global RNG.
    """
    g = torch.Generator().manual_seed(int(seed))
    return [torch.argsort(torch.rand(length, generator=g)) for _ in range(n_layers)]


def pad_to_multiple(img: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) on the bottom/right to multiples of m, at least 2m (the CNN decoder's reflection pads
    need a 2×2 token map). Reflect; replicate when the frame is too small to reflect."""
    H, W = img.shape[-2:]
    ph, pw = max((-H) % m, 2 * m - H), max((-W) % m, 2 * m - W)
    if ph == 0 and pw == 0:
        return img, (H, W)
    mode = "reflect" if ph < H and pw < W else "replicate"
    return F.pad(img, (0, pw, 0, ph), mode=mode), (H, W)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-correct resize of (B, 3, H, W) images (antialiased bilinear)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)


def fit_style(style: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A style image (B, 3, h, w) brought to `size` = (H, W) without distorting its strokes: scaled to fit inside
    (H, W), then mirrored outward along the side that falls short, as often as it takes.

    Training sees styles in the content crop's own shape (square), so stretching a 2:3 portrait over a 16:9 frame
    would show the model strokes 2.7x wider than any it learned from (Mona Lisa on the 2.35:1 bikes clip, four
    frames: style distance 0.656 stretched, 0.610 mirrored; a centre crop, dropping most of the painting, 0.728).
    The MSTD reads the style's tokens in a shuffled order, so the mirrored copies add no pattern, only more of the
    painting's patches. Same shape in, the plain resize.
    """
    (H, W), (h, w) = size, style.shape[-2:]
    scale = min(H / h, W / w)
    style = resize_image(style, (min(H, max(1, round(h * scale))), min(W, max(1, round(w * scale)))))
    while tuple(style.shape[-2:]) != (H, W):
        (sh, sw), (short_h, short_w) = style.shape[-2:], (H - style.shape[-2], W - style.shape[-1])
        if min(sh, sw) == 1:    # a line of pixels: nothing to mirror
            style = F.pad(style, (short_w // 2, short_w - short_w // 2, short_h // 2, short_h - short_h // 2),
                          mode="replicate")
            break
        # one mirror reaches at most the far edge (reflect pads less than the side); repeat until it fills
        top, bottom = min(short_h // 2, sh - 1), min(short_h - short_h // 2, sh - 1)
        left, right = min(short_w // 2, sw - 1), min(short_w - short_w // 2, sw - 1)
        style = F.pad(style, (left, right, top, bottom), mode="reflect")
    return style


def _inference(method):
    """An inference method of MambaST: no autograd, and the model's `precision` region."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.no_grad(), self.precision():
            return method(self, *args, **kwargs)
    return run


@contextlib.contextmanager
def _tf32():
    """TF32 tensor cores for CUDA matmuls and cuDNN convolutions, restored after (torch's switches are global)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class MambaST(nn.Module):
    def __init__(self, cfg: MambaSTConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = PatchEmbed(cfg)
        self.mamba = MambaBody(cfg)
        self.decode = cnn_decoder(cfg)
        init_weights(self, "mamba", seed=0)  # no uninitialised parameters, whatever is loaded next

    # --- training / plain path --------------------------------------------------------------------------

    def forward(self, content, style, perms=None, seed=None):
        """Plain path: content (B,3,H,W), style (B,3,H',W') in [0,1] -> (B,3,H,W). No cache.

        The style is fitted to the content's padded size (`fit_style`). `perms` fixes the style permutations (else
        they are drawn from `seed`, else from the global RNG like the official code).
        """
        x, (H, W) = pad_to_multiple(content, self.cfg.patch_size)
        return self.decode_tokens(self.mstd_tokens(x, style, perms, seed))[..., :H, :W]

    def mstd_tokens(self, x, style, perms=None, seed=None):
        """`forward` up to the CNN decoder: padded content (B, 3, 8h, 8w), style -> the MSTD's tokens (B, h, w, d)."""
        style = fit_style(style, tuple(x.shape[-2:]))
        c = self.mamba.encoder_c(self.embedding(x))
        s = self.mamba.encoder_s(self.embedding(style))
        if perms is None:
            L = c.shape[1] * c.shape[2]
            perms = (style_permutations(self.cfg.n_decoder_layers, L, seed) if seed is not None
                     else [torch.argsort(torch.rand(L)) for _ in range(self.cfg.n_decoder_layers)])
        return self.mamba.decoder(c, s, [p.to(c.device) for p in perms])

    def decode_tokens(self, y):
        """(B, h, w, d) -> (B, 3, 8h, 8w)."""
        # channels_last (the tokens' own layout): the decoder's convolutions run ~20% faster on CPU, and faster
        # on CUDA's tensor cores too; the images come back in the usual contiguous layout
        return self.decode(y.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)).contiguous()

    # --- inference path: style once, frames many times ---------------------------------------------------

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of a frame after `pad_to_multiple`."""
        p = self.cfg.patch_size
        return (max(-(-height // p), 2), max(-(-width // p), 2))

    def _keep_states(self, grid, device) -> bool:
        """'auto': no state cache where a fused readout runs (Triton on CUDA, the compiled loop on CPU: they
        recompute the states in registers at any size; at the official widths at 512² reading 1 GiB of cached
        states per layer and frame was the slower way: the MSTD took 2.29 CPU s per frame with the cache (and
        cross-scan copies), 1.55 with the compiled loop on the token grid, and peak memory fell from 4.6-6.1 to
        1.3 GB, `mambast bench model`); with the torch readout the cache when it fits the budget (it beats
        rescanning per batch)."""
        if self.cfg.style_cache != "auto":
            return self.cfg.style_cache == "states"
        if resolve_readout_backend(readout_backend(self.cfg.scan_backend), device) in ("triton", "cpu"):
            return False
        L = grid[0] * grid[1]
        nbytes = self.cfg.n_decoder_layers * L * SS2D.K * self.cfg.d_inner * self.cfg.d_state * 4
        return nbytes <= self.cfg.state_cache_gb * 2**30

    @_inference
    def encode_style(self, style: torch.Tensor, grid: tuple[int, int], seed: int = 0) -> StyleCode:
        """style (1, 3, H', W') in [0,1] -> StyleCode for content whose token grid is `grid` = (h, w)."""
        p = self.cfg.patch_size
        s = self.mamba.encoder_s(self.embedding(fit_style(style, (grid[0] * p, grid[1] * p))))
        return self.style_code_from_tokens(s, seed)

    @_inference
    def style_code_from_tokens(self, tokens: torch.Tensor, seed: int = 0) -> StyleCode:
        """Build the per-layer caches from style encoder tokens (1, h, w, d); used for blends too."""
        _, h, w, d = tokens.shape
        # on the tokens' device once, so that no frame copies them (a host-to-device copy per frame would also
        # keep a strength < 1 frame out of a CUDA graph)
        perms = [p.to(tokens.device) for p in style_permutations(self.cfg.n_decoder_layers, h * w, seed)]
        keep = self._keep_states((h, w), tokens.device)
        flat = tokens.reshape(1, h * w, d)
        layers = [layer.self_attention.encode_style(flat[:, perm].view(1, h, w, d), keep)
                  for layer, perm in zip(self.mamba.decoder.layers, perms)]
        return StyleCode(grid=(h, w), seed=seed, tokens=tokens, perms=perms, layers=layers)

    @_inference
    def stylize_tokens(self, frames: torch.Tensor, style: StyleCode,
                       strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Padded frames (B, 3, 8h, 8w) -> (decoder tokens, identity tokens or None), each (B, h, w, d).

        Only the content-dependent work: the content encoder, then every MSTD layer reads the cached style states
        out with the frame's own C_t. With `strength` < 1 the identity pass runs too (the frame as its own style:
        Y_cc, which training makes decode back to the frame) and the tokens are lerp(Y_cc, Y_cs, strength);
        models/style_controls.py explains the arithmetic. At strength 1 the identity tokens are None.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        embedded = self.embedding(frames)
        content = self.mamba.encoder_c(embedded)  # (B, h, w, d)
        if tuple(content.shape[1:3]) != tuple(style.grid):
            raise ValueError(f"frames give token grid {tuple(content.shape[1:3])}, style code was made for {style.grid}")
        y = content
        for layer, code in zip(self.mamba.decoder.layers, style.layers):
            y = layer.forward_cached(y, code)
        stylized = self.mamba.decoder.norm(y)
        if strength == 1.0:
            return stylized, None
        if self.training:
            raise ValueError("strength < 1 runs the identity pass: call model.eval() first")
        own_style = self.mamba.encoder_s(embedded)
        identity = self.mamba.decoder(content, own_style, [p.to(frames.device) for p in style.perms])
        return torch.lerp(identity, stylized, strength), identity

    @_inference
    def decode_stylized(self, tokens: torch.Tensor, identity: torch.Tensor | None, content: torch.Tensor,
                        strength: float = 1.0) -> torch.Tensor:
        """`stylize_tokens`' output -> images (B, 3, H, W) the size of the unpadded `content`, unclamped.

        With identity tokens, (1 - strength)·(content - D(Y_cc)) is added: what the CNN decoder loses of the
        content, fading with the strength, so that strength 0 gives the content back whatever the weights.
        """
        H, W = content.shape[-2:]
        images = self.decode_tokens(tokens)[..., :H, :W]
        if identity is not None:
            images = images + (1.0 - strength) * (content - self.decode_tokens(identity)[..., :H, :W])
        return images.float()  # bf16 precision: the decoder's convolutions ran in bf16

    @_inference
    def stylize(self, frames: torch.Tensor, style: StyleCode, strength: float = 1.0) -> torch.Tensor:
        """frames (B, 3, H, W) in [0,1] -> stylized (B, 3, H, W), unclamped. The one inference path: pad,
        `stylize_tokens`, `decode_stylized` (pipeline/stylizer.py calls the two itself, smoothing tokens between)."""
        x, _ = pad_to_multiple(frames, self.cfg.patch_size)
        tokens, identity = self.stylize_tokens(x, style, strength)
        return self.decode_stylized(tokens, identity, frames, strength)

    def scan_backend(self, device=None) -> str:
        return resolve_backend(self.cfg.scan_backend, device or next(self.parameters()).device)

    def precision(self, device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
        """The numerics of the inference methods, set by `cfg.precision`, as a context on `device` (default: the
        model's). Every inference method enters it; training (`forward`) runs in whatever region its caller sets.

        - 'fp32' (default): float32. On CUDA, matmuls and convolutions run on TF32 tensor cores (fp32 range and
          accumulation, 10-bit mantissa products: ~1e-3 relative, below one level of an 8-bit frame).
        - 'bf16': autocast to bfloat16 (meant for CUDA; CPU works too, which is how the tests run it) for the
          linear layers, convolutions and projections. The selective scans and state readouts stay fp32
          (models/selective_scan.py turns autocast off inside them), so the recurrence's state is never rounded.
        Choose it like any config field: `load_model(path, device="cuda", precision="bf16")`.
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        regions = contextlib.ExitStack()
        if device.type == "cuda":
            regions.enter_context(_tf32())
        if self.cfg.precision == "bf16":
            regions.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        return regions



# ----------------------------------------------------------------------------------------------------------
# Initialisation for training from scratch


def init_weights(model: MambaST, scheme: str = "mamba", seed: int = 0) -> None:
    """'official': xavier_uniform_ on every ≥2-D parameter of `mamba` (which also clobbers A and the dt bias,
    as the official code does). 'mamba': the same for the projections, but A and Δ initialised as in Mamba
    (A = -(1..N), dt ∈ [1e-3, 0.1] log-uniform through the softplus inverse), which trains faster.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.mamba.named_parameters():
            if p.dim() > 1:
                bound = math.sqrt(6.0 / _fans(p))
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        if scheme == "mamba":
            n = model.cfg.d_state
            for mod in model.modules():
                if isinstance(mod, SS2D):
                    mod.A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(mod.A_logs))
                    dt = torch.exp(torch.rand(mod.dt_projs_bias.shape, generator=g)
                                   * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                    mod.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif scheme != "official":
            raise ValueError(f"unknown init scheme {scheme!r}")


def _fans(p: torch.Tensor) -> int:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(p)
    return fan_in + fan_out

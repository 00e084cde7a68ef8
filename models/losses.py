"""Mamba-ST's training losses on perceptual features (docs/mamba-st.md §3), plus the Gram matrix for evaluation.

Features are the lists that `PerceptualNet.features` returns, one B×C×H×W tensor per tap, shallow to deep.
μ and σ are per-channel spatial mean and std with σ = sqrt(var_unbiased + 1e-5); every ‖·‖² is a mean
squared error, as in the official code (`nn.MSELoss`).

    L_c   = Σ_{i ∈ content taps} ‖norm(φ_i(Ics)) − norm(φ_i(Ic))‖²
    L_s   = Σ_i ‖μ(φ_i(Ics)) − μ(φ_i(Is))‖² + ‖σ(φ_i(Ics)) − σ(φ_i(Is))‖²
    L_id1 = ‖Icc − Ic‖² + ‖Iss − Is‖²
    L_id2 = Σ_i ‖φ_i(Icc) − φ_i(Ic)‖² + ‖φ_i(Iss) − φ_i(Is)‖²
    L     = 7·L_c + 10·L_s + 70·L_id1 + 1·L_id2

Distillation toward a teacher's output T of the same content and style (models/teacher.py), our addition:

    L_t   = |Ics − T|₁ + Σ_i ‖φ_i(Ics) − φ_i(T)‖² / ‖φ_i(T)‖²   (each tap relative to its own energy)

or, with `teacher_loss: regional` in a recipe, the teacher's *local statistics* instead of its pixels: on a g×g
grid of cells over each tap (μ_g, σ_g: per channel, per cell),

    L_t   = Σ_i w_i (‖μ_g(φ_i(Ics)) − μ_g(φ_i(T))‖² + ‖σ_g(φ_i(Ics)) − σ_g(φ_i(T))‖²)

The pixel-aligned form asks the student to put every stroke where the teacher put it; what it cannot predict it
averages, and the average of many stroke placements is a colour grade. The regional form asks for the teacher's
palette and texture statistics in each part of the picture (yellow where the teacher put yellow), and leaves the
stroke placement to the student. Measured (stage 10j, 400 steps from the bundled weights): worse on the held-out
styles (0.550 vs 0.517; models/weights/MODEL_CARD.md), so the bundled recipes use the aligned form.

Shift consistency, our addition for video: the same content seen (dy, dx) pixels further on, not a whole patch,
should come out as the same picture moved by (dy, dx), on the part both windows see:

    L_shift = ‖shift(Ics(window), dy, dx) − Ics(window moved by dy, dx)‖² / (the two pictures' fine detail energy)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

STD_EPS = 1e-5


def mean_std(feat: Tensor, eps: float = STD_EPS) -> tuple[Tensor, Tensor]:
    """B×C×H×W -> (μ, σ), each B×C×1×1, over the spatial positions; σ uses the unbiased variance."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    mean = flat.mean(dim=2).view(b, c, 1, 1)
    std = (flat.var(dim=2) + eps).sqrt().view(b, c, 1, 1)
    return mean, std


def normalise(feat: Tensor) -> Tensor:
    """Instance normalisation without affine parameters, using the μ/σ of `mean_std`."""
    mean, std = mean_std(feat)
    return (feat - mean) / std


def content_loss(feats_out: Sequence[Tensor], feats_content: Sequence[Tensor], layers: Sequence[int]) -> Tensor:
    """L_c: MSE between instance-normalised features at the tap indices `layers` (e.g. `net.content_taps`)."""
    return sum(F.mse_loss(normalise(feats_out[i]), normalise(feats_content[i])) for i in layers)


def style_loss(feats_out: Sequence[Tensor], feats_style: Sequence[Tensor]) -> Tensor:
    """L_s: over all taps, MSE of the channel means plus MSE of the channel stds."""
    _check_same_taps(feats_out, feats_style)
    total = 0
    for out, style in zip(feats_out, feats_style):
        (mean_o, std_o), (mean_s, std_s) = mean_std(out), mean_std(style)
        total = total + F.mse_loss(mean_o, mean_s) + F.mse_loss(std_o, std_s)
    return total


def weighted_style_loss(feats_out: Sequence[Tensor], feats_style: Sequence[Tensor],
                        tap_weights: Sequence[float]) -> Tensor:
    """Σ_i w_i · L_s(tap i): the style loss with a weight per tap (an empty list weights every tap 1)."""
    weights = tap_weights or [1.0] * len(feats_style)
    return sum(w * style_loss([a], [b]) for w, a, b in zip(weights, feats_out, feats_style))


def identity_losses(i_cc: Tensor, i_c: Tensor, i_ss: Tensor, i_s: Tensor,
                    feats_cc: Sequence[Tensor], feats_c: Sequence[Tensor],
                    feats_ss: Sequence[Tensor], feats_s: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(L_id1, L_id2): Icc = model(content=Ic, style=Ic) and Iss = model(Is, Is) must give back their input,
    in pixels (L_id1) and in the features of every tap (L_id2)."""
    _check_same_taps(feats_cc, feats_c)
    _check_same_taps(feats_ss, feats_s)
    pixel = F.mse_loss(i_cc, i_c) + F.mse_loss(i_ss, i_s)
    feature = sum(F.mse_loss(a, b) + F.mse_loss(c, d) for a, b, c, d in zip(feats_cc, feats_c, feats_ss, feats_s))
    return pixel, feature


def distillation_loss(out: Tensor, target: Tensor, feats_out: Sequence[Tensor],
                      feats_target: Sequence[Tensor]) -> Tensor:
    """L_t: mean absolute pixel difference to the teacher's output plus, per tap, the feature MSE relative to the
    target's mean squared activation (taps differ in scale by orders of magnitude; this weighs them alike)."""
    _check_same_taps(feats_out, feats_target)
    relative = sum(F.mse_loss(a, t) / t.pow(2).mean().clamp_min(1e-8) for a, t in zip(feats_out, feats_target))
    return F.l1_loss(out, target) + relative


def regional_mean_std(feat: Tensor, regions: int, eps: float = STD_EPS) -> tuple[Tensor, Tensor]:
    """B×C×H×W -> (μ, σ), each B×C×g×g: per channel over each cell of a g×g grid, g = min(regions, H, W)
    (cells as adaptive average pooling draws them); σ from the biased variance."""
    grid = (min(regions, feat.shape[-2]), min(regions, feat.shape[-1]))
    mean = F.adaptive_avg_pool2d(feat, grid)
    var = (F.adaptive_avg_pool2d(feat * feat, grid) - mean * mean).clamp_min(0)
    return mean, (var + eps).sqrt()


def regional_distillation_loss(feats_out: Sequence[Tensor], feats_target: Sequence[Tensor],
                               tap_weights: Sequence[float], regions: int) -> Tensor:
    """L_t, regional: per tap, MSE of the per-cell channel means and stds on a `regions`² grid, weighted per
    tap like the style loss (an empty `tap_weights` weighs every tap 1)."""
    _check_same_taps(feats_out, feats_target)
    weights = list(tap_weights) or [1.0] * len(feats_target)
    total = 0
    for w, out, target in zip(weights, feats_out, feats_target):
        (mean_o, std_o), (mean_t, std_t) = regional_mean_std(out, regions), regional_mean_std(target, regions)
        total = total + w * (F.mse_loss(mean_o, mean_t) + F.mse_loss(std_o, std_t))
    return total


def shift_consistency_loss(out: Tensor, out_moved: Tensor, dy: int, dx: int) -> Tensor:
    """L_shift: `out` stylizes a window, `out_moved` the window (dy, dx) pixels further down and right (dy, dx >=
    0); both B×3×H×W. A model whose strokes follow the image and not its patch grid scores 0.

    The squared difference is taken relative to the two pictures' fine detail (each minus its 5×5 box mean), so
    that flattening the strokes is no way out: strokes drawn afresh at every shift score ≈1 at any contrast.
    """
    h, w = out.shape[-2:]
    a, b = out[..., dy:, dx:], out_moved[..., :h - dy, :w - dx]
    detail = sum(((x - F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)) ** 2).mean() for x in (a, b))
    return F.mse_loss(a, b) / (detail + 1e-6)


def gram(feat: Tensor) -> Tensor:
    """B×C×H×W -> B×C×C Gram matrix F·Fᵀ / (C·H·W) (Johnson et al. 2016's normalisation)."""
    b, c, h, w = feat.shape
    flat = feat.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def _check_same_taps(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"feature lists differ in length ({len(a)} vs {len(b)} taps)")

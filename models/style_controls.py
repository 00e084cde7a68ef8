"""Style controls on top of Mamba-ST's cached style code: strength, colour preservation, blends, morphs.

All four act where the model already separates content from style (docs/mamba-st.md §1.6): the MSTD's state
sequence h_t is written by the style alone and read out by each frame with its own C_t.

Strength s ∈ [0, 1]: interpolate features, then close the gap to the content in pixels
----------------------------------------------------------------------------------------
    Y_cs = MSTD(content, style)        the stylized decoder tokens
    Y_cc = MSTD(content, content)      the identity pass: the content as its own style, which training makes
                                       reconstruct the content (Icc ≈ Ic, the L_id losses)
    out  = D(lerp(Y_cc, Y_cs, s)) + (1 - s)·(Ic - D(Y_cc))

The first term interpolates in feature space, so intermediate strengths look like a weaker stylization rather
than a double exposure of two images. The second adds back, fading with s, exactly what the CNN decoder D fails
to reconstruct of the content (its residual Ic - Icc, small for trained weights). Together: s = 0 returns Ic
(up to float rounding, whatever the weights) and s = 1 is the plain stylization bit for bit (the identity pass
is skipped). Cost: for 0 < s < 1 the identity pass (style encoder + a full MSTD scan on the frame) and a second
CNN decode, about twice a plain frame. The passes are the model's (`MambaST.stylize_tokens` returns the lerped
tokens and Y_cc, `MambaST.decode_stylized` adds the residual); this module checks the strength.

Colour preservation: luminance-only transfer (Gatys et al. 2016, "Preserving colour in neural artistic style
transfer"): the stylized luma, its mean and std matched to the content's, with the content's chroma (YCbCr,
BT.601 full range, as in JPEG). Where the new luma would take a colour out of the RGB gamut the luma is limited
instead of clipping RGB, so the chroma is the content's exactly.

Blends mix cached style codes, not outputs
------------------------------------------
Within an MSTD layer the readout is linear in the cached state sequence and the D-skip::

    y_t = ⟨C_t, Σ_i w_i h_t^i⟩ + Σ_i w_i D⊙s_t^i = Σ_i w_i (⟨C_t, h_t^i⟩ + D⊙s_t^i)

so a code whose states and skips are the weighted sums reads out, in every layer, the weighted mean of what each
style alone would give that layer, before the layer's norm and gate; the next layers then see one coherent
token map. This is exact (weights (1, 0) give the first style bit for bit), needs no re-scan, and costs one
weighted sum of the states, cheap enough to redo for every frame of a morph. Codes in the scan-input form (no
state cache: the fused readouts on CPU and CUDA, or states beyond `MambaSTConfig.state_cache_gb`) keep the same
arithmetic without the states: the blend holds its parts and weights (`StyleLayerCode.mix`), and each layer reads
every part out and sums Σ_i w_i y_i, one readout per style with a non-zero weight.

    >>> a, b = model.encode_style(starry, grid), model.encode_style(wave, grid)
    >>> code = mix_style_codes(model, [a, b], [0.7, 0.3])       # weights >= 0, normalised to sum 1
    >>> morph = mix_style_codes(model, [a, b], [1 - smoothstep(t), smoothstep(t)])
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from models.errors import UserError
from models.mambast import MambaST, StyleCode, StyleLayerCode

# BT.601 full-range RGB <-> YCbCr (chroma centred on 0 here; JPEG adds 0.5). Python floats, not tensors: a
# matrix tensor would be copied to the frames' device on every call, a blocking host->device copy on CUDA.
_RGB_TO_YCC = ((0.299, 0.587, 0.114),
               (-0.168736, -0.331264, 0.5),
               (0.5, -0.418688, -0.081312))
_YCC_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_TO_YCC, dtype=torch.float64)).tolist()))
MAX_LUMA_GAIN = 4.0  # colour preservation never raises the stylized contrast more than this (a flat output stays flat)


# ----------------------------------------------------------------------------------------------------------
# Strength


def check_strength(strength: float) -> float:
    """The strength as a float in [0, 1], else a UserError naming it."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"strength: must be a number from 0 to 1, got {strength!r}") from None
    if not 0.0 <= s <= 1.0:
        raise UserError(f"strength: must be from 0 (the content) to 1 (full style), got {strength!r}")
    return s


# ----------------------------------------------------------------------------------------------------------
# Colour preservation


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) Y in [0, 1], Cb and Cr in [-0.5, 0.5] (BT.601 full range)."""
    return _mix_channels(_RGB_TO_YCC, rgb)


def ycbcr_to_rgb(ycc: Tensor) -> Tensor:
    """Inverse of `rgb_to_ycbcr` (unclamped)."""
    return _mix_channels(_YCC_TO_RGB, ycc)


def _mix_channels(matrix, x: Tensor) -> Tensor:
    """out[:, i] = sum_j matrix[i][j] * x[:, j] for (B, 3, H, W) x and a 3x3 matrix of Python floats."""
    return torch.stack([row[0] * x[:, 0] + row[1] * x[:, 1] + row[2] * x[:, 2] for row in matrix], dim=1)


def preserve_colors(stylized: Tensor, content: Tensor) -> Tensor:
    """The stylized texture in the content's colours: stylized luma, matched to the content's luma mean and std
    per image (the contrast gain capped at `MAX_LUMA_GAIN`), with the content's chroma exactly (the luma is
    limited where it would push that chroma out of the RGB gamut). Both (B, 3, H, W) in [0, 1], same size.

    >>> out = preserve_colors(stylized, content)     # rgb_to_ycbcr(out)[:, 1:] ≈ rgb_to_ycbcr(content)[:, 1:]
    """
    if stylized.shape != content.shape:
        raise ValueError(f"stylized {tuple(stylized.shape)} and content {tuple(content.shape)} differ in shape")
    luma = rgb_to_ycbcr(stylized)[:, :1]
    target = rgb_to_ycbcr(content)
    mean, std = luma.mean(dim=(2, 3), keepdim=True), luma.std(dim=(2, 3), keepdim=True)
    t_mean, t_std = target[:, :1].mean(dim=(2, 3), keepdim=True), target[:, :1].std(dim=(2, 3), keepdim=True)
    gain = t_std / torch.maximum(std, t_std / MAX_LUMA_GAIN).clamp_min(1e-6)
    matched = (luma - mean) * gain + t_mean
    # Keep the colour in gamut by limiting the luma, not by clipping RGB (which would shift the chroma): with chroma
    # fixed, RGB_k = Y + offset_k, so Y must lie in [max_k -offset_k, min_k 1 - offset_k]. That range holds the
    # content pixel's own luma, so it is never empty.
    chroma = target[:, 1:]
    offsets = ycbcr_to_rgb(torch.cat([torch.zeros_like(matched), chroma], dim=1))
    matched = torch.clamp(matched, (-offsets).amax(dim=1, keepdim=True), (1 - offsets).amin(dim=1, keepdim=True))
    return ycbcr_to_rgb(torch.cat([matched, chroma], dim=1)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Blends and morphs


def normalise_weights(weights: Sequence[float], names: Sequence[str] | None = None) -> list[float]:
    """Blend weights -> floats summing to 1. Each must be a finite number >= 0, and one must be > 0.

    >>> normalise_weights([3, 1])
    [0.75, 0.25]
    """
    names = list(names) if names is not None else [f"style {i + 1}" for i in range(len(weights))]
    if len(weights) == 0:
        raise UserError("blend: needs at least one style")
    out = []
    for name, w in zip(names, weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise UserError(f"blend weight of {name}: must be a number, got {w!r}") from None
        if not math.isfinite(w) or w < 0:
            raise UserError(f"blend weight of {name}: must be a finite number >= 0, got {w!r}")
        out.append(w)
    total = sum(out)
    if total <= 0:
        raise UserError("blend: all weights are 0; give at least one style a positive weight")
    return [w / total for w in out]


def smoothstep(t: float) -> float:
    """3t² − 2t³ on [0, 1] (clamped): eases in and out, so a morph starts and ends without a jolt."""
    t = min(max(float(t), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


@torch.no_grad()
def mix_style_codes(model: MambaST, codes: Sequence[StyleCode], weights: Sequence[float]) -> StyleCode:
    """One style code reading out the weighted mix of `codes` (same token grid and seed), see the module docstring.

    Weights are checked and normalised (`normalise_weights`). A weight of exactly 1 returns that code itself.
    """
    codes = list(codes)
    if len(codes) != len(weights):
        raise ValueError(f"{len(codes)} style codes but {len(weights)} weights")
    weights = normalise_weights(weights)
    first = codes[0]
    for code in codes[1:]:
        if tuple(code.grid) != tuple(first.grid):
            raise UserError(f"blend: style codes are for different token grids {tuple(first.grid)} and "
                            f"{tuple(code.grid)}; encode every style for the frames' grid")
        if code.seed != first.seed:
            raise UserError(f"blend: style codes use different seeds ({first.seed} and {code.seed})")
    for code, w in zip(codes, weights):
        if w == 1.0:
            return code
    tokens = _weighted_sum([c.tokens for c in codes], weights)
    if all(layer.states is not None for code in codes for layer in code.layers):
        layers = [StyleLayerCode(skip=_weighted_sum([c.layers[i].skip for c in codes], weights),
                                 states=_weighted_sum([c.layers[i].states for c in codes], weights))
                  for i in range(len(first.layers))]
    elif any(layer.states is not None for code in codes for layer in code.layers):
        raise ValueError("blend: style codes of both forms (states and scan inputs); encode them with one model")
    else:  # read out part by part (a blend of blends is flattened into its parts)
        layers = [StyleLayerCode(mix=tuple((part, w * part_w) for c, w in zip(codes, weights) if w > 0
                                           for part, part_w in (c.layers[i].mix or ((c.layers[i], 1.0),))))
                  for i in range(len(first.layers))]
    return StyleCode(grid=first.grid, seed=first.seed, tokens=tokens, perms=first.perms, layers=layers)


def _weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """Σ w_i t_i with one output buffer (states can be large); terms with weight 0 are skipped."""
    out = None
    for t, w in zip(tensors, weights):
        if w == 0.0:
            continue
        out = t * w if out is None else out.add_(t, alpha=w)
    return out

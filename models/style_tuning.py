"""Style tuning: the CNN decoder fine-tuned to one style on the frames it is about to stylize.

The bundled model is feed-forward: it has seen 247 styles, and on a painting it has not seen it carries the palette
and a little of the brushwork (held-out style distance 0.517; models/weights/MODEL_CARD.md). A clip is stylized
with one style for hundreds of frames, so a one-off fine-tune to that style pays: 200 Adam steps of the paper's
content and style losses (models/losses.py) with that one style, on windows of the clip's own frames,

    L = w_c·L_c(D'(Y_cs), I_c) + w_s·Σ_i w_i·L_s,i(D'(Y_cs), I_s)  [+ w_shift·L_shift]     only D' trained

Only the CNN decoder D' (`model.decode`) moves; the encoders and the MSTD stay the model's own, so their tokens Y_cs
are computed once per frame, for the whole frame, with the stylizer's style permutations: exactly the tokens the
decoder will meet when the clip is stylized. Each step decodes random windows of them (256 px at the working size).

How the defaults were chosen: 6 held-out styles x 13 photos at working size 512 (EfficientNet-Lite0 distances, not
the training net; untuned: style 0.550, content 1.492, the sigma=3 blur's content 1.565). Tuning the decoder carries
as much style as tuning every weight (0.427 / 1.531 vs 0.428 / 1.523 after 40 steps) in half the time; the style
side alone (style encoder, the MSTD's style projections) carries little (0.531); training's content weight (9.5)
melts the structure (0.342 / 2.09). With the rate falling along a cosine from 2e-4, on the frames to be stylized:
content weight 36, 100 steps on random crops (each with its own style permutations) 0.401 / 1.526; on windows of
whole-frame tokens 0.394 / 1.557 in 0.6x the time per step (the MSTD no longer runs per step); 200 steps at
content weight 30 on windows 0.375 / 1.621, the default. More steps move both distances down (with L_shift: 100
steps 0.420 / 1.515, 200 steps 0.409 / 1.495); deep taps weighted up cost content faster than they buy style.
L_shift (models/losses.py, as training's `weight_shift`; the crops come in pairs, the second from the frame moved
1..patch-1 px against the patch grid) costs style (weight 8: 0.413 vs 0.394; 30: 0.429): off by default.

The result is a whole model (a copy; the input model is untouched) meant for that one style: with other styles it
is a worse model. Deterministic: the windows and shifts come from a private generator seeded by `StyleTuning.seed`
(also the style permutations' seed: pass the stylizer's), and the same inputs on the same machine and thread count
give the same weights bit for bit (pipeline/style_tuning.py caches them so that every worker reads one file).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import UserError
from models.losses import content_loss, shift_consistency_loss, weighted_style_loss
from models.mambast import MambaST, pad_to_multiple, style_permutations
from models.perceptual import PerceptualNet, load_perceptual


@dataclass(frozen=True)
class StyleTuning:
    """How a model is tuned to one style; `steps` 0 is no tuning."""

    steps: int = 200
    lr: float = 2e-4               # Adam's rate at the first step, falling along a half cosine to lr_min at the last
    lr_min: float = 1e-5
    crop: int = 256                # square windows of the frames, at the working size (whole frames when smaller)
    batch_size: int = 2
    weight_content: float = 30.0
    weight_style: float = 12.0
    weight_shift: float = 0.0      # L_shift on crops taken in pairs, one moved 1..patch-1 px: strokes that follow the
                                   # picture, not the patch grid (moving video); 0 = independent crops
    style_tap_weights: tuple[float, ...] = (100.0, 300.0, 300.0, 600.0, 4.0)  # the bundled recipes', per tap
    perceptual: str = "mobilenet_v2"  # the training network; evaluation uses another (EfficientNet-Lite0)
    seed: int = 0                  # the windows, the shifts and the style permutations: the stylizer's seed


MIN_CROP = 64  # the perceptual nets' deepest tap is /32: a 2x2 map at least, so that its channels have a spread


def crop_size(frames: Sequence[Tensor], crop: int, patch: int) -> int:
    """The crop side: `crop`, or the smallest frame side if smaller, a multiple of the patch, at least MIN_CROP
    (smaller frames are enlarged to it)."""
    smallest = min(min(f.shape[-2:]) for f in frames)
    return max(MIN_CROP, min(crop, smallest) // patch * patch)


@dataclass(frozen=True)
class TokenFrame:
    """A frame as the CNN decoder meets it when the clip is stylized: the frame padded to the patch grid
    (3, p·h, p·w) and the MSTD's tokens of it (h, w, d), computed once for the whole frame."""
    image: Tensor
    tokens: Tensor


def enlarged(frame: Tensor, side: int) -> Tensor:
    """`frame` (3, H, W), enlarged (bilinear) so that its short side is at least `side`."""
    h, w = frame.shape[-2:]
    if min(h, w) >= side:
        return frame
    s = side / min(h, w)
    return F.interpolate(frame[None], size=(max(side, round(h * s)), max(side, round(w * s))), mode="bilinear",
                         align_corners=False)[0]


@torch.no_grad()
def token_frame(model: MambaST, frame: Tensor, style: Tensor, seed: int) -> TokenFrame:
    """The frame's tokens as stylizing computes them: the whole padded frame, the style fitted to it, the style
    permutations of `seed` (the stylizer's)."""
    x, _ = pad_to_multiple(frame[None], model.cfg.patch_size)
    h, w = (n // model.cfg.patch_size for n in x.shape[-2:])
    perms = style_permutations(model.cfg.n_decoder_layers, h * w, seed)
    return TokenFrame(x[0], model.mstd_tokens(x, style, perms=perms)[0])


def token_window(frame: TokenFrame, ty: int, tx: int, side: int, patch: int) -> tuple[Tensor, Tensor]:
    """The tokens (side, side, d) at token (ty, tx) and the pixels (3, patch·side, patch·side) they stand for."""
    return (frame.tokens[ty:ty + side, tx:tx + side],
            frame.image[:, ty * patch:(ty + side) * patch, tx * patch:(tx + side) * patch])


def style_at(style: Tensor, short: int) -> Tensor:
    """(1, 3, H, W) -> the same picture with its short side `short` (antialiased): the scale of the crops."""
    h, w = style.shape[-2:]
    s = short / min(h, w)
    return F.interpolate(style, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         antialias=True, align_corners=False)


def tune_to_style(model: MambaST, style: Tensor, frames: Sequence[Tensor], tuning: StyleTuning = StyleTuning(),
                  net: PerceptualNet | None = None, progress: Callable[[int, float], None] | None = None) -> MambaST:
    """A copy of `model` whose CNN decoder is tuned to `style` (1, 3, H, W) on windows of `frames`, each (3, H, W),
    all in [0, 1] on the model's device. `net`: the perceptual net (default: `tuning.perceptual`, loaded);
    `progress(step, loss)` is called after every step."""
    if tuning.steps < 0:
        raise ValueError(f"steps must be >= 0, got {tuning.steps}")
    if not frames:
        raise ValueError("tune_to_style needs at least one frame")
    tuned = copy.deepcopy(model).float().eval()
    if tuning.steps == 0:
        return tuned
    device = next(tuned.parameters()).device
    net = (net or load_perceptual(tuning.perceptual)).to(device).eval()
    for p in [*tuned.parameters(), *net.parameters()]:
        p.requires_grad_(False)
    decoder = list(tuned.decode.parameters())
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.Adam(decoder, lr=tuning.lr)
    g = torch.Generator().manual_seed(tuning.seed)
    patch = tuned.cfg.patch_size
    size = crop_size(frames, tuning.crop, patch)
    side = size // patch  # the crops' side in tokens
    style = style.to(device).float()
    with torch.no_grad():
        feats_style = net.features(style_at(style, size))
    # Every frame's tokens once, as stylizing computes them. With the shift term each frame also comes moved by
    # (dy, dx) pixels, 1..patch-1 (its first dy rows and dx columns cut off): the same window of the two is the
    # picture moved against the patch grid, which is what a moving camera does.
    shift = tuning.weight_shift > 0 and patch > 1
    if shift and tuning.batch_size % 2:
        raise ValueError(f"weight_shift > 0 takes the crops in pairs: batch_size must be even, got {tuning.batch_size}")
    plain, moved, shifts = [], [], []
    for frame in frames:
        frame = enlarged(frame.to(device).float(), size + patch)
        plain.append(token_frame(tuned, frame, style, tuning.seed))
        if shift:
            dy, dx = (1 + torch.randint(patch - 1, (2,), generator=g)).tolist()
            moved.append(token_frame(tuned, frame[:, dy:, dx:], style, tuning.seed))
            shifts.append((dy, dx))
    n_windows = tuning.batch_size // 2 if shift else tuning.batch_size
    try:
        for step in range(tuning.steps):
            for group in opt.param_groups:
                group["lr"] = tuning.lr_min + 0.5 * (tuning.lr - tuning.lr_min) * (
                    1 + math.cos(math.pi * step / max(1, tuning.steps - 1)))
            tokens, content, pair_shifts = [], [], []
            for _ in range(n_windows):
                k = int(torch.randint(len(frames), (1,), generator=g))
                sources = [plain[k], moved[k]] if shift else [plain[k]]
                h = min(f.tokens.shape[0] for f in sources) - side + 1
                w = min(f.tokens.shape[1] for f in sources) - side + 1
                ty, tx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
                for source in sources:
                    t, c = token_window(source, ty, tx, side, patch)
                    tokens.append(t)
                    content.append(c)
                if shift:
                    pair_shifts.append(shifts[k])
            out = tuned.decode_tokens(torch.stack(tokens))
            content = torch.stack(content)
            f_out, f_content = net.features(out), net.features(content)
            n = len(tokens)
            loss = (tuning.weight_content * content_loss(f_out, f_content, net.content_taps)
                    + tuning.weight_style * weighted_style_loss(
                        f_out, [f.expand(n, *f.shape[1:]) for f in feats_style], tuning.style_tap_weights))
            if shift:
                loss = loss + tuning.weight_shift * sum(
                    shift_consistency_loss(out[2 * i:2 * i + 1], out[2 * i + 1:2 * i + 2], dy, dx)
                    for i, (dy, dx) in enumerate(pair_shifts)) / len(pair_shifts)
            if not torch.isfinite(loss):
                raise UserError(f"style tuning: the loss is not finite at step {step} (lr {tuning.lr} too high?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder, 1.0)
            opt.step()
            if progress is not None:
                progress(step, float(loss.detach()))
    finally:
        for p in decoder:
            p.requires_grad_(False)
    return tuned

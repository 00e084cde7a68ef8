"""Style tuning: the CNN decoder fine-tuned to one style on the frames it is about to stylize.

The bundled model is feed-forward: it has seen 247 styles, and on a painting it has not seen it carries the palette
and a little of the brushwork (held-out style distance 0.517; models/weights/MODEL_CARD.md). A clip is stylized
with one style for hundreds of frames, so a one-off fine-tune to that style pays: a hundred Adam steps of the
paper's content and style losses (models/losses.py) with that one style, on random crops of the clip's own frames,

    L = w_c·L_c(D'(Y_cs), I_c) + w_s·Σ_i w_i·L_s,i(D'(Y_cs), I_s)        only D' (the CNN decoder) trained

Only the CNN decoder (`model.decode`) moves; the encoders and the MSTD, whose tokens Y_cs it decodes, are the
model's own. Measured on 6 held-out styles x 13 photos at working size 512 (EfficientNet-Lite0 distances, not the
training net; untuned: style 0.550, content 1.492, the sigma=3 blur's content 1.565), 40 steps at a constant 1e-4 on
training photos: tuning the decoder carries as much style as tuning every weight (0.427 / 1.531 vs 0.428 / 1.523)
in half the time; tuning only the style side (style encoder, the MSTD's style projections) carries little (0.531).
Training's content weight (9.5) melts the structure (every weight tuned: 0.342 / 2.09). On the frames to be stylized, with the rate
falling along a cosine from 2e-4: content weight 40, 80 steps 0.417 / 1.484; 25, 100 steps 0.365 / 1.698; deep taps
weighted up (x2, x3) cost content faster than they buy style (0.351 / 1.877 at 32). The defaults sit between:
content weight 36, 100 steps.

The result is a whole model (a copy; the input model is untouched) meant for that one style: with other styles it
is a worse model. Deterministic: the crops, flips and style permutations come
from a private generator seeded by `StyleTuning.seed`, and the same inputs on the same machine and thread count
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
from models.losses import content_loss, weighted_style_loss
from models.mambast import MambaST, style_permutations
from models.perceptual import PerceptualNet, load_perceptual


@dataclass(frozen=True)
class StyleTuning:
    """How a model is tuned to one style; `steps` 0 is no tuning."""

    steps: int = 100
    lr: float = 2e-4               # Adam's rate at the first step, falling along a half cosine to lr_min at the last
    lr_min: float = 1e-5
    crop: int = 256                # square crops of the frames, as the model sees them (at the working size)
    batch_size: int = 2
    weight_content: float = 36.0
    weight_style: float = 12.0
    style_tap_weights: tuple[float, ...] = (100.0, 300.0, 300.0, 600.0, 4.0)  # the bundled recipes', per tap
    perceptual: str = "mobilenet_v2"  # the training network; evaluation uses another (EfficientNet-Lite0)
    seed: int = 0


MIN_CROP = 64  # the perceptual nets' deepest tap is /32: a 2x2 map at least, so that its channels have a spread


def crop_size(frames: Sequence[Tensor], crop: int, patch: int) -> int:
    """The crop side: `crop`, or the smallest frame side if smaller, a multiple of the patch, at least MIN_CROP
    (smaller frames are enlarged to it)."""
    smallest = min(min(f.shape[-2:]) for f in frames)
    return max(MIN_CROP, min(crop, smallest) // patch * patch)


def random_crops(frames: Sequence[Tensor], n: int, size: int, g: torch.Generator) -> Tensor:
    """n random (3, size, size) crops of random frames, each flipped left-right with probability 1/2.
    A frame smaller than `size` on a side is enlarged to it first (reflection would invent content)."""
    out = []
    for _ in range(n):
        frame = frames[int(torch.randint(len(frames), (1,), generator=g))]
        h, w = frame.shape[-2:]
        if min(h, w) < size:
            s = size / min(h, w)
            frame = F.interpolate(frame[None], size=(max(size, round(h * s)), max(size, round(w * s))),
                                  mode="bilinear", align_corners=False)[0]
            h, w = frame.shape[-2:]
        y = int(torch.randint(h - size + 1, (1,), generator=g))
        x = int(torch.randint(w - size + 1, (1,), generator=g))
        crop = frame[:, y:y + size, x:x + size]
        out.append(crop.flip(-1) if float(torch.rand(1, generator=g)) < 0.5 else crop)
    return torch.stack(out)


def style_at(style: Tensor, short: int) -> Tensor:
    """(1, 3, H, W) -> the same picture with its short side `short` (antialiased): the scale of the crops."""
    h, w = style.shape[-2:]
    s = short / min(h, w)
    return F.interpolate(style, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         antialias=True, align_corners=False)


def tune_to_style(model: MambaST, style: Tensor, frames: Sequence[Tensor], tuning: StyleTuning = StyleTuning(),
                  net: PerceptualNet | None = None, progress: Callable[[int, float], None] | None = None) -> MambaST:
    """A copy of `model` whose CNN decoder is tuned to `style` (1, 3, H, W) on crops of `frames`, each (3, H, W),
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
    size = crop_size(frames, tuning.crop, tuned.cfg.patch_size)
    style = style_at(style.to(device).float(), size)
    with torch.no_grad():
        feats_style = net.features(style)
    n, length = tuning.batch_size, (size // tuned.cfg.patch_size) ** 2
    try:
        for step in range(tuning.steps):
            for group in opt.param_groups:
                group["lr"] = tuning.lr_min + 0.5 * (tuning.lr - tuning.lr_min) * (
                    1 + math.cos(math.pi * step / max(1, tuning.steps - 1)))
            content = random_crops(frames, n, size, g).to(device)
            seed = int(torch.randint(2**31 - 1, (1,), generator=g))
            with torch.no_grad():  # the encoders and the MSTD stay as they are: no graph through them
                tokens = tuned.mstd_tokens(content, style.expand(n, -1, -1, -1),
                                           perms=style_permutations(tuned.cfg.n_decoder_layers, length, seed))
            out = tuned.decode_tokens(tokens)
            f_out, f_content = net.features(out), net.features(content)
            loss = (tuning.weight_content * content_loss(f_out, f_content, net.content_taps)
                    + tuning.weight_style * weighted_style_loss(
                        f_out, [f.expand(n, *f.shape[1:]) for f in feats_style], tuning.style_tap_weights))
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

"""The paper's image metrics (docs/mamba-st.md §4.2): FID, LPIPS, ArtFID and CFSD, on weight files the user supplies.

No installable package ships the networks behind these metrics (docs/assets.md §1.1, §2), and nothing is downloaded
here. Each network is defined below with the module names of its published weight file, and
`load_paper_metric_nets` checks a file strictly against that layout (keys and shapes) before loading it.

* FID: Inception-v3's 2048-d pooled features. `--inception`: `art_inception.pth` (the paper's) or pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth`.
* LPIPS: AlexNet `features` plus lpips' linear layers. `--alexnet`: torchvision's `alexnet-owt-7be5be79.pth`;
  `--lpips`: lpips 0.1.4's `weights/v0.1/alex.pth`.
* CFSD: VGG-19 `features[:12]`, up to relu3_1. `--vgg19`: torchvision's `vgg19-dcbb9e9d.pth`.

ArtFID = (1 + LPIPS) · (1 + FID).

Two Inception-v3 files, one key layout. Both use torchvision's module names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.conv.weight`, ..., BatchNorm eps 1e-3). They differ in their heads, which the loader uses to tell
them apart, and in their forward pass:

* pytorch-fid (`fc.weight` 1008×2048): the TF-ported FID Inception. Images are resized to 299×299 (bilinear) and
  scaled to [-1, 1]. The average pools in Mixed_5b..7b leave out the padding, and Mixed_7c max-pools
  (pytorch-fid's FIDInceptionA/C/E_1/E_2). ImageNet features, so these FIDs are not the paper's.
* ArtInception (`fc1.*`/`fc2.*` heads, optional `AuxLogits1/2.*`): Wright & Ommer's Inception trained on art, the
  network behind the paper's FID. Its code (art-fid 0.0.2 `inception.py`, copied into StyleID's evaluation) uses
  plain torchvision blocks: the pools count the padding and Mixed_7c average-pools. The image goes in unchanged, as
  RGB in [0, 1] with no resize and no normalisation. The protocol resizes the short side to 512 before that, so
  pass 512-px images for comparable numbers. Inputs need at least 75 px.
  Assumption: `art_inception.pth` is a flat state dict in that layout. We read the layout from art-fid's code but
  have not seen the file, and art-fid loads it with `strict=False`, which would hide any mismatch. If the
  assumption is wrong, the strict check here names the first missing or unexpected key.

Protocol notes (the values depend on them; see §4.2):
* FID compares the stylised images with the style images, each style repeated once per content (800 vs 800 in the
  paper, where FID∞ equals the plain FID).
* LPIPS is the mean over (stylised, content) pairs. The protocol resizes the short side to 512 first.
* CFSD is KL(S_content ‖ S_stylised) between the patch self-similarity matrices S = softmax_row(F Fᵀ) of the
  relu3_1 features F (hw × c, divided by c), for each pair. It is summed over the hw rows, as StyleID's
  `F.kl_div(..., reduction='batchmean')` on a flattened batch of one does, so it grows with the image size. The
  reported value is the mean over pairs. VGG sees the images at their own size.

Images are B×3×H×W RGB in [0, 1] throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import UserError
from models.perceptual import read_state_dict

INCEPTION_KINDS = ("art_inception", "pytorch_fid")

# Where each file comes from, for the error messages.
SOURCES = {
    "inception": "the paper's ArtInception, https://huggingface.co/matthias-wright/art_inception/resolve/main/"
                 "art_inception.pth, or pytorch-fid's https://github.com/mseitzer/pytorch-fid/releases/download/"
                 "fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "alexnet": "torchvision's AlexNet, https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "lpips_lin": "lpips 0.1.4's linear layers, lpips/weights/v0.1/alex.pth inside the wheel from "
                 "`pip download --no-deps lpips==0.1.4`",
    "vgg19": "torchvision's VGG-19, https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}


class _FrozenNet(nn.Module):
    """A metric network: always in eval mode (BatchNorm running stats, no dropout)."""

    def train(self, mode: bool = True) -> _FrozenNet:
        return super().train(False)


def _check_images(x: Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected B×3×H×W RGB, got shape {tuple(x.shape)}")


def _batches(x: Tensor, batch_size: int, net: nn.Module):
    device = next(net.parameters()).device
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size].to(device, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a×D and N_b×D, N ≥ 2 each).

    d² = ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb), in float64, with unbiased covariances as in pytorch-fid.
    """
    a, b = (np.asarray(f.detach().cpu() if isinstance(f, Tensor) else f, dtype=np.float64)
            for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two N×D feature sets with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    diff = a.mean(axis=0) - b.mean(axis=0)
    ca = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)  # N_a×D, so that Σa = caᵀ ca
    cb = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)
    return float(diff @ diff + (ca ** 2).sum() + (cb ** 2).sum() - 2 * _trace_sqrt_product(ca, cb))


def _trace_sqrt_product(ca: np.ndarray, cb: np.ndarray) -> float:
    """tr √(Σa Σb) for Σa = caᵀ ca and Σb = cbᵀ cb, through symmetric eigen- and singular-value decompositions.

    The reference code takes scipy's `sqrtm` of the non-symmetric product Σa Σb and drops the imaginary round-off.
    Here the result is real by construction:
    * Σa Σb has the same non-zero eigenvalues as (ca cbᵀ)(ca cbᵀ)ᵀ, so tr √(Σa Σb) is the sum of the singular
      values of ca cbᵀ (N_a×N_b). Use this when the sets are no larger than D (800 images vs 2048-d in the paper).
      It is cheap, and exact for the rank-deficient covariances of N < D.
    * Otherwise the same eigenvalues come from the symmetric PSD matrix √Σa Σb √Σa (D×D), via `eigh`, with
      round-off negatives clipped to 0.
    """
    if min(len(ca), len(cb)) <= ca.shape[1]:
        return float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    w, v = np.linalg.eigh(ca.T @ ca)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ (cb.T @ cb) @ sqrt_a
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


# ---------------------------------------------------------------------------------------------------------
# Inception-v3 (torchvision key layout; the pytorch-fid and ArtInception forwards, see the module docstring)


class _BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys `conv.weight`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3(x: Tensor, pool: str) -> Tensor:
    """The 3×3 stride-1 pool in front of a block's `branch_pool` conv."""
    if pool == "avg":  # torchvision (ArtInception): the zero padding counts in the average
        return F.avg_pool2d(x, 3, 1, 1)
    if pool == "avg_tf":  # TensorFlow (pytorch-fid): the padding does not count
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return F.max_pool2d(x, 3, 1, 1)  # pytorch-fid's Mixed_7c (FIDInceptionE_2)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = _BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = _BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool_3x3(x, self.pool)),
        ], dim=1)


class _InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, 2),
        ], dim=1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = _BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_pool_3x3(x, self.pool)),
        ], dim=1)


class _InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = _BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], dim=1)


class _InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = _BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(_pool_3x3(x, self.pool)),
        ], dim=1)


class InceptionV3(_FrozenNet):
    """Inception-v3 up to the 2048-d global average pool; `kind` is "art_inception" or "pytorch_fid".

    The modules are those of the weight files without their classifier heads (which the features do not use).
    """

    MIN_SIZE = 75  # the smallest input that the three stride-2 reductions leave at least 1×1

    def __init__(self, kind: str):
        super().__init__()
        if kind not in INCEPTION_KINDS:
            raise ValueError(f"unknown Inception kind {kind!r} (choose from {', '.join(INCEPTION_KINDS)})")
        self.kind = kind
        avg = "avg_tf" if kind == "pytorch_fid" else "avg"
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32, pool=avg)
        self.Mixed_5c = _InceptionA(256, pool_features=64, pool=avg)
        self.Mixed_5d = _InceptionA(288, pool_features=64, pool=avg)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, c7=128, pool=avg)
        self.Mixed_6c = _InceptionC(768, c7=160, pool=avg)
        self.Mixed_6d = _InceptionC(768, c7=160, pool=avg)
        self.Mixed_6e = _InceptionC(768, c7=192, pool=avg)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool=avg)
        self.Mixed_7c = _InceptionE(2048, pool="max" if kind == "pytorch_fid" else "avg")

    def forward(self, x: Tensor) -> Tensor:
        """x: B×3×H×W RGB in [0, 1] -> B×2048 pooled features."""
        _check_images(x, "inception input")
        if self.kind == "pytorch_fid":
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
        elif min(x.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(f"ArtInception sees images at their own size and needs at least {self.MIN_SIZE} px, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # B×64×147×147 (sizes for 299 input)
        x = F.max_pool2d(x, 3, 2)                                           # B×64×73×73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # B×192×71×71
        x = F.max_pool2d(x, 3, 2)                                           # B×192×35×35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                  # B×288×35×35
        x = self.Mixed_6a(x)                                                # B×768×17×17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))   # B×768×17×17
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                  # B×2048×8×8
        return x.mean(dim=(2, 3))                                           # B×2048


@torch.no_grad()
def inception_features(images: Tensor, inception: InceptionV3, batch_size: int = 16) -> Tensor:
    """N×3×H×W RGB in [0, 1] -> N×2048 features (CPU, float32)."""
    _check_images(images, "images")
    return torch.cat([inception(batch).cpu() for batch in _batches(images, batch_size, inception)])


def fid(images_a: Tensor, images_b: Tensor, inception: InceptionV3, batch_size: int = 16) -> float:
    """FID between two image sets (N ≥ 2 each; their sizes may differ)."""
    return frechet_distance(inception_features(images_a, inception, batch_size),
                            inception_features(images_b, inception, batch_size))


# ---------------------------------------------------------------------------------------------------------
# LPIPS (lpips 0.1.4, net='alex', version 0.1): torchvision AlexNet features + lpips' linear calibration


class _NetLin(nn.Module):
    """lpips' NetLinLayer: dropout (identity in eval) then a 1×1 conv to one channel; key `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class AlexNetLPIPS(_FrozenNet):
    """LPIPS-Alex. Keys: `features.{0,3,6,8,10}.*` (torchvision's alexnet().features) and `lin{0..4}.model.1.weight`."""

    TAPS = (1, 4, 7, 9, 11)  # relu1..relu5 in torchvision's alexnet().features
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(  # torchvision's alexnet().features[:12] (the final max-pool is not needed)
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        for i, channels in enumerate(self.CHANNELS):
            setattr(self, f"lin{i}", _NetLin(channels))
        # lpips' ScalingLayer, applied to the [-1, 1] input
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: Tensor) -> list[Tensor]:
        """x: B×3×H×W RGB in [0, 1] -> the five ReLU activations, each unit-normalised over channels."""
        x = ((2 * x - 1) - self.shift) / self.scale
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                feats.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Two B×3×H×W batches in [0, 1] -> B distances."""
        dist = 0
        for i, (fx, fy) in enumerate(zip(self.taps(x), self.taps(y))):
            dist = dist + getattr(self, f"lin{i}")((fx - fy) ** 2).mean(dim=(1, 2, 3))  # spatial average
        return dist


@torch.no_grad()
def lpips_distance(x: Tensor, y: Tensor, alexnet_lpips: AlexNetLPIPS, batch_size: int = 16) -> Tensor:
    """LPIPS between the pairs (x[i], y[i]): N×3×H×W RGB in [0, 1] each -> N distances (CPU)."""
    _check_images(x, "x")
    if x.shape != y.shape:
        raise ValueError(f"LPIPS compares pairs of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    pairs = zip(_batches(x, batch_size, alexnet_lpips), _batches(y, batch_size, alexnet_lpips))
    return torch.cat([alexnet_lpips(bx, by).cpu() for bx, by in pairs])


def art_fid(fid: float, lpips: float) -> float:
    """ArtFID = (1 + LPIPS) · (1 + FID) (Wright & Ommer 2022)."""
    return (1 + float(lpips)) * (1 + float(fid))


# ---------------------------------------------------------------------------------------------------------
# CFSD: VGG-19 relu3_1 patch self-similarity


_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def _vgg19_features(n_layers: int | None = None) -> nn.Sequential:
    """torchvision's vgg19().features (37 modules, convs at 0, 2, 5, 7, 10, 12, ...), or its first n_layers."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19_CFG:
        if n_layers is not None and len(layers) >= n_layers:
            break
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers[:n_layers])


class VGG19Relu31(_FrozenNet):
    """VGG-19 up to relu3_1 (torchvision `features[:12]`, keys `features.{0,2,5,7,10}.*`), ImageNet mean/std."""

    RELU3_1 = 11

    def __init__(self):
        super().__init__()
        self.features = _vgg19_features(self.RELU3_1 + 1)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """B×3×H×W RGB in [0, 1] -> B×256×H/4×W/4 relu3_1 features."""
        return self.features((x - self.mean) / self.std)


def _self_similarity_kl(content: Tensor, stylized: Tensor, chunk: int) -> Tensor:
    """Σ over rows of KL(S_c[row] ‖ S_s[row]) for one pair of C×H×W feature maps.

    Rows come `chunk` at a time, so the hw×hw matrices (16384² at 512 px) never exist in full. The similarities
    are float32 products, as in the reference; the softmax and the KL run in float64, because in float32 their
    round-off reaches about 1 % of the value when the two images are close.
    """
    c = content.shape[0]
    fc = content.flatten(1).T / c  # hw×C
    fs = stylized.flatten(1).T / c
    total = torch.zeros((), dtype=torch.float64, device=content.device)
    for start in range(0, fc.shape[0], chunk):
        log_p = F.log_softmax((fc[start:start + chunk] @ fc.T).double(), dim=-1)  # rows of S_content, chunk×hw
        log_q = F.log_softmax((fs[start:start + chunk] @ fs.T).double(), dim=-1)  # rows of S_stylised
        total += F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    return total


@torch.no_grad()
def cfsd(content: Tensor, stylized: Tensor, vgg: VGG19Relu31, batch_size: int = 4, chunk: int = 1024) -> Tensor:
    """CFSD for the pairs (content[i], stylized[i]): N×3×H×W RGB in [0, 1] each -> N values (CPU, float64)."""
    _check_images(content, "content")
    if content.shape != stylized.shape:
        raise ValueError(f"CFSD compares pairs of equal shape, got {tuple(content.shape)} and {tuple(stylized.shape)}")
    values = []
    for bc, bs in zip(_batches(content, batch_size, vgg), _batches(stylized, batch_size, vgg)):
        fc, fs = vgg(bc), vgg(bs)
        values += [_self_similarity_kl(fc[i], fs[i], chunk).cpu() for i in range(len(fc))]
    return torch.stack(values)


# ---------------------------------------------------------------------------------------------------------
# Loading the user's weight files


@dataclass
class PaperMetricNets:
    """The loaded networks; None where the user gave no file, and the metrics that need it are skipped."""

    inception: InceptionV3 | None = None
    lpips: AlexNetLPIPS | None = None
    vgg: VGG19Relu31 | None = None


def load_paper_metric_nets(inception=None, alexnet=None, lpips_lin=None, vgg19=None, *,
                           inception_kind: str = "auto") -> PaperMetricNets:
    """Load and strictly check the given weight files (paths; any may be None).

    LPIPS needs both `alexnet` and `lpips_lin`. `inception_kind` "auto" tells the two Inception files apart by their
    heads; pass "art_inception" or "pytorch_fid" for a file that has none. Every problem with a file is a one-line
    `UserError` naming the file, the problem and where the file comes from.
    """
    nets = PaperMetricNets()
    if inception is not None:
        nets.inception = _load_inception(Path(inception), inception_kind)
    if (alexnet is None) != (lpips_lin is None):
        given, other = (alexnet, "lpips_lin") if alexnet is not None else (lpips_lin, "alexnet")
        raise UserError(f"{given}: LPIPS needs both the AlexNet weights and lpips' linear layers; "
                        f"also give {SOURCES[other]}")
    if alexnet is not None:
        nets.lpips = _load_lpips(Path(alexnet), Path(lpips_lin))
    if vgg19 is not None:
        nets.vgg = _load_vgg19(Path(vgg19))
    return nets


def _read(path: Path, source: str) -> dict[str, Tensor]:
    """The file's state dict (safetensors, or torch.load with weights_only=True), or a UserError with the source."""
    try:
        return read_state_dict(path)
    except UserError as e:
        raise UserError(f"{e} (expected {SOURCES[source]})") from None


def _check_layout(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], path: Path, source: str, *,
                  optional: dict[str, tuple[int, ...]] | None = None, ignored: tuple[str, ...] = ()) -> dict:
    """Strict key/shape check; returns the tensors of the `expected` keys.

    `optional` keys (parts of the full file that the metric does not use) may be absent but must have the right
    shape; keys under the `ignored` prefixes (classifier heads, whose size depends on the training) are skipped.
    BatchNorm's `num_batches_tracked` may be absent, as in files saved before PyTorch 0.4.1.
    """
    optional = optional or {}
    hint = f"expected {SOURCES[source]}"
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} key(s), e.g. {missing[0]!r}: not the right file ({hint})")
    unexpected = [k for k in state if k not in expected and k not in optional and not k.startswith(ignored)]
    if unexpected:
        raise UserError(f"{path}: {len(unexpected)} unexpected key(s), e.g. {unexpected[0]!r}: not the right file "
                        f"({hint})")
    for k, v in state.items():
        shape = expected.get(k, optional.get(k))
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise UserError(f"{path}: {k!r} has shape {tuple(v.shape)}, expected {tuple(shape)} ({hint})")
        if k in expected and v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: {k!r} contains NaN or infinite values ({hint})")
    return {k: state[k] for k in expected if k in state}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _load_into(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Strict load; `num_batches_tracked` (unused in eval) keeps the module's own value where the file lacks it."""
    own = {k: v for k, v in module.state_dict().items() if k.endswith("num_batches_tracked")}
    module.load_state_dict({**own, **tensors}, strict=True)
    module.eval().requires_grad_(False)


_INCEPTION_HEADS = {"pytorch_fid": ("fc.",), "art_inception": ("fc1.", "fc2.", "AuxLogits1.", "AuxLogits2.")}


def _load_inception(path: Path, kind: str) -> InceptionV3:
    state = _read(path, "inception")
    if kind == "auto":
        kind = _inception_kind(state, path)
    elif kind not in INCEPTION_KINDS:
        raise UserError(f"{path}: unknown Inception kind {kind!r} (choose from auto, {', '.join(INCEPTION_KINDS)})")
    if kind == "pytorch_fid" and "fc.weight" in state and tuple(state["fc.weight"].shape) != (1008, 2048):
        raise UserError(f"{path}: 'fc.weight' has shape {tuple(state['fc.weight'].shape)}, pytorch-fid's has "
                        f"(1008, 2048) (expected {SOURCES['inception']})")
    net = InceptionV3(kind)
    _load_into(net, _check_layout(state, _shapes(net), path, "inception", ignored=_INCEPTION_HEADS[kind]))
    return net


def _inception_kind(state: dict[str, Tensor], path: Path) -> str:
    if "fc1.weight" in state or "fc2.weight" in state:
        return "art_inception"
    if "fc.weight" in state:
        return "pytorch_fid"
    raise UserError(f"{path}: cannot tell which Inception-v3 this is: it has neither pytorch-fid's head 'fc.weight' "
                    f"nor ArtInception's 'fc1.weight' (expected {SOURCES['inception']})")


def _load_lpips(alexnet: Path, lpips_lin: Path) -> AlexNetLPIPS:
    net = AlexNetLPIPS()
    shapes = _shapes(net)
    features = _check_layout(_read(alexnet, "alexnet"), {k: s for k, s in shapes.items() if k.startswith("features.")},
                             alexnet, "alexnet", ignored=("classifier.",))
    lins = _check_layout(_read(lpips_lin, "lpips_lin"), {k: s for k, s in shapes.items() if k.startswith("lin")},
                         lpips_lin, "lpips_lin")
    _load_into(net, {**features, **lins})
    return net


def _load_vgg19(path: Path) -> VGG19Relu31:
    net = VGG19Relu31()
    with torch.device("meta"):  # the full features' shapes, without allocating its 20M weights
        full = _shapes(nn.ModuleDict({"features": _vgg19_features()}))
    used = _shapes(net)
    rest = {k: s for k, s in full.items() if k not in used}  # features.12.* .. features.34.*: unused by CFSD
    _load_into(net, _check_layout(_read(path, "vgg19"), used, path, "vgg19", optional=rest, ignored=("classifier.",)))
    return net


# ---------------------------------------------------------------------------------------------------------
# All together


def paper_metrics(contents: Tensor, styles: Tensor, outputs: Tensor, nets: PaperMetricNets,
                  batch_size: int = 8) -> dict:
    """The paper's metrics for the stylised `outputs`, each where its networks are loaded.

    contents, outputs: N×3×H×W RGB in [0, 1], pair i = (contents[i], outputs[i]). styles: M×3×H'×W', the style set
    for FID (the protocol repeats each style once per content, so M = N).

    Returns a JSON-ready dict: `fid` (outputs vs styles) and `fid_inception` (which Inception: only
    "art_inception" gives the paper's FID), `lpips` (mean over the pairs), `art_fid` (when both are there), and
    `cfsd` (mean over the pairs).
    """
    for name, x in (("contents", contents), ("styles", styles), ("outputs", outputs)):
        _check_images(x, name)
    if contents.shape != outputs.shape:
        raise ValueError(f"contents {tuple(contents.shape)} and outputs {tuple(outputs.shape)} must pair up")
    result: dict = {}
    if nets.inception is not None:
        if len(outputs) < 2 or len(styles) < 2:
            raise UserError(f"FID needs at least 2 stylised and 2 style images, got {len(outputs)} and "
                            f"{len(styles)}: evaluate more content/style pairs")
        result["fid"] = fid(outputs, styles, nets.inception, batch_size)
        result["fid_inception"] = nets.inception.kind
    if nets.lpips is not None:
        result["lpips"] = float(lpips_distance(outputs, contents, nets.lpips, batch_size).mean())
    if "fid" in result and "lpips" in result:
        result["art_fid"] = art_fid(result["fid"], result["lpips"])
    if nets.vgg is not None:
        result["cfsd"] = float(cfsd(contents, outputs, nets.vgg, batch_size).mean())
    return result

"""The networks behind the paper's image metrics (models/paper_metrics.py), in the key layouts of their weight files.

* `InceptionV3` (FID): torchvision's module names, with the pytorch-fid or the ArtInception forward pass;
* `AlexNetLPIPS` (LPIPS): torchvision's `alexnet().features` plus lpips 0.1.4's linear layers;
* `VGG19Relu31` (CFSD): torchvision's `vgg19().features[:12]`, up to relu3_1.

Each is a frozen module (always in eval mode) whose `state_dict` keys and shapes are those of the published file,
so models/paper_metrics.py can check a user's file strictly against a freshly built net before loading it.
Images are B×3×H×W RGB in [0, 1] throughout.

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
  assumption is wrong, the strict check in models/paper_metrics.py names the first missing or unexpected key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_KINDS = ("art_inception", "pytorch_fid")


class _FrozenNet(nn.Module):
    """A metric network: always in eval mode (BatchNorm running stats, no dropout)."""

    def train(self, mode: bool = True) -> _FrozenNet:
        return super().train(False)


def check_images(x: Tensor, name: str) -> None:
    """A ValueError naming `name` unless x is a B×3×H×W batch."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected B×3×H×W RGB, got shape {tuple(x.shape)}")


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
        check_images(x, "inception input")
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


# ---------------------------------------------------------------------------------------------------------
# VGG-19 up to relu3_1 (CFSD)


VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg19_features(n_layers: int | None = None) -> nn.Sequential:
    """torchvision's vgg19().features (37 modules, convs at 0, 2, 5, 7, 10, 12, ...), or its first n_layers."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG19_CFG:
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
        self.features = vgg19_features(self.RELU3_1 + 1)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """B×3×H×W RGB in [0, 1] -> B×256×H/4×W/4 relu3_1 features."""
        return self.features((x - self.mean) / self.std)

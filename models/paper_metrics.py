"""The paper's image metrics (docs/mamba-st.md §4.2): FID, LPIPS, ArtFID and CFSD, on weight files the user supplies.

No installable package ships the networks behind these metrics (docs/assets.md §1.1, §2), and nothing is downloaded
here. Each network is defined in models/paper_metric_nets.py with the module names of its published weight file,
and `load_paper_metric_nets` checks a file strictly against that layout (keys and shapes) before loading it.

* FID: Inception-v3's 2048-d pooled features. `--inception`: `art_inception.pth` (the paper's) or pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth`.
* LPIPS: AlexNet `features` plus lpips' linear layers. `--alexnet`: torchvision's `alexnet-owt-7be5be79.pth`;
  `--lpips`: lpips 0.1.4's `weights/v0.1/alex.pth`.
* CFSD: VGG-19 `features[:12]`, up to relu3_1. `--vgg19`: torchvision's `vgg19-dcbb9e9d.pth`.

ArtFID = (1 + LPIPS) · (1 + FID).

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
from models.paper_metric_nets import (INCEPTION_KINDS, AlexNetLPIPS, InceptionV3, VGG19Relu31, check_images,
                                      vgg19_features)
from models.perceptual import read_state_dict

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


def _batches(x: Tensor, batch_size: int, net: nn.Module):
    device = next(net.parameters()).device
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size].to(device, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# FID: the Fréchet distance between Inception-v3 features


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


@torch.no_grad()
def inception_features(images: Tensor, inception: InceptionV3, batch_size: int = 16) -> Tensor:
    """N×3×H×W RGB in [0, 1] -> N×2048 features (CPU, float32)."""
    check_images(images, "images")
    return torch.cat([inception(batch).cpu() for batch in _batches(images, batch_size, inception)])


def fid(images_a: Tensor, images_b: Tensor, inception: InceptionV3, batch_size: int = 16) -> float:
    """FID between two image sets (N ≥ 2 each; their sizes may differ)."""
    return frechet_distance(inception_features(images_a, inception, batch_size),
                            inception_features(images_b, inception, batch_size))


# ---------------------------------------------------------------------------------------------------------
# LPIPS (lpips 0.1.4, net='alex', version 0.1) and ArtFID


@torch.no_grad()
def lpips_distance(x: Tensor, y: Tensor, alexnet_lpips: AlexNetLPIPS, batch_size: int = 16) -> Tensor:
    """LPIPS between the pairs (x[i], y[i]): N×3×H×W RGB in [0, 1] each -> N distances (CPU)."""
    check_images(x, "x")
    if x.shape != y.shape:
        raise ValueError(f"LPIPS compares pairs of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    pairs = zip(_batches(x, batch_size, alexnet_lpips), _batches(y, batch_size, alexnet_lpips))
    return torch.cat([alexnet_lpips(bx, by).cpu() for bx, by in pairs])


def art_fid(fid: float, lpips: float) -> float:
    """ArtFID = (1 + LPIPS) · (1 + FID) (Wright & Ommer 2022)."""
    return (1 + float(lpips)) * (1 + float(fid))


# ---------------------------------------------------------------------------------------------------------
# CFSD: VGG-19 relu3_1 patch self-similarity


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
    check_images(content, "content")
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
        full = _shapes(nn.ModuleDict({"features": vgg19_features()}))
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
        check_images(x, name)
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

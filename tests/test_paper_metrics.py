"""The paper's metrics (models/paper_metrics.py) on random-weight networks (models/paper_metric_nets.py) saved in
the published key layouts.

No real Inception/AlexNet/VGG weights exist here (docs/assets.md §1.1, §2). So each network gets random weights,
goes through torch.save and the strict loader, and is checked on tiny random images.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.paper_metric_nets import AlexNetLPIPS, InceptionV3, VGG19Relu31
from models.paper_metrics import (PaperMetricNets, art_fid, cfsd, fid, frechet_distance, inception_features,
                                  load_paper_metric_nets, lpips_distance, paper_metrics)


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random weights that keep activations O(1) through the depth, and random BatchNorm statistics (so a load
    that dropped them would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save(state: dict, path):
    torch.save(state, path)
    return path


def heads(name: str, classes: int) -> dict:
    return {f"{name}.weight": torch.zeros(classes, 2048), f"{name}.bias": torch.zeros(classes)}


# ---------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(16)
    shift[3] = 1.0
    for n in (40, 5):  # full-rank covariance, and rank-deficient (N < D) as with a few images' 2048-d features
        a = torch.randn(n, 16, generator=g) @ torch.randn(16, 16, generator=g)
        assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
        # same covariance: the distance is ‖Δμ‖²
        assert [frechet_distance(a, a + t * shift) for t in (0.5, 1, 2)] == pytest.approx([0.25, 1, 4], rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


@pytest.mark.parametrize("n_a, n_b", [(60, 50), (6, 5)])  # more samples than dimensions, and fewer
def test_frechet_distance_matches_the_scipy_sqrtm_formula(n_a, n_b):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n_a, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(n_b, 8)) * 1.5 + 0.3
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b) - 2 * np.trace(linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Inception-v3: one set of random weights, saved with each file's head


@pytest.fixture(scope="module")
def inception_state():
    return randomise(InceptionV3("art_inception"), seed=0).state_dict()  # the two kinds share the key layout


@pytest.fixture(scope="module")
def art_inception(inception_state, tmp_path_factory):
    state = {**inception_state, **heads("fc1", 7), **heads("fc2", 3)}
    return load_paper_metric_nets(inception=save(state, tmp_path_factory.mktemp("w") / "art_inception.pth")).inception


def assert_loaded(net: nn.Module, state: dict) -> None:
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith(("fc.", "fc1.", "fc2.")))


def test_pytorch_fid_inception_loads_and_gives_2048_features(inception_state, tmp_path):
    state = {**inception_state, **heads("fc", 1008)}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as in pre-0.4.1 files
    net = load_paper_metric_nets(inception=save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")).inception
    assert net.kind == "pytorch_fid" and not net.training
    assert_loaded(net, state)
    feats = inception_features(images(2, 64, seed=1), net)  # resized to 299 inside
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.std() > 0
    assert frechet_distance(feats, feats) == pytest.approx(0, abs=1e-6)


def test_art_inception_sees_images_at_their_own_size(art_inception, inception_state):
    assert art_inception.kind == "art_inception"
    assert_loaded(art_inception, inception_state)
    x, y = images(3, 80, seed=1), images(3, 80, seed=2)
    assert inception_features(x, art_inception).shape == (3, 2048)
    assert fid(x, x, art_inception) == pytest.approx(0, abs=1e-6)
    assert fid(x, y.clamp(0.5, 1), art_inception) > 1e-3
    with pytest.raises(ValueError, match="75"):
        art_inception(images(1, 64, seed=3))


# ---------------------------------------------------------------------------------------------------------
# LPIPS and CFSD


@pytest.fixture(scope="module")
def lpips_nets(tmp_path_factory):
    """(in-memory net, the same weights through the two files and the loader)."""
    net = randomise(AlexNetLPIPS(), seed=1)
    with torch.no_grad():
        for i in range(5):  # lpips' calibration weights are non-negative
            getattr(net, f"lin{i}").model[1].weight.abs_()
    state = net.state_dict()
    d = tmp_path_factory.mktemp("w")
    alexnet = save({**{k: v for k, v in state.items() if k.startswith("features.")},
                    "classifier.6.bias": torch.zeros(1000)},  # a full torchvision file also has the classifier
                   d / "alexnet-owt-7be5be79.pth")
    lins = save({k: v for k, v in state.items() if k.startswith("lin")}, d / "alex.pth")
    return net, load_paper_metric_nets(alexnet=alexnet, lpips_lin=lins).lpips


def test_lpips_is_zero_for_identical_images_and_symmetric(lpips_nets):
    net, loaded = lpips_nets
    x, y = images(3, 64, seed=1), images(3, 64, seed=2)
    d = lpips_distance(x, y, loaded)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(d, net(x, y))
    assert torch.equal(lpips_distance(x, x, loaded), torch.zeros(3))
    torch.testing.assert_close(lpips_distance(y, x, loaded), d)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    state = randomise(VGG19Relu31(), seed=2).state_dict()
    state["features.12.weight"] = torch.zeros(256, 256, 3, 3)  # deeper layers of a full file are accepted, unused
    return load_paper_metric_nets(vgg19=save(state, tmp_path_factory.mktemp("w") / "vgg19-dcbb9e9d.pth")).vgg


def reference_cfsd(content: torch.Tensor, stylized: torch.Tensor, vgg: VGG19Relu31) -> list[float]:
    """StyleID's PatchSimi (image_metrics.py), batch 1, full hw×hw matrices, in float64."""
    def self_similarity(feat, log):
        b, c, h, w = feat.shape
        f = feat.double().transpose(1, 3).reshape(b, h * w, c) / c
        s = f @ f.transpose(1, 2)
        return (F.log_softmax(s, -1) if log else F.softmax(s, -1)).reshape(b, -1)

    with torch.no_grad():
        fc, fs = vgg(content), vgg(stylized)
        return [F.kl_div(self_similarity(fs[i:i + 1], True), self_similarity(fc[i:i + 1], False),
                         reduction="batchmean").item() for i in range(len(fc))]


def test_cfsd_is_zero_for_identical_images_and_matches_the_reference(vgg):
    c, s = images(2, 40, seed=1), images(2, 40, seed=2) ** 2
    assert cfsd(c, c, vgg).abs().max() < 1e-12
    values = cfsd(c, s, vgg, chunk=7)  # 100 rows of relu3_1 positions, 7 at a time
    assert values.shape == (2,) and (values > 0).all()
    assert values.tolist() == pytest.approx(reference_cfsd(c, s, vgg), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# ArtFID and the combined call


def test_art_fid_formula():
    assert art_fid(2.0, 0.5) == 4.5
    assert art_fid(0.0, 0.0) == 1.0


def test_paper_metrics_computes_what_its_nets_allow(art_inception, lpips_nets, vgg):
    contents, styles, outputs = images(3, 80, seed=1), images(3, 80, seed=2), images(3, 80, seed=3)
    everything = paper_metrics(contents, styles, outputs, PaperMetricNets(art_inception, lpips_nets[1], vgg))
    assert set(everything) == {"fid", "fid_inception", "lpips", "art_fid", "cfsd"}
    assert everything["fid_inception"] == "art_inception"
    assert everything["art_fid"] == pytest.approx((1 + everything["lpips"]) * (1 + everything["fid"]))
    assert everything["lpips"] == pytest.approx(lpips_distance(outputs, contents, lpips_nets[1]).mean().item())

    assert set(paper_metrics(contents, styles, outputs, PaperMetricNets(vgg=vgg))) == {"cfsd"}
    assert set(paper_metrics(contents, styles, outputs, PaperMetricNets(lpips=lpips_nets[1]))) == {"lpips"}
    assert paper_metrics(contents, styles, outputs, PaperMetricNets()) == {}
    with pytest.raises(UserError, match="at least 2"):
        paper_metrics(contents[:1], styles[:1], outputs[:1], PaperMetricNets(inception=art_inception))


# ---------------------------------------------------------------------------------------------------------
# Bad files: one line naming the file, the problem and where the file comes from


def vgg_state() -> dict:
    return VGG19Relu31().state_dict()


BAD_FILES = {
    "missing file": (None, "vgg19", "not found"),
    "not a checkpoint": (b"definitely not a checkpoint", "vgg19", "cannot read"),
    "pickled module": (nn.Linear(2, 2), "vgg19", "cannot read"),
    "not tensors": ({"features.0.weight": torch.zeros(1), "epoch": 3}, "vgg19", "not a state dict of tensors"),
    "missing key": ({k: v for k, v in vgg_state().items() if k != "features.10.bias"}, "vgg19", "'features.10.bias'"),
    "wrong shape": ({**vgg_state(), "features.0.weight": torch.zeros(64, 3, 5, 5)}, "vgg19", "shape"),
    "unexpected key": ({**vgg_state(), "head.weight": torch.zeros(1)}, "vgg19", "unexpected key"),
    "not finite": ({**vgg_state(), "features.0.bias": torch.full((64,), float("nan"))}, "vgg19", "NaN"),
    "headless inception": ({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, "inception", "cannot tell"),
    "torchvision inception": ({"fc.weight": torch.zeros(1000, 2048)}, "inception", "1008"),
    "lpips layers for vgg": ({f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1)
                              for i, c in enumerate((64, 128, 256, 512, 512))}, "lpips_lin", "'lin1.model.1.weight'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_weight_files_give_one_line_user_errors(case, tmp_path):
    content, flag, problem = BAD_FILES[case]
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    kwargs = {flag: path}
    if flag == "lpips_lin":
        kwargs["alexnet"] = save({k: v for k, v in AlexNetLPIPS().state_dict().items() if k.startswith("features.")},
                                 tmp_path / "alexnet.pth")
    with pytest.raises(UserError) as e:
        load_paper_metric_nets(**kwargs)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)) and problem in message
    assert "expected" in message and ("https://" in message or "pip download" in message)


def test_lpips_needs_both_files(tmp_path):
    with pytest.raises(UserError, match="alexnet.pth: LPIPS needs both .*lpips"):
        load_paper_metric_nets(alexnet=tmp_path / "alexnet.pth")
    with pytest.raises(UserError, match="alex.pth: LPIPS needs both .*alexnet-owt"):
        load_paper_metric_nets(lpips_lin=tmp_path / "alex.pth")

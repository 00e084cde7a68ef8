"""The distillation teacher (models/teacher.py), its cached pairs (jobs/teacher_pairs.py) and the training key."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from jobs.teacher_pairs import build_pairs, load_pairs, teacher_folder
from jobs.train import Recipe, Trainer, image_files
from models.errors import UserError
from models.losses import distillation_loss, regional_distillation_loss, regional_mean_std
from tests.tiny_models import TINY

onnxruntime = pytest.importorskip("onnxruntime", reason="the teacher is a training extra: pip install -e '.[train]'")
from models.teacher import CONTENT_SIZE, MagentaTeacher, load_teacher  # noqa: E402


def painted(seed: int, size=(300, 220)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray((rng.random((9, 7, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC))


@pytest.fixture(scope="module")
def teacher():
    return MagentaTeacher(threads=1)


def test_teacher_is_deterministic_across_threads_and_keeps_the_input_size(teacher):
    content, style = painted(0), painted(1)
    vector = teacher.style_vector(style)
    assert vector.shape == (1, 1, 1, 100) and vector.dtype == np.float32
    region = content[:200, :280]
    out = teacher.stylize(region, vector)
    assert out.shape == region.shape and out.dtype == np.uint8
    assert np.array_equal(out, MagentaTeacher(threads=2).stylize(region, vector))
    assert not np.array_equal(out, teacher.stylize(region, teacher.style_vector(painted(2))))  # style matters
    with pytest.raises(ValueError, match="at most 384"):
        teacher.stylize(np.zeros((CONTENT_SIZE + 8, 10, 3), np.uint8), vector)
    assert teacher.stylize_image(painted(3, (500, 410)), style).shape == (410, 500, 3)


def test_unknown_teacher_is_a_one_line_error():
    with pytest.raises(UserError, match="teacher 'nope': unknown"):
        load_teacher("nope")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-data")
    for kind, split, count in (("content", "train", 3), ("style", "train", 2), ("content", "val", 1),
                               ("style", "val", 1)):
        (root / kind / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(painted(10 * len(kind) + i)).save(root / kind / split / f"{kind}{i}.png")
    return root


def test_pairs_are_computed_once_and_extending_keeps_the_first(data):
    contents, styles = image_files(data / "content/train"), image_files(data / "style/train")
    first = build_pairs(data, contents, styles, 2, seed=3, threads=1)
    files = sorted((teacher_folder(data) / "pairs").glob("*.png"))
    assert len(files) == 2 and {f.stem for f in files} == {r["key"] for r in first}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    more = build_pairs(data, contents, styles, 3, seed=3, threads=1)
    assert more[:2] == first and all(f.stat().st_mtime_ns == t for f, t in stamps.items())  # cache hits
    region, target, style = load_pairs(data, more)[2]
    assert region.shape == target.shape == (CONTENT_SIZE, CONTENT_SIZE, 3)
    assert (data / style).is_file() and not np.array_equal(region, target)
    other = build_pairs(data, contents, styles, 2, seed=4, threads=1)
    assert [r["key"] for r in other] != [r["key"] for r in first]  # the seed draws other pairs


def test_distillation_loss_is_zero_at_the_target_and_grows_away_from_it():
    from models.perceptual import load_perceptual
    net = load_perceptual("mobilenet_v2")
    target = torch.rand(1, 3, 64, 64)
    near, far = (target + 0.02 * torch.randn_like(target)).clamp(0, 1), torch.rand(1, 3, 64, 64)
    loss = lambda x: float(distillation_loss(x, target, net.features(x), net.features(target)))  # noqa: E731
    assert loss(target) == 0.0 and 0 < loss(near) < loss(far)


def test_regional_distillation_asks_for_each_cells_statistics_not_the_strokes_placement():
    """Strokes moved within their cell of the grid cost nothing; the same strokes in another cell do."""
    g = torch.Generator().manual_seed(0)
    target = [torch.rand(2, 8, 16, 16, generator=g), torch.rand(2, 16, 8, 8, generator=g)]

    def within_cells(f, cells):  # permute the positions inside each cell of a cells x cells grid
        b, c, h, w = f.shape
        k = h // cells
        blocks = f.reshape(b, c, cells, k, cells, k).permute(0, 1, 2, 4, 3, 5).reshape(b, c, cells, cells, k * k)
        blocks = blocks[..., torch.randperm(k * k, generator=g)]
        return blocks.reshape(b, c, cells, cells, k, k).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    moved = [within_cells(f, 4) for f in target]
    swapped = [torch.cat([f[..., f.shape[-1] // 2:], f[..., :f.shape[-1] // 2]], -1) for f in target]
    loss = lambda feats: float(regional_distillation_loss(feats, target, [1.0, 3.0], regions=4))  # noqa: E731
    assert loss(target) == 0.0 and loss(moved) < 1e-10
    assert loss(swapped) > 1e-3 and loss([f.flip(-1) for f in target]) > 1e-3
    assert float(distillation_loss(torch.zeros(1), torch.zeros(1), moved, target)) > 0.1  # the aligned form: not free
    # the per-cell mean and std are the plain ones of each cell's values
    mean, std = regional_mean_std(target[0], 4)
    cell = target[0][1, 3, 4:8, 8:12]
    assert float(mean[1, 3, 1, 2]) == pytest.approx(float(cell.mean()), abs=1e-6)
    assert float(std[1, 3, 1, 2]) == pytest.approx(float((cell.var(unbiased=False) + 1e-5).sqrt()), abs=1e-5)
    # a grid finer than a tap uses the tap's own positions
    assert regional_mean_std(torch.rand(1, 2, 3, 5), 4)[0].shape == (1, 2, 3, 4)


def test_training_with_a_teacher_adds_its_loss_and_resumes_bit_for_bit(tmp_path, data):
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))

    def recipe(out, **overrides):
        return Recipe(**{**dict(model=str(model_yaml), data=str(data), out=str(tmp_path / out), steps=2,
                                batch_size=2, crop=64, scale_range=(1.0, 1.2), warmup=1, sample_every=2,
                                checkpoint_every=1, threads=1, val_pairs=1, teacher="magenta", teacher_pairs=3,
                                weight_teacher=2.0), **overrides})

    whole = Trainer(recipe("whole"))
    whole.run()
    assert all("teacher" in h and h["teacher"] > 0 for h in whole.history)
    half = Trainer(recipe("half"))
    half.train_step()
    half._save_checkpoint()
    resumed = Trainer(recipe("half"), resume=True)
    resumed.run()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    regional = Trainer(recipe("regional", teacher_loss="regional", teacher_regions=2))
    regional.run()
    assert all(h["teacher"] > 0 for h in regional.history)
    assert regional.history[0]["teacher"] != whole.history[0]["teacher"]  # the same first batch, the other loss

    bad = tmp_path / "bad.yaml"
    for key, value, message in (("teacher_share", 1.5, "teacher_share must be in"),
                                ("teacher_loss", "pixels", "teacher_loss must be 'aligned' or 'regional'"),
                                ("teacher_regions", 0, "teacher_regions must be a positive integer")):
        bad.write_text(yaml.safe_dump({key: value}))
        with pytest.raises(UserError, match=message):
            Recipe.load(bad)



def test_teacher_keep_trains_on_the_pairs_where_the_teacher_carried_the_style_best(tmp_path, data):
    """The rating is the teacher's style loss over the photo's, on the training net: a target that is the style
    image scores far below 1, the photo itself exactly 1; teacher_keep keeps the best-rated share of the pairs."""
    from jobs.train import teacher_style_ratios
    from models.perceptual import load_perceptual
    net = load_perceptual("mobilenet_v2")
    photo, painting = painted(1), painted(2)
    style_images = {"style/x.png": torch.tensor(painting).permute(2, 0, 1).contiguous()}
    ratios = teacher_style_ratios([(photo, painting, "style/x.png"), (photo, photo, "style/x.png")], style_images,
                                  net, [], size=64)
    assert ratios[1] == pytest.approx(1.0) and ratios[0] < 0.2

    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))
    common = dict(model=str(model_yaml), data=str(data), steps=1, batch_size=2, crop=64, scale_range=(1.0, 1.2),
                  warmup=1, threads=1, val_pairs=1, teacher="magenta", teacher_pairs=3, weight_teacher=2.0)
    every = Trainer(Recipe(**common, out=str(tmp_path / "every")))
    best = Trainer(Recipe(**common, out=str(tmp_path / "best"), teacher_keep=0.5))
    assert len(every.teacher_pool) == 3 and len(best.teacher_pool) == 2
    rated = teacher_style_ratios(
        [(c.permute(1, 2, 0).numpy()[:, :, :3], c.permute(1, 2, 0).numpy()[:, :, 3:], s)
         for c, s in zip(every.teacher_pool.stacked, every.teacher_pool.style_files)],
        {s: img for s, img in zip(every.teacher_pool.style_files, every.teacher_pool.styles)}, every.net, [])
    dropped = max(range(3), key=lambda i: rated[i])
    kept = [t for i, t in enumerate(every.teacher_pool.stacked) if i != dropped]
    assert all(torch.equal(a, b) for a, b in zip(kept, best.teacher_pool.stacked))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teacher_keep": 0}))
    with pytest.raises(UserError, match="teacher_keep must be in"):
        Recipe.load(bad)

"""The training job: deterministic for a seed, resumable bit for bit, able to start from earlier weights."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from jobs.train import _RGB_TO_YIQ, ImagePool, Recipe, Trainer, rotate_hues
from models.checkpoint import load_model, model_config
from models.errors import UserError
from models.losses import shift_consistency_loss
from models.perceptual import load_perceptual
from tests.tiny_models import TINY


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for kind, split, count in (("content", "train", 4), ("style", "train", 3), ("content", "val", 1), ("style", "val", 1)):
        folder = root / kind / split
        folder.mkdir(parents=True)
        for i in range(count):
            smooth = rng.random((6, 8, 3)) * 255
            image = Image.fromarray(smooth.astype(np.uint8)).resize((104, 88), Image.BILINEAR)
            image.save(folder / f"{kind}{i}.png")
    return root


def tiny_recipe(tmp_path, data, out: str, **overrides) -> Recipe:
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))
    fields = dict(model=str(model_yaml), data=str(data), out=str(tmp_path / out), steps=4, batch_size=2, crop=64,
                  scale_range=(1.0, 1.2), warmup=1, sample_every=2, checkpoint_every=2, threads=1, val_pairs=1)
    return Recipe(**{**fields, **overrides})


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, data):
    whole = Trainer(tiny_recipe(tmp_path, data, "whole"))
    whole.run()

    interrupted = Trainer(tiny_recipe(tmp_path, data, "pieces"))
    for _ in range(2):
        interrupted.train_step()
    interrupted._save_checkpoint()           # what a kill right after the step-2 checkpoint leaves behind
    resumed = Trainer(tiny_recipe(tmp_path, data, "pieces"), resume=True)
    assert resumed.step == 2
    resumed.run()

    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], weights(Trainer(tiny_recipe(tmp_path, data, "fresh"))).get(k)) for k in a)
    assert (tmp_path / "whole" / "losses.png").exists() and list((tmp_path / "whole" / "samples").glob("*.png"))


def test_a_run_from_before_a_recipe_key_existed_resumes_while_the_key_keeps_its_default(tmp_path, data):
    run = Trainer(tiny_recipe(tmp_path, data, "old"))
    run.train_step()
    run._save_checkpoint()
    saved = yaml.safe_load((tmp_path / "old" / "recipe.yaml").read_text())   # as a run from before grow_lr_scale
    del saved["grow_lr_scale"]
    (tmp_path / "old" / "recipe.yaml").write_text(yaml.safe_dump(saved))
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    for group in state["opt"]["param_groups"]:
        del group["lr_scale"]
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    resumed = Trainer(tiny_recipe(tmp_path, data, "old"), resume=True)
    resumed.train_step()
    assert resumed.step == 2 and resumed.opt.param_groups[0]["lr"] == resumed.lr_at(1)
    with pytest.raises(UserError, match=r"the recipe changed since this run started \(grow_lr_scale\)"):
        Trainer(tiny_recipe(tmp_path, data, "old", grow_lr_scale=3.0), resume=True)


def test_a_run_can_start_from_earlier_weights(tmp_path, data):
    first = Trainer(tiny_recipe(tmp_path, data, "first", steps=1))
    final = first.run()
    start = weights(Trainer(tiny_recipe(tmp_path, data, "second", init_from=str(final))))
    saved = load_model(final).state_dict()
    assert all(torch.equal(start[k], saved[k]) for k in saved)

    wider = tiny_recipe(tmp_path, data, "third", init_from=str(final))
    wide_yaml = tmp_path / "wide.yaml"
    wide_yaml.write_text(yaml.safe_dump({**TINY, "d_model": 48}))
    wider.model = str(wide_yaml)
    with pytest.raises(UserError, match="does not fit model .*'embedding.proj.weight' has shape"):
        Trainer(wider)

    from jobs.cli import main  # chained stages in one loss plot; a folder that is no run is named
    plot = tmp_path / "chain.png"
    assert main(["plot-losses", str(tmp_path / "first"), str(tmp_path / "second"), "-o", str(plot)]) == 2
    assert not plot.exists()
    assert main(["plot-losses", str(tmp_path / "first"), "-o", str(plot)]) == 0
    with Image.open(plot) as image:
        assert image.size == (900, 480)


def test_a_deeper_mstd_grows_from_shallower_weights(tmp_path, data):
    """More MSTD blocks than init_from's weights have: the weights fill every block they have, the extra blocks
    start fresh and train at grow_lr_scale times the rate, the grown model starts close to the weights' own
    output (the MSTD's final LayerNorm takes most of a fresh block's effect out), and the run resumes exactly."""
    final = Trainer(tiny_recipe(tmp_path, data, "shallow", steps=1)).run()
    deeper = tmp_path / "deeper.yaml"
    deeper.write_text(yaml.safe_dump({**TINY, "n_decoder_layers": TINY["n_decoder_layers"] + 2}))

    def grown_recipe(out, **overrides):
        return tiny_recipe(tmp_path, data, out, model=str(deeper), init_from=str(final), grow_lr_scale=7.0,
                           **overrides)

    grown = Trainer(grown_recipe("grown"))
    fresh = Trainer(tiny_recipe(tmp_path, data, "fresh", model=str(deeper)))  # the same seed, no init_from
    new = range(TINY["n_decoder_layers"], TINY["n_decoder_layers"] + 2)
    assert grown.grown_layers == new
    saved, start, init = load_model(final).state_dict(), weights(grown), weights(fresh)
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    assert {k for k in start if k not in saved} == {k for k in start for i in new
                                                    if k.startswith(f"mamba.decoder.layers.{i}.")}
    assert all(torch.equal(start[k], init[k]) for k in start if k not in saved)
    content, style = torch.rand(2, 1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = load_model(final).eval()(content, style, seed=3)
        after = grown.model.eval()(content, style, seed=3)
        untrained = fresh.model.eval()(content, style, seed=3)
    assert (after - before).abs().mean() < 0.05 * (untrained - before).abs().mean()  # measured: 0.0004
    grown.model.train()
    fast = grown.opt.param_groups[1]
    names = {id(p): n for n, p in grown.model.named_parameters()}
    assert fast["lr_scale"] == 7.0 and {names[id(p)].split(".")[3] for p in fast["params"]} == {str(i) for i in new}
    assert not any(names[id(p)].startswith(f"mamba.decoder.layers.{i}.") for p in grown.opt.param_groups[0]["params"]
                   for i in new)
    grown.train_step()
    assert fast["lr"] == pytest.approx(7.0 * grown.opt.param_groups[0]["lr"])
    shallower = tiny_recipe(tmp_path, data, "shallower", init_from=str(grown.run()))
    with pytest.raises(UserError, match=f"has {new.stop} MSTD blocks, model .* {new.start}: a model can grow"):
        Trainer(shallower)

    whole = Trainer(grown_recipe("whole"))
    whole.run()
    pieces = Trainer(grown_recipe("pieces"))
    for _ in range(2):
        pieces.train_step()
    pieces._save_checkpoint()
    resumed = Trainer(grown_recipe("pieces"), resume=True)
    resumed.run()
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grow_lr_scale": 0}))
    with pytest.raises(UserError, match="grow_lr_scale must be a number > 0"):
        Recipe.load(bad)


def test_hue_rotation_keeps_luma_and_turns_hues():
    g = torch.Generator().manual_seed(0)
    img = 0.35 + 0.3 * torch.rand(3, 8, 8, generator=g)  # muted colours: no turn leaves the RGB cube
    assert torch.allclose(rotate_hues(img, 0.0), img, atol=1e-6)
    assert torch.allclose(rotate_hues(img, 2 * math.pi), img, atol=1e-5)
    luma = _RGB_TO_YIQ[0]
    for angle in (0.7, math.pi, 4.0):
        turned = rotate_hues(img, angle)
        assert torch.allclose(torch.einsum("c,chw->hw", luma, turned), torch.einsum("c,chw->hw", luma, img), atol=1e-5)
        assert not torch.allclose(turned, img, atol=1e-2)
    red = torch.tensor([0.6, 0.3, 0.3]).view(3, 1, 1)
    r, gr, b = rotate_hues(red, math.pi).flatten().tolist()
    assert gr > r and b > r  # half a turn: red becomes cyan


def test_hue_jitter_turns_style_crops_and_keeps_their_geometry(tmp_path, data):
    pool = ImagePool(data / "style" / "train", 96)
    plain = pool.sample(1, 64, (1.0, 1.2), torch.Generator().manual_seed(3))
    turned = pool.sample(1, 64, (1.0, 1.2), torch.Generator().manual_seed(3), hue_jitter=1.0)
    luma = _RGB_TO_YIQ[0].view(1, 3, 1, 1)
    assert not torch.allclose(plain, turned, atol=1e-2)
    # the same crop (same draws before the turn), its luma kept wherever no channel was clipped
    inside = ((turned > 0) & (turned < 1)).all(1)
    assert inside.float().mean() > 0.5
    assert torch.allclose((plain * luma).sum(1)[inside], (turned * luma).sum(1)[inside], atol=1e-4)
    bad = tmp_path / "bad.yaml"
    for value in (1.5, "half"):
        bad.write_text(yaml.safe_dump({"style_hue_jitter": value}))
        with pytest.raises(UserError, match="style_hue_jitter"):
            Recipe.load(bad)


def beside_plain_losses(tmp_path, data, **extra):
    """A trainer with `extra` recipe keys, a batch, and the losses of a plain trainer and of it on that batch
    (the same seed); the paper's four losses must come out equal."""
    plain = Trainer(tiny_recipe(tmp_path, data, "plain", seed=5))
    other = Trainer(tiny_recipe(tmp_path, data, "other", seed=5, **extra))
    g = torch.Generator().manual_seed(0)
    content, style = plain.content.sample(2, 64, (1.0, 1.0), g), plain.style.sample(2, 64, (1.0, 1.0), g)
    torch.manual_seed(0)
    a = plain.losses(content, style)
    torch.manual_seed(0)
    b = other.losses(content, style)
    for key in ("content", "style", "id_pixel", "id_feature"):
        assert torch.equal(a[key], b[key])
    return other, content, style, a, b


def test_a_second_style_net_adds_its_own_style_loss(tmp_path, data):
    """`second_style_net` adds a weighted style loss on another net; content and identity stay on the first."""
    both, _, _, a, b = beside_plain_losses(tmp_path, data, second_style_net="vgg19", weight_second_style=0.5,
                                           second_style_tap_weights=[1.0, 0.5, 0.0, 0.0, 0.0])
    assert "style_second" not in a and b["style_second"] > 0
    assert torch.allclose(b["total"], a["total"] + 0.5 * b["style_second"])
    b["style_second"].backward()  # the second net's loss trains the model, not the net
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in both.model.parameters())
    assert not any(p.requires_grad for p in both.second_net.parameters())
    with pytest.raises(UserError, match="second_style_tap_weights has 2 entries; VGG19Caffe has 5 taps"):
        Trainer(tiny_recipe(tmp_path, data, "short", second_style_net="vgg19", weight_second_style=1.0,
                            second_style_tap_weights=[1.0, 1.0]))


def test_shift_consistency_is_zero_exactly_when_the_output_moves_with_the_window():
    picture = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    window, moved = picture[..., :32, :40], picture[..., 3:35, 5:45]  # the window moved 3 down, 5 right
    assert shift_consistency_loss(window, moved, 3, 5) == 0
    assert shift_consistency_loss(window, moved, 5, 3) > 0.01
    assert shift_consistency_loss(window, window, 3, 5) > 0.01  # the same picture twice: the grid, not the image
    fresh = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))  # strokes drawn afresh
    flat = shift_consistency_loss(0.5 + 0.1 * (window - 0.5), 0.5 + 0.1 * (fresh - 0.5), 3, 5)
    assert float(flat) == pytest.approx(float(shift_consistency_loss(window, fresh, 3, 5)), rel=1e-3)  # no way out


def test_shift_loss_adds_one_weighted_term_on_two_windows_without_dropout(tmp_path, data):
    """weight_shift adds w·L_shift and leaves the other losses as they were; L_shift itself is deterministic
    (DropPath off for its two windows, the model back in training mode after) and trains the model."""
    shifted, content, style, a, b = beside_plain_losses(tmp_path, data, weight_shift=100.0, shift_window=48)
    assert shifted.model.cfg.drop_path > 0
    assert "shift" not in a and b["shift"] > 0
    assert torch.allclose(b["total"], a["total"] + 100.0 * b["shift"])
    for block in shifted.model.modules():  # DropPath that would drop half the time, were it on
        if isinstance(getattr(block, "drop_path", None), float):
            block.drop_path = 0.5
    state, twice = shifted.gen.get_state(), []
    for seed in (1, 2):  # DropPath draws from torch's global RNG
        torch.manual_seed(seed)
        shifted.gen.set_state(state)
        twice.append(shifted.shift_loss(content[:1], style[:1]))
    assert torch.equal(twice[0], twice[1]) and shifted.model.training
    twice[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in shifted.model.parameters())
    with pytest.raises(UserError, match=r"shift_window must be .* at most crop - \(patch - 1\) = 57"):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({"crop": 64, "weight_shift": 1.0, "shift_window": 60}))
        Recipe.load(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_load_and_name_their_start(path):
    recipe = Recipe.load(path)
    model_config(recipe.model)  # the model variant resolves
    assert recipe.steps > recipe.warmup and recipe.lr >= recipe.lr_min
    if recipe.init_from:  # an earlier stage's run folder, or the bundled weights
        assert recipe.init_from.startswith("runs/") or recipe.init_from == "models/weights", recipe.init_from
    net = load_perceptual(recipe.perceptual)
    assert len(recipe.style_tap_weights) in (0, len(net.taps))
    if recipe.second_style_net:
        assert len(recipe.second_style_tap_weights) in (0, len(load_perceptual(recipe.second_style_net).taps))


def test_group_balance_draws_every_source_group_alike_times_its_weight(tmp_path, data):
    """style_balance: group reads each style's source group from DATA/manifest.json: a group of one image is
    drawn as often as a group of two, or three times as often at weight 3; a group the data lacks is refused."""
    import json
    import shutil
    root = tmp_path / "grouped"
    shutil.copytree(data, root)
    groups = {"style/train/style0.png": "wesnoth", "style/train/style1.png": "wesnoth",
              "style/train/style2.png": "gcompris"}
    (root / "manifest.json").write_text(json.dumps({"files": [{"path": p, "source_group": g}
                                                              for p, g in groups.items()]}))

    def share_of_gcompris(**overrides) -> float:
        trainer = Trainer(tiny_recipe(tmp_path, root, f"run{len(overrides)}", style_balance="group", **overrides))
        g = torch.Generator().manual_seed(0)
        draws = [trainer.style.files[trainer.style.draw(g)].name for _ in range(3000)]
        return draws.count("style2.png") / len(draws)

    assert share_of_gcompris() == pytest.approx(0.5, abs=0.03)
    assert share_of_gcompris(style_group_weights={"gcompris": 3.0}) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(UserError, match="style_group_weights names krita; the data's groups are gcompris, wesnoth"):
        Trainer(tiny_recipe(tmp_path, root, "typo", style_balance="group", style_group_weights={"krita": 2.0}))
    with pytest.raises(UserError, match="manifest.json: missing"):
        Trainer(tiny_recipe(tmp_path, data, "plain", style_balance="group"))
    bad = tmp_path / "bad.yaml"
    for doc, message in (({"style_balance": "source"}, "style_balance must be"),
                         ({"style_group_weights": {"gcompris": 2.0}}, "needs style_balance: group"),
                         ({"style_balance": "group", "style_group_weights": {"gcompris": -1}}, "weights >= 0")):
        bad.write_text(yaml.safe_dump(doc))
        with pytest.raises(UserError, match=message):
            Recipe.load(bad)

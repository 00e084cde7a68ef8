"""Style tuning (models/style_tuning.py) and the tuned weights the pipeline makes of it (pipeline/style_tuning.py)."""
from __future__ import annotations

import os
import dataclasses

import cv2
import numpy as np
import pytest
import torch

from jobs.cli import main
from models.checkpoint import load_model, save_model
from models.losses import shift_consistency_loss, weighted_style_loss
from models.perceptual import load_perceptual
from models.style_tuning import StyleTuning, crop_size, enlarged, token_frame, token_window, tune_to_style
from pipeline.local_runner import run_local
from pipeline.settings import Settings
from pipeline.style_tuning import cache_root, tuned_weights
from pipeline.stylize_job import StylizeJob
from tests.tiny_models import tiny_model

QUICK = StyleTuning(steps=6, lr=1e-3, lr_min=1e-4, crop=64)


def picture(h, w, seed):
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX)


def as_tensor(image):
    return torch.from_numpy(image).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def net():
    return load_perceptual("mobilenet_v2")


@pytest.fixture(scope="module")
def stripes():
    """A style unlike the frames: saturated diagonal stripes."""
    y, x = np.mgrid[0:96, 0:96]
    on = ((x + y) // 6) % 2 == 0
    return np.where(on[..., None], np.array([230, 40, 20], np.uint8), np.array([20, 40, 200], np.uint8))


def test_tuning_moves_only_the_cnn_decoder_and_leaves_the_model_alone(net, stripes):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = tune_to_style(model, as_tensor(stripes)[None], [as_tensor(picture(80, 96, 1))], QUICK, net=net)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("decode.") for k in changed)
    assert not any(p.requires_grad for p in tuned.parameters()) and not tuned.training


def test_tuning_lowers_the_style_loss_on_frames_it_did_not_see(net, stripes):
    model = tiny_model()
    frames = [as_tensor(picture(96, 96, s)) for s in (1, 2, 3)]
    tuned = tune_to_style(model, as_tensor(stripes)[None], frames,
                          dataclasses.replace(QUICK, steps=30, weight_content=1.0), net=net)
    unseen = as_tensor(picture(96, 96, 9))[None]
    style = as_tensor(stripes)[None]
    with torch.no_grad():
        loss = {name: float(weighted_style_loss(net.features(m(unseen, style, seed=0)), net.features(style),
                                                QUICK.style_tap_weights))
                for name, m in (("before", model), ("after", tuned))}
    assert loss["after"] < 0.8 * loss["before"], loss


def test_tuning_is_deterministic_and_follows_its_seed(net, stripes):
    frames = [as_tensor(picture(72, 88, 1))]
    runs = [tune_to_style(tiny_model(), as_tensor(stripes)[None], frames, tuning, net=net).state_dict()
            for tuning in (QUICK, QUICK, dataclasses.replace(QUICK, seed=1))]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_zero_steps_is_a_copy_and_bad_input_is_refused(stripes):
    model = tiny_model()
    same = tune_to_style(model, as_tensor(stripes)[None], [as_tensor(picture(64, 64, 1))], StyleTuning(steps=0))
    assert same is not model and all(torch.equal(v, model.state_dict()[k]) for k, v in same.state_dict().items())
    with pytest.raises(ValueError, match="at least one frame"):
        tune_to_style(model, as_tensor(stripes)[None], [], QUICK)


def test_crops_fit_small_and_odd_frames(net, stripes):
    frames = [torch.rand(3, 90, 300), torch.rand(3, 100, 100)]
    assert crop_size(frames, 256, 8) == 88  # the smallest side, a multiple of the patch
    assert crop_size([torch.rand(3, 9, 40)], 256, 8) == 64  # the deepest tap's 2x2: a small frame is enlarged
    assert enlarged(torch.rand(3, 9, 40), 72).shape == (3, 72, 320) and enlarged(frames[0], 72) is frames[0]
    tuned = tune_to_style(tiny_model(), as_tensor(stripes)[None], [torch.rand(3, 9, 40), torch.rand(3, 70, 33)],
                          QUICK, net=net)
    assert all(torch.isfinite(p).all() for p in tuned.parameters())


def test_tuning_sees_the_tokens_that_stylizing_decodes(stripes):
    """The decoder is tuned on windows of whole-frame tokens: decoded, they are the model's own output."""
    model = tiny_model().eval()
    frame, style = as_tensor(picture(44, 60, 5)), as_tensor(stripes)[None]
    tf = token_frame(model, frame, style, seed=7)
    assert tf.image.shape == (3, 48, 64) and tf.tokens.shape[:2] == (6, 8)
    with torch.no_grad():
        whole = model(frame[None], style, seed=7)
        assert torch.allclose(model.decode_tokens(tf.tokens[None])[..., :44, :60], whole, atol=1e-5)
    tokens, pixels = token_window(tf, 1, 2, 4, 8)
    assert tokens.shape[:2] == (4, 4) and torch.equal(pixels, tf.image[:, 8:40, 16:48])


def test_the_shift_term_keeps_strokes_on_the_picture_when_it_moves(net, stripes):
    """Tuned with and without L_shift, the same model stylizes a frame and the frame moved by a few pixels: with
    it, the two outputs agree better where they overlap (measured on a frame the tuning did not see)."""
    frames = [as_tensor(picture(96, 96, s)) for s in (1, 2)]
    style = as_tensor(stripes)[None]
    unseen = as_tensor(picture(110, 110, 9))
    windows = torch.stack([unseen[:, :96, :96], unseen[:, 5:101, 3:99]])
    scores = {}
    for w in (0.0, 200.0):
        tuned = tune_to_style(tiny_model(), style, frames, dataclasses.replace(QUICK, steps=20, weight_shift=w), net=net)
        with torch.no_grad():
            out = tuned(windows, style.expand(2, -1, -1, -1), seed=0)
        scores[w] = float(shift_consistency_loss(out[:1], out[1:], 5, 3))
    assert scores[200.0] < 0.8 * scores[0.0], scores
    with pytest.raises(ValueError, match="even"):
        tune_to_style(tiny_model(), style, frames, dataclasses.replace(QUICK, batch_size=3, weight_shift=8.0), net=net)


# --- The pipeline: cached tuned weights, stylize, batch, the tune command -------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(save_model(tiny_model(), tmp_path_factory.mktemp("model") / "tiny"))


def test_tuned_weights_are_cached_by_what_made_them(weights, stripes):
    frames = [picture(64, 80, 1)]
    first = tuned_weights(weights, stripes, frames, QUICK, show_progress=False)
    assert first.parent == cache_root() and load_model(first).cfg == load_model(weights).cfg
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tuned_weights(weights, stripes, frames, QUICK, show_progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # read back, not tuned again
    others = {tuned_weights(weights, stripes, [picture(64, 80, 2)], QUICK, show_progress=False),
              tuned_weights(weights, stripes[::-1], frames, QUICK, show_progress=False),
              tuned_weights(weights, stripes, frames, dataclasses.replace(QUICK, steps=5), show_progress=False)}
    assert first not in others and len(others) == 3
    assert not [p for p in os.listdir(cache_root()) if p.startswith(".")]  # no staging folder left behind


def write_clip(path, count=6, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12, size)
    for i in range(count):
        writer.write(np.roll(picture(size[1], size[0], 3), 2 * i, axis=1))
    writer.release()
    return path


def frames_of(path):
    import av
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_stylize_with_tuning_differs_and_repeats_bit_for_bit(tmp_path, weights, stripes):
    clip = write_clip(tmp_path / "in.avi")
    cv2.imwrite(str(tmp_path / "style.png"), stripes[..., ::-1])
    outputs = {}
    for name, steps in (("plain", 0), ("tuned", 4), ("again", 4)):
        settings = Settings(working_size=0, tune_steps=steps, codec="ffv1")
        run_local(StylizeJob(str(clip), str(tmp_path / "style.png"), str(tmp_path / f"{name}.mkv"), settings,
                             weights=weights), progress=False)
        outputs[name] = frames_of(tmp_path / f"{name}.mkv")
    assert len(outputs["tuned"]) == 6
    assert all(np.array_equal(a, b) for a, b in zip(outputs["tuned"], outputs["again"]))
    assert not all(np.array_equal(a, b) for a, b in zip(outputs["tuned"], outputs["plain"]))


def test_a_blend_is_stylized_untuned_with_a_notice(tmp_path, capsys, weights, stripes):
    clip = write_clip(tmp_path / "in.avi")
    for name, image in (("a.png", stripes), ("b.png", picture(50, 60, 4))):
        cv2.imwrite(str(tmp_path / name), image)
    blend = f"{tmp_path / 'a.png'}*0.5+{tmp_path / 'b.png'}*0.5"
    outputs = []
    for steps in (0, 4):
        out = tmp_path / f"out{steps}.mkv"
        run_local(StylizeJob(str(clip), blend, str(out), Settings(working_size=0, tune_steps=steps, codec="ffv1"),
                             weights=weights), progress=False)
        outputs.append(frames_of(out))
    assert "tuning is for one style image" in capsys.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))


def test_batch_job_refuses_tuning_in_one_line(tmp_path, capsys, weights, stripes):
    write_clip(tmp_path / "in.avi")
    cv2.imwrite(str(tmp_path / "style.png"), stripes)
    (tmp_path / "job.yaml").write_text(f"output_dir: {tmp_path / 'out'}\nweights: {weights}\nclips: [in.avi]\n"
                                       f"styles: [style.png]\nsettings: {{tune_steps: 10}}\n")
    assert main(["batch", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tune_steps" in err and "mambast tune" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_tune_command_writes_weights_that_load(tmp_path, capsys, weights, stripes):
    clips = [write_clip(tmp_path / "a.avi"), write_clip(tmp_path / "b.avi", size=(80, 48))]
    cv2.imwrite(str(tmp_path / "style.png"), stripes)
    out = tmp_path / "tuned"
    args = ["tune", "--style", str(tmp_path / "style.png"), "--clips", *map(str, clips), "-o", str(out),
            "--weights", weights, "--steps", "3", "--working-size", "0"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    tuned, base = load_model(out), load_model(weights)
    assert not torch.equal(tuned.decode[1].weight, base.decode[1].weight)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # no --overwrite
    assert main([*args, "--overwrite"]) == 0
    assert main(["tune", "--style", str(tmp_path / "style.png"), "--clips", str(clips[0]), "-o", str(clips[0]),
                 "--overwrite", "--weights", weights]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert main(["tune", "--style", str(tmp_path / "nope.png"), "--clips", str(clips[0]), "-o",
                 str(tmp_path / "x"), "--weights", weights]) == 2
    assert "nope.png" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tuning_frames_are_spread_over_the_selection_and_take_a_short_one_whole(tmp_path):
    from pipeline.source import open_source
    from pipeline.style_tuning import tuning_frames

    source = open_source(str(write_clip(tmp_path / "in.avi", count=5)))
    assert len(tuning_frames(source, source.select(), 0, count=8)) == 5  # every frame of a clip shorter than 8
    picked = tuning_frames(source, source.select(), 96, count=2)
    assert [f.shape for f in picked] == [(96, 128, 3)] * 2  # first and last, at the working size (short side 96)
    assert not np.array_equal(picked[0], picked[1])

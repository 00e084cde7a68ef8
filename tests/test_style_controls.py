"""Style controls: strength, colour preservation, blends and schedules, on the model and through ClipStylizer.

A tiny random Mamba-ST (tests/tiny_models.py), real photos from scikit-image as content and style, small frames.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.packaged_media import skimage_photo
from jobs.cli import main as cli_main
from models.checkpoint import save_model
from models.errors import UserError
from models.losses import mean_std
from models.mambast import pad_to_multiple
from models.perceptual import load_perceptual
from models.selective_scan import read_out_states
from models.style_controls import mix_style_codes, normalise_weights, preserve_colors, rgb_to_ycbcr, smoothstep
from pipeline.images import load_image, save_png
from pipeline.stylizer import ClipStylizer, StylizerConfig, image_to_tensor
from pipeline.styles import (StyleBlend, StyleCodes, StyleImage, StyleSchedule, images_at, parse_schedule,
                             parse_style)
from tiny_models import tiny_model

torch.set_num_threads(1)

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def photo(name: str, width: int, height: int) -> np.ndarray:
    return cv2.resize(load_image(str(skimage_photo(name))), (width, height), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def content():
    return photo("astronaut", 64, 48)


@pytest.fixture(scope="module")
def styles():
    return StyleImage.from_array(photo("coffee", 80, 60), "coffee"), StyleImage.from_array(photo("chelsea", 60, 50), "chelsea")


def code_for(model, style: StyleImage, grid, seed=0):
    return StyleCodes(model, seed).code(style, grid)


def stylize(model, frames, code, strength):
    return model.stylize(frames, code, strength).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- strength


def test_strength_zero_gives_the_content_back(model, content, styles):
    x = image_to_tensor(content)
    code = code_for(model, styles[0], model.token_grid(48, 64))
    out = stylize(model, x, code, strength=0.0)
    assert (out - x).abs().max().item() <= 1e-5  # exact up to float rounding, for any weights
    # through the pipeline stage, strength 0 is the content byte for byte
    clip = ClipStylizer(model, styles[0].image, (48, 64), StylizerConfig(strength=0.0))
    assert all((o == content).all() for o in clip([content, content]))


def test_strength_one_is_the_plain_stylization_bit_for_bit(model, content, styles):
    x = image_to_tensor(content)
    code = code_for(model, styles[0], model.token_grid(48, 64))
    x_pad, _ = pad_to_multiple(x, model.cfg.patch_size)
    tokens, identity = model.stylize_tokens(x_pad, code, 1.0)
    assert identity is None  # no identity pass at full strength
    assert torch.equal(model.stylize(x, code, 1.0), model.decode_tokens(tokens)[..., :48, :64])


def test_style_distance_is_monotone_in_strength(model, content, styles):
    net = load_perceptual("mobilenet_v2")
    x = image_to_tensor(content)
    code = code_for(model, styles[0], model.token_grid(48, 64))
    outs = [stylize(model, x, code, s) for s in STRENGTHS]

    def distance(a, b):  # the style loss: feature means and stds over all taps
        return sum(((ma - mb) ** 2).mean().item() + ((sa - sb) ** 2).mean().item()
                   for (ma, sa), (mb, sb) in zip(map(mean_std, net.features(a)), map(mean_std, net.features(b))))

    from_content = [distance(o, x) for o in outs]
    to_full_style = [distance(o, outs[-1]) for o in outs]
    assert from_content[0] < 1e-6 and to_full_style[-1] == 0
    assert all(a < b for a, b in zip(from_content, from_content[1:])), from_content
    assert all(a > b for a, b in zip(to_full_style, to_full_style[1:])), to_full_style


def test_strength_outside_0_1_is_refused():
    with pytest.raises(UserError, match="strength"):
        StylizerConfig(strength=1.5)
    with pytest.raises(UserError, match="strength"):
        StylizerConfig(strength="strong")


# ---------------------------------------------------------------------------------------------------- colour


def test_colour_preservation_keeps_the_content_chroma(model, content, styles):
    clip = ClipStylizer(model, styles[1].image, (48, 64), StylizerConfig(preserve_color=True, temporal_enabled=False))
    plain = ClipStylizer(model, styles[1].image, (48, 64), StylizerConfig(temporal_enabled=False))
    out, stylized = clip([content])[0], plain([content])[0]
    ycc_out, ycc_content, ycc_stylized = (rgb_to_ycbcr(image_to_tensor(im))[0] for im in (out, content, stylized))
    # Cb, Cr per pixel within 1.5 levels of 255 (uint8 rounding of RGB), so their mean and std too
    assert (ycc_out[1:] - ycc_content[1:]).abs().max() * 255 < 1.5
    for c in (1, 2):
        assert abs(ycc_out[c].mean() - ycc_content[c].mean()) * 255 < 0.25
        assert abs(ycc_out[c].std() - ycc_content[c].std()) * 255 < 0.25
    assert abs(ycc_out[0].mean() - ycc_content[0].mean()) * 255 < 3  # the content's brightness (luma limits aside)
    assert (ycc_stylized[1:] - ycc_content[1:]).abs().mean() * 255 > 5  # without it, the colours do change


def test_preserve_colors_matches_luma_statistics():
    g = torch.Generator().manual_seed(0)
    content = 0.3 + 0.4 * torch.rand(2, 3, 16, 16, generator=g)
    stylized = 0.4 + 0.2 * torch.rand(2, 3, 16, 16, generator=g)  # a lower contrast: its luma is stretched
    out = preserve_colors(stylized, content)  # nothing reaches the gamut's edge here: luma statistics are exact
    y_out, y_content, y_stylized = (rgb_to_ycbcr(t) for t in (out, content, stylized))
    assert torch.allclose(y_out[:, 1:], y_content[:, 1:], atol=1e-5)
    assert torch.allclose(y_out[:, 0].mean(dim=(1, 2)), y_content[:, 0].mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(y_out[:, 0].std(dim=(1, 2)), y_content[:, 0].std(dim=(1, 2)), atol=1e-5)
    corr = torch.corrcoef(torch.stack([y_out[0, 0].flatten(), y_stylized[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999  # the stylized picture's luma pattern, rescaled


def test_preserve_colors_keeps_saturated_chroma_by_limiting_luma():
    content = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.9, 0.9, 0.1], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 2, 2)
    stylized = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.2, 0.2], [1.0, 1.0, 1.0]]).T.reshape(1, 3, 2, 2)
    out = preserve_colors(stylized, content)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(rgb_to_ycbcr(out)[:, 1:], rgb_to_ycbcr(content)[:, 1:], atol=1e-5)


# ---------------------------------------------------------------------------------------------------- blends


def test_blend_one_zero_is_the_first_style_alone(model, content, styles):
    grid = model.token_grid(48, 64)
    codes = StyleCodes(model)
    a = codes.code(styles[0], grid)
    assert mix_style_codes(model, [a, codes.code(styles[1], grid)], [1, 0]) is a
    blended = ClipStylizer(model, StyleBlend.of(list(styles), [1, 0]), (48, 64), StylizerConfig(temporal_enabled=False))
    alone = ClipStylizer(model, styles[0].image, (48, 64), StylizerConfig(temporal_enabled=False))
    assert (blended([content])[0] == alone([content])[0]).all()


def test_blend_mixes_the_cached_states_and_every_layer_reads_out_the_mix(styles):
    model = tiny_model(n_decoder_layers=2, style_cache="states")
    grid = (6, 8)
    codes = StyleCodes(model)
    a, b = codes.code(styles[0], grid), codes.code(styles[1], grid)
    mixed = mix_style_codes(model, [a, b], [3, 1])  # normalised to 0.75 / 0.25
    C = torch.randn(2, 4, model.cfg.d_state, 48, generator=torch.Generator().manual_seed(1))
    for la, lb, lm in zip(a.layers, b.layers, mixed.layers):
        expected = 0.75 * read_out_states(la.states, C, la.skip) + 0.25 * read_out_states(lb.states, C, lb.skip)
        assert torch.allclose(read_out_states(lm.states, C, lm.skip), expected, atol=1e-5)
    assert mixed.perms is a.perms and mixed.grid == grid


def test_blend_of_scan_input_codes_reads_every_part_out_as_the_state_mix_does(styles):
    """Without a state cache (the CPU's and CUDA's fused readouts) a blend keeps its parts and weights and sums
    their readouts: the same frames as mixing the cached states, a blend of blends flattened into its parts."""
    model = tiny_model(style_cache="projections")
    codes = StyleCodes(model)
    a, b = codes.code(styles[0], (6, 8)), codes.code(styles[1], (6, 8))
    mixed = mix_style_codes(model, [a, b], [0.5, 0.5])
    assert torch.allclose(mixed.tokens, 0.5 * a.tokens + 0.5 * b.tokens)
    assert [(part, w) for part, w in mixed.layers[0].mix] == [(a.layers[0], 0.5), (b.layers[0], 0.5)]
    assert mixed.layers[0].states is None and mixed.layers[0].u is None
    assert mix_style_codes(model, [a, b], [0, 2]) is b
    nested = mix_style_codes(model, [mixed, a], [1, 1])
    assert [w for _, w in nested.layers[-1].mix] == [0.25, 0.25, 0.5] and nested.layers[-1].mix[2][0] is a.layers[-1]

    frame = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    model.cfg.style_cache = "states"
    state_codes = StyleCodes(model)
    state_mix = mix_style_codes(model, [state_codes.code(s, (6, 8)) for s in styles], [0.5, 0.5])
    expected = model.stylize_tokens(frame, state_mix)[0]
    model.cfg.style_cache = "projections"
    assert (model.stylize_tokens(frame, mixed)[0] - expected).abs().max() <= 1e-5
    model.cfg.scan_backend = "chunked"  # the cross-scanning path (CUDA's, with the torch readout here)
    assert (model.stylize_tokens(frame, mixed)[0] - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="both forms"):
        mix_style_codes(model, [a, state_codes.code(styles[1], (6, 8))], [1, 1])


def test_blend_weights_are_checked_and_normalised(model, styles):
    assert normalise_weights([3, 1]) == [0.75, 0.25]
    assert StyleBlend.of(list(styles), [2, 2]).weights == (0.5, 0.5)
    with pytest.raises(UserError, match="chelsea.*>= 0"):
        StyleBlend.of(list(styles), [1, -1])
    with pytest.raises(UserError, match="all weights are 0"):
        StyleBlend.of(list(styles), [0, 0])
    with pytest.raises(UserError, match="finite"):
        normalise_weights([1, float("nan")])


def test_blend_of_codes_for_different_grids_is_refused(model, styles):
    codes = StyleCodes(model)
    with pytest.raises(UserError, match=r"different token grids \(6, 8\) and \(4, 4\)"):
        mix_style_codes(model, [codes.code(styles[0], (6, 8)), codes.code(styles[1], (4, 4))], [1, 1])


def test_blend_text_and_dict_forms(tmp_path, styles):
    paths = []
    for style in styles:
        paths.append(str(tmp_path / f"{style.name}.png"))
        save_png(paths[-1], style.image)
    blend = parse_style(f"{paths[0]}*0.7+{paths[1]}*0.3")
    assert isinstance(blend, StyleBlend) and blend.weights == pytest.approx((0.7, 0.3))
    assert blend.images[0].key == styles[0].key  # identified by pixels, not by path
    assert parse_style({paths[0]: 2, paths[1]: 6}).weights == (0.25, 0.75)
    assert parse_style([paths[0], paths[1]]).weights == (0.5, 0.5)
    with pytest.raises(UserError, match="weight 'lots'"):
        parse_style(f"{paths[0]}*lots+{paths[1]}")


# ---------------------------------------------------------------------------------------------------- schedules


def test_parse_schedule_frames_seconds_and_blends():
    assert parse_schedule("0:a.jpg,120:b.png") == [(0, "a.jpg"), (120, "b.png")]
    assert parse_schedule("0:a.jpg, 2.5s:a.jpg*0.5+b.jpg*0.5", fps=24) == [(0, "a.jpg"),
                                                                        (60, [("a.jpg", 0.5), ("b.jpg", 0.5)])]


@pytest.mark.parametrize("text, message", [
    ("0:a.jpg,wave.png", r"'wave.png' is not FRAME:STYLE"),
    ("0:a.jpg,x:b.png", r"'x:b.png' is not FRAME:STYLE"),
    ("0:a.jpg,10:", r"'10:' is not FRAME:STYLE"),
    ("10:a.jpg,5:b.png", r"'5:b.png' \(frame 5\) must come after frame 10"),
    ("0:a.jpg,2.5:b.png", r"'2.5:b.png': a frame index must be a whole number"),
    ("0:a.jpg,5s:b.png", r"'5s:b.png' is in seconds, which needs the clip's frame rate"),
    ("0:a.jpg,5:b.png*-1+a.jpg", r"blend weight of b.png"),
])
def test_parse_schedule_errors_name_the_bad_part(text, message):
    with pytest.raises(UserError, match=message):
        parse_schedule(text)


def test_schedule_weights_follow_a_smoothstep(styles):
    a, b = styles
    schedule = StyleSchedule(((10, a), (50, b)))
    assert schedule.weights_at(0) == [(a, 1.0)] and schedule.weights_at(10) == [(a, 1.0)]
    assert schedule.weights_at(50) == [(b, 1.0)] and schedule.weights_at(99) == [(b, 1.0)]
    (sa, wa), (sb, wb) = schedule.weights_at(20)
    assert (sa, sb) == (a, b) and wb == pytest.approx(smoothstep(0.25)) == pytest.approx(0.15625)
    assert wa + wb == pytest.approx(1.0)
    hold = StyleSchedule(((0, a), (10, a), (20, b)))
    assert hold.weights_at(5) == [(a, 1.0)]


def test_images_at_sums_each_image_over_blends_and_morphs_heaviest_first(styles):
    a, b = styles
    assert images_at(a, 7) == [(a, 1.0)]
    assert images_at(StyleBlend.of([a, b], [1, 3])) == [(b, 0.75), (a, 0.25)]
    schedule = StyleSchedule(((0, StyleBlend.of([a, b], [1, 1])), (40, b)))
    assert images_at(schedule, 0) == [(a, 0.5), (b, 0.5)]
    (first, w_first), (second, w_second) = images_at(schedule, 20)  # halfway: b's share 0.5 + 0.5 * 0.5
    assert (first, second) == (b, a) and w_first == pytest.approx(0.75) and w_second == pytest.approx(0.25)
    assert images_at(schedule, 40) == [(b, 1.0)]


def test_schedule_at_a_keyframe_is_that_style_alone(model, styles):
    grid = (6, 8)
    codes = StyleCodes(model)
    a, b = styles
    schedule = StyleSchedule(((0, a), (8, b), (16, StyleBlend.of([a, b], [1, 1]))))
    assert schedule.code_at(0, codes, grid) is codes.code(a, grid)
    assert schedule.code_at(8, codes, grid) is codes.code(b, grid)
    mid = schedule.code_at(4, codes, grid)  # smoothstep(0.5) = 0.5: the equal blend, mixed from the cached codes
    blend = codes.code(StyleBlend.of([a, b], [1, 1]), grid)
    frame = torch.rand(1, 3, 8 * grid[0], 8 * grid[1], generator=torch.Generator().manual_seed(0))
    assert (model.stylize_tokens(frame, mid)[0] - model.stylize_tokens(frame, blend)[0]).abs().max() <= 1e-6
    assert schedule.code_at(16, codes, grid) is blend
    assert schedule.code_at(4, codes, grid) is mid  # a repeated frame is not mixed again
    assert len(codes) == 3  # a, b and their blend: one encode per keyframe style


def test_clip_stylizer_follows_the_schedule_and_splits_batches(model, content, styles):
    a, b = styles
    frames = [np.roll(content, 2 * i, axis=1) for i in range(7)]
    config = StylizerConfig(temporal_enabled=False, batch_size=4)
    scheduled = ClipStylizer(model, StyleSchedule(((0, a), (4, b))), (48, 64), config)
    out = scheduled(frames)
    assert len(out) == 7
    # frame 0 is style a alone; frames 4-6 are style b alone (one batch of the same code)
    assert (out[0] == ClipStylizer(model, a.image, (48, 64), config)(frames[:1])[0]).all()
    alone_b = ClipStylizer(model, b.image, (48, 64), config)(frames[4:])
    assert all((o == r).all() for o, r in zip(out[4:], alone_b))
    # a chunk starting at frame 4 gives the same frames
    chunk = ClipStylizer(model, StyleSchedule(((0, a), (4, b))), (48, 64), config, start_frame=4)
    assert all((o == r).all() for o, r in zip(out[4:], chunk(frames[4:])))


# ---------------------------------------------------------------------------------------------------- the sheet


def test_controls_sheet_job_writes_one_png(tmp_path, styles, capsys):
    weights = save_model(tiny_model(), tmp_path / "weights")
    paths = []
    for style in styles:
        paths.append(str(tmp_path / f"{style.name}.png"))
        save_png(paths[-1], style.image)
    content = tmp_path / "content.png"
    save_png(str(content), photo("astronaut", 40, 40))
    out = tmp_path / "controls.png"
    rc = cli_main(["controls-sheet", "-o", str(out), "--weights", str(weights), "--content", str(content),
                   "--styles", *paths, "--size", "32"])
    assert rc == 0
    sheet = load_image(str(out))
    assert sheet.shape[0] > 4 * 192 and sheet.shape[1] > 5 * 192  # 4 rows, up to 6 cells
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["controls-sheet", "-o", str(tmp_path / "sheet.jpg"), "--weights", str(weights)]) == 2


def test_style_code_cache_takes_at_most_a_quarter_of_the_available_memory(monkeypatch):
    model = tiny_model()  # its state_cache_gb alone would allow 4 × 4 GiB
    monkeypatch.setenv("MAMBAST_MEMORY_GB", "1")
    assert StyleCodes(model).budget == 2**30 / 4
    assert StyleCodes(model, budget_gb=2).budget == 2 * 2**30  # an explicit budget is taken as given

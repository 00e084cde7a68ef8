"""Files as users really have them (issue 23): real files, real codecs (PyAV), real processes.

Each test is one numbered item of docs/robustness.md's "Files as users really have them" table. Clips are tiny
(64x48, a few frames) and the model is tests/tiny_models.py's, so the file runs in well under a minute.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
import yaml

from jobs.cli import main
from models.checkpoint import save_model
from pipeline.source import open_source
from tests.media import AUDIO_RATE, add_h264, encode_frames, write_h264, write_sine
from tiny_models import TINY, tiny_model

REPO = Path(__file__).resolve().parent.parent
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def frames(count, size=(64, 48), seed=0):
    width, height = size
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (height, width + 4 * count, 3), dtype=np.uint8), (0, 0), 2)
    return [np.ascontiguousarray(base[:, 4 * i:4 * i + width]) for i in range(count)]


def write_clip(path, count=6, rate=25, audio_seconds=None, size=(64, 48)):
    with av.open(str(path), "w") as container:
        if audio_seconds:
            video = add_h264(container, size[0], size[1], rate)
            sound = container.add_stream("aac", rate=AUDIO_RATE)
            sound.layout = "stereo"
            encode_frames(container, video, frames(count, size))
            write_sine(container, sound, audio_seconds)
        else:
            write_h264(container, frames(count, size), rate=rate)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_clip(root / "clip.mp4")
    style = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8), (0, 0), 2)
    cv2.imwrite(str(root / "style.png"), style)
    save_model(tiny_model(), root / "model")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


def run_cli(capsys, argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, [line for line in captured.err.splitlines() if line.strip()], captured.out


def stylize(assets, clip, output, *extra, style=None):
    return ["stylize", clip, "--style", style or assets / "style.png", "-o", output, "--weights", assets / "model",
            "--working-size", "0", "--runner", "local", *extra]


def one_error_line(lines, *words):
    errors = [line for line in lines if line.startswith("mambast: error: ")]
    assert len(errors) == 1 and len(lines) == 1, lines
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    return errors[0]


def comment(path):
    with av.open(str(path)) as container:
        return json.loads(container.metadata["comment"])["mambast"]


# --- 1. --overwrite never removes an input or a file this tool did not write ---------------------------------


def test_overwrite_of_a_frames_folder_spares_inputs_and_other_files(assets, tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    style = folder / "s.png"
    style.write_bytes((assets / "style.png").read_bytes())
    keep = folder / "mine.png"
    keep.write_bytes((assets / "style.png").read_bytes())
    rc, lines, _ = run_cli(capsys, stylize(assets, assets / "clip.mp4", folder, "--overwrite", style=style))
    assert rc == 2
    one_error_line(lines, "s.png")
    assert sorted(os.listdir(folder)) == ["mine.png", "s.png"]

    # a folder this tool wrote is replaced, but not once a file of the user's is in it
    out = tmp_path / "frames"
    assert run_cli(capsys, stylize(assets, assets / "clip.mp4", out))[0] == 0
    written = sorted(os.listdir(out))
    assert written == [f"{n:06d}.png" for n in range(1, 7)] + ["metadata.json"]
    (out / "notes.png").write_bytes(b"the user's")
    rc, lines, _ = run_cli(capsys, stylize(assets, assets / "clip.mp4", out, "--overwrite"))
    assert rc == 2
    one_error_line(lines, "notes.png")
    assert (out / "notes.png").read_bytes() == b"the user's"
    (out / "notes.png").unlink()
    assert run_cli(capsys, stylize(assets, assets / "clip.mp4", out, "--overwrite", "--max-frames", "2"))[0] == 0
    assert sorted(os.listdir(out)) == ["000001.png", "000002.png", "metadata.json"]
    assert sorted(os.listdir(tmp_path)) == ["frames", "r"]


def test_an_output_may_not_replace_the_style_image(assets, tmp_path, capsys):
    style = tmp_path / "painting.mp4"  # a style image with a video name: the output may still not replace it
    style.write_bytes((assets / "style.png").read_bytes())
    before = style.read_bytes()
    rc, lines, _ = run_cli(capsys, stylize(assets, assets / "clip.mp4", style, "--overwrite", style=style))
    assert rc == 2
    one_error_line(lines, "painting.mp4", "input")
    assert style.read_bytes() == before


# --- 3. "%" in a file name is a file -------------------------------------------------------------------------


def test_percent_in_file_names_is_a_file_not_a_pattern(assets, tmp_path, capsys):
    clip = tmp_path / "speed 100%.mp4"
    clip.write_bytes((assets / "clip.mp4").read_bytes())
    style = tmp_path / "50% grey.png"
    style.write_bytes((assets / "style.png").read_bytes())
    out = tmp_path / "blend 50%.mp4"
    rc, lines, _ = run_cli(capsys, stylize(assets, clip, out, style=style))
    assert rc == 0, lines
    assert open_source(out).info.num_frames == 6
    # a pattern is still a pattern where no such file exists
    frames_out = tmp_path / "seq" / "%04d.png"
    frames_out.parent.mkdir()
    assert run_cli(capsys, stylize(assets, clip, frames_out, "--max-frames", "2"))[0] == 0
    assert sorted(os.listdir(frames_out.parent)) == ["0001.png", "0002.png", "metadata.json"]
    assert open_source(frames_out).info.num_frames == 2


# --- 5. YAML alias bombs and huge values -----------------------------------------------------------------------


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
) + "working_size: *i\n"


def test_yaml_alias_bomb_is_refused_in_one_line(assets, tmp_path, capsys):
    assert len(BOMB) < 600
    preset = tmp_path / "bomb.yaml"
    preset.write_text(BOMB)
    rc, lines, _ = run_cli(capsys, stylize(assets, assets / "clip.mp4", tmp_path / "o.mp4", "--preset", preset))
    assert rc == 2
    one_error_line(lines, "bomb.yaml", "alias")
    job = tmp_path / "job.yaml"
    job.write_text(f"clips: [{assets / 'clip.mp4'}]\nstyles: [{assets / 'style.png'}]\nsettings: &s {{seed: 1}}\n"
                   "items: [{clip: x, style: y, settings: *s}]\n")
    rc, lines, _ = run_cli(capsys, ["batch", job, "--check"])
    assert rc == 2
    one_error_line(lines, "job.yaml", "alias")
    assert not (tmp_path / "o.mp4").exists()


def test_huge_values_are_cut_short_in_messages(assets, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"clips": [str(assets / "clip.mp4")], "styles": [str(assets / "style.png")],
                                   "threads": "x" * 200_000, "settings": {"seed": list(range(50_000))}}))
    rc, lines, _ = run_cli(capsys, ["batch", job, "--check"])
    assert rc == 2
    assert len(one_error_line(lines, "job.yaml", "threads")) < 300


# --- 6. --every-nth keeps the clip's length --------------------------------------------------------------------


def test_every_nth_ends_where_the_source_ends(assets, tmp_path, capsys):
    clip = write_clip(tmp_path / "second.mp4", count=24, rate=24, audio_seconds=1.0)
    out = tmp_path / "third.mp4"
    assert run_cli(capsys, stylize(assets, clip, out, "--every-nth", "3"))[0] == 0
    info = open_source(out).info
    assert info.num_frames == 8
    assert info.end_pts * info.time_base == 1  # the last kept frame (21) stands for frames 21, 22 and 23
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        ends = [(p.pts + p.duration) * p.time_base for p in container.demux(stream) if p.size]
    assert max(ends) == pytest.approx(1.0, abs=1024 / AUDIO_RATE)


# --- 7. the real video stream, not a cover picture -------------------------------------------------------------


def test_the_real_video_stream_is_read_and_named(assets, tmp_path, capsys):
    clip = tmp_path / "covered.mkv"
    with av.open(str(clip), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        video = add_h264(container, 64, 48)
        encode_frames(container, cover, [np.full((48, 64, 3), 200, np.uint8)])
        encode_frames(container, video, frames(8))
    source = open_source(clip, backend="pyav")
    assert source.info.num_frames == 8 and source.info.stream_index == 1
    assert np.array_equal(next(iter(source.frames())).image.shape, (48, 64, 3))
    out = tmp_path / "out.mp4"
    rc, lines, _ = run_cli(capsys, stylize(assets, clip, out))
    assert rc == 0
    infos = [line for line in lines if line.startswith("mambast: info: ")]
    assert len(infos) == 1 and "#1" in infos[0] and "8 frames" in infos[0], lines
    assert open_source(out).info.num_frames == 8
    assert "reading #1" in comment(out)["source_stream"]


# --- 8. damaged but decodable: like ffmpeg, unless --strict ------------------------------------------------------


@pytest.mark.skipif(not (OPENCV_DATA / "tree.avi").exists(), reason="opencv-doc's tree.avi is not installed")
def test_tree_avi_is_stylized_as_far_as_it_decodes_with_one_warning(assets, tmp_path, capsys):
    tree = OPENCV_DATA / "tree.avi"  # header: 444 frames; 68 present
    out = tmp_path / "tree.mp4"
    rc, lines, _ = run_cli(capsys, stylize(assets, tree, out, "--working-size", "32", "--temporal-strength", "0",
                                           "--codec", "h264"))
    assert rc == 0, lines
    warnings = [line for line in lines if line.startswith("mambast: warning: ")]
    assert len(warnings) == 1 and "444" in warnings[0] and "68" in warnings[0], lines
    assert open_source(out).info.num_frames == 68
    assert comment(out)["source_damage"]["frames_read"] == 68
    rc, lines, _ = run_cli(capsys, stylize(assets, tree, tmp_path / "strict.mp4", "--strict"))
    assert rc == 2
    one_error_line(lines, "tree.avi", "444")
    assert sorted(os.listdir(tmp_path)) == ["tree.mp4"]


def test_a_cut_mp4_gives_its_decodable_frames_and_undecodable_files_still_fail(assets, tmp_path, capsys):
    from tests.media import make_truncated

    cut = make_truncated("cut.mp4", {"movflags": "faststart"})(tmp_path)
    out = tmp_path / "out.mp4"
    rc, lines, _ = run_cli(capsys, stylize(assets, cut, out, "--temporal-strength", "0"))
    assert rc == 0, lines
    assert len([line for line in lines if "warning" in line]) == 1
    written = open_source(out).info.num_frames
    assert 0 < written < 30 and comment(out)["source_damage"]["frames_read"] == written
    rc, lines, _ = run_cli(capsys, stylize(assets, cut, tmp_path / "strict.mp4", "--strict"))
    assert rc == 2 and "truncated" in one_error_line(lines, "cut.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    rc, lines, _ = run_cli(capsys, stylize(assets, junk, tmp_path / "j.mp4"))
    assert rc == 2
    one_error_line(lines, "junk.mp4")


# --- 12. the help names blends and schedules -----------------------------------------------------------------


def test_stylize_help_documents_blends_and_schedules():
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "stylize", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "a.jpg*0.7+b.jpg*0.3" in result.stdout and "0:a.jpg,5s:b.jpg" in result.stdout
    assert "--strict" in result.stdout


# --- 4. work is checked against the memory there is -----------------------------------------------------------


def write_ffv1(path, size, count=2):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "bgr0"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 40 * i % 256, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_work_that_does_not_fit_in_memory_is_refused_saying_what_fits(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAMBAST_MEMORY_GB", "1")
    thin = write_ffv1(tmp_path / "thin.mkv", (4095, 17))
    rc, lines, _ = run_cli(capsys, stylize(assets, thin, tmp_path / "o.mp4", "--working-size", "128"))
    assert rc == 2
    line = one_error_line(lines, "thin.mkv", "4095x17", "working size of at most")
    assert "30833" in line  # what the working size would have made of it
    small = write_ffv1(tmp_path / "small.mkv", (160, 120))
    rc, lines, _ = run_cli(capsys, stylize(assets, small, tmp_path / "o.mp4", "--working-size", "2160"))
    assert rc == 2
    one_error_line(lines, "small.mkv", "GB")
    assert sorted(os.listdir(tmp_path)) == ["small.mkv", "thin.mkv"]


def test_a_huge_model_config_is_refused_before_it_is_built(assets, tmp_path):
    from models.checkpoint import load_model
    from models.errors import UserError

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes((assets / "model" / "model.safetensors").read_bytes())
    config = yaml.safe_load((assets / "model" / "config.yaml").read_text())
    config["model"]["d_model"] = 30000
    (weights / "config.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    with pytest.raises(UserError, match="config.yaml: .*d_model 30000.*GB"):
        load_model(weights)
    config["model"]["d_model"] = 2000  # fits in memory, but is not the model the weights are for: named as such
    (weights / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="config.yaml: .*d_model 2000.*does not match the weights"):
        load_model(weights)
    assert time.perf_counter() - started < 5  # nothing of the model's size was allocated


# --- 9. one image costs one frame; clips stay chunk-exact ---------------------------------------------------------


def test_one_image_and_live_frames_run_alone_and_clips_stay_padded():
    from pipeline import Stylizer
    from pipeline.settings import Settings
    from pipeline.stylizer import ClipStylizer

    model = tiny_model()
    seen = []
    real = model.stylize_tokens
    model.stylize_tokens = lambda x, *args, **kwargs: seen.append(x.shape[0]) or real(x, *args, **kwargs)
    style = np.full((16, 16, 3), (200, 80, 30), np.uint8)
    image = frames(1, (40, 32))[0]
    stylizer = Stylizer(model, style=style, batch_size=4)
    stylizer.stylize(image)
    assert seen == [1]
    list(stylizer.stream(frames(2, (40, 32))))
    assert seen == [1, 1, 1]
    config = Settings(working_size=0, temporal_strength=0).stylizer_config()  # what every clip runner uses
    assert config.pad_batches
    ClipStylizer(model, style, (32, 40), config)([image])
    assert seen[-1] == 4


# --- 11. OS errors, encoder errors, SIGTERM, API input checks: one line, nothing left --------------------------


@pytest.mark.parametrize("output, words", [
    ("afile/out.mp4", ["afile"]),                       # a parent that is a file
    ("x" * 300 + ".mp4", ["name too long"]),            # ENAMETOOLONG
    ("/proc/out.mp4", ["/proc/out.mp4"]),               # a filesystem that takes no files
    ("o.mp4 --pix-fmt yuv999", ["yuv999", "not a pixel format"]),
    ("o.mp4 --pix-fmt rgb24", ["h264", "rgb24", "yuv420p"]),
    ("o.mov --codec prores --pix-fmt yuv420p", ["prores", "yuv420p"]),
])
def test_os_and_encoder_errors_are_one_line_and_leave_nothing(assets, tmp_path, capsys, output, words):
    (tmp_path / "afile").write_text("a file, not a folder")
    path, *extra = output.split()
    target = path if path.startswith("/") else tmp_path / path
    rc, lines, _ = run_cli(capsys, stylize(assets, assets / "clip.mp4", target, *extra))
    assert rc == 2, lines
    one_error_line(lines, *words)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_sigterm_cleans_up_like_ctrl_c(assets, tmp_path):
    clip = write_ffv1(tmp_path / "long.mkv", (64, 48), count=3000)  # ~10 s of writing at ~300 fps
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "MAMBAST_QUIET": "1"}
    argv = stylize(assets, clip, out / "o.mp4", "--tune-steps", "0")
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        run = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, argv)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not os.listdir(out) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the hidden temporary output appears when the run has started writing
        time.sleep(1.0)
        assert run.poll() is None, "the run ended before it could be signalled: make the clip longer"
        run.send_signal(sig)
        _, err = run.communicate(timeout=120)
        assert run.returncode == code, err
        assert os.listdir(out) == [], os.listdir(out)  # nothing half-written, no temporary left
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_api_input_checks_raise_user_errors_not_raw_exceptions():
    from models.errors import UserError
    from pipeline import Stylizer

    model = tiny_model()
    style = np.full((16, 16, 3), 100, np.uint8)
    image = np.zeros((8, 8, 3), np.uint8)
    for make in (lambda: Stylizer(model, style=style, seed="x"), lambda: Stylizer(model, style=style, seed=1.5),
                 lambda: Stylizer(model, style=style, batch_size=True), lambda: Stylizer(5, style=style),
                 lambda: Stylizer(model, style=style).stylize(np.zeros((0, 0, 3), np.uint8)),
                 lambda: Stylizer(model, style=style).stylize(image, frame="x"),
                 lambda: Stylizer(model, style=style).stylize(image, frame=-1),
                 lambda: Stylizer(model, style=style).stylize(np.zeros((0, 8, 8, 3), np.uint8)),
                 lambda: Stylizer(model, style=style).stylize(torch.zeros(0, 8, 8, 3)),
                 lambda: list(Stylizer(model, style=style).stream(None))):
        with pytest.raises(UserError):
            make()


def test_one_frame_bench_times_both_paths_in_one_run(capsys):
    """Issue 23 item 9's figure comes from `mambast bench one-frame`; here at a tiny size, one run each."""
    assert main(["bench", "one-frame", "--size", "96x64", "--working-size", "64", "--runs", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["runs"]) == {"unpadded", "padded"} and all(len(v) == 1 for v in report["runs"].values())
    assert report["speedup"] > 0 and report["batch_size"] == 4

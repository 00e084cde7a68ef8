"""Robustness: bad inputs, hostile files and resource limits (issue "Robustness").

Every bad input must give a non-zero exit (CLI: `jobs.cli.main` returns 2 for a UserError) with exactly one
line on stderr naming the file / entry / key and the problem, and leave nothing at the output path (no file, no
temporary leftovers in the output folder). Style images in odd formats must work. Tiny inputs (32x24 clips of a
few frames, a tiny random model) keep the file well under a minute. See docs/robustness.md for the table.
"""
import errno
import os
import pickle
import re
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
from PIL import Image
from safetensors.torch import save_file

from jobs.cli import main
from models.checkpoint import save_model
from models.errors import UserError
from tests.media import write_h264
from tiny_models import TINY, tiny_model

REPO = Path(__file__).resolve().parent.parent
PWN = "!!python/object/apply:os.system ['touch {}']"


# --- fixtures ------------------------------------------------------------------------------------------


def write_clip(path, count=3, size=(32, 24), audio_only=False, video=True):
    width, height = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        if audio_only:
            sound = container.add_stream("aac", rate=48000)
            sound.layout = "stereo"
            wave = np.zeros((2, 1024), np.float32)
            for i in range(10):
                frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 48000, i * 1024
                for p in sound.encode(frame):
                    container.mux(p)
            for p in sound.encode():
                container.mux(p)
            return
        images = [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 2)
                  for _ in range(count if video else 0)]
        write_h264(container, images, size=(width, height))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    write_clip(root / "clip.mp4")
    rng = np.random.default_rng(1)
    cv2.imwrite(str(root / "style.png"), cv2.GaussianBlur(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), (0, 0), 2))
    save_model(tiny_model(), root / "model")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def run_cli(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def assert_refused(capsys, argv, *words, rc=2):
    code, lines = run_cli(capsys, argv)
    assert code == rc, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("mambast: error: "), lines
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def stylize_args(assets, clip, output, *extra, style=None):
    return ["stylize", clip, "--style", style or assets / "style.png", "-o", output, "--weights", assets / "model",
            "--working-size", "0", "--runner", "local", *extra]


# --- stylize: bad inputs ---------------------------------------------------------------------------------


def test_truncated_container(assets, tmp_path, out, capsys):
    clip = tmp_path / "cut.mp4"
    write_clip(clip, count=6)
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 3])
    assert_refused(capsys, stylize_args(assets, clip, out / "o.mp4"), "cut.mp4")
    assert os.listdir(out) == []


def test_corrupt_container(assets, tmp_path, out, capsys):
    clip = tmp_path / "junk.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000))
    assert_refused(capsys, stylize_args(assets, clip, out / "o.mp4"), "junk.mp4")
    assert os.listdir(out) == []


def test_zero_byte_file(assets, tmp_path, out, capsys):
    clip = tmp_path / "empty.mp4"
    clip.write_bytes(b"")
    assert_refused(capsys, stylize_args(assets, clip, out / "o.mp4"), "empty.mp4")
    assert os.listdir(out) == []


def test_zero_frame_video(assets, tmp_path, out, capsys):
    clip = tmp_path / "noframes.mkv"
    write_clip(clip, video=False)
    assert_refused(capsys, stylize_args(assets, clip, out / "o.mp4"), "noframes.mkv")
    assert os.listdir(out) == []


def test_audio_only_file(assets, tmp_path, out, capsys):
    clip = tmp_path / "sound.m4a"
    write_clip(clip, audio_only=True)
    assert_refused(capsys, stylize_args(assets, clip, out / "o.mp4"), "sound.m4a")
    assert os.listdir(out) == []


def test_empty_image_folder(assets, tmp_path, out, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    assert_refused(capsys, stylize_args(assets, frames, out / "o.mp4"), "frames")
    assert os.listdir(out) == []


def test_one_by_one_frames_work_or_are_refused_clearly(assets, tmp_path, out, capsys):
    frames = tmp_path / "tiny"
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f"{i:06d}.png"), np.full((1, 1, 3), 100 * i, np.uint8))
    target = out / "o"
    code, lines = run_cli(capsys, stylize_args(assets, frames, target))
    if code == 0:
        assert len(sorted(target.glob("*.png"))) == 2
    else:
        assert code == 2 and len(lines) == 1 and "tiny" in lines[0], lines
        assert os.listdir(out) == []


def test_missing_style_file(assets, out, capsys):
    assert_refused(capsys, stylize_args(assets, assets / "clip.mp4", out / "o.mp4", style=out.parent / "nope.png"),
                   "nope.png")
    assert os.listdir(out) == []


def test_corrupt_style_image(assets, tmp_path, out, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    assert_refused(capsys, stylize_args(assets, assets / "clip.mp4", out / "o.mp4", style=bad), "bad.png")
    assert os.listdir(out) == []


def test_huge_style_image_is_refused_or_scaled_never_oom(assets, tmp_path, out, capsys):
    """A 12000x12000 constant PNG (the largest cheap to make here; 16000 needs ~0.8 GB just to create)."""
    big = tmp_path / "huge.png"
    cv2.imwrite(str(big), np.full((12000, 12000), 128, np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    target = out / "o.mp4"
    code, lines = run_cli(capsys, stylize_args(assets, assets / "clip.mp4", target, style=big))
    if code == 0:
        assert target.exists()
    else:
        assert code == 2 and len(lines) == 1 and "huge.png" in lines[0], lines
        assert os.listdir(out) == []


@pytest.mark.parametrize("kind", ["gray", "cmyk", "16bit", "rgba", "gif"])
def test_odd_style_images_work(assets, tmp_path, out, capsys, kind):
    rng = np.random.default_rng(2)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), (0, 0), 2)
    if kind == "gray":
        path = tmp_path / "s.png"
        Image.fromarray(rgb[..., 0]).save(path)
    elif kind == "cmyk":
        path = tmp_path / "s.jpg"
        Image.fromarray(rgb).convert("CMYK").save(path)
    elif kind == "16bit":
        path = tmp_path / "s.png"
        cv2.imwrite(str(path), rgb.astype(np.uint16) * 257)
    elif kind == "rgba":
        path = tmp_path / "s.png"
        Image.fromarray(np.dstack([rgb, rgb[..., 0]])).save(path)
    else:
        path = tmp_path / "s.gif"
        frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    target = out / "o.mp4"
    code, lines = run_cli(capsys, stylize_args(assets, assets / "clip.mp4", target, style=path))
    assert code == 0, lines
    assert target.exists()


# --- stylize: output paths --------------------------------------------------------------------------------


def test_output_is_input(assets, tmp_path, capsys):
    clip = tmp_path / "same.mp4"
    write_clip(clip)
    before = clip.read_bytes()
    assert_refused(capsys, stylize_args(assets, clip, clip, "--overwrite"), "same.mp4", "input")
    assert clip.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["same.mp4"]


def test_output_folder_missing(assets, tmp_path, capsys):
    target = tmp_path / "nowhere" / "o.mp4"
    assert_refused(capsys, stylize_args(assets, assets / "clip.mp4", target), "nowhere", "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_existing_output_without_overwrite(assets, out, capsys):
    target = out / "o.mp4"
    target.write_bytes(b"precious")
    assert_refused(capsys, stylize_args(assets, assets / "clip.mp4", target), "o.mp4", "exists")
    assert target.read_bytes() == b"precious"
    assert os.listdir(out) == ["o.mp4"]


def test_disk_full_mid_write(assets, out, capsys, monkeypatch):
    from pipeline import sink

    original, calls = sink._VideoWriter._encode, []

    def encode(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sink._VideoWriter, "_encode", encode)
    target = out / "o.mp4"
    code, lines = run_cli(capsys, stylize_args(assets, assets / "clip.mp4", target))
    assert code != 0
    assert len(lines) == 1 and "space" in lines[0].lower(), lines
    assert os.listdir(out) == []


def test_interrupted_run_leaves_nothing_complete(assets, tmp_path, out):
    clip = tmp_path / "long.mp4"
    write_clip(clip, count=150)
    target = out / "o.mp4"
    args = stylize_args(assets, clip, target)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None and not os.listdir(out):
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not target.exists()
    assert all(".partial" in name for name in os.listdir(out)), os.listdir(out)


# --- presets, job files and recipes: YAML ------------------------------------------------------------------


def test_preset_with_python_tag(assets, tmp_path, out, capsys):
    marker = tmp_path / "pwned"
    preset = tmp_path / "evil.yaml"
    preset.write_text(f"seed: {PWN.format(marker)}\n")
    assert_refused(capsys, stylize_args(assets, assets / "clip.mp4", out / "o.mp4", "--preset", preset), "evil.yaml")
    assert not marker.exists() and os.listdir(out) == []


def test_preset_unknown_key(assets, tmp_path, out, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("sharpness: 3\n")
    assert_refused(capsys, stylize_args(assets, assets / "clip.mp4", out / "o.mp4", "--preset", preset),
                   "p.yaml", "sharpness")
    assert os.listdir(out) == []


def batch_job(assets, tmp_path, **fields):
    job = {"output_dir": "out", "output": "{clip}_{style}.mkv", "weights": str(assets / "model"),
           "clips": [str(assets / "clip.mp4")], "styles": [str(assets / "style.png")], **fields}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("fields,words", [
    ({"colour": "red"}, ["job.yaml", "colour"]),
    ({"threads": "two"}, ["job.yaml", "threads"]),
    ({"clips": ["missing.mp4"]}, ["job.yaml", "clips[0]", "missing.mp4"]),
    ({"styles": ["nostyle.png"]}, ["job.yaml", "styles[0]", "nostyle.png"]),
    ({"output": "same.mkv", "styles": None, "clips": None, "items": None}, ["job.yaml", "items[1]", "same.mkv"]),
    ({"output": "../escape_{clip}_{style}.mkv"}, ["job.yaml", "output", "escapes"]),
], ids=["unknown-key", "wrong-type", "missing-clip", "missing-style", "duplicate-output", "dotdot-escape"])
def test_bad_job_files(assets, tmp_path, capsys, fields, words):
    if "items" in fields:
        fields = {"output": "same.mkv", "items": [{"clip": str(assets / "clip.mp4"), "style": str(assets / "style.png")},
                                                  {"clip": str(assets / "clip.mp4"), "style": str(assets / "style.png")}]}
        job = {"output_dir": "out", "weights": str(assets / "model"), **fields}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
    else:
        path = batch_job(assets, tmp_path, **fields)
    assert_refused(capsys, ["batch", path, "--check"], *words)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("escape*"))


def test_job_file_with_python_tag(assets, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "job.yaml"
    path.write_text(f"output_dir: out\nthreads: {PWN.format(marker)}\n")
    assert_refused(capsys, ["batch", path, "--check"], "job.yaml")
    assert not marker.exists() and not (tmp_path / "out").exists()


def recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"out: {tmp_path / 'run'}\ndata: {tmp_path / 'data'}\n" + text)
    return path


@pytest.mark.parametrize("text,words", [
    ("steps: {pwn}\n", ["recipe.yaml"]),
    ("learning_rate: 0.1\n", ["recipe.yaml", "learning_rate"]),
    ("steps: many\n", ["recipe.yaml", "steps"]),
    ("steps: 1\n", ["data", "missing"]),
], ids=["python-tag", "unknown-key", "wrong-type", "missing-data"])
def test_bad_train_recipes(tmp_path, capsys, text, words):
    marker = tmp_path / "pwned"
    path = recipe(tmp_path, text.replace("{pwn}", PWN.format(marker)))
    assert_refused(capsys, ["train", path], *words)
    assert not marker.exists() and not (tmp_path / "run").exists()


# --- checkpoints ---------------------------------------------------------------------------------------------


def official_files(folder, assets, mutate=None, part="mamba"):
    model = tiny_model()
    paths = {}
    for name, module in (("mamba", model.mamba), ("decoder", model.decode), ("embedding", model.embedding)):
        sd = dict(module.state_dict())
        if mutate and name == part:
            mutate(sd)
        paths[name] = folder / f"{name}_iter_1.pth"
        torch.save(sd, paths[name])
    return paths


def convert_args(paths, assets, output):
    return ["convert-official", "--mamba", paths["mamba"], "--decoder", paths["decoder"], "--embedding",
            paths["embedding"], "--config", assets / "tiny.yaml", "-o", output]


def drop_key(sd):
    sd.pop(next(iter(sd)))


def extra_key(sd):
    sd["surprise.weight"] = torch.zeros(2)


def wrong_shape(sd):
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim >= 1)
    sd[key] = torch.zeros(*[s + 1 for s in sd[key].shape])


def nan(sd):
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")


@pytest.mark.parametrize("mutate,words", [(drop_key, ["missing"]), (extra_key, ["unexpected", "surprise.weight"]),
                                          (wrong_shape, ["shape"]), (nan, ["nan"])],
                         ids=["missing-keys", "extra-keys", "wrong-shapes", "nans"])
def test_convert_official_bad_checkpoints(assets, tmp_path, capsys, mutate, words):
    paths = official_files(tmp_path, assets, mutate)
    assert_refused(capsys, convert_args(paths, assets, tmp_path / "converted"), "mamba_iter_1.pth", *words)
    assert not (tmp_path / "converted").exists()


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_official_refuses_code_running_pickle(assets, tmp_path, capsys):
    marker = tmp_path / "pwned"
    paths = official_files(tmp_path, assets)
    with open(paths["decoder"], "wb") as f:
        pickle.dump({"decode.0.weight": Boom(marker)}, f)
    assert_refused(capsys, convert_args(paths, assets, tmp_path / "converted"), "decoder_iter_1.pth")
    assert not marker.exists()
    assert not (tmp_path / "converted").exists()


def test_convert_official_garbage_file(assets, tmp_path, capsys):
    paths = official_files(tmp_path, assets)
    paths["embedding"].write_bytes(os.urandom(300))
    assert_refused(capsys, convert_args(paths, assets, tmp_path / "converted"), "embedding_iter_1.pth")
    assert not (tmp_path / "converted").exists()


def bad_weights_folder(assets, tmp_path, how):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.yaml").write_text((assets / "model" / "config.yaml").read_text())
    sd = dict(tiny_model().state_dict())
    if how == "garbage":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
        return folder
    {"missing": drop_key, "extra": extra_key, "shape": wrong_shape, "nan": nan}[how](sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("how", ["garbage", "missing", "extra", "shape", "nan"])
def test_stylize_bad_weights_folder(assets, tmp_path, out, capsys, how):
    folder = bad_weights_folder(assets, tmp_path, how)
    args = stylize_args(assets, assets / "clip.mp4", out / "o.mp4")
    args[args.index("--weights") + 1] = folder
    assert_refused(capsys, args, "model.safetensors")
    assert os.listdir(out) == []


# --- the Python API -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["nan", "missing"])
def test_api_bad_weights(assets, tmp_path, how):
    from pipeline import Stylizer

    folder = bad_weights_folder(assets, tmp_path, how)
    with pytest.raises(UserError, match="model.safetensors"):
        Stylizer(folder, style=str(assets / "style.png"), device="cpu")


def test_api_missing_style(assets, tmp_path):
    from pipeline import Stylizer

    with pytest.raises(UserError, match="nope.png"):
        Stylizer(str(assets / "model"), style=str(tmp_path / "nope.png"), device="cpu")


@pytest.mark.parametrize("frame", [np.zeros((24, 32), np.uint8), np.zeros((24, 32, 4), np.uint8),
                                   np.zeros((24, 32, 3), np.int32), "frame.png"],
                         ids=["2d", "rgba", "int32", "string"])
def test_api_bad_frames(assets, frame):
    from pipeline import Stylizer

    stylizer = Stylizer(str(assets / "model"), style=str(assets / "style.png"), device="cpu")
    with pytest.raises(UserError, match="frame"):
        stylizer.stylize(frame)


def test_api_one_by_one_frame(assets):
    from pipeline import Stylizer

    stylizer = Stylizer(str(assets / "model"), style=str(assets / "style.png"), device="cpu")
    try:
        assert stylizer.stylize(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1, 3)
    except UserError as error:
        assert "1x1" in str(error) or "small" in str(error)


# --- static check ---------------------------------------------------------------------------------------------


def test_no_unsafe_calls_in_the_source():
    problems = []
    for folder in ("models", "pipeline", "jobs"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                where = f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                if re.search(r"\byaml\.load\(", code) and "SafeLoader" not in code:
                    problems.append(where)
                if re.search(r"\bpickle\.loads?\(|\bos\.system\(|shell\s*=\s*True", code):
                    problems.append(where)
                if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                    problems.append(where)
    assert problems == []

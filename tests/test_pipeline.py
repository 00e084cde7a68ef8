"""The in-process video pipeline (pipeline/local_runner.py, stylize_job.py, chunks.py) and `mambast stylize` on
real files encoded here with PyAV, with a tiny random model whose output follows its input (so that equal frames mean something)."""

import json
import os
import re
import threading
from argparse import Namespace
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.stylize import DEFAULTS, choose_runner, resolve_settings
from models.checkpoint import save_model
from models.errors import UserError
from models.mambast import MambaST, MambaSTConfig
from pipeline.chunks import ChunkStylizer, plan_chunks
from pipeline.local_runner import run_local, run_preview, spread
from pipeline.settings import RUN_KEYS, Settings, preset_names, read_preset
from pipeline.stylize_job import StylizeJob, check_job
from pipeline.source import open_source
from tests.media import AUDIO_RATE, make_audio_only, make_text, make_truncated, make_zero_frames, write_sine

BT709_TV = dict(color_range=1, colorspace=1, color_primaries=1, color_trc=1)
TINY = dict(d_model=32, d_state=4, decoder_channels=[16, 8, 8], n_encoder_layers=1, n_decoder_layers=1)


# --- A tiny model and real media ---------------------------------------------------------------------


def save_tiny_model(folder):
    """A random tiny MambaST, its patch embedding and CNN decoder scaled up so that the output varies with the
    content and the temporal smoothing visibly changes it (plain random weights give a near-constant image)."""
    torch.manual_seed(0)
    model = MambaST(MambaSTConfig(**TINY))
    with torch.no_grad():
        model.embedding.proj.weight.mul_(5)
        for layer in model.decode:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.mul_(3)
        model.decode[-1].bias.fill_(0.5)
    return str(save_model(model, folder))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    path = tmp_path_factory.mktemp("style") / "style.png"
    noise = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.GaussianBlur(noise, (0, 0), 2))
    return str(path)


def texture(width, height, seed=0):
    """Smooth colour noise: smooth enough that panning it is never taken for a shot cut."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 8), None, 0, 255, cv2.NORM_MINMAX)


def moving(index, width, height, with_alpha=False):
    """Frame `index` of a smooth texture panning 2 px per frame (DIS flow finds it), optionally with alpha."""
    base = texture(width + 2 * 16, height)
    image = np.ascontiguousarray(base[:, 2 * (index % 16): 2 * (index % 16) + width])
    if not with_alpha:
        return image
    x = np.arange(width)[None, :].repeat(height, 0)
    return np.dstack((image, ((x * 250 // max(1, width - 1) + 7 * index) % 256).astype(np.uint8)))


def write_clip(path, count=12, size=(64, 48), codec="libx264", pix_fmt="yuv420p", rate=Fraction(25),
               time_base=None, pts=None, audio=False, colour=None, options=None):
    """Encode a clip with PyAV (exact timestamps; AAC audio as long as the video if asked); returns its frames."""
    width, height = size
    time_base = time_base or 1 / rate
    pts = pts or list(range(count))
    with_alpha = pix_fmt.startswith("yuva")
    images = [moving(i, width, height, with_alpha) for i in range(len(pts))]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"x264-params": "log-level=error", **(options or {})} if codec == "libx264" else {}
        for name, value in (colour or {}).items():
            setattr(stream.codec_context, name, value)
        sound = container.add_stream("aac", rate=AUDIO_RATE) if audio else None
        if sound:
            sound.layout = "stereo"
        for image, frame_pts in zip(images, pts):
            frame = av.VideoFrame.from_ndarray(image, format="rgba" if with_alpha else "rgb24")
            for name, value in (colour or {}).items():
                setattr(frame, name, value)
            frame.pts, frame.time_base = frame_pts, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound:
            end = (pts[-1] + (pts[-1] - pts[-2] if len(pts) > 1 else 1)) * time_base
            write_sine(container, sound, float(end))
    return images


def decode(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def probe(path):
    return open_source(str(path), backend="pyav").info


def times(info):
    return [(p - info.pts[0]) * info.time_base for p in info.pts]


def audio_span(path):
    """(codec, start s, end s, packet count) of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        first, last = packets[0], packets[-1]
        return (stream.codec_context.name, first.pts * first.time_base,
                (last.pts + last.duration) * last.time_base, len(packets))


def comment(path):
    with av.open(str(path)) as container:
        tags = {key.lower(): value for key, value in container.metadata.items()}  # Matroska spells it COMMENT
        return json.loads(tags["comment"])["mambast"]


JOB_FIELDS = ("start", "end", "every_nth", "max_frames", "overwrite", "device")


def job(clip, style, output, weights, **values):
    """A job on the tiny test clips, run at their own size unless asked (the default 512 would enlarge them ~100×).
    `values`: the job's frame selection and device, and settings."""
    fields = {key: values.pop(key) for key in JOB_FIELDS if key in values}
    return StylizeJob(input=str(clip), style=style, output=str(output), weights=weights,
                      settings=Settings(**{"working_size": 0} | values), **fields)


def no_pipeline_threads():
    return not [t for t in threading.enumerate() if t.name.startswith("mambast-")]


# --- Chunk planning ------------------------------------------------------------------------------------


def test_plan_chunks_counts_in_the_selected_sequence():
    chunks = plan_chunks(range(1, 30, 3), (), chunk_frames=4, lead_in=2)  # 10 frames: 3 near-equal chunks
    assert [(list(c.lead_in), list(c.kept)) for c in chunks] == [
        ([], [1, 4, 7]), ([4, 7], [10, 13, 16, 19]), ([16, 19], [22, 25, 28])]
    assert list(chunks[1].indices) == [4, 7, 10, 13, 16, 19]
    # a cut at clip frame 12 starts a chunk at the first selected frame after it (13)
    assert [c.kept.start for c in plan_chunks(range(1, 30, 3), (12,), chunk_frames=6, lead_in=2)] == [1, 13]
    # lead-in longer than what precedes the chunk
    assert [list(c.lead_in) for c in plan_chunks(range(5, 8), (), chunk_frames=1, lead_in=8)] == [[], [5], [5, 6]]
    assert plan_chunks(range(0), (), 4, 2) == []
    with pytest.raises(ValueError):
        plan_chunks(range(4), (), 0, 2)


def test_spread_picks_evenly_from_first_to_last():
    assert spread(range(0, 100, 2), 3) == [0, 48, 98]  # positions 0, 24.5 -> 24, 49
    assert spread(range(5), 9) == [0, 1, 2, 3, 4]
    assert spread(range(10, 20), 1) == [15]


# --- Faithful output -----------------------------------------------------------------------------------


def test_run_keeps_count_rational_fps_duration_audio_and_settings(tmp_path, weights, style):
    clip = tmp_path / "ntsc.mp4"
    write_clip(clip, count=12, rate=Fraction(30000, 1001), audio=True)
    out = tmp_path / "out.mp4"
    summary = run_local(job(clip, style, out, weights, seed=3), progress=False)

    source, result = probe(clip), probe(out)
    assert summary.frames == result.num_frames == 12 and summary.audio == "kept"
    assert result.fps == Fraction(30000, 1001)
    assert times(result) == times(source)
    assert result.duration_s == pytest.approx(source.duration_s, abs=1e-9)
    assert audio_span(out) == audio_span(clip)  # the audio packets are copied, so the span is exactly the same
    settings = comment(out)
    assert settings["job"]["seed"] == 3 and settings["job"]["weights"] == weights
    assert settings["runner"] == "local" and settings["stylizer"]["temporal"]["strength"] == 0.65


def test_selected_frames_keep_their_timestamps_and_audio_stays_under_them(tmp_path, weights, style):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=12, audio=True)
    out = tmp_path / "out.mp4"
    run_local(job(clip, style, out, weights, start=2, every_nth=3, max_frames=3), progress=False)
    source, result = probe(clip), probe(out)
    assert result.num_frames == 3
    assert [p * result.time_base for p in result.pts] == [source.pts[i] * source.time_base for i in (2, 5, 8)]
    _, start, end, _ = audio_span(out)
    assert start <= Fraction(2, 25) < start + Fraction(1024, AUDIO_RATE)
    # frame 8 stands for frames 8, 9 and 10 (every 3rd): it is shown until frame 11, and the audio ends there too
    assert result.end_pts * result.time_base == Fraction(11, 25)
    assert end == pytest.approx(11 / 25, abs=1024 / AUDIO_RATE)


@pytest.mark.parametrize("size, codec, suffix", [((642, 362), "libx264", ".mp4"), ((362, 642), "libx264", ".mp4"),
                                                 ((63, 47), "ffv1", ".mkv")])
def test_odd_and_portrait_sizes_are_kept_exactly(tmp_path, weights, style, size, codec, suffix):
    clip = tmp_path / f"in{suffix}"
    write_clip(clip, count=3, size=size, codec=codec, pix_fmt="yuv420p" if codec == "libx264" else "bgr0")
    out = tmp_path / f"out{suffix}"
    run_local(job(clip, style, out, weights, working_size=48), progress=False)
    result = probe(out)
    assert (result.width, result.height, result.num_frames) == (*size, 3)
    assert decode(out)[0].shape == (size[1], size[0], 3)


def test_vfr_timestamps_are_preserved(tmp_path, weights, style):
    clip = tmp_path / "vfr.mp4"
    pts = [0, 40, 80, 200, 210, 260, 400, 401, 450, 600]
    write_clip(clip, pts=pts, time_base=Fraction(1, 1000), rate=Fraction(24),
               options={"x264-params": "log-level=error:bframes=0"})
    out = tmp_path / "out.mp4"
    run_local(job(clip, style, out, weights), progress=False)
    source, result = probe(clip), probe(out)
    assert result.is_vfr and times(result) == times(source) == [Fraction(p, 1000) for p in pts]
    assert result.duration_s == pytest.approx(source.duration_s, abs=1e-9)


def test_colour_tags_are_kept(tmp_path, weights, style):
    clip = tmp_path / "bt709.mp4"
    write_clip(clip, count=4, colour=BT709_TV)
    out = tmp_path / "out.mp4"
    run_local(job(clip, style, out, weights), progress=False)
    result = probe(out)
    assert (result.color_range, result.colorspace, result.color_primaries, result.color_trc) == (1, 1, 1, 1)


def test_prores_4444_keeps_the_source_alpha(tmp_path, weights, style):
    clip = tmp_path / "alpha.mov"
    write_clip(clip, count=5, codec="prores_ks", pix_fmt="yuva444p10le")
    out = tmp_path / "out.mov"
    run_local(job(clip, style, out, weights, codec="prores"), progress=False)
    result = probe(out)
    assert result.has_alpha and result.num_frames == 5
    source_alpha = [f.alpha for f in open_source(str(clip), backend="pyav").frames()]
    output_alpha = [f.alpha for f in open_source(str(out), backend="pyav").frames()]
    assert all(np.array_equal(a, b) for a, b in zip(source_alpha, output_alpha))


def test_png_sequence_gets_the_stylized_rgb_with_the_source_alpha(tmp_path, weights, style):
    frames_in = tmp_path / "frames_in"
    frames_in.mkdir()
    images = [moving(i, 64, 48, with_alpha=True) for i in range(6)]
    for number, rgba in enumerate(images, 1):
        cv2.imwrite(str(frames_in / f"{number:04d}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    out = tmp_path / "frames_out"
    summary = run_local(job(frames_in / "%04d.png", style, out, weights), progress=False)
    assert summary.audio.startswith("none")

    render = check_job(job(frames_in / "%04d.png", style, out, weights))
    chunk = plan_chunks(render.selection, (), len(render.selection), 0)[0]
    expected = list(ChunkStylizer.load(weights).stylize(chunk, render.source.frames(), render.style,
                                                         render.frame_shape, render.config))
    written = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert written == [f"{n:06d}.png" for n in range(1, 7)]
    for name, want, rgba in zip(written, expected, images):
        bgra = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(bgra[..., 3], rgba[..., 3])
        assert np.array_equal(bgra[..., 2::-1], want.image)


@pytest.mark.parametrize("every_nth", [1, 2])
def test_chunked_run_equals_one_piece_bit_for_bit(tmp_path, weights, style, every_nth):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=14)
    outputs = {}
    for name, settings in {"whole": {}, "chunked": dict(chunk_frames=3, batch_size=2),
                           "no_temporal": dict(temporal_strength=0)}.items():
        out = tmp_path / f"{name}.mkv"
        run_local(job(clip, style, out, weights, codec="ffv1", every_nth=every_nth, **settings), progress=False)
        outputs[name] = np.stack(decode(out))
    assert len(outputs["whole"]) == len(range(0, 14, every_nth))
    assert np.array_equal(outputs["chunked"], outputs["whole"])
    assert (outputs["whole"] != outputs["no_temporal"]).mean() > 0.1  # the smoothing was really at work


def test_preview_writes_a_contact_sheet(tmp_path, weights, style):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=12)
    sheet = tmp_path / "sheet.png"
    summary = run_preview(job(clip, style, sheet, weights), count=3, progress=False)
    image = cv2.imread(str(sheet))
    assert summary.frames == 3 and image.shape[1] == 4 + 3 * (256 + 4)  # source | stylized | style
    third_column = image[:, 4 + 2 * (256 + 4):-4] != 255
    rows_with_style = np.flatnonzero(third_column.any(axis=(1, 2)))
    assert third_column.any(axis=2).mean() > 0.1 and rows_with_style[-1] < image.shape[0] / 2  # first row only
    with pytest.raises(UserError, match="already exists"):
        run_preview(job(clip, style, sheet, weights), count=3, progress=False)


# --- Failures: one line, nothing left behind, threads joined -------------------------------------------


def corrupt_ffv1(folder):
    """An ffv1 .mkv whose 8th frame is garbage: it probes fine and fails to decode half-way."""
    path = folder / "corrupt.mkv"
    write_clip(path, count=12, codec="ffv1", pix_fmt="bgr0")
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    position, size = packets[7]
    data[position + size // 4: position + size] = b"\xff" * (size - size // 4)
    path.write_bytes(bytes(data))
    return path


def test_decode_error_mid_run_aborts_the_output(tmp_path, weights, style):
    clip = corrupt_ffv1(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match=r"corrupt\.mkv: cannot decode frame 7"):
        run_local(job(clip, style, tmp_path / "out.mp4", weights), progress=False)
    assert sorted(os.listdir(tmp_path)) == before and no_pipeline_threads()


def test_encode_error_mid_run_aborts_the_output(tmp_path, weights, style):
    clip = tmp_path / "odd.mkv"
    write_clip(clip, count=4, size=(63, 47), codec="ffv1", pix_fmt="bgr0")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match="cannot hold 63x47"):
        run_local(job(clip, style, tmp_path / "out.mp4", weights, pix_fmt="yuv420p"), progress=False)
    assert sorted(os.listdir(tmp_path)) == before and no_pipeline_threads()


def make_good(folder):
    write_clip(folder / "in.mp4", count=4)
    return folder / "in.mp4"


def not_an_image(folder):
    (folder / "painting.png").write_text("not an image")
    return folder / "painting.png"


@pytest.mark.parametrize("make_input, make_style, output, named, problem", [
    (lambda folder: folder / "missing.mp4", None, "out.mp4", "missing.mp4", "no such file"),
    (make_text, None, "out.mp4", "notes.mp4", "not a readable video"),
    (make_zero_frames, None, "out.mp4", "empty.avi", "no frames"),
    (make_audio_only, None, "out.mp4", "voice.m4a", "not a video .*only audio"),
    (corrupt_ffv1, None, "out.mp4", "corrupt.mkv", "cannot decode frame 7"),
    (make_good, not_an_image, "out.mp4", "painting.png", "not a readable image"),
    (make_good, None, "no_such_folder/out.mp4", "out.mp4", "does not exist"),
    (make_good, None, "in.mp4", "in.mp4", "overwrite the input"),
    (make_good, None, "out.avi", "out.avi", "unknown output type"),
])
def test_cli_bad_input_is_one_clear_line_exit_2_and_nothing_written(
        tmp_path, capsys, weights, style, make_input, make_style, output, named, problem):
    clip = make_input(tmp_path)
    style_path = make_style(tmp_path) if make_style else style
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if (tmp_path / name).is_file()}
    code = main(["stylize", str(clip), "--style", str(style_path), "-o", str(tmp_path / output),
                 "--weights", weights])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("mambast: error: ") and "\n" not in err, err
    assert named in err and re.search(problem, err), err
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if (tmp_path / name).is_file()}
    assert after == before and sorted(os.listdir(tmp_path)) == sorted(before)


def test_cli_missing_weights_is_one_line_and_leaves_nothing(tmp_path, capsys, style):
    clip = make_good(tmp_path)
    code = main(["stylize", str(clip), "--style", style, "-o", str(tmp_path / "out.mp4"),
                 "--weights", str(tmp_path / "no_weights")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no_weights" in err and "\n" not in err
    assert os.listdir(tmp_path) == ["in.mp4"]


# --- The command line ---------------------------------------------------------------------------------


def test_cli_stylizes_with_preset_and_flags_and_prints_a_summary(tmp_path, capsys, weights, style):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=6)
    out = tmp_path / "out.mp4"
    code = main(["stylize", str(clip), "--style", style, "-o", str(out), "--weights", weights,
                 "--preset", "preview", "--working-size", "32", "--every-nth", "2"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and probe(out).num_frames == 3
    assert re.fullmatch(r"wrote .*out\.mp4: 3 frames at [\d.]+ fps, [\d.]+ s wall \(local runner; audio .*\)",
                        printed[-1])
    settings = comment(out)["job"]
    assert settings["working_size"] == 32 and settings["crf"] == read_preset("preview")["crf"]


def test_cli_style_strength_and_colour_preservation(tmp_path, weights, style):
    clip = tmp_path / "in.mkv"
    write_clip(clip, count=4)
    source = [f.to_ndarray(format="rgb24") for f in av.open(str(clip)).decode(video=0)]

    def stylize(name, *flags):
        out = tmp_path / name
        assert main(["stylize", str(clip), "--style", style, "-o", str(out), "--weights", weights, "--codec", "ffv1",
                     "--pix-fmt", "yuv444p", "--no-audio", "--working-size", "32", *flags]) == 0
        return [f.to_ndarray(format="rgb24") for f in av.open(str(out)).decode(video=0)]

    def chroma_error(frames):
        yuv = lambda f: cv2.cvtColor(f, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(np.float32)  # noqa: E731
        return float(np.mean([np.abs(yuv(a) - yuv(b)).mean() for a, b in zip(frames, source)]))

    untouched = stylize("s0.mkv", "--style-strength", "0")
    assert comment(tmp_path / "s0.mkv")["job"]["style_strength"] == 0
    assert all(np.abs(a.astype(int) - b).max() <= 2 for a, b in zip(untouched, source))  # only yuv444 rounding
    full, kept = stylize("s1.mkv"), stylize("pc.mkv", "--preserve-color")
    assert chroma_error(kept) < 0.5 * chroma_error(full)


def test_cli_preview_needs_a_png(tmp_path, capsys, weights, style):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=6)
    assert main(["stylize", str(clip), "--style", style, "-o", str(tmp_path / "sheet.png"), "--weights", weights,
                 "--preview", "2", "--tune-steps", "0"]) == 0
    assert cv2.imread(str(tmp_path / "sheet.png")) is not None
    assert main(["stylize", str(clip), "--style", style, "-o", str(tmp_path / "sheet.mp4"), "--weights", weights,
                 "--preview", "2"]) == 2
    assert ".png" in capsys.readouterr().err and not (tmp_path / "sheet.mp4").exists()


def test_presets_are_valid_and_default_matches_the_built_in_defaults(tmp_path):
    assert {"default", "preview", "quality"} <= set(preset_names())
    assert read_preset("default") == DEFAULTS
    for name in preset_names():
        Settings(**{k: v for k, v in read_preset(name).items() if k not in RUN_KEYS}).stylizer_config()
    (tmp_path / "bad.yaml").write_text("working_size: 256\nstrenght: 0.5\n")
    with pytest.raises(UserError, match="unknown setting 'strenght'"):
        read_preset(str(tmp_path / "bad.yaml"))
    (tmp_path / "wrong.yaml").write_text("audio: 1\n")
    with pytest.raises(UserError, match="audio: must be true or false"):
        read_preset(str(tmp_path / "wrong.yaml"))
    flags = Namespace(preset="quality", working_size=320, **{k: None for k in DEFAULTS if k != "working_size"})
    assert resolve_settings(flags)["working_size"] == 320 and resolve_settings(flags)["crf"] == 14


def test_auto_runner_is_local_for_one_chunk_and_ray_beyond(tmp_path):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=8)
    assert choose_runner(StylizeJob(str(clip), "s.png", "o.mp4"), "auto", None) == "local"
    assert choose_runner(StylizeJob(str(clip), "s.png", "o.mp4", Settings(chunk_frames=4)), "auto", None) == "ray"
    assert choose_runner(StylizeJob(str(clip), "s.png", "o.mp4"), "auto", "127.0.0.1:6379") == "ray"
    with pytest.raises(UserError, match="--address"):
        choose_runner(StylizeJob(str(clip), "s.png", "o.mp4"), "local", "127.0.0.1:6379")


# --- Memory -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_clip_length(tmp_path, weights, style):
    from jobs.bench_pipeline import peak_rss_mb  # each run in a fresh process, which reads its own peak RSS

    peaks = {}
    for count in (100, 1000):
        clip = tmp_path / f"{count}.mp4"
        write_clip(clip, count=count, size=(320, 240))
        peaks[count] = peak_rss_mb(job(clip, style, tmp_path / f"out{count}.mp4", weights, working_size=64), 1)
    assert peaks[1000] <= 1.1 * peaks[100], peaks

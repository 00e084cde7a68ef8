"""The render farm (pipeline/batch_*.py, jobs/batch.py) on real encoded clips, without Ray.

This module holds the job files, chunking, joining and local rendering; test_batch_ray.py runs the same jobs on a
real Ray cluster with real faults. Each time the output must decode to exactly the frames of a fault-free run of
the same chunks (FFV1 is lossless), with the frame count, timestamps and audio of a one-piece FrameSink write. Tiny
inputs (64x48, 24-40 frames, a tiny random model) keep the whole file near a minute on a 2-core machine.
"""
import json
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
import yaml

from models.checkpoint import load_model, save_model
from models.errors import UserError
from pipeline.batch_job import load_job
from pipeline.batch_join import join_chunks
from pipeline.batch_manifest import WorkFolder
from pipeline.batch_report import ItemReport, summary_table
from pipeline.batch_worker import ChunkRenderer, ChunkTask
from pipeline.chunks import ChunkStylizer, ClipPlan, plan_chunks, scan_clip
from pipeline.sink import FrameSink
from pipeline.source import open_source
from pipeline.styles import parse_style
from pipeline.stylizer import ClipStylizer
from media import audio_packets, write_clip
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parent.parent
CUTS_A = (14, 27)   # clip a: 40 frames at 30000/1001 fps with AAC audio, hard cuts at these frames


# --- Inputs: real clips, style images, a tiny model ------------------------------------------------------


def scene_frames(count, cuts, seed, size=(64, 48)):
    """A panning textured scene that changes completely at each cut."""
    rng = np.random.default_rng(seed)
    frames, scene = [], None
    for i in range(count):
        if i == 0 or i in cuts:
            scene = cv2.GaussianBlur(rng.integers(0, 255, (size[1], size[0] + 2 * count, 3), dtype=np.uint8), (9, 9), 3)
        frames.append(np.ascontiguousarray(scene[:, 2 * i:2 * i + size[0]]))
    return frames


@pytest.fixture(scope="module")
def assets():
    root = Path(tempfile.mkdtemp(prefix="farm-"))  # short: Ray's socket paths live under here too
    (root / "clips").mkdir()
    (root / "styles").mkdir()
    write_clip(root / "clips" / "a.mp4", count=40, images=scene_frames(40, CUTS_A, 1),
               time_base=Fraction(1001, 30000), rate=Fraction(30000, 1001), audio="aac")
    write_clip(root / "clips" / "b.mp4", count=24, images=scene_frames(24, (), 2))
    rng = np.random.default_rng(5)
    for name in ("starry", "wave"):
        image = cv2.GaussianBlur(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), (5, 5), 2)
        cv2.imwrite(str(root / "styles" / f"{name}.png"), image)
    (root / "clips" / "broken.mp4").write_bytes(b"this is not a video")
    save_model(tiny_model(), root / "model")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def write_job(folder: Path, assets: Path, name="job.yaml", **fields) -> Path:
    """A job file in `folder` rendering clip a in two styles to FFV1 (lossless), chunks of 8 frames."""
    job = {"output_dir": "out", "output": "{clip}_{style}.mkv", "weights": str(assets / "model"),
           "settings": {"working_size": 0, "codec": "ffv1", "chunk_frames": 8},
           "clips": [str(assets / "clips" / "a.mp4")],
           "styles": [str(assets / "styles" / "starry.png"),
                      f"{assets / 'styles' / 'starry.png'}*0.5+{assets / 'styles' / 'wave.png'}*0.5"]}
    job.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.dump(job, Dumper=NoAliasDumper, sort_keys=False))  # job files may not hold aliases
    return path


class NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def one_piece_frames(item):
    """The item's frames from one ClipStylizer over the whole clip: no chunks, no Ray, no faults."""
    torch.set_num_threads(1)
    source = open_source(item.clip)
    frames = [f.image for f in source.frames()]
    model = load_model(Path(item.clip).parent.parent / "model")  # the assets' tiny model
    style = parse_style(item.style.spec, fps=source.info.fps)
    return ClipStylizer(model, style, frames[0].shape[:2], item.settings.stylizer_config())(frames)


_FAULT_FREE = {}


def fault_free_frames(item):
    """The item's frames from a fault-free run of the same chunk plan in this process: one worker, in order."""
    key = (item.clip, item.style.spec, item.settings)
    if key not in _FAULT_FREE:
        folder = Path(tempfile.mkdtemp(prefix="farm-ref-"))
        worker = ChunkRenderer(ChunkStylizer.load(str(Path(item.clip).parent.parent / "model"), "cpu", threads=1))
        frames = []
        for chunk in item_chunks(item):
            path = str(folder / f"{chunk.index}.mkv")
            worker.render(ChunkTask(item.number, item.clip, item.style.spec, item.settings, chunk, path))
            frames += decode(path)
        shutil.rmtree(folder)
        _FAULT_FREE[key] = frames
    return _FAULT_FREE[key]


def item_chunks(item):
    plan = scan_clip(item.clip, item.settings.shot_threshold)
    lead_in = item.settings.stylizer_config().lead_in
    return plan_chunks(range(plan.frames), plan.cuts, item.settings.chunk_frames, lead_in)


def decode(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def assert_exact_output(item, tmp_path):
    """Frames bit-identical to a fault-free run; timestamps and audio as a one-piece FrameSink writes them."""
    expected = fault_free_frames(item)
    got = decode(item.output)
    assert len(got) == len(expected) == open_source(item.clip).info.num_frames
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    source = open_source(item.clip)
    one_piece = tmp_path / f"one_piece_{item.number}.mkv"
    with FrameSink(str(one_piece), like=source.info, codec="ffv1", overwrite=True,
                   audio_from=item.clip if source.info.has_audio else None) as sink:
        for frame in source.frames():
            sink.write(frame)
    ours, theirs = open_source(item.output).info, open_source(str(one_piece)).info
    assert (ours.pts, ours.end_pts, ours.fps, ours.time_base) == (theirs.pts, theirs.end_pts, theirs.fps,
                                                                   theirs.time_base)
    assert ours.has_audio == source.info.has_audio
    if source.info.has_audio:
        assert audio_packets(item.output) == audio_packets(one_piece)


def manifest(job, item_number):
    return json.loads((Path(job.work_dir) / "items" / f"{item_number:04d}" / "manifest.json").read_text())


# --- The job file: checked up front, one line naming the entry ---------------------------------------------


EXAMPLE_INPUTS = ["clips/city.mp4", "clips/forest.mp4", "clips/intro.mov", "clips/archive.mkv",
                  "styles/starry.jpg", "styles/wave.jpg", "styles/kandinsky.jpg"]


@pytest.mark.parametrize("name, items", [("example.yaml", 9), ("items.yaml", 5)])
def test_example_job_files_are_valid(tmp_path, assets, name, items):
    """The shipped examples, beside the inputs they name (clips are not decoded before the run; styles are)."""
    for relative in EXAMPLE_INPUTS:
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        if relative.endswith(".jpg"):
            cv2.imwrite(str(tmp_path / relative), cv2.imread(str(assets / "styles" / "starry.png")))
        else:
            shutil.copy(assets / "clips" / "a.mp4", tmp_path / relative)
    shutil.copy(REPO / "configs" / "jobs" / name, tmp_path / name)
    job = load_job(tmp_path / name)
    assert len(job.items) == items
    assert all(item.output.startswith(job.output_dir + os.sep) for item in job.items)


def test_clips_times_styles_expand_into_named_items(tmp_path, assets):
    job = load_job(write_job(tmp_path, assets, clips=[str(assets / "clips" / "[ab].mp4")],
                             items=[{"clip": str(assets / "clips" / "b.mp4"), "style": str(assets / "styles/wave.png"),
                                     "output": "special/{clip}.mov", "settings": {"codec": "prores"}}]))
    names = [os.path.relpath(item.output, job.output_dir) for item in job.items]
    assert names == ["a_starry.mkv", "a_starry+wave.mkv", "b_starry.mkv", "b_starry+wave.mkv", "special/b.mov"]
    assert job.items[-1].settings.codec == "prores" and job.items[0].settings.codec == "ffv1"
    assert job.items[1].style.spec.count("*0.5") == 2 and os.path.isabs(job.items[1].clip)
    assert job.items[2].entry == "clips[0](b.mp4)×styles[0]"


@pytest.mark.parametrize("change, message", [
    (dict(colour="red"), "job.yaml: unknown key 'colour'"),
    (dict(settings={"crf": "18"}), "job.yaml: settings.crf: must be an integer, got '18'"),
    (dict(settings={"chunk_frame": 8}),
     "job.yaml: settings: unknown setting 'chunk_frame' (did you mean 'chunk_frames'?)"),
    (dict(settings={"style_strength": 2}), "job.yaml: settings.style_strength: must be between 0 and 1, got 2.0"),
    (dict(clips=["nowhere/*.mp4"]), "job.yaml: clips[0]: no files match nowhere/*.mp4"),
    (dict(clips=["missing.mp4"]), "job.yaml: clips[0]: file not found: missing.mp4"),
    (dict(items=[{"clip": "A", "style": "S"}, {"clip": "A", "style": "S"}, {"clip": "A", "style": "x.png"}]),
     "job.yaml: items[2].style: file not found: x.png"),
    (dict(items=[{"clip": "A", "stlye": "S"}]), "job.yaml: items[0]: unknown key 'stlye' (did you mean 'style'?)"),
    (dict(styles=["S", "S"]),
     "job.yaml: clips[0]×styles[1].output: a_starry.mkv is also the output of clips[0]×styles[0]"),
    (dict(output="../{clip}.mkv"), "job.yaml: clips[0]×styles[0].output: ../a.mkv escapes the job's output folder"),
    (dict(output="{clip}_{colour}.mkv"), "unknown field {colour}"),
    (dict(output="{clip}_{style}.mov"), "ffv1 cannot be stored in .mov; use .mp4 or .mkv"),
    (dict(styles=["0:S,5:W*x"]), "job.yaml: styles[0]: blend weight 'x' of "),
    (dict(styles=["10:S,5:W"]), "must come after frame 10"),
    (dict(preset="nope"), "job.yaml: preset: no such preset or file: nope"),
    (dict(weights="nope"), "job.yaml: weights: file not found: nope"),
])
def test_bad_job_files_fail_up_front_naming_the_entry(tmp_path, assets, change, message):
    names = {"A": str(assets / "clips" / "a.mp4"), "S": str(assets / "styles" / "starry.png"),
             "W": str(assets / "styles" / "wave.png")}

    def fill(value):
        if isinstance(value, str):
            for short, full in names.items():
                value = full if value == short else value.replace(f":{short}", f":{full}")
            return value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    with pytest.raises(UserError) as error:
        load_job(write_job(tmp_path, assets, **fill(change)))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_preset_fills_the_settings(tmp_path, assets):
    job = load_job(write_job(tmp_path, assets, preset="preview", settings={"codec": "ffv1"}))
    assert job.items[0].settings.working_size == 256 and job.items[0].settings.crf == 26


def test_cli_checks_a_job_and_names_the_bad_entry(tmp_path, assets, capsys):
    from jobs.cli import main

    good = write_job(tmp_path, assets)
    assert main(["batch", str(good), "--check"]) == 0
    assert "job.yaml: 2 item(s)" in capsys.readouterr().out
    bad = write_job(tmp_path, assets, name="bad.yaml", settings={"codec": "av1"})
    assert main(["batch", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == \
        "mambast: error: bad.yaml: settings.codec: must be one of h264, hevc, prores, ffv1, png, exr, got 'av1'"


# --- Planning ------------------------------------------------------------------------------------------------


def test_chunks_end_at_shot_cuts_and_split_long_shots():
    # shots 0-30 (split in two), 30-40, 40-45 (short: share chunks), 45-100 (split in three)
    chunks = plan_chunks(range(100), (30, 40, 45), chunk_frames=25, lead_in=8)
    assert [(c.kept.start, c.kept.stop) for c in chunks] == [(0, 15), (15, 40), (40, 63), (63, 82), (82, 100)]
    assert [len(c.lead_in) for c in chunks] == [0, 8, 8, 8, 8]
    assert [c.index for c in chunks] == list(range(5))
    assert all(c.frames <= 25 for c in chunks)
    assert len(plan_chunks(range(5), (), chunk_frames=240, lead_in=8)[0].lead_in) == 0
    assert [(c.kept.start, c.kept.stop, len(c.lead_in)) for c in plan_chunks(range(12), (), 5, 8)] == \
        [(0, 4, 0), (4, 8, 4), (8, 12, 8)]


def test_scan_finds_the_clip_cuts(assets):
    assert scan_clip(str(assets / "clips" / "a.mp4")) == ClipPlan(40, CUTS_A)
    assert scan_clip(str(assets / "clips" / "b.mp4")) == ClipPlan(24, ())


# --- Chunks and the join, without Ray ------------------------------------------------------------------------


def render_chunks_locally(job, item, order=None, twice=()):
    """Every chunk of `item` through one ChunkRenderer, in any order, some twice (a retry rewriting its file)."""
    manifests = WorkFolder(job).open(resume=False)
    manifest = manifests[item.number]
    worker = ChunkRenderer(ChunkStylizer.load(job.weights, "cpu", threads=1))
    chunks = item_chunks(item)
    manifest.set_plan(scan_clip(item.clip), chunks)
    for index in list(order or range(len(chunks))) + list(twice):
        task = ChunkTask(item.number, item.clip, item.style.spec, item.settings, chunks[index],
                         manifest.chunk_path(index))
        manifest.record_chunk(worker.render(task))
    return manifest, chunks


def test_chunks_in_any_order_join_into_the_one_piece_render(tmp_path, assets):
    """With one frame per model call, chunks (lead-ins dropped) equal one ClipStylizer over the whole clip.

    With larger batches they may not: a batch of 1 and one of 4 give float results a few 1e-6 apart on this CPU,
    so a frame can round to another uint8 when the batches fall differently. The farm is exact against itself
    (every worker batches a chunk the same way), which is what the fault tests check.
    """
    styles = assets / "styles"
    job = load_job(write_job(tmp_path, assets, styles=[f"0:{styles / 'starry.png'},12:{styles / 'starry.png'},"
                                                       f"30:{styles / 'wave.png'}*0.5+{styles / 'starry.png'}*0.5"],
                             settings={"working_size": 0, "codec": "ffv1", "chunk_frames": 8, "batch_size": 1}))
    item = job.items[0]  # a morph across chunks, then a blend
    manifest, spans = render_chunks_locally(job, item, order=[3, 0, 5, 1, 4, 2], twice=[2])
    assert len(spans) == 6 and {s.kept.stop for s in spans} >= {14, 27}  # chunks end at the cuts
    frames = join_chunks([(manifest.chunk_path(s.index), s.kept.start) for s in spans], item.output, item.clip,
                         "ffv1", True, 40)
    assert frames == 40
    assert all(np.array_equal(a, b) for a, b in zip(decode(item.output), one_piece_frames(item)))
    assert_exact_output(item, tmp_path)


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mov", "prores")])
def test_lossy_chunks_join_by_stream_copy_with_exact_timestamps(tmp_path, assets, suffix, codec):
    job = load_job(write_job(tmp_path, assets, output="{clip}_{style}" + suffix,
                             settings={"working_size": 0, "codec": codec, "chunk_frames": 8}))
    item = job.items[0]
    manifest, spans = render_chunks_locally(job, item)
    pieces = [decode(manifest.chunk_path(s.index)) for s in spans]
    join_chunks([(manifest.chunk_path(s.index), s.kept.start) for s in spans], item.output, item.clip, codec, True, 40)
    joined = decode(item.output)
    assert len(joined) == 40 and all(np.array_equal(a, b) for a, b in zip(joined, sum(pieces, [])))
    source, ours = open_source(item.clip).info, open_source(item.output).info
    assert ours.pts == source.pts and ours.end_pts == source.end_pts and ours.fps == Fraction(30000, 1001)
    assert audio_packets(item.output) == audio_packets(item.clip)
    with av.open(item.output) as container:  # every chunk starts with a keyframe
        keys = [p.pts for p in container.demux(container.streams.video[0]) if p.size and p.is_keyframe]
        assert {source.pts[s.kept.start] for s in spans} <= set(keys)


def test_resume_trusts_only_complete_chunks_and_refuses_a_changed_job(tmp_path, assets):
    path = write_job(tmp_path, assets)
    job = load_job(path)
    manifest, spans = render_chunks_locally(job, job.items[0])
    with open(manifest.chunk_path(2), "r+b") as file:  # a chunk cut short after it was recorded
        file.truncate(1000)
    manifests = WorkFolder(load_job(path)).open(resume=True)
    assert manifests[0].verified_chunks() == set(range(len(spans))) - {2}
    with pytest.raises(UserError, match="a previous run left .*; pass --resume"):
        WorkFolder(job).open(resume=False)
    write_job(tmp_path, assets, settings={"working_size": 0, "codec": "ffv1", "chunk_frames": 8, "crf": 20})
    with pytest.raises(UserError) as error:
        WorkFolder(load_job(path)).open(resume=True)
    assert "job.yaml: changed since the run being resumed (items[0].settings.crf: 18 before, 20 now)" in \
        str(error.value)


def test_existing_outputs_are_never_overwritten_unasked(tmp_path, assets):
    job = load_job(write_job(tmp_path, assets))
    os.makedirs(job.output_dir)
    Path(job.items[1].output).write_bytes(b"precious")
    with pytest.raises(UserError, match=r"clips\[0\]×styles\[1\]: a_starry\+wave.mkv already exists"):
        WorkFolder(job).open(resume=False)
    assert not os.path.exists(job.work_dir)


def test_summary_table_lists_every_item(tmp_path, assets):
    job = load_job(write_job(tmp_path, assets))
    reports = [ItemReport(job.items[0], "done", frames=40, chunks=6, retries=1, seconds=2.0),
               ItemReport(job.items[1], "failed", error="a.mp4: not a video")]
    table = summary_table(reports, job.output_dir)
    assert "a_starry.mkv" in table and "20.00" in table and "FAILED: a.mp4: not a video" in table
    assert table.splitlines()[-1] == "1 of 2 items done, 1 failed; 40 frames rendered"


# --- On a real Ray cluster: three loopback nodes -------------------------------------------------------------


def test_batch_check_decodes_each_style_once(tmp_path, assets, monkeypatch, capsys):
    """Issue 23 item 10: 40 items naming one style decode it once."""
    import pipeline.batch_job as batch_job
    from jobs.cli import main

    calls = []
    real = batch_job.StyleImage.from_path
    monkeypatch.setattr(batch_job.StyleImage, "from_path", lambda path: calls.append(path) or real(path))
    style = str(assets / "styles" / "starry.png")
    items = [{"clip": str(assets / "clips" / "b.mp4"), "style": style, "output": f"b_{n}.mkv"} for n in range(40)]
    path = write_job(tmp_path, assets, items=items, clips=[str(assets / "clips" / "a.mp4")],
                     styles=[style, f"{style}*0.5+{assets / 'styles' / 'wave.png'}*0.5"])
    assert main(["batch", str(path), "--check"]) == 0
    assert "42 item(s)" in capsys.readouterr().out
    assert sorted(calls) == sorted([style, str(assets / "styles" / "wave.png")])

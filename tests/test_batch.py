"""The render farm (pipeline/batch_*.py, ray_batch.py, jobs/batch.py) on real encoded clips and a real Ray cluster.

The cluster is `ray.cluster_utils.Cluster` on this machine: a head and two worker nodes of 1 CPU each, every one
bound to 127.0.0.1 (see pipeline/ray_cluster.py on loopback), shared by the Ray tests of this module. Faults are real:
a stylizer process exits mid-chunk, a node is removed mid-job, the `mambast batch` process is SIGKILLed and resumed.
Each time the output must decode to exactly the frames of a fault-free run of the same chunks (FFV1 is lossless),
with the frame count, timestamps and audio of a one-piece FrameSink write. Tiny inputs (64x48, 24-40 frames, a
tiny random model) keep the whole file near a minute on a 2-core machine.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
from test_video_io import audio_packets, write_clip
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


@pytest.fixture(scope="module")
def cluster(assets):
    """Head + 2 worker nodes, 1 CPU each, all on 127.0.0.1; this process is the driver."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from pipeline.ray_cluster import connect_ray

    temp = tempfile.mkdtemp(prefix="rt-")
    settings = dict(RAY_TMPDIR=temp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                    RAY_AUTH_MODE="disabled")
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)  # inherited by every Ray process of the cluster, and by the CLI runs below
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # Ray read the variable when this process imported it
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "include_dashboard": False,
        # detect a lost node in ~1.5 s rather than ~15 s
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(**node) for _ in range(2)]
    connect_ray(cluster.address)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"} and len(ray.nodes()) == 3
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = True


def test_a_run_spreads_over_the_nodes_and_a_bad_clip_fails_alone(tmp_path, assets, cluster):
    from pipeline.ray_batch import Farm

    clips = assets / "clips"
    many = [{"clip": str(clips / "b.mp4"), "style": str(assets / "styles" / "wave.png"), "output": "many/{n}.mkv",
             "settings": {"working_size": 0, "chunk_frames": 24}}] * 8
    job = load_job(write_job(tmp_path, assets, clips=[str(clips / n) for n in ("a.mp4", "broken.mp4", "b.mp4")],
                             items=many))
    work = WorkFolder(job)
    work.open(resume=False)
    farm = Farm(job, work, workers=None, progress=False)
    reports = farm.run()
    assert [r.status for r in reports] == ["done", "done", "failed", "failed", "done", "done"] + ["done"] * 8
    assert "broken.mp4" in reports[2].error and "\n" not in reports[2].error  # one item fails, the others go on
    assert len(set().union(*(r.nodes for r in reports))) == 3  # chunks ran on every node
    assert sum(r.retries for r in reports) == 0
    for item in (job.items[0], job.items[1], job.items[4], job.items[13]):
        assert_exact_output(item, tmp_path)
    assert not any(Path(job.work_dir, "items", "0000").glob("chunk_*"))  # chunk files go once joined
    # bounded however many items are queued: 2 chunks per actor, a few items open
    assert farm.worker_count == 3 and farm.peak["chunks_in_flight"] <= 6
    assert farm.peak["open_items"] <= farm.plan_ahead == 5


def test_cli_reports_each_failure_and_exits_non_zero(tmp_path, assets, cluster, capsys):
    from jobs.cli import main

    clips = assets / "clips"
    path = write_job(tmp_path, assets, clips=[str(clips / "broken.mp4"), str(clips / "b.mp4")],
                     styles=[str(assets / "styles" / "wave.png")])
    assert main(["batch", str(path)]) == 1  # joins the connected cluster
    table = capsys.readouterr().out
    assert "broken_wave.mkv" in table and "FAILED: broken.mp4: " in table and "b_wave.mkv" in table
    assert table.splitlines()[-1] == "1 of 2 items done, 1 failed; 24 frames rendered"


def test_a_worker_crashing_mid_chunk_is_retried_elsewhere(tmp_path, assets, cluster, monkeypatch):
    from pipeline.ray_batch import run_job

    monkeypatch.setenv("MAMBAST_FARM_FAULT", "exit:1:2")  # item 1's chunk 2: os._exit halfway, first attempt
    job = load_job(write_job(tmp_path, assets))
    reports = run_job(job, progress=False)
    assert [r.status for r in reports] == ["done", "done"] and reports[1].retries >= 1
    assert manifest(job, 1)["chunks"]["2"]["attempt"] == 2
    for item in job.items:
        assert_exact_output(item, tmp_path)


def test_no_worker_able_to_start_fails_the_items_instead_of_hanging(tmp_path, assets, cluster, monkeypatch):
    import pipeline.ray_batch as ray_batch

    monkeypatch.setattr(ray_batch, "START_TIMEOUT_S", 2.0)
    job = load_job(write_job(tmp_path, assets))
    work = ray_batch.WorkFolder(job)
    work.open(resume=False)
    farm = ray_batch.Farm(job, work, workers=1, progress=False)
    farm.actor_options = {"num_cpus": 64}  # more than any node has: the actor never starts
    reports = farm.run()
    assert [r.status for r in reports] == ["failed", "failed"]
    assert reports[0].error.startswith("no stylizer worker could start within 2 s: each needs {'num_cpus': 64}")


def test_resume_after_every_chunk_was_written_only_joins(tmp_path, assets, cluster):
    from pipeline.ray_batch import run_job

    path = write_job(tmp_path, assets)
    job = load_job(path)
    render_chunks_locally(job, job.items[0])  # item 0: killed after its last chunk, before its join
    reports = run_job(load_job(path), resume=True, progress=False)
    assert [r.status for r in reports] == ["done", "done"]
    assert (reports[0].resumed_chunks, reports[1].resumed_chunks) == (reports[0].chunks, 0) == (6, 0)
    for item in job.items:
        assert_exact_output(item, tmp_path)


def run_batch_cli(*args, fault=""):
    env = {**os.environ, "MAMBAST_QUIET": "1", "MAMBAST_FARM_FAULT": fault}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "batch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_killed_job_resumes_where_it_stopped(tmp_path, assets, cluster):
    address = cluster[0].address
    path = write_job(tmp_path, assets)
    job = load_job(path)
    chunks_written = lambda: sum(len(json.loads(p.read_text())["chunks"])
                                 for p in Path(job.work_dir).glob("items/*/manifest.json"))
    run = run_batch_cli(str(path), "--address", address, fault="slow:0.1")
    try:
        wait_for(lambda: chunks_written() >= 2 or run.poll() is not None)
    finally:
        run.send_signal(signal.SIGKILL)
        _, err = run.communicate()
    assert run.returncode == -signal.SIGKILL, f"it ended by itself before it could be killed: {err}"
    assert not any(os.path.exists(item.output) for item in job.items)  # nothing half-written at the outputs
    done_before = chunks_written()
    assert 2 <= done_before < 12

    resumed = run_batch_cli(str(path), "--address", address, "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "resumed" in out and "2 of 2 items done, 0 failed" in out
    resumed_chunks = sum(int(line.split("(")[1].split()[0]) for line in out.splitlines() if "resumed)" in line)
    assert resumed_chunks == done_before
    for item in job.items:
        assert_exact_output(item, tmp_path)

    again = run_batch_cli(str(path), "--address", address, "--resume")  # all done: nothing to do
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and out.count("skipped") == 2


def test_losing_a_node_mid_job_finishes_on_the_rest(tmp_path, assets, cluster, monkeypatch):
    from pipeline.ray_batch import run_job

    head_and_workers, workers = cluster
    monkeypatch.setenv("MAMBAST_FARM_FAULT", "slow:0.1")
    styles = assets / "styles"
    job = load_job(write_job(tmp_path, assets, styles=[  # a style and a morph across chunks
        str(styles / "starry.png"), f"0:{styles / 'starry.png'},12:{styles / 'starry.png'},30:{styles / 'wave.png'}"]))
    doomed = workers[0].node_id[:8]
    doomed_worked = lambda: any(chunk["node"] == doomed for p in Path(job.work_dir).glob("items/*/manifest.json")
                                for chunk in json.loads(p.read_text())["chunks"].values())

    def remove_a_node():
        wait_for(doomed_worked)  # its actor has written a chunk, so it holds the next ones: lost mid-chunk
        head_and_workers.remove_node(workers[0])

    killer = threading.Thread(target=remove_a_node)
    killer.start()
    reports = run_job(job, progress=False)
    killer.join()
    assert [r.status for r in reports] == ["done", "done"]
    assert sum(r.retries for r in reports) >= 1
    for item in job.items:
        assert_exact_output(item, tmp_path)


def test_two_batch_runs_on_one_output_folder_never_race(tmp_path, assets, cluster):
    """Issue 23 item 2: a second real `mambast batch` on the same output folder (the same job again, or another job
    writing there) is refused in one line while the first runs; the first finishes exactly; the lock dies with its
    holder (SIGKILL), so a later run proceeds."""
    address = cluster[0].address
    path = write_job(tmp_path, assets)
    other = write_job(tmp_path, assets, name="other.yaml", styles=[str(assets / "styles" / "wave.png")])
    job = load_job(path)
    lock = Path(job.output_dir) / ".mambast-batch" / "lock"
    first = run_batch_cli(str(path), "--address", address, fault="slow:0.05")
    try:
        wait_for(lambda: (lock.exists() and lock.read_text().startswith(f"pid {first.pid}"))
                 or first.poll() is not None)
        for args in ((str(path), "--address", address), (str(path), "--address", address, "--resume"),
                     (str(other), "--address", address)):
            second = run_batch_cli(*args)
            out, err = second.communicate(timeout=120)
            lines = [line for line in err.splitlines() if line.strip()]
            assert second.returncode == 2 and len(lines) == 1, (args, err)
            assert "another mambast batch" in lines[0] and f"pid {first.pid}" in lines[0], lines
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert "2 of 2 items done, 0 failed" in out
    for item in job.items:
        assert_exact_output(item, tmp_path)
    manifests = [json.loads(p.read_text()) for p in Path(job.work_dir).glob("items/*/manifest.json")]
    assert [m["status"] for m in manifests] == ["done", "done"]

    # a holder killed with SIGKILL leaves no lock behind: the other job runs (its outputs are new files)
    killed = run_batch_cli(str(other), "--address", address, fault="slow:0.5")
    wait_for(lambda: (lock.exists() and lock.read_text().startswith(f"pid {killed.pid}")) or killed.poll() is not None)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    again = run_batch_cli(str(other), "--address", address, "--resume")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err


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

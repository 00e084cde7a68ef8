"""The Ray runner for one clip (pipeline/ray_clip.py) on a real local cluster: bound to loopback, frames equal to run_local's."""

import os
import re

import numpy as np
import pytest
import ray

from jobs.cli import main
from models.errors import UserError
from pipeline.local_runner import run_local
from pipeline.ray_clip import run_ray
from pipeline.ray_cluster import start_ray, stop_ray
from test_pipeline import (audio_span, comment, corrupt_ffv1, decode, job, probe, style,  # noqa: F401
                           weights, write_clip)

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def cluster():
    session = start_ray(num_cpus=2, object_store_mb=128)
    yield session
    stop_ray(session)


# --- Loopback only --------------------------------------------------------------------------------------


def listening_addresses(pids):
    """The local addresses of the listening TCP sockets that the processes `pids` hold open."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue  # the process has gone
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as file:
            for line in list(file)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                    found.add(decode_address(fields[1].split(":")[0], width))
    return found


def decode_address(hex_address, width):
    raw = bytes.fromhex(hex_address)
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word is little-endian
    packed = b"".join(words)
    if width == 4:
        return ".".join(str(b) for b in packed)
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(str(b) for b in packed[12:])
    return "::1" if packed == b"\0" * 15 + b"\1" else packed.hex()


def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_local_cluster_listens_on_loopback_only(cluster):
    assert [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]] == ["127.0.0.1"]
    addresses = listening_addresses([os.getpid(), *descendants(os.getpid())])
    assert addresses and addresses <= LOOPBACK, addresses


# --- Same frames as the local runner ----------------------------------------------------------------------


@pytest.mark.parametrize("selection", [dict(), dict(start=1, every_nth=2)])
def test_ray_run_equals_local_run_frame_for_frame(cluster, tmp_path, weights, style, selection):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=14, audio=True)
    local, distributed = tmp_path / "local.mkv", tmp_path / "ray.mkv"
    run_local(job(clip, style, local, weights, codec="ffv1", **selection), progress=False)
    summary = run_ray(job(clip, style, distributed, weights, codec="ffv1", chunk_frames=3, **selection),
                      num_stylizers=2, progress=False)

    expected = decode(local)
    assert summary.frames == len(expected) == len(range(0, 14, selection.get("every_nth", 1))[selection.get(
        "start", 0) // selection.get("every_nth", 1):])
    assert np.array_equal(np.stack(decode(distributed)), np.stack(expected))
    assert probe(distributed).pts == probe(local).pts
    assert summary.audio == "kept" and audio_span(distributed) == audio_span(local)
    assert comment(distributed)["runner"] == "ray"


def test_ray_errors_are_one_line_and_leave_nothing(cluster, tmp_path, weights, style):
    clip = corrupt_ffv1(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match=r"^corrupt\.mkv: cannot decode frame 7[^\n]*$"):
        run_ray(job(clip, style, tmp_path / "out.mp4", weights, chunk_frames=4), num_stylizers=2, progress=False)
    with pytest.raises(UserError, match=r"no_weights[^\n]*: file not found"):
        run_ray(job(clip, style, tmp_path / "out.mp4", str(tmp_path / "no_weights")), num_stylizers=1,
                progress=False)
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_runs_on_ray_when_asked(cluster, tmp_path, capsys, weights, style):
    clip = tmp_path / "in.mp4"
    write_clip(clip, count=6)
    code = main(["stylize", str(clip), "--style", style, "-o", str(tmp_path / "out.mp4"), "--weights", weights,
                 "--runner", "ray", "--chunk-frames", "4", "--working-size", "0"])
    assert code == 0 and probe(tmp_path / "out.mp4").num_frames == 6
    assert re.search(r"6 frames .*\(ray runner", capsys.readouterr().out)


def test_stylize_local_stylize_ray_and_batch_give_the_same_frames(cluster, tmp_path, weights, style):
    """The three ways to render a clip agree bit for bit: one piece in this process, chunks on Ray actors, and
    a batch job (chunks at shot cuts, encoded to chunk files, joined by stream copy). FFV1 is lossless."""
    import yaml

    from pipeline.batch_job import load_job
    from pipeline.ray_batch import run_job

    clip = tmp_path / "in.mp4"
    write_clip(clip, count=14, audio=True)
    settings = dict(codec="ffv1", style_strength=0.6, seed=3)
    run_local(job(clip, style, tmp_path / "local.mkv", weights, **settings), progress=False)
    run_ray(job(clip, style, tmp_path / "ray.mkv", weights, chunk_frames=5, **settings), num_stylizers=2,
            progress=False)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"output_dir": "batch", "output": "{clip}.mkv", "weights": weights,
                                        "clips": [str(clip)], "styles": [style],
                                        "settings": {"working_size": 0, "chunk_frames": 4, **settings}}))
    reports = run_job(load_job(job_file), workers=2, progress=False)
    assert [r.status for r in reports] == ["done"]

    local = np.stack(decode(tmp_path / "local.mkv"))
    assert len(local) == 14
    for other in ("ray.mkv", "batch/in.mkv"):
        assert np.array_equal(np.stack(decode(tmp_path / other)), local), other
        assert probe(tmp_path / other).pts == probe(tmp_path / "local.mkv").pts

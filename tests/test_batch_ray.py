"""The render farm on a real Ray cluster (pipeline/ray_batch.py, jobs/batch.py): spreading, faults, resume, races.

The cluster is `ray.cluster_utils.Cluster` on this machine: a head and two worker nodes of 1 CPU each, every one
bound to 127.0.0.1 (see pipeline/ray_cluster.py on loopback), shared by the tests of this module. Faults are real: a
stylizer process exits mid-chunk, a node is removed mid-job, the `mambast batch` process is SIGKILLed and resumed,
two `mambast batch` processes share an output folder. Inputs, job files and the exactness check are test_batch's.
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
from pathlib import Path

import pytest

from pipeline.batch_job import load_job
from pipeline.batch_manifest import WorkFolder
from test_batch import assets  # noqa: F401  (a fixture: the module's clips, styles and tiny model)
from test_batch import REPO, assert_exact_output, manifest, render_chunks_locally, write_job


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
    # 1 s per kept frame: 64 frames on 2 workers outlast the three refused launches below even on a quiet machine
    # (at 0.05 s the first run could finish before the third launch checked the lock)
    first = run_batch_cli(str(path), "--address", address, fault="slow:1.0")
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

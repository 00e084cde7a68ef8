"""The Ray runner: pipeline/runner.py's stages in Ray actors, frames bit-identical to `run_local`.

    driver: check the job, open the sink (runner.open_render)
      │ FrameDecoder actor           decodes one chunk (lead-in + kept frames) per call
      │ StylizerActor pool           a ChunkStylizer each: one model, loaded once; a fresh ClipStylizer per chunk
      ▼ driver                       writes the chunks in order: FrameSink (audio, timestamps, metadata)

At most `2 × stylizers` chunks are in flight (submitted and not yet written), whatever the clip length: the
driver submits a chunk only when one has been written, waits with `ray.wait`, and holds finished chunks that
arrive early until the ones before them are written. Each actor runs a chunk from its own first lead-in frame with
the job's seed, so which actor gets which chunk changes nothing.

Ray on these machines: loopback only (what was found with Ray 2.60 on the 2-core dev machine, which has eth0 at
192.0.2.2 beside lo):

* `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: `ray.init` passes the address through
  `services.resolve_ip_for_localhost`, which replaces any loopback address by the default-route interface's
  (192.0.2.2), and gcs_server, raylet and the workers then listen on all interfaces (`*:port` in `ss -ltnp`);
  `ray.nodes()` reports 192.0.2.2.
* `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` switches that off (`services.get_node_ip_address` then answers
  127.0.0.1, as Ray does on macOS/Windows to avoid firewall prompts): the node is 127.0.0.1 and every Ray process
  listens on 127.0.0.1 only. Ray reads the variable into `ray._private.ray_constants.ENABLE_RAY_CLUSTER` when
  it is imported, so `start_ray` sets both the variable (for the processes it starts) and the constant (this
  process may have imported Ray already), then checks `ray.nodes()` and refuses to run on anything else.
* Inside `unshare -n` with only `lo` up, Ray finds no route, logs "Failed to determine local IP via external
  connectivity", and falls back to 127.0.0.1 by itself; it works the same. Tests therefore need no network
  namespace here. `ray.init` takes 4–6 s on the loaded 2-core machine, `ray.shutdown` 1–1.5 s.

Joining a cluster (`address`) leaves the addresses to the cluster: multi-node needs a routable address.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import ray
from ray.exceptions import RayTaskError

from models.errors import UserError
from pipeline.runner import (DEFAULT_CHUNK_FRAMES, ChunkStylizer, FrameDecoder, Render, StylizeJob, Summary,
                             open_render, progress_bar)

# Ray's default object store is 30 % of RAM. A chunk's frames travel as one object, which must fit in it (a 4K
# chunk of 64 + 8 frames is 1.8 GB); the chunks in flight beyond its size spill to disk.
MAX_OBJECT_STORE_MB = 4096
CHUNKS_IN_FLIGHT_PER_STYLIZER = 2
LOOPBACK = "127.0.0.1"


def start_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None,
              object_store_mb: int | None = None) -> str | None:
    """Start a local single-node cluster bound to loopback, or join the cluster at `address`.

    The object store gets `object_store_mb`, by default a quarter of the RAM but at most MAX_OBJECT_STORE_MB.
    Returns the session folder of a cluster started here (a new temporary folder unless `temp_dir` is given;
    pass it to `stop_ray` to remove it), None when joining.
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address is not None:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        return None
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only cluster; no token file in ~/.ray
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the processes Ray starts (see the docstring)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # ... and by this one, which has imported Ray already
    # Ray's socket paths must stay under 108 bytes, hence a short folder in /tmp rather than one deep inside.
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="mambast-ray-")
    if object_store_mb is None:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        object_store_mb = min(MAX_OBJECT_STORE_MB, ram_mb // 4)
    ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=object_store_mb * 2**20, logging_level=logging.ERROR, log_to_driver=False)
    addresses = sorted({node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]})
    if addresses != [LOOPBACK]:
        ray.shutdown()
        raise RuntimeError(f"Ray bound its node to {', '.join(addresses)}, not {LOOPBACK}; run it inside "
                           f"`unshare -n` or with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before Ray is imported")
    return temp_dir


def stop_ray(temp_dir: str | None = None) -> None:
    """Shut Ray down and remove the session folder `start_ray` returned."""
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


class StylizerActor:
    """A `ChunkStylizer` in an actor. The model loads in `load()`, not `__init__`, so that a bad checkpoint comes
    back to the driver as that call's UserError instead of as a dead actor."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.stylizer = None

    def load(self) -> None:
        self.stylizer = ChunkStylizer.load(*self.args, **self.kwargs)

    def stylize(self, chunk, frames):
        return self.stylizer(chunk, frames)


def run_ray(job: StylizeJob, address: str | None = None, num_stylizers: int | None = None,
            progress: bool = True) -> Summary:
    """Stylize `job` on Ray: the running cluster if `ray.init` was called, else `address`, else a local one.

    `num_stylizers` defaults to one per GPU, or on CPUs to one per two CPUs (each with that many torch threads).
    """
    render = open_render(job, "ray")  # checks everything before a cluster is started
    try:
        owns_ray = not ray.is_initialized()
        temp_dir = start_ray(address) if owns_ray else None
        try:
            return _run(render, num_stylizers, progress)
        finally:
            if owns_ray:
                stop_ray(temp_dir)
    except BaseException:
        render.sink.abort()
        raise


def _run(render: Render, num_stylizers: int | None, progress: bool) -> Summary:
    job = render.job
    chunks = render.chunks(DEFAULT_CHUNK_FRAMES)
    count, options, device, threads = _stylizer_pool(job, num_stylizers, len(chunks))
    decoder = ray.remote(num_cpus=0)(FrameDecoder).remote(render.source)
    actors = [ray.remote(**options)(StylizerActor).remote(job.weights, render.style, render.frame_shape,
                                                           render.config, device=device, threads=threads)
              for _ in range(count)]
    try:
        loads = [actor.load.remote() for actor in actors]
        render_started = time.perf_counter()
        with progress_bar(len(render.selection), progress) as bar:
            for frames in _stylize_in_order(chunks, decoder, actors, loads):
                for frame in frames:
                    render.sink.write(frame)
                bar.update(len(frames))
        render.sink.close()
    finally:
        for actor in [decoder, *actors]:
            ray.kill(actor)
    return render.summary("ray", render_started)


def _stylizer_pool(job: StylizeJob, num_stylizers: int | None, chunks: int) -> tuple[int, dict, str, int | None]:
    """(actor count, actor resources, torch device, torch threads): one actor per GPU, else one per 2 CPUs.

    Resources may be fractional: every actor must be schedulable, or the chunks sent to it would wait forever.
    """
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    count = min(num_stylizers or gpus or max(1, cpus // 2), chunks)  # an actor without a chunk only loads a model
    if gpus:
        return count, {"num_gpus": min(1.0, gpus / count)}, job.device, None
    threads = max(1, cpus // count)
    return count, {"num_cpus": min(threads, cpus / count)}, "cpu" if job.device == "auto" else job.device, threads


def _stylize_in_order(chunks, decoder, actors, loads):
    """Yield each chunk's stylized frames in order, with at most 2 chunks per actor submitted and not yet yielded."""
    window = CHUNKS_IN_FLIGHT_PER_STYLIZER * len(actors)
    pending = {}   # result ref -> (chunk number, actor)
    finished = {}  # chunk number -> result ref, waiting for the chunks before it
    busy = {actor: 0 for actor in actors}
    submitted = written = 0
    while written < len(chunks):
        while submitted < len(chunks) and submitted - written < window:
            chunk = chunks[submitted]
            actor = min(actors, key=busy.get)
            pending[actor.stylize.remote(chunk, decoder.read.remote(chunk.indices))] = (submitted, actor)
            busy[actor] += 1
            submitted += 1
        if loads:
            _get(loads)  # the models load while the first chunks decode; a bad checkpoint stops here
            loads = []
        ready, _ = ray.wait(list(pending), num_returns=1)
        number, actor = pending.pop(ready[0])
        busy[actor] -= 1
        finished[number] = ready[0]
        while written in finished:
            yield _get(finished.pop(written))
            written += 1


def _get(refs):
    """ray.get, with a remote UserError raised as itself (one line), and other remote errors as their cause."""
    try:
        return ray.get(refs)
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        if cause is not None:
            raise cause from error
        raise

"""One clip on Ray (`mambast stylize --runner ray`): its chunks on StylizerActors, frames bit-identical to
`run_local`.

    driver: check the job, open the sink (pipeline/stylize_job.open_render), plan the chunks (pipeline/chunks.py)
      │ a decoder actor              decode_chunk: one chunk's lead-in + kept Frames per call
      │ StylizerActor pool           ChunkStylizer.stylize: one model each, loaded once; a fresh ClipStylizer per chunk,
      │                              its stages pipelined on the actor's threads (pipeline/stylizer.py)
      ▼ driver                       writes the chunks in order: FrameSink (audio, timestamps, metadata)

At most `2 × stylizers` chunks are in flight (submitted and not yet written), whatever the clip length: the
driver submits a chunk only when one has been written, waits with `ray.wait`, and holds finished chunks that
arrive early until the ones before them are written. Each actor runs a chunk from its own first lead-in frame with
the job's seed, so which actor gets which chunk changes nothing. The cluster: pipeline/ray_cluster.py.
"""
from __future__ import annotations

import time

import ray

from pipeline.chunks import decode_chunk
from pipeline.local_runner import progress_bar
from pipeline.ray_cluster import ray_get, start_ray, stop_ray
from pipeline.stylize_job import RAY_CHUNK_FRAMES, Render, StylizeJob, Summary, open_render
from pipeline.stylizer_actor import StylizerActor, stylizer_pool

CHUNKS_IN_FLIGHT_PER_STYLIZER = 2


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
    chunks = render.chunks(RAY_CHUNK_FRAMES)
    count, options, device, threads = stylizer_pool(job.device, num_stylizers, most=len(chunks))
    decoder = ray.remote(num_cpus=0)(ChunkDecoder).remote(render.source)
    actors = [ray.remote(**options)(StylizerActor).remote(render.weights, device, threads) for _ in range(count)]
    try:
        loads = [actor.ready.remote() for actor in actors]
        render_started = time.perf_counter()
        work = (ray.put(render.style), render.frame_shape, render.config)
        with progress_bar(len(render.selection), progress) as bar:
            for frames in _stylize_in_order(chunks, decoder, actors, loads, work):
                for frame in frames:
                    render.sink.write(frame)
                bar.update(len(frames))
        render.sink.close()
    finally:
        for actor in [decoder, *actors]:
            ray.kill(actor)
    return render.summary("ray", render_started)


class ChunkDecoder:
    """Decodes chunks of one source (an actor of its own, so that decoding overlaps stylizing)."""

    def __init__(self, source):
        self.source = source

    def read(self, chunk):
        return list(decode_chunk(self.source, chunk))


def _stylize_in_order(chunks, decoder, actors, loads, work):
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
            pending[actor.stylize.remote(chunk, decoder.read.remote(chunk), *work)] = (submitted, actor)
            busy[actor] += 1
            submitted += 1
        if loads:
            ray_get(loads)  # the models load while the first chunks decode; a bad checkpoint stops here
            loads = []
        ready, _ = ray.wait(list(pending), num_returns=1)
        number, actor = pending.pop(ready[0])
        busy[actor] -= 1
        finished[number] = ready[0]
        while written in finished:
            yield ray_get(finished.pop(written))
            written += 1

"""A batch of clips on Ray (`mambast batch`): the batch steps placed on a cluster, retried when workers or nodes
are lost.

    driver (mambast batch)                                   the cluster
    ──────────────────────                                   ───────────
    WorkFolder: job.json (--resume refuses a changed job), one manifest per item
    Farm.run, one loop:
      an item's clip not planned yet  ── scan_clip, on an I/O thread of the driver
      its chunks not written yet      ── StylizerActor.render ──────► one actor per GPU (per `threads` CPUs
                                                                       without GPUs), spread over the nodes
      all its chunks written          ── join_chunks, on an I/O thread of the driver
      every result                    ── recorded in the item's manifest, progress, next submission

Only chunks go to the cluster: they are the expensive, parallel part. Scanning a clip (one decode pass) and
joining an item (a stream copy) are cheap and run on the driver's IO_THREADS, which saves a Ray worker process
(and a torch import) per task; all of them read and write the same shared storage.

Bounded: at most IN_FLIGHT_PER_WORKER chunks per actor are submitted and unfinished, at most `plan_ahead` items
are open (planned or planning) beyond those, results are small records (chunk files stay on shared storage), and
the items are taken from the job one at a time: the driver's memory does not grow with the number queued.

Faults:

* A worker lost mid-chunk (its process killed, its node gone): Ray fails that actor's calls with a RayActorError.
  The actor is dropped (ray.kill) and a replacement started wherever the cluster has room; the chunk goes back to
  the front of the queue and is given to another ready actor (attempt + 1, at most MAX_ATTEMPTS). Its partial
  file is a temporary that the retry never reads; the retry writes the same bits (batch_worker.py).
* Bad input (a UserError: the clip does not decode, a schedule out of order) is not retried: that item fails with
  its message, and the others go on.
* The driver killed: nothing is lost but the chunks in flight; `mambast batch --resume` reads the manifests and
  renders only the chunks not recorded (and verified) as written.
* No worker can start (no free GPU anywhere, or every start fails): after `start_timeout` seconds the remaining
  items fail with a message saying so, instead of waiting forever.

The job file: pipeline/batch_job.py; the work folder: batch_manifest.py; a chunk: batch_worker.py; joining:
batch_join.py; progress and the final table: batch_report.py; the cluster: ray_cluster.py.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from models.checkpoint import load_model
from models.errors import UserError
from pipeline.batch_job import Item, Job
from pipeline.batch_join import join_chunks
from pipeline.batch_manifest import RunLock, WorkFolder
from pipeline.batch_report import ItemReport, ItemState, Progress
from pipeline.batch_worker import ChunkTask, FaultPlan
from pipeline.chunks import ClipPlan, plan_chunks, scan_clip
from pipeline.ray_cluster import connect_ray, one_line, stop_ray
from pipeline.stylizer_actor import StylizerActor, stylizer_pool

IN_FLIGHT_PER_WORKER = 2     # chunks submitted to one actor and not yet finished: one running, one queued
MAX_ATTEMPTS = 3             # per chunk, counting the first
START_TIMEOUT_S = float(os.environ.get("MAMBAST_FARM_START_TIMEOUT", 600))
PLANS_KEPT = 64              # clip plans remembered for the next items of the same clip
WAIT_S = 1.0                 # longest wait for a result before checking for a stall
IO_THREADS = 2               # the driver's threads for scanning clips and joining outputs


# ----------------------------------------------------------------------------------------------------------
# Running a job


def run_job(job: Job, address: str | None = None, workers: int | None = None, resume: bool = False,
            progress: bool = True) -> list[ItemReport]:
    """Render every item of `job` on Ray (the connected cluster, else `address`, else a local one).

    Everything that can be refused is refused before the work folder is written: a changed job, existing
    outputs, a stale work folder, a bad checkpoint, an unreachable cluster, a device the cluster does not have.
    """
    work = WorkFolder(job)
    with RunLock(job):                             # a second run on this output folder is refused, not raced
        work.check(resume)
        load_model(job.weights)                    # a bad checkpoint is one clear line here, not N dead actors
        owns_ray = not ray.is_initialized()
        session = connect_ray(address) if owns_ray else None
        try:
            farm = Farm(job, work, workers, progress)
            work.create()
            return farm.run()
        finally:
            if owns_ray:
                stop_ray(session)


@dataclass
class Worker:
    actor: object
    ready: bool = False
    busy: int = 0
    node: str = ""


@dataclass
class Pending:
    kind: str                            # start | plan | chunk | join
    worker: Worker | None = None
    items: list = field(default_factory=list)
    task: ChunkTask | None = None
    key: tuple | None = None


class Farm:
    """One job's scheduling loop: open items a few ahead, keep every stylizer actor fed with chunks, record
    and join what comes back, retry what was lost. `run()` returns a report per item, in job order."""

    def __init__(self, job: Job, work: WorkFolder, workers: int | None, progress: bool = True):
        self.job = job
        self.work = work
        self.fault = FaultPlan.from_env()
        self.reports = [ItemReport(item) for item in job.items]
        self.queue = iter(zip(job.items, self.reports))  # taken one item at a time, its manifest read then
        self.next_item = next(self.queue, None)
        self.open: list[ItemState] = []          # planning, or chunks left to submit
        self.retries: deque = deque()            # (ChunkTask, ItemState, Worker that lost it)
        self.pending: dict = {}                  # ObjectRef (cluster) or Future (I/O thread) -> Pending
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mambast-farm-io")
        self.plans: OrderedDict = OrderedDict()  # (clip, threshold) -> ClipPlan
        self.planning: dict = {}                 # (clip, threshold) -> Future of the scan
        self.workers: list[Worker] = []
        self.worker_count, self.actor_options, self.device, _ = stylizer_pool(job.device, workers, job.threads)
        self.plan_ahead = self.worker_count + 2
        self.starts_left = 2 * self.worker_count + MAX_ATTEMPTS  # replacements, so a crash loop cannot run forever
        self.waiting_since = time.monotonic()
        self.last_start_error = ""
        self.peak = {"open_items": 0, "chunks_in_flight": 0}  # for the record: both stay bounded
        self.progress = Progress(job, enabled=progress)

    # -- the loop

    def run(self) -> list[ItemReport]:
        for _ in range(self.worker_count):
            self._start_worker()
        try:
            while self._unfinished():
                self._open_items()
                self._submit_chunks()
                self._wait()
        finally:
            self.io.shutdown(wait=True, cancel_futures=True)
            for worker in self.workers:
                ray.kill(worker.actor)
            self.progress.close()
        return self.reports

    def _unfinished(self) -> bool:
        return bool(self.next_item or self.open or self.retries
                    or any(p.kind != "start" for p in self.pending.values()))

    def _wait(self) -> None:
        """Handle what has finished: Ray results (waited for) and I/O threads' results (polled)."""
        threads = [key for key in self.pending if isinstance(key, Future)]
        ready = [key for key in threads if key.done()]
        if not ready:
            refs = [key for key in self.pending if not isinstance(key, Future)]
            timeout = 0.05 if threads else WAIT_S
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            else:
                time.sleep(timeout)
        for key in ready:
            pending = self.pending.pop(key)
            getattr(self, f"_on_{pending.kind}")(key, pending)
        self._check_stall()

    @staticmethod
    def _result(key):
        return key.result() if isinstance(key, Future) else ray.get(key)

    # -- items: plan, chunks, join

    def _open_items(self) -> None:
        while len(self.open) < self.plan_ahead and self.next_item:
            (item, report), self.next_item = self.next_item, next(self.queue, None)
            manifest = self.work.manifest(item)
            state = ItemState(manifest, report)
            if manifest.status == "done":
                report.status, report.frames = "skipped", manifest.frames
                report.chunks = len(manifest.chunks or ())
                self.progress.skipped()
                continue
            self.open.append(state)
            self.peak["open_items"] = max(self.peak["open_items"], len(self.open))
            self.progress.expect(state)
            if manifest.chunks is not None:
                self._queue_chunks(state)
            else:
                self._plan(state)

    def _plan(self, state: ItemState) -> None:
        key = (state.item.clip, state.item.settings.shot_threshold, state.item.settings.strict)
        if key in self.plans:
            self._planned(state, self.plans[key])
        elif key in self.planning:
            next(p for p in self.pending.values() if p.key == key).items.append(state)
        else:
            future = self.io.submit(scan_clip, *key)
            self.planning[key] = future
            self.pending[future] = Pending("plan", items=[state], key=key)

    def _on_plan(self, ref, pending: Pending) -> None:
        del self.planning[pending.key]
        try:
            plan = self._result(ref)
        except Exception as error:  # the clip does not decode
            for state in pending.items:
                self._fail(state, one_line(error))
            return
        self.plans[pending.key] = plan
        while len(self.plans) > PLANS_KEPT:
            self.plans.popitem(last=False)
        for state in pending.items:
            self._planned(state, plan)

    def _planned(self, state: ItemState, plan: ClipPlan) -> None:
        settings = state.item.settings
        chunks = plan_chunks(range(plan.frames), plan.cuts, settings.chunk_frames, settings.stylizer_config().lead_in)
        if plan.damage:
            self.progress.note(f"warning: {os.path.basename(state.item.clip)}: {plan.damage}; stylizing the "
                               f"{plan.frames} frames that decode (settings.strict refuses damaged files)")
        state.manifest.set_plan(plan, chunks)
        self._queue_chunks(state)

    def _queue_chunks(self, state: ItemState) -> None:
        """Queue the chunks not yet written (a resumed item keeps the verified ones)."""
        item, manifest = state.item, state.manifest
        written = manifest.verified_chunks()
        chunks = manifest.chunks
        state.report.chunks = len(chunks)
        state.report.resumed_chunks = len(written)
        state.report.frames = sum(c.frames for c in chunks if c.index in written)
        self.progress.planned(state, resumed=state.report.frames)
        for chunk in chunks:
            if chunk.index not in written:
                state.todo.append(ChunkTask(item.number, item.clip, item.style.spec, item.settings, chunk,
                                            manifest.chunk_path(chunk.index)))
        if not state.todo:  # every chunk was written by an earlier run: only the join is left
            self.open.remove(state)
            self._join(state)

    def _submit_chunks(self) -> None:
        while True:
            if self.retries:
                task, state, lost_by = self.retries[0]
                worker = self._free_worker(avoid=lost_by)
                if worker is None:
                    return
                self.retries.popleft()
            else:
                state = next((s for s in self.open if s.todo), None)
                worker = self._free_worker() if state else None
                if worker is None:
                    return
                task = state.todo.popleft()
            ref = worker.actor.render.remote(task)
            worker.busy += 1
            state.outstanding += 1
            state.report.started = state.report.started or time.perf_counter()
            self.pending[ref] = Pending("chunk", worker=worker, items=[state], task=task)
            in_flight = sum(p.kind == "chunk" for p in self.pending.values())
            self.peak["chunks_in_flight"] = max(self.peak["chunks_in_flight"], in_flight)
            if not state.todo and state in self.open:
                self.open.remove(state)   # all submitted: make room for the next item to be planned

    def _on_chunk(self, ref, pending: Pending) -> None:
        state, task, worker = pending.items[0], pending.task, pending.worker
        worker.busy -= 1
        state.outstanding -= 1
        try:
            done = ray.get(ref)
        except Exception as error:
            self._chunk_failed(state, task, worker, error)
            return
        if state.report.status == "failed":
            return
        state.manifest.record_chunk(done)
        state.report.frames += done.frames
        state.report.nodes.add(done.node)
        self.progress.frames(done.frames)
        if state.outstanding == 0 and not state.todo and not self._retrying(state):
            self._join(state)

    def _chunk_failed(self, state: ItemState, task: ChunkTask, worker: Worker, error: Exception) -> None:
        if isinstance(error, RayActorError):
            self._lose_worker(worker)
        if state.report.status == "failed":
            return
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, UserError):
            self._fail(state, str(cause))
        elif task.attempt >= MAX_ATTEMPTS:
            self._fail(state, f"chunk {task.chunk.index} failed {task.attempt} times, last: {one_line(error)}")
        else:
            state.report.retries += 1
            self.progress.note(f"retrying chunk {task.chunk.index} of {self._name(state)} "
                               f"(attempt {task.attempt + 1}): {one_line(error)}")
            self.retries.appendleft((dataclasses.replace(task, attempt=task.attempt + 1), state, worker))

    def _retrying(self, state: ItemState) -> bool:
        return any(s is state for _, s, _ in self.retries)

    def _join(self, state: ItemState) -> None:
        item, manifest = state.item, state.manifest
        chunks = [(manifest.chunk_path(chunk.index), chunk.kept.start) for chunk in manifest.chunks]
        state.report.started = state.report.started or time.perf_counter()  # all chunks came from an earlier run
        metadata = {"mambast": {"batch": {"job": self.job.name, "entry": item.entry, "clip": item.clip,
                                          "style": item.style.spec, "settings": dataclasses.asdict(item.settings),
                                          "weights": self.job.weights or "bundled", "seed": item.settings.seed}}}
        if damage := (manifest.data["plan"] or {}).get("damage"):
            metadata["mambast"]["batch"]["source_damage"] = {"problem": damage, "frames_read": manifest.frames}
        future = self.io.submit(join_chunks, chunks, item.output, item.clip, item.settings.video_codec,
                                item.settings.audio, manifest.frames, metadata, item.settings.strict,
                                self.job.overwrite or manifest.status == "done")
        self.pending[future] = Pending("join", items=[state])

    def _on_join(self, ref, pending: Pending) -> None:
        state = pending.items[0]
        try:
            frames = self._result(ref)
        except Exception as error:
            self._fail(state, one_line(error))
            return
        report = state.report
        report.seconds = time.perf_counter() - (report.started or time.perf_counter())
        report.status, report.frames = "done", frames
        state.manifest.mark_done(frames, report.seconds)
        self.progress.item_done(state)

    def _fail(self, state: ItemState, error: str) -> None:
        if state.report.status == "failed":
            return
        state.report.status, state.report.error = "failed", error
        state.report.seconds = time.perf_counter() - (state.report.started or time.perf_counter())
        state.todo.clear()
        if state in self.open:
            self.open.remove(state)
        self.retries = deque(r for r in self.retries if r[1] is not state)
        state.manifest.mark_failed(error)
        self.progress.item_done(state)

    def _name(self, state: ItemState) -> str:
        return os.path.relpath(state.item.output, self.job.output_dir)

    # -- workers

    def _start_worker(self) -> None:
        if self.starts_left <= 0:
            return
        self.starts_left -= 1
        actor = ray.remote(**self.actor_options, max_restarts=0, scheduling_strategy="SPREAD")(StylizerActor).remote(
            self.job.weights, self.device, self.job.threads, self.fault)
        worker = Worker(actor)
        self.workers.append(worker)
        self.pending[actor.ready.remote()] = Pending("start", worker=worker)

    def _on_start(self, ref, pending: Pending) -> None:
        worker = pending.worker
        try:
            worker.node = ray.get(ref)
        except Exception as error:
            self.last_start_error = one_line(error)
            self._lose_worker(worker)
            return
        worker.ready = True
        self.waiting_since = time.monotonic()

    def _lose_worker(self, worker: Worker) -> None:
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        ray.kill(worker.actor, no_restart=True)
        self._start_worker()

    def _free_worker(self, avoid: Worker | None = None) -> Worker | None:
        free = [w for w in self.workers if w.ready and w.busy < IN_FLIGHT_PER_WORKER]
        others = [w for w in free if w is not avoid]
        pick = others or free
        return min(pick, key=lambda w: w.busy) if pick else None

    def _check_stall(self) -> None:
        """Fail what is left when no worker is ready and none has come up for START_TIMEOUT_S."""
        if any(w.ready for w in self.workers):
            self.waiting_since = time.monotonic()
            return
        needs_workers = self.retries or any(s.todo for s in self.open)
        if not needs_workers:
            return
        if self.workers and time.monotonic() - self.waiting_since < START_TIMEOUT_S:
            return
        reason = (f"no stylizer worker could start ({self.last_start_error})" if self.last_start_error and
                  not self.workers else
                  f"no stylizer worker could start within {START_TIMEOUT_S:.0f} s: each needs "
                  f"{self.actor_options}, the cluster has {ray.available_resources()} free")
        for state in [*self.open, *(r[1] for r in self.retries)]:
            self._fail(state, reason)
        for ref, pending in list(self.pending.items()):
            if pending.kind == "chunk":
                self._fail(pending.items[0], reason)

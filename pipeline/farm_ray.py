"""The render farm on Ray: pipeline/farm.py's steps placed on a cluster, retried when workers or nodes are lost.

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
  file is a temporary that the retry never reads; the retry writes the same bits (farm.py).
* Bad input (a UserError: the clip does not decode, a schedule out of order) is not retried: that item fails with
  its message, and the others go on.
* The driver killed: nothing is lost but the chunks in flight; `mambast batch --resume` reads the manifests and
  renders only the chunks not recorded (and verified) as written.
* No worker can start (no free GPU anywhere, or every start fails): after `start_timeout` seconds the remaining
  items fail with a message saying so, instead of waiting forever.

Ray on loopback: `connect_ray` reuses pipeline/ray_runner.start_ray (a quiet local cluster bound to 127.0.0.1, or
joining an address). Joining a loopback address (a local multi-node test cluster) also needs
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: without it `ray.init(address="127.0.0.1:PORT")` rewrites the address to
the machine's interface address (`services.resolve_ip_for_localhost`) and then hangs on "Failed to connect to GCS at
192.0.2.2:PORT", since the cluster listens on 127.0.0.1 only.
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
from tqdm import tqdm

from models.checkpoint import load_model
from models.errors import UserError
from pipeline.farm import (ChunkTask, ChunkWorker, ClipPlan, FaultPlan, Item, ItemManifest, ItemReport, Job,
                           WorkFolder, join_chunks, plan_chunks, scan_clip)
from pipeline.ray_runner import start_ray, stop_ray

IN_FLIGHT_PER_WORKER = 2     # chunks submitted to one actor and not yet finished: one running, one queued
MAX_ATTEMPTS = 3             # per chunk, counting the first
START_TIMEOUT_S = float(os.environ.get("MAMBAST_FARM_START_TIMEOUT", 600))
PLANS_KEPT = 64              # clip plans remembered for the next items of the same clip
WAIT_S = 1.0                 # longest wait for a result before checking for a stall
IO_THREADS = 2               # the driver's threads for scanning clips and joining outputs


# ----------------------------------------------------------------------------------------------------------
# Connecting


def connect_ray(address: str | None, num_cpus: int | None = None) -> str | None:
    """Start a local loopback cluster (None), or join `address`; returns what `stop_ray` needs."""
    if address is not None and is_loopback(address):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # for the processes Ray starts
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False   # for this one (Ray read it when imported)
    return start_ray(address, num_cpus=num_cpus)


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


# ----------------------------------------------------------------------------------------------------------
# What runs on the cluster


class StylizerActor:
    """A farm.ChunkWorker in an actor: the model loads once, then chunks of any item."""

    def __init__(self, weights, device, threads, fault):
        self.node = ray.get_runtime_context().get_node_id()
        self.worker = ChunkWorker(weights, device, threads, fault)

    def ready(self) -> str:
        return self.node

    def render(self, task: ChunkTask):
        return dataclasses.replace(self.worker.render(task), node=self.node[:8])


# ----------------------------------------------------------------------------------------------------------
# Running a job


def run_job(job: Job, address: str | None = None, workers: int | None = None, resume: bool = False,
            progress: bool = True) -> list[ItemReport]:
    """Render every item of `job` on Ray (the connected cluster, else `address`, else a local one).

    Everything that can be refused is refused before the work folder is written: a changed job, existing
    outputs, a stale work folder, a bad checkpoint, an unreachable cluster, a device the cluster does not have.
    """
    work = WorkFolder(job)
    work.check(resume)
    load_model(job.weights)                        # a bad checkpoint is one clear line here, not N dead actors
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


@dataclass
class ItemState:
    manifest: ItemManifest
    report: ItemReport
    todo: deque = field(default_factory=deque)   # chunk tasks not yet submitted
    outstanding: int = 0                         # chunks submitted and not yet written

    @property
    def item(self) -> Item:
        return self.manifest.item


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
        self.worker_count, self.actor_options, self.device = self._size(workers)
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
                report.chunks = len(manifest.spans or ())
                self.progress.skipped()
                continue
            self.open.append(state)
            self.peak["open_items"] = max(self.peak["open_items"], len(self.open))
            self.progress.expect(state)
            if manifest.spans is not None:
                self._queue_chunks(state)
            else:
                self._plan(state)

    def _plan(self, state: ItemState) -> None:
        key = (state.item.clip, state.item.settings.shot_threshold)
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
        lead_in = state.item.settings.stylizer_config().lead_in
        state.manifest.set_plan(plan, plan_chunks(plan, state.item.settings.chunk_frames, lead_in))
        self._queue_chunks(state)

    def _queue_chunks(self, state: ItemState) -> None:
        """Queue the chunks not yet written (a resumed item keeps the verified ones)."""
        item, manifest = state.item, state.manifest
        written = manifest.verified_chunks()
        spans = manifest.spans
        state.report.chunks = len(spans)
        state.report.resumed_chunks = len(written)
        state.report.frames = sum(s.frames for s in spans if s.index in written)
        self.progress.planned(state, resumed=state.report.frames)
        for span in spans:
            if span.index not in written:
                state.todo.append(ChunkTask(item.number, item.clip, item.style.spec, item.settings, span,
                                            manifest.chunk_path(span.index)))
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
            self._fail(state, f"chunk {task.span.index} failed {task.attempt} times, last: {one_line(error)}")
        else:
            state.report.retries += 1
            self.progress.note(f"retrying chunk {task.span.index} of {self._name(state)} "
                               f"(attempt {task.attempt + 1}): {one_line(error)}")
            self.retries.appendleft((dataclasses.replace(task, attempt=task.attempt + 1), state, worker))

    def _retrying(self, state: ItemState) -> bool:
        return any(s is state for _, s, _ in self.retries)

    def _join(self, state: ItemState) -> None:
        item, manifest = state.item, state.manifest
        chunks = [(manifest.chunk_path(span.index), span.start) for span in manifest.spans]
        state.report.started = state.report.started or time.perf_counter()  # all chunks came from an earlier run
        metadata = {"mambast": {"batch": {"job": self.job.name, "entry": item.entry, "clip": item.clip,
                                          "style": item.style.spec, "settings": dataclasses.asdict(item.settings),
                                          "weights": self.job.weights or "bundled", "seed": item.settings.seed}}}
        future = self.io.submit(join_chunks, chunks, item.output, item.clip, item.settings.video_codec,
                                item.settings.audio, manifest.frames, metadata)
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

    def _size(self, workers: int | None) -> tuple[int, dict, str]:
        """How many stylizer actors, what each asks Ray for, and their torch device."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if workers is not None and workers < 1:
            raise UserError(f"--workers: must be >= 1, got {workers}")
        if self.job.device.startswith("cuda") and not gpus:
            raise UserError(f"{self.job.name}: device: {self.job.device} asked for, but the cluster has no GPUs")
        if gpus and self.job.device != "cpu":
            count = workers or gpus
            return count, {"num_gpus": min(1.0, gpus / count), "num_cpus": 1}, self.job.device
        count = workers or max(1, cpus // self.job.threads)
        device = "cpu" if self.job.device == "auto" else self.job.device
        return count, {"num_cpus": min(float(self.job.threads), cpus / count)}, device

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


def one_line(error: BaseException) -> str:
    """A remote error in one short line: a UserError's own message, else the type and the first sentence."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, UserError):
        return str(cause)
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if isinstance(cause, ray.exceptions.RayActorError):  # Ray's text: a paragraph, the reason on its last line
        lines = [lines[-1].split(". ")[0].rstrip(".") + "."] if lines else []
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One bar for the whole job: frames, fps and ETA, with items done/failed and the items being rendered
    (frames done/total) in its postfix; a line per finished item. Off with progress=False or MAMBAST_QUIET=1."""

    SHOWN_ITEMS = 2

    def __init__(self, job: Job, enabled: bool = True):
        quiet = os.environ.get("MAMBAST_QUIET", "") not in ("", "0")
        self.enabled = enabled and not quiet
        self.job = job
        self.bar = tqdm(total=0, unit="frame", desc=job.name, disable=not self.enabled, dynamic_ncols=True,
                        smoothing=0.1)
        self.done = self.failed = 0
        self.active: OrderedDict[int, ItemState] = OrderedDict()   # item number -> state, while it renders
        self.counted: dict[int, int] = {}   # item number -> frames it adds to the bar's total
        self._postfix()

    def expect(self, state: ItemState) -> None:
        """An item is opened: count its frames, from the container header until the plan has the exact number."""
        self.active[state.item.number] = state
        self._count(state, state.manifest.frames or estimate_frames(state.item.clip))

    def planned(self, state: ItemState, resumed: int) -> None:
        """The exact frame count replaces the estimate; frames an earlier run wrote are not left to do."""
        self._count(state, state.manifest.frames - resumed)

    def _count(self, state: ItemState, frames: int) -> None:
        number = state.item.number
        self.bar.total += frames - self.counted.get(number, 0)
        self.counted[number] = frames
        self.bar.refresh()

    def frames(self, count: int) -> None:
        self.bar.update(count)
        self._postfix()

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def skipped(self) -> None:
        self.done += 1
        self._postfix()

    def item_done(self, state: ItemState) -> None:
        r = state.report
        self.active.pop(r.item.number, None)
        self.counted.pop(r.item.number, None)
        name = os.path.relpath(r.item.output, self.job.output_dir)
        if r.status == "done":
            self.done += 1
            retries = f", {r.retries} chunk(s) retried" if r.retries else ""
            self.note(f"done   {name}: {r.frames} frames in {r.seconds:.1f} s ({r.fps:.2f} fps){retries}")
        else:
            self.failed += 1
            self.note(f"FAILED {name}: {r.error}")
        self._postfix()

    def _postfix(self) -> None:
        text = f"items {self.done}/{len(self.job.items)} done" + (f", {self.failed} failed" if self.failed else "")
        rendering = [f"{os.path.basename(s.item.output)} {s.report.frames}/{s.manifest.frames or '?'}"
                     for s in list(self.active.values())[:self.SHOWN_ITEMS]]
        self.bar.set_postfix_str(" | ".join([text, *rendering]))

    def close(self) -> None:
        self.bar.close()


def estimate_frames(path: str) -> int:
    """The container's idea of a clip's frame count (header only; 0 when it has none)."""
    try:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            if stream.duration and stream.average_rate:
                return round(stream.duration * stream.time_base * stream.average_rate)
    except Exception:  # a folder of images, a damaged file: the plan will say
        pass
    return 0

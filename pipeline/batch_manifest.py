"""A batch job's work folder: what is done, recorded atomically, so that an interrupted job resumes where it stopped.

    <output_dir>/.mambast-batch/<job file name>/
      job.json                  the normalised job and its hash (--resume refuses a changed job)
      items/NNNN/manifest.json  one item's chunk plan and the chunks written (replaced atomically)
      items/NNNN/chunk_*.mov    its chunk files, until the output is joined
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil

import av

from models.errors import UserError
from pipeline.batch_job import MANIFEST_VERSION, WORK_FOLDER, Item, Job, describe_change
from pipeline.batch_worker import ChunkDone, chunk_format, count_video_packets
from pipeline.chunks import Chunk, ClipPlan


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename it over `path`."""
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable manifest ({error}); delete the job's work folder to start over") from None


class ItemManifest:
    """One item's progress: its chunk plan and the chunks written, in `<work>/items/NNNN/manifest.json`."""

    def __init__(self, folder: str, item: Item, job_hash: str):
        self.folder = folder
        self.path = os.path.join(folder, "manifest.json")
        self.item = item
        data = read_json(self.path)
        if data is None or data.get("job_hash") != job_hash:
            data = {"version": MANIFEST_VERSION, "job_hash": job_hash, "item": item.number, "entry": item.entry,
                    "output": item.output, "status": "pending", "plan": None, "chunks": {}}
        if data["status"] == "done" and not os.path.isfile(item.output):
            data.update(status="pending", chunks={})  # the output went missing since: render it again
        self.data = data

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def chunks(self) -> list[Chunk] | None:
        plan = self.data["plan"]
        return None if plan is None else [Chunk.from_list(chunk) for chunk in plan["chunks"]]

    @property
    def frames(self) -> int:
        return self.data["plan"]["frames"] if self.data["plan"] else 0

    def chunk_path(self, index: int) -> str:
        return os.path.join(self.folder, f"chunk_{index:05d}{chunk_format(self.item.settings.video_codec)[0]}")

    def set_plan(self, plan: ClipPlan, chunks: list[Chunk]) -> None:
        self.data["plan"] = {"frames": plan.frames, "cuts": list(plan.cuts),
                             "chunks": [chunk.to_list() for chunk in chunks]}
        if plan.damage:
            self.data["plan"]["damage"] = plan.damage  # read anyway (not strict): the output records it too
        self.save()

    def record_chunk(self, done: ChunkDone) -> None:
        self.data["chunks"][str(done.index)] = {
            "file": os.path.basename(done.path), "frames": done.frames, "bytes": done.bytes,
            "seconds": round(done.seconds, 3), "attempt": done.attempt, "worker": done.worker, "node": done.node}
        self.save()

    def verified_chunks(self) -> set[int]:
        """Chunks recorded as written whose file is still there, of the recorded size and frame count."""
        good = set()
        for index, record in list(self.data["chunks"].items()):
            path = os.path.join(self.folder, record["file"])
            try:
                ok = os.path.getsize(path) == record["bytes"] and count_video_packets(path) == record["frames"]
            except (OSError, av.FFmpegError):
                ok = False
            if ok:
                good.add(int(index))
            else:
                del self.data["chunks"][index]
        return good

    def mark_done(self, frames: int, seconds: float) -> None:
        self.data.update(status="done", frames_written=frames, join_seconds=round(seconds, 3), error=None)
        self.save()
        self.remove_chunks()

    def mark_failed(self, error: str) -> None:
        self.data.update(status="failed", error=error)
        self.save()

    def remove_chunks(self) -> None:
        """Chunk files (and temporaries of crashed attempts) go once the output is joined; the manifest stays."""
        for name in os.listdir(self.folder):
            if name != "manifest.json":
                path = os.path.join(self.folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


class RunLock:
    """One `mambast batch` at a time per output folder: an exclusive flock on `<output_dir>/.mambast-batch/lock`.

    The kernel drops the lock when its holder dies, however it dies (SIGKILL included), so a crashed run never
    blocks the next; a second run while the first is alive is refused in one line naming it.
    """

    def __init__(self, job: Job):
        self.job = job
        self.path = os.path.join(job.output_dir, WORK_FOLDER, "lock")
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"{self.job.name}: cannot lock the output folder {self.job.output_dir} "
                            f"({error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.job.name}: another mambast batch ({holder}) is working in "
                            f"{self.job.output_dir}; wait until it ends, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, job {self.job.name}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class WorkFolder:
    """The job's work folder, `<output_dir>/.mambast-batch/<job file name>/`: job.json and one folder per item."""

    def __init__(self, job: Job):
        self.job = job
        self.root = job.work_dir
        self.job_file = os.path.join(self.root, "job.json")
        self.normalised = job.normalised()
        self.hash = job.hash(self.normalised)

    def check(self, resume: bool) -> None:
        """Refuse a stale work folder (without --resume), a changed job (with it) and outputs that exist and are
        not this job's finished work. Writes nothing."""
        job = self.job
        recorded = read_json(self.job_file)
        if recorded is not None and not resume:
            raise UserError(f"{job.name}: a previous run left {self.root}; pass --resume to continue it, "
                            f"or delete that folder to start over")
        if recorded is not None and recorded.get("hash") != self.hash:
            change = describe_change(recorded.get("normalised"), self.normalised) or "its settings differ"
            raise UserError(f"{job.name}: changed since the run being resumed ({change}); undo the change, "
                            f"or delete {self.root} to start over")
        if job.overwrite:
            return
        for item in job.items:
            if os.path.lexists(item.output) and self.manifest(item).status != "done":
                raise UserError(f"{job.name}: {item.entry}: {os.path.relpath(item.output, job.output_dir)} "
                                f"already exists; remove it or set overwrite: true")

    def create(self) -> None:
        """Make the item and output folders and record the job (once, on the first run)."""
        for item in self.job.items:
            os.makedirs(self.item_folder(item), exist_ok=True)
            os.makedirs(os.path.dirname(item.output), exist_ok=True)
        if not os.path.exists(self.job_file):
            write_json_atomic(self.job_file, {"version": MANIFEST_VERSION, "job_file": self.job.path,
                                              "hash": self.hash, "normalised": self.normalised})

    def item_folder(self, item: Item) -> str:
        return os.path.join(self.root, "items", f"{item.number:04d}")

    def manifest(self, item: Item) -> ItemManifest:
        """The item's manifest, read from disk now (items are opened one at a time: memory stays flat)."""
        return ItemManifest(self.item_folder(item), item, self.hash)

    def open(self, resume: bool) -> list[ItemManifest]:
        """`check`, `create`, and every item's manifest (for tools and tests; the farm reads them lazily)."""
        self.check(resume)
        self.create()
        return [self.manifest(item) for item in self.job.items]

"""What a batch run tells its user: one progress bar for the whole job while it runs, a table at the end.

    Progress: frames, fps and ETA, items done/failed and the items being rendered; a line per finished item
    ItemReport per item ──summary_table──► the plain-text table `mambast batch` prints last
"""
from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.batch_job import Item, Job
from pipeline.batch_manifest import ItemManifest


@dataclass
class ItemReport:
    item: Item
    status: str = "pending"     # done | failed | skipped (done by an earlier run)
    frames: int = 0
    chunks: int = 0
    resumed_chunks: int = 0     # chunks an earlier run had written
    retries: int = 0            # chunk attempts beyond the first
    started: float | None = None
    seconds: float = 0.0
    error: str = ""
    nodes: set = field(default_factory=set)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ItemState:
    manifest: ItemManifest
    report: ItemReport
    todo: deque = field(default_factory=deque)   # chunk tasks not yet submitted
    outstanding: int = 0                         # chunks submitted and not yet written

    @property
    def item(self) -> Item:
        return self.manifest.item


def summary_table(reports: list[ItemReport], output_dir: str) -> str:
    """A plain-text table of every item: output, frames, chunks, retries, time, fps, status."""
    header = ("#", "output", "frames", "chunks", "retries", "time", "fps", "status")
    rows = []
    for r in reports:
        chunks = f"{r.chunks}" + (f" ({r.resumed_chunks} resumed)" if r.resumed_chunks else "")
        status = r.status if r.status != "failed" else f"FAILED: {r.error}"
        timing = (f"{r.seconds:.1f}s", f"{r.fps:.2f}") if r.status == "done" else ("-", "-")
        rows.append((str(r.item.number + 1), os.path.relpath(r.item.output, output_dir), str(r.frames), chunks,
                     str(r.retries), *timing, status))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [header, *rows]]
    done = sum(r.status in ("done", "skipped") for r in reports)
    failed = sum(r.status == "failed" for r in reports)
    total_frames = sum(r.frames for r in reports if r.status == "done")
    lines.append(f"{done} of {len(reports)} items done, {failed} failed; {total_frames} frames rendered")
    return "\n".join(lines)


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

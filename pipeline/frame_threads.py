"""Threads that keep the pipeline's stages busy at once: decoding ahead, the stylizer's stages, encoding behind.

    FrameReader thread ─► bounded queue ─► (the caller: stylizing) ─► bounded queue ─► FrameWriter thread

    run_stages(items, [prepare, motion, model, post], pipelined=True)      (pipeline/stylizer.py's stages)
      feed thread ─► queue ─► prepare thread ─► queue ─► motion thread ─► ... ─► queue ─► the caller

Each keeps a few frames (DECODE_QUEUE_FRAMES) or batches (STAGE_QUEUE_BATCHES) in flight, so memory does not grow
with the clip; raises its threads' errors in the caller; and is always joined, also when the caller gives up early.
`run_stages(..., pipelined=False)` runs the same stages one after another in the caller: the oracle the threaded
run must equal, item for item.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from pipeline.sink import FrameSink
from pipeline.source import Frame, FrameSource

DECODE_QUEUE_FRAMES = 8    # frames waiting in each queue: enough to hide decode jitter, no more
STAGE_QUEUE_BATCHES = 2    # batches waiting between two stages: the next one ready while this one is worked on


def put_unless_stopped(box: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` into the bounded queue, waiting while it is full, unless `stop` is set first (then False)."""
    while not stop.is_set():
        try:
            box.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class FrameReader:
    """Decodes the selected frames on a background thread into a small bounded queue.

    Iterate it for the frames in order. A decode error is raised in the iterating thread; `close()` (or leaving
    the `with` block) stops the decoder and joins its thread, also when the consumer gives up early. The decoder
    (and any decord reader it opens) lives entirely in that one thread.
    """

    _END = object()

    def __init__(self, source: FrameSource, selection: range, depth: int = DECODE_QUEUE_FRAMES):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._decode, args=(source, selection), name="mambast-decode",
                                        daemon=True)
        self._thread.start()

    def _decode(self, source: FrameSource, selection: range) -> None:
        frames = iter(())
        try:
            frames = source.frames(selection.start, selection.stop, selection.step)
            for frame in frames:
                if not self._put(frame):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, who raises it
            self._put(error)
        finally:
            if hasattr(frames, "close"):
                frames.close()

    def _put(self, item) -> bool:
        return put_unless_stopped(self._queue, item, self._stop)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FrameWriter:
    """Writes frames to a sink from a background thread, so that encoding overlaps stylizing (PyAV lets go of the
    GIL while it converts and encodes).

    `write` raises, in the caller, an error the writer thread met; `finish()` waits until every frame is written.
    The sink itself stays the caller's: `close()` or `abort()` it after `finish()` or after leaving the `with`
    block, which stops and joins the thread.
    """

    _END = object()

    def __init__(self, sink: FrameSink, depth: int = DECODE_QUEUE_FRAMES):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, args=(sink,), name="mambast-encode", daemon=True)
        self._thread.start()

    def _write(self, sink: FrameSink) -> None:
        try:
            while not self._stop.is_set():
                try:
                    frame = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if frame is self._END:
                    return
                sink.write(frame)
        except BaseException as error:  # raised again in the caller's thread
            self._error = error

    def write(self, frame) -> None:
        while True:
            if not self._thread.is_alive():
                raise self._error or RuntimeError("the encoder thread has stopped")
            try:
                self._queue.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.write(self._END)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_stages(items: Iterable, stages: Sequence[Callable], pipelined: bool,
               depth: int = STAGE_QUEUE_BATCHES) -> Iterator:
    """Each of `items` through every stage in turn (`stage(item)` returns the item for the next), in input order.

    `pipelined`: every stage on a thread of its own, and `items` iterated on one more, with at most `depth` items
    waiting between two stages; otherwise inline in the caller, one item through all stages before the next. A
    stage's state (a smoother) sees the items in order either way, so both give the same results.
    """
    if not pipelined:
        for item in items:
            for stage in stages:
                item = stage(item)
            yield item
        return
    threads = StageThreads(items, stages, depth)
    try:
        yield from threads
    finally:
        threads.close()


class _Failure:
    """An error met on a stage thread, passed down the queues and raised in the caller."""

    def __init__(self, error: BaseException):
        self.error = error


class StageThreads:
    """`run_stages` on threads: feed ─► queue ─► stage 1 ─► queue ─► ... ─► stage n ─► queue ─► the caller.

    A stage that raises passes the error on instead of a result; the stages after it pass it on too, and the
    caller raises it after the results that came before it. `close()` stops every thread and joins it.
    """

    _END, _STOPPED = object(), object()

    def __init__(self, items: Iterable, stages: Sequence[Callable], depth: int):
        self._stop = threading.Event()
        self._queues = [queue.Queue(maxsize=depth) for _ in range(len(stages) + 1)]
        self._threads = [threading.Thread(target=self._feed, args=(items, self._queues[0]), name="mambast-feed",
                                          daemon=True)]
        for stage, inbox, outbox in zip(stages, self._queues, self._queues[1:]):
            name = f"mambast-{getattr(stage, '__name__', 'stage')}"
            self._threads.append(threading.Thread(target=self._work, args=(stage, inbox, outbox), name=name,
                                                  daemon=True))
        for thread in self._threads:
            thread.start()

    def _feed(self, items: Iterable, outbox: queue.Queue) -> None:
        try:
            for item in items:
                if not self._put(outbox, item):
                    return
            self._put(outbox, self._END)
        except BaseException as error:
            self._put(outbox, _Failure(error))

    def _work(self, stage: Callable, inbox: queue.Queue, outbox: queue.Queue) -> None:
        while (item := self._get(inbox)) is not self._STOPPED:
            if item is not self._END and not isinstance(item, _Failure):
                try:
                    item = stage(item)
                except BaseException as error:
                    item = _Failure(error)
            if not self._put(outbox, item) or item is self._END or isinstance(item, _Failure):
                return

    def _put(self, outbox: queue.Queue, item) -> bool:
        return put_unless_stopped(outbox, item, self._stop)

    def _get(self, inbox: queue.Queue):
        while not self._stop.is_set():
            try:
                return inbox.get(timeout=0.1)
            except queue.Empty:
                continue
        return self._STOPPED

    def __iter__(self) -> Iterator:
        while (item := self._get(self._queues[-1])) is not self._STOPPED:
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

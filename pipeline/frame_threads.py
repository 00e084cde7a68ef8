"""The local runner's two helper threads: decoding ahead of the stylizer and encoding behind it.

    FrameReader thread ─► bounded queue ─► (the caller: stylizing) ─► bounded queue ─► FrameWriter thread

Each keeps a few frames in flight (DECODE_QUEUE_FRAMES), raises its thread's errors in the caller, and is always
joined, also when the caller gives up early.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from pipeline.sink import FrameSink
from pipeline.source import Frame, FrameSource

DECODE_QUEUE_FRAMES = 8    # frames waiting in each queue: enough to hide decode jitter, no more


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
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

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

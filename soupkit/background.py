"""Threads of the export: a producer run ahead in a worker thread, and a scope for torch's thread count."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty, Full, Queue
from typing import TypeVar

import torch

T = TypeVar("T")


def in_background(items: Iterator[T], depth: int, poll_s: float = 0.1) -> Iterator[T]:
    """Run ``items`` in a worker thread, ``depth`` ahead: maths and reads overlap the consumer's writes.

    torch ops and file I/O release the GIL, so on two cores the merge hides behind the disk.
    Worker and consumer stop each other on any error, and neither ever waits unboundedly: every
    ``put``/``get`` polls a stop event every ``poll_s`` seconds. An exception in the worker is
    re-raised here; the consumer stopping (an error while writing, a signal) stops the worker.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=poll_s)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, which raises it)
            offer(err)
        finally:
            getattr(items, "close", lambda: None)()  # release the producer's open files now

    worker = threading.Thread(target=work, name="soupkit-export", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = queue.get(timeout=poll_s)
            except Empty:
                if not worker.is_alive() and queue.empty():
                    raise RuntimeError("the export worker stopped without a result") from None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()  # bounded: the worker checks ``stop`` at least every poll_s between items


@contextmanager
def maths_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op torch threads inside the block, then restore the previous count.

    The export already runs two busy threads (maths and writes); torch's own pool on top of them
    oversubscribes small machines, where each small op then waits for a descheduled thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Batches prepared ahead on a background thread, so that the host reads, decodes and places the next batch on
the devices while the current training step runs.

`Prefetcher(iterator, buffer_size)` pulls from `iterator` on one daemon thread into a queue of at most
`buffer_size` batches (plus the one the thread is preparing while the queue is full) and yields them in the same order. What the thread meets is handed over in order too: an
exception raised by the iterator is re-raised by the `next` call that reaches it (the batches before it are
yielded first), and the end of the iterator is a `StopIteration` there. Read-ahead batches past the last one
trained on are simply dropped by `close`.

Resumable iterators (with a `state` property, see `jaxalign.train.loop`): the thread reads the iterator's state
right after each batch and queues it with the batch, so `Prefetcher.state` is the position after the last batch
*handed out*, not after the read-ahead: a checkpoint of the step that consumed that batch resumes with the next
one, and the batches read ahead are read again.

Keep collectives (all-gathers across processes) out of a prefetched iterator: the thread would issue them at
its own pace, in a different order than the training step's on other processes.

Public API:
  Prefetcher(iterator, buffer_size=2)  (an iterator; .state; .close())
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Iterator

_END = object()          # the iterator is exhausted
_STATELESS = object()    # the iterator has no `state`


class _Failure:
    """An exception raised by the iterator, carried to the consuming thread."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Iterator[Any]):
    """The items of `iterator`, in order, prepared up to `buffer_size` ahead on a background thread.

    Args:
      iterator: any iterator; if it has a `state` property, `Prefetcher.state` follows the items handed out.
      buffer_size: items read ahead at most (>= 1).
    """

    def __init__(self, iterator: Iterator[Any], buffer_size: int = 2):
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size}: prefetch at least one item (or do not wrap the iterator)")
        self._iterator = iterator
        self._state = _state_of(iterator)
        self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._fill, name="jaxalign-prefetch", daemon=True)
        self._thread.start()

    @property
    def state(self) -> Any:
        """The wrapped iterator's state after the last item handed out (AttributeError if it has none)."""
        if self._state is _STATELESS:
            raise AttributeError(f"{type(self._iterator).__name__} has no state")
        return self._state

    def _put(self, item: Any) -> bool:
        """Queues `item`, waiting for room; False if `close` was called meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = next(self._iterator)
            except StopIteration:
                self._put(_END)
                return
            except BaseException as error:  # noqa: BLE001  (carried to the main thread, which raises it)
                self._put(_Failure(error))
                return
            if not self._put((item, _state_of(self._iterator))):
                return

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        entry = self._queue.get()
        if entry is _END:
            self._finished = True
            raise StopIteration
        if isinstance(entry, _Failure):
            self._finished = True
            raise entry.error
        item, self._state = entry
        return item

    def close(self) -> None:
        """Stops the thread (after the item it is preparing) and drops the items read ahead."""
        self._stop.set()
        self._finished = True
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __del__(self):
        self._stop.set()


def _state_of(iterator: Iterator[Any]) -> Any:
    try:
        state = iterator.state
    except AttributeError:
        return _STATELESS
    return copy.deepcopy(state)  # the iterator may mutate its state object in place later

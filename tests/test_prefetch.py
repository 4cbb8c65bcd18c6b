"""Prefetching batches on a background thread: same items, same order, errors and the end surface in the caller."""
import threading

import numpy as np
import pytest

from jaxalign.data.prefetch import Prefetcher


class Counting:
    """0, 1, 2, ... up to `stop` (exclusive) as small arrays; `state` is the next index; raises at `fail_at`."""

    def __init__(self, stop=None, fail_at=None, start=0):
        self.next_index, self.stop, self.fail_at = start, stop, fail_at
        self.threads = set()

    @property
    def state(self):
        return {"next_index": self.next_index}

    def __iter__(self):
        return self

    def __next__(self):
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and self.next_index == self.fail_at:
            raise ValueError(f"record {self.next_index} is corrupt")
        if self.stop is not None and self.next_index >= self.stop:
            raise StopIteration
        self.next_index += 1
        return {"x": np.full((2, 3), self.next_index - 1)}


@pytest.mark.parametrize("buffer_size", [1, 2, 5])
def test_prefetched_items_are_the_same_in_the_same_order(buffer_size):
    plain = [batch["x"] for batch in Counting(stop=12)]
    source = Counting(stop=12)
    prefetched = [batch["x"] for batch in Prefetcher(source, buffer_size)]
    assert len(prefetched) == 12
    for expected, got in zip(plain, prefetched):
        np.testing.assert_array_equal(expected, got)
    assert source.threads == {"jaxalign-prefetch"}  # the work was done off the calling thread


def test_state_is_that_of_the_last_item_handed_out_not_of_the_read_ahead():
    source = Counting()
    batches = Prefetcher(source, buffer_size=3)
    assert batches.state == {"next_index": 0}
    for _ in range(4):
        next(batches)
    while batches._queue.qsize() < 3:  # let the thread fill the buffer (items 4..6) and prepare one more
        threading.Event().wait(0.01)
    assert source.next_index >= 7
    assert batches.state == {"next_index": 4}
    batches.close()


def test_an_error_in_the_iterator_is_raised_by_next_after_the_earlier_items():
    batches = Prefetcher(Counting(fail_at=3), buffer_size=2)
    assert [int(next(batches)["x"][0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="record 3 is corrupt"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def test_the_end_of_the_iterator_is_a_stop_iteration():
    batches = Prefetcher(Counting(stop=2), buffer_size=4)
    assert len([next(batches), next(batches)]) == 2
    with pytest.raises(StopIteration):
        next(batches)


def test_iterators_without_state_have_no_state():
    batches = Prefetcher(iter([1, 2, 3]))
    assert list(batches) == [1, 2, 3]
    with pytest.raises(AttributeError, match="has no state"):
        batches.state


def test_close_stops_the_thread_of_an_endless_iterator():
    batches = Prefetcher(Counting(), buffer_size=2)
    next(batches)
    batches.close()
    assert not batches._thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)

"""Streaming helpers of batched inference: decode ahead on threads, group consecutive items into batches.

Torch-free (numpy only), so the ONNX deploy path shares them. Decoding (PIL) and resizing (OpenCV) release
the GIL, so one or two threads decoding the next images overlap with the model's forward pass on the main
thread; a bounded look-ahead keeps memory at ``depth`` decoded images whatever the folder size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(load: Callable[[T], R], items: Iterable[T], *, workers: int = 2, depth: int = 8) -> Iterator[R]:
    """``load(item)`` for every item, computed up to ``depth`` items ahead on ``workers`` threads, yielded in
    order. An exception of ``load`` is raised when its item's turn comes (earlier items are yielded first)."""
    if workers <= 0:  # plain sequential loop (debugging, or a caller that is itself threaded)
        yield from map(load, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semiseg-prefetch")
    pending: deque[Future[R]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(load, item))
            if len(pending) >= max(1, depth):
                break
        while pending:
            head = pending.popleft()
            nxt = next(source, _END)
            if nxt is not _END:
                pending.append(pool.submit(load, nxt))  # type: ignore[arg-type]
            yield head.result()
    finally:  # the consumer stopped early or failed: do not decode the rest
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


def group_batches(items: Iterable[T], *, key: Callable[[T], Hashable], size: Callable[[T], int],
                  max_items: int, max_size: int | None = None) -> Iterator[list[T]]:
    """Consecutive items with equal ``key`` in lists of at most ``max_items`` (and, when given, at most
    ``max_size`` summed ``size``; a single item larger than that still forms a batch of its own)."""
    batch: list[T] = []
    batch_key: Hashable = None
    total = 0
    for item in items:
        k, s = key(item), size(item)
        if batch and (k != batch_key or len(batch) >= max_items or (max_size is not None and total + s > max_size)):
            yield batch
            batch, total = [], 0
        batch.append(item)
        batch_key = k
        total += s
    if batch:
        yield batch

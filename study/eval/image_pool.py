"""Scoring images on all cores: threads, each taking the next image in turn into its own accumulator.

Threads suffice because the work per image is Pillow's PNG decoding and numpy passes, which release the GIL
(``python -m study.eval.bench_score`` measures the decode floor in threads and in processes side by side).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from study.errors import UserError

Acc = TypeVar("Acc")


def default_workers() -> int:
    """The cores this process may use (``os.sched_getaffinity``, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers, flag: str = "--workers") -> int:
    """``workers`` as a thread count: an integer >= 0, where 0 means :func:`default_workers`."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"workers ({flag}) must be an integer >= 0 (0: all cores), got {workers!r}")
    return workers or default_workers()


def accumulate(items: Sequence, score_one: Callable[[object, Acc], None], new: Callable[[], Acc],
               merge: Callable[[Acc, Acc], None], workers: int = 0) -> Acc:
    """``score_one(item, acc)`` for every item, in ``workers`` threads (0: all cores), each into its own
    accumulator from ``new()``, merged into the first with ``merge(total, part)``.

    On an error the other threads stop after their current item and the error of the first failing item
    in ``items`` order is raised (every earlier item was handed out before it, and finishes), as without
    threads.
    """
    workers = min(check_workers(workers), max(1, len(items)))
    if workers == 1:
        acc = new()
        for item in items:
            score_one(item, acc)
        return acc
    lock = threading.Lock()
    order = iter(range(len(items)))
    errors: dict[int, BaseException] = {}

    def worker() -> Acc:
        acc = new()
        while not errors:
            with lock:
                i = next(order, None)
            if i is None:
                break
            try:
                score_one(items[i], acc)
            except BaseException as e:  # raised below, in the caller's thread
                errors[i] = e
        return acc

    with ThreadPoolExecutor(workers) as pool:
        parts = [f.result() for f in [pool.submit(worker) for _ in range(workers)]]
    if errors:
        raise errors[min(errors)]
    total = parts[0]
    for part in parts[1:]:
        merge(total, part)
    return total

"""Chunks of work on a small pool of threads, each running torch single-threaded.

Torch releases the GIL inside its operations, so threads run chunks in parallel. Unlike torch's own intra-op
threads, which wait for each other at every operation and slow to a crawl when another process takes one of the
cores, a busy thread only takes fewer chunks.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

#: Most threads the chunks are spread over; the units are cut into at least twice as many chunks.
MAX_WORKERS = 4


def default_workers() -> int:
    """Threads for the chunks: the cores this process may run on, at most torch's thread setting and
    :data:`MAX_WORKERS` (so ``torch.set_num_threads(1)`` means one thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores, torch.get_num_threads()))


def map_chunks(fn, items, workers: int) -> list:
    """``[fn(item) for item in items]``, on ``workers`` threads with torch single-threaded inside when
    ``workers > 1``; torch's thread setting is restored afterwards. Results keep the order of ``items``."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(before)

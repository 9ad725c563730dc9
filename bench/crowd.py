"""Users who press Send at the same moment: `users` threads released together by one barrier, for the sections that
measure a crowd (bench/concurrency.py: engine vs llama-server; bench/steps.py: the Space through gradio_client).

    results, wall_s = at_once(lambda index, _: answer(PROMPTS[index]), users=4)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def at_once(work: Callable[[int, Any], Any], users: int,
            prepare: Callable[[int], Any] = lambda index: None) -> tuple[list, float]:
    """`work(index, prepare(index))` on `users` threads: each prepares (a client, a connection) first, then all are
    released together. (each work's result in index order, seconds from the release until the last one ended); the
    first exception a thread raised is raised here, after every thread has ended.

    >>> at_once(lambda index, offset: index + offset, 3, prepare=lambda index: 10)[0]
    [10, 11, 12]
    """
    barrier, results, failures = threading.Barrier(users + 1), [None] * users, []

    def user(index: int) -> None:
        try:
            prepared = prepare(index)
            barrier.wait()
            results[index] = work(index, prepared)
        except threading.BrokenBarrierError:
            pass  # another user failed to prepare; its failure is the one raised
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=user, args=(index,), daemon=True) for index in range(users)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results, time.perf_counter() - began

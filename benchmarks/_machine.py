"""What the benchmarks share about the machine they measure on: pinning to N cores, CPU time, best-of timing.

Imported by the scripts in this folder (``python benchmarks/bench_*.py`` puts the folder on ``sys.path``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def pin_cores(n: int) -> None:
    """Pin this process and the workers it starts to its first ``n`` allowed CPU cores (Linux
    ``sched_setaffinity``) and give OpenMP and torch ``n`` threads, so that a bigger machine measures the
    n-core figure. ``n = 0``: no pinning. Call it before the first torch computation."""
    if not n:
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (pool workers, torchrun)."""
    import resource

    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time (seconds) of ``repeats`` calls of ``fn()``: the least disturbed by other load."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)

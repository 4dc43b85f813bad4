"""How many CPU threads PyTorch uses, chosen from the cores that are actually free.

PyTorch's CPU kernels run on OpenMP (GNU libgomp on Linux). By default libgomp's worker
threads *spin* at every barrier before they sleep, and PyTorch starts one thread per core. On a
machine where another process holds a core, the thread sharing that core is descheduled while
its siblings spin waiting for it, so every parallel region waits for a time slice: on 2 cores
the main preset trained 3-50x slower beside one other busy process than on one thread (issue
14; bench/RESULTS.md, "Threads": 2 spinning threads beside ``while True: pass`` logged no
10-step window in 60 s). Two remedies, both here:

- ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep), set by ``textvae/__init__.py`` with
  ``os.environ.setdefault`` before torch is imported; libgomp reads it once, when torch loads
  it, so it has no effect when torch was imported before textvae (:data:`WAIT_POLICY_APPLIED`).
- :func:`set_threads`: as many threads as cores that are free when the work starts (the
  command line calls it for every heavy command; ``--threads N`` overrides, and so does
  ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# set by textvae/__init__.py: whether OMP_WAIT_POLICY could still reach libgomp at import time
WAIT_POLICY_APPLIED = True


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores(interval: float = 0.25) -> float:
    """Cores kept busy by *other* processes, averaged over ``interval`` seconds.

    Measured as the whole machine's CPU utilisation (psutil) while this process sleeps, so its
    own use does not count. A machine with more cores than the affinity mask may report more
    busy cores than are available to this process; :func:`free_cores` clips.
    """
    import psutil

    return psutil.cpu_percent(interval=interval) / 100.0 * (psutil.cpu_count() or 1)


def free_cores(interval: float = 0.25) -> int:
    """Available cores minus the busy ones (:func:`busy_cores`), rounded, at least 1."""
    n = available_cores()
    return max(1, min(n, round(n - busy_cores(interval))))


def set_threads(threads: int | None = None) -> tuple[int, str]:
    """Set PyTorch's intra-op thread count and say why.

    Args:
        threads: a count >= 1; None chooses ``OMP_NUM_THREADS`` when set, else
            :func:`free_cores` (one quarter-second measurement).

    Returns:
        (threads set, the reason in words).

    Raises:
        ValueError: ``threads`` < 1, or ``OMP_NUM_THREADS`` is not a positive integer.
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        reason = "as asked"
    elif os.environ.get("OMP_NUM_THREADS"):
        value = os.environ["OMP_NUM_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not a positive integer")
        threads, reason = int(value), "from OMP_NUM_THREADS"
    else:
        n = available_cores()
        threads = free_cores()
        reason = f"{threads} of {n} cores free"
    torch.set_num_threads(threads)
    if not WAIT_POLICY_APPLIED and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning(
            "torch was imported before textvae, so OpenMP threads spin while they wait "
            "(slow beside other busy processes): set OMP_WAIT_POLICY=PASSIVE in the "
            "environment, or import textvae first"
        )
    return threads, reason

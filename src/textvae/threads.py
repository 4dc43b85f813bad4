"""How many CPU threads PyTorch uses, chosen from the cores that are actually free.

PyTorch's CPU kernels run on OpenMP (GNU libgomp on Linux). By default libgomp's worker
threads *spin* at every barrier before they sleep, and PyTorch starts one thread per core. On a
machine where another process holds a core, the thread sharing that core is descheduled while
its siblings spin waiting for it, so every parallel region waits for a time slice: on 2 cores
the main preset trained 3-50x slower beside one other busy process than on one thread (issue
14; bench/RESULTS.md, "Threads": 2 spinning threads beside ``while True: pass`` logged no
10-step window in 60 s). Two remedies, both here:

- a bounded spin (:func:`bound_openmp_spinning`, called by ``textvae/__init__.py`` before torch is
  imported): ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` iterations (libgomp's default is 300,000,
  about 3 ms, before a waiting thread sleeps). ``OMP_WAIT_POLICY=PASSIVE`` (no spin at all), the
  first fix, cost 18% of the training speed on an idle machine: every parallel region then
  wakes sleeping threads through the kernel. libgomp reads both variables once, when torch
  loads it, so they have no effect when torch was imported before textvae
  (:data:`WAIT_POLICY_APPLIED`); a value the user set for either is kept.
- :func:`set_threads`: as many threads as cores that are free when the work starts (the
  command line calls it for every heavy command; ``--threads N`` overrides, and so does
  ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# spins of libgomp's busy-wait before a waiting thread sleeps (GOMP_SPINCOUNT); measured in
# bench/RESULTS.md, "Threads": the bounded spin
SPIN_COUNT = "1000"

# set by textvae/__init__.py: whether the bounded spin could still reach libgomp at import time
WAIT_POLICY_APPLIED = True


def bound_openmp_spinning(torch_loaded: bool) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user chose a wait already.

    Args:
        torch_loaded: whether torch (hence libgomp) is already imported: the variable is then
            set but no longer read.

    Returns:
        Whether the threads wait in a bounded way: the user set ``OMP_WAIT_POLICY`` or
        ``GOMP_SPINCOUNT`` themselves, or this call set it before libgomp was loaded.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return True
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return not torch_loaded


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
    if not WAIT_POLICY_APPLIED:
        log.warning(
            "torch was imported before textvae, so OpenMP threads spin while they wait "
            "(slow beside other busy processes): set GOMP_SPINCOUNT=%s in the "
            "environment, or import textvae first",
            SPIN_COUNT,
        )
    return threads, reason

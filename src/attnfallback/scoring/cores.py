"""A CPU core of its own for the thread that launches the GPU work.

A BERT-base forward on an H100 is thousands of small kernels: it runs as fast as its thread gets
scheduled. The fast tokenizer's Rust thread pool, working ahead in the worker thread, takes every
core it can see, and the forward thread then waits for a core between launches (bench/NOTES.md,
session 2: 29-44% of the forward's time). `CoreIsolation` keeps every other thread of the
process off one core for as long as scoring runs, so the forward thread always finds a free core
(strategy "reserve", the default; "pin" also pins the forward thread there); then it puts every
mask back. Linux only (thread masks through /proc/self/task); elsewhere, or with fewer than
`MIN_CORES` usable cores, it does nothing and says why.
"""

from __future__ import annotations

import os
import threading

CORE_ISOLATION_MODES = ("auto", "off", "reserve", "pin")
AUTO_STRATEGY = "reserve"
MIN_CORES = 4  # with fewer, one core less for the tokenizer costs more than it gives the forward
TASKS_DIR = "/proc/self/task"


def check_core_isolation_mode(mode: str) -> str:
    from attnfallback.errors import UsageError

    if mode not in CORE_ISOLATION_MODES:
        raise UsageError(f"--cpu-isolation must be one of {', '.join(CORE_ISOLATION_MODES)}, found {mode!r}")
    return mode


def _thread_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir(TASKS_DIR)]
    except OSError:
        return []


class CoreIsolation:
    """Keep the process's other threads off one core, so the calling thread always finds it free.

    strategy "reserve": the calling thread keeps its mask (the scheduler wakes it on the free core);
    "pin": the calling thread is also pinned to that core. `start()` moves the threads there now;
    `sweep()` moves threads started since (call it now and then); `stop()` restores every mask it
    changed. `available` and `min_cores` are injectable for tests.
    """

    def __init__(self, strategy: str = AUTO_STRATEGY, available: set[int] | None = None, min_cores: int = MIN_CORES):
        if strategy not in ("reserve", "pin"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.strategy = strategy
        self._available = available
        self.min_cores = min_cores
        self.core: int | None = None
        self.note = "not started"
        self._own: int | None = None
        self._others: set[int] = set()
        self._saved: dict[int, set[int]] = {}  # thread id -> its mask before we changed it

    @property
    def active(self) -> bool:
        return self.core is not None

    def start(self) -> bool:
        """Pin the calling thread; False (and `note` says why) when it cannot or should not."""
        if not hasattr(os, "sched_setaffinity") or not os.path.isdir(TASKS_DIR):
            self.note = "off (no per-thread CPU affinity on this system)"
            return False
        available = set(self._available) if self._available is not None else os.sched_getaffinity(0)
        if len(available) < self.min_cores:
            self.note = f"off ({len(available)} usable cores, fewer than {self.min_cores})"
            return False
        self._own = threading.get_native_id()
        core = max(available)  # core 0 takes most interrupts on many hosts
        self._others = available - {core}
        if self.strategy == "pin":
            try:
                self._saved[self._own] = os.sched_getaffinity(self._own)
                os.sched_setaffinity(self._own, {core})
            except OSError as e:
                self._saved.clear()
                self.note = f"off (could not pin the forward thread: {e})"
                return False
        self.core = core
        self.sweep()
        where = f"pinned to core {core}" if self.strategy == "pin" else f"core {core} kept free for it"
        self.note = f"on (forward thread: {where}; other threads on {len(self._others)} cores)"
        return True

    def sweep(self) -> int:
        """Move threads started since the last sweep off the pinned core; returns how many moved."""
        if self.core is None:
            return 0
        moved = 0
        for tid in _thread_ids():
            if tid == self._own or tid in self._saved:
                continue
            try:
                mask = os.sched_getaffinity(tid)
                # a thread started by the pinned one inherited its single core: it gets the rest
                self._saved[tid] = mask if mask - {self.core} else set(self._others | {self.core})
                wanted = (mask - {self.core}) or set(self._others)
                if wanted != mask:
                    os.sched_setaffinity(tid, wanted)
                    moved += 1
            except OSError:  # the thread ended meanwhile, or is not ours to change
                self._saved.pop(tid, None)
        return moved

    def stop(self) -> None:
        """Put back every mask changed (threads that ended meanwhile are skipped)."""
        for tid, mask in self._saved.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass
        self._saved.clear()
        self.core = None

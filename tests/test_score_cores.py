"""CoreIsolation: the forward thread's own core, on this machine's real thread masks."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from attnfallback.errors import UsageError
from attnfallback.scoring.cores import CoreIsolation, check_core_isolation_mode

linux_masks = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2,
    reason="needs Linux thread affinity and two usable cores",
)


class Sleeper:
    """A thread that waits until released, so its mask can be read while it lives."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.started.wait(5)

    def _run(self):
        self.started.set()
        self.release.wait(10)

    @property
    def tid(self) -> int:
        return self.thread.native_id

    def end(self):
        self.release.set()
        self.thread.join(5)


def _mask(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


@linux_masks
@pytest.mark.parametrize("strategy", ["reserve", "pin"])
def test_keeps_the_other_threads_off_one_core_and_restores_every_mask(strategy):
    me = threading.get_native_id()
    before_me = _mask(me)
    other = Sleeper()
    before_other = _mask(other.tid)
    cores = CoreIsolation(strategy, min_cores=2)
    try:
        assert cores.start(), cores.note
        core = max(before_me)
        assert _mask(me) == ({core} if strategy == "pin" else before_me)  # reserve: this thread may run anywhere
        assert core not in _mask(other.tid) and _mask(other.tid)
        assert (f"pinned to core {core}" if strategy == "pin" else f"core {core} kept free for it") in cores.note
    finally:
        cores.stop()
    assert _mask(me) == before_me
    assert _mask(other.tid) == before_other
    other.end()


@linux_masks
def test_a_thread_started_by_the_pinned_thread_is_moved_off_its_core_by_sweep_and_gets_the_full_mask_back():
    cores = CoreIsolation("pin", min_cores=2)
    full = _mask(threading.get_native_id())
    try:
        assert cores.start()
        late = Sleeper()  # inherits the pinned thread's single core
        assert _mask(late.tid) == {cores.core}
        assert cores.sweep() >= 1
        assert cores.core not in _mask(late.tid)
        assert cores.sweep() == 0  # nothing new since
    finally:
        cores.stop()
    assert _mask(late.tid) == full  # not left on the forward thread's core
    late.end()


@linux_masks
def test_reserve_moves_threads_started_by_the_calling_thread_too():
    cores = CoreIsolation("reserve", min_cores=2)
    try:
        assert cores.start()
        late = Sleeper()  # inherits the calling thread's full mask
        assert cores.core in _mask(late.tid)
        assert cores.sweep() == 1 and cores.core not in _mask(late.tid)
    finally:
        cores.stop()
    late.end()


def test_too_few_cores_does_nothing_and_says_why():
    cores = CoreIsolation(available={0, 1}, min_cores=4)
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    assert not cores.start()
    assert not cores.active
    assert cores.sweep() == 0
    cores.stop()
    assert "fewer than 4" in cores.note or "no per-thread CPU affinity" in cores.note
    if before is not None:
        assert os.sched_getaffinity(0) == before


def test_mode_is_checked():
    assert check_core_isolation_mode("off") == "off"
    with pytest.raises(UsageError, match="--cpu-isolation must be one of auto, off, reserve, pin, found 'sometimes'"):
        check_core_isolation_mode("sometimes")

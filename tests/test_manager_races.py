"""Races a failure opens in SwapManager, and the contract gaps of red-team round 2
(../shared/redteam3/, repro_4, repro_2, repro_5), host backend.

Jobs are held in flight with kvswitch.testing.HeldEngine (no timers): a held job runs
only when a test releases it or the manager waits for it, so "the swap-out failed and
ended after swap_in looked at it, before the swap-in was queued" is an explicit step.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_manager_failures import BS, make, write

from kvswitch import BlockGroupAllocator, SwapError
from kvswitch.testing import HeldEngine

# ---------------------------------------------------------- repro_4: swap-in after a failure


def _held(m) -> HeldEngine:
    held = m.engine = HeldEngine(m.engine)
    return held


def _swap_out_that_fails(m, kv, seq="a", value=99):
    """seq (2 blocks of `value`) swapped out by a held job that will fail."""
    m.allocate(seq, 2)
    write(m, kv, seq, 0, 8, value)
    held = _held(m)
    held.hold()
    m.engine._engine._fail_next_jobs(1, "injected copy failure")
    plan = m.swap_out(seq, 8)
    m.engine._engine._fail_next_jobs(0, "")
    assert plan.copied_blocks == 2 and len(held.held) == 1
    return held, plan


def test_a_swap_out_that_fails_and_ends_before_the_swap_in_is_queued_fails_it():
    """repro_4: swap_in looked at the swap-out's handle (not done), then the swap-out
    failed and ended before the swap-in was submitted, so the engine did not order the
    swap-in after it: the swap-in copied never-written host blocks and the sequence became
    running with garbage, the failure never reported. Now the sequence fails (reported
    once, by take_failed) and its CPU copy does not claim the unwritten blocks."""
    m, kv = make()
    held, plan = _swap_out_that_fails(m, kv)
    out_job = held.held[0]
    submit = held.swap_in

    def swap_in_after_the_swap_out_ended(pairs, **streams):
        held.release(out_job.id)
        with pytest.raises(SwapError):
            out_job.wait()
        return submit(pairs, **streams)

    held.swap_in = swap_in_after_the_swap_out_ended
    table = m.swap_in("a")  # returns: the failure is the swap-out's, reported later
    assert len(table) == 2
    assert m.state("a") == "failed"
    m.synchronize()
    assert m.poll() == [] and m.state("a") == "failed"
    failed = m.take_failed()
    assert set(failed) == {"a"} and failed["a"].direction == "out"
    assert "injected copy failure" in str(failed["a"])
    assert m.take_failed() == {}
    if "a" in m.tracker:  # the copy no longer claims the blocks the swap-out never wrote
        assert not m.tracker.valid_blocks("a").any()
        assert not m.tracker.is_swapped_out("a")
    assert m.stats().swap_failures == 1 and m.stats().swap_ins == 0
    with pytest.raises(ValueError, match="failed"):
        m.allocate("a", 1)
    m.free("a")
    assert m.gpu.num_free_blocks == m.gpu.num_blocks
    assert m.tracker.host.num_free_blocks == m.tracker.host.num_blocks
    m.close()


def test_a_swap_in_queued_behind_a_failing_swap_out_invalidates_what_it_never_wrote():
    """The swap-in queued while its swap-out is still in flight fails with it (the engine
    orders it after); the CPU copy must then not claim the blocks the swap-out was to
    write (main kept them valid and the copy protected as the only copy)."""
    m, kv = make()
    m.allocate("a", 2)
    write(m, kv, "a", 0, 8, 5)
    m.swap_out("a", 8)  # a backup: both blocks valid
    m.swap_in("a")
    m.wait_swap_in("a")
    write(m, kv, "a", 4, 8, 6)  # a new version of the second block's tokens
    m.truncate("a", 4)
    held = _held(m)
    held.hold()
    m.engine._engine._fail_next_jobs(1, "injected copy failure")
    plan = m.swap_out("a", 8)  # copies the second block only
    m.engine._engine._fail_next_jobs(0, "")
    assert plan.copied_blocks == 1 and plan.reused_blocks == 1
    m.swap_in("a")  # queued behind the held, failing swap-out
    held.resume()
    m.synchronize()
    assert m.poll() == []
    failed = m.take_failed()
    assert set(failed) == {"a"} and failed["a"].direction == "in"
    assert failed["a"].root_job_id != failed["a"].job_id  # the swap-out was the root
    assert m.tracker.valid_blocks("a").tolist() == [True, False]
    assert not m.tracker.is_swapped_out("a")  # a reclaimable backup, not the only copy
    m.free("a")
    m.close()


def test_a_swap_out_that_failed_and_ended_before_swap_in_is_raised_by_it():
    """The older path: the failure already ended when swap_in looks: it raises it."""
    m, kv = make()
    held, _ = _swap_out_that_fails(m, kv)
    held.resume()
    held.synchronize()
    with pytest.raises(SwapError, match="injected") as info:
        m.swap_in("a")
    assert info.value.direction == "out" and m.take_failed() == {}
    m.free("a")
    m.close()


# ---------------------------------------------------------- repro_2: close() is serialised


class _TracingLock:
    """An RLock that says when a thread has to wait for it (deterministic: no timing)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.contended = threading.Event()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def test_close_waits_for_a_call_in_another_thread_which_then_completes():
    """repro_2: close() took no lock, so a swap_out in another thread could pass its
    closed check, reclaim another sequence's backup, then raise EngineClosedError at
    the submit. Now close() waits for the manager's lock: the swap_out completes."""
    m, kv = make(gpu_blocks=40, host_blocks=12, workers=1)
    m.allocate(0, 8)
    m.swap_out(0, 8 * BS)
    m.swap_in(0)
    m.wait_swap_in(0)  # seq 0's backup: 8 host blocks
    m.allocate(1, 8)
    m._lock = lock = _TracingLock()
    engine_closed = threading.Event()
    close_engine = m.engine.close

    def traced_close():
        engine_closed.set()
        close_engine()

    m.engine.close = traced_close
    plan_swap_out = m.tracker.plan_swap_out
    closer = threading.Thread(target=m.close)

    def plan_while_another_thread_closes(*args, **kwargs):
        closer.start()
        while not (lock.contended.is_set() or engine_closed.is_set()):
            threading.Event().wait(0.001)  # until close() blocks on the lock, or ran
        return plan_swap_out(*args, **kwargs)

    m.tracker.plan_swap_out = plan_while_another_thread_closes
    plan = m.swap_out(1, 8 * BS)  # reclaims 4 of seq 0's blocks, and is committed
    closer.join()
    assert lock.contended.is_set() and plan.copied_blocks == 8
    assert m.state(1) == "swapped_out" and m.engine.closed


# ---------------------------------------------------------- repro_5: validation


@pytest.mark.parametrize("kw, match", [
    ({"compaction": "no"}, "compaction must be a bool"),
    ({"compaction": 1}, "compaction must be a bool"),
    ({"reuse": "yes"}, "reuse must be a bool"),
    ({"async_swap_out": None}, "async_swap_out must be a bool"),
    ({"coalesce": 0}, "coalesce must be a bool"),
    ({"compaction": True, "compaction_max_moved": "1.0"}, "compaction_max_moved must be a real"),
    ({"compaction": True, "compaction_max_moved": True}, "compaction_max_moved must be a real"),
])
def test_flags_and_the_move_cap_refuse_other_types(kw, match):
    """repro_5: compaction="no" turned compaction on; "1.0" and True were taken as caps."""
    with pytest.raises(TypeError, match=match):
        make(**kw)


def test_flags_and_the_move_cap_take_numpy_scalars():
    m, _ = make(compaction=np.bool_(True), compaction_max_moved=np.float32(2.5), reuse=True)
    assert m.compaction is True and m.compaction_max_moved == 2.5
    m.close()


@pytest.mark.parametrize("pinned", ["xz", b"xz"])
def test_compact_refuses_a_string_as_pinned(pinned):
    """repro_5: compact(pinned="xz") pinned sequences "x" and "z"."""
    a = BlockGroupAllocator(8, initial_group_blocks=2, growth_quantum_blocks=1)
    for s in "wxyz":
        a.allocate(s, 2)
    a.free("w")
    a.free("y")
    with pytest.raises(TypeError, match="pinned"):
        a.compact(4, pinned=pinned)
    assert a.compact(4, pinned=iter(["x"])).moved_sequences == ["z"]  # one pass over it


# ---------------------------------------------------------- HeldEngine itself


def test_held_jobs_run_when_waited_for_with_what_they_follow_only():
    m, _ = make(workers=2)
    held = HeldEngine(m.engine)
    held.hold()
    out_1 = held.swap_out([(0, 0, 1)])
    out_2 = held.swap_out([(1, 1, 1)])
    in_2 = held.swap_in([(1, 2, 1)])  # reads what out_2 writes: ordered after it only
    assert held.held == [out_1, out_2, in_2]
    in_2.wait()
    assert out_2.done() and not out_1.done() and held.held == [out_1]
    held.synchronize()
    assert out_1.done() and held.held == []
    held.resume()
    assert held.swap_out([(2, 2, 1)]).wait() and held.held == []
    with pytest.raises(ValueError, match="inline"):
        HeldEngine(make(workers=0)[0].engine)
    m.close()

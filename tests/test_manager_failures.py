"""SwapManager's failure contract, rollback and threads, with real bytes (host backend).

Regression tests of red-team findings 5, 6, 8 and 9 (../shared/redteam/): a failed copy is
never committed, one failed sequence does not wedge the others, a call that raises changes
nothing, and a sequence rolled back never gets its old KV back. Failures come from the
engine's ``_fail_next_jobs`` hook (armed per submission, so which job fails is
deterministic) and jobs are held in the queue with ``_set_paused`` where a test needs
"still in flight".
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvswitch import (
    AsyncSwapEngine,
    BlockGroupAllocator,
    EngineClosedError,
    HostKVPool,
    KVLayout,
    OutOfBlocksError,
    SwapError,
    SwapManager,
)

BS = 4  # tokens per block
DIM = 8  # bytes per token and region


def make(gpu_blocks=32, host_blocks=64, workers=2, **kw):
    """A manager over 2 regions of [blocks, BS tokens, DIM] uint8."""
    kv = [np.zeros((gpu_blocks, BS, DIM), np.uint8) for _ in range(2)]
    layout = KVLayout.from_tensors(kv)
    engine = AsyncSwapEngine(layout, HostKVPool(layout, host_blocks, pin=False),
                             backend="host", num_workers=workers)
    m = SwapManager(BlockGroupAllocator(gpu_blocks, initial_group_blocks=4), engine,
                    BlockGroupAllocator(host_blocks, initial_group_blocks=4), block_size=BS,
                    **kw)
    return m, kv


def write(m, kv, seq, lo, hi, value):
    """Tokens [lo, hi) of seq get `value` (region r holds value + r)."""
    table = m.block_table(seq)
    for tok in range(lo, hi):
        for r, a in enumerate(kv):
            a[table[tok // BS], tok % BS] = (value + r) % 256


def read(m, kv, seq, n):
    """Region 0's first byte of tokens [0, n)."""
    table = m.block_table(seq)
    return np.array([kv[0][table[t // BS], t % BS, 0] for t in range(n)])


def grow_to(m, seq, n):
    have = m.gpu.num_table_blocks(seq) if seq in m.gpu else 0
    if -(-n // BS) > have:
        m.allocate(seq, -(-n // BS) - have)


def snapshot(m):
    """Everything a raising call must leave as it was."""
    t = m.tracker
    return (m.gpu.num_free_blocks, t.host.num_free_blocks, m.stats(), t.stats(),
            {s: t.valid_blocks(s).tolist() for s in t._copies},
            {s: m.state(s) for s in set(m.gpu.sequences()) | set(m.swapped_out)})


# ------------------------------------------------------------------ finding 5: swap-out


def test_failed_async_swap_out_fails_the_sequence_and_is_reported_once():
    """Finding 5: the failed swap-out was committed; the later swap-in 'succeeded' and
    restored stale host bytes without an error."""
    m, kv = make()
    m.allocate("r", 2)
    write(m, kv, "r", 0, 8, 42)
    m.allocate("ok", 2)
    write(m, kv, "ok", 0, 8, 7)
    m.engine._engine._fail_next_jobs(1, "simulated cudaErrorIllegalAddress")
    plan = m.swap_out("r", 8)
    m.swap_out("ok", 8)
    m.synchronize()
    assert plan.copied_blocks == 2
    assert m.state("r") == "failed" and m.failed == ["r"]
    assert m.state("ok") == "swapped_out"
    with pytest.raises(SwapError, match="simulated cudaErrorIllegalAddress") as info:
        m.swap_in("r")  # not reported yet: this raise reports it
    assert info.value.seq_id == "r" and info.value.direction == "out"
    assert m.take_failed() == {}  # reported once, by the raise
    with pytest.raises(ValueError, match="failed"):
        m.swap_in("r")
    m.swap_in("ok")
    m.wait_swap_in("ok")
    np.testing.assert_array_equal(read(m, kv, "ok", 8), [7] * 8)
    m.free("r")
    with pytest.raises(KeyError):
        m.state("r")
    assert m.stats().swap_failures == 1
    m.free("ok")
    assert m.tracker.host.num_free_blocks == m.tracker.host.num_blocks
    assert m.gpu.num_free_blocks == m.gpu.num_blocks
    m.close()


def test_take_failed_reports_an_async_swap_out_failure_with_its_root_job():
    m, kv = make()
    m.allocate("r", 3)
    m.engine._engine._fail_next_jobs(1, "boom")
    m.swap_out("r", 12)
    m.synchronize()
    failed = m.take_failed()
    assert list(failed) == ["r"] and "boom" in str(failed["r"])
    assert failed["r"].root_job_id == failed["r"].job_id
    assert m.take_failed() == {}
    assert not m.tracker.valid_blocks("r").any()  # nothing it was to write counts as valid
    m.close()


def test_swap_in_queued_behind_a_failing_swap_out_fails_with_it():
    """The swap-in is ordered after the swap-out (it reads the host blocks the swap-out
    writes): it must not copy, and its error names the swap-out's job."""
    m, kv = make()
    m.allocate("r", 2)
    write(m, kv, "r", 0, 8, 42)
    m.allocate("other", 4)
    write(m, kv, "other", 0, 16, 9)
    m.engine._engine._set_paused(True)
    m.engine._engine._fail_next_jobs(1, "boom")
    m.swap_out("r", 8)
    table = m.swap_in("r")
    for a in kv:
        a[table] = 0  # the swap-in must not overwrite this
    m.engine._engine._set_paused(False)
    m.synchronize()
    assert m.poll() == [] and m.decide(1, 0.01) == []
    failed = m.take_failed()
    assert list(failed) == ["r"] and failed["r"].direction == "in"
    assert failed["r"].root_job_id != failed["r"].job_id  # the swap-out failed first
    assert "boom" in str(failed["r"])
    assert all((a[table] == 0).all() for a in kv)
    np.testing.assert_array_equal(read(m, kv, "other", 16), [9] * 16)
    m.free("r")
    m.close()


def test_blocking_swap_out_failure_raises_and_keeps_the_sequence_running():
    m, kv = make(async_swap_out=False)
    m.allocate("r", 3)
    write(m, kv, "r", 0, 10, 42)
    table = m.block_table("r")
    m.swap_out("r", 10)  # a first copy: the next swap-out reuses 2 full blocks
    m.swap_in("r")
    m.wait_swap_in("r")
    write(m, kv, "r", 10, 12, 43)  # the partial last block gains 2 tokens: stale
    before = snapshot(m)
    m.engine._engine._fail_next_jobs(1, "boom")
    with pytest.raises(SwapError, match="boom"):
        m.swap_out("r", 12)
    assert m.state("r") == "running" and m.failed == []
    assert m.take_failed() == {}  # reported by the raise
    gpu_free, host_free, stats, tstats, valid, _ = snapshot(m)
    assert (gpu_free, host_free) == before[:2]
    assert stats.swap_outs == before[2].swap_outs and stats.swap_failures == 1
    assert valid["r"] == [True, True, False]  # the block the failed copy targeted
    np.testing.assert_array_equal(m.block_table("r"), table)  # still on its GPU blocks
    m.swap_out("r", 12)  # a retry copies the invalidated block again
    m.swap_in("r")
    m.wait_swap_in("r")
    np.testing.assert_array_equal(read(m, kv, "r", 12), [42] * 10 + [43] * 2)
    m.close()


# ------------------------------------------------------------------ finding 6: swap-in


def test_one_failed_swap_in_does_not_wedge_the_others():
    """Finding 6: every later poll()/decide() raised, finished sequences were never
    reported, and free() of the failed one raised."""
    m, kv = make(gpu_blocks=16, host_blocks=16)
    for i, s in enumerate("abc"):
        m.allocate(s, 2)
        write(m, kv, s, 0, 8, 10 * i)
        m.swap_out(s, 8)
    m.synchronize()
    m.engine._engine._fail_next_jobs(1, "simulated copy failure")
    m.swap_in("a")
    m.swap_in("b")
    m.synchronize()
    assert m.poll() == ["b"]
    assert m.poll() == [] and m.decide(3, 0.01) == []
    assert m.state("a") == "failed" and m.state("b") == "running"
    m.swap_in("c")
    m.synchronize()
    assert m.poll() == ["c"] and m.state("c") == "running"
    np.testing.assert_array_equal(read(m, kv, "c", 8), [20] * 8)
    assert list(m.take_failed()) == ["a"]
    gpu_free = m.gpu.num_free_blocks
    m.free("a")  # its GPU blocks (written by nothing) go back
    assert m.gpu.num_free_blocks == gpu_free + 2
    m.close()


def swap_in_that_fails(m, seq):
    """Swap `seq` out, then in with the engine armed to fail that job."""
    m.allocate(seq, 2)
    m.swap_out(seq, 8)
    m.engine._engine._fail_next_jobs(1, "boom")
    m.swap_in(seq)


def test_wait_swap_in_raises_for_its_failed_sequence_only_once():
    m, kv = make()
    swap_in_that_fails(m, "a")
    with pytest.raises(SwapError, match="boom"):
        m.wait_swap_in("a")
    assert m.state("a") == "failed" and m.take_failed() == {}
    with pytest.raises(ValueError, match="failed"):
        m.wait_swap_in("a")
    with pytest.raises(ValueError, match="failed"):
        m.allocate("a", 1)
    with pytest.raises(ValueError, match="failed"):
        m.truncate("a", 1)
    m.free("a")
    m.close()


def test_failed_sequence_raises_its_error_on_first_use():
    m, kv = make()
    swap_in_that_fails(m, "a")
    m.synchronize()
    assert m.poll() == []
    with pytest.raises(SwapError, match="boom"):
        m.allocate("a", 1)  # unreported: raised once, then a ValueError
    assert m.take_failed() == {}
    m.close()


# ------------------------------------------------------------------ finding 8: atomicity


def test_swap_out_that_raises_reclaims_no_backup():
    """Finding 8: a swap_out that raised (after= on the host backend) had already
    reclaimed another sequence's CPU backup."""
    m, kv = make(gpu_blocks=16, host_blocks=8)
    m.allocate("A", 8)
    m.swap_out("A", 32)
    m.swap_in("A")
    m.wait_swap_in("A")  # A's 8-block backup fills the host pool
    m.allocate("B", 4)
    before = snapshot(m)
    with pytest.raises(ValueError, match="host backend"):
        m.swap_out("B", 16, after=12345)
    assert snapshot(m) == before
    with pytest.raises(TypeError, match="after"):
        m.swap_out("B", 16, after="not a stream")
    assert snapshot(m) == before
    m.swap_out("A", 32)
    with pytest.raises(ValueError, match="host backend"):
        m.swap_in("A", before=0)
    m.close()


def test_out_of_blocks_and_a_closed_engine_change_nothing():
    m, kv = make(gpu_blocks=16, host_blocks=4)
    m.allocate("A", 6)
    before = snapshot(m)
    with pytest.raises(OutOfBlocksError):
        m.swap_out("A", 24)
    assert snapshot(m) == before
    m.allocate("B", 2)
    m.swap_out("B", 8)
    m.allocate("C", 8)  # the GPU pool is now short for B's swap-in (16 - 6 - 8 = 2) ...
    m.allocate("D", 2)  # ... and now empty
    before = snapshot(m)
    with pytest.raises(OutOfBlocksError):
        m.swap_in("B")
    assert snapshot(m) == before
    m.engine.close()
    with pytest.raises(EngineClosedError):
        m.swap_out("A", 4)
    assert snapshot(m) == before


# ------------------------------------------------------------------ finding 9: rollback


def test_swap_out_shorter_than_the_cpu_copy_invalidates_the_tail():
    """Finding 9 (regenerate): swapped out shorter than its CPU copy, the sequence kept the
    old tail marked valid; after regrowth the old KV was restored."""
    m, kv = make()
    m.allocate("A", 8)
    write(m, kv, "A", 0, 32, 1)
    m.swap_out("A", 32)
    m.swap_in("A")
    m.wait_swap_in("A")
    m.swap_out("A", 6)  # keep 6 tokens, mid-block
    m.swap_in("A")
    m.wait_swap_in("A")
    grow_to(m, "A", 32)
    write(m, kv, "A", 6, 32, 2)
    plan = m.swap_out("A", 32)
    assert plan.copied_blocks == 7 and plan.reused_blocks == 1  # block 0 predates token 6
    m.swap_in("A")
    m.wait_swap_in("A")
    np.testing.assert_array_equal(read(m, kv, "A", 32), [1] * 6 + [2] * 26)
    m.close()


def test_truncate_of_a_running_sequence_invalidates_its_backup():
    """Rejected speculative tokens / regenerate while running: without truncate() the
    tracker could not know that KV it saw swapped out has changed."""
    m, kv = make()
    m.allocate("A", 8)
    write(m, kv, "A", 0, 30, 1)  # 30 tokens, drafts included
    m.swap_out("A", 30)
    m.swap_in("A")
    m.wait_swap_in("A")
    m.truncate("A", 22)  # tokens 22.. were rejected
    write(m, kv, "A", 22, 31, 5)  # the accepted continuation
    plan = m.swap_out("A", 31)
    assert plan.reused_blocks == 5  # tokens [0, 20) are untouched
    m.swap_in("A")
    m.wait_swap_in("A")
    np.testing.assert_array_equal(read(m, kv, "A", 31), [1] * 22 + [5] * 9)
    m.close()


def test_truncate_of_a_swapped_out_sequence_shortens_its_swap_in():
    m, kv = make()
    m.allocate("A", 5)
    write(m, kv, "A", 0, 20, 3)
    m.swap_out("A", 20)
    host_free = m.tracker.host.num_free_blocks
    m.truncate("A", 7)
    assert m.num_tokens_swapped("A") == 7
    assert m.tracker.host.num_free_blocks == host_free + 3  # blocks 2, 3, 4 released
    table = m.swap_in("A")
    assert len(table) == 2
    m.wait_swap_in("A")
    np.testing.assert_array_equal(read(m, kv, "A", 7), [3] * 7)
    m.swap_out("A", 7)
    with pytest.raises(ValueError, match="0 tokens"):
        m.truncate("A", 0)
    m.close()


def test_pruned_beams_free_their_blocks_and_survivors_keep_their_kv():
    """Beam search: each beam is a sequence; pruning frees beams while the others swap."""
    m, kv = make(gpu_blocks=24, host_blocks=12)
    beams = ["b0", "b1", "b2"]
    for i, b in enumerate(beams):
        m.allocate(b, 3)
        write(m, kv, b, 0, 12, 50 + i)
        m.swap_out(b, 12)
    for b in beams:
        m.swap_in(b)
    m.synchronize()
    assert sorted(m.poll()) == beams
    m.free("b1")  # pruned
    m.truncate("b2", 9)  # b2 backs up to the fork point and diverges
    write(m, kv, "b2", 9, 12, 70)
    grow_to(m, "b0", 20)
    write(m, kv, "b0", 12, 20, 60)
    m.swap_out("b0", 20)  # needs 2 new host blocks: b1's were released
    m.swap_out("b2", 12)
    for b in ("b0", "b2"):
        m.swap_in(b)
        m.wait_swap_in(b)
    np.testing.assert_array_equal(read(m, kv, "b0", 20), [50] * 12 + [60] * 8)
    np.testing.assert_array_equal(read(m, kv, "b2", 12), [52] * 9 + [70] * 3)
    m.close()


ops = st.lists(st.one_of(
    st.tuples(st.just("grow"), st.integers(1, 9)),
    st.tuples(st.just("truncate"), st.integers(0, 40)),
    st.tuples(st.just("cycle"), st.integers(0, 8)),  # swap out (maybe shorter) and back in
), min_size=1, max_size=25)


@settings(max_examples=80, deadline=None)
@given(ops=ops)
def test_any_history_of_growth_rollback_and_swaps_restores_the_latest_kv(ops):
    """Property: whatever the engine appends, rolls back and swaps, every swap-in restores
    the tokens as last written (each write stamps a new version)."""
    m, kv = make(workers=0)
    expect: list[int] = [1]
    version = 1
    m.allocate("A", 1)
    write(m, kv, "A", 0, 1, 1)
    for op, k in ops:
        if op == "grow":
            version += 1
            n = len(expect)
            grow_to(m, "A", n + k)
            write(m, kv, "A", n, n + k, version)
            expect += [version] * k
        elif op == "truncate" and 0 < k < len(expect):
            m.truncate("A", k)
            del expect[k:]
        elif op == "cycle":
            keep = max(1, len(expect) - k)  # k > 0: swapped out shorter (a rollback)
            del expect[keep:]
            m.swap_out("A", keep)
            m.swap_in("A")
            m.wait_swap_in("A")
            np.testing.assert_array_equal(read(m, kv, "A", keep), expect)
    m.close()


# ------------------------------------------------------------------ threads


def test_concurrent_callers_keep_every_sequence_intact():
    """The manager is thread-safe: 4 threads each drive their own sequences (new ones all
    the time) through allocate / write / swap-out / swap-in, switching threads every
    microsecond. Pools are large enough that no call runs out of blocks, so the outcome
    does not depend on the interleaving. (On 0.1.0 two new sequences could share one block
    table: red-team finding 3, seen through the manager.)"""
    m, kv = make(gpu_blocks=512, host_blocks=1024, workers=2)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def drive(t):
        try:
            barrier.wait()
            for i in range(40):
                s = (t, i // 2)  # a new sequence every other step
                if i % 2 == 0:
                    m.allocate(s, 2)
                    write(m, kv, s, 0, 8, t * 50 + i)
                    m.swap_out(s, 8)
                else:
                    m.swap_in(s)
                    m.wait_swap_in(s)
                    assert (read(m, kv, s, 8) == t * 50 + i - 1).all(), s
                    m.free(s)
        except BaseException as e:  # reported below
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=drive, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    m.gpu.check_invariants()
    m.tracker.host.check_invariants()
    assert len(m.gpu) == 0 and m.gpu.num_free_blocks == m.gpu.num_blocks
    m.close()

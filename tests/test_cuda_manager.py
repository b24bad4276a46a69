"""SwapManager with compaction on the cuda backend, against the asynchronous fake driver
(tests/fake_cuda/fake_cuda.cpp): a failed migration is never lost (red-team round 2,
repro_1, ../shared/redteam3/).

On CUDA, ``swap_in(after=, before=)`` returns with its migration still pending (the
consumer stream waits for it instead of the caller). When that migration fails and ends
before the adapter's next ``poll()``, the moved sequences still read ``running``; a
swap-out of one of them is no longer ordered after the migration by the engine (it has
ended), so its copies would read device blocks the migration never wrote.
"""

from __future__ import annotations

import pytest
from _fake_cuda import CXX, run_with_fake
from test_cuda_ordering import PRELUDE

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")



@pytest.mark.parametrize("blocking", [False, True])
def test_a_swap_out_after_a_failed_migration_ended_fails_and_is_not_committed(fake, blocking):
    """repro_1: the swap-out copied the never-written blocks, was committed, the failure
    was dropped (the sequence had left the migration's moved set), and its swap-in later
    restored garbage. Now the sequence fails with the migration's error: reported by
    take_failed (async) or raised (blocking), never committed, its GPU blocks held."""
    run_with_fake(fake, f'''
        S, bs, G = CONSUMER, 4, 24
        kv = [np.zeros((G, bs, 8), np.uint8) for _ in range(2)]
        layout = on_cuda(K.KVLayout.from_tensors(kv))
        eng = K.AsyncSwapEngine(layout, K.HostKVPool(layout, 32), backend="cuda",
                                num_workers=2)
        m = K.SwapManager(K.BlockGroupAllocator(G, initial_group_blocks=4), eng,
                          K.BlockGroupAllocator(32, initial_group_blocks=4), block_size=bs,
                          compaction=True, compaction_max_moved=4.0,
                          async_swap_out={not blocking})
        m.allocate(0, 5)
        m.swap_out(0, 20, after=S)
        m.synchronize()
        fill = []
        while m.gpu.num_free_blocks:  # one-block sequences, then one-block holes
            fill.append(len(fill) + 1)
            m.allocate(fill[-1], 1)
        fill.sort(key=lambda s: int(m.block_table(s)[0]))
        for i, s in enumerate(fill):
            if i % 2:
                m.free(s)
        eng._engine._fail_next_jobs(1, "injected migration failure")
        m.swap_in(0, after=S, before=S)  # compacts; the migration job fails
        eng._engine._fail_next_jobs(0, "")
        moved = sorted(m.take_block_table_changes())
        assert moved and m.stats().migrations == 1
        victim = moved[0]
        eng.synchronize()  # the failed migration has ended; the manager has not looked
        assert m.state(victim) == "running"
        host_free = m.tracker.host.num_free_blocks
        if {blocking}:
            try:
                m.swap_out(victim, bs, after=S)
                raise AssertionError("the blocking swap-out of a lost sequence returned")
            except K.SwapError as e:
                assert e.seq_id == victim and e.direction == "migrate", e
        else:
            m.swap_out(victim, bs, after=S)
        assert m.state(victim) == "failed"
        assert victim in m.gpu and victim not in m.swapped_out  # blocks held until free()
        assert m.tracker.host.num_free_blocks == host_free  # nothing committed
        assert victim not in m.tracker or not m.tracker.is_swapped_out(victim)
        m.synchronize()
        failed = m.take_failed()
        assert set(failed) == set(moved) - ({{victim}} if {blocking} else set()), failed
        assert all(e.direction == "migrate" for e in failed.values())
        assert m.take_failed() == {{}} and m.stats().migrate_failures == len(moved)
        for s in moved:
            m.free(s)
        m.gpu.check_invariants()
        m.close()
    ''', prelude=PRELUDE)

"""AsyncSwapEngine.migrate on the cuda backend, against the asynchronous fake driver.

tests/fake_cuda/fake_cuda.cpp runs each stream's work on its own thread, in order, and
copies bytes only when a copy executes (delayed here, so that a missing wait shows as
wrong bytes). Each case checks one part of the migrate contract (docs/design.md,
"Migrations: device-to-device moves"): the copies go out device-to-device on the
worker's stream, are ordered against earlier swaps over the same blocks on another
worker's stream, wait for an ``after=`` stream, are waited for by a ``before=`` stream,
and fail with a failed swap-in into their source blocks. Delays and gates only widen
races: with the rules in place the results do not depend on thread timing.
"""

from __future__ import annotations

import pytest
from _fake_cuda import CXX, run_with_fake
from test_cuda_ordering import PRELUDE

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")



def run(fake, body: str, timeout: float = 90, **env: str) -> None:
    run_with_fake(fake, body, timeout, prelude=PRELUDE, **env)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("kv_dim", [0, 1])
def test_migrate_copies_device_to_device_byte_exact(fake, kv_dim, batch):
    """Linear copies go out in one batch with device location hints on both ends (or one
    cuMemcpyAsync each without the batch API); strided extents as 2D copies typed device
    memory on both ends. Stats count them as migrations, not swaps."""
    env = {} if batch else {"FAKE_CUDA_NO_BATCH": "1"}
    run(fake, f'''
        views, layout = vllm(kv_dim={kv_dim}, n=16, layers=2)  # 4 regions
        pool = K.HostKVPool(layout, 16)
        old = [v.copy() for v in views]
        lib.fake_set_delay_us(b"copy", 2000)
        pairs = [(0, 8, 3), (12, 4, 2), (3, 14, 1)]
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            eng.check_migrate()
            h = eng.migrate(pairs)
            assert h.direction == "migrate" and h.num_copies == 3 * len(views)
            assert h.wait(30) and h.elapsed_s is not None
            for v, o in zip(views, old):
                want = o.copy()
                for s, d, n in pairs:
                    want[d:d + n] = o[s:s + n]
                assert (v == want).all(), "migrated bytes differ"
            st = eng.stats()
            assert st["num_migrations"] == 1 and st["num_jobs"] == 0 and st["bytes"] == 0
            assert st["migrated_bytes"] == h.nbytes == 6 * layout.bytes_per_block
            assert st["migration_copies"] == h.num_copies and st["copy_size_histogram"] == {{}}
        n_copies = 3 * len(views)
        n_2d = 0 if {kv_dim} == 0 else 2 * len(views)  # multi-block rows of strided regions
        if {batch}:
            assert C.batch_dtod_copies == n_copies - n_2d and C.memcpy_async == 0
        else:
            assert C.batch_calls == 0 and C.memcpy_async == n_copies - n_2d
        assert C.memcpy_2d == C.memcpy_2d_dtod == n_2d
    ''', **env)


def test_swaps_keep_unified_2d_copies_and_host_hints(fake):
    """Only migrations declare device memory on both ends: a swap's 2D copies name unified
    addresses (the fake refuses page-locked host memory typed as device memory) and its
    batch hints name the host end."""
    run(fake, '''
        views, layout = vllm(kv_dim=1, n=16)
        pool = K.HostKVPool(layout, 16)
        assert pool.pinned
        with K.AsyncSwapEngine(layout, pool, num_workers=1) as eng:
            assert eng.swap_out([(0, 0, 3), (5, 5, 1), (7, 7, 1)]).wait(30)
            assert eng.swap_in([(0, 8, 3), (5, 12, 1), (7, 13, 1)]).wait(30)
        assert C.memcpy_2d == 4 and C.memcpy_2d_dtod == 0
        assert C.batch_copies > 0 and C.batch_dtod_copies == 0
    ''')


def test_migrate_is_ordered_against_swaps_on_another_stream(fake):
    """RAW: a migration from blocks a swap-in writes copies the swapped-in bytes; RAW
    again: a swap-out of its destination reads the moved bytes; WAR: a swap-in over its
    source waits until the migration read them. sync_every=1 puts consecutive jobs on
    different workers' streams, so only the dependency waits order them."""
    run(fake, '''
        views, layout = vllm(n=16, layers=2)
        pool = K.HostKVPool(layout, 16)
        for i, a in enumerate(pool.arrays):
            a[0:4] = 50 + i
            a[4:8] = 90 + i
        lib.fake_set_delay_us(b"copy", 20000)
        with K.AsyncSwapEngine(layout, pool, num_workers=2, sync_every=1) as eng:
            hs = [eng.swap_in([(0, 0, 4)]),    # device 0..3 <- host 0..3
                  eng.migrate([(0, 8, 4)]),    # device 8..11 <- device 0..3   (RAW)
                  eng.swap_out([(8, 12, 4)]),  # host 12..15 <- device 8..11   (RAW)
                  eng.swap_in([(4, 0, 4)])]    # device 0..3 <- host 4..7      (WAR)
            assert all(h.wait(30) for h in hs)
            assert eng.wait_blocks([8]) == 0
            for i, (v, a) in enumerate(zip(views, pool.arrays)):
                assert (v[8:12] == 50 + i).all(), "the migration read before the swap-in"
                assert (a[12:16] == 50 + i).all(), "the swap-out read before the migration"
                assert (v[0:4] == 90 + i).all()
    ''')


@pytest.mark.parametrize("case", ["war_swap_out", "war_migrate_source", "waw_swap_in"])
def test_a_job_gated_on_compute_holds_the_conflicting_job_behind_it(fake, case):
    """The first job waits on a gated stream; the second, on another worker's stream,
    conflicts with it and must wait on the GPU for it, deterministically: without that
    wait it would run while the gate is closed and the bytes would show it."""
    first, second, check = {
        # a swap-out reads device 0..3, then a migration overwrites them (WAR)
        "war_swap_out": ("eng.swap_out([(0, 0, 4)], after=GATED)",
                         "eng.migrate([(8, 0, 4)])",
                         "(a[0:4] == o[0:4]).all() and (v[0:4] == o[8:12]).all()"),
        # a migration reads device 0..3, then a swap-in overwrites them (WAR)
        "war_migrate_source": ("eng.migrate([(0, 8, 4)], after=GATED)",
                               "eng.swap_in([(4, 0, 4)])",
                               "(v[8:12] == o[0:4]).all() and (v[0:4] == a[4:8]).all()"),
        # a migration writes device 8..11, then a swap-in writes them too (WAW)
        "waw_swap_in": ("eng.migrate([(0, 8, 4)], after=GATED)",
                        "eng.swap_in([(4, 8, 4)])",
                        "(v[8:12] == a[4:8]).all()"),
    }[case]
    run(fake, f'''
        views, layout = vllm(n=16, layers=2)
        pool = K.HostKVPool(layout, 16)
        for i, a in enumerate(pool.arrays):
            a[4:8] = 30 + i
        old = [v.copy() for v in views]
        gate = lib.fake_gate_close(GATED)
        with K.AsyncSwapEngine(layout, pool, num_workers=2, sync_every=1) as eng:
            h1 = {first}
            h2 = {second}
            # it cannot finish while the gate holds the first job (it would, unordered)
            assert not h2.wait(0.3), "the second job ran while the first was gated"
            lib.fake_gate_open(gate)
            assert h1.wait(30) and h2.wait(30)
            for v, o, a in zip(views, old, pool.arrays):
                assert {check}, "the second job did not wait for the gated one"
    ''')


def test_migrate_after_stream_waits_for_readers_and_before_stream_waits_for_it(fake):
    """after=: destination blocks a kernel still reads are overwritten only after it;
    before=: a kernel enqueued on the consumer after migrate() returns reads the moved
    blocks at their new ids."""
    run(fake, '''
        views, layout = vllm(n=16, layers=4)
        old = [v.copy() for v in views]
        pool = K.HostKVPool(layout, 16)
        gate = lib.fake_gate_close(GATED)          # compute is still busy...
        got_old = consumer_read(GATED, views[0][8:12])  # ...then reads the old blocks
        lib.fake_set_delay_us(b"copy", 10000)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            eng.check_migrate(after=GATED, before=CONSUMER)
            h = eng.migrate([(0, 8, 4)], after=GATED, before=CONSUMER)
            got_new = consumer_read(CONSUMER, views[-1][8:12])  # the last region lands last
            threading.Timer(0.3, lib.fake_gate_open, (gate,)).start()
            assert h.wait(30)
            wait_idle(GATED)
            wait_idle(CONSUMER)
            assert (got_old == old[0][8:12]).all(), "the migration overwrote blocks a kernel read"
            assert (got_new == old[-1][0:4]).all(), "the consumer read before the migration"
            for v, o in zip(views, old):
                assert (v[8:12] == o[0:4]).all()
    ''')


def test_flag_mode_consumer_waits_for_a_migration(fake):
    run(fake, '''
        views, layout = vllm(n=8, layers=8)
        old = [v.copy() for v in views]
        pool = K.HostKVPool(layout, 8)
        lib.fake_set_delay_us(b"copy", 10000)
        with K.AsyncSwapEngine(layout, pool, num_workers=2, before_wait="flag") as eng:
            waits = C.wait_value
            h = eng.migrate([(0, 4, 2)], before=CONSUMER)
            assert C.wait_value == waits + 1
            got = consumer_read(CONSUMER, views[-1][4:6])
            wait_idle(CONSUMER)
            assert h.wait(30)
            assert (got == old[-1][0:2]).all(), "the consumer read before the migration"
    ''')


def test_migrate_fails_with_a_failed_swap_in_into_its_sources(fake):
    """A swap-in whose copy fails in the driver fails the migration of its blocks queued
    behind it (root cause named, nothing copied); an unrelated migration still runs."""
    run(fake, '''
        views, layout = vllm(n=16)
        old = [v.copy() for v in views]
        pool = K.HostKVPool(layout, 16)
        lib.fake_fail(b"cuMemcpyBatchAsync", 0, 1)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            eng._engine._set_paused(True)  # both queued before either is issued
            bad = eng.swap_in([(0, 0, 4)])
            mig = eng.migrate([(0, 8, 4)])
            other = eng.migrate([(12, 4, 2)])
            eng._engine._set_paused(False)
            for h in (bad, mig):
                try:
                    h.wait(30)
                    raise AssertionError("no error")
                except K.SwapError:
                    pass
            assert mig.root_job_id == bad.id and "cuMemcpyBatchAsync" in mig.error
            assert other.wait(30)
            check(lib.cuCtxSynchronize())
            for v, o in zip(views, old):
                assert (v[8:12] == o[8:12]).all(), "a failed migration copied"
                assert (v[4:6] == o[12:14]).all()
            st = eng.stats()
            assert st["num_failed"] == 2 and st["num_migrations"] == 1
    ''')


def test_migration_over_a_failed_swap_ins_blocks_runs_after_it(fake):
    """Write-after-write does not propagate a failure: a migration into the blocks a failed
    swap-in was writing runs once it has failed (no copy of it left in flight), and a
    swap-out reading those blocks afterwards reads the migration's bytes."""
    run(fake, '''
        views, layout = vllm(n=16)
        old = [v.copy() for v in views]
        pool = K.HostKVPool(layout, 16)
        lib.fake_set_delay_us(b"copy", 2000)
        lib.fake_fail(b"cuMemcpyBatchAsync", 0, 1)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            eng._engine._set_paused(True)  # all queued before any is issued
            bad = eng.swap_in([(0, 0, 4)])
            over = eng.migrate([(12, 0, 4)])    # writes device 0..3 (WAW): runs
            out = eng.swap_out([(0, 8, 4)])     # reads device 0..3: the migration's bytes
            eng._engine._set_paused(False)
            try:
                bad.wait(30)
                raise AssertionError("no error")
            except K.SwapError:
                pass
            assert over.wait(30) and over.root_job_id is None
            assert out.wait(30) and out.root_job_id is None
            check(lib.cuCtxSynchronize())
            for v, o, h in zip(views, old, pool.arrays):
                assert (v[0:4] == o[12:16]).all()
                assert (h[8:12] == o[12:16]).all()
            st = eng.stats()
            assert st["num_failed"] == 1 and st["num_migrations"] == 1 and st["num_jobs"] == 1
    ''')


def test_migrate_stream_checks_as_swap_in(fake):
    """before= must be a stream; streams capturing a graph and never-recorded events are
    refused by migrate() and check_migrate() alike, with nothing queued."""
    run(fake, '''
        views, layout = vllm(n=16)
        old = [v.copy() for v in views]
        pool = K.HostKVPool(layout, 16)
        lib.fake_set_capturing(0xCA, 1)
        with K.AsyncSwapEngine(layout, pool, num_workers=2) as eng:
            bad = [dict(before=0xCA), dict(after=0xCA), dict(before=K.CudaEvent(0x77)),
                   dict(after=K.CudaEvent(0))]
            for kw in bad:
                for call in (lambda: eng.check_migrate(**kw),
                             lambda: eng.migrate([(0, 8, 2)], **kw)):
                    try:
                        call()
                        raise AssertionError(f"accepted {kw}")
                    except ValueError:
                        pass
            assert eng.stats()["in_flight"] == 0 and eng.poll() == []
        for v, o in zip(views, old):
            assert (v == o).all()
    ''')

"""AsyncSwapEngine.migrate on the host backend: device-to-device moves within the device
layout (GPU-pool compaction). Byte-exact copies over contiguous, strided (2D) and
cross-layer layouts; ordering against swaps and other migrations by the engine's conflict
tracking (a sequential NumPy model of random job sequences); validation that leaves every
pool unchanged; failure chaining; stats kept apart from swaps.

Jobs are held in the queue with the engine's ``_set_paused`` test hook where a test needs
them in flight together, so no input or outcome depends on thread timing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_swap_engine import KINDS, Pools, jobs

from kvswitch import AsyncSwapEngine, EngineClosedError, SwapError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def apply(p: Pools, state, direction: str, pairs) -> None:
    """Expected effect of a job on a snapshot: Pools.apply, plus migrations."""
    if direction != "migrate":
        p.apply(state, direction, pairs)
        return
    for dv in p.device_views(state[0]):
        for s, d, n in pairs:  # sources never overlap destinations: any order is the same
            dv[d:d + n] = dv[s:s + n]


@st.composite
def migrations(draw, num_blocks: int, max_rows: int = 5):
    """Valid migrate pairs: destination extents pairwise disjoint, no source extent
    overlapping any destination extent; sources may overlap each other; some rows of
    length 0 (skipped by the engine, any in-range start)."""
    dst_used = np.zeros(num_blocks, dtype=bool)
    src_used = np.zeros(num_blocks, dtype=bool)
    rows = []
    for _ in range(draw(st.integers(0, max_rows))):
        n = draw(st.integers(0, 4))
        if n == 0:
            rows.append((draw(st.integers(0, num_blocks)), draw(st.integers(0, num_blocks)), 0))
            continue
        busy = dst_used | src_used
        dsts = [d for d in range(num_blocks - n + 1) if not busy[d:d + n].any()]
        if not dsts:
            continue
        d = draw(st.sampled_from(dsts))
        taken = dst_used.copy()
        taken[d:d + n] = True
        srcs = [s for s in range(num_blocks - n + 1) if not taken[s:s + n].any()]
        if not srcs:
            continue
        s = draw(st.sampled_from(srcs))
        dst_used[d:d + n] = True
        src_used[s:s + n] = True
        rows.append((s, d, n))
    return rows


def as_pairs(rows) -> np.ndarray:
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


# ---------------------------------------------------------------------------- byte-exact
@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), kind=st.sampled_from(KINDS), num_blocks=st.integers(3, 24),
       layers=st.integers(1, 3), num_workers=st.sampled_from([0, 2]))
def test_random_migration_is_byte_exact(data, kind, num_blocks, layers, num_workers):
    p = Pools(kind, num_blocks, 4, layers=layers, seed=num_blocks * 7 + layers)
    rows = data.draw(migrations(num_blocks))
    expected = p.snapshot()
    apply(p, expected, "migrate", rows)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as eng:
        h = eng.migrate(as_pairs(rows))
        assert h.wait(timeout=30) and h.direction == "migrate"
        moved = sum(n for _, _, n in rows)
        nonzero = sum(1 for _, _, n in rows if n)
        assert h.nbytes == moved * p.layout.bytes_per_block
        assert h.num_copies == nonzero * p.layout.num_regions
        stats = eng.stats()
    p.assert_state(expected)
    assert stats["num_migrations"] == 1 and stats["migrated_bytes"] == h.nbytes
    assert stats["migration_copies"] == h.num_copies
    assert stats["num_jobs"] == stats["bytes"] == stats["num_copies"] == 0
    assert stats["copy_size_histogram"] == {} and stats["busy_s"] == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_strided_extents_are_one_2d_copy_per_region(kind):
    """A row spans several blocks: one copy per region, 2D where the region is strided."""
    p = Pools(kind, 16, 4, layers=2)
    expected = p.snapshot()
    rows = [(0, 10, 5), (15, 6, 1)]
    apply(p, expected, "migrate", rows)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2) as eng:
        h = eng.migrate(rows)  # a list works too
        assert h.wait(30) and h.num_copies == 2 * p.layout.num_regions
        assert "migrate" in repr(h)
    p.assert_state(expected)


def test_one_block_copied_to_two_places_and_empty_jobs():
    p = Pools("blocks_first", 8, 4)
    expected = p.snapshot()
    apply(p, expected, "migrate", [(1, 4, 2), (1, 6, 1)])  # sources overlap: allowed
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=0) as eng:
        assert eng.migrate([(1, 4, 2), (1, 6, 1)]).wait()
        for empty in ([], np.zeros((0, 3), np.int64), [(3, 3, 0)]):  # done no-ops
            h = eng.migrate(empty)
            assert h.done() and h.nbytes == 0 and h.num_copies == 0
    p.assert_state(expected)


# ---------------------------------------------------------------------------- ordering
@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), kind=st.sampled_from(KINDS), num_workers=st.sampled_from([0, 2]),
       paused=st.booleans())
def test_random_job_sequences_equal_sequential_application(data, kind, num_workers, paused):
    """Any sequence of swap_out / swap_in / migrate jobs over overlapping blocks (across
    jobs) ends in the bytes of applying them one by one in submission order. Paused: every
    job is queued before any runs, so the workers see them all in flight together and only
    the conflict tracking keeps the order."""
    nd, nh = 14, 10
    p = Pools(kind, nd, nh, seed=11)
    expected = p.snapshot()
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers)
    if paused and num_workers:
        eng._engine._set_paused(True)
    handles = []
    for _ in range(data.draw(st.integers(1, 14))):
        direction = data.draw(st.sampled_from(["out", "in", "migrate", "migrate"]))
        if direction == "migrate":
            rows = data.draw(migrations(nd, max_rows=3))
            handles.append(eng.migrate(as_pairs(rows)))
        else:
            src_n, dst_n = (nd, nh) if direction == "out" else (nh, nd)
            rows = data.draw(jobs(src_n, dst_n, max_rows=3))
            fn = eng.swap_out if direction == "out" else eng.swap_in
            handles.append(fn(as_pairs(rows)))
        apply(p, expected, direction, rows)
    eng._engine._set_paused(False)
    eng.synchronize()
    assert all(h.done() and h.wait(0) for h in handles)
    p.assert_state(expected)
    eng.close()


def test_migration_and_swap_out_reading_the_same_blocks_do_not_wait_for_each_other():
    """Two jobs that only read the same device blocks do not conflict: with the migration
    held behind a swap-in into its destination, a later swap-out of its sources runs."""
    p = Pools("kv_first", 16, 8)
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1) as eng:
        eng._engine._set_paused(True)
        held = eng.swap_in([(0, 8, 2)])   # writes device 8, 9
        mig = eng.migrate([(0, 8, 2)])    # reads 0, 1; writes 8, 9: after `held`
        assert eng.wait_blocks([4, 5, 12]) == 0
        eng._engine._set_paused(False)
        assert held.wait(30) and mig.wait(30)
        expected = p.snapshot()
        apply(p, expected, "out", [(0, 0, 2)])
        assert eng.swap_out([(0, 0, 2)]).wait(30)
    p.assert_state(expected)


@pytest.mark.parametrize("block", [0, 1, 8, 9])
def test_wait_blocks_covers_source_and_destination(block):
    p = Pools("kv_first", 16, 8)
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=1)
    eng._engine._set_paused(True)  # the migration stays queued: in flight, deterministically
    h = eng.migrate([(0, 8, 2)])
    assert eng.wait_blocks([2, 7, 10, 15]) == 0  # untouched: returns at once
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("n", eng.wait_blocks([block])))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()  # blocked on the queued migration
    eng._engine._set_paused(False)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and result["n"] == 1 and h.done()
    eng.close()


# ---------------------------------------------------------------------------- validation
BAD = [
    ([(0, 4, -1)], ValueError, "negative length"),
    ([(-1, 4, 1)], ValueError, "source extent .* outside the device pool"),
    ([(15, 4, 2)], ValueError, "source extent .* outside the device pool"),
    ([(0, 15, 2)], ValueError, "destination extent .* outside the device pool"),
    ([(0, -2, 1)], ValueError, "destination extent"),
    ([(0, 4, 2), (8, 5, 2)], ValueError, "destination extents overlap"),
    ([(0, 2, 4)], ValueError, "reads device blocks \\[0, 4\\) that row 0 writes \\[2, 6\\)"),
    ([(3, 3, 1)], ValueError, "must not overlap"),
    ([(0, 8, 2), (9, 0, 1)], ValueError, "row 0 reads .* row 1 writes \\[0, 1\\)"),
    ([(0, 8, 2), (6, 12, 4)], ValueError, "row 1 reads device blocks \\[6, 10\\)"),
    ([(0, 1)], ValueError, "shape"),
    ([(0.5, 1, 1)], TypeError, "integers"),
    ([(2**64, 1, 1)], ValueError, "out of range"),
    ([(2**62, 0, 2**62)], ValueError, "outside the device pool"),
]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("pairs,exc,match", BAD)
def test_bad_pairs_raise_and_leave_pools_unchanged(pairs, exc, match, num_workers):
    p = Pools("blocks_first", 16, 8)
    before = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as eng:
        with pytest.raises(exc, match=match):
            eng.migrate(pairs)
        assert eng.poll() == [] and eng.stats()["in_flight"] == 0
        eng.synchronize()
        s = eng.stats()
    assert s["num_migrations"] == s["num_failed"] == 0
    p.assert_state(before)


@settings(max_examples=80, **SETTINGS)
@given(rows=st.lists(st.tuples(st.integers(-2, 13), st.integers(-2, 13), st.integers(-1, 5)),
                     max_size=4),
       num_workers=st.sampled_from([0, 2]))
def test_any_pairs_either_migrate_exactly_or_raise_with_nothing_changed(rows, num_workers):
    """Arbitrary pairs, valid or not: a valid job equals the model; an invalid one raises
    ValueError and changes nothing (the model says which)."""
    nd = 12
    valid = all(n >= 0 for _, _, n in rows)
    live = [(s, d, n) for s, d, n in rows if n > 0]
    valid = valid and all(0 <= s <= nd - n and 0 <= d <= nd - n for s, d, n in live)
    dst = np.zeros(nd + 8, dtype=int)
    for _, d, n in live:
        if d >= 0:
            dst[d:d + n] += 1
    valid = valid and (dst <= 1).all()
    valid = valid and not any(dst[max(s, 0):s + n].any() for s, _, n in live if s + n > 0)
    p = Pools("cross_layer", nd, 4)
    expected = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as eng:
        if valid:
            assert eng.migrate(as_pairs(rows)).wait(30)
            apply(p, expected, "migrate", live)
        else:
            with pytest.raises(ValueError):
                eng.migrate(as_pairs(rows))
        eng.synchronize()
    p.assert_state(expected)


def test_streams_rejected_on_host_backend_and_closed_engine():
    p = Pools("kv_first", 8, 4)
    before = p.snapshot()
    eng = AsyncSwapEngine(p.layout, p.pool, backend="host")
    eng.check_migrate()
    for kw in (dict(after=1), dict(before=1)):
        with pytest.raises(ValueError, match="host backend"):
            eng.check_migrate(**kw)
        with pytest.raises(ValueError, match="host backend"):
            eng.migrate([(0, 4, 1)], **kw)
    with pytest.raises(TypeError, match="stream"):
        eng.migrate([(0, 4, 1)], before="compute")
    eng.close()
    with pytest.raises(EngineClosedError):
        eng.check_migrate()
    with pytest.raises(EngineClosedError):
        eng.migrate([(0, 4, 1)])
    p.assert_state(before)


# ---------------------------------------------------------------------------- failures
def touched(direction: str, rows) -> dict[str, set[int]]:
    """Blocks a job reads and writes, per pool (the model of the conflict rules)."""
    src = {b for s, _, n in rows for b in range(s, s + n)}
    dst = {b for _, d, n in rows for b in range(d, d + n)}
    t = {"dev_r": set(), "dev_w": set(), "host_r": set(), "host_w": set()}
    if direction == "out":
        t["dev_r"], t["host_w"] = src, dst
    elif direction == "in":
        t["host_r"], t["dev_w"] = src, dst
    else:
        t["dev_r"], t["dev_w"] = src, dst
    return t


def model_conflict(a, b) -> bool:
    """One job writes a block the other reads or writes (RAW, WAR, WAW), per pool: the
    later one is ordered after the earlier one."""
    return any(a[f"{p}_w"] & (b[f"{p}_r"] | b[f"{p}_w"]) or b[f"{p}_w"] & a[f"{p}_r"]
               for p in ("dev", "host"))


def model_raw(a, b) -> bool:
    """The later job `b` reads a block the earlier job `a` writes (read-after-write), per
    pool: with no job between them, `b` fails when `a` fails."""
    return any(a[f"{p}_w"] & b[f"{p}_r"] for p in ("dev", "host"))


CHAIN_CASES = [  # (first job, second job, ordered after it?, fails with it?), device of 12
    ("out", [(0, 0, 2)], "migrate", [(5, 0, 2)], True, False),       # WAR on device 0, 1
    ("out", [(0, 0, 2)], "migrate", [(0, 5, 2)], False, False),      # both only read 0, 1
    ("out", [(0, 0, 2)], "in", [(0, 5, 2)], True, True),             # RAW on host 0, 1
    ("out", [(0, 0, 2)], "in", [(3, 0, 2)], True, False),            # WAR on device 0, 1
    ("out", [(0, 0, 2)], "out", [(4, 1, 2)], True, False),           # WAW on host 1
    ("in", [(0, 0, 2)], "migrate", [(0, 5, 2)], True, True),         # RAW
    ("in", [(0, 5, 2)], "migrate", [(0, 5, 2)], True, False),        # WAW on 5, 6
    ("in", [(0, 5, 2)], "out", [(0, 0, 2)], True, False),            # WAR on host 0, 1
    ("migrate", [(0, 5, 2)], "out", [(5, 0, 2)], True, True),        # RAW
    ("migrate", [(0, 5, 2)], "out", [(0, 0, 2)], False, False),      # read-read
    ("migrate", [(0, 5, 2)], "in", [(0, 0, 2)], True, False),        # WAR
    ("migrate", [(0, 5, 2)], "in", [(0, 9, 2)], False, False),       # host blocks only
    ("migrate", [(0, 5, 2)], "migrate", [(0, 8, 2)], False, False),  # read-read
    ("migrate", [(0, 5, 2)], "migrate", [(5, 8, 2)], True, True),    # RAW
    ("migrate", [(0, 5, 2)], "migrate", [(8, 0, 2)], True, False),   # WAR
    ("migrate", [(0, 5, 2)], "migrate", [(8, 6, 1)], True, False),   # WAW
]


@pytest.mark.parametrize("first,rows_a,second,rows_b,ordered,chained", CHAIN_CASES)
def test_failure_chaining_cases(first, rows_a, second, rows_b, ordered, chained):
    ta, tb = touched(first, rows_a), touched(second, rows_b)
    assert model_conflict(ta, tb) == ordered
    assert model_raw(ta, tb) == chained
    p = Pools("blocks_first", 12, 12)
    calls = {"out": "swap_out", "in": "swap_in", "migrate": "migrate"}
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "boom")
        a = getattr(e, calls[first])(rows_a)
        b = getattr(e, calls[second])(rows_b)
        e._engine._set_paused(False)
        e.synchronize()
        assert b.root_job_id == (a.id if chained else None)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), first=st.sampled_from(["out", "in", "migrate"]),
       second=st.sampled_from(["out", "in", "migrate"]))
def test_failure_chaining_follows_the_conflict_rules_exactly(data, first, second):
    """The first job fails (injected); the second, queued behind it, fails with it exactly
    when it reads a block the first one writes (read-after-write: the bytes it would read
    were never written). Write-after-read and write-after-write orderings do not fail it:
    a migration into the blocks of a failed swap-out (WAR) runs, and writes them."""
    nd, nh = 12, 8

    def draw(direction):
        if direction == "migrate":
            return data.draw(migrations(nd, max_rows=2))
        src_n, dst_n = (nd, nh) if direction == "out" else (nh, nd)
        return data.draw(jobs(src_n, dst_n, max_rows=2))

    rows_a, rows_b = draw(first), draw(second)
    p = Pools("kv_first", nd, nh)
    expected = p.snapshot()
    chained = model_raw(touched(first, rows_a), touched(second, rows_b))
    if not chained:
        apply(p, expected, second, rows_b)
    calls = {"out": "swap_out", "in": "swap_in", "migrate": "migrate"}
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "boom")
        a = getattr(e, calls[first])(as_pairs(rows_a))
        b = getattr(e, calls[second])(as_pairs(rows_b))
        e._engine._set_paused(False)
        e.synchronize()
        assert a.root_job_id == a.id
        assert b.root_job_id == (a.id if chained else None), (rows_a, rows_b)
    p.assert_state(expected)


def test_migration_after_a_failed_swap_in_into_its_sources_fails_with_it():
    p = Pools("kv_first", 16, 8)
    before = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=2) as e:
        e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "simulated cudaErrorIllegalAddress")
        bad_in = e.swap_in([(0, 0, 4)])       # fails (injected)
        mig = e.migrate([(0, 8, 4)])          # reads device 0..3: after bad_in (RAW)
        out = e.swap_out([(8, 0, 4)])         # reads device 8..11: after mig (RAW)
        over = e.migrate([(12, 2, 1)])        # writes device 2: after bad_in (WAW), mig (WAR)
        unrelated = e.migrate([(12, 14, 2)])  # reads 12, 13 (as `over`), writes 14, 15
        e._engine._set_paused(False)
        e.synchronize()
        with pytest.raises(SwapError, match="simulated"):
            bad_in.wait()
        for h in (mig, out):
            with pytest.raises(SwapError, match=f"swap job {bad_in.id} .*simulated"):
                h.wait()
            assert h.root_job_id == bad_in.id
        # Ordered after the failed jobs, but reads nothing they write: it runs.
        for h in (over, unrelated):
            assert h.wait() and h.error == "" and h.root_job_id is None
        stats = e.stats()
    assert stats["num_failed"] == 3 and stats["num_migrations"] == 2 and stats["num_jobs"] == 0
    expected = before
    apply(p, expected, "migrate", [(12, 2, 1)])
    apply(p, expected, "migrate", [(12, 14, 2)])
    p.assert_state(expected)  # nothing of the failed chain touched either pool


@pytest.mark.parametrize("num_workers", [0, 2])
def test_failed_migration_copies_nothing_and_fails_its_readers(num_workers):
    p = Pools("blocks_first", 16, 8)
    before = p.snapshot()
    with AsyncSwapEngine(p.layout, p.pool, backend="host", num_workers=num_workers) as e:
        if num_workers:
            e._engine._set_paused(True)
        e._engine._fail_next_jobs(1, "boom")
        mig = e.migrate([(0, 8, 4)])
        reader = e.swap_out([(8, 0, 4)])  # reads its destination: fails with it if queued
        e._engine._set_paused(False)
        e.synchronize()
        with pytest.raises(SwapError, match="boom"):
            mig.wait()
        assert mig.root_job_id == mig.id and mig.elapsed_s is None
        if num_workers:
            with pytest.raises(SwapError, match=f"swap job {mig.id}"):
                reader.wait()
            p.assert_state(before)
        else:  # inline: the failed job had finished before the swap-out was submitted
            assert reader.wait()
        assert e.stats()["num_failed"] == (2 if num_workers else 1)
        assert e.stats()["num_migrations"] == 0

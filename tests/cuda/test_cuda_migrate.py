"""AsyncSwapEngine.migrate on a real GPU: device-to-device moves with PyTorch tensors.

Skipped without torch or without a GPU. Nothing here has a timed assertion: the sleeps
on the caller's streams only make an unordered copy visible as wrong bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from kvswitch import AsyncSwapEngine, HostKVPool, KVLayout, SwapError  # noqa: E402

pytestmark = pytest.mark.cuda

BLOCK = (16, 2, 64)  # block_size, kv heads, head dim


def as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy()


def views(tensors, kv_dim):
    return [t[kv] if kv_dim == 0 else t[:, kv] for t in tensors for kv in (0, 1)]


@pytest.mark.parametrize("kv_dim", [0, 1])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_migrate_is_byte_exact(kv_dim, num_workers):
    """Contiguous regions (linear copies, batched where the driver can) and strided ones
    (2D copies typed device memory on both ends)."""
    shape = (2, 32, *BLOCK) if kv_dim == 0 else (32, 2, *BLOCK)
    tensors = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(2)]
    layout = KVLayout.from_vllm(tensors, kv_dim=kv_dim)
    pool = HostKVPool(layout, 4)
    pairs = np.array([[0, 20, 6], [10, 2, 1], [28, 8, 4]], dtype=np.int64)
    want = [v.clone() for v in views(tensors, kv_dim)]
    for w in want:
        src = w.clone()
        for s, d, n in pairs:
            w[d:d + n] = src[s:s + n]
    torch.cuda.synchronize()  # the engine's streams do not wait for the default stream
    with AsyncSwapEngine(layout, pool, num_workers=num_workers) as eng:
        assert eng.backend == "cuda", eng.backend_reason
        h = eng.migrate(pairs)
        assert h.wait(timeout=60) and h.direction == "migrate"
        assert h.num_copies == len(pairs) * layout.num_regions
        st = eng.stats()
        assert st["num_migrations"] == 1 and st["migrated_bytes"] == h.nbytes
        assert st["num_jobs"] == 0 and st["bytes"] == 0
    for got, w in zip(views(tensors, kv_dim), want, strict=True):
        np.testing.assert_array_equal(as_bytes(got), as_bytes(w))


def test_migrate_after_producer_and_before_consumer():
    t = torch.zeros((2, 16, *BLOCK), device="cuda", dtype=torch.float16)
    layout = KVLayout.from_vllm([t])
    pool = HostKVPool(layout, 4)
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with AsyncSwapEngine(layout, pool, num_workers=2) as eng:
        torch.cuda.synchronize()
        with torch.cuda.stream(producer):
            torch.cuda._sleep(50_000_000)  # keep the stream busy, then write the sources
            t[:, 0:4].fill_(3.0)
        eng.check_migrate(after=producer, before=consumer)
        h = eng.migrate([[0, 8, 4]], after=producer, before=consumer)
        with torch.cuda.stream(consumer):
            got = t[:, 8:12].clone()  # queued after the wait for the copies
        consumer.synchronize()
        assert (got == 3.0).all(), "copied before the producer wrote, or read before the copy"
        assert h.wait(timeout=60)


def test_migrate_after_swap_in_reads_its_bytes_and_swap_out_after_it_reads_the_moved_ones():
    t = torch.zeros((2, 16, *BLOCK), device="cuda", dtype=torch.float32)
    layout = KVLayout.from_vllm([t])
    pool = HostKVPool(layout, 16)
    for a in pool.arrays:
        a[0:4] = 7.0
        a[8:12] = 0.0
    torch.cuda.synchronize()
    with AsyncSwapEngine(layout, pool, num_workers=2, sync_every=1) as eng:
        hs = [eng.swap_in([[0, 0, 4]]), eng.migrate([[0, 8, 4]]), eng.swap_out([[8, 8, 4]])]
        assert all(h.wait(timeout=60) for h in hs)
    assert (t[:, 8:12] == 7.0).all()
    for a in pool.arrays:
        assert (a[8:12] == 7.0).all()


def test_migration_after_a_failed_swap_in_fails_with_it():
    t = torch.zeros((2, 16, *BLOCK), device="cuda", dtype=torch.float16)
    layout = KVLayout.from_vllm([t])
    pool = HostKVPool(layout, 16)
    torch.cuda.synchronize()
    with AsyncSwapEngine(layout, pool, num_workers=2) as eng:
        eng._engine._set_paused(True)
        eng._engine._fail_next_jobs(1, "injected")
        bad = eng.swap_in([[0, 0, 4]])
        mig = eng.migrate([[0, 8, 4]])
        eng._engine._set_paused(False)
        with pytest.raises(SwapError):
            mig.wait(timeout=60)
        assert mig.root_job_id == bad.id

"""AsyncSwapEngine on the cuda backend, with PyTorch and CuPy tensors.

Skipped without torch or without a GPU. Nothing here has a timed assertion.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from kvswitch import AsyncSwapEngine, CudaEvent, HostKVPool, KVLayout  # noqa: E402

pytestmark = pytest.mark.cuda

BLOCK = (16, 2, 64)  # block_size, kv heads, head dim


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a uint8 NumPy array (works for bfloat16)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy()


def make_vllm(kv_dim: int, num_blocks: int = 24, layers: int = 2, dtype=torch.bfloat16):
    shape = (2, num_blocks, *BLOCK) if kv_dim == 0 else (num_blocks, 2, *BLOCK)
    return [torch.randn(shape, device="cuda").to(dtype) for _ in range(layers)]


def views(tensors, kv_dim):
    return [t[kv] if kv_dim == 0 else t[:, kv] for t in tensors for kv in (0, 1)]


@pytest.mark.parametrize("kv_dim", [0, 1])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_swap_out_and_in_roundtrip_torch(kv_dim, num_workers):
    tensors = make_vllm(kv_dim)
    layout = KVLayout.from_vllm(tensors, kv_dim=kv_dim)
    assert layout.device == ("cuda", 0)
    pool = HostKVPool(layout, 16)
    assert pool.pinned, pool.pin_reason
    assert pool.arrays[0].dtype == np.uint16  # bfloat16 as raw 2-byte values
    with AsyncSwapEngine(layout, pool, num_workers=num_workers) as eng:
        assert eng.backend == "cuda", eng.backend_reason
        torch.cuda.synchronize()
        pairs = np.array([[0, 0, 3], [10, 5, 1], [20, 8, 4]], dtype=np.int64)
        h = eng.swap_out(pairs)
        assert h.wait(timeout=60) and h.elapsed_s is not None and h.elapsed_s > 0
        for dv, hv in zip(views(tensors, kv_dim), pool.arrays, strict=True):
            for s, d, n in pairs:
                np.testing.assert_array_equal(hv[d:d + n].view(np.uint8).reshape(-1),
                                              as_bytes(dv[s:s + n]).reshape(-1))
        # swap back into other device blocks
        h = eng.swap_in(np.array([[0, 12, 12]], dtype=np.int64))
        assert h.wait(timeout=60)
        for dv, hv in zip(views(tensors, kv_dim), pool.arrays, strict=True):
            np.testing.assert_array_equal(as_bytes(dv[12:24]).reshape(-1),
                                          hv[0:12].view(np.uint8).reshape(-1))
        assert eng.stats()["num_jobs"] == 2


def test_cross_layer_single_copy_per_extent():
    t = torch.randn((32, 4, 2, *BLOCK), device="cuda", dtype=torch.float16)
    layout = KVLayout.cross_layer(t)
    pool = HostKVPool(layout, 32)
    torch.cuda.synchronize()  # randn on the default stream; the engine's streams don't wait
    with AsyncSwapEngine(layout, pool) as eng:
        h = eng.swap_out([[4, 0, 20]])
        assert h.wait(timeout=60) and h.num_copies == 1
        np.testing.assert_array_equal(pool.arrays[0][:20], t[4:24].cpu().numpy())


def test_after_stream_orders_swap_out_behind_compute():
    t = torch.zeros((2, 8, *BLOCK), device="cuda", dtype=torch.float16)
    layout = KVLayout.from_vllm([t])
    pool = HostKVPool(layout, 8)
    s = torch.cuda.Stream()
    with AsyncSwapEngine(layout, pool) as eng:
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)  # keep the stream busy, then write
            t.fill_(3.0)
        h = eng.swap_out([[0, 0, 8]], after=s)
        assert h.wait(timeout=60)
        assert (pool.arrays[0] == 3.0).all() and (pool.arrays[1] == 3.0).all()


def test_after_event_and_int_stream_handle():
    t = torch.zeros((2, 4, *BLOCK), device="cuda", dtype=torch.float16)
    layout = KVLayout.from_vllm([t])
    pool = HostKVPool(layout, 4)
    s = torch.cuda.Stream()
    with AsyncSwapEngine(layout, pool) as eng:
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)
            t.fill_(5.0)
        ev = torch.cuda.Event()
        ev.record(s)
        assert eng.swap_out([[0, 0, 2]], after=ev).wait(timeout=60)
        assert (pool.arrays[0][:2] == 5.0).all()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)
            t.fill_(6.0)
        assert eng.swap_out([[2, 2, 2]], after=int(s.cuda_stream)).wait(timeout=60)
        assert (pool.arrays[1][2:4] == 6.0).all()
        assert eng.swap_out([[0, 0, 1]], after=CudaEvent(int(ev.cuda_event))).wait(timeout=60)


def test_before_stream_sees_swapped_in_blocks():
    t = torch.zeros((2, 16, *BLOCK), device="cuda", dtype=torch.float32)
    layout = KVLayout.from_vllm([t])
    pool = HostKVPool(layout, 16)
    for a in pool.arrays:
        a[...] = 7.0
    consumer = torch.cuda.Stream()
    with AsyncSwapEngine(layout, pool, num_workers=1) as eng:
        torch.cuda.synchronize()
        h = eng.swap_in([[0, 0, 16]], before=consumer)
        with torch.cuda.stream(consumer):
            total = t.sum()  # queued after the stream-ordered wait
        consumer.synchronize()
        assert float(total) == 7.0 * t.numel()
        assert h.wait(timeout=60)


def test_wait_blocks_and_sync_every():
    tensors = make_vllm(0, num_blocks=64)
    layout = KVLayout.from_vllm(tensors)
    pool = HostKVPool(layout, 64)
    with AsyncSwapEngine(layout, pool, num_workers=2, sync_every=1) as eng:
        hs = [eng.swap_out([[i, i, 1]]) for i in range(64)]
        eng.wait_blocks([5, 6])
        assert hs[5].done() and hs[6].done()
        eng.synchronize()
        assert all(h.done() for h in hs)
        assert eng.stats()["num_jobs"] == 64


def test_cupy_arrays_dlpack_and_cuda_array_interface():
    cp = pytest.importorskip("cupy")
    a = cp.random.standard_normal((2, 8, *BLOCK), dtype=cp.float32)
    cp.cuda.Device().synchronize()  # the engine's streams do not wait for CuPy's stream

    class CAIOnly:
        def __init__(self, x):
            self._x = x
            self.__cuda_array_interface__ = x.__cuda_array_interface__

    for layout in (KVLayout.from_vllm([a]), KVLayout.from_tensors([CAIOnly(a[0]), CAIOnly(a[1])])):
        assert layout.device == ("cuda", 0)
        pool = HostKVPool(layout, 8)
        with AsyncSwapEngine(layout, pool) as eng:
            s = cp.cuda.Stream(non_blocking=True)
            assert eng.swap_out([[0, 0, 8]], after=s).wait(timeout=60)
        np.testing.assert_array_equal(pool.arrays[0], cp.asnumpy(a[0]))
        np.testing.assert_array_equal(pool.arrays[1], cp.asnumpy(a[1]))

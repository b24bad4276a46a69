"""The SGLang adapter's copies on the CUDA backend, against the fake driver (no SGLang).

LayerTransfer (kvswitch.adapters.sglang.transfer) over layouts relabelled as device 0, with
a page-locked host ``kv_buffer`` from the fake's cuMemHostAlloc: one engine (one worker
thread, one stream) for every layer; each layer's load is its own job over that layer's
regions, ordered on SGLang's load stream; a backup is ordered on SGLang's write stream
(swap_out(after=, before=)) instead of a host wait. The CPU suite (tests/test_sglang_*.py,
in SGLang's venv) checks the same copies byte for byte through SGLang's own pools.
"""

from __future__ import annotations

import textwrap

import pytest
from _fake_cuda import CXX, run_with_fake
from test_cuda_ordering import PRELUDE as CUDA_PRELUDE  # on_cuda(), wait_idle()

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler to build the fake")
torch = pytest.importorskip("torch")

PRELUDE = CUDA_PRELUDE + textwrap.dedent('''
    import torch
    from kvswitch.adapters.sglang.geometry import Geometry, build_geometry
    from kvswitch.adapters.sglang.transfer import LayerTransfer

    LAYERS, TOKENS, HEADS, DIM = 3, 64, 2, 8
    STREAM = 0x5A  # SGLang's load/write stream (the fake makes it on first use)

    def setup(seed=0):
        """Device K/V per layer (NumPy memory named device 0) and a page-locked host
        kv_buffer [2, layers, tokens, heads, dim] (layer_first), random bytes."""
        rng = np.random.default_rng(seed)
        dev = [(torch.from_numpy(rng.integers(0, 2**15, (TOKENS, HEADS, DIM), np.int16)),
                torch.from_numpy(rng.integers(0, 2**15, (TOKENS, HEADS, DIM), np.int16)))
               for _ in range(LAYERS)]
        shape = (2, LAYERS, TOKENS, HEADS, DIM)
        n = int(np.prod(shape)) * 2
        host = np.ctypeslib.as_array((ctypes.c_int16 * (n // 2)).from_address(pinned(n)))
        host = host.reshape(shape)
        host[...] = rng.integers(0, 2**15, shape, np.int16)
        g = build_geometry(device_buffers=dev, kv_buffer=torch.from_numpy(host),
                           layout="layer_first", page_size=16, components=2)
        g = Geometry(g.block_tokens, tuple(map(on_cuda, g.device_layers)), g.host_layers,
                     on_cuda(g.device_all), g.host_all)
        return dev, host, g
''')



def run(fake, body: str) -> None:
    run_with_fake(fake, body, 120, prelude=PRELUDE)


def test_one_engine_loads_each_layer_as_its_own_job_on_the_load_stream(fake):
    """Every layer's load returns while the load stream is still busy; each is one job
    over that layer's K and V; the load stream's work after layer i's load (SGLang's
    layer event) sees layer i's bytes. One worker thread and one stream for the pool."""
    run(fake, '''
        dev, host, g = setup()
        t = LayerTransfer(g)
        try:
            assert t.backend == "cuda" and t.engine.num_workers == 1
            src, dst = np.arange(16, 48), np.arange(0, 32)  # host slots -> device slots
            gate = lib.fake_gate_close(STREAM)  # the load stream is still computing
            seen = []
            for layer in range(LAYERS):
                h = t.load(src, dst, layer, stream=STREAM)  # returns: dispatched only
                assert h.num_copies == 2 and h.nbytes == 2 * 32 * HEADS * DIM * 2
                out = np.empty((32, HEADS, DIM), np.int16)  # what layer i's kernel reads
                check(lib.fake_consumer_copy(STREAM, out.ctypes.data,
                                             dev[layer][0].numpy()[0:32].ctypes.data,
                                             out.nbytes))
                seen.append(out)
            assert not any(h.done() for h in t.layer_handles)
            lib.fake_gate_open(gate)
            t.synchronize()
            wait_idle(STREAM)
            for layer in range(LAYERS):
                assert (seen[layer] == host[0, layer, 16:48]).all(), layer
                assert (dev[layer][1].numpy()[0:32] == host[1, layer, 16:48]).all()
            assert C.streams_created == 1  # the worker's: no stream per layer
            assert t.engine.stats()["num_jobs"] == LAYERS
        finally:
            t.close()
    ''')


def test_a_backup_is_ordered_on_the_write_stream_without_a_host_wait(fake):
    """backup(after=stream) returns while that stream is still busy; the stream's later
    work (SGLang's backup-done event; here a copy out of the host pool) runs only after
    the backup's copies, even when they run long."""
    run(fake, '''
        dev, host, g = setup()
        t = LayerTransfer(g)
        try:
            gate = lib.fake_gate_close(STREAM)
            h = t.backup(np.arange(0, 32), np.arange(32, 64), after=STREAM)
            assert not h.done()  # no host wait
            lib.fake_set_delay_us(b"copy", 100000)  # the backup's 6 copies run long
            last = host[1, LAYERS - 1, 0:32]  # written by the backup's last copy
            got = np.empty_like(last)
            check(lib.fake_consumer_copy(STREAM, got.ctypes.data, last.ctypes.data,
                                         got.nbytes))
            lib.fake_gate_open(gate)
            t.synchronize()
            wait_idle(STREAM)
            assert (got == dev[LAYERS - 1][1].numpy()[32:64]).all(), "read before the backup"
            assert t.stats()["backups"] == 1
        finally:
            t.close()
    ''')

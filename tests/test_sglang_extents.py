"""kvswitch.adapters.sglang.extents and the plugin's import cost: no SGLang needed, so these
run in the main suite too."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvswitch.adapters.sglang.extents import as_index_array, coalesce


def _expand(pairs: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The slot pairs an extent list copies (the reference the test compares with)."""
    src, dst = [], []
    for s, d, n in pairs.tolist():
        src.extend(range(s * block, (s + n) * block))
        dst.extend(range(d * block, (d + n) * block))
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)


@st.composite
def _page_transfers(draw):
    """Page-aligned slot vectors as SGLang passes them: whole pages, in any page order."""
    block = draw(st.sampled_from([1, 2, 16]))
    n_pages = draw(st.integers(0, 24))
    src_pages = draw(st.permutations(range(40)))[:n_pages]
    dst_pages = draw(st.permutations(range(40)))[:n_pages]
    if draw(st.booleans()):  # SGLang's fresh host allocator: contiguous host pages
        src_pages = sorted(src_pages)
    offs = np.arange(block)
    src = np.array([p * block + offs for p in src_pages], dtype=np.int64).reshape(-1)
    dst = np.array([p * block + offs for p in dst_pages], dtype=np.int64).reshape(-1)
    return src, dst, block


@settings(max_examples=200, deadline=None)
@given(_page_transfers())
def test_extents_copy_exactly_the_slot_pairs_in_as_few_runs_as_the_order_allows(t):
    src, dst, block = t
    pairs = coalesce(src, dst, block)
    got_src, got_dst = _expand(pairs, block)
    assert np.array_equal(got_src, src) and np.array_equal(got_dst, dst)
    assert (pairs[:, 2] > 0).all()
    # Maximal: two neighbouring extents never continue each other on both sides.
    cont = (pairs[:-1, 0] + pairs[:-1, 2] == pairs[1:, 0]) & \
           (pairs[:-1, 1] + pairs[:-1, 2] == pairs[1:, 1])
    assert not cont.any()


def test_contiguous_slots_are_one_extent_in_pages():
    src = np.arange(64, 64 + 256)
    dst = np.arange(1024, 1024 + 256)
    assert coalesce(src, dst, 16).tolist() == [[4, 64, 16]]
    assert coalesce(src, dst, 1).tolist() == [[64, 1024, 256]]


def test_misaligned_or_mismatched_slots_are_refused():
    with pytest.raises(ValueError, match="not whole pages of 16"):
        coalesce(np.arange(8, 24), np.arange(16), 16)
    with pytest.raises(ValueError, match="differ in length"):
        coalesce(np.arange(4), np.arange(5))
    with pytest.raises(ValueError, match=">= 0"):
        coalesce(np.array([-1, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one-dimensional"):
        as_index_array(np.zeros((2, 2), np.int64), "host_indices")
    with pytest.raises(TypeError, match="integers"):
        as_index_array(np.zeros(2), "host_indices")
    assert coalesce(np.zeros(0, np.int64), np.zeros(0, np.int64), 16).shape == (0, 3)


def test_plugin_import_imports_neither_torch_nor_sglang():
    code = ("import sys, kvswitch, kvswitch.adapters.sglang.plugin as p; "
            "import kvswitch.adapters.sglang as a; "
            "assert callable(p.register) and a.BACKEND_NAME == 'kvswitch'; "
            "bad = sorted(m for m in ('torch', 'sglang') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------- LayerTransfer load cache
def _transfer(layers=2, tokens=32, dim=4):
    """A CPU LayerTransfer over an MLA-shaped (one component) layer_first host pool."""
    torch = pytest.importorskip("torch")
    from kvswitch.adapters.sglang.geometry import build_geometry
    from kvswitch.adapters.sglang.transfer import LayerTransfer

    gen = torch.Generator().manual_seed(0)
    device = [(torch.zeros(tokens, 1, dim),) for _ in range(layers)]
    host = torch.randn(layers, tokens, 1, dim, generator=gen)
    g = build_geometry(device_buffers=device, kv_buffer=host, layout="layer_first",
                       page_size=1, components=1)
    return LayerTransfer(g), device, host


@pytest.mark.parametrize("kind", ["numpy", "list", "cpu_tensor_numpy_view"])
def test_load_reuses_no_stale_extents_after_an_in_place_index_change(kind):
    """Review finding 5: the load-index cache keyed NumPy arrays by identity, so a buffer
    rewritten in place between loads got the old extents (KV copied to the wrong slots)."""
    t, device, host = _transfer()
    h = np.arange(4, dtype=np.int64)
    d = np.arange(10, 14, dtype=np.int64)
    if kind == "cpu_tensor_numpy_view":
        import torch
        h_t, d_t = torch.from_numpy(h), torch.from_numpy(d)  # share memory with h, d
        args = lambda: (h_t, d_t)  # noqa: E731
    elif kind == "list":
        args = lambda: (h.tolist(), d.tolist())  # noqa: E731
    else:
        args = lambda: (h, d)  # noqa: E731
    t.load(*args(), layer=0)
    d[:] = [20, 21, 22, 23]   # the same buffer, new slots (a write torch does not version)
    h[:] = [4, 5, 6, 7]
    t.load(*args(), layer=0)
    t.synchronize()
    t.close()
    np.testing.assert_array_equal(device[0][0][20:24].numpy(), host[0][4:8].numpy())
    np.testing.assert_array_equal(device[0][0][10:14].numpy(), host[0][0:4].numpy())
    assert t.stats()["load_extents"] == 2


def test_load_coalesces_once_per_batch_and_forgets_it_after_the_last_layer():
    t, device, host = _transfer(layers=3)
    h = np.array([0, 1, 2, 8], dtype=np.int64)
    d = np.array([5, 6, 7, 9], dtype=np.int64)
    for layer in range(3):
        t.load(h, d, layer)
        assert (t._load_key is None) == (layer == 2)
    t.synchronize()
    t.close()
    for layer in range(3):
        np.testing.assert_array_equal(device[layer][0][[5, 6, 7, 9]].numpy(),
                                      host[layer][[0, 1, 2, 8]].numpy())
    assert t.stats()["load_extents"] == 3 * 2


def test_counters_are_logged_at_the_first_backup_and_load_then_at_most_every_interval(
        monkeypatch, caplog):
    """What a server's log shows (docs/adapters/sglang.md, "You should see"): one INFO line
    at the first backup, one at the first load, then the counters at most every
    STATS_LOG_INTERVAL_S (the clock is stepped by hand, nothing is timed)."""
    from kvswitch.adapters.sglang import transfer as transfer_module

    clock = [1000.0]
    monkeypatch.setattr(transfer_module, "_now", lambda: clock[0])
    t, _, _ = _transfer(layers=2)
    lines = lambda: [r.getMessage() for r in caplog.records  # noqa: E731
                     if r.name == transfer_module.__name__]
    with caplog.at_level("INFO", logger=transfer_module.__name__):
        t.backup(np.arange(4), np.arange(8, 12))
        assert len(lines()) == 1 and "(first backup): 1 backup(s) device -> host" in lines()[0]
        t.load(np.arange(4), np.arange(8, 12), 0)
        assert len(lines()) == 2 and "(first load)" in lines()[1]
        assert "1 layer load(s) host -> device (1 extents, 1 copies, 64 bytes)" in lines()[1]
        t.load(np.arange(4), np.arange(8, 12), 1)
        t.backup(np.arange(4), np.arange(8, 12))
        assert len(lines()) == 2  # within the interval: quiet
        clock[0] += transfer_module.STATS_LOG_INTERVAL_S
        t.backup(np.arange(4), np.arange(8, 12))
        assert len(lines()) == 3
        assert "3 backup(s)" in lines()[2] and "2 layer load(s)" in lines()[2]
    t.close()

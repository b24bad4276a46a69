"""kvswitch as SGLang's HiCache host pool, against SGLang's real pools on the CPU (MHA, and
MLA at the end).

Needs sglang (``pip install ".[sglang]"``; .ci/sglang_suite.sh); skipped without it.
The device pool is SGLang's ``MHATokenToKVPool(device="cpu")``, the host pool kvswitch's
subclass of SGLang's ``MHATokenToKVPoolHost``; bytes are read back through SGLang's own
accessors (``get_key_buffer``/``get_value_buffer`` on the device, ``get_data_page`` on the
host), never through kvswitch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("sglang.srt.mem_cache.pool_host.mha")
import torch  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402

from kvswitch import SwapError  # noqa: E402
from kvswitch.adapters.sglang.host_pool import (  # noqa: E402
    KvswitchMHATokenToKVPoolHost,
    KvswitchMLATokenToKVPoolHost,
)

LAYOUTS = ("layer_first", "page_first", "page_first_direct")
PAGE_SIZES = (1, 16, 64)
LAYERS, HEADS, HEAD_DIM = 3, 2, 8
DEVICE_PAGES, HOST_PAGES = 24, 32
DTYPE = torch.bfloat16


def make_device(page_size: int, *, layers: int = LAYERS, seed: int = 0) -> MHATokenToKVPool:
    """SGLang's device pool on the CPU, every K/V byte random."""
    pool = MHATokenToKVPool(
        size=DEVICE_PAGES * page_size, page_size=page_size, dtype=DTYPE, head_num=HEADS,
        head_dim=HEAD_DIM, layer_num=layers, device="cpu", enable_memory_saver=False,
        enable_alt_stream=False)
    g = torch.Generator().manual_seed(seed)
    for layer in range(layers):
        for buf in (pool.get_key_buffer(layer), pool.get_value_buffer(layer)):
            raw = buf.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
    return pool


def make_host(device: MHATokenToKVPool, layout: str, page_size: int,
              cls: type = KvswitchMHATokenToKVPoolHost):
    info = device.get_device_pool_infos()[0].buffer_info
    return cls(info, 1.0, 0, page_size, layout, pin_memory=False, device="cpu",
               device_capacity_tokens=device.size, start_layer=0,
               end_layer=device.layer_num, host_token_capacity=HOST_PAGES * page_size)


def host_page(host, token: int) -> torch.Tensor:
    """One host page through SGLang's ``get_data_page``, as ``[2, layers, page, heads,
    head_dim]`` whatever the layout."""
    page = host.get_data_page(token, flat=False)
    if host.layout == "page_first":           # [2, page, layers, heads, dim]
        page = page.permute(0, 2, 1, 3, 4)
    elif host.layout == "page_first_direct":  # [2, 1, layers, page, heads, dim]
        page = page[:, 0]
    return page


def device_tokens(device, slots: torch.Tensor) -> torch.Tensor:
    """``[2, layers, n, heads, head_dim]`` of device slots, through SGLang's accessors."""
    return torch.stack([
        torch.stack([device.get_key_buffer(lay)[slots] for lay in range(device.layer_num)]),
        torch.stack([device.get_value_buffer(lay)[slots] for lay in range(device.layer_num)]),
    ])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def slots_of(pages, page_size: int) -> torch.Tensor:
    offs = torch.arange(page_size, dtype=torch.int64)
    return (torch.as_tensor(list(pages), dtype=torch.int64)[:, None] * page_size
            + offs).reshape(-1)


def roundtrip(host, device, page_size: int, src_pages, dst_pages, *, layers_in_order=True):
    """Back up device pages ``src_pages`` into freshly allocated host slots, check them
    through ``get_data_page``, load them into device pages ``dst_pages`` layer by layer and
    check those through the device accessors. Returns the host slots."""
    src = slots_of(src_pages, page_size)
    dst = slots_of(dst_pages, page_size)
    host_slots = host.alloc(len(src))
    assert host_slots is not None
    expected = device_tokens(device, src).clone()
    host.backup_from_device_all_layer(device, host_slots, src, "direct")
    for i in range(len(src_pages)):
        got = host_page(host, int(host_slots[i * page_size]))
        want = expected[:, :, i * page_size:(i + 1) * page_size]
        assert same_bytes(got, want), f"host page {i} differs from device page {src_pages[i]}"
    order = range(device.layer_num) if layers_in_order else reversed(range(device.layer_num))
    for layer in order:
        host.load_to_device_per_layer(device, host_slots, dst, layer, "direct")
    assert same_bytes(device_tokens(device, dst), expected)
    return host_slots


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backup_and_load_are_byte_exact(layout, page_size):
    device = make_device(page_size, seed=page_size)
    host = make_host(device, layout, page_size)
    try:
        rng = np.random.default_rng(1)
        src = rng.choice(np.arange(1, DEVICE_PAGES), 10, replace=False).tolist()
        dst = [p for p in range(1, DEVICE_PAGES) if p not in src][:10]
        roundtrip(host, device, page_size, src, dst)
        # A second, smaller round trip from the loaded pages, layers loaded last to first.
        roundtrip(host, device, page_size, dst[:3], src[:3], layers_in_order=False)
    finally:
        host.destroy()


_POOLS: dict = {}


def _pool(layout: str, page_size: int):
    if (layout, page_size) not in _POOLS:
        device = make_device(page_size, seed=7)
        _POOLS[layout, page_size] = (device, make_host(device, layout, page_size))
    return _POOLS[layout, page_size]


@st.composite
def _transfer(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    page_size = draw(st.sampled_from(PAGE_SIZES))
    n = draw(st.integers(1, 8))
    pages = draw(st.permutations(range(1, DEVICE_PAGES)))
    host_order = draw(st.permutations(range(n)))
    return layout, page_size, pages[:n], pages[n:2 * n], host_order


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_transfer())
def test_roundtrip_property(t):
    """Any device pages, any host slots (allocated, then shuffled page-wise), any layout and
    page size: what a backup writes is what SGLang's host accessor reads, and what a
    per-layer load writes is what the device held."""
    layout, page_size, src, dst, host_order = t
    device, host = _pool(layout, page_size)
    src_slots = slots_of(src, page_size)
    dst_slots = slots_of(dst, page_size)
    allocated = host.alloc(len(src_slots))
    assert allocated is not None
    try:
        host_slots = allocated.view(-1, page_size)[list(host_order)].reshape(-1)
        expected = device_tokens(device, src_slots).clone()
        host.backup_from_device_all_layer(device, host_slots, src_slots, "kernel")
        for i in range(len(src)):
            got = host_page(host, int(host_slots[i * page_size]))
            assert same_bytes(got, expected[:, :, i * page_size:(i + 1) * page_size])
        for layer in range(device.layer_num):
            host.load_to_device_per_layer(device, host_slots, dst_slots, layer, "kernel")
        assert same_bytes(device_tokens(device, dst_slots), expected)
    finally:
        host.free(allocated)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kvswitch_host_pool_holds_what_sglangs_own_layout_holds(layout, page_size):
    """The bytes land where SGLang's own pool puts them: written through SGLang's
    ``set_from_flat_data_page`` on SGLang's own host pool, a page reads back the same through
    kvswitch's pool after a kvswitch load and backup."""
    device = make_device(page_size, seed=3)
    ours = make_host(device, layout, page_size)
    theirs = make_host(make_device(page_size), layout, page_size, cls=MHATokenToKVPoolHost)
    try:
        assert ours.kv_buffer.shape == theirs.kv_buffer.shape
        src = slots_of([5, 2], page_size)
        slots = ours.alloc(len(src))
        ours.backup_from_device_all_layer(device, slots, src, "direct")
        for i in range(2):
            flat = ours.get_data_page(int(slots[i * page_size]), flat=True)
            theirs.set_from_flat_data_page(int(slots[i * page_size]), flat.clone())
            assert same_bytes(host_page(theirs, int(slots[i * page_size])),
                              device_tokens(device, src[i * page_size:(i + 1) * page_size]))
    finally:
        ours.destroy()
        theirs.destroy()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copies_per_backup_of_contiguous_host_slots(layout):
    """Contiguous host slots and runs of contiguous device pages: one copy per run and
    region, far below one per page (target: at most a quarter of the page count per region)."""
    page_size = 16
    device = make_device(page_size, layers=2)
    host = make_host(device, layout, page_size)
    try:
        pages = list(range(2, 10)) + list(range(12, 20))  # 16 pages in 2 runs
        src = slots_of(pages, page_size)
        host_slots = host.alloc(len(src))
        assert torch.equal(host_slots, host_slots[0] + torch.arange(len(src)))
        before = dict(host.kvswitch.counters)
        host.backup_from_device_all_layer(device, host_slots, src, "direct")
        extents = host.kvswitch.counters["backup_extents"] - before["backup_extents"]
        copies = host.kvswitch.counters["backup_copies"] - before["backup_copies"]
        regions = 2 * device.layer_num
        assert extents == 2 and copies == extents * regions
        assert extents <= len(pages) / 4
    finally:
        host.destroy()


def test_bad_indices_raise_and_copy_nothing():
    page_size = 16
    device = make_device(page_size)
    host = make_host(device, "layer_first", page_size)
    try:
        snapshot = host.kv_buffer.clone()
        dev_snapshot = device_tokens(device, torch.arange(DEVICE_PAGES * page_size)).clone()
        slots = host.alloc(2 * page_size)
        with pytest.raises(ValueError, match="differ in length"):
            host.backup_from_device_all_layer(device, slots, slots_of([1], page_size), "direct")
        with pytest.raises(ValueError):  # a device page past the pool
            host.backup_from_device_all_layer(device, slots,
                                              slots_of([1, 10_000], page_size), "direct")
        with pytest.raises(ValueError):
            host.load_to_device_per_layer(device, slots + 10**6,
                                          slots_of([1, 2], page_size), 0, "direct")
        assert torch.equal(host.kv_buffer.view(torch.int16), snapshot.view(torch.int16))
        assert same_bytes(device_tokens(device, torch.arange(DEVICE_PAGES * page_size)),
                          dev_snapshot)
    finally:
        host.destroy()


def test_page_first_direct_refuses_runs_that_are_not_whole_pages():
    """page_first_direct copies whole pages (a block is a page); a device run that starts
    mid-page is refused before anything is copied."""
    page_size = 16
    device = make_device(page_size)
    host = make_host(device, "page_first_direct", page_size)
    try:
        snapshot = host.kv_buffer.clone()
        slots = host.alloc(2 * page_size)
        with pytest.raises(ValueError, match="not whole pages of 16"):
            host.backup_from_device_all_layer(device, slots, slots_of([1, 2], page_size) + 3,
                                              "direct")
        assert torch.equal(host.kv_buffer.view(torch.int16), snapshot.view(torch.int16))
        # The other layouts copy token runs: the same slots work there.
        other = make_host(device, "layer_first", page_size)
        slots = other.alloc(2 * page_size)
        src = slots_of([1, 2], page_size) + 3
        other.backup_from_device_all_layer(device, slots, src, "direct")
        dst = slots_of([9, 10], page_size)
        for layer in range(LAYERS):
            other.load_to_device_per_layer(device, slots, dst, layer, "direct")
        assert same_bytes(device_tokens(device, dst), device_tokens(device, src))
        other.destroy()
    finally:
        host.destroy()


def test_a_failed_copy_raises():
    """A copy that fails inside kvswitch raises SwapError from the SGLang call."""
    page_size = 16
    device = make_device(page_size)
    host = make_host(device, "page_first", page_size)
    try:
        slots = host.alloc(2 * page_size)
        src = slots_of([3, 4], page_size)
        engine = host.kvswitch.engine
        engine._engine._fail_next_jobs(1, "simulated copy failure")
        with pytest.raises(SwapError, match="simulated copy failure"):
            host.backup_from_device_all_layer(device, slots, src, "direct")
        host.load_to_device_per_layer(device, slots, src, 0, "direct")
        engine._engine._fail_next_jobs(1, "simulated load failure")
        with pytest.raises(SwapError, match="simulated load failure"):
            host.load_to_device_per_layer(device, slots, src, 1, "direct")
    finally:
        host.destroy()


def test_per_layer_loads_are_separate_jobs():
    """Each layer's load is its own job with its own handle: layer i is complete without
    waiting for any later layer (the hook SGLang's per-layer events order on, on CUDA)."""
    page_size = 16
    device = make_device(page_size)
    host = make_host(device, "layer_first", page_size)
    try:
        src = slots_of([1, 2, 3], page_size)
        slots = host.alloc(len(src))
        host.backup_from_device_all_layer(device, slots, src, "direct")
        dst = slots_of([7, 8, 9], page_size)
        host.load_to_device_per_layer(device, slots, dst, 0, "direct")
        handles = host.kvswitch.layer_handles
        assert handles[0] is not None and handles[0].done() and handles[1] is None
        k0 = device.get_key_buffer(0)[dst]
        assert same_bytes(k0, device.get_key_buffer(0)[src])
        assert not same_bytes(device.get_key_buffer(1)[dst], device.get_key_buffer(1)[src])
        for layer in range(1, LAYERS):
            host.load_to_device_per_layer(device, slots, dst, layer, "direct")
        # One engine for the pool: one backup job and one load job per layer, each over
        # that layer's regions only (its K and V).
        t = host.kvswitch
        handles = t.layer_handles
        assert t.engine.stats()["num_jobs"] == 1 + LAYERS
        extents = handles[0].num_copies // 2
        assert [h.num_copies for h in handles] == [2 * extents] * LAYERS
        assert [t.layer_regions(i) for i in range(LAYERS)] == [range(2 * i, 2 * i + 2)
                                                               for i in range(LAYERS)]
        assert same_bytes(device_tokens(device, dst), device_tokens(device, src))
        # Layers past the target layers are skipped, as in SGLang's own pool.
        host.load_to_device_per_layer(device, slots, dst, LAYERS, "direct")
    finally:
        host.destroy()


def test_unsupported_layout_is_refused_before_allocating():
    device = make_device(16)
    with pytest.raises(ValueError, match="page_head"):
        make_host(device, "page_head", 16)


def make_mla(page_size: int, layout: str):
    """SGLang's MLA device pool on the CPU (random bytes) and kvswitch's MLA host pool."""
    device = MLATokenToKVPool(
        size=DEVICE_PAGES * page_size, page_size=page_size, dtype=DTYPE, kv_lora_rank=32,
        qk_rope_head_dim=16, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    g = torch.Generator().manual_seed(11)
    for layer in range(LAYERS):
        raw = device.get_key_buffer(layer).view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
    info = device.get_device_pool_infos()[0].buffer_info
    host = KvswitchMLATokenToKVPoolHost(
        info, 1.0, 0, page_size, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=device.size, start_layer=0, end_layer=LAYERS,
        target_layer_num=LAYERS, host_token_capacity=HOST_PAGES * page_size)
    return device, host


def mla_host_page(host, token: int) -> torch.Tensor:
    """One MLA host page through ``get_data_page`` as ``[layers, page, 1, dim]``."""
    page = host.get_data_page(token, flat=False)
    if host.layout == "page_first":           # [page, layers, 1, dim]
        page = page.permute(1, 0, 2, 3)
    elif host.layout == "page_first_direct":  # [1, layers, page, 1, dim]
        page = page[0]
    return page


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mla_backup_and_load_are_byte_exact(layout, page_size):
    device, host = make_mla(page_size, layout)
    try:
        src_pages, dst_pages = [7, 2, 3, 11], [15, 16, 17, 20]
        src, dst = slots_of(src_pages, page_size), slots_of(dst_pages, page_size)
        want = torch.stack([device.get_key_buffer(i)[src] for i in range(LAYERS)]).clone()
        slots = host.alloc(len(src))
        host.backup_from_device_all_layer(device, slots, src, "direct")
        for i in range(len(src_pages)):
            got = mla_host_page(host, int(slots[i * page_size]))
            assert same_bytes(got, want[:, i * page_size:(i + 1) * page_size])
        for layer in range(LAYERS):
            host.load_to_device_per_layer(device, slots, dst, layer, "direct")
        got = torch.stack([device.get_key_buffer(i)[dst] for i in range(LAYERS)])
        assert same_bytes(got, want)
    finally:
        host.destroy()

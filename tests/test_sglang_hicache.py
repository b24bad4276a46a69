"""End to end on the CPU: SGLang's own HiCache (UnifiedRadixCache + HiCacheController +
L2TransferEngine) with kvswitch's host pool, built by SGLang's ``build_kv_host_pool``
under :func:`~kvswitch.adapters.sglang.backend.use_kvswitch_host_pools`.

Uses the HiCache unit-test kit SGLang ships in its wheel
(``sglang.test.kits.unified_radix_cache``): it builds the cache, writes nodes through to
the host (``write_backup``), evicts their device KV and loads it back (``load_back``,
``ready_to_load_host_cache``). The kit asks for an accelerator (``get_device()``); it is
pointed at the CPU here. Slow to import (SGLang's model stack, about a minute).
"""

from __future__ import annotations

import functools
import unittest
from unittest import mock

import pytest

pytest.importorskip("sglang.test.kits.unified_radix_cache.mixins")
import torch  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.test.kits.unified_radix_cache import mixins  # noqa: E402
from sglang.test.kits.unified_radix_cache.config import CacheConfig  # noqa: E402
from sglang.test.kits.unified_radix_cache.mixins import UnifiedRadixCacheFixtures  # noqa: E402

from kvswitch.adapters.sglang.backend import use_kvswitch_host_pools  # noqa: E402
from kvswitch.adapters.sglang.host_pool import KvswitchMHATokenToKVPoolHost  # noqa: E402

LAYERS = 4


def _server_args(layout: str, io_backend: str, *args, **kwargs) -> ServerArgs:
    kwargs.update(hicache_mem_layout=layout, hicache_io_backend=io_backend)
    return ServerArgs(*args, **kwargs)


def _kvswitch_pool(cache) -> KvswitchMHATokenToKVPoolHost:
    host = cache.cache_controller.mem_pool_host
    pools = [e.host_pool for e in getattr(host, "entries", ())] or [host]
    ours = [p for p in pools if isinstance(p, KvswitchMHATokenToKVPoolHost)]
    assert ours, f"SGLang built {[type(p).__name__ for p in pools]}, not kvswitch's pool"
    return ours[0]


class _HiCacheRoundTrip(UnifiedRadixCacheFixtures):
    layout = "page_first"
    io_backend = "kernel"
    page_size = 16

    def setUp(self):
        self.cfg = CacheConfig(page_size=self.page_size, num_layers=LAYERS,
                               full_attention_layer_ids=tuple(range(LAYERS)), kv_size=512,
                               head_num=2, head_dim=64)
        server_args = functools.partial(_server_args, self.layout, self.io_backend)
        patches = [use_kvswitch_host_pools(),
                   mock.patch.object(mixins, "ServerArgs", server_args),
                   mock.patch("sglang.test.kits.unified_radix_cache.fixtures.get_device",
                              return_value="cpu")]
        for p in patches:
            p.__enter__()
            self.addCleanup(p.__exit__, None, None, None)

    def test_write_through_evict_and_load_back_restore_every_layer(self):
        cache, allocator, rtp = self._build_hicache_fixture()
        pool = _kvswitch_pool(cache)
        self.assertEqual(pool.layout, self.layout)
        kv = self._get_full_kv_pool(allocator)
        chain = self._build_chain_pages(cache, allocator, rtp, 3)
        g = torch.Generator().manual_seed(5)
        for layer in range(kv.layer_num):  # every byte of the pool random
            for buf in (kv.get_key_buffer(layer), kv.get_value_buffer(layer)):
                raw = buf.view(torch.uint8)
                raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
        full = ComponentType.FULL
        slots = [mixins.node_device_value(cache, n, full).clone() for n in chain]
        want = [[(kv.get_key_buffer(i)[s].clone(), kv.get_value_buffer(i)[s].clone())
                 for i in range(kv.layer_num)] for s in slots]
        self._backup_tree(cache)  # write-through of every node: kvswitch backups
        self.assertGreater(pool.kvswitch.counters["backups"], 0)
        cache.evict(EvictParams(num_tokens=10**6))  # SGLang evicts the device KV
        self.assertTrue(all(mixins.node_device_value(cache, n, full) is None for n in chain))
        for s in slots:  # scribble over the freed slots
            for i in range(kv.layer_num):
                kv.get_key_buffer(i)[s] = 0
                kv.get_value_buffer(i)[s] = 0
        loads = pool.kvswitch.counters["loads"]
        self._load_back_node(cache, chain[-1])  # SGLang loads the path back, per layer
        self.assertEqual(pool.kvswitch.counters["loads"] - loads, kv.layer_num)
        for n, node_want in zip(chain, want, strict=True):
            new_slots = mixins.node_device_value(cache, n, full)
            self.assertIsNotNone(new_slots)
            for i, (k, v) in enumerate(node_want):
                got_k = kv.get_key_buffer(i)[new_slots]
                got_v = kv.get_value_buffer(i)[new_slots]
                self.assertTrue(torch.equal(got_k.view(torch.int16), k.view(torch.int16)), i)
                self.assertTrue(torch.equal(got_v.view(torch.int16), v.view(torch.int16)), i)


class TestLayerFirstKernel(_HiCacheRoundTrip, unittest.TestCase):
    layout, io_backend = "layer_first", "kernel"


class TestPageFirstKernel(_HiCacheRoundTrip, unittest.TestCase):
    layout, io_backend = "page_first", "kernel"


class TestPageFirstDirect(_HiCacheRoundTrip, unittest.TestCase):
    # The kit's device allocator hands out token slots from 1, not whole pages, which
    # page_first_direct (a block is one page) refuses, as SGLang's direct kernels assume
    # aligned pages: page size 1 here; page sizes 16/64 are in test_sglang_adapter.py.
    layout, io_backend, page_size = "page_first_direct", "direct", 1


class TestLayerFirstDirectPage1(_HiCacheRoundTrip, unittest.TestCase):
    layout, io_backend, page_size = "layer_first", "direct", 1

"""SGLang finds kvswitch's radix-cache backend through the ``sglang.srt.plugins`` entry
point, and ``--radix-cache-backend kvswitch --enable-hierarchical-cache`` builds SGLang's
cache with kvswitch's host pool. Needs sglang and kvswitch installed (its entry point is
package metadata); skipped without sglang."""

from __future__ import annotations

import unittest
from importlib.metadata import entry_points
from unittest import mock

import pytest

pytest.importorskip("sglang.srt.mem_cache.registry")
from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group  # noqa: E402

from kvswitch.adapters.sglang import plugin  # noqa: E402


def test_entry_point_is_declared_in_the_installed_metadata():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvswitch"]
    assert [ep.value for ep in eps] == ["kvswitch.adapters.sglang.plugin:register"]
    assert GENERAL_PLUGINS_GROUP == "sglang.srt.plugins"


def test_sglangs_plugin_loader_registers_the_backend():
    plugins = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert "kvswitch" in plugins
    register, dist = plugins["kvswitch"]
    assert register is plugin.register and dist == "kvswitch"
    register()
    register()  # idempotent: SGLang calls plugins once per process, tests more often
    assert "kvswitch" in registry.registered_radix_cache_backends()
    assert registry.get_radix_cache_factory("kvswitch") is plugin._factory


def test_create_tree_cache_routes_to_the_kvswitch_factory():
    """SGLang's router (``create_tree_cache``) reads ``--radix-cache-backend`` and calls the
    registered factory, which is kvswitch's."""
    plugin.register()
    sentinel = mock.Mock(cache_controller=None)
    memory = mock.Mock(radix_cache_backend="kvswitch", enable_hierarchical_cache=False,
                       enable_session_radix_cache=False, radix_eviction_policy="lru")
    ctx = mock.Mock(is_hybrid_ssm=False, is_hybrid_swa=False)
    with mock.patch.object(registry, "get_memory", return_value=memory), \
            mock.patch.object(registry, "get_serving",
                              return_value=mock.Mock(enable_streaming_session=False)), \
            mock.patch("kvswitch.adapters.sglang.backend.kvswitch_radix_cache_factory",
                       return_value=sentinel) as factory:
        assert registry.create_tree_cache(ctx) is sentinel
    factory.assert_called_once_with(ctx)


class TestServerFlagsBuildKvswitchHostPool(unittest.TestCase):
    """The real factory behind the flags: SGLang's UnifiedRadixCache with HiCache, whose
    host pool is kvswitch's (the kit SGLang ships builds the device side on the CPU)."""

    def test_flags_build_sglang_cache_with_kvswitch_host_pool(self):
        kits = pytest.importorskip("sglang.test.kits.unified_radix_cache.fixtures")
        from sglang.srt.mem_cache.registry import TreeCacheBuildContext
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
        from sglang.test.kits.unified_radix_cache.config import CacheConfig

        from kvswitch.adapters.sglang.host_pool import KvswitchMHATokenToKVPoolHost

        plugin.register()
        cfg = CacheConfig(page_size=16, num_layers=2, full_attention_layer_ids=(0, 1),
                          kv_size=256, head_num=2, head_dim=64)
        with mock.patch.object(kits, "get_device", return_value="cpu"):
            cache, _, _ = kits.build_fixture(cfg)
        args = ServerArgs(model_path="dummy", page_size=16, enable_hierarchical_cache=True,
                          radix_cache_backend="kvswitch", hicache_mem_layout="layer_first",
                          hicache_io_backend="direct")
        args._mamba_cache_chunk_size = cache.cache_init_params.page_size
        set_global_server_args_for_scheduler(args)
        worker = mock.Mock()
        ctx = TreeCacheBuildContext(
            server_args=args, params=cache.cache_init_params, is_hybrid_swa=False,
            is_hybrid_ssm=False, enable_hierarchical_cache=True, disable_radix_cache=False,
            tp_worker=worker, model_config=mock.Mock(), tp_size=1, tp_rank=0, tp_group=None)
        built = registry.create_tree_cache(ctx)
        try:
            host = built.cache_controller.mem_pool_host
            pools = [e.host_pool for e in getattr(host, "entries", ())] or [host]
            assert any(isinstance(p, KvswitchMHATokenToKVPoolHost) for p in pools), pools
            worker.register_hicache_layer_transfer_counter.assert_called_once()
        finally:
            built.release_host_resources()

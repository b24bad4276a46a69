"""The ``kvswitch`` radix-cache backend: SGLang's own cache, with kvswitch host pools.

SGLang 0.5.23 picks the host-pool class inside ``build_kv_host_pool``
(``sglang/srt/mem_cache/hybrid_cache/hybrid_pool_assembler.py``): MLA pools get
``MLATokenToKVPoolHost``, MHA pools the class ``get_mha_host_pool_cls`` returns. There is
no argument to pass another class, so the factory builds SGLang's default cache
(``default_radix_cache_factory``) while [`use_kvswitch_host_pools`][] has those two
names in the assembler module pointing at kvswitch's subclasses, and restores them after.
MHA pools SGLang would build with another class (MXFP8 scales, ``head_dim != v_head_dim``)
keep SGLang's class, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["kvswitch_radix_cache_factory", "use_kvswitch_host_pools"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def use_kvswitch_host_pools() -> Iterator[None]:
    """While active, SGLang's ``build_kv_host_pool`` builds kvswitch host pools.

    Not thread-safe (it rebinds two module attributes); SGLang builds its cache once per
    scheduler process, on one thread.
    """
    from sglang.srt.mem_cache.hybrid_cache import hybrid_pool_assembler as asm
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    from kvswitch.adapters.sglang.host_pool import (
        KvswitchMHATokenToKVPoolHost,
        KvswitchMLATokenToKVPoolHost,
    )

    original_mha, original_mla = asm.get_mha_host_pool_cls, asm.MLATokenToKVPoolHost

    def get_mha_host_pool_cls(buffer_info: Any) -> type:
        cls = original_mha(buffer_info)
        if cls is MHATokenToKVPoolHost:
            return KvswitchMHATokenToKVPoolHost
        logger.warning("kvswitch: SGLang picked %s for this KV pool; kvswitch replaces only "
                       "MHATokenToKVPoolHost, so this pool keeps SGLang's copies",
                       cls.__name__)
        return cls

    asm.get_mha_host_pool_cls = get_mha_host_pool_cls
    asm.MLATokenToKVPoolHost = KvswitchMLATokenToKVPoolHost
    try:
        yield
    finally:
        asm.get_mha_host_pool_cls = original_mha
        asm.MLATokenToKVPoolHost = original_mla


def kvswitch_radix_cache_factory(ctx: Any) -> Any:
    """SGLang radix-cache factory (``RadixCacheFactory``) registered as ``kvswitch``.

    Args:
        ctx: SGLang's ``TreeCacheBuildContext``.

    Returns:
        What SGLang's ``default_radix_cache_factory`` returns, its HiCache host pools
        built by kvswitch. Without ``--enable-hierarchical-cache`` no host pool exists and
        kvswitch copies nothing (a warning says so).
    """
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    if not ctx.enable_hierarchical_cache:
        logger.warning("--radix-cache-backend kvswitch without --enable-hierarchical-cache: "
                       "no HiCache host pool is built, kvswitch copies nothing")
    with use_kvswitch_host_pools():
        return default_radix_cache_factory(ctx)

"""kvswitch as SGLang's HiCache host-pool transfer engine (tested with sglang 0.5.23).

Enable it with ``pip install ".[sglang]"`` (from a kvswitch checkout) and
``--enable-hierarchical-cache --radix-cache-backend kvswitch``: the package registers the
``kvswitch`` radix-cache backend through SGLang's plugin entry point (group
``sglang.srt.plugins``), which builds SGLang's own radix cache with
[`KvswitchMHATokenToKVPoolHost`][kvswitch.adapters.sglang.host_pool.KvswitchMHATokenToKVPoolHost]
/ [`KvswitchMLATokenToKVPoolHost`][kvswitch.adapters.sglang.host_pool.KvswitchMLATokenToKVPoolHost]
as its host pool. See the SGLang adapter's page of the docs (``docs/adapters/sglang.md``).

Modules (one concept each): ``extents`` (token slots to block extents), ``geometry``
(KVLayouts over SGLang's buffers), ``transfer`` (the engine: backups, per-layer loads),
``host_pool`` (the host-pool subclasses), ``backend`` (the radix-cache factory) and
``plugin`` (the entry point).

Importing this package imports neither torch nor SGLang; the names below load their
module (and SGLang) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKEND_NAME = "kvswitch"
"""Name of the radix-cache backend (``--radix-cache-backend kvswitch``)."""
TESTED_SGLANG = ">=0.5.23,<0.6"
"""SGLang releases this adapter was tested with (the ``sglang`` extra's range)."""

_LAZY = {
    "KvswitchMHATokenToKVPoolHost": "kvswitch.adapters.sglang.host_pool",
    "KvswitchMLATokenToKVPoolHost": "kvswitch.adapters.sglang.host_pool",
    "LayerTransfer": "kvswitch.adapters.sglang.transfer",
    "build_geometry": "kvswitch.adapters.sglang.geometry",
    "coalesce": "kvswitch.adapters.sglang.extents",
    "kvswitch_radix_cache_factory": "kvswitch.adapters.sglang.backend",
    "use_kvswitch_host_pools": "kvswitch.adapters.sglang.backend",
    "register": "kvswitch.adapters.sglang.plugin",
}

__all__ = ["BACKEND_NAME", "TESTED_SGLANG", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

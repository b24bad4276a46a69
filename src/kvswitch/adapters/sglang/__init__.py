"""kvswitch as SGLang's HiCache host-pool transfer engine (tested with sglang 0.5.23).

Enable it with ``pip install 'kvswitch[sglang]'`` and ``--enable-hierarchical-cache
--radix-cache-backend kvswitch``: the package registers the ``kvswitch`` radix-cache
backend through SGLang's plugin entry point (group ``sglang.srt.plugins``), which builds
SGLang's own radix cache with :class:`KvswitchMHATokenToKVPoolHost` /
:class:`KvswitchMLATokenToKVPoolHost` as its host pool. See ``docs/adapters/sglang.md``.

Modules (one concept each): :mod:`~kvswitch.adapters.sglang.extents` (token slots to
block extents), :mod:`~kvswitch.adapters.sglang.geometry` (KVLayouts over SGLang's
buffers), :mod:`~kvswitch.adapters.sglang.transfer` (the engine: backups, per-layer
loads), :mod:`~kvswitch.adapters.sglang.host_pool` (the host-pool subclasses),
:mod:`~kvswitch.adapters.sglang.backend` (the radix-cache factory) and
:mod:`~kvswitch.adapters.sglang.plugin` (the entry point).

Importing this package imports neither torch nor SGLang; the names below load their
module (and SGLang) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Name of the radix-cache backend (``--radix-cache-backend kvswitch``).
BACKEND_NAME = "kvswitch"
#: SGLang releases this adapter was tested with (the ``kvswitch[sglang]`` extra's range).
TESTED_SGLANG = ">=0.5.23,<0.6"

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

"""The SGLang plugin entry point: registers the ``kvswitch`` radix-cache backend.

``pyproject.toml`` declares ``kvswitch = "kvswitch.adapters.sglang.plugin:register"`` in
the entry-point group ``sglang.srt.plugins``; SGLang's ``load_plugins()`` calls
[`register`][] in every SGLang process. Importing this module is cheap: it imports
neither torch nor SGLang; [`register`][] imports only SGLang's registry, and the
factory loads the host pools (torch) when SGLang builds its cache.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]

_NAME = "kvswitch"


def _factory(ctx: Any) -> Any:
    from kvswitch.adapters.sglang.backend import kvswitch_radix_cache_factory

    return kvswitch_radix_cache_factory(ctx)


def register() -> None:
    """Register ``kvswitch`` with ``sglang.srt.mem_cache.registry`` (idempotent).

    Raises:
        ImportError: SGLang is not installed (SGLang itself calls this, so it is).
    """
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    if get_radix_cache_factory(_NAME) is None:
        register_radix_cache_backend(_NAME, _factory)

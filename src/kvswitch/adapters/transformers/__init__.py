"""Paged KV for transformers causal LMs (Llama, Mistral, Qwen2, Qwen3), for custom loops.

Needs torch and transformers (``pip install ".[transformers]"`` from a kvswitch
checkout); importing this package imports them, ``import kvswitch`` does not.

Parts:

* [`PagedKVCache`][]: per-layer K/V pool tensors
  ``[num_blocks, block_size, num_kv_heads, head_dim]`` and their [`KVLayout`][]
  (for an [`AsyncSwapEngine`][] and a [`HostKVPool`][]).
* [`paged_attention_forward`][], registered in transformers' ``AttentionInterface`` as
  ``"kvswitch_paged"``: reads and writes the pool through each sequence's block table.
* [`PagedModelRunner`][]: one batched forward pass (prefill and decode mixed) given each
  sequence's new tokens, block table and cached length; returns last-token logits.
* [`model_spec`][] / [`UnsupportedModelError`][]: which models are supported.

Example (see ``examples/custom_loop.py`` for continuous batching with swaps)::

    from kvswitch import BlockGroupAllocator
    from kvswitch.adapters.transformers import PagedInput, PagedKVCache, PagedModelRunner

    cache = PagedKVCache.for_model(model, num_blocks=256, block_size=16)
    runner = PagedModelRunner(model, cache)
    gpu = BlockGroupAllocator(cache.num_blocks)
    table = gpu.allocate("a", cache.blocks_for(len(prompt) + 1))
    logits = runner([PagedInput(prompt, table, num_cached=0)])      # prefill
    token = int(logits[0].argmax())
    logits = runner([PagedInput([token], table, num_cached=len(prompt))])  # decode
"""

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"kvswitch.adapters.transformers needs torch and transformers ({e}); install them "
        f"with: pip install 'torch>=2.5' 'transformers>=5.17,<6' (the kvswitch "
        f"extra 'transformers')") from e

from kvswitch.adapters.transformers.attention import (
    ATTENTION_NAME,
    BATCH_KWARG,
    PagedBatch,
    paged_attention_forward,
    register_attention,
)
from kvswitch.adapters.transformers.cache import PagedKVCache
from kvswitch.adapters.transformers.runner import PagedInput, PagedModelRunner
from kvswitch.adapters.transformers.spec import (
    SUPPORTED_MODEL_TYPES,
    ModelSpec,
    UnsupportedModelError,
    model_spec,
)

__all__ = [
    "ATTENTION_NAME",
    "BATCH_KWARG",
    "SUPPORTED_MODEL_TYPES",
    "ModelSpec",
    "PagedBatch",
    "PagedInput",
    "PagedKVCache",
    "PagedModelRunner",
    "UnsupportedModelError",
    "model_spec",
    "paged_attention_forward",
    "register_attention",
]

"""The GPU pool of a transformers model: per-layer paged K and V tensors.

Block ``b`` of layer ``l`` holds the keys of ``block_size`` consecutive tokens in
``key_cache[l][b]`` and their values in ``value_cache[l][b]``, each shaped
``[block_size, num_kv_heads, head_dim]``. Token ``p`` of a sequence with block table ``t``
lives in block ``t[p // block_size]`` at offset ``p % block_size``; its *slot* is
``t[p // block_size] * block_size + p % block_size`` in the flattened view
``[num_blocks * block_size, num_kv_heads, head_dim]``.

The tensors are the regions of a [`KVLayout`][] (K0, V0, K1, V1, ...), taken
through DLPack without copies, so an [`AsyncSwapEngine`][] moves block groups
between them and a [`HostKVPool`][] directly.
"""

from __future__ import annotations

from typing import Any

import torch

from kvswitch.adapters.transformers.spec import ModelSpec, model_spec
from kvswitch.layout import KVLayout

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """Paged K/V tensors for every layer of one model, and their [`KVLayout`][].

    Args:
        config: the model's ``transformers`` config (or the model); checked with
            [`model_spec`][].
        num_blocks: blocks in the pool (> 0).
        block_size: tokens per block (> 0); 16 is vLLM's default.
        dtype: element type of the pool, normally the model's (``torch.float16``,
            ``torch.bfloat16``, ``torch.float32``). Default ``torch.float32``.
        device: where the pool lives (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
            ``torch.device``).

    Attributes:
        spec: the model's [`ModelSpec`][].
        key_cache, value_cache: lists of ``num_layers`` tensors
            ``[num_blocks, block_size, num_kv_heads, head_dim]`` of ``dtype`` on
            ``device``, zero-initialised.
        layout: the pool as a [`KVLayout`][] with ``2 * num_layers``
            regions, ordered layer 0 K, layer 0 V, layer 1 K, ...

    Raises:
        UnsupportedModelError: (a ``ValueError``) the config is not supported.
        ValueError: non-positive ``num_blocks`` or ``block_size``.
        torch.OutOfMemoryError: the pool does not fit on the device.

    Thread safety: the tensors are not synchronised; one decode loop (with one
    SwapManager ordering the swaps against it) writes them.
    """

    def __init__(self, config: Any, num_blocks: int, *, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.spec: ModelSpec = model_spec(config)
        if int(num_blocks) <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if int(block_size) <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (self.num_blocks, self.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []
        for _ in range(self.spec.num_layers):
            self.key_cache.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.value_cache.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.layout = KVLayout.from_tensors(
            [t for kv in zip(self.key_cache, self.value_cache, strict=True) for t in kv])

    @classmethod
    def for_model(cls, model: Any, num_blocks: int, *, block_size: int = 16) -> PagedKVCache:
        """A pool with the dtype and device of ``model``'s parameters.

        Raises: as the constructor.
        """
        param = next(model.parameters())
        return cls(model.config, num_blocks, block_size=block_size, dtype=param.dtype,
                   device=param.device)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for, over all layers and K/V."""
        return self.layout.bytes_per_block

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
        return -(-int(num_tokens) // self.block_size)

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Store the K/V of ``n`` tokens of one layer at their slots.

        Args:
            layer: layer index.
            slots: int64 ``[n]`` slots (see the module docstring), on the pool's device.
            key: ``[n, num_kv_heads, head_dim]``, cast to the pool's dtype.
            value: as ``key``.
        """
        kv_shape = (-1, self.spec.num_kv_heads, self.spec.head_dim)
        self.key_cache[layer].view(kv_shape).index_copy_(0, slots, key.to(self.dtype))
        self.value_cache[layer].view(kv_shape).index_copy_(0, slots, value.to(self.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the K/V at ``slots`` of one layer.

        Args:
            layer: layer index.
            slots: int64 tensor of any shape ``S`` on the pool's device.

        Returns:
            ``(key, value)``, each ``[*S, num_kv_heads, head_dim]`` (copies).
        """
        kv_shape = (-1, self.spec.num_kv_heads, self.spec.head_dim)
        return (self.key_cache[layer].view(kv_shape)[slots],
                self.value_cache[layer].view(kv_shape)[slots])

    def __repr__(self) -> str:
        s = self.spec
        return (f"PagedKVCache({s.model_type}, {s.num_layers} layers, {self.num_blocks} blocks "
                f"x {self.block_size} tokens x {s.num_kv_heads} kv heads x {s.head_dim}, "
                f"{self.dtype}, {self.device})")

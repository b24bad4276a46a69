"""Paged attention for transformers models, registered as ``"kvswitch_paged"``.

transformers (>= 5) looks attention functions up by ``config._attn_implementation`` in its
``AttentionInterface`` and calls them per layer with the new tokens' RoPE-rotated queries,
keys and values. [`paged_attention_forward`][] writes the new keys and values into a
[`PagedKVCache`][] at each token's slot (found through
its sequence's block table) and attends over everything the sequence has in the pool, so
the model keeps no cache of its own (call it with ``use_cache=False``).

What to attend to comes with each forward call as the keyword argument
``kvswitch_batch=`` (a [`PagedBatch`][]), which transformers passes through the model
down to the attention function. Sequences of a batch may have different numbers of cached
and new tokens (prefill and decode mixed): the new tokens are right-padded to a rectangle
and masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvswitch.adapters.transformers.cache import PagedKVCache
from kvswitch.adapters.transformers.spec import UnsupportedModelError

__all__ = ["ATTENTION_NAME", "BATCH_KWARG", "PagedBatch", "paged_attention_forward",
           "register_attention"]

#: Name under which [`paged_attention_forward`][] is registered in transformers'
#: ``AttentionInterface`` (use it with ``model.set_attn_implementation``).
ATTENTION_NAME = "kvswitch_paged"
#: Keyword argument of the model's forward that carries the [`PagedBatch`][].
BATCH_KWARG = "kvswitch_batch"


@dataclass(frozen=True)
class PagedBatch:
    """Where the tokens of one forward pass read and write the pool; built by [`build`][].

    ``B`` sequences, ``T`` = most new tokens of any of them, ``L`` = most tokens (cached
    plus new) of any of them. All tensors are on the pool's device.

    Attributes:
        cache: the pool.
        position_ids: int64 ``[B, T]``: position of each new token in its sequence (padding
            repeats the last position); pass it to the model for RoPE.
        write_index: int64 ``[N]``: indices into the flattened ``[B * T]`` new tokens of
            the ``N`` real (not padding) ones.
        write_slots: int64 ``[N]``: the pool slot of each of them.
        read_slots: int64 ``[B, L]``: the slot of every token of each sequence (0 past
            its end; masked).
        mask: bool ``[B, 1, T, L]``: True where a new token attends to a token (causal
            within its own sequence; padding rows attend to slot 0 only, so no row is
            empty).
        num_new: int64 ``[B]`` new tokens per sequence (on the CPU).
    """

    cache: PagedKVCache
    position_ids: torch.Tensor
    write_index: torch.Tensor
    write_slots: torch.Tensor
    read_slots: torch.Tensor
    mask: torch.Tensor
    num_new: npt.NDArray[np.int64]

    @classmethod
    def build(cls, cache: PagedKVCache, num_cached: Sequence[int], num_new: Sequence[int],
              block_tables: Sequence[npt.ArrayLike]) -> PagedBatch:
        """Slots and mask for sequences that hold ``num_cached`` tokens in the pool and
        append ``num_new`` tokens.

        Args:
            cache: the pool.
            num_cached: per sequence, tokens whose KV is in the pool already (>= 0):
                positions ``[0, num_cached)``.
            num_new: per sequence, tokens of this forward pass (>= 1): positions
                ``[num_cached, num_cached + num_new)``.
            block_tables: per sequence, integer block ids in token order covering at least
                ``num_cached + num_new`` tokens (extra entries are ignored).

        Raises:
            ValueError: no sequences, lengths that disagree, a negative ``num_cached``, a
                ``num_new`` < 1, a block table too short or holding ids outside
                ``[0, cache.num_blocks)``, or two sequences writing the same slot.
        """
        ctx = np.asarray(num_cached, dtype=np.int64).reshape(-1)
        new = np.asarray(num_new, dtype=np.int64).reshape(-1)
        if len(block_tables) == 0 or not (ctx.size == new.size == len(block_tables)):
            raise ValueError(f"need one num_cached, num_new and block table per sequence, got "
                             f"{ctx.size}, {new.size} and {len(block_tables)}")
        if (ctx < 0).any() or (new < 1).any():
            raise ValueError("num_cached must be >= 0 and num_new >= 1 for every sequence")
        bs = cache.block_size
        total = ctx + new
        needed = -(-total // bs)
        tables = np.zeros((ctx.size, int(needed.max())), dtype=np.int64)
        for b, table in enumerate(block_tables):
            t = np.asarray(table).reshape(-1)
            if t.size and t.dtype.kind not in "iu":
                raise ValueError(f"sequence {b}: block table must be integers, got {t.dtype}")
            if t.size < needed[b]:
                raise ValueError(f"sequence {b}: block table holds {t.size} blocks but "
                                 f"{total[b]} tokens need {needed[b]}")
            t = t[: needed[b]].astype(np.int64)
            if t.size and (t.min() < 0 or t.max() >= cache.num_blocks):
                raise ValueError(f"sequence {b}: block ids must lie in [0, {cache.num_blocks})")
            tables[b, : needed[b]] = t
        T, L = int(new.max()), int(total.max())
        pos = np.arange(L)
        read = tables[:, pos // bs] * bs + pos % bs
        read[pos[None, :] >= total[:, None]] = 0
        qpos = ctx[:, None] + np.arange(T)[None, :]
        valid = np.arange(T)[None, :] < new[:, None]
        qpos = np.minimum(qpos, total[:, None] - 1)
        write_all = np.take_along_axis(tables, qpos // bs, axis=1) * bs + qpos % bs
        write_index = np.flatnonzero(valid.reshape(-1))
        write_slots = write_all.reshape(-1)[write_index]
        if np.unique(write_slots).size != write_slots.size:
            raise ValueError("two tokens of the batch would write the same slot: sequences "
                             "share blocks")
        mask = (pos[None, None, :] <= qpos[:, :, None]) & valid[:, :, None]
        mask[~valid, 0] = True
        dev = cache.device

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

        return cls(cache=cache, position_ids=t(qpos), write_index=t(write_index),
                   write_slots=t(write_slots), read_slots=t(read), mask=t(mask[:, None]),
                   num_new=new)

    @property
    def batch_size(self) -> int:
        return int(self.num_new.size)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over the pool for one layer (the ``AttentionInterface`` signature).

    Args:
        module: the attention module; its ``layer_idx`` selects the pool tensors.
        query: ``[B, num_heads, T, head_dim]``, RoPE applied.
        key: ``[B, num_kv_heads, T, head_dim]`` of the new tokens, RoPE applied; written to
            the pool before attending.
        value: as ``key``, without RoPE.
        attention_mask: ignored (the mask comes from the batch).
        scaling: softmax scale (default ``head_dim ** -0.5``).
        dropout: must be 0 (inference only).
        **kwargs: ``kvswitch_batch``, the [`PagedBatch`][] of this forward pass.

    Returns:
        ``(output, None)`` with output ``[B, T, num_heads, head_dim]`` in ``query``'s dtype.

    Raises:
        RuntimeError: called without ``kvswitch_batch`` (e.g. ``model.generate()`` on a
            model switched to this attention), or with shapes that do not match the batch.
        UnsupportedModelError: a sliding window or soft-capping is requested.
        ValueError: dropout > 0.
    """
    batch: PagedBatch | None = kwargs.get(BATCH_KWARG)
    if batch is None:
        raise RuntimeError(
            f"attention {ATTENTION_NAME!r} needs the keyword argument {BATCH_KWARG}= (a "
            f"PagedBatch); run the model through kvswitch.adapters.transformers."
            f"PagedModelRunner, or switch it back with model.set_attn_implementation('sdpa')")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise UnsupportedModelError(f"{ATTENTION_NAME}: sliding windows and soft-capping are "
                                    f"not supported")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: attention dropout is not supported (inference "
                         f"only; call model.eval())")
    B, num_kv_heads, T, head_dim = key.shape
    if batch.batch_size != B or batch.position_ids.shape[1] != T:
        raise RuntimeError(f"{ATTENTION_NAME}: key of shape {list(key.shape)} does not match "
                           f"the batch ({batch.batch_size} sequences, {batch.position_ids.shape[1]}"
                           f" new tokens)")
    layer = module.layer_idx
    flat = (B * T, num_kv_heads, head_dim)
    new_k = key.transpose(1, 2).reshape(flat).index_select(0, batch.write_index)
    new_v = value.transpose(1, 2).reshape(flat).index_select(0, batch.write_index)
    batch.cache.write(layer, batch.write_slots, new_k, new_v)
    k, v = batch.cache.gather(layer, batch.read_slots)  # [B, L, kv_heads, head_dim]
    k = k.transpose(1, 2).to(query.dtype)
    v = v.transpose(1, 2).to(query.dtype)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=batch.mask, scale=scaling,
                                         enable_gqa=query.shape[1] != num_kv_heads)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register [`paged_attention_forward`][] with transformers' ``AttentionInterface``
    under [`ATTENTION_NAME`][] (idempotent) and return the name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME

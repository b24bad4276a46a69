"""One batched forward pass of a transformers causal LM over paged KV.

[`PagedModelRunner`][] is the engine-facing part of the adapter: given, for each
sequence of a batch, its new token ids, its block table and how many of its tokens are in
the pool already, it runs the model once (prefill and decode mixed) and returns the logits
of each sequence's last new token. Block tables come from the caller: a
[`BlockGroupAllocator`][] directly, or a ``SwapManager`` that also moves
preempted sequences to the host pool and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kvswitch.adapters.transformers.attention import (
    BATCH_KWARG,
    PagedBatch,
    register_attention,
)
from kvswitch.adapters.transformers.cache import PagedKVCache
from kvswitch.adapters.transformers.spec import model_spec

__all__ = ["PagedInput", "PagedModelRunner"]


@dataclass(frozen=True)
class PagedInput:
    """One sequence's part of a forward pass.

    Attributes:
        token_ids: the new tokens (>= 1), int array-like ``[n]`` (list, NumPy, tensor).
        block_table: int array-like of block ids in token order covering at least
            ``num_cached + n`` tokens.
        num_cached: tokens of the sequence whose KV is in the pool already (>= 0); the new
            tokens get positions ``num_cached, num_cached + 1, ...``.
    """

    token_ids: Any
    block_table: npt.ArrayLike
    num_cached: int


class PagedModelRunner:
    """Runs a transformers causal LM of the Llama family over a [`PagedKVCache`][].

    Construction switches the model to the ``"kvswitch_paged"`` attention
    (``model.set_attn_implementation``) and to eval mode; from then on the model runs only
    through [`forward`][] (a plain ``model(...)`` or ``model.generate()`` raises
    RuntimeError until ``model.set_attn_implementation("sdpa")``).

    Args:
        model: e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
            ``Qwen3ForCausalLM``.
        cache: a pool made for this model's config, on the model's device.

    Raises:
        UnsupportedModelError: (a ``ValueError``) the model is not supported.
        ValueError: the pool's geometry or device does not match the model.

    Thread safety: none; call it from one decode loop (the model's forward is not
    reentrant, and the runner writes the pool).
    """

    def __init__(self, model: Any, cache: PagedKVCache):
        spec = model_spec(model.config)
        if spec != cache.spec:
            raise ValueError(f"the pool was made for {cache.spec}, the model is {spec}")
        device = next(model.parameters()).device
        if device != cache.device:
            raise ValueError(f"the model is on {device}, the pool on {cache.device}")
        self.model = model
        self.cache = cache
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()
        if self.base is model or self.lm_head is None:
            raise ValueError(f"{type(model).__name__} is not a causal LM with a language-model "
                             f"head (use e.g. AutoModelForCausalLM)")
        model.eval()
        model.set_attn_implementation(register_attention())

    @torch.no_grad()
    def forward(self, inputs: Sequence[PagedInput]) -> torch.Tensor:
        """Run the new tokens of every input through the model, writing their KV to the
        pool, and return the logits of each input's last new token.

        The KV of positions ``[0, num_cached)`` must already be in the pool at the blocks
        of ``block_table`` (written by earlier calls or swapped in). No copy between
        sequences may be in flight on these blocks.

        Args:
            inputs: one [`PagedInput`][] per sequence (>= 1), no two sharing a block.

        Returns:
            ``[len(inputs), vocab_size]`` logits on the pool's device, in the model's dtype.

        Raises:
            ValueError: an empty batch, empty ``token_ids``, or the errors of
                [`PagedBatch.build`][].
        """
        if not inputs:
            raise ValueError("forward needs at least one input")
        ids = [torch.as_tensor(np.asarray(i.token_ids) if not torch.is_tensor(i.token_ids)
                               else i.token_ids, dtype=torch.long).reshape(-1) for i in inputs]
        if any(t.numel() == 0 for t in ids):
            raise ValueError("every input needs at least one new token")
        batch = PagedBatch.build(self.cache, [i.num_cached for i in inputs],
                                 [t.numel() for t in ids], [i.block_table for i in inputs])
        T = batch.position_ids.shape[1]
        input_ids = torch.zeros((len(ids), T), dtype=torch.long)
        for b, t in enumerate(ids):
            input_ids[b, : t.numel()] = t
        out = self.base(input_ids=input_ids.to(self.cache.device),
                        position_ids=batch.position_ids, use_cache=False,
                        **{BATCH_KWARG: batch})
        hidden = out.last_hidden_state  # [B, T, hidden]
        last = torch.as_tensor(batch.num_new - 1, device=hidden.device)
        return self.lm_head(hidden[torch.arange(len(ids), device=hidden.device), last])

    __call__ = forward

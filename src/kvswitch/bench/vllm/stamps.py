"""What every GPU block of the vLLM bench should hold: a stamp per token and layer.

The bench runs no model, so the KV cache holds *stamps* instead of keys and values: the
model-runner stand-in writes, for every token it computes, one stamp per layer into the
token's slot of its GPU block, a function of the conversation and the token's position in
it. The KV of a prefix is a function of its tokens, and a conversation's token at a
position is always the same token (the stand-in samples it from the conversation's fixed
sequence), so equal stamps mean equal KV: a block that vLLM reuses from its prefix cache,
or loads from the CPU cache, must hold exactly the stamps its request expects there.

Layout of a token's slot (``slot_words`` int64, 4 by default: 32 bytes, the page of a
16-token block with one KV head of 8 fp16 values, K and V): word ``w`` of layer ``l`` holds
``stamp(conversation, position) ^ (l << 48) ^ (w << 40)``, where ``stamp = (conversation +
1) << 20 | position``: a copy that moves the wrong block, layer or token shows.

Not thread-safe: one loop writes and checks.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["KVStamps", "StampMismatchError"]

#: Positions fit 20 bits (the stamps of one conversation: up to ~1M tokens).
_POSITION_BITS = 20


class StampMismatchError(AssertionError):
    """A GPU block does not hold the KV its request expects (a correctness failure)."""


class KVStamps:
    """The KV cache of the vLLM bench: stamps in CPU tensors laid out as vLLM's.

    Args:
        num_layers: attention layers (one KV tensor each).
        num_blocks: GPU blocks.
        block_size: tokens per block.
        slot_words: int64 words per token and layer (>= 1).

    Attributes:
        kv: int64 tensor ``[num_layers, num_blocks, block_size, slot_words]``.
        page_bytes: bytes of one block of one layer (``block_size * slot_words * 8``).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 slot_words: int = 4) -> None:
        if min(num_layers, num_blocks, block_size, slot_words) < 1:
            raise ValueError("num_layers, num_blocks, block_size and slot_words must be >= 1")
        self.block_size = block_size
        self.kv = torch.zeros((num_layers, num_blocks, block_size, slot_words),
                              dtype=torch.int64)
        self.page_bytes = block_size * slot_words * 8
        salt = (torch.arange(num_layers, dtype=torch.int64)[:, None, None] << 48) ^ (
            torch.arange(slot_words, dtype=torch.int64)[None, None, :] << 40)
        self._salt = salt  # [layers, 1, words]
        self._weights = torch.arange(1, num_layers * block_size * slot_words + 1,
                                     dtype=torch.int64).reshape(num_layers, 1, -1) * 0x9E3779B1

    def layer_tensors(self) -> list[torch.Tensor]:
        """One int8 view ``[num_blocks, page_bytes]`` per layer (vLLM's block-outermost
        layer layout: block ``b`` of layer ``l`` at ``l * num_blocks * page + b * page``)."""
        n = self.kv.shape[1]
        return [self.kv[layer].view(torch.int8).view(n, self.page_bytes)
                for layer in range(self.kv.shape[0])]

    @staticmethod
    def _stamp(conversation: int, positions: npt.NDArray[np.int64]) -> torch.Tensor:
        if positions.size and int(positions.max()) >= 1 << _POSITION_BITS:
            raise ValueError("a conversation longer than 2**20 tokens")
        return torch.from_numpy(((conversation + 1) << _POSITION_BITS) | positions)

    def write(self, conversation: int, block_table: list[int], start: int, end: int) -> None:
        """Stamp tokens ``[start, end)`` of ``conversation`` into their slots of
        ``block_table`` (token ``p`` in block ``block_table[p // block_size]``)."""
        self.write_many([(conversation, block_table, start, end)])

    def write_many(self, spans: list[tuple[int, list[int], int, int]]) -> None:
        """[`write`][] of several ``(conversation, block_table, start, end)`` spans in
        one tensor operation (a step's scheduled tokens)."""
        blocks, slots, stamps = [], [], []
        for conversation, block_table, start, end in spans:
            if end <= start:
                continue
            pos = np.arange(start, end, dtype=np.int64)
            blocks.append(np.asarray(block_table, dtype=np.int64)[pos // self.block_size])
            slots.append(pos % self.block_size)
            stamps.append(self._stamp(conversation, pos))
        if not blocks:
            return
        self.kv[:, torch.from_numpy(np.concatenate(blocks)),
                torch.from_numpy(np.concatenate(slots)), :] = (
            torch.cat(stamps)[None, :, None] ^ self._salt)

    def _expected(self, conversation: int, first_block: int, num_blocks: int) -> torch.Tensor:
        """``[layers, num_blocks, block_size, words]`` stamps of logical blocks
        ``[first_block, first_block + num_blocks)``, all tokens."""
        bs = self.block_size
        pos = np.arange(first_block * bs, (first_block + num_blocks) * bs, dtype=np.int64)
        stamp = self._stamp(conversation, pos).reshape(num_blocks, bs)
        return stamp[None, :, :, None] ^ self._salt[:, :, None, :]

    def check(self, conversation: int, block_table: list[int], num_tokens: int,
              what: str) -> None:
        """Raise [`StampMismatchError`][] unless tokens ``[0, num_tokens)`` of the
        conversation hold their stamps in ``block_table``."""
        if num_tokens <= 0:
            return
        full, tail = divmod(num_tokens, self.block_size)
        if full:
            self.check_blocks(conversation, block_table[:full], 0, what)
        if tail:
            got = self.kv[:, block_table[full], :tail, :]
            want = self._expected(conversation, full, 1)[:, 0, :tail, :]
            if not torch.equal(got, want):
                raise StampMismatchError(f"{what}: the last, partial block (logical block {full}, "
                                    f"GPU block {block_table[full]}) of conversation "
                                    f"{conversation} does not hold its KV")

    def check_blocks(self, conversation: int, gpu_blocks: list[int] | npt.NDArray[np.int64],
                     first_block: int, what: str) -> None:
        """Raise [`StampMismatchError`][] unless GPU blocks ``gpu_blocks`` hold, whole, the
        conversation's logical blocks ``first_block, first_block + 1, ...``."""
        ids = torch.as_tensor(np.asarray(gpu_blocks, dtype=np.int64))
        if ids.numel() == 0:
            return
        got = self.kv[:, ids]
        want = self._expected(conversation, first_block, int(ids.numel()))
        ok = (got == want).flatten(2).all(dim=2).all(dim=0)
        if not bool(ok.all()):
            bad = int(torch.nonzero(~ok)[0, 0])
            raise StampMismatchError(
                f"{what}: GPU block {int(ids[bad])} does not hold logical block "
                f"{first_block + bad} of conversation {conversation} "
                f"({int((~ok).sum())} of {ids.numel()} blocks differ)")

    def checksums(self, gpu_blocks: list[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """A checksum per GPU block over all its layers (int64 ``[len(gpu_blocks)]``): a
        weighted sum of its words, so a moved word or block changes it."""
        ids = torch.as_tensor(np.asarray(gpu_blocks, dtype=np.int64))
        words = self.kv[:, ids].reshape(self.kv.shape[0], ids.numel(), -1)
        weights = self._weights.reshape(self.kv.shape[0], 1, -1)
        return (words * weights).sum(dim=(0, 2)).numpy()

    def corrupt(self, gpu_blocks: list[int] | npt.NDArray[np.int64]) -> None:
        """Overwrite GPU blocks with garbage (a torn copy, for failure injection)."""
        ids = torch.as_tensor(np.asarray(gpu_blocks, dtype=np.int64))
        self.kv[:, ids] = -0x5A5A5A5A5A5A5A5B

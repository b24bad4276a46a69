"""Token indices of a SGLang transfer, coalesced into kvswitch block extents.

SGLang's HiCache hands a host pool two index vectors of equal length per transfer: host
token slots and device token slots (``host_indices[i]`` holds the KV of
``device_indices[i]``). kvswitch copies extents ``(src_start, dst_start, length)`` of
blocks, one copy per extent and region, so consecutive slots that are consecutive on both
sides become one extent. Pure NumPy: no torch, no SGLang.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_index_array", "coalesce"]


def as_index_array(indices: Any, what: str) -> np.ndarray:
    """A 1-D int64 NumPy array of token slots (a torch tensor on any device, a NumPy array
    or a sequence of ints).

    Args:
        indices: the slots; a CUDA tensor is copied to the host (``.cpu()``, which waits
            for the stream that produced it).
        what: name used in error messages.

    Returns:
        int64 array ``[n]`` (a view where no conversion is needed).

    Raises:
        TypeError: not integers.
        ValueError: not one-dimensional.
    """
    if hasattr(indices, "detach") and hasattr(indices, "cpu"):  # torch.Tensor, lazily
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {list(arr.shape)}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def coalesce(src: np.ndarray, dst: np.ndarray, block_tokens: int = 1) -> np.ndarray:
    """Extents ``[n, 3]`` of ``(src_block, dst_block, num_blocks)`` that copy slot
    ``src[i]`` to slot ``dst[i]`` for every ``i``.

    Runs of slots that are consecutive on both sides (in the order given) become one
    extent; nothing is reordered, so a transfer listed in SGLang's order coalesces as far
    as its own slot order allows. With ``block_tokens > 1`` (a kvswitch block is one SGLang
    page) every run must start on a page boundary and cover whole pages on both sides.

    Args:
        src: int64 ``[n]`` source token slots.
        dst: int64 ``[n]`` destination token slots.
        block_tokens: tokens per kvswitch block (1, or SGLang's page size).

    Returns:
        int64 ``[m, 3]``, ``m <= n / block_tokens``; in blocks of ``block_tokens`` slots.

    Raises:
        ValueError: lengths differ, negative slots, or (``block_tokens > 1``) a run that
            is not page-aligned on both sides. Nothing is copied by this function.
    """
    if src.shape != dst.shape:
        raise ValueError(f"host and device index vectors differ in length: {src.shape[0]} "
                         f"vs {dst.shape[0]}")
    n = src.shape[0]
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if min(int(src.min()), int(dst.min())) < 0:
        raise ValueError("token indices must be >= 0")
    # A run breaks where either side is not the previous slot + 1.
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [n])))
    pairs = np.empty((starts.shape[0], 3), dtype=np.int64)
    pairs[:, 0] = src[starts]
    pairs[:, 1] = dst[starts]
    pairs[:, 2] = lengths
    if block_tokens > 1:
        if (pairs % block_tokens).any():
            bad = int(np.flatnonzero((pairs % block_tokens).any(axis=1))[0])
            s, d, ln = (int(v) for v in pairs[bad])
            raise ValueError(
                f"a run of {ln} token slots (source {s}, destination {d}) is not whole "
                f"pages of {block_tokens} tokens on both sides; SGLang transfers whole, "
                f"page-aligned pages")
        pairs //= block_tokens
    return pairs

"""The benchmark's cost model: modelled model-step time from a model and a GPU preset.

The swaps in ``kvswitch bench`` are real copies; the model's compute is not run. Each
iteration's step time is modelled as a roofline over the whole batch:

    step_s = max(bytes_read / (hbm_bytes_per_s * efficiency),
                 flops / (bf16_flops * efficiency))

* ``bytes_read``: every weight once (``weight_bytes``) plus the KV of every token each
  decoding sequence attends to (``kv_bytes_per_token * context``) and the prefix KV each
  prefill reads.
* ``flops``: ``2 * params`` per token computed (decode and prefill; the dense
  multiply-accumulates) plus attention, ``4 * layers * q_heads * head_dim`` per (query,
  key) pair (QK^T and PV).

Kernel launch, sampling and scheduler overhead are not modelled. ``efficiency`` (0.7 by
default) is an assumption, not a measurement: the fraction of peak that kernels reach.

Sources: model shapes from the models' published ``config.json`` (Meta Llama 3 8B,
Llama 3.2 1B, Qwen2.5 32B on the Hugging Face Hub); peak figures from NVIDIA's datasheets
(A10: 600 GB/s GDDR6, 125 TFLOPS dense BF16; A100 80GB SXM: 2,039 GB/s, 312 TFLOPS;
H100 SXM: 3.35 TB/s, 989 TFLOPS; H200 SXM: 4.8 TB/s, 989 TFLOPS). The copies' time comes
from the link model ([`kvswitch.bench.link_model`][]).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU_PRESETS", "MODEL_PRESETS", "CostModel", "GpuPreset", "ModelPreset"]


@dataclass(frozen=True)
class ModelPreset:
    """A decoder-only transformer's sizes (what the KV pool and the cost model need)."""

    name: str
    num_params: float  #: parameters
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  #: bf16 weights and KV

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def num_regions(self) -> int:
        """Regions of a vLLM-style per-layer KV pool: K and V of each layer."""
        return 2 * self.num_layers

    def region_block_bytes(self, block_size: int) -> int:
        """Bytes of one block in one region (one layer's K or V), ``block_size`` tokens."""
        return block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("llama-3-8b", 8.03e9, 32, 32, 8, 128),
        ModelPreset("qwen-2.5-32b", 32.5e9, 64, 40, 8, 128),
        ModelPreset("small", 1.24e9, 16, 32, 8, 64),  # Llama 3.2 1B
    )
}


@dataclass(frozen=True)
class GpuPreset:
    """Peak figures of one GPU (vendor datasheet)."""

    name: str
    hbm_bytes_per_s: float
    bf16_flops: float  #: dense tensor-core BF16, FLOP/s


GPU_PRESETS: dict[str, GpuPreset] = {
    p.name: p
    for p in (
        GpuPreset("a10", 600e9, 125e12),
        GpuPreset("a100", 2039e9, 312e12),
        GpuPreset("h100", 3.35e12, 989e12),
        GpuPreset("h200", 4.8e12, 989e12),
    )
}


@dataclass(frozen=True)
class CostModel:
    """Modelled seconds of one model step (see the module docstring).

    Args:
        model: the model preset.
        gpu: the GPU preset.
        efficiency: fraction of peak bandwidth and FLOP rate reached (0 < e <= 1).

    Raises:
        ValueError: ``efficiency`` out of range.
    """

    model: ModelPreset
    gpu: GpuPreset
    efficiency: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 < self.efficiency <= 1.0:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")

    def migrate_s(self, nbytes: float) -> float:
        """Modelled seconds of a device-to-device move of ``nbytes`` bytes of KV (GPU-pool
        compaction): each byte is read and written once in HBM, at ``efficiency`` of
        peak. An assumption, not a measurement (see [`step_s`][])."""
        return 2.0 * nbytes / (self.gpu.hbm_bytes_per_s * self.efficiency)

    def step_s(self, decode_context_tokens: int, num_decodes: int,
               prefills: list[tuple[int, int]] | tuple[()] = ()) -> float:
        """Seconds of one iteration.

        Args:
            decode_context_tokens: sum over decoding sequences of the tokens each attends
                to (its context including the new token).
            num_decodes: decoding sequences (one new token each).
            prefills: ``(new_tokens, prefix_tokens)`` per sequence prefilled this step:
                its new input (or recomputed history plus input) and the cached prefix it
                attends to.

        Returns:
            Seconds; 0.0 for an empty step.
        """
        if num_decodes == 0 and not prefills:
            return 0.0
        m = self.model
        attn_per_pair = 4 * m.num_layers * m.num_q_heads * m.head_dim
        tokens = num_decodes
        kv_tokens_read = decode_context_tokens
        flops = attn_per_pair * decode_context_tokens
        for new, prefix in prefills:
            tokens += new
            kv_tokens_read += prefix
            # Each new token attends to the prefix and to the new tokens before it.
            flops += attn_per_pair * new * (prefix + (new + 1) / 2)
        flops += 2 * m.num_params * tokens
        bytes_read = m.weight_bytes + m.kv_bytes_per_token * kv_tokens_read
        return max(bytes_read / (self.gpu.hbm_bytes_per_s * self.efficiency),
                   flops / (self.gpu.bf16_flops * self.efficiency))

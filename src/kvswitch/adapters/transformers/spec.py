"""Which transformers models the paged adapter supports, and the KV geometry they need.

Only decoder-only causal LMs of the Llama family are supported: every layer uses full,
causal self-attention over RoPE-rotated keys, with ``num_key_value_heads`` KV heads of
``head_dim`` elements (GQA/MQA allowed). Anything else (sliding windows, hybrid or linear
attention layers, encoder-decoders, ALiBi, soft-capping) is rejected with
[`UnsupportedModelError`][] before any memory is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelSpec", "UnsupportedModelError", "model_spec"]

#: ``config.model_type`` values whose attention the adapter reproduces exactly.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class UnsupportedModelError(ValueError):
    """A model or config the paged adapter cannot run; the message says what and why."""


@dataclass(frozen=True)
class ModelSpec:
    """KV geometry of a supported model.

    Attributes:
        model_type: ``config.model_type``, one of [`SUPPORTED_MODEL_TYPES`][].
        num_layers: decoder layers (each gets a K and a V pool tensor).
        num_attention_heads: query heads.
        num_kv_heads: key/value heads (``num_attention_heads`` is a multiple of it).
        head_dim: elements per head.
        vocab_size: logits per token.
    """

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def model_spec(config: Any) -> ModelSpec:
    """Check that ``config`` describes a supported model and return its KV geometry.

    Args:
        config: a ``transformers.PretrainedConfig`` (or a model, whose ``.config`` is used).

    Returns:
        The [`ModelSpec`][].

    Raises:
        UnsupportedModelError: (a ``ValueError``) the model type is not of the Llama family,
            it is an encoder-decoder or not causal, a layer uses sliding-window or other
            non-full attention, logits or attention are soft-capped, or the head counts
            are inconsistent.
    """
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the kvswitch transformers "
            f"adapter; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} (decoder-only, "
            f"full causal attention with RoPE)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model_type}: encoder-decoder models are not supported")
    if not getattr(config, "is_causal", True):
        raise UnsupportedModelError(f"{model_type}: config.is_causal is False; the paged "
                                    f"attention is causal only")
    window = getattr(config, "sliding_window", None)
    if window is not None:
        raise UnsupportedModelError(
            f"{model_type}: sliding-window attention (config.sliding_window={window}) is not "
            f"supported; the paged attention attends to the whole context. Set "
            f"config.sliding_window = None only if the model uses full attention (e.g. "
            f"Mistral 7B v0.2 and later).")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedModelError(
                f"{model_type}: layer types {other} are not supported; every layer must use "
                f"full attention")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise UnsupportedModelError(f"{model_type}: {name} is not supported")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if kv_heads <= 0 or heads % kv_heads:
        raise UnsupportedModelError(
            f"{model_type}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(model_type=model_type, num_layers=int(config.num_hidden_layers),
                     num_attention_heads=heads, num_kv_heads=kv_heads,
                     head_dim=int(head_dim), vocab_size=int(config.vocab_size))

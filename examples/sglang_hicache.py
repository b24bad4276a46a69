"""SGLang with kvswitch as its HiCache host pool, end to end, on any machine.

Starts SGLang's engine (``sgl.Engine``) with the hierarchical cache on and
``radix_cache_backend="kvswitch"`` over a tiny random-weight GPT-2 written to a temporary
directory (nothing is downloaded), then:

1. serves a prompt (its KV is computed, and written through to the host pool);
2. serves other prompts until that prompt's KV has been evicted from the device pool;
3. serves the prompt again: SGLang finds its prefix in the host pool and kvswitch copies it
   back into the device pool, layer by layer;
4. checks that the greedy tokens and their logprobs are those of the first serving.

It prints what SGLang reports (``cached_tokens_details``: tokens reused from the device
and from the host pool) and kvswitch's own log lines about the copies.

Needs sglang 0.5.23 (``pip install ".[sglang]"`` from a kvswitch checkout; SGLang's wheels
need glibc >= 2.34). Runs on the CPU (the default; SGLang's start-up takes a minute or two
on a small machine) or with ``--device cuda`` on GPU 0. The CI runs it on the CPU through
``tests/test_sglang_e2e.py``.

Run: python examples/sglang_hicache.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

PAGE = 16  # tokens per page (SGLang's page_size)
DEVICE_TOKENS = 512  # the device KV pool: small, so a few prompts evict the first one
PROMPT_TOKENS = 160
VOCAB = 256


def write_tiny_gpt2(path: str, seed: int = 0) -> None:
    """A 2-layer GPT-2 with random weights and no tokenizer, saved to ``path``.

    GPT-2, not Llama: SGLang's rotary embedding imports vLLM on the CPU, GPT-2 has none.
    ``initializer_range`` is large so that the next token depends on the context (with
    GPT-2's default the random model answers the same token whatever it reads).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=1024,
                        bos_token_id=0, eos_token_id=1, initializer_range=0.5)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)


def engine_args(model_dir: str, device: str) -> dict[str, Any]:
    """``sgl.Engine`` arguments: HiCache with kvswitch's host pool (what
    ``python -m sglang.launch_server --enable-hierarchical-cache --radix-cache-backend
    kvswitch`` sets)."""
    return {
        "model_path": model_dir,
        "device": device,
        "enable_hierarchical_cache": True,
        "radix_cache_backend": "kvswitch",
        "hicache_ratio": 4.0,  # host pool = 4 x the device pool
        "page_size": PAGE,
        "max_total_tokens": DEVICE_TOKENS,
        "skip_tokenizer_init": True,  # prompts are token ids
        "dtype": "float32",
        "random_seed": 0,
        "disable_cuda_graph": True,
        "mem_fraction_static": 0.05 if device == "cpu" else 0.3,
        "log_level": "info",  # kvswitch's INFO lines about its copies are printed
    }


@dataclass
class Served:
    """One served request: greedy output tokens, their logprobs, and where its cached
    prefix came from (SGLang's ``cached_tokens_details``: ``device``/``host`` tokens)."""

    tokens: list[int]
    logprobs: list[float]
    cached: dict[str, int]


def serve(engine: Any, prompt: list[int], max_new_tokens: int = 8) -> Served:
    out = engine.generate(input_ids=prompt, return_logprob=True,
                          sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens,
                                           "ignore_eos": True})
    meta = out["meta_info"]
    return Served(tokens=list(out["output_ids"]),
                  logprobs=[float(lp) for lp, _, _ in meta["output_token_logprobs"]],
                  cached=dict(meta.get("cached_tokens_details") or {}))


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def evict(engine: Any, seed: int, n: int = 6) -> None:
    """Serve ``n`` other prompts: together they need more than the device pool holds, so
    the least recently used KV (the earlier prompt's) leaves it; its host copy stays."""
    for other in prompts(seed, n):
        serve(engine, other)


def round_trip(engine: Any, prompt: list[int], seed: int) -> tuple[Served, Served]:
    """Serve ``prompt``, evict it to the host pool, serve it again: (first, second)."""
    first = serve(engine, prompt)
    evict(engine, seed)
    return first, serve(engine, prompt)


def max_logprob_difference(a: Served, b: Served) -> float:
    return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    try:
        import sglang as sgl
    except ImportError as e:
        print(f"sglang_hicache.py: skipped: SGLang is not installed ({e}); "
              f"pip install '.[sglang]' from a kvswitch checkout")
        return 0

    with tempfile.TemporaryDirectory() as model_dir:
        write_tiny_gpt2(model_dir)
        engine = sgl.Engine(**engine_args(model_dir, args.device))
        try:
            first, second = round_trip(engine, prompts(seed=1, n=1)[0], seed=2)
        finally:
            engine.shutdown()
    print(f"first serving:  tokens {first.tokens}, cached prefix {first.cached}")
    print(f"second serving: tokens {second.tokens}, cached prefix {second.cached}")
    diff = max_logprob_difference(first, second)
    ok = second.cached.get("host", 0) > 0 and first.tokens == second.tokens and diff < 1e-4
    print(f"prefix loaded from the host pool: {second.cached.get('host', 0)} tokens; "
          f"same tokens: {first.tokens == second.tokens}; largest logprob difference "
          f"{diff:.2e}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""vLLM with kvswitch as its KV offloading spec: preempted and repeated prompts reload
their KV from CPU blocks that kvswitch stores in per-request contiguous extents.

Needs vLLM 0.32 (``pip install ".[vllm]"`` from a kvswitch checkout) and a CUDA GPU.
It downloads nothing: the model is a small random-weight Llama (``load_format="dummy"``)
described by a local ``config.json`` written to a temporary directory, and prompts are
token ids (``skip_tokenizer_init=True``). Where there is no GPU (or no vLLM) it says why
and exits 0.

Not yet run on a GPU (written and checked on a CPU-only machine, where it exits 0).

Run: python examples/vllm_offload.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

CONFIG = {  # a 2-layer Llama, random weights
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def why_not() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install '.[vllm]' from a kvswitch checkout)"
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vLLM is not installed ({e}); pip install '.[vllm]' from a kvswitch checkout"
    if not torch.cuda.is_available():
        return ("no CUDA GPU: vLLM's OffloadingConnector moves KV between GPU and CPU "
                "memory, so this example needs a GPU. The adapter's transfer path is "
                "tested on CPU tensors by tests/test_vllm_adapter.py, and vLLM's own "
                "offloading suites run on CPU with kvswitch substituted by "
                ".ci/vllm_suite.sh")
    return None


def main() -> int:
    reason = why_not()
    if reason is not None:
        print(f"vllm_offload.py: skipped: {reason}")
        return 0
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory() as model_dir:
        Path(model_dir, "config.json").write_text(json.dumps(CONFIG))
        llm = LLM(
            model=model_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype="float16",
            max_model_len=2048,
            gpu_memory_utilization=0.3,
            enforce_eager=True,
            kv_transfer_config=KVTransferConfig(
                kv_connector="OffloadingConnector",
                kv_role="kv_both",
                kv_connector_extra_config={
                    "spec_name": "KVSwitchOffloadingSpec",
                    "spec_module_path": "kvswitch.adapters.vllm",
                    "cpu_bytes_to_use": 1 << 30,
                    "offload_prompt_only": False,
                },
            ),
        )
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 31000 + 3 for j in range(600)])
                   for i in range(4)]
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        first = llm.generate(prompts, params)
        llm.reset_prefix_cache()  # drop the GPU prefix cache before the second pass
        second = llm.generate(prompts, params)
        same = all(a.outputs[0].token_ids == b.outputs[0].token_ids
                   for a, b in zip(first, second, strict=True))
        print(f"generated {len(first)} x {len(first[0].outputs[0].token_ids)} tokens twice "
              f"with kvswitch's offloading spec; greedy outputs identical: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

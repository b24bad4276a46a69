"""``kvswitch bench --engine vllm``: the trace through vLLM 0.32's own scheduler and
offloading connector, kvswitch against vLLM as shipped ([`kvswitch.bench.vllm.serve`][]).

Needs vLLM (``pip install 'kvswitch[vllm]'``); importing this package imports it,
``import kvswitch`` and ``import kvswitch.bench`` do not.
"""

import os

# The bench's KV cache is CPU tensors: vLLM's CPU platform, whatever accelerator the
# machine has (on CUDA vLLM would place offloading memory for GPU workers). Read by vLLM
# when it first resolves its platform.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

try:
    import vllm  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"kvswitch.bench.vllm needs vLLM ({e}); install it with: "
        f"pip install 'kvswitch[vllm]'") from e

from kvswitch.bench.vllm import report
from kvswitch.bench.vllm.serve import (
    VLLM_CONFIGURATIONS,
    WALL_S_PER_STEP,
    VllmConfiguration,
    VllmServeResult,
    serve_vllm,
)
from kvswitch.bench.vllm.stamps import StampMismatchError

__all__ = ["VLLM_CONFIGURATIONS", "WALL_S_PER_STEP", "StampMismatchError", "VllmConfiguration",
           "VllmServeResult", "report", "serve_vllm"]

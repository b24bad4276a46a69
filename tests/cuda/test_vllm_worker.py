"""vLLM's worker transfer tests (test_gpu_worker.py of vLLM 0.32.0) on a GPU: kvswitch's
vLLM worker with CUDA KV tensors (CUDA backend) and pinned CPU tensors, byte-exact, same
parameters as tests/test_vllm_adapter.py. Skipped without vLLM or a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the submodule is what tells an installed vLLM apart
pytest.importorskip("vllm.v1.kv_offload.base")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parents[1] / "vllm_support"))

import transfer_cases as cases  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("gpu_to_cpu", [True, False])
@pytest.mark.parametrize("page", cases.GPU_PAGE_SIZES)
@pytest.mark.parametrize("bpc", cases.BLOCKS_PER_CHUNK_VALUES)
def test_transfer_cuda(gpu_to_cpu, page, bpc):
    cases.case_transfer("cuda:0", gpu_to_cpu, page, bpc)


@pytest.mark.parametrize("gpu_to_cpu", [True, False])
@pytest.mark.parametrize("page", cases.GPU_PAGE_SIZES)
@pytest.mark.parametrize("bpc", cases.BLOCKS_PER_CHUNK_VALUES)
def test_transfer_multi_group_cuda(gpu_to_cpu, page, bpc):
    cases.case_transfer_multi_group("cuda:0", gpu_to_cpu, page, bpc)

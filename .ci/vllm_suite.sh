#!/usr/bin/env bash
# The vLLM adapter's CI (issue 12): kvswitch's vLLM tests and vLLM's own offloading suites
# with kvswitch's classes substituted (tests/vllm_support/kvswitch_vllm_plugin.py). Run from the
# repository root: bash .ci/vllm_suite.sh. CPU only: vLLM runs with VLLM_TARGET_DEVICE=cpu.
#
# Steps (each prints its time):
#  1. a venv under build/ci-vllm/ with ".[test,vllm]" (CI's pins; pip's cache reused). The
#     torchvision/torchaudio/torchcodec wheels vLLM 0.32 pulls are built against PyPI's
#     CUDA torch; their native ops fail to load with CI's CPU torch 2.13.0 and transformers
#     then fails at import, so they are uninstalled (nothing tested here uses them). tblib:
#     vLLM's tests/conftest.py imports it.
#  2. vLLM 0.32.0's source distribution, sha256-checked, for its tests/, from the indexes
#     pip is configured with (pip's own default when none is): tests/vllm_support/
#     fetch_sdist.py (pip download --no-binary would build vLLM's build requirements from
#     source).
#  3. kvswitch's vLLM tests (tests/test_vllm_*.py: the adapter, and the commands of
#     docs/adapters/vllm.md parsed by vLLM's own argument parser).
#  4. vLLM's suites, unchanged, with the manager and spec substituted: cpu/test_manager.py,
#     test_factory.py, kv_connector/unit/offloading_connector (a local config.json for the
#     model they name: tests/vllm_support/hf_cache, HF_HUB_OFFLINE=1). Deselected, with reasons:
#     - test_manager.py::test_cpu_manager (exactly; -k, since --deselect matches node-id
#       prefixes and would drop test_cpu_manager_*) in the default "groups" order: it asserts
#       vLLM's exact LIFO free-list chunk ids ([2, 0, 3] where kvswitch hands [2, 3, 0],
#       the same chunks); it runs, with every other manager test, in step 5.
#     - test_factory.py tests that monkeypatch vLLM's CPUOffloadingWorker constructor in
#       vllm.v1.kv_offload.cpu.spec and inspect its arguments: they test which worker class
#       vLLM's own spec instantiates, which kvswitch's spec replaces by design.
#  5. cpu/test_manager.py again, all of it, in the documented "vllm" chunk order.
#  6. vLLM's tests/v1/core suites (issue 23): prefix caching, KV cache utils, single-type
#     managers, scheduler, async scheduler, with the GPU side substituted too
#     (BlockGroupScheduler, AsyncBlockGroupScheduler, BlockGroupKVCacheManager,
#     BlockGroupPool; steps 4 and 6 both run with it). Deselected (--kvswitch-deselect,
#     exact ids), with reasons:
#     - BLOCK_ID_TESTS: they assert vLLM's exact GPU block ids or free-queue order
#       ([1, 2, 3, 4], [5], ...), which block groups number differently. Order
#       assumptions: step 7 runs them, all passing, in the "vllm" block order (vLLM's ids
#       renumbered back, with all of kvswitch's pool bookkeeping active); and
#       tests/test_vllm_block_groups.py checks against vLLM's own KVCacheManager that,
#       with no reuse window, every prefix hit, admission, free and cached count and KV
#       cache event is vLLM's.
#     - OFFLINE_TESTS: their ModelConfig names a model whose files CI does not have
#       (llava-hf/llava-1.5-7b-hf, Qwen/Qwen1.5-7B; CI is offline, HF_HUB_OFFLINE=1); they
#       fail the same way with no substitution (KVSWITCH_VLLM_SUBSTITUTE=none).
#  7. BLOCK_ID_TESTS in the "vllm" block order.
#
# Usage: bash .ci/vllm_suite.sh [all|install|test] (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { local t0=$SECONDS; "$@"; echo "== $((SECONDS - t0)) s: $*"; }

ROOT=$PWD
DIR=$ROOT/build/ci-vllm
# KVSWITCH_CI_VLLM_VENV: reuse an existing venv (e.g. a developer's, where disk is short).
VENV=${KVSWITCH_CI_VLLM_VENV:-$DIR/venv}
PY=$VENV/bin/python
VLLM_VERSION=0.32.0
SDIST=$DIR/vllm-$VLLM_VERSION
mkdir -p "$DIR"

install() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # Its own CMake build folder: .ci/run may build the main wheel from this tree meanwhile.
  "$PY" -m pip install --quiet -c .ci/constraints.txt -C build-dir="$DIR/cmake" \
    ".[test,vllm]" tblib
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  "$PY" -c "import torch, vllm, kvswitch.adapters.vllm; print('torch', torch.__version__, '| vllm', vllm.__version__)"
}

fetch_sdist() {
  [ -d "$SDIST/tests" ] && return 0
  "$PY" tests/vllm_support/fetch_sdist.py "$VLLM_VERSION" "$DIR"
}

# KVSWITCH_NO_IMPORT_SKIPS (tests/conftest.py): vLLM is installed here, so a test module
# skipped because an import failed fails the run.
kvswitch_tests() {
  # the block-group tests build vLLM schedulers: vLLM's CPU platform, offline model config
  KVSWITCH_NO_IMPORT_SKIPS=1 VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_vllm_*.py
}

# vLLM's suites run from its source tree, with its tests/ package and conftest.
vllm_pytest() {
  (cd "$SDIST" && env PYTHONPATH="$ROOT/tests/vllm_support" VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 \
    HF_HUB_CACHE="$ROOT/tests/vllm_support/hf_cache/hub" \
    "$PY" -m pytest -q -p no:cacheprovider -p kvswitch_vllm_plugin "$@")
}

FACTORY=tests/v1/kv_offload/test_factory.py
vllm_suites() {
  vllm_pytest \
    tests/v1/kv_offload/cpu/test_manager.py \
    -k "not test_cpu_manager or test_cpu_manager_" \
    "$FACTORY" \
    --deselect "$FACTORY::test_cpu_spec_create_worker_uses_mmap_on_cuda" \
    --deselect "$FACTORY::test_cpu_spec_create_worker_skips_mmap_for_empty_cache" \
    --deselect "$FACTORY::test_cpu_spec_create_worker_uses_tensor_path_without_shared_region[non-cuda-alike]" \
    --deselect "$FACTORY::test_cpu_spec_create_worker_uses_tensor_path_without_shared_region[rocm]" \
    tests/v1/kv_connector/unit/offloading_connector
}

vllm_manager_vllm_order() {
  KVSWITCH_VLLM_CHUNK_ORDER=vllm vllm_pytest tests/v1/kv_offload/cpu/test_manager.py
}

CORE=tests/v1/core
CORE_SUITES=("$CORE/test_prefix_caching.py" "$CORE/test_kv_cache_utils.py"
  "$CORE/test_single_type_kv_cache_manager.py" "$CORE/test_scheduler.py"
  "$CORE/test_async_scheduler.py")
BLOCK_ID_TESTS=(
  "$CORE/test_prefix_caching.py::test_prefill[sha256]"
  "$CORE/test_prefix_caching.py::test_prefill[sha256_cbor]"
  "$CORE/test_prefix_caching.py::test_prefill_hybrid_model"
  "$CORE/test_prefix_caching.py::test_prefill_hybrid_model_eagle"
  "$CORE/test_prefix_caching.py::test_prefill_plp"
  "$CORE/test_prefix_caching.py::test_evict"
  "$CORE/test_prefix_caching.py::test_reset_prefix_cache"
  "$CORE/test_prefix_caching.py::test_different_block_size"
)
OFFLINE_TESTS=(
  "$CORE/test_kv_cache_utils.py::test_estimate_max_model_len[Qwen/Qwen1.5-7B-16385-16384]"
  "$CORE/test_kv_cache_utils.py::test_estimate_max_model_len[Qwen/Qwen1.5-7B-16383-16383]"
  "$CORE/test_kv_cache_utils.py::test_get_max_concurrency_for_kv_cache_config"
  # llava-hf/llava-1.5-7b-hf (multimodal scheduling and encoder-cache tests)
  "$CORE/test_scheduler.py::test_eagle3_mm_encoder_cache_with_shift"
  "$CORE/test_scheduler.py::test_ec_connector_allocate_encoder_tokens_with_external_load[False]"
  "$CORE/test_scheduler.py::test_ec_connector_allocate_encoder_tokens_with_external_load[True]"
  "$CORE/test_scheduler.py::test_ec_connector_cache_hit_external_load[False]"
  "$CORE/test_scheduler.py::test_ec_connector_cache_hit_external_load[True]"
  "$CORE/test_scheduler.py::test_ec_connector_cache_miss_computes_locally[False]"
  "$CORE/test_scheduler.py::test_ec_connector_cache_miss_computes_locally[True]"
  "$CORE/test_scheduler.py::test_ec_connector_defers_running_request_for_async_reload"
  "$CORE/test_scheduler.py::test_ec_connector_ensure_cache_available_defers_request[False]"
  "$CORE/test_scheduler.py::test_ec_connector_ensure_cache_available_defers_request[True]"
  "$CORE/test_scheduler.py::test_ec_connector_schedule_multiple_requests[False-connector_only]"
  "$CORE/test_scheduler.py::test_ec_connector_schedule_multiple_requests[False-local]"
  "$CORE/test_scheduler.py::test_ec_connector_schedule_multiple_requests[False-no_where]"
  "$CORE/test_scheduler.py::test_ec_connector_schedule_multiple_requests[True-connector_only]"
  "$CORE/test_scheduler.py::test_ec_connector_schedule_multiple_requests[True-local]"
  "$CORE/test_scheduler.py::test_ec_connector_schedule_multiple_requests[True-no_where]"
  "$CORE/test_scheduler.py::test_ec_connector_text_only_request[False]"
  "$CORE/test_scheduler.py::test_ec_connector_text_only_request[True]"
  "$CORE/test_scheduler.py::test_ec_connector_unable_to_allocate[False]"
  "$CORE/test_scheduler.py::test_ec_connector_unable_to_allocate[True]"
  "$CORE/test_scheduler.py::test_ec_connector_update_connector_output_called"
  "$CORE/test_scheduler.py::test_ec_connector_with_partial_cache_hit_multi_round[False]"
  "$CORE/test_scheduler.py::test_ec_connector_with_partial_cache_hit_multi_round[True]"
  "$CORE/test_scheduler.py::test_encoder_cache_accepts_matching_embed_count"
  "$CORE/test_scheduler.py::test_encoder_cache_embed_count_mismatch_restores_prior_hit_state"
  "$CORE/test_scheduler.py::test_encoder_cache_recomputed_when_evicted_during_preemption"
  "$CORE/test_scheduler.py::test_encoder_cache_rejects_mismatched_embed_count"
  "$CORE/test_scheduler.py::test_encoder_cache_rejects_mismatched_embed_count_within_request"
  "$CORE/test_scheduler.py::test_encoder_cache_retained_across_preemption_and_resume"
  "$CORE/test_scheduler.py::test_encoder_only_prompt_longer_than_budget_is_chunked"
  "$CORE/test_scheduler.py::test_free_encoder_inputs_defers_for_eagle_lookahead"
  "$CORE/test_scheduler.py::test_free_encoder_inputs_notifies_the_ec_connector"
  "$CORE/test_scheduler.py::test_free_encoder_inputs_respects_unconfirmed_placeholders"
  "$CORE/test_scheduler.py::test_free_encoder_inputs_unchanged_without_spec_decode"
  "$CORE/test_scheduler.py::test_no_mm_input_chunking[False]"
  "$CORE/test_scheduler.py::test_no_mm_input_chunking[True]"
  "$CORE/test_scheduler.py::test_no_mm_input_chunking_for_same_step_duplicate"
  "$CORE/test_scheduler.py::test_priority_scheduling_ec_connector_preemption_and_resumption[False-connector_only]"
  "$CORE/test_scheduler.py::test_priority_scheduling_ec_connector_preemption_and_resumption[False-local]"
  "$CORE/test_scheduler.py::test_priority_scheduling_ec_connector_preemption_and_resumption[False-no_where]"
  "$CORE/test_scheduler.py::test_priority_scheduling_ec_connector_preemption_and_resumption[True-connector_only]"
  "$CORE/test_scheduler.py::test_priority_scheduling_ec_connector_preemption_and_resumption[True-local]"
  "$CORE/test_scheduler.py::test_priority_scheduling_ec_connector_preemption_and_resumption[True-no_where]"
  "$CORE/test_scheduler.py::test_same_step_duplicate_encoder_input_stays_cached"
  "$CORE/test_scheduler.py::test_schedule_multimodal_requests"
  "$CORE/test_scheduler.py::test_schedule_partial_requests"
  "$CORE/test_scheduler.py::test_unavailable_encoder_input_fails_the_request_as_retryable"
)
vllm_core_suites() {
  local args=() t
  for t in "${BLOCK_ID_TESTS[@]}" "${OFFLINE_TESTS[@]}"; do args+=(--kvswitch-deselect "$t"); done
  vllm_pytest "${CORE_SUITES[@]}" "${args[@]}"
}

vllm_core_block_ids_vllm_order() {
  KVSWITCH_VLLM_BLOCK_ORDER=vllm vllm_pytest "${BLOCK_ID_TESTS[@]}"
}

# `install` or `test` runs half of it (.ci/run downloads while the main suite runs).
mode=${1:-all}
case $mode in
  install | all) step install; step fetch_sdist ;;&
  test | all)
    step kvswitch_tests; step vllm_suites; step vllm_manager_vllm_order
    step vllm_core_suites; step vllm_core_block_ids_vllm_order ;;&
  install | test | all) ;;
  *) echo "usage: bash .ci/vllm_suite.sh [all|install|test]" >&2; exit 2 ;;
esac
echo "== $SECONDS s: .ci/vllm_suite.sh $mode"

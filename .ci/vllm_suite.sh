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
#  2. vLLM 0.32.0's source distribution from PyPI's simple index, sha256-checked, for its
#     tests/ (tests/vllm_support/fetch_sdist.py; pip download --no-binary would build vLLM's build
#     requirements from source).
#  3. kvswitch's vLLM tests (tests/test_vllm_*.py): the adapter, and `kvswitch bench --engine
#     vllm` (tests/test_vllm_bench.py): a ~550-step trace through vLLM's own scheduler and
#     offloading connector in every configuration, asserting every turn served, every load
#     and every scheduled context checked, and an injected load failure taking vLLM's
#     failure path.
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
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$PY" -c "import torch, vllm, kvswitch.adapters.vllm; print('torch', torch.__version__, '| vllm', vllm.__version__)"
}

fetch_sdist() {
  [ -d "$SDIST/tests" ] && return 0
  "$PY" tests/vllm_support/fetch_sdist.py "$VLLM_VERSION" "$DIR"
}

kvswitch_tests() {
  VLLM_TARGET_DEVICE=cpu "$PY" -m pytest -q -p no:cacheprovider tests/test_vllm_*.py
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

# `install` or `test` runs half of it (.ci/run downloads while the main suite runs).
mode=${1:-all}
case $mode in
  install | all) step install; step fetch_sdist ;;&
  test | all) step kvswitch_tests; step vllm_suites; step vllm_manager_vllm_order ;;&
  install | test | all) ;;
  *) echo "usage: bash .ci/vllm_suite.sh [all|install|test]" >&2; exit 2 ;;
esac
echo "== $SECONDS s: .ci/vllm_suite.sh $mode"

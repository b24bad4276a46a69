#!/usr/bin/env bash
# The SGLang adapter's suite (kvswitch.adapters.sglang), standalone: run from the repository
# root as `bash .ci/sglang_suite.sh`. It makes its own venv under build/ci-sglang/ (SGLang
# pins torch==2.14.1 and many CUDA wheels, about 10 GB installed; CI's main venv pins the
# torch 2.13.0 CPU wheel, so they cannot share one), installs kvswitch with its test and
# sglang extras (pip's cache is reused between runs), checks the plugin entry point, and runs
# tests/test_sglang_*.py (and tests/cuda/test_sglang_*.py, which skip without a GPU).
# Prints the seconds of every step. Set KVSWITCH_SGLANG_VENV to reuse a venv elsewhere.
#
# SGLang's own host-pool unit tests are not run: the sglang 0.5.23 wheel ships none, PyPI
# has no sdist of it (the last sdist is 0.5.10.post1), and CI reaches no other source.
#
# Usage: bash .ci/sglang_suite.sh [all|install|test] (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { local t0=$SECONDS; "$@"; echo "== $((SECONDS - t0)) s: $*"; }

dir=$PWD/build/ci-sglang
venv=${KVSWITCH_SGLANG_VENV:-$dir/venv}
mkdir -p "$dir"
# CI's pins without torch: sglang 0.5.23 requires torch==2.14.1 (from PyPI), which the
# main suite's torch==2.13.0 pin excludes. The SGLang release is pinned here instead.
grep -v -E '^[[:space:]]*torch[[:space:]]*(==|$)' .ci/constraints.txt > "$dir/constraints.txt"
echo "sglang==0.5.23" >> "$dir/constraints.txt"
PIN=(-c "$dir/constraints.txt")

py=$venv/bin/python
install() {
  [ -x "$py" ] || python3 -m venv "$venv"
  # SGLang first (the big part), then kvswitch built from this tree without build isolation,
  # into its own CMake build folder: .ci/run may build the main wheel from this tree
  # meanwhile, and a warm run rebuilds incrementally.
  "$py" -m pip install --quiet "${PIN[@]}" "sglang==0.5.23"
  "$py" -m pip install --quiet "${PIN[@]}" scikit-build-core nanobind cmake ninja
  "$py" -m pip install --quiet "${PIN[@]}" --no-build-isolation \
    -C build-dir="$dir/cmake" ".[test,sglang]"
  "$py" -c "import torch, sglang, kvswitch; print('torch', torch.__version__, '| sglang', sglang.__version__, '| kvswitch', kvswitch.__version__)"
}

# The entry point SGLang's plugin loader reads, as installed (not from the source tree).
check_entry_point() {
  (cd "$dir" && "$py" - <<'PY'
from importlib.metadata import entry_points
eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvswitch"]
assert eps and eps[0].value == "kvswitch.adapters.sglang.plugin:register", eps
print("entry point:", eps[0].value)
PY
  )
}

# -p no:cacheprovider: nothing written into the tree; rootdir's pyproject gives the markers.
# KVSWITCH_NO_IMPORT_SKIPS (tests/conftest.py): SGLang is installed here, so a test module
# skipped because an import failed fails the run.
tests() {
  KVSWITCH_NO_IMPORT_SKIPS=1 "$py" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_sglang_*.py tests/cuda/test_sglang_*.py
}
cost() { "$py" benchmarks/sglang_transfer_cost.py --quick; }

# `install` or `test` runs half of it (.ci/run downloads while the main suite runs).
mode=${1:-all}
case $mode in
  install | all) step install ;;&
  test | all) step check_entry_point; step tests; step cost ;;&
  install | test | all) ;;
  *) echo "usage: bash .ci/sglang_suite.sh [all|install|test]" >&2; exit 2 ;;
esac
echo "== $SECONDS s: .ci/sglang_suite.sh $mode"

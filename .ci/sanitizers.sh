#!/usr/bin/env bash
# Sanitizer stage of CI (called by .ci/run; runs alone too: bash .ci/sanitizers.sh).
#   1. cpp/tests/swap_engine_stress.cpp with ASan+UBSan (build/asan-cpp), then TSan (build/tsan);
#   2. the extension built with ASan+UBSan (build/asan) into its own venv without torch or
#      transformers (their tests skip), and the Python test suite run under it.
# Sanitizer builds copy host rows with plain memcpy (CMake forces KVSWITCH_STREAMING_STORES
# OFF): ASan does not check SSE non-temporal stores. Any sanitizer report fails the stage.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=build/asan-venv
CXX=${CXX:-c++}
step() { local t0=$SECONDS; "$@"; echo "== $((SECONDS - t0)) s: $*"; }

# The venv also provides cmake and ninja for the C++ builds (the CI image need not have them).
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
export PATH=$PWD/$VENV/bin:$PATH
step python -m pip install --quiet "cmake>=3.18" ninja

# C++ stress test: the sanitizers' exit codes fail ctest; repeated since races are timing
# dependent. LeakSanitizer (part of ASan) is on here.
stress() {  # build-dir sanitizers
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVSWITCH_PYTHON=OFF \
    -DKVSWITCH_CPP_TESTS=ON -DKVSWITCH_SANITIZE="$2" >/dev/null
  cmake --build "$1"
  ctest --test-dir "$1" --output-on-failure --repeat until-fail:10
}
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 step stress build/asan-cpp address,undefined
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 step stress build/tsan thread

step python -m pip install --quiet -C build-dir=build/asan -C cmake.build-type=RelWithDebInfo \
  -C cmake.define.KVSWITCH_SANITIZE=address,undefined ".[test]"
core=$(echo "$VENV"/lib/python3*/site-packages/kvswitch/_core*.so)
[[ $(ldd "$core") == *libasan* ]] || { echo "$core: not built with ASan" >&2; exit 1; }

# Python is not instrumented, so the ASan runtime is preloaded (it must come first), with
# libstdc++: otherwise ASan's __cxa_throw interceptor finds no real __cxa_throw at startup
# and aborts at the first C++ exception. libubsan needs no preload: _core.so pulls it in.
# detect_leaks=0: CPython and NumPy keep memory until exit by design.
# A report ends the process at once (exit status 1). --capture=sys: pytest captures only
# Python's sys.stdout/stderr, so a report written to fd 2 reaches the log instead of dying
# in pytest's capture file (ASan+UBSan ignore log_path for UBSan reports, GCC 12). Tests that
# run Python in a subprocess (test_fake_cuda_driver.py) inherit all this and check its status.
# -v prints each test's id before it runs: the one before a report is the culprit.
LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  step python -m pytest -v --capture=sys

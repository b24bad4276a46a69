#!/usr/bin/env bash
# Mutation check (called by .ci/run after the main test suite; runs alone too: bash
# .ci/mutants.sh [--only TEXT ...]). Plants each bug listed in .ci/mutants.py, one at a
# time, in a scratch copy of the installed kvswitch package (build/mutants) and fails if the
# state machines, the engine's ordering tests and the manager's race tests miss any; prints
# a table: mutant, killed by, seconds. Needs kvswitch installed with its test extra
# (python3 -m pip install ".[test]"). The C++ mutants rebuild the extension incrementally
# in build/mutants/build: cmake, ninja and nanobind are installed next to python3's scripts.
# PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install --quiet -c .ci/constraints.txt "cmake>=3.18" ninja "nanobind>=2.4"
scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PATH=$scripts:$PATH exec "$PYTHON" .ci/mutants.py "$@"

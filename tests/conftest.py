"""Suite-wide pytest hooks.

``KVSWITCH_NO_IMPORT_SKIPS=1`` (set by the engine suites, .ci/vllm_suite.sh and
.ci/sglang_suite.sh) turns every skip caused by ``pytest.importorskip`` into a failure of
the run: there the engine is installed on purpose, so a test module that cannot import it
(an engine API that moved, a broken install) must not pass as "skipped". Without it (the
main suite, where vLLM and SGLang are absent) those modules skip as usual.

Hypothesis profile ``mutants`` (used by .ci/mutants.py): derandomized and without the
example database, so that which planted bug a test catches does not depend on earlier
runs, and without shrinking (only whether a bug is caught matters there).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import Phase, settings

settings.register_profile("mutants", derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate])

_import_skips: list[str] = []


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    """The folder holding the fake libcuda.so.1 (tests/_fake_cuda.py), built once per
    session; skips the test without a C++ compiler."""
    from _fake_cuda import CXX, build_fake_driver

    if CXX is None:
        pytest.skip("needs a C++ compiler to build the fake CUDA driver")
    return build_fake_driver(tmp_path_factory.mktemp("fake_cuda"))


def _required() -> bool:
    return os.environ.get("KVSWITCH_NO_IMPORT_SKIPS", "") not in ("", "0")


def _note(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped:
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    # pytest.importorskip's reason: "could not import 'module': ..."
    if "could not import" in reason:
        _import_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _required() and _import_skips:
        terminalreporter.section("KVSWITCH_NO_IMPORT_SKIPS: skipped for a failed import",
                                 red=True)
        for line in _import_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _required() and _import_skips and exitstatus in (pytest.ExitCode.OK,
                                                        pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

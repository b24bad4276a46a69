#!/usr/bin/env python3
"""Mutation check (CI, .ci/mutants.sh): plant each bug of MUTANTS, one at a time, in a
scratch copy of the installed kvswitch package and run the tests that must catch it; fail
if any mutant survives.

Each mutant replaces one exact snippet of one file (the snippet must occur exactly once,
so a mutant that no longer applies fails the check instead of passing silently). Python
mutants edit the scratch package (build/mutants/pkg/kvswitch, put first on PYTHONPATH);
C++ mutants edit a scratch copy of the C++ sources (build/mutants/src), rebuild the
extension incrementally in build/mutants/build (configured and built unmutated once, in
the background while the Python mutants run; each mutant then recompiles one file), and
copy it into the scratch package. C++ mutants run last. The control mutant changes nothing: it must
survive (otherwise the tests fail on an unmutated package and no kill means anything).

Killers are pytest node ids, run in order with ``-x`` under the ``mutants`` hypothesis
profile (tests/conftest.py: derandomized, no example database), so a run is repeatable;
the first that fails kills the mutant. ``kvswitch.testing``'s state machines run at
hypothesis's default example counts (tests/test_shipped_machines.py).

Usage: python .ci/mutants.py [--only TEXT ...] [--expect-killed] [--workdir DIR]
  --only: run the mutants whose name contains TEXT (the control always runs first).
  --expect-killed: treat the control as a mutant too (shows that a survivor fails the
      check: ``--only control --expect-killed`` exits 1).
Exit status: 0 when every mutant was killed and the control survived, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The shipped state machines at hypothesis's default settings, then the engine's
# ordering and failure tests, then the manager's failure and race tests.
MACHINES = ["tests/test_shipped_machines.py"]
MIGRATE = "tests/test_swap_engine_migrate.py::"
ENGINE = [MIGRATE + "test_random_job_sequences_equal_sequential_application",
          MIGRATE + "test_failure_chaining_follows_the_conflict_rules_exactly",
          "tests/test_engine_failures.py",
          "tests/test_swap_engine.py::test_queued_jobs_equal_sequential_application"]
MANAGER = ["tests/test_manager_races.py", "tests/test_manager_failures.py",
           "tests/test_compaction.py"]
CUDA_MANAGER = ["tests/test_cuda_manager.py"]


@dataclasses.dataclass
class Mutant:
    name: str
    path: str  # relative to the repository: src/kvswitch/... or cpp/src/...
    old: str
    new: str
    killers: list[str]
    control: bool = False

    @property
    def cpp(self) -> bool:
        return self.path.startswith("cpp/")


M = "src/kvswitch/manager.py"
E = "cpp/src/swap_engine.cpp"
MUTANTS = [
    Mutant("control: a comment added (nothing changes)", M,
           "class SwapManager:", "# mutant: nothing changed\nclass SwapManager:",
           MACHINES + MANAGER, control=True),
    # -- red-team round 2, repro_3 (../shared/redteam3/README.md) -------------------------
    Mutant("repro_3a: allocate() skips the conflict wait (Algorithm 1 step 3.1)", M,
           "if self.engine.wait_blocks(new):", "if False:", MACHINES),
    Mutant("repro_3b: compaction may move sequences still swapping in", M,
           "pinned = [*self._swapping_in, *self._failed]", "pinned = [*self._failed]",
           MACHINES),
    Mutant("repro_3c: swap_in returns before its migration finished (no before= stream)", M,
           "            _quiet_wait(handle)\n            self._t[\"migrate_wait_s\"]",
           "            pass\n            self._t[\"migrate_wait_s\"]", MACHINES),
    Mutant("repro_3d: a failure raised by a call is reported again by take_failed", M,
           "if self._unreported.pop(seq_id, None) is not None:",
           "if self._unreported.get(seq_id, None) is not None:", MACHINES),
    Mutant("repro_3e: swap_in(reserve_blocks=) is ignored", M,
           "self.gpu.reserve(seq_id, reserve_blocks)", "pass", MACHINES),
    Mutant("repro_3f: truncate() forgets to invalidate the CPU copy", M,
           "self.tracker.truncate(seq_id, num_tokens)", "pass", MACHINES),
    Mutant("repro_3g (C++): conflicts() without write-after-read / write-after-write", E,
           "    if (b.writes_device() && overlaps(b.device_writes(), a.device_spans))"
           " return true;\n", "", MACHINES),
    # -- a wait removed ----------------------------------------------------------------------
    Mutant("wait_swap_in() returns without waiting for the copies", M,
           "                _quiet_wait(handle)\n"
           "                self._t[\"swap_in_wait_s\"] += self._clock() - t0\n"
           "            record = self._swapping_in.pop(seq_id)",
           "                pass\n"
           "                self._t[\"swap_in_wait_s\"] += self._clock() - t0\n"
           "            record = self._swapping_in.pop(seq_id)", MACHINES),
    Mutant("decide() (synchronous) does not wait for pending swap-ins", M,
           "                if handle is not None:\n                    _quiet_wait(handle)\n"
           "            self._t[\"swap_in_wait_s\"]",
           "                pass\n            self._t[\"swap_in_wait_s\"]",
           MACHINES + ["tests/test_manager.py::TestBlockingManagerMachine"]),
    Mutant("a blocking swap_out() returns before its copies end", M,
           "            if migration is None and handle is not None and not self.async_swap_out:\n"
           "                t0 = self._clock()\n                _quiet_wait(handle)",
           "            if migration is None and handle is not None and not self.async_swap_out:\n"
           "                t0 = self._clock()",
           MACHINES + ["tests/test_manager.py::TestBlockingManagerMachine"]),
    # -- a dependency removed ----------------------------------------------------------------
    Mutant("(C++) conflicts() without host-pool ordering", E,
           "    return (a.writes_host() || b.writes_host()) && "
           "overlaps(a.host_spans, b.host_spans);", "    return false;", MACHINES + ENGINE),
    # -- a validity invalidation removed -----------------------------------------------------
    Mutant("a failed async swap-out leaves its CPU copy valid", M,
           "        self.tracker.fail(record.plan)  # its copies are invalid; the rest is "
           "reclaimable", "        pass", MACHINES + MANAGER),
    Mutant("a swap-in failed by its swap-out leaves the swap-out's blocks valid", M,
           "                self.tracker.fail(out.plan)", "                pass",
           MACHINES + MANAGER),
    # -- a failure propagation removed -------------------------------------------------------
    Mutant("(C++) a read of device blocks a failed job was writing runs", E,
           "        if (!dw.empty() && overlaps(dw, dev_reads)) {\n            raw = true;",
           "        if (!dw.empty() && overlaps(dw, dev_reads)) {\n            raw = false;",
           ENGINE + MACHINES),
    Mutant("(C++) a read of host blocks a failed job was writing runs (no read-after-write)", E,
           "        if (!hw.empty() && overlaps(hw, host_reads)) {\n            raw = true;",
           "        if (!hw.empty() && overlaps(hw, host_reads)) {\n            raw = false;",
           MACHINES + ENGINE),
    Mutant("a failed swap-in is reported running", M,
           "            if handle is not None and handle.error:\n"
           "                self._fail_swap_in(s, record)",
           "            if False:\n                self._fail_swap_in(s, record)", MACHINES),
    Mutant("a failed migration does not fail the sequences it moved", M,
           "                self._fail_migrated(s, handle)", "                pass", MACHINES),
    Mutant("swap_in does not re-check its swap-out after queueing (repro_4)", M,
           "            if out is not None and out.done() and out.error:",
           "            if False:", MACHINES + MANAGER),
    Mutant("swap_out ignores a failed migration that ended (repro_1, CUDA)", M,
           "            migration = self._failed_migration(seq_id)\n"
           "            if migration is None and handle",
           "            migration = None\n            if migration is None and handle",
           MANAGER + CUDA_MANAGER),
    Mutant("compaction moves a failed sequence", M,
           "pinned = [*self._swapping_in, *self._failed]", "pinned = [*self._swapping_in]",
           MACHINES),
    Mutant("block-table reports name failed sequences (repro_5)", M,
           "if s in gpu and s not in failed}", "if s in gpu}", MACHINES + MANAGER),
    # -- a lock removed ----------------------------------------------------------------------
    Mutant("close() without the manager's lock (repro_2)", M,
           "        with self._lock:\n            self.engine.close()",
           "        if True:\n            self.engine.close()", MANAGER),
]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


class Scratch:
    """The scratch package (and, for C++ mutants, the scratch sources and build)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.pkg = workdir / "pkg" / "kvswitch"
        r = run([sys.executable, "-c",
                 "import kvswitch, os; print(os.path.dirname(kvswitch.__file__))"], cwd="/")
        if r.returncode:
            sys.exit(f"mutants: kvswitch is not installed for {sys.executable}:\n{r.stderr}")
        self.installed = Path(r.stdout.strip())
        if not list(self.installed.glob("_core*")):
            sys.exit(f"mutants: {self.installed} has no built extension (_core)")
        shutil.rmtree(self.pkg.parent, ignore_errors=True)
        shutil.copytree(self.installed, self.pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.core = next(self.pkg.glob("_core*"))
        self.env = {**os.environ, "PYTHONPATH": str(self.pkg.parent),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        r = run([sys.executable, "-c", "import kvswitch; print(kvswitch.__file__)"],
                cwd=ROOT, env=self.env)
        if not r.stdout.startswith(str(self.pkg)):
            sys.exit(f"mutants: the scratch package is not the one imported: {r.stdout}{r.stderr}")
        self.src = workdir / "src"
        self.build = workdir / "build"
        self.first_build: subprocess.Popen | None = None

    def file(self, m: Mutant) -> Path:
        if m.cpp:
            return self.src / m.path
        return self.pkg / Path(m.path).relative_to("src/kvswitch")

    def start_cpp_build(self) -> None:
        """Copy the C++ sources, configure a Release build and start building the
        unmutated extension in the background. Only files whose content differs are copied
        (with a new mtime), so a build folder kept from an earlier run is reused: a file
        restored after a mutant is newer than the object built from the mutant."""
        files = [ROOT / "CMakeLists.txt", *(p for p in (ROOT / "cpp").rglob("*") if p.is_file())]
        for f in files:
            dst = self.src / f.relative_to(ROOT)
            if not dst.exists() or dst.read_bytes() != f.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        r = run(["cmake", "-S", str(self.src), "-B", str(self.build), "-G", "Ninja",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"])
        if r.returncode:
            sys.exit(f"mutants: cmake configure failed:\n{r.stdout}{r.stderr}")
        self.first_build = subprocess.Popen(
            ["cmake", "--build", str(self.build), "--target", "_core"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def install_core(self) -> None:
        """Rebuild the extension from the scratch sources into the scratch package."""
        if self.first_build is not None:
            out, _ = self.first_build.communicate()
            if self.first_build.returncode:
                sys.exit(f"mutants: the unmutated build failed:\n{out[-4000:]}")
            self.first_build = None
        r = run(["cmake", "--build", str(self.build), "--target", "_core"])
        if r.returncode:
            sys.exit(f"mutants: the build failed:\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
        built = next(self.build.glob("_core*.so"))
        shutil.copy2(built, self.core)

    def restore_core(self) -> None:
        shutil.copy2(next(self.installed.glob("_core*")), self.core)


def apply(path: Path, m: Mutant) -> str:
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        sys.exit(f"mutants: {m.name!r}: its snippet occurs {n} times in {m.path} (want 1): "
                 "update the mutant")
    path.write_text(text.replace(m.old, m.new))
    return text


def killed_by(scratch: Scratch, m: Mutant) -> str | None:
    """The first killer that fails (its first failing test), or None."""
    for killer in m.killers:
        r = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 "--hypothesis-profile=mutants", "-rf", "--no-header", killer],
                cwd=ROOT, env=scratch.env)
        if r.returncode == 0:
            continue
        if r.returncode == 5:  # no tests collected: a stale killer id
            sys.exit(f"mutants: no test collected for {killer}:\n{r.stdout[-2000:]}")
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
        return failed[0] if failed else f"{killer} (exit {r.returncode})"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="TEXT")
    ap.add_argument("--expect-killed", action="store_true")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutants")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS
               if m.control or not args.only or any(t in m.name for t in args.only)]
    mutants.sort(key=lambda m: (not m.control, m.cpp))  # control first, C++ last
    for m in mutants:  # every snippet still applies, before minutes are spent
        n = (ROOT / m.path).read_text().count(m.old)
        if n != 1:
            sys.exit(f"mutants: {m.name!r}: its snippet occurs {n} times in {m.path} "
                     "(want 1): update the mutant")
    scratch = Scratch(args.workdir)
    if any(m.cpp for m in mutants):
        scratch.start_cpp_build()
    rows, ok = [], True
    t_all = time.monotonic()
    for m in mutants:
        t0 = time.monotonic()
        path = scratch.file(m)
        original = apply(path, m)
        try:
            if m.cpp:
                scratch.install_core()
            killer = killed_by(scratch, m)
        finally:
            path.write_text(original)
            if m.cpp:
                scratch.restore_core()
        expect_killed = not m.control or args.expect_killed
        good = (killer is not None) == expect_killed
        ok &= good
        verdict = ("killed" if killer else "SURVIVED") + ("" if good else "  <-- UNEXPECTED")
        rows.append((m.name, verdict, killer or "-", time.monotonic() - t0))
        print(f"{verdict:10} {time.monotonic() - t0:6.1f} s  {m.name}  [{killer or '-'}]",
              flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutant':{width}}  {'result':10}  {'seconds':>7}  killed by")
    for name, verdict, killer, secs in rows:
        print(f"{name:{width}}  {verdict:10}  {secs:7.1f}  {killer}")
    print(f"{len(rows)} mutants in {time.monotonic() - t_all:.0f} s: "
          + ("every mutant killed, the control survived" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

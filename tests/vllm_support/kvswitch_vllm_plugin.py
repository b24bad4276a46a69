"""Pytest plugin: run vLLM's own test suites with kvswitch's classes substituted.

Load it with ``-p kvswitch_vllm_plugin`` (``tests/vllm_support`` on ``PYTHONPATH``) when running
tests from vLLM's source distribution (``.ci/vllm_suite.sh`` does). Before any test module
is imported it rebinds, in vLLM's own modules, only the class under test:

* ``vllm.v1.kv_offload.cpu.manager.CPUOffloadingManager`` -> ``KVSwitchOffloadingManager``
  (the tests' ``from ... import CPUOffloadingManager`` then gets kvswitch's manager);
* ``vllm.v1.kv_offload.cpu.spec.CPUOffloadingSpec`` -> ``KVSwitchOffloadingSpec`` (so the
  factory's registered ``"CPUOffloadingSpec"`` loader, which reads the module attribute,
  and the tests' imports both resolve to kvswitch's spec).

vLLM's tiering classes, which subclass or compose these through module-level imports, are
imported before the rebinding and keep vLLM's originals. No assertion is edited.
Environment:

* ``KVSWITCH_VLLM_SUBSTITUTE``: ``manager,spec`` (default), a subset, or ``none`` (a
  control run of vLLM's own classes).
* ``KVSWITCH_VLLM_CHUNK_ORDER``: ``groups`` (default) or ``vllm``: the manager's chunk
  order (``vllm`` reproduces vLLM's exact chunk ids, which some manager tests assert).
"""

from __future__ import annotations

import functools
import os


def _substitute() -> list[str]:
    wanted = os.environ.get("KVSWITCH_VLLM_SUBSTITUTE", "manager,spec")
    wanted_set = {w.strip() for w in wanted.split(",") if w.strip() and w.strip() != "none"}
    import vllm.v1.kv_offload.cpu.manager as vllm_manager
    import vllm.v1.kv_offload.cpu.spec as vllm_spec

    # vLLM's tiering spec and manager subclass / compose the CPU classes by a module-level
    # import: import them first, so they keep vLLM's classes (they are not under test).
    import vllm.v1.kv_offload.tiering.manager  # noqa: F401
    import vllm.v1.kv_offload.tiering.spec  # noqa: F401

    from kvswitch.adapters.vllm import KVSwitchOffloadingManager, KVSwitchOffloadingSpec

    done = []
    if "manager" in wanted_set:
        order = os.environ.get("KVSWITCH_VLLM_CHUNK_ORDER", "groups")

        class Manager(KVSwitchOffloadingManager):
            __init__ = functools.partialmethod(KVSwitchOffloadingManager.__init__,
                                               chunk_order=order)

        Manager.__name__ = Manager.__qualname__ = "KVSwitchOffloadingManager"
        vllm_manager.CPUOffloadingManager = Manager
        done.append(f"CPUOffloadingManager -> KVSwitchOffloadingManager({order=})")
    if "spec" in wanted_set:
        vllm_spec.CPUOffloadingSpec = KVSwitchOffloadingSpec
        done.append("CPUOffloadingSpec -> KVSwitchOffloadingSpec")
    return done


_DONE: list[str] = []


def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    _DONE[:] = _substitute()


def pytest_report_header(config):  # noqa: ARG001
    return "kvswitch substitutions: " + ("; ".join(_DONE) or "none (control run)")

"""Pytest plugin: run vLLM's own test suites with kvswitch's classes substituted.

Load it with ``-p kvswitch_vllm_plugin`` (``tests/vllm_support`` on ``PYTHONPATH``) when running
tests from vLLM's source distribution (``.ci/vllm_suite.sh`` does). Before any test module
is imported it rebinds, in vLLM's own modules, only the classes under test:

* ``manager``: ``vllm.v1.kv_offload.cpu.manager.CPUOffloadingManager`` ->
  ``KVSwitchOffloadingManager`` (the tests' ``from ... import CPUOffloadingManager`` then
  gets kvswitch's manager);
* ``spec``: ``vllm.v1.kv_offload.cpu.spec.CPUOffloadingSpec`` -> ``KVSwitchOffloadingSpec``
  (so the factory's registered ``"CPUOffloadingSpec"`` loader, which reads the module
  attribute, and the tests' imports both resolve to kvswitch's spec);
* ``blocks`` (the GPU side): ``vllm.v1.core.sched.scheduler.Scheduler`` ->
  ``BlockGroupScheduler``, ``vllm.v1.core.sched.async_scheduler.AsyncScheduler`` ->
  ``AsyncBlockGroupScheduler``, ``vllm.v1.core.kv_cache_manager.KVCacheManager`` ->
  ``BlockGroupKVCacheManager`` and ``vllm.v1.core.block_pool.BlockPool`` ->
  ``BlockGroupPool``: a test that builds a scheduler, a KV cache manager or a block pool
  gets kvswitch's. vLLM's modules that imported these names earlier (the engine core, the
  KV cache coordinator) keep vLLM's; the schedulers and the manager install block groups
  into what those build.

vLLM's tiering classes, which subclass or compose the CPU classes through module-level
imports, are imported before the rebinding and keep vLLM's originals. No assertion is
edited. Environment:

* ``KVSWITCH_VLLM_SUBSTITUTE``: ``manager,spec,blocks`` (default), a subset, or ``none``
  (a control run of vLLM's own classes).
* ``KVSWITCH_VLLM_CHUNK_ORDER``: ``groups`` (default) or ``vllm``: the CPU manager's chunk
  order (``vllm`` reproduces vLLM's exact chunk ids, which some manager tests assert).
* ``KVSWITCH_VLLM_BLOCK_ORDER``: ``groups`` (default) or ``vllm``: the GPU pool's block
  order (``vllm``: vLLM's free-queue order with all of kvswitch's pool bookkeeping, the
  control for tests that assert vLLM's exact block ids).
* ``KVSWITCH_VLLM_REUSE_WINDOW``: the pool's ``reuse_window_blocks`` (default: its own).
"""

from __future__ import annotations

import functools
import os


def _substitute() -> list[str]:
    wanted = os.environ.get("KVSWITCH_VLLM_SUBSTITUTE", "manager,spec,blocks")
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
    if "blocks" in wanted_set:
        done.append(_substitute_blocks())
    return done


def _substitute_blocks() -> str:
    import vllm.v1.core.block_pool as vllm_block_pool
    import vllm.v1.core.kv_cache_manager as vllm_kv_cache_manager
    import vllm.v1.core.sched.async_scheduler as vllm_async_scheduler
    import vllm.v1.core.sched.scheduler as vllm_scheduler

    from kvswitch.adapters.vllm import (
        AsyncBlockGroupScheduler,
        BlockGroupConfig,
        BlockGroupKVCacheManager,
        BlockGroupPool,
        BlockGroupScheduler,
    )

    window = os.environ.get("KVSWITCH_VLLM_REUSE_WINDOW")
    config = BlockGroupConfig(
        block_order=os.environ.get("KVSWITCH_VLLM_BLOCK_ORDER", "groups"),
        reuse_window_blocks=None if window is None else int(window))
    BlockGroupPool.default_config = config
    vllm_scheduler.Scheduler = BlockGroupScheduler
    vllm_async_scheduler.AsyncScheduler = AsyncBlockGroupScheduler
    vllm_kv_cache_manager.KVCacheManager = BlockGroupKVCacheManager
    vllm_block_pool.BlockPool = BlockGroupPool
    return (f"Scheduler, AsyncScheduler, KVCacheManager, BlockPool -> kvswitch block groups "
            f"({config.block_order} order, reuse_window_blocks={config.reuse_window_blocks})")


_DONE: list[str] = []


def pytest_addoption(parser):
    parser.addoption(
        "--kvswitch-deselect", action="append", default=[], metavar="NODEID",
        help="deselect exactly this test id (pytest's --deselect also drops every id it "
             "prefixes); an id that matches no collected test is an error")


def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    _DONE[:] = _substitute()


def pytest_collection_modifyitems(config, items):
    wanted = set(config.getoption("--kvswitch-deselect"))
    if not wanted:
        return
    found = {item.nodeid for item in items} & wanted
    missing = wanted - found
    if missing:
        raise ValueError(f"--kvswitch-deselect: no such tests: {sorted(missing)}")
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid in wanted])
    items[:] = [i for i in items if i.nodeid not in wanted]


def pytest_report_header(config):  # noqa: ARG001
    return "kvswitch substitutions: " + ("; ".join(_DONE) or "none (control run)")

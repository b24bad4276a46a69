"""The commands docs/adapters/vllm.md gives vLLM users work as written: the ``vllm serve``
line is parsed by vLLM's own argument parser into a KV transfer config that loads
kvswitch's spec with the keys preemption needs, and the Python form builds the same config.
(No model is served: that needs a GPU.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.kv_offload.factory")
import vllm  # noqa: E402
from vllm.v1.kv_offload.factory import OffloadingSpecFactory  # noqa: E402

from kvswitch.adapters.vllm import KVSwitchOffloadingSpec  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "adapters" / "vllm.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(lang: str, needle: str) -> list[str]:
    return [body for kind, body in FENCE.findall(PAGE.read_text())
            if kind == lang and needle in body]


def _check(config) -> None:
    assert config.kv_connector == "OffloadingConnector"
    assert config.kv_role == "kv_both"
    extra = config.kv_connector_extra_config
    assert OffloadingSpecFactory.get_spec_cls(extra) is KVSwitchOffloadingSpec
    assert extra["offload_prompt_only"] is False  # decode blocks too: preemption needs them
    assert extra["cpu_bytes_to_use"] == 8 << 30


def test_the_documented_vllm_serve_command_parses_to_kvswitchs_spec():
    # vLLM's parser infers a device: .ci/vllm_suite.sh runs with VLLM_TARGET_DEVICE=cpu.
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    (block,) = _blocks("bash", "vllm serve")
    command = next(c for c in block.replace("\\\n", " ").splitlines() if "vllm serve" in c)
    argv = shlex.split(command, comments=True)
    assert argv[:2] == ["vllm", "serve"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[2:])
    args.model = args.model_tag  # what `vllm serve MODEL` does
    _check(AsyncEngineArgs.from_cli_args(args).kv_transfer_config)


def test_the_documented_python_form_builds_the_same_config(monkeypatch):
    seen = {}

    def llm(**kwargs):
        seen.update(kwargs)
    monkeypatch.setattr(vllm, "LLM", llm)  # what `from vllm import LLM` gets
    (block,) = _blocks("python", "KVSwitchOffloadingSpec")
    exec(compile(block, str(PAGE), "exec"), {})
    _check(seen["kv_transfer_config"])


def test_the_worker_says_in_vllms_log_that_kvswitch_does_the_transfers():
    import logging
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "vllm_support"))
    import transfer_cases as cases

    from kvswitch.adapters.vllm import KVSwitchOffloadingWorker

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.kvswitch")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # vLLM's default level (its config may not be applied here)
    try:
        caches = cases.make_caches(2, 256, "cpu", [[0, 1]])
        worker = KVSwitchOffloadingWorker(caches, blocks_per_chunk=1, num_cpu_chunks=32)
        worker.shutdown()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # A child of vLLM's "vllm" logger: vLLM's log configuration prints it.
    assert logger.name.startswith("vllm.")
    (line,) = [r.getMessage() for r in records]
    assert line.startswith("kvswitch offloading worker: 1 KV-cache group(s), 2 layer "
                           "tensor(s), 32 CPU chunk(s) of 1 block(s), host backend")

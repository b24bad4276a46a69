"""SGLang served end to end on the CPU with kvswitch as its HiCache host pool.

Starts SGLang's engine (``sgl.Engine(device="cpu", enable_hierarchical_cache=True,
radix_cache_backend="kvswitch")``) over a tiny random GPT-2 written at test time
(``examples/sglang_hicache.py``, which this test runs), serves a prompt, evicts its KV to
the host pool by serving others, serves it again from the host pool, and compares greedy
tokens and logprobs with the first serving. kvswitch's log lines show that it did the
host-pool copies. Negative control, in the same engine: with kvswitch's loads switched
off (``tests/sglang_support/kvswitch_load_switch.py``, a test-only SGLang plugin) the same
comparison fails.

Slow: SGLang's start-up (spawned processes, each importing SGLang) takes one to two
minutes on 2 cores; the requests take seconds. Runs in the SGLang suite
(``.ci/sglang_suite.sh``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.mem_cache.registry")
import sglang as sgl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "sglang_support"
sys.path.insert(0, str(ROOT / "examples"))
import sglang_hicache as example  # noqa: E402

TOLERANCE = 1e-4  # logprobs of the same tokens over the same KV (bit-equal in practice)


def same_answer(a: example.Served, b: example.Served) -> bool:
    """Greedy tokens equal and every logprob within TOLERANCE."""
    return a.tokens == b.tokens and example.max_logprob_difference(a, b) < TOLERANCE


def _test_plugin(root: Path) -> Path:
    """A dist-info whose entry point makes SGLang load the test plugin in its processes."""
    dist = root / "kvswitch_test_load_switch-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kvswitch-test-load-switch\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\nkvswitch_test_load_switch = kvswitch_load_switch:register\n")
    return root


def _log_to(path: Path) -> Path:
    """A logging config SGLang applies in each of its processes (SGLANG_LOGGING_CONFIG_PATH):
    everything at INFO to ``path``, which the test reads (its processes' stderr would be
    wherever pytest's capture pointed when they started)."""
    config = path.with_suffix(".json")
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "[%(asctime)s] %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                              "formatter": "plain"}},
        "root": {"level": "INFO", "handlers": ["file"]}}))
    return config


@pytest.fixture
def engine(tmp_path, monkeypatch):
    log = tmp_path / "sglang.log"
    monkeypatch.setenv("SGLANG_LOGGING_CONFIG_PATH", str(_log_to(log)))
    plugins = _test_plugin(tmp_path / "plugins")
    paths = [str(plugins), str(SUPPORT)]
    # Spawned SGLang processes get both the parent's sys.path and PYTHONPATH.
    for p in reversed(paths):
        monkeypatch.syspath_prepend(p)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [*paths, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)  # load every plugin
    skip_loads = tmp_path / "skip-loads"
    monkeypatch.setenv("KVSWITCH_TEST_SKIP_LOADS", str(skip_loads))
    model_dir = tmp_path / "model"
    example.write_tiny_gpt2(str(model_dir))
    t0 = time.monotonic()
    eng = sgl.Engine(**example.engine_args(str(model_dir), "cpu"))
    print(f"SGLang engine started in {time.monotonic() - t0:.0f} s")
    try:
        yield eng, skip_loads, log
    finally:
        eng.shutdown()


def test_a_prefix_served_from_the_host_pool_gives_the_same_tokens_and_logprobs(engine):
    eng, skip_loads, log_path = engine
    t0 = time.monotonic()
    first, second = example.round_trip(eng, example.prompts(seed=1, n=1)[0], seed=2)
    assert first.cached.get("host", 0) == 0
    assert second.cached.get("host", 0) >= example.PROMPT_TOKENS - example.PAGE, \
        f"the prefix did not come from the host pool: {second.cached}"
    assert same_answer(first, second), (first, second)

    # kvswitch did those host-pool copies, and says so in the server's log.
    log = log_path.read_text()
    assert "kvswitch host pool: page_first layout, 2 layers" in log
    assert "kvswitch host pool copies (first backup): 1 backup(s) device -> host" in log
    first_load = [line for line in log.splitlines()
                  if "kvswitch host pool copies (first load)" in line]
    assert first_load and "1 layer load(s) host -> device" in first_load[0], log[-3000:]

    # Negative control: the same round trip with kvswitch's loads switched off must fail
    # the comparison (the prefix is still reported as loaded from the host pool).
    other = example.prompts(seed=3, n=1)[0]
    reference = example.serve(eng, other)
    example.evict(eng, seed=4)
    skip_loads.touch()
    try:
        broken = example.serve(eng, other)
    finally:
        skip_loads.unlink()
    assert broken.cached.get("host", 0) > 0, broken.cached
    assert not same_answer(reference, broken), \
        "with kvswitch's loads skipped the answer was unchanged: the check cannot fail"
    print(f"requests took {time.monotonic() - t0:.0f} s; negative control: largest logprob "
          f"difference {example.max_logprob_difference(reference, broken):.3f}")


def test_the_example_runs_as_documented_without_sglang_it_says_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sglang", None)  # as if SGLang were not installed
    assert example.main([]) == 0
    assert "skipped: SGLang is not installed" in capsys.readouterr().out

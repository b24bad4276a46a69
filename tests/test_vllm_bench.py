"""``kvswitch bench --engine vllm`` (kvswitch.bench.vllm): a short trace through vLLM 0.32's
scheduler and offloading connector, every configuration, with its correctness checks.

The trace is small and the GPU pool tight (10 conversations of 3 turns, 80 blocks), so a
run of about 550 engine steps preempts, stores, evicts from vLLM's GPU prefix cache and
loads from the CPU cache. Skipped without vLLM (the vLLM suite, .ci/vllm_suite.sh, runs it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.kv_offload.base")

from kvswitch.adapters.vllm import KVSwitchOffloadingWorker  # noqa: E402
from kvswitch.bench.serve import ServeConfig  # noqa: E402
from kvswitch.bench.vllm import (  # noqa: E402
    VLLM_CONFIGURATIONS,
    StampMismatchError,
    serve_vllm,
)
from kvswitch.bench.vllm.stamps import KVStamps  # noqa: E402
from kvswitch.bench.vllm.workers import VllmCpuWorkerStandIn  # noqa: E402
from kvswitch.cli import main  # noqa: E402
from kvswitch.trace import Conversation, Turn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "vllm_support"))
import transfer_cases as cases  # noqa: E402
from _cli import run_bench  # noqa: E402

#: 10 conversations of 3 turns (150-298 new tokens, 24-45 output tokens each).
CONVERSATIONS = [
    Conversation(f"s{i}", tuple(Turn(150 + 37 * ((i + k) % 5), 24 + 7 * ((i * k) % 4))
                                for k in range(3)))
    for i in range(10)]
CONFIG = ServeConfig(model="small", gpu_blocks=80, host_blocks=600, arrival_rate=20.0,
                     think_s=0.05, update_every=10)
OFFLOADING = [n for n, c in VLLM_CONFIGURATIONS.items() if c.offload is not None]


@pytest.fixture(scope="module")
def runs():
    return {name: serve_vllm(CONVERSATIONS, CONFIG, conf)
            for name, conf in VLLM_CONFIGURATIONS.items()}


def test_every_configuration_serves_every_turn(runs):
    turns = sum(len(c.turns) for c in CONVERSATIONS)
    tokens = sum(t.output_tokens for c in CONVERSATIONS for t in c.turns)
    for name, r in runs.items():
        assert (r.turns, r.turns_served, r.failed_requests, r.tokens) == (
            turns, turns, 0, tokens), name
        assert len(r.ttft_s) == turns and len(r.tbt_s) == tokens - turns, name
        # every admitted request's computed prefix was checked; preemptions happened
        assert r.contexts_checked >= turns and r.preemptions > 0, name
        assert 300 < r.iterations < 1000, name


def test_offloading_configurations_store_load_and_check_every_load(runs):
    for name in OFFLOADING:
        t = runs[name].transfers
        assert t.stores > 0 and t.loads > 0 and t.failed_loads == 0, name
        assert (t.loads_checked, t.blocks_checked) == (t.loads, t.load_blocks), name
        assert runs[name].cpu_prefix_hits > 0, name
    # a preempted request's KV comes back from the CPU instead of being recomputed
    assert runs["vllm+kvswitch"].recomputed_tokens < runs["vllm"].recomputed_tokens / 4


def test_kvswitch_spec_and_worker_run_the_transfers(runs):
    for name in ("vllm+kvswitch", "vllm+kvswitch+groups"):
        assert (runs[name].spec_class, runs[name].worker_class) == (
            "KVSwitchOffloadingSpec", "KVSwitchOffloadingWorker"), name
    assert runs["vllm+kvswitch+groups"].scheduler_class == "BlockGroupScheduler"
    assert runs["vllm+kvswitch"].scheduler_class == "Scheduler"
    r = runs["vllm+kvswitch"]
    # the worker's own counters agree with the timed copies
    assert r.worker_stats["jobs"] == r.transfers.stores + r.transfers.loads
    assert r.worker_stats["copies"] == r.transfers.copies
    assert r.worker_stats["pairs"] == r.transfers.store_blocks + r.transfers.load_blocks
    native = runs["vllm+cpu"]
    assert native.spec_class == "NativeCPUOffloadingSpec"
    # vLLM's worker: one copy per block and layer tensor (16 for the "small" preset)
    t = native.transfers
    assert t.copies == 16 * (t.store_blocks + t.load_blocks)


def test_same_seed_same_figures(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the run's model config goes
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    again = serve_vllm(CONVERSATIONS, CONFIG, VLLM_CONFIGURATIONS["vllm+kvswitch"])
    assert list(tmp_path.iterdir()) == []  # and is removed
    first = runs["vllm+kvswitch"]
    assert again.ttft_s == first.ttft_s and again.tbt_s == first.tbt_s
    assert again.transfers == first.transfers


@pytest.mark.parametrize("name", OFFLOADING)
def test_injected_load_failure_recomputes_and_nothing_else_changes(runs, name):
    """A failed load goes through vLLM's failure path (failed_recving, policy recompute):
    the request is rescheduled, every turn is still served, every other load checks."""
    r = serve_vllm(CONVERSATIONS, CONFIG, VLLM_CONFIGURATIONS[name], fail_load=3)
    clean = runs[name]
    t = r.transfers
    assert t.failed_loads == 1 and t.loads_checked == t.loads - 1
    assert (r.turns_served, r.failed_requests, r.tokens) == (clean.turns, 0, clean.tokens)


def test_vllm_0_32_deadlocks_retrying_a_failed_load_that_needs_over_half_the_pool():
    """vLLM 0.32's own failure path can deadlock (found by this bench): a request whose
    asynchronous KV load failed stays in Scheduler._inflight_prefills with its blocks
    freed, so its retry reserves its own remaining blocks on top of its request; when that
    exceeds the free pool it is never admitted, and as the head of vLLM's KV-holding queue
    it keeps every other request out. Here the third load's request (845 tokens, 53 of 80
    blocks) fails under BlockGroupScheduler's block order; the bench stops and says why."""
    with pytest.raises(RuntimeError, match=r"c2t2 failed a KV load .*_inflight_prefills"):
        serve_vllm(CONVERSATIONS, CONFIG, VLLM_CONFIGURATIONS["vllm+kvswitch+groups"],
                   fail_load=2)


@pytest.mark.parametrize("name", OFFLOADING)
def test_a_turn_loaded_from_the_cpu_into_an_idle_engine_is_served(name):
    """Conversation a's first turn ends, b's long turn evicts part of a's history from
    vLLM's GPU prefix cache and ends, and a's second turn arrives at an idle engine: vLLM
    admits it with an asynchronous load from the CPU cache and schedules it once the load
    is reported. Those are two steps that compute nothing after a jump of the clock; the
    loop once counted them as a stall and stopped the run."""
    convs = [Conversation("a", (Turn(300, 20), Turn(40, 20)), arrival_s=0.0),
             Conversation("b", (Turn(1000, 20),), arrival_s=0.5)]
    r = serve_vllm(convs, replace(CONFIG, think_s=5.0, seed=0), VLLM_CONFIGURATIONS[name])
    assert (r.turns_served, r.failed_requests) == (3, 0)
    assert r.transfers.loads == 1 and r.cpu_prefix_hits > 0  # the load happened


def test_injected_load_failure_under_policy_fail_aborts_that_request_only(runs):
    r = serve_vllm(CONVERSATIONS, CONFIG, VLLM_CONFIGURATIONS["vllm+kvswitch"], fail_load=2,
                   kv_load_failure_policy="fail")
    assert r.transfers.failed_loads == 1 and r.failed_requests == 1
    # the aborted turn's conversation ends there (at most 2 more turns unserved)
    assert r.turns - 3 <= r.turns_served <= r.turns - 1


def test_a_load_of_the_wrong_blocks_fails_the_run(monkeypatch):
    """The check after every load is live: kvswitch's worker made to load each job's CPU
    blocks in reverse order stops the run at the first multi-block load."""
    plan = KVSwitchOffloadingWorker.plan

    def reversed_cpu(self, gpu_spec, cpu_spec):
        return [(gpu, cpu[::-1].copy()) for gpu, cpu in plan(self, gpu_spec, cpu_spec)]

    original_load = KVSwitchOffloadingWorker.submit_load

    def submit_load(self, job_id, src_spec, dst_spec):
        monkeypatch.setattr(KVSwitchOffloadingWorker, "plan", reversed_cpu)
        try:
            return original_load(self, job_id, src_spec, dst_spec)
        finally:
            monkeypatch.setattr(KVSwitchOffloadingWorker, "plan", plan)

    monkeypatch.setattr(KVSwitchOffloadingWorker, "submit_load", submit_load)
    with pytest.raises(StampMismatchError, match="load job"):
        serve_vllm(CONVERSATIONS, CONFIG, VLLM_CONFIGURATIONS["vllm+kvswitch"])


def test_a_block_with_the_wrong_kv_fails_the_context_check(monkeypatch):
    """The check before a request's first step is live: KV never written for one token
    of a conversation is found when vLLM hands that block over as computed (a pool large
    enough to keep the first turn's blocks in its prefix cache for the second)."""
    write_many = KVStamps.write_many

    def garble_one(self, spans):
        write_many(self, spans)
        for conversation, block_table, start, end in spans:
            if conversation == 3 and start <= 20 < end:  # token 20 of conversation 3
                self.kv[:, block_table[20 // self.block_size], 20 % self.block_size] = 7

    monkeypatch.setattr(KVStamps, "write_many", garble_one)
    with pytest.raises(StampMismatchError, match="conversation 3"):
        serve_vllm(CONVERSATIONS, replace(CONFIG, gpu_blocks=600), VLLM_CONFIGURATIONS["vllm"])


@pytest.mark.parametrize("gpu_to_cpu", [True, False])
@pytest.mark.parametrize("bpc", cases.BLOCKS_PER_CHUNK_VALUES)
def test_vllm_cpu_worker_stand_in_copies_as_vllms_worker(gpu_to_cpu, bpc):
    """The native configuration's stand-in passes vLLM's own worker transfer cases (the
    ones kvswitch's worker passes), byte for byte, one copy per block and tensor."""
    cases.case_transfer("cpu", gpu_to_cpu, 512, bpc, worker_cls=VllmCpuWorkerStandIn)
    cases.case_transfer_multi_group("cpu", gpu_to_cpu, 512, bpc,
                                    worker_cls=VllmCpuWorkerStandIn)


def test_stamps_round_trip_and_detect_a_moved_word():
    s = KVStamps(num_layers=2, num_blocks=8, block_size=4)
    s.write(5, [3, 6, 1], 0, 10)
    s.check(5, [3, 6, 1], 10, "test")
    s.check_blocks(5, [3, 6], 0, "test")
    with pytest.raises(StampMismatchError):
        s.check_blocks(5, [6, 3], 0, "test")  # swapped blocks
    with pytest.raises(StampMismatchError):
        s.check(4, [3, 6, 1], 10, "test")  # another conversation's
    sums = s.checksums([3, 6])
    s.kv[1, 6, 2, [0, 1]] = s.kv[1, 6, 2, [1, 0]].clone()  # two words of one layer swapped
    assert s.checksums([3, 6])[0] == sums[0] and s.checksums([3, 6])[1] != sums[1]
    assert [t.shape for t in s.layer_tensors()] == [(8, 4 * 4 * 8)] * 2


def test_cli_reports_every_configuration(tmp_path, capsys):
    """``kvswitch bench --engine vllm --json out.json``: the table and the JSON."""
    trace = tmp_path / "trace.csv"
    trace.write_text("conversation_id,turn,new_input_tokens,output_tokens\n" + "".join(
        f"s{i},{k},{t.new_input_tokens},{t.output_tokens}\n"
        for i, c in enumerate(CONVERSATIONS[:4]) for k, t in enumerate(c.turns)))
    out_json = tmp_path / "out.json"
    rc, out, err = run_bench(capsys, "--engine", "vllm", "--trace", str(trace),
                             "--model", "small", "--gpu-blocks", "80", "--host-blocks", "600",
                             "--arrival-rate", "20", "--think-s", "0.05",
                             "--json", str(out_json), "--no-progress")
    assert rc == 0, err
    assert "Traceback" not in err
    header = out.splitlines()[0].split()
    assert header == [*VLLM_CONFIGURATIONS, "source"]
    doc = json.loads(out_json.read_text())
    assert doc["engine"] == "vllm" and list(doc["configurations"]) == list(VLLM_CONFIGURATIONS)
    for name, f in doc["configurations"].items():
        assert f["turns_served"] == f["turns"] == 12, name
        assert f["loads_checked"] == f["loads"], name
    assert "vllm+kvswitch vs vllm+cpu" in out


def test_cli_rejects_options_the_vllm_engine_does_not_have(capsys):
    for option, value in (("--backend", "cuda"), ("--plot", "x.png")):
        rc, out, err = run_bench(capsys, "--engine", "vllm", option, value)
        assert rc == 2 and err.count("\n") == 1 and f"argument {option}" in err


def test_unknown_vllm_configuration_is_refused():
    assert main(["bench", "--engine", "vllm", "--configs", "vllm,full", "--no-progress"]) == 2


def test_priority_update_reorders_vllms_waiting_queue():
    """vLLM's waiting queue is a heap: after a priority update it pops by the new
    priorities (the loop refills it), and vLLM's priority is minus the conversation's."""
    from kvswitch.bench.vllm.serve import _Loop

    convs = CONVERSATIONS[:4]
    loop = _Loop(convs, replace(CONFIG, arrival_rate=1e6), VLLM_CONFIGURATIONS["vllm"],
                 fail_load=None, kv_load_failure_policy="recompute", on_progress=None)
    try:
        loop.clock.advance(1.0)
        loop._arrive()  # all four arrive; none scheduled yet

        def order():
            return [loop.conversation_of[r.request_id] for r in loop.scheduler.waiting]

        new = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7}

        class Fixed:
            def update(self):
                pass

            def priority(self, i):
                return new[i]

        loop.prio = Fixed()
        loop._update_priorities()
        assert order() == [1, 3, 2, 0]
        new.update({0: 2.0, 1: 0.0})
        loop._update_priorities()
        assert order() == [0, 3, 2, 1]
        assert {r.priority for r in loop.scheduler.waiting} == {-2.0, -0.7, -0.5, -0.0}
    finally:
        loop._close()

"""kvswitch's GPU side in vLLM: BlockGroupPool / BlockGroupKVCacheManager / the block-group
schedulers, against vLLM 0.32's own KVCacheManager and Scheduler on the CPU. Skipped
without vLLM."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.core.block_pool")
torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request  # noqa: E402

from kvswitch.adapters.vllm import (  # noqa: E402
    AsyncBlockGroupScheduler,
    BlockGroupConfig,
    BlockGroupKVCacheManager,
    BlockGroupPool,
    BlockGroupScheduler,
    KVSwitchOffloadingManager,
    install_block_groups,
)

BLOCK = 4  # tokens per block: small token lists
init_none_hash(sha256)


def _spec(sliding_window: int | None = None):
    if sliding_window:
        return SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=1,
                                 dtype=torch.float32, sliding_window=sliding_window)
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)


def _kv_cache_config(num_blocks: int, hybrid: bool = False) -> KVCacheConfig:
    groups = [KVCacheGroupSpec(["full"], _spec())]
    if hybrid:
        groups.append(KVCacheGroupSpec(["swa"], _spec(sliding_window=3 * BLOCK)))
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)


def _manager(cls, num_blocks: int, hybrid: bool = False, caching: bool = True, **kw):
    return cls(_kv_cache_config(num_blocks, hybrid), max_model_len=4096,
               scheduler_block_size=BLOCK, hash_block_size=BLOCK, enable_caching=caching,
               **kw)


def _request(req_id: str, tokens: list[int]) -> Request:
    params = SamplingParams(max_tokens=1000)
    params.update_from_generation_config({}, eos_token_id=100_000)
    return Request(request_id=req_id, prompt_token_ids=list(tokens), sampling_params=params,
                   pooling_params=None, block_hasher=get_request_block_hasher(BLOCK, sha256))


def _admit(manager, req: Request):
    """vLLM's scheduler admission: prefix lookup, then slots for the whole prompt."""
    computed, num_computed, _ = manager.get_computed_blocks(req)
    new = manager.allocate_slots(req, req.num_tokens - num_computed, num_computed, computed)
    if new is not None:
        req.num_computed_tokens = req.num_tokens
    return new, num_computed


def _decode(manager, req: Request, token: int):
    """One decode step: slot for one new token, then the token joins the request."""
    new = manager.allocate_slots(req, 1)
    if new is not None:
        req.append_output_token_ids(token)
        req.num_computed_tokens += 1
    return new


def _runs(ids: list[int]) -> int:
    return 1 + sum(b != a + 1 for a, b in zip(ids, ids[1:], strict=False)) if ids else 0


def _interleaved_decode(manager, n_requests=8, prompt_blocks=3, decode_blocks=40):
    reqs = [_request(str(i), [1000 * i + t for t in range(prompt_blocks * BLOCK)])
            for i in range(n_requests)]
    for r in reqs:
        assert _admit(manager, r)[0] is not None
    for step in range(decode_blocks * BLOCK):
        for r in reqs:
            assert _decode(manager, r, 7 + step) is not None
    return [manager.get_block_ids(r.request_id)[0] for r in reqs]


def test_interleaved_decode_keeps_each_request_contiguous():
    """8 requests decoding in lockstep: vLLM's pool interleaves their blocks (runs of one
    block); block groups keep each request's table in one or two runs."""
    tables = _interleaved_decode(_manager(BlockGroupKVCacheManager, 1024))
    assert max(_runs(t) for t in tables) <= 2, [_runs(t) for t in tables]
    vllm_tables = _interleaved_decode(_manager(KVCacheManager, 1024))
    blocks = sum(len(t) for t in vllm_tables)
    assert blocks / sum(_runs(t) for t in vllm_tables) < 1.5  # the baseline is fragmented


def test_block_run_stats_count_runs():
    manager = _manager(BlockGroupKVCacheManager, 1024)
    tables = _interleaved_decode(manager, n_requests=4, decode_blocks=10)
    stats = manager.block_pool.take_block_run_stats()
    assert stats.blocks_allocated == sum(len(t) for t in tables)
    assert stats.runs_started == sum(_runs(t) for t in tables)  # no prefix hits here
    assert stats.blocks_per_run >= 10
    assert manager.block_pool.block_run_stats().blocks_allocated == 0  # taken


def test_freed_request_keeps_its_tail_for_the_next_turn():
    """A finished (or preempted) request's cached blocks stay in its table with its
    reserved tail right after them, its uncached last block returned into the tail: its
    next turn (or its resumption) continues there."""
    manager = _manager(BlockGroupKVCacheManager, 1024)
    req = _request("a", list(range(3 * BLOCK + 1)))  # 3 full blocks and a partial one
    assert _admit(manager, req)[0] is not None
    alloc = manager.block_pool.allocator
    ids = manager.get_block_ids("a")[0]
    tail = alloc.reservation(("a", 0))
    assert tail[1] > 0  # a group of 60 for a 4-block prompt
    manager.free(req)
    assert alloc.block_table(("a", 0)).tolist() == ids[:3]  # cached: retained
    assert alloc.reservation(("a", 0)) == (ids[3], tail[1] + 1)
    manager.block_pool.check_block_groups()


def test_next_turn_continues_the_previous_turns_run():
    """A conversation's next turn hits the previous turn's cached blocks; its new blocks
    go on right after them (the previous turn's partial last block is free there), so its
    block table is one run, even with another request allocating in between."""
    manager = _manager(BlockGroupKVCacheManager, 1024)
    turn1 = _request("t1", list(range(10 * BLOCK + 2)))
    assert _admit(manager, turn1)[0] is not None
    for t in range(5):
        assert _decode(manager, turn1, 7000 + t) is not None
    history = list(turn1.all_token_ids)
    manager.free(turn1)
    other = _request("o", list(range(5000, 5000 + 3 * BLOCK)))
    assert _admit(manager, other)[0] is not None
    turn2 = _request("t2", history + [8000, 8001, 8002])
    new, hit = _admit(manager, turn2)
    assert hit == 11 * BLOCK and new is not None
    table = manager.get_block_ids("t2")[0]
    assert _runs(table) == 1, table
    manager.block_pool.check_block_groups()


def test_install_upgrades_in_place_and_is_idempotent():
    manager = _manager(KVCacheManager, 64)
    pool = manager.block_pool
    managers = manager.coordinator.single_type_managers
    assert install_block_groups(manager) is pool
    assert isinstance(pool, BlockGroupPool)
    assert all(m.block_pool is pool for m in managers)
    assert all(type(m).__bases__[0].__module__.startswith("vllm.") for m in managers)
    assert install_block_groups(manager) is pool  # again: unchanged
    assert type(managers[0]).__bases__[0].__module__.startswith("vllm.")


def test_adopt_refuses_a_used_or_foreign_pool():
    pool = BlockPool(16, enable_caching=True, hash_block_size=BLOCK)
    pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="handed out no block"):
        BlockGroupPool.adopt(pool)
    assert type(pool) is BlockPool

    class Other(BlockPool):
        pass

    with pytest.raises(TypeError):
        BlockGroupPool.adopt(Other(16, enable_caching=True, hash_block_size=BLOCK))


@pytest.mark.parametrize("bad", [{"block_order": "random"}, {"initial_group_blocks": 1},
                                 {"reuse_window_blocks": -1}, {"growth_quantum_blocks": 0},
                                 {"no_such_setting": 3}])
def test_config_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        BlockGroupConfig.from_dict(bad)


# -- the same prefix cache as vLLM's ---------------------------------------------------------

# Prompts share prefixes drawn from a few, so requests hit each other's cached blocks.
PREFIXES = [[9000 + i for i in range(n * BLOCK)] for n in (0, 2, 5)]

OPS = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.integers(0, len(PREFIXES) - 1), st.integers(1, 9)),
    st.tuples(st.just("decode"), st.integers(0, 7), st.integers(1, 6)),
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("evict"), st.integers(0, 7), st.integers(0, 5)),
    st.tuples(st.just("reset")),
), min_size=1, max_size=40)


class _Twin:
    """The same logical operations on vLLM's KVCacheManager and on kvswitch's, each with its
    own Request objects (block ids differ between the two)."""

    def __init__(self, num_blocks: int, hybrid: bool, **config):
        self.vllm = _manager(KVCacheManager, num_blocks, hybrid, enable_kv_cache_events=True)
        self.ours = _manager(BlockGroupKVCacheManager, num_blocks, hybrid,
                             enable_kv_cache_events=True,
                             block_group_config=BlockGroupConfig(**config))
        self.reqs: list[tuple[Request, Request]] = []
        # finished requests' (block id in vLLM's, in ours, prefix hash) per block: cached
        # blocks a connector may evict while they still hold that prefix
        self.freed: list[list[tuple[int, int, object]]] = []
        self.next_id = 0

    def step(self, op) -> None:
        kind = op[0]
        if kind == "admit":
            tokens = PREFIXES[op[1]] + [self.next_id * 100 + t for t in range(op[2])]
            pair = (_request(str(self.next_id), tokens), _request(str(self.next_id), tokens))
            self.next_id += 1
            (a, hit_a), (b, hit_b) = (_admit(self.vllm, pair[0]), _admit(self.ours, pair[1]))
            assert hit_a == hit_b, "prefix-cache hit differs from vLLM's"
            assert (a is None) == (b is None), "admission differs from vLLM's"
            if a is not None:
                self.reqs.append(pair)
        elif kind == "evict" and self.reqs and op[1] % 2:
            # a connector invalidates the same logical block of a running request in both
            ra, rb = self.reqs[op[1] // 2 % len(self.reqs)]
            ids_a = self.vllm.get_block_ids(ra.request_id)[0]
            ids_b = self.ours.get_block_ids(rb.request_id)[0]
            if ids_a:
                j = op[2] % len(ids_a)
                self.vllm.evict_blocks({ids_a[j]})
                self.ours.evict_blocks({ids_b[j]})
        elif kind == "evict" and self.freed:
            # ... or of a finished request, where that block still holds its prefix
            blocks = self.freed[op[1] // 2 % len(self.freed)]
            if blocks:
                a, b, key = blocks[op[2] % len(blocks)]
                # (a block handed out again may hold the same prefix anew, in one pool
                # and not the other: only a block that holds it in both is evicted)
                if (self.vllm.block_pool.blocks[a].block_hash == key
                        == self.ours.block_pool.blocks[b].block_hash):
                    self.vllm.evict_blocks({a})
                    self.ours.evict_blocks({b})
        elif kind in ("decode", "finish") and self.reqs:
            ra, rb = self.reqs[op[1] % len(self.reqs)]
            if kind == "decode":
                for t in range(op[2]):
                    a, b = _decode(self.vllm, ra, 50 + t), _decode(self.ours, rb, 50 + t)
                    assert (a is None) == (b is None), "decode slot differs from vLLM's"
                    if a is None:
                        break
            else:
                pool_a, pool_b = self.vllm.block_pool, self.ours.block_pool
                self.freed.append([
                    (a, b, pool_a.blocks[a].block_hash)
                    for a, b in zip(self.vllm.get_block_ids(ra.request_id)[0],
                                    self.ours.get_block_ids(rb.request_id)[0], strict=True)
                    if pool_a.blocks[a].block_hash is not None and a != 0])
                self.vllm.free(ra)
                self.ours.free(rb)
                self.reqs.remove((ra, rb))
        elif kind == "reset":
            assert self.vllm.reset_prefix_cache() == self.ours.reset_prefix_cache()
        pool_a, pool_b = self.vllm.block_pool, self.ours.block_pool
        assert pool_a.get_num_free_blocks() == pool_b.get_num_free_blocks()
        assert len(pool_a.cached_block_hash_to_block) == len(pool_b.cached_block_hash_to_block)
        # KV cache events name block hashes and tokens, not block ids: the same stream
        assert self.vllm.take_events() == self.ours.take_events(), "KV cache events differ"
        pool_b.check_block_groups()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, num_blocks=st.integers(12, 48), hybrid=st.booleans())
# A connector evicts the prefix of a free cached block (a's first): vLLM leaves the block
# where it was in its free queue, behind the older cached blocks, so the last admission
# evicts a's last cached block (a BlockRemoved event) and the uncached block stays free.
@example(ops=[("admit", 2, 1), ("finish", 0), ("admit", 0, 1), ("evict", 0, 0),
              ("admit", 2, 1)], num_blocks=12, hybrid=False)
def test_prefix_cache_matches_vllm_without_lead(ops, num_blocks, hybrid):
    """With reuse_window_blocks=0 every prefix hit, admission and decode slot equals vLLM's,
    the pool holds as many free and cached blocks, the KV cache events are vLLM's, and the
    pool's invariants hold."""
    twin = _Twin(num_blocks, hybrid, reuse_window_blocks=0)
    for op in ops:
        twin.step(op)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, num_blocks=st.integers(12, 48), window=st.integers(1, 48),
       order=st.sampled_from(["groups", "vllm"]))
def test_invariants_with_a_window_and_vllm_order(ops, num_blocks, window, order):
    """With a reuse window, which cached blocks go first may differ from vLLM's, but the
    pool's invariants hold under every operation."""
    ours = _manager(BlockGroupKVCacheManager, num_blocks,
                    block_group_config=BlockGroupConfig(reuse_window_blocks=window,
                                                        block_order=order))
    reqs: list[Request] = []
    for i, op in enumerate(ops):
        if op[0] == "admit":
            req = _request(str(i), PREFIXES[op[1]] + [i * 100 + t for t in range(op[2])])
            if _admit(ours, req)[0] is not None:
                reqs.append(req)
        elif op[0] == "decode" and reqs:
            for t in range(op[2]):
                _decode(ours, reqs[op[1] % len(reqs)], 50 + t)
        elif op[0] == "finish" and reqs:
            ours.free(reqs.pop(op[1] % len(reqs)))
        elif op[0] == "reset":
            ours.reset_prefix_cache()
        ours.block_pool.check_block_groups()


def _cached_pair(manager):
    """Requests a, then b, of 4 full blocks each, admitted and finished: 8 cached free
    blocks, a's the least recently used (a request frees its last block first)."""
    for name, first in (("a", 0), ("b", 100)):
        req = _request(name, list(range(first, first + 4 * BLOCK)))
        assert _admit(manager, req)[0] is not None
        manager.free(req)


def _hit(manager, first):
    """Prefix hit, in tokens, of a's (first=0) or b's (first=100) prompt; at most 3 blocks
    (a prompt's last token is always computed)."""
    return manager.get_computed_blocks(_request("x", list(range(first, first + 4 * BLOCK))))[1]


def test_reuse_window_keeps_blocks_cached_until_reused():
    """The window opens only when the free groups run short; its blocks are free for block
    groups, yet still hit until a group takes one (a hit claims the block back); taking
    one out of vLLM's order is counted (here a's first block: a's chain is gone, where
    vLLM would have taken a's last block first)."""
    ours = _manager(BlockGroupKVCacheManager, 40,
                    block_group_config=BlockGroupConfig(reuse_window_blocks=4))
    pool = ours.block_pool
    _cached_pair(ours)  # a: blocks 1-4, b: 16-19, cached, each with its tail kept
    assert pool.num_window_blocks == 0
    c = _request("c", list(range(500, 503)))
    assert _admit(ours, c)[0] is not None  # the last 9 free blocks: a group of 9
    assert pool.num_window_blocks == 0
    d = _request("d", list(range(600, 603)))
    assert _admit(ours, d)[0] is not None  # no free group: opens 1 + 4 (a's 4, b's last)
    assert ours.get_block_ids("d")[0] == [1]
    assert pool.block_run_stats().reused_out_of_order == 1
    assert pool.num_window_blocks == 4
    assert _hit(ours, 0) == 0
    b_longer = _request("b2", list(range(100, 100 + 4 * BLOCK)) + [7])
    assert _admit(ours, b_longer)[1] == 4 * BLOCK  # b's last block, in the window, hits
    assert pool.num_window_blocks == 3  # ... and was claimed back
    pool.check_block_groups()


def test_no_window_reuses_cached_blocks_in_vllms_order():
    ours = _manager(BlockGroupKVCacheManager, 40,
                    block_group_config=BlockGroupConfig(reuse_window_blocks=0))
    vllm = _manager(KVCacheManager, 40)
    for manager in (ours, vllm):
        _cached_pair(manager)
        big = _request("big", list(range(1000, 1000 + 33 * BLOCK)))
        assert _admit(manager, big)[0] is not None  # 31 free + a's 2 least recent blocks
    assert (_hit(vllm, 0), _hit(vllm, 100)) == (2 * BLOCK, 3 * BLOCK)
    assert (_hit(ours, 0), _hit(ours, 100)) == (2 * BLOCK, 3 * BLOCK)
    assert ours.block_pool.block_run_stats().reused_out_of_order == 0
    ours.block_pool.check_block_groups()


def test_reset_prefix_cache_restarts_the_allocator():
    manager = _manager(BlockGroupKVCacheManager, 64)
    req = _request("a", list(range(6 * BLOCK)))
    assert _admit(manager, req)[0] is not None
    assert not manager.reset_prefix_cache()  # a block is in use: vLLM refuses
    manager.free(req)
    assert manager.block_pool.num_retained_blocks == 6
    assert manager.reset_prefix_cache()
    pool = manager.block_pool
    assert pool.num_retained_blocks == 0
    assert pool.allocator.num_free_blocks == pool.num_gpu_blocks - 1  # all but the null block
    pool.check_block_groups()


def test_touch_of_a_free_uncached_block_claims_it():
    """A connector may touch a block by id that holds no prefix (e.g. a load target); it
    must leave the allocator's free space so block groups do not hand it out twice."""
    pool = BlockGroupPool(64, enable_caching=True, hash_block_size=BLOCK)
    block = pool.blocks[40]
    pool.touch([block])
    assert block.ref_cnt == 1
    pool.check_block_groups()
    handed = {b.block_id for b in pool.get_new_blocks(62)}
    assert 40 not in handed
    pool.free_blocks([block])
    pool.check_block_groups()


def test_unpinned_blocks_are_retained_until_evicted_in_order():
    pool = BlockGroupPool(16, enable_caching=False, hash_block_size=BLOCK,
                          config=BlockGroupConfig(reuse_window_blocks=0))
    pool.allocating_for(("r", 0))
    blocks = pool.get_new_blocks(4)
    reused = []
    pool.unpin_blocks(blocks[:2], reused.append)
    assert pool.num_retained_blocks == 2
    pool.check_block_groups()
    pool.allocating_for(("s", 0))
    pool.get_new_blocks(pool.get_num_free_blocks() - 2)  # everything not retained
    assert reused == []
    pool.get_new_blocks(1)  # now the first unpinned block goes, and its reader is told
    assert [b.block_id for b in reused] == [blocks[0].block_id]
    pool.check_block_groups()


def test_hybrid_groups_each_get_their_own_block_groups():
    """Full attention and sliding window groups of one request grow in separate groups
    (one allocator sequence per (request, KV-cache group))."""
    manager = _manager(BlockGroupKVCacheManager, 512, hybrid=True)
    reqs = [_request(str(i), [i * 1000 + t for t in range(2 * BLOCK)]) for i in range(4)]
    for r in reqs:
        assert _admit(manager, r)[0] is not None
    for step in range(20 * BLOCK):
        for r in reqs:
            assert _decode(manager, r, step) is not None
    for r in reqs:
        full, swa = manager.get_block_ids(r.request_id)
        assert _runs(full) <= 2
        live = [b for b in swa if b != 0]  # the sliding window frees (nulls) old blocks
        assert _runs(live) <= 2
    manager.block_pool.check_block_groups()


# -- the schedulers --------------------------------------------------------------------------

MODEL_DIR = (Path(__file__).parent / "vllm_support" / "hf_cache" / "hub"
             / "models--facebook--opt-125m" / "snapshots" / "local")


def _vllm_config(*, additional_config=None, kv_transfer_config=None):
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    model = ModelConfig(model=str(MODEL_DIR), skip_tokenizer_init=True, dtype="float16",
                        seed=0)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=4096, max_model_len=2048,
                            is_encoder_decoder=False, enable_chunked_prefill=True,
                            scheduler_cls="kvswitch.adapters.vllm.BlockGroupScheduler")
    cache = CacheConfig(block_size=16, enable_prefix_caching=True)
    return VllmConfig(scheduler_config=sched, model_config=model, cache_config=cache,
                      additional_config=additional_config or {},
                      kv_transfer_config=kv_transfer_config)


def _scheduler(vllm_config, num_blocks=256):
    from vllm.v1.structured_output import StructuredOutputManager

    group = KVCacheGroupSpec(["layer"], FullAttentionSpec(
        block_size=16, num_kv_heads=1, head_size=1, dtype=torch.float32))
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[group])
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    cls = vllm_config.scheduler_config.get_scheduler_cls()
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config, block_size=16,
               log_stats=True, structured_output_manager=StructuredOutputManager(vllm_config))


@pytest.fixture
def block_group_log():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.kvswitch.block_groups")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(old)


def test_scheduler_cls_selects_it_and_logs(block_group_log):
    vllm_config = _vllm_config(additional_config={"kvswitch": {"reuse_window_blocks": 3}})
    scheduler = _scheduler(vllm_config)
    assert type(scheduler) is BlockGroupScheduler
    pool = scheduler.kv_cache_manager.block_pool
    assert scheduler.block_group_pool is pool and isinstance(pool, BlockGroupPool)
    assert pool.reuse_window_blocks == 3
    assert any("GPU blocks in block groups" in r.getMessage() for r in block_group_log)


def test_scheduler_runs_requests_with_block_groups():
    """vLLM's schedule / update loop (chunked prefill, decode) over block groups."""
    from vllm.v1.outputs import ModelRunnerOutput

    scheduler = _scheduler(_vllm_config())
    for i in range(4):
        scheduler.add_request(_request(str(i), [i * 1000 + t for t in range(40)]))
    for _ in range(30):
        out = scheduler.schedule()
        ids = list(out.num_scheduled_tokens)
        runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                   sampled_token_ids=[[5] for _ in ids])
        scheduler.update_from_output(out, runner)
    pool = scheduler.kv_cache_manager.block_pool
    for i in range(4):
        assert _runs(scheduler.kv_cache_manager.get_block_ids(str(i))[0]) == 1
    pool.check_block_groups()


def test_async_scheduling_gets_the_async_scheduler():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    vllm_config = _vllm_config()
    vllm_config.scheduler_config.async_scheduling = True  # the CPU platform turns it off
    scheduler = _scheduler(vllm_config)
    assert type(scheduler) is AsyncBlockGroupScheduler
    assert isinstance(scheduler, AsyncScheduler) and isinstance(scheduler, BlockGroupScheduler)
    assert isinstance(scheduler.kv_cache_manager.block_pool, BlockGroupPool)


def test_offloading_connector_stats_report_block_runs():
    from vllm.config import KVTransferConfig

    vllm_config = _vllm_config(kv_transfer_config=KVTransferConfig(
        kv_connector="OffloadingConnector", kv_role="kv_both",
        kv_connector_extra_config={"spec_name": "KVSwitchOffloadingSpec",
                                   "spec_module_path": "kvswitch.adapters.vllm",
                                   "cpu_bytes_to_use": 1 << 20}))
    scheduler = _scheduler(vllm_config)
    manager = scheduler.connector.connector_scheduler.manager
    assert isinstance(manager, KVSwitchOffloadingManager)
    scheduler.add_request(_request("a", list(range(40))))
    scheduler.schedule()  # (update_from_output would take the stats into its own)
    reduced = manager.get_stats().reduce()
    assert reduced["kvswitch:gpu_blocks_allocated"] == 3  # 40 tokens, block 16
    assert reduced["kvswitch:gpu_block_runs_started"] == 1
    assert reduced["kvswitch:gpu_blocks_reused_out_of_order"] == 0
    assert set(manager.get_stats().reduce()) >= {"kvswitch:gpu_blocks_allocated"}
    assert manager.get_stats().reduce()["kvswitch:gpu_blocks_allocated"] == 0  # taken

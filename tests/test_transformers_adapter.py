"""transformers adapter: paged decoding equals the model's own generate(), across swaps.

Tiny random-weight models (2 layers, hidden 64, 4 query heads over 2 KV heads, vocab 128,
float32) decode several sequences together over a kvswitch pool; sequences are preempted at
random iterations (often mid-block), swapped out through an AsyncSwapEngine with worker
threads, and swapped back in to other block ids. Tokens must equal greedy
``model.generate()`` with its default (sdpa, DynamicCache) path, and logits agree within
float32 tolerance.
"""

from __future__ import annotations

import copy
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvswitch import (  # noqa: E402
    AsyncSwapEngine,
    BlockGroupAllocator,
    HostKVPool,
    SwapManager,
)
from kvswitch.adapters.transformers import (  # noqa: E402
    PagedBatch,
    PagedInput,
    PagedKVCache,
    PagedModelRunner,
    UnsupportedModelError,
    model_spec,
)

BLOCK = 4  # tokens per block: small, so preemptions often fall mid-block
ATOL = 1e-4  # float32 logits of a 2-layer model: differences are ~1e-7 in practice

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, initializer_range=0.2)


def tiny_config(family: str = "llama", **overrides):
    kw = {**TINY, **overrides}
    if family == "llama":
        return transformers.LlamaConfig(**kw)
    if family == "mistral":
        return transformers.MistralConfig(**{"sliding_window": None, **kw})
    if family == "qwen2":
        return transformers.Qwen2Config(**kw)
    if family == "qwen3":
        return transformers.Qwen3Config(**kw)
    raise AssertionError(family)


def model_pair(family: str = "llama", seed: int = 0):
    """(reference model, paged copy with the same weights and its own config)."""
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    return ref, copy.deepcopy(ref)


def reference(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their logits ``[n, vocab]`` from the model's own generate()."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0]


def make_manager(cache: PagedKVCache, host_blocks: int, *, workers: int = 2) -> SwapManager:
    """A SwapManager over the pool: small initial groups (tight pools), host pool of
    ``host_blocks``, a host-backend engine with worker threads (asynchronous copies)."""
    engine = AsyncSwapEngine(cache.layout, HostKVPool(cache.layout, host_blocks, pin=False),
                             backend="host", num_workers=workers)
    return SwapManager(BlockGroupAllocator(cache.num_blocks, initial_group_blocks=2), engine,
                       BlockGroupAllocator(host_blocks, initial_group_blocks=2),
                       block_size=cache.block_size, swap_in="async")


@dataclass
class Seq:
    """A sequence of the decode loop."""

    sid: str
    prompt: list[int]
    max_new: int
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    num_cached: int = 0
    pending: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) == self.max_new


def step(runner: PagedModelRunner, swapper: SwapManager, seqs: list[Seq]) -> None:
    """One iteration: grow block tables, one batched forward, greedy sampling."""
    for s in seqs:
        have = swapper.gpu.num_table_blocks(s.sid) if s.sid in swapper.gpu else 0
        need = runner.cache.blocks_for(s.num_cached + len(s.pending)) - have
        if need > 0:
            swapper.allocate(s.sid, need)
    logits = runner([PagedInput(s.pending, swapper.block_table(s.sid), s.num_cached)
                     for s in seqs])
    for s, row in zip(seqs, logits, strict=True):
        s.num_cached += len(s.pending)
        tok = int(row.argmax())
        s.tokens.append(tok)
        s.logits.append(row)
        s.pending = [tok]


def assert_matches_reference(ref_model, seqs: list[Seq]) -> None:
    for s in seqs:
        tokens, logits = reference(ref_model, s.prompt, s.max_new)
        assert s.tokens == tokens, s.sid
        torch.testing.assert_close(torch.stack(s.logits), logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------- equality


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_continuous_batch_matches_generate(family):
    """Sequences join at different iterations (prefill and decode in one batch)."""
    ref, model = model_pair(family)
    cache = PagedKVCache.for_model(model, num_blocks=64, block_size=BLOCK)
    runner = PagedModelRunner(model, cache)
    gen = torch.Generator().manual_seed(1)
    seqs = [Seq(f"s{i}", torch.randint(0, 128, (n,), generator=gen).tolist(), max_new=10)
            for i, n in enumerate((5, 11, 1, 8))]
    starts = {"s0": 0, "s1": 0, "s2": 3, "s3": 6}
    swapper = make_manager(cache, host_blocks=8)
    try:
        it = 0
        while not all(s.done for s in seqs):
            for s in seqs:
                if starts[s.sid] == it:
                    s.pending = list(s.prompt)
            active = [s for s in seqs if s.pending and not s.done]
            step(runner, swapper, active)
            it += 1
    finally:
        swapper.close()
    assert_matches_reference(ref, seqs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preemption_at_random_iterations_matches_generate(seed):
    """Preempt random running sequences (often mid-block), swap them out through the async
    engine and back in later (Algorithm 1's poll/decide loop); the tight GPU pool hands
    their old blocks to others, so they resume at other block ids.

    A sequence swapped in at iteration i rejoins at i + 1 (waited for if poll/decide did
    not report it yet), so which sequences run, and so every random draw, follows from
    the seed alone, never from how fast the worker threads were."""
    rng = random.Random(seed)
    ref, model = model_pair("llama", seed)
    cache = PagedKVCache.for_model(model, num_blocks=24, block_size=BLOCK)
    runner = PagedModelRunner(model, cache)
    gen = torch.Generator().manual_seed(seed)
    seqs = [Seq(f"s{i}", torch.randint(0, 128, (rng.randint(1, 9),), generator=gen).tolist(),
                max_new=rng.randint(8, 14)) for i in range(4)]
    for s in seqs:
        s.pending = list(s.prompt)
    manager = make_manager(cache, host_blocks=48)
    comeback: dict[str, int] = {}  # swapped-out sid -> iteration at which it swaps in
    joining: dict[str, int] = {}  # swapped-in sid -> iteration of its swap-in
    before: dict[str, np.ndarray] = {}  # block table at swap-out
    resumed: list[tuple[np.ndarray, np.ndarray]] = []  # (table before, table after)
    mid_block = 0
    try:
        for it in range(300):
            for sid in [s for s, at in joining.items() if at < it]:
                if sid in manager.swapping_in:
                    manager.wait_swap_in(sid)
                del joining[sid]
            for sid, back in list(comeback.items()):
                if back <= it:
                    del comeback[sid]
                    resumed.append((before.pop(sid), manager.swap_in(sid).copy()))
                    joining[sid] = it
            manager.poll()
            manager.decide(len(seqs), 0.001)
            away = set(comeback) | set(joining)
            running = [s for s in seqs if not s.done and s.sid not in away]
            candidates = [s for s in running if s.num_cached > 0]
            if candidates and rng.random() < 0.4:
                victim = rng.choice(candidates)
                before[victim.sid] = manager.block_table(victim.sid).copy()
                mid_block += victim.num_cached % BLOCK != 0
                manager.swap_out(victim.sid, victim.num_cached, priority=rng.random())
                comeback[victim.sid] = it + rng.randint(1, 3)
                running.remove(victim)
            if running:
                step(runner, manager, running)
            for s in running:
                if s.done:
                    manager.free(s.sid)
            if all(s.done for s in seqs):
                break
    finally:
        manager.close()
    assert all(s.done for s in seqs)
    assert len(resumed) >= 3 and mid_block >= 1
    assert manager.stats().swap_ins == len(resumed)
    assert any(not np.array_equal(old, new) for old, new in resumed)
    assert_matches_reference(ref, seqs)


def test_contaminated_cpu_copy_is_copied_again():
    """A's backup loses its tail to B's swap-out; A's next swap-out copies those blocks
    again (the host blocks now hold B's KV) and A still decodes exactly."""
    ref, model = model_pair("llama", seed=3)
    cache = PagedKVCache.for_model(model, num_blocks=32, block_size=BLOCK)
    runner = PagedModelRunner(model, cache)
    gen = torch.Generator().manual_seed(3)
    a = Seq("A", torch.randint(0, 128, (10,), generator=gen).tolist(), max_new=12)
    b = Seq("B", torch.randint(0, 128, (21,), generator=gen).tolist(), max_new=8)
    a.pending, b.pending = list(a.prompt), list(b.prompt)
    sw = make_manager(cache, host_blocks=8)
    try:
        for _ in range(4):  # A: 10 + 3 fed -> 13 tokens cached (4 blocks, last partial)
            step(runner, sw, [a])
        assert a.num_cached == 13
        sw.swap_out("A", a.num_cached, priority=0.0)
        old_a = sw.tracker.host_block_table("A")
        sw.swap_in("A")
        sw.wait_swap_in("A")  # A's CPU copy (4 host blocks) stays as a backup
        for _ in range(4):  # A: 17 cached (5 blocks); B: 21 + 3 = 24 cached (6 blocks)
            step(runner, sw, [a, b])
        assert (a.num_cached, b.num_cached) == (17, 24)
        sw.swap_out("B", b.num_cached, priority=1.0)  # needs 6 of 8 host blocks: reclaims 2
        assert sw.tracker.stats().blocks_reclaimed == 2
        assert sw.tracker.valid_blocks("A").tolist() == [True, True, False, False]
        taken = set(old_a[2:].tolist())
        assert taken <= set(sw.tracker.host_block_table("B").tolist())  # B's KV is there now
        sw.swap_in("B")
        sw.wait_swap_in("B")
        table_before = sw.block_table("A").copy()
        plan = sw.swap_out("A", a.num_cached)  # reclaims B's backup tail in turn
        # logical 0, 1 reused; 2 contaminated, 3 stale (grew from 1 to 4 tokens), 4 new
        assert (plan.copied_blocks, plan.reused_blocks) == (3, 2)
        step(runner, sw, [b])
        table_after = sw.swap_in("A")
        sw.wait_swap_in("A")
        assert not np.array_equal(table_before, table_after)
        while not (a.done and b.done):
            step(runner, sw, [s for s in (a, b) if not s.done])
    finally:
        sw.close()
    assert_matches_reference(ref, [a, b])


# ------------------------------------------------------------------------- pool, errors


def test_pool_layout_is_one_region_per_layer_and_kv():
    cfg = tiny_config()
    cache = PagedKVCache(cfg, num_blocks=10, block_size=BLOCK, dtype=torch.float16)
    assert len(cache.key_cache) == len(cache.value_cache) == 2
    assert cache.key_cache[0].shape == (10, BLOCK, 2, 16)
    assert cache.layout.num_regions == 4 and cache.layout.num_blocks == 10
    assert cache.bytes_per_block == 4 * BLOCK * 2 * 16 * 2
    assert cache.layout.regions[1].base == cache.value_cache[0].data_ptr()
    assert cache.blocks_for(9) == 3 and cache.blocks_for(8) == 2


@pytest.mark.parametrize("family, overrides, match", [
    ("mistral", {"sliding_window": 4096}, "sliding-window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     "sliding-window"),
    ("llama", {"num_key_value_heads": 3}, "multiple"),
])
def test_unsupported_configs_raise(family, overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        PagedKVCache(tiny_config(family, **overrides), num_blocks=4)


def test_unsupported_model_type_raises_value_error():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        model_spec(cfg)


def test_runner_rejects_a_mismatched_pool_and_bare_calls():
    ref, model = model_pair()
    other = PagedKVCache(tiny_config(num_key_value_heads=4), num_blocks=8)
    with pytest.raises(ValueError, match="pool was made for"):
        PagedModelRunner(model, other)
    PagedModelRunner(model, PagedKVCache.for_model(model, num_blocks=8))
    with pytest.raises(RuntimeError, match="kvswitch_batch"):
        model(torch.tensor([[1, 2, 3]]), use_cache=False)
    ref(torch.tensor([[1, 2, 3]]))  # the reference keeps its own attention (own config)


def test_batch_build_validates_tables():
    cache = PagedKVCache(tiny_config(), num_blocks=8, block_size=BLOCK)
    with pytest.raises(ValueError, match="need 2"):
        PagedBatch.build(cache, [4], [1], [[0]])  # 5 tokens need 2 blocks
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        PagedBatch.build(cache, [0], [3], [[8]])
    with pytest.raises(ValueError, match="share blocks"):
        PagedBatch.build(cache, [0, 0], [2, 2], [[5], [5]])
    with pytest.raises(ValueError, match="num_new >= 1"):
        PagedBatch.build(cache, [0], [0], [[1]])
    batch = PagedBatch.build(cache, [5, 0], [1, 3], [[2, 6], [4]])
    assert batch.write_slots.tolist() == [6 * BLOCK + 1, 4 * BLOCK, 4 * BLOCK + 1,
                                          4 * BLOCK + 2]
    assert batch.position_ids.tolist() == [[5, 5, 5], [0, 1, 2]]
    assert batch.mask.shape == (2, 1, 3, 6)
    assert batch.mask[0, 0, 0].tolist() == [True] * 6
    assert batch.mask[1, 0, 1].tolist() == [True, True, False, False, False, False]


def test_import_kvswitch_does_not_import_torch():
    code = "import sys, kvswitch; assert 'torch' not in sys.modules; assert 'transformers' "\
           "not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_custom_loop_example_runs():
    example = Path(__file__).resolve().parents[1] / "examples" / "custom_loop.py"
    out = subprocess.run(
        [sys.executable, str(example), "--device", "cpu", "--conversations", "4",
         "--max-turns", "2", "--gpu-blocks", "16", "--batch", "3", "--priority-every", "3"],
        check=True, capture_output=True, text=True, timeout=300).stdout
    assert "4 conversations" in out and "TTFT" in out and "TBT" in out
    swap_outs = re.search(r"swap-outs (\d+) \((\d+) preemptions", out)
    assert swap_outs is not None and int(swap_outs[2]) > 0, out  # the pool forces preemptions

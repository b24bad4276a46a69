"""A custom decoding loop: a transformers Llama over kvswitch-managed paged KV.

Builds a small Llama from a config with random weights (no downloads), replays multi-turn
conversations of the bundled ShareGPT trace (token counts scaled down to the small model)
with continuous batching, and preempts by priority: every few iterations the
conversations' priorities are redrawn (the FastSwitch paper's Random pattern), the
highest-priority ones run, the others are swapped out to the host pool through a
``kvswitch.SwapManager`` and swapped back in later to whichever GPU blocks are free
then. A conversation's KV also goes to the host pool between its turns, and its next
swap-out reuses that CPU copy. Prints TTFT/TBT and swap statistics.

    pip install ".[transformers]" && python examples/custom_loop.py

Runs on the CPU (the "GPU pool" is then host memory and the swap engine uses memcpy) and on
CUDA when a GPU is present (``--device cuda``; the default picks CUDA when available).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvswitch import (
    AsyncSwapEngine,
    BlockGroupAllocator,
    HostKVPool,
    OutOfBlocksError,
    SwapManager,
)
from kvswitch.adapters.transformers import PagedInput, PagedKVCache, PagedModelRunner
from kvswitch.trace import load_trace, sample


@dataclass
class Chat:
    """One conversation of the trace, replayed turn by turn."""

    cid: str
    turns: list[tuple[int, int]]  # (new input tokens, output tokens), scaled
    turn: int = 0
    num_cached: int = 0  # tokens whose KV is in the pool (GPU or host)
    pending: list[int] = field(default_factory=list)  # tokens to feed next iteration
    generated: int = 0  # output tokens of the current turn so far
    ready_at: float = 0.0  # when the current turn's input arrived (seconds)
    last_token_at: float | None = None
    priority: float = 0.0
    on_gpu: bool = False  # holds GPU blocks (running, or swapping in)

    @property
    def finished(self) -> bool:
        return self.turn == len(self.turns)


def build_model(device: torch.device, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=32, max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def scaled_chats(n: int, seed: int, scale: int, max_turns: int, cap: int) -> list[Chat]:
    """Conversations of the bundled trace with token counts divided by ``scale``."""
    chats = []
    for conv in sample(load_trace(None), n, seed):
        turns = [(min(cap, max(1, t.new_input_tokens // scale)),
                  min(cap, max(1, t.output_tokens // scale))) for t in conv.turns[:max_turns]]
        chats.append(Chat(conv.conversation_id, turns))
    return chats


def percentile_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1e3:8.1f} ms" if values else "       -"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--batch", type=int, default=4, help="conversations running at once")
    ap.add_argument("--gpu-blocks", type=int, default=40, help="GPU pool size, in blocks")
    ap.add_argument("--host-blocks", type=int, default=1024, help="host pool size, in blocks")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--scale", type=int, default=8, help="divide the trace's token counts")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-turn-tokens", type=int, default=48)
    ap.add_argument("--priority-every", type=int, default=8,
                    help="iterations between priority updates")
    ap.add_argument("--think-s", type=float, default=0.02,
                    help="seconds between a turn's end and the next turn's input")
    args = ap.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    model = build_model(device, args.seed)
    cache = PagedKVCache.for_model(model, args.gpu_blocks, block_size=args.block_size)
    runner = PagedModelRunner(model, cache)
    host = HostKVPool(cache.layout, args.host_blocks)
    engine = AsyncSwapEngine(cache.layout, host)
    manager = SwapManager(BlockGroupAllocator(cache.num_blocks), engine,
                          BlockGroupAllocator(args.host_blocks), block_size=cache.block_size)
    chats = scaled_chats(args.conversations, args.seed, args.scale, args.max_turns,
                         args.max_turn_tokens)
    longest = max(sum(i + o for i, o in c.turns) for c in chats)
    if cache.blocks_for(longest) > cache.num_blocks:
        ap.error(f"a conversation reaches {longest} tokens ({cache.blocks_for(longest)} blocks) "
                 f"but the GPU pool holds {cache.num_blocks} blocks: raise --gpu-blocks")
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()

    def sync_compute() -> None:
        # The swap engine must not read blocks before the model's writes to them land.
        # SwapManager takes no stream to order against, so wait for the compute stream.
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def start_turn(c: Chat, now: float) -> None:
        c.pending += rng.choices(range(model.config.vocab_size), k=c.turns[c.turn][0])
        c.generated, c.ready_at, c.last_token_at = 0, now, None

    def swap_out(c: Chat) -> None:
        sync_compute()
        manager.swap_out(c.cid, c.num_cached, priority=c.priority)
        c.on_gpu = False

    def allocate(c: Chat, need: int, want: list[Chat], batch: list[Chat]) -> bool:
        """Grow c's block table. When the pool is full, preempt the lowest-priority
        running conversation not yet in this batch, or c itself if it is the lowest."""
        while True:
            try:
                manager.allocate(c.cid, need)
                return True
            except OutOfBlocksError:
                others = [w for w in want if w is not c and w not in batch and w.on_gpu
                          and w.num_cached and w.cid not in manager.swapping_in]
                victim = min(others, key=lambda w: w.priority, default=c)
                if victim.priority > c.priority:
                    victim = c
                if victim is c and not c.num_cached:
                    return False  # a new conversation: it waits for free blocks
                swap_out(victim)
                counts["preemptions"] += 1
                if victim is c:
                    return False

    t0 = time.perf_counter()
    for c in chats:
        start_turn(c, 0.0)
    next_turn_at: dict[str, float] = {}  # chat -> when its next turn's input arrives
    ttft, tbt, iter_s = [], [], []
    tokens = iterations = 0
    while not all(c.finished for c in chats):
        now = time.perf_counter() - t0
        for cid, at in list(next_turn_at.items()):
            if at <= now:
                del next_turn_at[cid]
                start_turn(next(c for c in chats if c.cid == cid), now)
        if iterations % args.priority_every == 0:  # priority update (Random pattern)
            for c in chats:
                c.priority = rng.random()
        manager.poll()
        for cid, error in manager.take_failed().items():  # a copy failed: that KV is lost
            c = next(c for c in chats if c.cid == cid)
            print(f"conversation {cid} dropped: {error}")  # a real engine would recompute
            manager.free(cid)
            c.turn, c.on_gpu = len(c.turns), False
            next_turn_at.pop(cid, None)
            counts["failed"] += 1
        active = [c for c in chats if not c.finished and c.pending and c.cid not in next_turn_at]
        want = sorted(active, key=lambda c: -c.priority)[: args.batch]
        # Preempt running conversations that lost their place; bring wanted ones back.
        for c in active:
            if c.on_gpu and c not in want and c.num_cached and c.cid not in manager.swapping_in:
                swap_out(c)
                counts["preemptions"] += 1
        for c in want:
            if not c.on_gpu and c.num_cached:
                need = cache.blocks_for(c.num_cached + len(c.pending))
                if manager.gpu.num_free_blocks >= need:
                    manager.swap_in(c.cid)
                    c.on_gpu = True
        manager.decide(len(want), float(np.mean(iter_s[-8:])) if iter_s else 0.01)
        batch = []
        for c in want:
            if c.num_cached and (not c.on_gpu or c.cid in manager.swapping_in):
                continue  # still on the host, or its copies are in flight
            have = manager.gpu.num_table_blocks(c.cid) if c.cid in manager.gpu else 0
            need = cache.blocks_for(c.num_cached + len(c.pending)) - have
            if need > 0 and not allocate(c, need, want, batch):
                continue
            c.on_gpu = True
            batch.append(c)
        if not batch:
            time.sleep(0.001)  # only swaps or think time pending
            continue
        start = time.perf_counter()
        logits = runner([PagedInput(c.pending, manager.block_table(c.cid), c.num_cached)
                         for c in batch])
        next_tokens = logits.argmax(-1).tolist()
        end = time.perf_counter()
        iter_s.append(end - start)
        iterations += 1
        for c, tok in zip(batch, next_tokens, strict=True):
            c.num_cached += len(c.pending)
            c.pending = [tok]
            c.generated += 1
            tokens += 1
            if c.last_token_at is None:
                ttft.append(end - t0 - c.ready_at)
            else:
                tbt.append(end - c.last_token_at)
            c.last_token_at = end
            if c.generated == c.turns[c.turn][1]:  # end of turn
                c.turn += 1
                if c.finished:
                    manager.free(c.cid)
                    c.on_gpu = False
                else:  # keep the KV on the host until the user answers
                    swap_out(c)
                    next_turn_at[c.cid] = end - t0 + args.think_s
    manager.synchronize()
    wall = time.perf_counter() - t0
    s, e = manager.stats(), engine.stats()
    mib = cache.layout.nbytes / 2**20
    print(f"model: Llama {model.config.num_hidden_layers} layers x {model.config.hidden_size} "
          f"(random weights), {cache.dtype}, on {device}")
    print(f"pools: GPU {cache.num_blocks} blocks x {cache.block_size} tokens ({mib:.1f} MiB), "
          f"host {host.num_blocks} blocks; swap backend {engine.backend}")
    print(f"{len(chats)} conversations, {sum(len(c.turns) for c in chats)} turns, {tokens} "
          f"tokens in {iterations} iterations, {wall:.2f} s ({tokens / wall:.0f} tokens/s)")
    print(f"TTFT  p50 {percentile_ms(ttft, 50)}   p99 {percentile_ms(ttft, 99)}")
    print(f"TBT   p50 {percentile_ms(tbt, 50)}   p99 {percentile_ms(tbt, 99)}")
    print(f"swap-outs {s.swap_outs} ({counts['preemptions']} preemptions, the rest at turn "
          f"ends): {s.copied_blocks} blocks copied, {s.reused_blocks} reused from CPU copies")
    print(f"swap-ins {s.swap_ins}: {s.swap_in_blocks} blocks; {s.copies} copies of "
          f"{s.bytes_copied / 2**20:.1f} MiB, {e['gbps']:.2f} GB/s; conflicts {s.conflicts}; "
          f"swap-in decisions sync {s.sync_decisions} / async {s.async_decisions}; "
          f"stalled {s.stall_s * 1e3:.1f} ms")
    manager.close()


if __name__ == "__main__":
    main()

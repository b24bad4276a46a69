"""A serving loop that replays a multi-turn trace over a SwapManager: ``kvswitch bench``.

Two clocks (``ServeConfig.clock``):

* ``"virtual"`` (default): a discrete-event loop. A model step takes the cost model's time
  ([`CostModel`][]); every swap, migration and conflict wait
  takes the link model's ([`kvswitch.bench.link_model`][]), asynchronous copies
  overlapping the steps as copy engines would ([`kvswitch.bench.virtual_clock`][]). Every
  swap is still a real copy through [`AsyncSwapEngine`][] (host backend,
  inline; one copy per extent of two pools of one 16-byte region, standing for the
  preset's copy per extent and region that the link model times and the table counts),
  and every swap-in's bytes are checked against what was swapped out (each block holds its
  conversation, logical block and token count: a stale reused copy or a lost migration
  raises). Nothing
  is slept and no host timing enters a figure, so the same seed and options give the same
  figures on any machine, busy or quiet; only ``wall_s`` differs.
* ``"wall"``: scaled real time. Every swap is a real copy timed on this machine, and the
  time the loop is blocked on swaps is measured. The model step is spent as real elapsed
  time (the loop sleeps while the swap workers copy), so asynchronous swaps overlap with
  it for real. With time scale ``S`` the run is ``S`` times faster than the system it
  models: a modelled step of ``t`` seconds is slept as ``t / S``; a measured stall of ``w``
  seconds counts as ``w * S`` on the modelled clock; each block carries ``1 / S`` of the
  preset's bytes, so a copy's measured time times ``S`` stands for the preset's bytes at
  this machine's copy bandwidth (per-copy overheads are scaled by ``S`` as well);
  migrations are charged the cost model's HBM time. Its figures follow the machine's
  load. The only clock of the ``"cuda"`` backend.

Backends (``ServeConfig.backend``): ``"host"`` (default) copies between two pools in host
memory with memcpy. ``"cuda"`` (wall clock, time scale 1) puts the device pool on GPU 0 as
PyTorch tensors in vLLM's per-layer layout (``[2, blocks, block_size, kv_heads,
head_dim]``, the preset's dtype) and the host pool in pinned memory, so every swap is a
real GPU <-> host copy of the preset's real block bytes (2 MiB per Llama-3-8B block). The
model's compute is modelled, not run on the GPU, in both.

Scheduling (vLLM-style continuous batching with a priority scheduler, FastSwitch section
4.4): every iteration, finished swap-ins join the batch (Algorithm 1 step 1); waiting and
preempted sequences are admitted in priority order while their blocks fit (history swapped
in, new input prefilled with the history as prefix); at a priority update, a waiting
sequence that does not fit preempts running ones of lower priority; a decode that needs a
block in a full pool preempts the lowest-priority running sequence; the adaptive strategy
decides whether pending swap-ins are waited for (step 4). Every running sequence decodes
one token per iteration; a turn's prefill emits its first token. A finished turn's KV is
swapped out until the conversation's next turn arrives, a think time later. When the host
pool cannot hold a swap-out, the CPU copies of idle conversations are dropped, oldest
first, and their next turn recomputes the history in its prefill.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvswitch.allocator import BlockGroupAllocator, OutOfBlocksError
from kvswitch.bench.cost_model import GPU_PRESETS, MODEL_PRESETS, CostModel, ModelPreset
from kvswitch.bench.link_model import LINK_PRESETS, CopyQueues, LinkModel
from kvswitch.bench.priority import PriorityPattern, PriorityScheduler
from kvswitch.bench.virtual_clock import VirtualClock, VirtualSwapEngine
from kvswitch.host_pool import HostKVPool
from kvswitch.layout import KVLayout
from kvswitch.manager import DEFAULT_COMPACTION_MAX_MOVED, SwapManager
from kvswitch.swap import AsyncSwapEngine
from kvswitch.trace import Conversation

__all__ = [
    "ABLATIONS", "CONFIGURATIONS", "Mechanisms", "ServeConfig", "ServeResult",
    "cuda_unavailable_reason",
    "RunEstimate", "capacity_rate", "estimate_run", "machine_speed", "min_gpu_blocks",
    "serve",
]


@dataclass(frozen=True)
class Mechanisms:
    """Which FastSwitch mechanisms a configuration uses."""

    block_groups: bool  #: group allocator and one copy per extent (else vLLM: per block)
    async_swaps: bool  #: asynchronous swap-out and adaptive swap-in (else blocking swaps)
    reuse: bool  #: CPU copies reused across swap-outs
    #: GPU-pool compaction on swap-in (SwapManager(compaction=True); beyond the paper)
    compaction: bool = False
    #: the GPU allocator's default growth quantum (else 1: a tail split under pressure
    #: takes only the blocks missing); block groups only
    growth_quantum: bool = True


CONFIGURATIONS: dict[str, Mechanisms] = {
    "baseline": Mechanisms(False, False, False),  # vLLM's swap path
    "groups": Mechanisms(True, False, False, compaction=True),
    "groups+async": Mechanisms(True, True, False, compaction=True),
    "full": Mechanisms(True, True, True, compaction=True),
}

#: Configurations run only when named in ``--configs``: each default configuration with
#: compaction off, or with a growth quantum of 1 block, so that each one's effect is
#: measured side by side in one run (issue 14).
ABLATIONS: dict[str, Mechanisms] = {
    **{f"{name}-nocompact": Mechanisms(m.block_groups, m.async_swaps, m.reuse)
       for name, m in CONFIGURATIONS.items() if m.compaction},
    **{f"{name}-noquantum": Mechanisms(m.block_groups, m.async_swaps, m.reuse,
                                       compaction=m.compaction, growth_quantum=False)
       for name, m in CONFIGURATIONS.items() if m.block_groups},
}


@dataclass(frozen=True)
class ServeConfig:
    """Parameters of [`serve`][] (seconds are modelled seconds)."""

    model: str = "llama-3-8b"  #: key of MODEL_PRESETS
    gpu: str = "a100"  #: key of GPU_PRESETS
    gpu_blocks: int = 10000  #: GPU pool, blocks of ``block_size`` tokens (20 GiB of Llama-3-8B KV)
    host_blocks: int = 30720  #: host pool (60 GiB of Llama-3-8B KV, the paper's setup)
    block_size: int = 16
    arrival_rate: float = 1.0  #: conversations per second, Poisson (unless the trace has times)
    think_s: float = 10.0  #: mean think time between turns, exponential
    pattern: PriorityPattern = "markov"
    update_every: int = 50  #: iterations between priority updates (frequency 0.02)
    #: "virtual" (cost model + link model, deterministic) or "wall" (scaled real time)
    clock: str = "virtual"
    #: the link model of the virtual clock; None: LINK_PRESETS[gpu]
    link: LinkModel | None = None
    time_scale: float = 40.0  #: wall clock only
    efficiency: float = 0.7  #: cost model: fraction of peak reached
    max_batch: int = 256  #: running sequences (vLLM max_num_seqs)
    max_prefill_tokens: int = 8192  #: prefill tokens per iteration (vLLM chunk budget)
    watermark: float = 0.01  #: fraction of the GPU pool kept free at admission (vLLM)
    initial_group_blocks: int = 60
    num_workers: int = 2  #: swap engine worker threads (virtual clock: modelled streams)
    seed: int = 0
    #: "host" (pools in host memory, memcpy) or "cuda" (device pool on GPU 0, pinned host
    #: pool, real block bytes; time_scale must be 1)
    backend: str = "host"
    #: cap on blocks one compaction moves, as a fraction of the swap-in's blocks
    compaction_max_moved: float = DEFAULT_COMPACTION_MAX_MOVED


@dataclass
class ServeResult:
    """Figures of one run. ``*_s`` on the run's clock (virtual: cost and link models; wall:
    modelled compute plus measured stalls) unless named ``measured``."""

    ttft_s: list[float] = field(default_factory=list)  #: per turn
    tbt_s: list[float] = field(default_factory=list)  #: per generated token after the first
    tokens: int = 0
    makespan_s: float = 0.0
    iterations: int = 0
    priority_preemptions: int = 0
    pool_full_preemptions: int = 0
    recomputed_tokens: int = 0  #: history tokens prefilled again (CPU copy dropped)
    dropped_copies: int = 0
    manager: dict = field(default_factory=dict)  #: SwapManagerStats as a dict
    engine: dict = field(default_factory=dict)  #: AsyncSwapEngine.stats()
    preset_block_bytes: int = 0  #: bytes of one block of the preset (all regions)
    executed_block_bytes: int = 0  #: bytes of one block actually copied
    #: wall clock: wall seconds the loop was blocked on swaps (not on migrations: the
    #: modelled clock charges a migration its modelled HBM time, ``CostModel.migrate_s``)
    stall_measured_s: float = 0.0
    #: seconds the loop was blocked on swaps, conflicts and migrations, on the run's clock
    #: (virtual: link-modelled; wall: measured x time scale + migrations' HBM time)
    stall_s: float = 0.0
    clock: str = "virtual"
    wall_s: float = 0.0  #: wall seconds of the run
    #: where blocks per copy are lost (issue 14): per-direction copies and blocks, table
    #: extents at swap-out, swap-in extents, reserved-tail splits, free groups over time
    granularity: dict = field(default_factory=dict)



# -- granularity probes (issue 14): read-only measurements of where blocks per copy go ----

#: Iterations between samples of the GPU pool's free groups.
FREE_SAMPLE_EVERY = 50


def _runs(ids: npt.NDArray[np.integer]) -> int:
    """Maximal runs of consecutive ids."""
    if ids.size == 0:
        return 0
    return int(np.count_nonzero(np.diff(ids.astype(np.int64)) != 1)) + 1


def _log2_histogram(lengths: list[int]) -> list[int]:
    """Entry ``k`` counts lengths in ``[2**k, 2**(k+1))``."""
    hist: list[int] = []
    for n in lengths:
        k = max(int(n), 1).bit_length() - 1
        if k >= len(hist):
            hist.extend([0] * (k + 1 - len(hist)))
        hist[k] += 1
    return hist


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p10": 0.0, "p50": 0.0, "p90": 0.0, "mean": 0.0}
    a = np.asarray(values, dtype=float)
    return {"p10": float(np.percentile(a, 10)), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean())}


class _ProbedAllocator(BlockGroupAllocator):
    """The GPU allocator with read-only probes around [`allocate`][]: what each call adds
    to the table's extents and whether it split other sequences' reserved tails. The
    allocation itself is the base class's, unchanged."""

    def __init__(self, num_blocks: int, *, initial_group_blocks: int,
                 growth_quantum_blocks: int | None = None) -> None:
        super().__init__(num_blocks, initial_group_blocks=initial_group_blocks,
                         growth_quantum_blocks=growth_quantum_blocks)
        self.context = "admit"  # which serving-loop step is allocating
        self.calls: dict[str, dict[str, int]] = {}
        self.swap_in_need_gt_largest_free = 0  # swap-ins whose need exceeded the largest
        self.swap_in_multi_extent = 0  # swap-ins whose new table has > 1 extent
        self.swap_in_multi_extent_need_gt_largest = 0  # ... because no free group fitted
        self.swap_in_extents: list[int] = []

    def allocate(self, seq_id: Hashable, num_blocks: int) -> npt.NDArray[np.int32]:
        known = seq_id in self
        # The table's last block: the new blocks add one extent per run of theirs, less
        # one where the first continues it (cheaper than listing the groups of a long
        # per-block table at every decode).
        last = int(self.block_table(seq_id)[-1]) if known and self.num_table_blocks(
            seq_id) else None
        own_before = self.reservation(seq_id)[1] if known else 0
        others_before = self.num_reserved_blocks - own_before
        largest = 0
        if self.context == "swap_in":
            largest = max((n for _, n in self.free_groups()), default=0)
        out = super().allocate(seq_id, num_blocks)
        new_extents = _runs(out) - int(last is not None and int(out[0]) == last + 1)
        others_after = self.num_reserved_blocks - self.reservation(seq_id)[1]
        c = self.calls.setdefault(self.context, dict.fromkeys(
            ("calls", "blocks", "new_extents", "tail_split_calls", "tail_blocks_split"), 0))
        c["calls"] += 1
        c["blocks"] += num_blocks
        c["new_extents"] += new_extents
        if others_after < others_before:
            c["tail_split_calls"] += 1
            c["tail_blocks_split"] += others_before - others_after
        if self.context == "swap_in":
            groups_after = len(self.groups(seq_id))
            self.swap_in_extents.append(groups_after)
            short = largest < num_blocks
            self.swap_in_need_gt_largest_free += short
            if groups_after > 1:
                self.swap_in_multi_extent += 1
                self.swap_in_multi_extent_need_gt_largest += short
        return out


class _Granularity:
    """Per-direction copy granularity, table fragmentation at swap-out and the GPU pool's
    free groups over time; read-only (see docs/benchmarks.md, issue 14)."""

    def __init__(self, m: SwapManager, gpu: BlockGroupAllocator, cost: CostModel,
                 preset_block_bytes: int, *, virtual: bool) -> None:
        self.m, self.gpu = m, gpu
        self.cost, self.preset_block_bytes = cost, preset_block_bytes
        self.virtual = virtual
        self.out_tables = 0
        self.out_gpu_extents: list[int] = []  # extents of each GPU table at swap-out
        self.out_extent_lengths: list[int] = []  # their lengths
        self.out_host_extents: list[int] = []  # extents of its host copy after the swap-out
        self.out_pairs: list[int] = []  # copy pairs issued by the swap-out
        self.out_copied: list[int] = []
        self.in_host_extents: list[int] = []  # host copy extents at swap-in
        self.free_groups: list[int] = []
        self.largest_free: list[int] = []
        self.free_in_groups: list[int] = []
        self.reserved: list[int] = []
        self._table: list[int] = []

    def before_swap_out(self, seq: Hashable) -> None:
        self._table = [n for _, n in self.gpu.groups(seq)]  # recorded if the swap-out runs

    def after_swap_out(self, seq: Hashable, plan: object) -> None:
        self.out_gpu_extents.append(len(self._table))
        self.out_extent_lengths.extend(self._table)
        host = self.m.tracker.host_block_table(seq)
        self.out_host_extents.append(_runs(host[host >= 0]))
        self.out_pairs.append(len(plan.pairs))  # type: ignore[attr-defined]
        self.out_copied.append(int(plan.copied_blocks))  # type: ignore[attr-defined]

    def before_swap_in(self, seq: Hashable) -> None:
        host = self.m.tracker.host_block_table(seq)
        self.in_host_extents.append(_runs(host[host >= 0]))

    def sample(self) -> None:
        free = [n for _, n in self.gpu.free_groups()]
        self.free_groups.append(len(free))
        self.largest_free.append(max(free, default=0))
        self.free_in_groups.append(sum(free))
        self.reserved.append(self.gpu.num_reserved_blocks)

    def report(self) -> dict:
        m, g = self.m.stats(), self.gpu
        probed = isinstance(g, _ProbedAllocator)
        ins = g.swap_in_extents if probed else []
        d: dict = {
            "swap_out_copies": m.swap_out_extents,
            "swap_out_blocks_copied": m.copied_blocks,
            "swap_out_blocks_per_copy": m.copied_blocks / max(m.swap_out_extents, 1),
            "swap_in_copies": m.swap_in_extents,
            "swap_in_blocks": m.swap_in_blocks,
            "swap_in_blocks_per_copy": m.swap_in_blocks / max(m.swap_in_extents, 1),
            "swap_out_table_extents_mean": float(np.mean(self.out_gpu_extents or [0])),
            "swap_out_table_blocks_per_extent": (sum(self.out_extent_lengths)
                                                 / max(len(self.out_extent_lengths), 1)),
            "swap_out_host_extents_mean": float(np.mean(self.out_host_extents or [0])),
            "swap_out_pairs_mean": float(np.mean(self.out_pairs or [0])),
            "swap_in_gpu_extents_mean": float(np.mean(ins or [0])),
            "swap_in_host_extents_mean": float(np.mean(self.in_host_extents or [0])),
            "swap_in_multi_extent": g.swap_in_multi_extent if probed else 0,
            "swap_in_multi_extent_need_gt_largest_free": (
                g.swap_in_multi_extent_need_gt_largest if probed else 0),
            "swap_in_need_gt_largest_free": g.swap_in_need_gt_largest_free if probed else 0,
            "free_samples": len(self.free_groups),
            # GPU-pool compaction: counted moves, and the time the clock charged for them:
            # virtual clock: the link model's device-to-device jobs (the loop waits for
            # them); wall clock: the cost model's HBM time of the same bytes (their host
            # memcpy wait is measured apart and left off the clock).
            "migrations": m.migrations,
            "migrated_blocks": m.migrated_blocks,
            "migrate_copies": m.migrate_extents * self.m.engine.device_layout.num_regions,
            "migrate_s": (m.migrate_wait_s if self.virtual else
                          self.cost.migrate_s(m.migrated_blocks * self.preset_block_bytes)),
        }
        if not self.virtual:
            d["migrate_wait_s_measured"] = m.migrate_wait_s
        for name, values in (("free_groups", self.free_groups),
                             ("largest_free_group", self.largest_free),
                             ("free_in_groups", self.free_in_groups),
                             ("reserved_blocks", self.reserved)):
            for k, v in _pcts(values).items():
                d[f"{name}_{k}"] = v
        for ctx, c in (g.calls.items() if probed else ()):
            for k, v in c.items():
                d[f"alloc_{ctx}_{k}"] = v
        d["histograms"] = {
            "swap_out_table_extents": _log2_histogram(self.out_gpu_extents),
            "swap_out_extent_lengths": _log2_histogram(self.out_extent_lengths),
            "swap_out_host_extents": _log2_histogram(self.out_host_extents),
            "swap_in_gpu_extents": _log2_histogram(ins),
            "swap_in_host_extents": _log2_histogram(self.in_host_extents),
            "free_groups": _log2_histogram(self.free_groups),
            "largest_free_group": _log2_histogram(self.largest_free),
        }
        return d


@dataclass(eq=False)
class _Conv:
    idx: int
    conv: Conversation
    turn: int = 0
    thinking: bool = False  # between turns: its KV waits for the next turn
    kv: int = 0  # tokens of KV the conversation holds (GPU or host)
    on_host: bool = False  # its KV is swapped out to the host pool
    prefill: int = 0  # new tokens to prefill before decoding (0: decoding)
    prefix: int = 0  # cached tokens the prefill attends to
    recompute: int = 0  # history tokens whose KV was dropped: the next turn prefills them
    first_token: bool = False  # this turn emitted its first token
    left: int = 0  # tokens still to generate this turn
    turn_arrival: float = 0.0
    last_token: float = 0.0
    stamped: int = 0  # virtual clock: tokens whose KV blocks hold their stamp on the GPU


def _layout(num_regions: int, region_bytes: int, num_blocks: int) -> KVLayout:
    # Zero-filled so that page faults are not timed as copies.
    return KVLayout.from_tensors([np.zeros((num_blocks, region_bytes), np.uint8)
                                  for _ in range(num_regions)])


def cuda_unavailable_reason() -> str:
    """Why the cuda backend cannot run here ('' when it can): PyTorch with CUDA and
    kvswitch's cuda backend (driver loaded with dlopen) must both see device 0."""
    try:
        import torch
    except ImportError as e:
        return f"PyTorch is not installed ({e})"
    if not torch.cuda.is_available():
        built = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
        return f"torch.cuda.is_available() is False{built}"
    from kvswitch import _core

    return _core.cuda_unavailable_reason(0)


def _cuda_layout(model: ModelPreset, block_size: int, num_blocks: int) -> KVLayout:
    """The device pool on cuda:0: one vLLM-style tensor per layer, ``[2, num_blocks,
    block_size, kv_heads, head_dim]`` of the preset's dtype (bytes per element), zeroed."""
    import torch  # only the cuda backend needs it

    dtype = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}[model.dtype_bytes]
    shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    tensors = [torch.zeros(shape, dtype=dtype, device="cuda:0")
               for _ in range(model.num_layers)]
    torch.cuda.synchronize()
    return KVLayout.from_vllm(tensors, kv_dim=0)


#: Bytes of one block in one region on the virtual clock: a stamp of four int32 (the
#: conversation, the logical block, its tokens, the region), checked after every swap-in.
STAMP_BYTES = 16
#: Regions of the executed pools on the virtual clock (the modelled pool has the preset's:
#: its copy calls are counted and timed, see VirtualSwapEngine).
EXECUTED_REGIONS = 1


class _Server:
    def __init__(self, convs: list[Conversation], cfg: ServeConfig, mech: Mechanisms,
                 on_finish: Callable[[], None] | None,
                 on_progress: Callable[[float], None] | None = None,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        self.cfg, self.mech = cfg, mech
        model = MODEL_PRESETS[cfg.model]
        self.cost = CostModel(model, GPU_PRESETS[cfg.gpu], cfg.efficiency)
        self.virtual = cfg.clock == "virtual"
        S = 1.0 if self.virtual else cfg.time_scale
        self.S = S
        self.clock = VirtualClock()  # the virtual clock, or the wall clock's modelled time
        # Migration totals at the end of the previous iteration (charged per iteration).
        self.migrate_wait_s, self.migrated_blocks = 0.0, 0
        preset_region = model.region_block_bytes(cfg.block_size)
        self.stamps: npt.NDArray[np.int32] | None = None
        if self.virtual:
            # Executed pools of one region: a block is one stamp (checked after every
            # swap-in); each executed extent copy stands for the preset's copy per region,
            # which the link model times.
            pool = np.zeros((EXECUTED_REGIONS, cfg.gpu_blocks, STAMP_BYTES), np.uint8)
            self.stamps = pool.view(np.int32)
            self.stamps[:, :, 3] = np.arange(EXECUTED_REGIONS, dtype=np.int32)[:, None]
            region = STAMP_BYTES
            device = KVLayout.from_tensors(list(pool))
            host = HostKVPool(device, cfg.host_blocks, pin=False)
            for a in host.arrays:
                a.fill(0)
            engine: AsyncSwapEngine | VirtualSwapEngine = VirtualSwapEngine(
                device, host, cfg.link or LINK_PRESETS[cfg.gpu], self.clock,
                num_workers=cfg.num_workers, num_regions=model.num_regions,
                region_block_bytes=preset_region)
        else:
            if cfg.backend == "cuda":  # real bytes, real link (time scale 1, checked in serve)
                region = preset_region
                device = _cuda_layout(model, cfg.block_size, cfg.gpu_blocks)
                host = HostKVPool(device, cfg.host_blocks, pin=True)
                if not host.pinned:
                    raise RuntimeError(f"the cuda backend needs a pinned host pool: "
                                       f"{host.pin_reason}")
            else:
                region = max(16, round(preset_region / S / 16) * 16)
                device = _layout(model.num_regions, region, cfg.gpu_blocks)
                host = HostKVPool(device, cfg.host_blocks, pin=False)
                for a in host.arrays:
                    a.fill(0)
            engine = AsyncSwapEngine(device, host, backend=cfg.backend,
                                     num_workers=cfg.num_workers)
        # Probed: read-only counters around allocate (issue 14); the allocation is unchanged.
        gpu = _ProbedAllocator(
            cfg.gpu_blocks,
            initial_group_blocks=cfg.initial_group_blocks if mech.block_groups else 1,
            growth_quantum_blocks=None if mech.growth_quantum else 1)
        self.m = SwapManager(
            gpu, engine, BlockGroupAllocator(cfg.host_blocks), reuse=mech.reuse,  # type: ignore[arg-type]
            async_swap_out=mech.async_swaps, swap_in="adaptive" if mech.async_swaps else "sync",
            coalesce=mech.block_groups, block_size=cfg.block_size,
            compaction=mech.compaction, compaction_max_moved=cfg.compaction_max_moved,
            clock=self.clock if self.virtual else None)
        self.gpu = gpu
        self.gran = _Granularity(self.m, gpu, self.cost, preset_region * model.num_regions,
                                 virtual=self.virtual)
        self.r = ServeResult(preset_block_bytes=preset_region * model.num_regions,
                             executed_block_bytes=engine.device_layout.bytes_per_block,
                             clock=cfg.clock)
        self.prio = PriorityScheduler(cfg.pattern, cfg.update_every, seed=cfg.seed)
        self.on_finish = on_finish
        self.on_progress = on_progress
        self.on_tokens = on_tokens
        self.convs = [_Conv(i, c) for i, c in enumerate(convs)]
        arrivals = random.Random(cfg.seed + 1)
        self.think = random.Random(cfg.seed + 2)
        self.events: list[tuple[float, int]] = []  # (time, conversation): a turn arrives
        t = 0.0
        for c in self.convs:
            t += arrivals.expovariate(cfg.arrival_rate)
            heapq.heappush(self.events, (c.conv.arrival_s if c.conv.arrival_s is not None
                                         else t, c.idx))
        self.queue: list[_Conv] = []  # waiting and preempted
        # Conversations between turns whose KV is on the host, in the order they went idle.
        self.idle_on_host: dict[int, _Conv] = {}
        self.running: dict[int, _Conv] = {}
        self.start = self.events[0][0] if self.events else 0.0
        self.reserve = math.ceil(cfg.watermark * cfg.gpu_blocks)

    @property
    def now(self) -> float:
        return self.clock.now

    # -- helpers -------------------------------------------------------------------------

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.cfg.block_size)

    def _table_len(self, c: _Conv) -> int:
        return self.m.gpu.num_table_blocks(c.idx) if c.idx in self.m.gpu else 0

    def _priority(self, c: _Conv) -> float:
        return self.prio.priority(c.idx)

    def _swap_out(self, c: _Conv) -> None:
        """Move a running conversation's KV to the host pool (or drop it if it cannot)."""
        self._stamp(c)
        while True:
            try:
                self.gran.before_swap_out(c.idx)
                plan = self.m.swap_out(c.idx, c.kv, priority=self._priority(c)
                                       if c.idx in self.prio else 0.0)
                self.gran.after_swap_out(c.idx, plan)
                c.on_host = True
                return
            except OutOfBlocksError:
                if not self._drop_idle_copy():
                    self.m.free(c.idx)  # no room anywhere: recompute it later
                    self._lost(c)
                    return

    def _lost(self, c: _Conv) -> None:
        self.r.recomputed_tokens += c.kv
        self.r.dropped_copies += 1
        if c.thinking:
            c.recompute = c.kv
        else:  # preempted mid-turn: it prefills its whole context again (vLLM recompute)
            c.prefill, c.prefix = c.prefill + c.kv, 0
        c.on_host = False
        c.kv = c.stamped = 0

    # -- byte checks (virtual clock) ------------------------------------------------------

    def _expected_stamps(self, c: _Conv, first: int, end: int) -> npt.NDArray[np.int32]:
        """Stamps ``[blocks, 3]`` of the conversation's logical blocks ``[first, end)``."""
        bs = self.cfg.block_size
        j = np.arange(first, end, dtype=np.int32)
        return np.stack((np.full_like(j, c.idx + 1), j,
                         np.minimum(bs, c.kv - j * bs).astype(np.int32)), axis=1)

    def _stamp(self, c: _Conv) -> None:
        """Write the stamps of the blocks whose KV changed since the last stamp (what the
        model's steps wrote): from the block of the first unstamped token to the last."""
        if self.stamps is None or c.kv == c.stamped:
            return
        first, end = c.stamped // self.cfg.block_size, self._blocks(c.kv)
        table = self.m.gpu.block_table(c.idx)
        self.stamps[:, table[first:end], :3] = self._expected_stamps(c, first, end)
        c.stamped = c.kv

    def _verify(self, c: _Conv, table: npt.NDArray[np.int32]) -> None:
        """Raise if a swapped-in table's bytes are not the conversation's KV as swapped out."""
        if self.stamps is None:
            return
        n = self._blocks(c.kv)
        got = self.stamps[:, table[:n]]
        want = self._expected_stamps(c, 0, n)
        regions = np.arange(got.shape[0], dtype=np.int32)[:, None]
        if not ((got[:, :, :3] == want).all() and (got[:, :, 3] == regions).all()):
            bad = np.flatnonzero(~(got[:, :, :3] == want).all(axis=(0, 2)))
            raise RuntimeError(
                f"KV bytes of conversation {c.conv.conversation_id!r} differ after its "
                f"swap-in: {bad.size or 'some'} of {n} blocks (first logical block "
                f"{int(bad[0]) if bad.size else '?'}) do not hold what was swapped out")
        c.stamped = c.kv

    def _drop_idle_copy(self) -> bool:
        if not self.idle_on_host:
            return False
        victim = self.idle_on_host.pop(next(iter(self.idle_on_host)))  # idle the longest
        self.m.free(victim.idx)
        self._lost(victim)
        return True

    def _preempt(self, c: _Conv, *, priority_update: bool) -> None:
        del self.running[c.idx]
        if c.kv:
            self._swap_out(c)
        else:  # admitted, nothing computed yet
            self.m.free(c.idx)
        self.queue.append(c)
        if priority_update:
            self.r.priority_preemptions += 1
        else:
            self.r.pool_full_preemptions += 1

    def _preemptable(self, c: _Conv) -> bool:
        return self.m.state(c.idx) == "running"

    # -- admission -----------------------------------------------------------------------

    def _need(self, c: _Conv) -> int:
        """GPU blocks to admit ``c``: its KV plus its prefill plus one block of headroom."""
        return self._blocks(c.kv + c.prefill) + 1

    def _admit(self, c: _Conv) -> None:
        if c.on_host:
            self.gran.before_swap_in(c.idx)
            self.gpu.context = "swap_in"
            # The prefill's blocks and the decode growth expected from the conversation's
            # past turns (their mean output) follow the table: compaction makes room.
            past = c.conv.turns[:c.turn]
            growth = sum(t.output_tokens for t in past) // len(past) if past else 0
            table = self.m.swap_in(c.idx, reserve_blocks=self._blocks(
                c.kv + max(c.prefill, 1) + growth) - self._blocks(c.kv))
            self._verify(c, table)  # the copies ran already (inline); their time is modelled
            c.on_host = False
        # Room for its prefill, or for the next decoded token.
        extra = self._blocks(c.kv + max(c.prefill, 1)) - self._table_len(c)
        if extra > 0:
            self.gpu.context = "admit"
            self.m.allocate(c.idx, extra)
        self.running[c.idx] = c

    def _schedule(self, update: bool) -> None:
        free = lambda: self.m.gpu.num_free_blocks - self.reserve  # noqa: E731
        candidates = sorted(self.queue, key=self._priority, reverse=True)
        admitted: set[int] = set()
        for c in candidates:
            if len(self.running) >= self.cfg.max_batch:
                break
            need = self._need(c)
            if need > free() and update:
                p = self._priority(c)
                victims = sorted((v for v in self.running.values()
                                  if self._priority(v) < p and self._preemptable(v)),
                                 key=self._priority)
                gain, chosen = 0, []
                for v in victims:
                    if free() + gain >= need:
                        break
                    chosen.append(v)
                    gain += self._table_len(v)
                if free() + gain >= need:
                    for v in chosen:
                        self._preempt(v, priority_update=True)
            if need > free():
                break  # strict priority order: nothing lower jumps ahead
            self._admit(c)
            admitted.add(c.idx)
        # Victims preempted above were appended to the queue; they wait for a later pass.
        self.queue = [c for c in self.queue if c.idx not in admitted]

    def _grow(self) -> None:
        """Give every decoding sequence the block its next token needs, highest priority
        first when the pool cannot serve them all."""
        bs, m = self.cfg.block_size, self.m
        needing = [c for c in self.running.values()
                   if not c.prefill and c.kv % bs == 0 and c.kv == self._table_len(c) * bs
                   and m.state(c.idx) == "running"]
        if len(needing) > m.gpu.num_free_blocks:
            needing.sort(key=self._priority, reverse=True)
        for c in needing:
            if c.idx not in self.running:  # preempted for an earlier one
                continue
            while self.m.gpu.num_free_blocks < 1:
                victim = min((v for v in self.running.values() if self._preemptable(v)),
                             key=self._priority)
                self._preempt(victim, priority_update=False)
                if victim is c:
                    break
            if c.idx in self.running:
                self.gpu.context = "grow"
                self.m.allocate(c.idx, 1)

    # -- the loop ------------------------------------------------------------------------

    def _arrive(self) -> None:
        while self.events and self.events[0][0] <= self.now:
            t, i = heapq.heappop(self.events)
            c = self.convs[i]
            turn = c.conv.turns[c.turn]
            c.thinking = False
            self.idle_on_host.pop(i, None)
            c.turn_arrival = t
            c.prefix = c.kv
            # A dropped history is recomputed together with the new input.
            c.prefill = max(turn.new_input_tokens + c.recompute, 1)
            c.recompute = 0
            c.left = turn.output_tokens
            c.first_token = False
            self.prio.add(c.idx)
            self.queue.append(c)

    def _finish_turn(self, c: _Conv) -> None:
        del self.running[c.idx]
        c.turn += 1
        if c.turn == len(c.conv.turns):
            self.m.free(c.idx)
            c.kv = 0
            self.prio.remove(c.idx)
            self.finished += 1
            if self.on_finish:
                self.on_finish()
            return
        c.thinking = True
        self._swap_out(c)
        if c.on_host:
            self.idle_on_host[c.idx] = c
        heapq.heappush(self.events, (self.now + self.think.expovariate(1 / self.cfg.think_s)
                                     if self.cfg.think_s > 0 else self.now, c.idx))

    def run(self) -> ServeResult:
        r, m = self.r, self.m
        self.finished = 0
        wall0 = time.perf_counter()
        iteration = 0
        while self.finished < len(self.convs):
            if not self.running and not self.queue and not m.swapping_in:
                self.clock.advance_to(self.events[0][0])  # idle: skip to the next turn
            self._arrive()
            t0, stall0 = self.now, m.stall_s
            update = self.prio.is_update(iteration)
            if update:
                self.prio.update()
            m.poll()
            m.take_block_table_changes()  # the modelled attention reads tables afresh
            if failed := m.take_failed():  # a benchmark must not go on with lost KV
                raise RuntimeError(f"swap copies failed: {list(failed.values())}")
            if iteration % FREE_SAMPLE_EVERY == 0:
                self.gran.sample()
            self._schedule(update)
            self._grow()
            ready = self._ready()
            if len(ready) < len(self.running):  # swap-ins pending: step 4 decides
                estimate = self._step_s(ready, self._prefill_batch(ready))
                m.decide(len(ready), estimate or self._step_s(
                    list(self.running.values()), []))
                ready = self._ready()
            prefills = self._prefill_batch(ready)
            step = self._step_s(ready, prefills)
            if self.virtual:
                if not ready:  # only swap-ins pending: the GPU idles until one lands
                    self._idle_until_swap_in()
                r.stall_s += self.now - t0
                self.clock.advance(step)
            else:
                self._spend_wall(step, m.stall_s - stall0)
            self.prio.served(c.idx for c in ready)
            self._emit(ready, prefills)
            iteration += 1
            if self.on_progress is not None:
                self.on_progress(self.now - self.start)
            if self.on_tokens is not None:
                self.on_tokens(r.tokens)
        r.makespan_s = self.now - self.start
        m.synchronize()
        r.iterations = iteration
        r.wall_s = time.perf_counter() - wall0
        stats = m.stats()
        r.manager = vars(stats) | {"stall_s": stats.stall_s}
        r.engine = {k: v for k, v in m.engine.stats().items() if k != "copy_size_histogram"}
        r.granularity = self.gran.report()
        m.close()
        return r

    def _ready(self) -> list[_Conv]:
        """Running conversations whose KV is on the GPU (not still swapping in). A failed
        one stops the run at the next take_failed."""
        swapping = self.m.swapping_in
        if not swapping:
            return list(self.running.values())
        pending = set(swapping)
        return [c for c in self.running.values() if c.idx not in pending]

    def _idle_until_swap_in(self) -> None:
        """Virtual clock, nothing to compute: move to the end of the first pending swap-in
        (or to the next arrival, if earlier)."""
        ends = [t] if (t := self.m.engine.next_end("in")) is not None else []
        if self.events:
            ends.append(self.events[0][0])
        if not ends:
            raise RuntimeError("the serving loop cannot progress: nothing to compute, no "
                               "swap-in pending and no turn to come")
        self.clock.advance_to(min(ends))

    def _spend_wall(self, step: float, stall: float) -> None:
        """Wall clock: sleep the step (scaled), charge the measured stall x time scale and
        migrations their modelled HBM time on the modelled clock."""
        r, m, S = self.r, self.m, self.S
        compute_until = time.perf_counter() + step / S
        # A migration (compaction) copies device to device: on a GPU at HBM bandwidth,
        # not at the link's, so its host memcpy here is no stand-in for it as a swap's
        # is. The modelled clock charges the modelled HBM time of its bytes instead.
        migrate_s = 0.0
        if self.mech.compaction:  # stats() only where migrations can happen
            migrated = m.stats()
            stall -= migrated.migrate_wait_s - self.migrate_wait_s
            migrate_s = self.cost.migrate_s(
                (migrated.migrated_blocks - self.migrated_blocks) * r.preset_block_bytes)
            self.migrate_wait_s, self.migrated_blocks = (migrated.migrate_wait_s,
                                                         migrated.migrated_blocks)
        r.stall_measured_s += stall
        r.stall_s += stall * S + migrate_s
        self.clock.advance(stall * S + step + migrate_s)
        left = compute_until - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def _prefill_batch(self, ready: list[_Conv]) -> list[_Conv]:
        budget, batch = self.cfg.max_prefill_tokens, []
        for c in sorted((c for c in ready if c.prefill), key=self._priority, reverse=True):
            if batch and c.prefill > budget:
                break
            batch.append(c)
            budget -= c.prefill
        return batch

    def _step_s(self, ready: list[_Conv], prefills: list[_Conv]) -> float:
        decodes = [c for c in ready if not c.prefill]
        return self.cost.step_s(sum(c.kv + 1 for c in decodes), len(decodes),
                                [(c.prefill, c.prefix) for c in prefills])

    def _emit(self, ready: list[_Conv], prefills: list[_Conv]) -> None:
        r, now = self.r, self.now
        prefilled = {c.idx for c in prefills}
        for c in ready:
            if c.prefill:
                if c.idx not in prefilled:
                    continue
                c.kv += c.prefill
                c.prefill = c.prefix = 0
                if not c.first_token:
                    r.ttft_s.append(now - c.turn_arrival)
                    c.first_token = True
                else:  # recomputed after losing its KV mid-turn
                    r.tbt_s.append(now - c.last_token)
            else:
                c.kv += 1
                r.tbt_s.append(now - c.last_token)
            c.last_token = now
            c.left -= 1
            r.tokens += 1
            if c.left <= 0:
                self._finish_turn(c)


def serve(conversations: list[Conversation], config: ServeConfig, mechanisms: Mechanisms,
          on_conversation_done: Callable[[], None] | None = None,
          on_progress: Callable[[float], None] | None = None,
          on_tokens: Callable[[int], None] | None = None) -> ServeResult:
    """Replay ``conversations`` through a SwapManager with the given mechanisms.

    Args:
        conversations: the trace (e.g. [`kvswitch.trace.sample`][] of the bundled one).
        config: pools, presets, arrival process, priority pattern, clock (and its link
            model or time scale).
        mechanisms: which FastSwitch mechanisms to use (see [`CONFIGURATIONS`][]).
        on_conversation_done: called once per finished conversation (progress bars).
        on_progress: called after every iteration with the modelled seconds elapsed since
            the first arrival (the modelled clock, which ends at ``makespan_s``).
        on_tokens: called after every iteration with the tokens generated so far (ends at
            the trace's output tokens: a progress measure known exactly in advance).

    Returns:
        A [`ServeResult`][].

    Raises:
        KeyError: unknown model or GPU preset.
        ValueError: a conversation whose KV cannot fit the GPU pool (see
            [`min_gpu_blocks`][]), bad sizes, an unknown backend or clock, or the cuda
            backend on the virtual clock or with a time scale other than 1.
        RuntimeError: the cuda backend without a usable GPU (the engine says why) or
            without pinned host memory; on the virtual clock, a swapped-in block whose
            bytes are not what was swapped out (a wrong copy).
    """
    if config.clock not in ("virtual", "wall"):
        raise ValueError(f"clock must be 'virtual' or 'wall', got {config.clock!r}")
    if config.time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {config.time_scale}")
    if config.backend not in ("host", "cuda"):
        raise ValueError(f"backend must be 'host' or 'cuda', got {config.backend!r}")
    if config.backend == "cuda" and config.clock != "wall":
        raise ValueError("the cuda backend runs on the wall clock only (clock='wall'): its "
                         "copies are timed on the GPU")
    if config.backend == "cuda" and config.time_scale != 1:
        raise ValueError(f"the cuda backend copies the preset's real block bytes in real "
                         f"time: time_scale must be 1, got {config.time_scale:g}")
    if config.backend == "cuda" and (why := cuda_unavailable_reason()):
        raise RuntimeError(f"the cuda backend needs a CUDA GPU: {why}")
    if conversations:
        big = max(conversations, key=lambda c: c.total_tokens)
        need = min_gpu_blocks(big.total_tokens, config)
        if config.gpu_blocks < need:
            limit = config.gpu_blocks - math.ceil(config.watermark * config.gpu_blocks) - 1
            raise ValueError(
                f"conversation {big.conversation_id!r} needs {big.total_tokens:,} tokens of KV; "
                f"the GPU pool admits {max(limit, 0) * config.block_size:,} "
                f"(gpu_blocks={config.gpu_blocks:,}); gpu_blocks must be at least {need:,}")
    return _Server(conversations, config, mechanisms, on_conversation_done, on_progress,
                   on_tokens).run()


@dataclass(frozen=True)
class RunEstimate:
    """What [`estimate_run`][] expects of one [`serve`][] run. Counts are predictions
    from the trace alone (no swaps, no preemptions), except ``tokens``, which is exact."""

    makespan_s: float  #: modelled seconds
    iterations: int
    wall_s: float  #: wall seconds on this machine, at its ``speed`` (rough)
    tokens: int = 0  #: output tokens (exact: every turn's)
    copies: int = 0  #: copy calls of the turn-boundary swaps
    swaps: int = 0  #: turn-boundary swap-outs plus swap-ins
    queued: int = 0  #: waiting turns summed over iterations (the scheduler scans them)


#: Wall seconds of the virtual-clock loop at the reference speed (``machine_speed() ==
#: 1``): per generated token (the decode step's bookkeeping), per generated token times the
#: mean batch (the loop's work per iteration grows with the running sequences, and so does
#: the preemption and compaction work it does for them), and per waiting turn per
#: iteration (the scheduler's scans, and the preemptions a queue brings at priority
#: updates). Least-squares fit over the four configurations of six ``kvswitch bench`` runs
#: of the bundled trace (200, 700 and 1,000 conversations; 700 at loads from idle to four
#: CPU-bound processes on the 2-core VM), each run's speed measured beside it
#: (docs/benchmarks.md, "The estimate").
WALL_PER_TOKEN_S = 13.6e-6
WALL_PER_TOKEN_BATCH_S = 0.16e-6
WALL_PER_QUEUED_S = 11.0e-6
#: Wall clock: seconds of Python work per loop iteration (scheduling, bookkeeping) on a slow
#: core; the loop sleeps ``step / time_scale`` per iteration unless this is longer.
ITERATION_OVERHEAD_S = 25e-6
#: Bytes per second of pool setup (allocation and zero-fill).
SETUP_BYTES_PER_S = 1e9


def _arrivals(conversations: list[Conversation], config: ServeConfig) -> list[float]:
    """Each conversation's arrival, drawn as [`serve`][] draws it."""
    rng = random.Random(config.seed + 1)
    t, starts = 0.0, []
    for c in conversations:
        t += rng.expovariate(config.arrival_rate)
        starts.append(c.arrival_s if c.arrival_s is not None else t)
    return starts


def _decode_batch(conversations: list[Conversation], config: ServeConfig,
                  cost: CostModel) -> tuple[int, float]:
    """(batch, mean context): the sequences the GPU pool holds at the trace's mean context
    (weighted by output tokens), at most ``max_batch``."""
    out_tokens, ctx_weighted = 0, 0.0
    for c in conversations:
        kv = 0
        for turn in c.turns:
            kv += turn.new_input_tokens
            out_tokens += turn.output_tokens
            ctx_weighted += turn.output_tokens * (kv + turn.output_tokens / 2)
            kv += turn.output_tokens
    ctx = max(ctx_weighted / max(out_tokens, 1), 1.0)
    room = config.gpu_blocks * (1 - config.watermark) * config.block_size
    return max(1, min(config.max_batch, int(room / ctx))), ctx


def capacity_rate(conversations: list[Conversation], config: ServeConfig) -> float:
    """Conversations per second that the GPU pool can serve: the decode rate of the batch
    the pool holds at the trace's mean context (the cost model's step at that batch),
    over the mean output tokens per conversation. ``--load f`` offers ``f`` times this;
    above 1 queues grow and priority updates preempt.

    Raises:
        ValueError: no conversations.
    """
    if not conversations:
        raise ValueError("no conversations")
    cost = CostModel(MODEL_PRESETS[config.model], GPU_PRESETS[config.gpu], config.efficiency)
    batch, ctx = _decode_batch(conversations, config, cost)
    tokens_per_s = batch / cost.step_s(int(batch * ctx), batch)
    per_conversation = sum(t.output_tokens for c in conversations for t in c.turns)
    return tokens_per_s / (per_conversation / len(conversations))


def _fluid_iterations(conversations: list[Conversation], config: ServeConfig,
                      cost: CostModel, starts: list[float],
                      swap_s: Callable[[int], float] | None = None) -> tuple[int, float, int]:
    """(iterations, makespan, queued) of the trace through a pool-limited batch that
    decodes one token per sequence per step, without preemptions: turns are admitted first
    come, first served while their KV fits the pool; ``queued`` sums the waiting turns over
    the iterations. With ``swap_s`` (blocking swaps: seconds to swap ``n`` tokens of KV one
    way), a turn's end stalls the batch for its swap-out and a later turn's admission for
    its swap-in. Time jumps from event to event (a turn ends, a turn arrives), so it costs
    a few operations per turn."""
    bs = config.block_size
    room = config.gpu_blocks * (1 - config.watermark)
    think = random.Random(config.seed + 2)
    pending = [(t, i, 0) for i, t in enumerate(starts)]  # (arrival, conversation, turn)
    heapq.heapify(pending)
    kv = [0] * len(conversations)
    waiting: list[tuple[int, int]] = []
    left, ctx, who = np.zeros(0, np.int64), np.zeros(0, np.int64), []
    t = min(starts) if starts else 0.0
    first, iterations, queued = t, 0, 0
    while pending or waiting or who:
        while pending and pending[0][0] <= t:
            _, i, k = heapq.heappop(pending)
            waiting.append((i, k))
        used = int(np.sum((ctx + left + bs - 1) // bs)) if who else 0
        while waiting and len(who) < config.max_batch:
            i, k = waiting[0]
            turn = conversations[i].turns[k]
            need = -(-(kv[i] + turn.new_input_tokens + turn.output_tokens) // bs) + 1
            if used + need > room and who:
                break
            waiting.pop(0)
            if swap_s is not None and kv[i]:
                t += swap_s(kv[i])  # the history's swap-in, waited for
            kv[i] += turn.new_input_tokens
            who.append((i, k))
            left = np.append(left, max(turn.output_tokens, 1))
            ctx = np.append(ctx, kv[i])
            used += need
        if not who:
            t = pending[0][0]
            continue
        n = len(who)
        steps = int(left.min())
        step = cost.step_s(int(ctx.sum()) + n * (steps + 1) // 2, n)
        if pending and not waiting:  # the next arrival may join the batch earlier
            steps = max(1, min(steps, math.ceil((pending[0][0] - t) / step)))
        t += steps * step
        iterations += steps
        queued += steps * len(waiting)
        left -= steps
        ctx += steps
        done = np.flatnonzero(left <= 0)
        for j in done.tolist():
            i, k = who[j]
            kv[i] = int(ctx[j])
            if k + 1 < len(conversations[i].turns):
                if swap_s is not None:
                    t += swap_s(kv[i])  # the turn's swap-out, waited for
                heapq.heappush(pending, (t + (think.expovariate(1 / config.think_s)
                                              if config.think_s > 0 else 0.0), i, k + 1))
        keep = left > 0
        who = [w for w, k in zip(who, keep.tolist(), strict=True) if k]
        left, ctx = left[keep], ctx[keep]
    return iterations, t - first, queued


def machine_speed(repeats: int = 5) -> float:
    """This machine's speed at [`serve`][]'s kind of work relative to the reference
    machine of the ``WALL_PER_*`` figures (2.0: twice as slow): the median of ``repeats``
    timings of a fixed mix of loop-like Python, allocator and NumPy calls, over its time on
    the reference machine. On a shared machine it measures the load of the moment, which
    may not be the load of the run. About 0.1 to 0.5 s."""
    from kvswitch.allocator import BlockGroupAllocator as _Allocator

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = _Allocator(4096, initial_group_blocks=16)
        rng = random.Random(0)
        acc, table = 0.0, np.zeros(64, np.int64)
        for k in range(3000):
            seq = rng.randrange(64)
            if seq in a and k % 3 == 0:
                a.free(seq)
            else:
                try:
                    ids = a.allocate(seq, 1 + k % 5)
                except OutOfBlocksError:
                    continue
                table[seq] += len(ids)
            acc += float(np.sum(table[:32])) + math.sqrt(k)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / REFERENCE_SPEED_S


#: [`machine_speed`][]'s workload at the reference speed, seconds (the ``WALL_PER_*``
#: fits scale each run's measured speed by it).
REFERENCE_SPEED_S = 0.090


def estimate_run(conversations: list[Conversation], config: ServeConfig,
                 mechanisms: Mechanisms | None = None, *, speed: float = 1.0) -> RunEstimate:
    """An estimate of one [`serve`][] run, for saying how long a run will take before it
    starts.

    Modelled time and iterations come from a fluid replay of the trace through the batch
    the GPU pool holds ([`_fluid_iterations`][]: arrivals, think times, the cost model's
    step; queueing for the pool included; swaps, stalls and preemptions left out). Copies:
    the turn-boundary swaps (every turn after the first swaps the history out and back
    in; per block and region without block groups, about one extent per region with them).
    Blocking swaps (``mechanisms`` without asynchronous swaps) stall the replay for their
    link-modelled time, so their queueing shows. Wall time on the virtual clock: tokens,
    tokens times mean batch, and queued turns times the ``WALL_PER_*`` figures, times
    ``speed`` ([`machine_speed`][]); on the wall clock: the makespan over the time scale, or the
    loop's Python overhead where it is longer, plus the pools' setup.
    """
    if not conversations:
        return RunEstimate(0.0, 0, 0.0)
    model = MODEL_PRESETS[config.model]
    cost = CostModel(model, GPU_PRESETS[config.gpu], config.efficiency)
    starts = _arrivals(conversations, config)
    swap_s = None
    if config.clock == "virtual" and mechanisms is not None and not mechanisms.async_swaps:
        link = config.link or LINK_PRESETS[config.gpu]
        region = model.region_block_bytes(config.block_size)

        def swap_s(tokens: int) -> float:  # one extent per block, or one in all
            blocks = -(-tokens // config.block_size)
            extents = [region] * blocks if not mechanisms.block_groups else [region * blocks]
            return CopyQueues(link, 1).schedule("out", extents, at=0.0,
                                                repeat=model.num_regions)[1]
    iterations, makespan, queued = _fluid_iterations(conversations, config, cost, starts,
                                                     swap_s)
    tokens = sum(t.output_tokens for c in conversations for t in c.turns)
    boundaries = sum(len(c.turns) - 1 for c in conversations)
    regions = model.num_regions
    per_block = mechanisms is not None and not mechanisms.block_groups
    copies = 0
    for c in conversations:
        kv = 0
        for turn in c.turns[:-1]:
            kv += turn.new_input_tokens + turn.output_tokens
            copies += 2 * regions * (-(-kv // config.block_size) if per_block else 1)
    swaps = 2 * boundaries
    if config.clock == "virtual":
        batch = tokens / max(iterations, 1)
        wall = speed * (tokens * WALL_PER_TOKEN_S + tokens * batch * WALL_PER_TOKEN_BATCH_S
                        + queued * WALL_PER_QUEUED_S)
    else:
        if config.backend == "cuda":
            block_bytes = model.region_block_bytes(config.block_size) * regions
        else:
            region = model.region_block_bytes(config.block_size) / config.time_scale
            block_bytes = max(16, round(region / 16) * 16) * regions
        setup = (config.gpu_blocks + config.host_blocks) * block_bytes / SETUP_BYTES_PER_S
        wall = max(makespan / config.time_scale, iterations * ITERATION_OVERHEAD_S) + setup
    return RunEstimate(makespan, iterations, wall, tokens, copies, swaps, queued)


def min_gpu_blocks(tokens: int, config: ServeConfig) -> int:
    """The smallest ``gpu_blocks`` with which [`serve`][] admits a conversation of
    ``tokens`` tokens of KV (all its turns): its blocks of ``config.block_size`` tokens, one
    block of headroom and the ``config.watermark`` fraction of the pool kept free.

    Raises:
        ValueError: ``config.watermark`` outside [0, 1) (no pool is large enough).
    """
    if not 0.0 <= config.watermark < 1.0:
        raise ValueError(f"watermark must be in [0, 1), got {config.watermark}")
    need = -(-tokens // config.block_size) + 1
    blocks = need
    # _schedule's admission test on an empty pool, searched upwards (few steps at 1%).
    while blocks - math.ceil(config.watermark * blocks) < need:
        blocks += 1
    return blocks

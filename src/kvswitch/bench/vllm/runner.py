"""The model-runner stand-in of the vLLM bench: vLLM's scheduler output in, sampled tokens
and the modelled step time out.

It does what vLLM's GPU model runner does with a ``SchedulerOutput``, minus the model:
keeps each request's block table from the new and cached request data (a resumed request
gets a new table), "computes" the scheduled tokens by writing their KV stamps
([`kvswitch.bench.vllm.stamps`][]) into their blocks, and samples one token for every
request whose scheduled tokens reach the end of its known tokens. The token sampled at a
position is the conversation's fixed token there, so the next turn's prompt (history +
new input) matches the blocks vLLM hashed before. Before a request's first scheduled
step (new, resumed, or back from a KV load) it checks that every token already counted as
computed (GPU prefix-cache hits, CPU loads) holds its stamps: a block vLLM hands over
with the wrong KV fails the run.

The step's duration comes from the cost model ([`CostModel`][kvswitch.bench.cost_model.CostModel]):
a request with one scheduled token at the end of its tokens decodes, any other is a
prefill chunk of its scheduled tokens over the computed prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

from kvswitch.bench.cost_model import CostModel
from kvswitch.bench.vllm.stamps import KVStamps

__all__ = ["RunnerStandIn", "StepOutcome"]


@dataclass
class _Request:
    conversation: int
    num_prompt: int
    block_table: list[int]
    generated: int = 0
    checked: bool = False  # its computed prefix was checked since it was (re)scheduled


@dataclass
class StepOutcome:
    """What one step did: the runner output for the scheduler and the modelled time."""

    output: ModelRunnerOutput
    step_s: float
    sampled: dict[str, int] = field(default_factory=dict)  #: request id -> its new token
    recomputed_tokens: int = 0  #: tokens computed again (their KV had been computed before)
    prefill_tokens: int = 0
    decode_tokens: int = 0


class RunnerStandIn:
    """Executes vLLM scheduler outputs on stamps (see the module).

    Args:
        stamps: the KV cache.
        cost: the cost model.
        tokens: per conversation, its fixed token sequence (int array of its length).
        conversation_of: request id -> conversation index (set by the loop when it adds a
            request).

    Not thread-safe.
    """

    def __init__(self, stamps: KVStamps, cost: CostModel,
                 tokens: list[npt.NDArray[np.int64]], conversation_of: dict[str, int]) -> None:
        self.stamps, self.cost, self.tokens = stamps, cost, tokens
        self.conversation_of = conversation_of
        self.requests: dict[str, _Request] = {}
        #: per conversation, tokens whose KV was computed at least once (the high-water mark)
        self.computed: list[int] = [0] * len(tokens)
        self.contexts_checked = 0
        self.context_tokens_checked = 0

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            (table,) = new.block_ids
            old = self.requests.get(new.req_id)
            self.requests[new.req_id] = _Request(
                self.conversation_of[new.req_id], len(new.prompt_token_ids or ()),
                list(table), generated=old.generated if old else 0)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            r = self.requests[req_id]
            blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                assert blocks is not None
                r.block_table = list(blocks[0])
                r.checked = False
            elif blocks is not None:
                r.block_table.extend(blocks[0])

    def execute(self, so: SchedulerOutput) -> StepOutcome:
        """Run one scheduled step (writes stamps, checks contexts, samples tokens).

        Raises:
            StampMismatchError: a request's computed prefix does not hold its KV.
        """
        self._update_states(so)
        computed_before = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        computed_before.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        req_ids = list(so.num_scheduled_tokens)
        sampled_rows: list[list[int]] = []
        outcome = StepOutcome(ModelRunnerOutput(req_ids=req_ids, req_id_to_index={}), 0.0)
        decode_ctx = decodes = 0
        prefills: list[tuple[int, int]] = []
        writes: list[tuple[int, list[int], int, int]] = []
        for req_id in req_ids:
            r = self.requests[req_id]
            n, start = so.num_scheduled_tokens[req_id], computed_before[req_id]
            end, known = start + n, r.num_prompt + r.generated
            if not r.checked:  # what vLLM counts as computed must hold its KV
                self.stamps.check(r.conversation, r.block_table, start,
                                  f"request {req_id} scheduled with {start} computed tokens")
                self.contexts_checked += 1
                self.context_tokens_checked += start
                r.checked = True
            writes.append((r.conversation, r.block_table, start, end))
            hwm = self.computed[r.conversation]
            outcome.recomputed_tokens += max(0, min(hwm, end) - start)
            self.computed[r.conversation] = max(hwm, end)
            if n == 1 and end == known:
                decodes += 1
                decode_ctx += end
                outcome.decode_tokens += 1
            else:
                prefills.append((n, start))
                outcome.prefill_tokens += n
            row: list[int] = []
            if end >= known:
                token = int(self.tokens[r.conversation][known])
                row = [token]
                r.generated += 1
                outcome.sampled[req_id] = token
            sampled_rows.append(row)
        self.stamps.write_many(writes)  # the step's KV, after every context was checked
        out = outcome.output
        out.req_id_to_index = {req_id: i for i, req_id in enumerate(req_ids)}
        out.sampled_token_ids = sampled_rows
        outcome.step_s = self.cost.step_s(decode_ctx, decodes, prefills)
        return outcome

    def forget(self, req_id: str) -> None:
        """Drop a finished request's state."""
        self.requests.pop(req_id, None)

"""Priority patterns of the context-switching trace (FastSwitch section 4.2).

Priorities change only at update iterations (the paper's priority-update frequency: 0.02
is one update every 50 iterations). Between updates the scheduler keeps the latest ones.

* ``random``: at each update every active sequence draws a new priority uniformly; no
  temporal correlation.
* ``markov``: temporal locality. Each sequence is in a *high* or *low* state, a two-state
  Markov chain stepped at each update: a sequence served (running) since the previous
  update is high next with probability ``p_served_high``, one that was not served with
  probability ``p_idle_high``. Its priority is ``state + U(0, 1)``, so every high
  sequence ranks above every low one and order within a state is random. The paper gives
  the pattern in words only; the two probabilities (0.9 and 0.1 by default) are kvswitch's
  choice.

New sequences get a priority at once: uniform (``random``) or in the low state
(``markov``, never served).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from typing import Literal

__all__ = ["PriorityPattern", "PriorityScheduler"]

PriorityPattern = Literal["markov", "random"]


class PriorityScheduler:
    """Keeps each active sequence's priority (higher runs first) and updates them.

    Args:
        pattern: ``"markov"`` or ``"random"``.
        update_every: iterations between updates (>= 1); the update frequency is its
            inverse.
        seed: seed of the scheduler's own random generator.
        p_served_high, p_idle_high: the Markov pattern's transition probabilities.

    Raises:
        ValueError: unknown pattern, ``update_every < 1`` or probabilities outside [0, 1].
    """

    def __init__(self, pattern: PriorityPattern, update_every: int, *, seed: int = 0,
                 p_served_high: float = 0.9, p_idle_high: float = 0.1) -> None:
        if pattern not in ("markov", "random"):
            raise ValueError(f"pattern must be 'markov' or 'random', got {pattern!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        for name, p in (("p_served_high", p_served_high), ("p_idle_high", p_idle_high)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.pattern: PriorityPattern = pattern
        self.update_every = update_every
        self.p_served_high = p_served_high
        self.p_idle_high = p_idle_high
        self._rng = random.Random(seed)
        self._priority: dict[Hashable, float] = {}
        self._served: set[Hashable] = set()
        self.num_updates = 0

    def add(self, seq_id: Hashable) -> float:
        """Give a new (or returning) sequence a priority; returns it. A sequence that
        already has one keeps it."""
        if seq_id not in self._priority:
            self._priority[seq_id] = self._rng.random()  # markov: low state, U(0, 1)
        return self._priority[seq_id]

    def remove(self, seq_id: Hashable) -> None:
        """Forget a sequence (its conversation ended). Unknown ids are ignored."""
        self._priority.pop(seq_id, None)
        self._served.discard(seq_id)

    def served(self, seq_ids: Iterable[Hashable]) -> None:
        """Record sequences that ran this iteration (the Markov pattern's history)."""
        self._served.update(seq_ids)

    def is_update(self, iteration: int) -> bool:
        """Whether priorities change at this iteration (iterations count from 0; the
        first update is at ``update_every``)."""
        return iteration > 0 and iteration % self.update_every == 0

    def update(self) -> None:
        """Draw new priorities for every known sequence (one update)."""
        rng = self._rng
        for s in self._priority:
            if self.pattern == "random":
                self._priority[s] = rng.random()
            else:
                p_high = self.p_served_high if s in self._served else self.p_idle_high
                self._priority[s] = float(rng.random() < p_high) + rng.random()
        self._served.clear()
        self.num_updates += 1

    def priority(self, seq_id: Hashable) -> float:
        """The current priority. Raises KeyError for an unknown sequence."""
        return self._priority[seq_id]

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._priority

    def __len__(self) -> int:
        return len(self._priority)

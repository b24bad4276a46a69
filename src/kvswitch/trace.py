"""Multi-turn conversation traces: token counts per turn, as replayed by the benchmarks.

The bundled default is a real ShareGPT (GPT-4) multi-turn trace counted with the Llama-2
tokenizer (``kvswitch/data/README.md`` gives its provenance and license).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["Conversation", "TraceError", "Turn", "default_trace_path", "load_trace", "sample"]

DEFAULT_TRACE_NAME = "sharegpt4_multiturn_turns_llama2_tok.csv"
REQUIRED_COLUMNS = ("conversation_id", "turn", "new_input_tokens", "output_tokens")
OPTIONAL_COLUMNS = ("arrival_s",)


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, row and column."""


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation, in tokens."""

    new_input_tokens: int  #: user input added this turn (the history is the prefix)
    output_tokens: int  #: tokens the model generates this turn


@dataclass(frozen=True)
class Conversation:
    """A conversation's turns in order; ``arrival_s`` is None unless the trace gives it."""

    conversation_id: str
    turns: tuple[Turn, ...]
    arrival_s: float | None = None

    @property
    def total_tokens(self) -> int:
        """Tokens of the whole conversation: every input and output."""
        return sum(t.new_input_tokens + t.output_tokens for t in self.turns)


def default_trace_path() -> Path:
    """Path of the bundled ShareGPT multi-turn trace (5,678 conversations, 30,731 turns)."""
    return Path(str(resources.files("kvswitch") / "data" / DEFAULT_TRACE_NAME))


def load_trace(path: str | Path | None = None) -> list[Conversation]:
    """Read a trace CSV with columns ``conversation_id, turn, new_input_tokens,
    output_tokens`` and optional ``arrival_s`` (seconds; taken from each conversation's
    first turn). Other columns are ignored.

    Turns of one conversation must be numbered 0, 1, 2, ... (rows may interleave).

    Args:
        path: the CSV; the bundled trace when None.

    Returns:
        Conversations in order of first appearance.

    Raises:
        TraceError: missing file or column, a value that is not a non-negative integer (or
            number for ``arrival_s``), a turn with no tokens at all, or turns out of order;
            the message names the row (1-based, header is row 1) and column.
    """
    path = Path(path) if path is not None else default_trace_path()
    try:
        handle = path.open(newline="")
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace: {e.strerror}") from None
    turns: dict[str, list[Turn]] = {}
    arrivals: dict[str, float | None] = {}
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}; found {header}")
        has_arrival = "arrival_s" in header
        for row_number, row in enumerate(reader, start=2):
            def integer(column: str, row=row, row_number=row_number) -> int:
                text = (row.get(column) or "").strip()
                if not text.isdigit():
                    raise TraceError(
                        f"{path}: row {row_number}, column {column!r}: expected a "
                        f"non-negative integer, got {text!r}"
                    )
                return int(text)

            conv = (row.get("conversation_id") or "").strip()
            if not conv:
                raise TraceError(f"{path}: row {row_number}, column 'conversation_id': empty")
            turn_index = integer("turn")
            turn = Turn(integer("new_input_tokens"), integer("output_tokens"))
            if turn.new_input_tokens + turn.output_tokens == 0:
                raise TraceError(f"{path}: row {row_number}: a turn with no tokens")
            seen = turns.setdefault(conv, [])
            if turn_index != len(seen):
                raise TraceError(
                    f"{path}: row {row_number}, column 'turn': conversation {conv!r} expects "
                    f"turn {len(seen)}, got {turn_index}"
                )
            seen.append(turn)
            if turn_index == 0:
                arrivals[conv] = None
                if has_arrival:
                    text = (row.get("arrival_s") or "").strip()
                    try:
                        arrival = float(text)
                    except ValueError:
                        arrival = -1.0
                    if not arrival >= 0.0:  # also rejects NaN
                        raise TraceError(
                            f"{path}: row {row_number}, column 'arrival_s': expected a "
                            f"non-negative number, got {text!r}"
                        )
                    arrivals[conv] = arrival
    if not turns:
        raise TraceError(f"{path}: no turns in trace")
    return [Conversation(c, tuple(t), arrivals[c]) for c, t in turns.items()]


def sample(conversations: list[Conversation], n: int, seed: int) -> list[Conversation]:
    """``n`` conversations drawn without replacement with ``random.Random(seed)``; all of them
    (shuffled) when ``n`` exceeds the trace."""
    rng = random.Random(seed)
    return rng.sample(conversations, min(n, len(conversations)))

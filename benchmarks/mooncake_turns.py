#!/usr/bin/env python3
"""Multi-turn conversations from Mooncake's real conversation trace, as a kvswitch trace CSV.

Mooncake's FAST'25 release (github.com/kvcache-ai/Mooncake, ``FAST25-release/traces/
conversation_trace.jsonl``, Apache-2.0) lists 12,031 requests sampled from one hour of
Kimi's online conversation service: arrival time, input and output tokens, and the hashes
of the input's 512-token prefix blocks (``hash_ids``), no text. A later turn of a
conversation sends the whole history again, so its first blocks hash as the earlier turn's
did. This script links each request to the latest earlier request whose full blocks are a
prefix of its own (beyond the first block, which every request shares), and writes
``conversation_id, turn, new_input_tokens, output_tokens`` (``kvswitch.trace`` format; no
``arrival_s``: ``kvswitch bench`` draws Poisson arrivals, so ``--load`` applies):

* a turn's new input is its input less the parent's input and output (at least 1; the
  service may have trimmed the history, which then shows as a short new input);
* a request with no such parent starts a conversation, and so does a second request on
  the same parent (a regenerated reply: kvswitch's traces are linear), with its whole
  input as new input.

Usage::

    python3 benchmarks/mooncake_turns.py conversation_trace.jsonl \\
        > benchmarks/data/mooncake_conversation_turns.csv
"""

from __future__ import annotations

import csv
import json
import sys

BLOCK = 512  # tokens per hash block (the trace's README)


def conversations(requests: list[dict]) -> list[list[dict]]:
    """Requests grouped into conversations (each in arrival order)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i]["timestamp"], i))
    trie: dict = {}  # hash -> (child trie, latest request whose full blocks end here)
    parent: dict[int, int] = {}
    taken: set[int] = set()  # requests that already have a next turn
    for i in order:
        r = requests[i]
        node, best = trie, None
        for depth, h in enumerate(r["hash_ids"]):
            if h not in node:
                break
            node, owner = node[h]
            if owner is not None and depth >= 1:
                best = owner
        if best is not None and best not in taken:
            parent[i] = best
            taken.add(best)
        full = r["input_length"] // BLOCK  # blocks that a continuation repeats unchanged
        node = trie
        for depth, h in enumerate(r["hash_ids"][:full]):
            child, owner = node.get(h, ({}, None))
            node[h] = (child, i if depth == full - 1 else owner)
            node = child
    convs: dict[int, list[int]] = {}
    root: dict[int, int] = {}
    for i in order:
        root[i] = root[parent[i]] if i in parent else i
        convs.setdefault(root[i], []).append(i)
    return [[requests[i] for i in c] for c in convs.values()]


def main() -> None:
    with open(sys.argv[1]) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["conversation_id", "turn", "new_input_tokens", "output_tokens"])
    for n, conv in enumerate(conversations(requests)):
        prev = None
        for t, r in enumerate(conv):
            new = r["input_length"] - (prev["input_length"] + prev["output_length"]
                                       if prev else 0)
            out.writerow([f"mc{n}", t, max(new, 1), max(r["output_length"], 1)])
            prev = r


if __name__ == "__main__":
    main()

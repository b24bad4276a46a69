"""Adapters between engines and kvswitch.

Each adapter lives in its own subpackage and imports its engine only when imported itself,
so ``import kvswitch`` never needs torch or an engine:

* [`kvswitch.adapters.transformers`][]: paged KV for transformers causal LMs of the Llama
  family, for custom decoding loops (``pip install ".[transformers]"``).
"""

"""kvswitch.adapters.sglang.extents and the plugin's import cost: no SGLang needed, so these
run in the main suite too."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvswitch.adapters.sglang.extents import as_index_array, coalesce


def _expand(pairs: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The slot pairs an extent list copies (the reference the test compares with)."""
    src, dst = [], []
    for s, d, n in pairs.tolist():
        src.extend(range(s * block, (s + n) * block))
        dst.extend(range(d * block, (d + n) * block))
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)


@st.composite
def _page_transfers(draw):
    """Page-aligned slot vectors as SGLang passes them: whole pages, in any page order."""
    block = draw(st.sampled_from([1, 2, 16]))
    n_pages = draw(st.integers(0, 24))
    src_pages = draw(st.permutations(range(40)))[:n_pages]
    dst_pages = draw(st.permutations(range(40)))[:n_pages]
    if draw(st.booleans()):  # SGLang's fresh host allocator: contiguous host pages
        src_pages = sorted(src_pages)
    offs = np.arange(block)
    src = np.array([p * block + offs for p in src_pages], dtype=np.int64).reshape(-1)
    dst = np.array([p * block + offs for p in dst_pages], dtype=np.int64).reshape(-1)
    return src, dst, block


@settings(max_examples=200, deadline=None)
@given(_page_transfers())
def test_extents_copy_exactly_the_slot_pairs_in_as_few_runs_as_the_order_allows(t):
    src, dst, block = t
    pairs = coalesce(src, dst, block)
    got_src, got_dst = _expand(pairs, block)
    assert np.array_equal(got_src, src) and np.array_equal(got_dst, dst)
    assert (pairs[:, 2] > 0).all()
    # Maximal: two neighbouring extents never continue each other on both sides.
    cont = (pairs[:-1, 0] + pairs[:-1, 2] == pairs[1:, 0]) & \
           (pairs[:-1, 1] + pairs[:-1, 2] == pairs[1:, 1])
    assert not cont.any()


def test_contiguous_slots_are_one_extent_in_pages():
    src = np.arange(64, 64 + 256)
    dst = np.arange(1024, 1024 + 256)
    assert coalesce(src, dst, 16).tolist() == [[4, 64, 16]]
    assert coalesce(src, dst, 1).tolist() == [[64, 1024, 256]]


def test_misaligned_or_mismatched_slots_are_refused():
    with pytest.raises(ValueError, match="not whole pages of 16"):
        coalesce(np.arange(8, 24), np.arange(16), 16)
    with pytest.raises(ValueError, match="differ in length"):
        coalesce(np.arange(4), np.arange(5))
    with pytest.raises(ValueError, match=">= 0"):
        coalesce(np.array([-1, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one-dimensional"):
        as_index_array(np.zeros((2, 2), np.int64), "host_indices")
    with pytest.raises(TypeError, match="integers"):
        as_index_array(np.zeros(2), "host_indices")
    assert coalesce(np.zeros(0, np.int64), np.zeros(0, np.int64), 16).shape == (0, 3)


def test_plugin_import_imports_neither_torch_nor_sglang():
    code = ("import sys, kvswitch, kvswitch.adapters.sglang.plugin as p; "
            "import kvswitch.adapters.sglang as a; "
            "assert callable(p.register) and a.BACKEND_NAME == 'kvswitch'; "
            "bad = sorted(m for m in ('torch', 'sglang') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

"""Smoke test of an installed kvswitch wheel (CI's wheel step, cibuildwheel's test-command).

Run it from outside the source tree, so `import kvswitch` finds the installed package:
allocates with BlockGroupAllocator, swaps out and back in with AsyncSwapEngine on the host
backend, checks the bytes, and prints the installed wheel's tag.
"""

from __future__ import annotations

import importlib.metadata as md
import pathlib
import sys

import numpy as np

import kvswitch
from kvswitch import AsyncSwapEngine, BlockGroupAllocator, HostKVPool, KVLayout

pkg = pathlib.Path(kvswitch.__file__).resolve().parent
if (pkg.parent.parent / "pyproject.toml").exists():  # src/kvswitch of a checkout
    sys.exit(f"kvswitch imported from a source tree ({pkg}), not from an installed wheel")

dist = md.distribution("kvswitch")
if dist.version != kvswitch.__version__:  # pyproject.toml and __init__.py disagree
    sys.exit(f"wheel metadata says {dist.version}, kvswitch.__version__ {kvswitch.__version__}")
wheel_meta = dist.read_text("WHEEL") or ""
tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines()
        if line.startswith("Tag:")]
core = pathlib.Path(kvswitch._core.__file__).name
if any("-abi3-" in t for t in tags) != core.endswith(".abi3.so"):  # limited API or not
    sys.exit(f"wheel tag {tags} does not match the extension {core}")

# A vLLM-style device pool ([2, N, block, heads, dim] per layer) in host memory.
rng = np.random.default_rng(0)
num_blocks = 64
tensors = [rng.standard_normal((2, num_blocks, 16, 2, 8)).astype(np.float16) for _ in range(2)]
layout = KVLayout.from_vllm(tensors)

alloc = BlockGroupAllocator(num_blocks)
blocks = alloc.allocate("seq-0", 10)
groups = alloc.groups("seq-0")  # [(start, length)]: contiguous extents
assert sum(n for _, n in groups) >= len(blocks), groups

before = [t.copy() for t in tensors]
host = HostKVPool(layout, 32, pin=False)
with AsyncSwapEngine(layout, host, backend="host") as engine:
    assert engine.backend == "host", engine.backend
    # swap out: device extents -> host blocks packed from 0
    pairs, dst = [], 0
    for start, n in groups:
        pairs.append((start, dst, n))
        dst += n
    engine.swap_out(np.array(pairs, dtype=np.int64)).wait()
    for t in tensors:  # the device copy is lost
        t[:, blocks] = 0
    # swap in: back to the same device blocks
    engine.swap_in(np.array([(d, s, n) for s, d, n in pairs], dtype=np.int64)).wait()
for t, b in zip(tensors, before, strict=True):
    assert t.tobytes() == b.tobytes(), "bytes differ after swap out + swap in"
alloc.free("seq-0")
alloc.check_invariants()

print(f"kvswitch {kvswitch.__version__} from {pkg} ({core})")
print(f"wheel tag: {', '.join(tags) or '?'}; {len(blocks)} blocks in {len(groups)} group(s) "
      f"swapped out and in on the host backend: bytes equal")

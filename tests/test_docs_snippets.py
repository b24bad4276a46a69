"""Runnable docs: every ```python block of README.md and docs/**/*.md runs as written.

Each page's python blocks run in order in one fresh namespace, in a subprocess with a
timeout, so a later block may use what an earlier block of the same page defined (as a
reader would) and pages never share state. A block that cannot run everywhere is marked
by an HTML comment on the line before its fence (invisible on GitHub and on the site):

* ``<!-- snippet: skip (reason) -->``: never run here (e.g. needs a CUDA GPU); the reason
  is required, and skipped blocks are counted and printed.
* ``<!-- snippet: requires mod1 mod2 -->``: run only when those modules import (e.g.
  ``torch transformers``); otherwise the block is skipped and counted, and so is every
  later block of its page (they may depend on it).

Other fences (bash, text, mermaid) are never run. A failing block names its file and line.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # per page; the slowest (transformers import + tiny model) takes ~10 s
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>skip|requires)\b(?P<arg>.*?)-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None = None  # reason, for "skip" markers
    requires: tuple[str, ...] = ()


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, with the marker on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        end = i + 1
        while end < len(lines) and not re.match(
                rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{i + 1}: unclosed code fence")
        if info.split(maxsplit=1)[:1] in (["python"], ["py"]):
            code = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln
                             for ln in lines[i + 1:end])
            block = Block(path, i + 2, code + "\n")
            mark = MARKER.match(lines[i - 1]) if i else None
            if mark and mark["kind"] == "skip":
                reason = mark["arg"].strip().strip("()").strip()
                if not reason:
                    raise AssertionError(f"{path}:{i}: a skip marker needs a reason")
                block.skip = reason
            elif mark:
                block.requires = tuple(mark["arg"].split())
                if not block.requires:
                    raise AssertionError(f"{path}:{i}: a requires marker names no module")
            blocks.append(block)
        i = end + 1
    return blocks


# Runs in the subprocess: the blocks in order, in one namespace, each compiled with its file
# and line so a traceback points into the markdown.
RUNNER = """
import json, sys
ns = {"__name__": "__main__"}
for path, line, code in json.loads(sys.stdin.read()):
    exec(compile("\\n" * (line - 1) + code, path, "exec"), ns)
"""


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


PAGES = [p for p in pages() if python_blocks(p)]


def test_pages_with_snippets_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/getting-started.md", "docs/writing-an-adapter.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_snippets_run(page: Path):
    run, skipped, lacking = [], [], False
    for block in python_blocks(page):
        missing = [m for m in block.requires if not importable(m)]
        if lacking:
            reason = "after a block skipped for a missing module: it may depend on it"
        elif block.skip:
            reason = block.skip
        elif missing:
            reason = "needs " + " ".join(missing)
            lacking = True
        else:
            run.append(block)
            continue
        skipped.append((block, reason))
    rel = page.relative_to(ROOT).as_posix()
    for block, reason in skipped:
        print(f"snippet skipped: {rel}:{block.line}: {reason}")
    if run:
        payload = json.dumps([(str(b.path), b.line, b.code) for b in run])
        proc = subprocess.run([sys.executable, "-c", RUNNER], input=payload, cwd=ROOT,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, (
            f"a python block of {rel} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    print(f"{rel}: {len(run)} snippet(s) ran, {len(skipped)} skipped")
    if skipped and not run:
        pytest.skip(f"{rel}: all {len(skipped)} snippet(s) skipped: {skipped[0][1]}")

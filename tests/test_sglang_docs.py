"""The commands docs/adapters/sglang.md gives SGLang users work as written: the
``launch_server`` line parses with SGLang's own parser into HiCache with kvswitch's
backend, the Python form asks for the same, and the plugin check prints kvswitch's entry
point. (Serving itself: tests/test_sglang_e2e.py.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.server_args")
import sglang  # noqa: E402
from sglang.srt.server_args import ServerArgs, prepare_server_args  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "adapters" / "sglang.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _block(lang: str, needle: str) -> str:
    (body,) = [b for kind, b in FENCE.findall(PAGE.read_text()) if kind == lang and needle in b]
    return body


def _check(args) -> None:
    assert args.enable_hierarchical_cache is True
    assert args.radix_cache_backend == "kvswitch"
    assert args.hicache_ratio == 2.0
    assert args.hicache_mem_layout == "page_first"


def test_the_documented_launch_command_parses_to_hicache_with_kvswitch():
    argv = shlex.split(_block("bash", "sglang.launch_server").replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    _check(prepare_server_args(argv[3:]))


def test_the_documented_python_form_asks_for_the_same(monkeypatch):
    seen = {}

    def engine(**kwargs):
        seen.update(kwargs)
    monkeypatch.setattr(sglang, "Engine", engine)
    exec(compile(_block("python", "radix_cache_backend"), str(PAGE), "exec"), {})
    _check(ServerArgs(**seen))


def test_the_documented_plugin_check_lists_kvswitch():
    command = shlex.split(_block("bash", "entry_points(group=").strip())
    assert command[0] == "python"
    out = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "name='kvswitch', value='kvswitch.adapters.sglang.plugin:register'" in out

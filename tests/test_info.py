"""``kvswitch info``: runs anywhere (this CPU machine included), exit 0, documented keys."""

import json

from kvswitch import _core
from kvswitch.cli import main
from kvswitch.info import collect, format_info


def test_info_human_output_has_every_section(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for section in ("kvswitch", "build", "backends", "devices", "host memory", "NUMA"):
        assert f"\n{section}\n" in f"\n{out}\n"
    assert "cuMemHostRegister" in out


def test_info_json_has_the_documented_keys(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"version", "build", "backends", "devices", "host_memory", "numa"}
    assert {"extension", "compiler", "cxx_standard", "streaming_stores", "optimized",
            "sanitize", "python", "platform", "machine"} <= set(info["build"])
    assert info["backends"]["host"]["available"] is True
    assert {"available", "reason", "driver_version", "device_count", "batch_copy",
            "stream_mem_ops"} <= set(info["backends"]["cuda"])
    assert {"memlock_soft", "memlock_hard", "pinned", "pin_reason", "engine_host_memory",
            "note"} <= set(info["host_memory"])
    assert info["host_memory"]["engine_host_memory"] in ("pinned", "registered", "pageable",
                                                        "n/a")
    for node in info["numa"]:
        assert {"node", "cpus", "mem_total_kib"} <= set(node)


def test_info_json_to_a_file(tmp_path, capsys):
    path = tmp_path / "info.json"
    assert main(["info", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["version"]


def test_info_json_to_an_unwritable_path_exits_1(tmp_path, capsys):
    assert main(["info", "--json", str(tmp_path / "missing" / "info.json")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_cuda_section_says_why_it_is_unavailable():
    info = collect()
    cuda = info["backends"]["cuda"]
    if not cuda["available"]:
        assert cuda["reason"]
        assert not info["host_memory"]["pinned"] or info["host_memory"]["pin_reason"]
    if _core.cuda_driver_info()["available"] is False:
        assert cuda["reason"] == _core.cuda_driver_info()["reason"]
        assert info["devices"] == []
        assert "unavailable: " in format_info(info)


def test_a_failing_cuda_probe_is_reported_not_raised(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(_core, "cuda_driver_info", boom)
    cuda = collect()["backends"]["cuda"]
    assert cuda["available"] is False and "driver exploded" in cuda["reason"]


def test_build_is_what_the_compiler_recorded():
    b = _core.build_info()
    assert any(c in b["compiler"] for c in ("GCC", "Clang", "MSVC")), b
    assert b["cxx_standard"] in ("C++17", "C++20") and isinstance(b["streaming_stores"], bool)
    info = collect()
    assert info["build"]["compiler"] == b["compiler"]
    assert info["build"]["sanitize"] == b["sanitize"]


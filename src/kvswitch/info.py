"""``kvswitch info``: what this installation of kvswitch can do on this machine.

[`collect`][] gathers one JSON-ready dict; [`format_info`][] renders it as short aligned
sections. Nothing here raises: a probe that fails records why instead.

Keys of the dict (``kvswitch info --json``):

* ``version``: kvswitch's version.
* ``build``: ``extension`` (path of ``kvswitch._core``) and what the compiler recorded in it
  (``_core.build_info()``): ``compiler``, ``cxx_standard``, ``streaming_stores`` (whether the
  host backend's SSE2 streaming-store copy path is compiled in), ``optimized`` (``NDEBUG``:
  a Release or RelWithDebInfo build), ``sanitize`` (``""`` or e.g. ``"address"``); then
  ``python``, ``platform``, ``machine``.
* ``backends``: ``host`` and ``cuda``, each ``{"available": bool, "reason": str}``; ``cuda``
  adds ``driver_version``, ``device_count``, ``batch_copy``, ``stream_mem_ops``.
* ``devices``: one ``{"ordinal", "usable", "reason", "attributes"}`` per CUDA device the
  driver reports (empty without a driver).
* ``host_memory``: ``memlock_soft``/``memlock_hard`` (``ulimit -l`` in bytes, ``None`` =
  unlimited), ``pinned``/``pin_reason`` (a tiny ``HostKVPool(pin=True)``),
  ``engine_host_memory`` (``AsyncSwapEngine.stats()["host_memory"]`` of an engine over
  that pool: ``"pinned"``, ``"registered"``, ``"pageable"`` or ``"n/a"``), ``engine_backend``
  and ``note``.
* ``numa``: one ``{"node", "cpus", "mem_total_kib"}`` per ``/sys/devices/system/node/node*``.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import resource
import sys
from typing import Any

__all__ = ["collect", "format_info"]

HOST_MEMORY_NOTE = ("the cuda backend page-locks a pageable host pool with cuMemHostRegister "
                    "(\"registered\"); a pinned pool is already page-locked; \"n/a\" = host "
                    "backend (memcpy, nothing to lock)")


def _build(core: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "extension": getattr(core, "__file__", "") or "",
        "compiler": None,
        "cxx_standard": None,
        "streaming_stores": None,
        "optimized": None,
        "sanitize": None,
        "python": platform.python_version(),
        "platform": sys.platform,
        "machine": platform.machine(),
    }
    try:
        b.update(dict(core.build_info()))  # recorded by the compiler (cpp/bindings/module.cpp)
    except Exception as e:  # noqa: BLE001 - report, never fail
        b["error"] = f"build_info() failed: {e}"
    return b


def _cuda(core: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        info = dict(core.cuda_driver_info())
    except Exception as e:  # noqa: BLE001 - report, never fail
        return {"available": False, "reason": f"cuda_driver_info() failed: {e}",
                "driver_version": 0, "device_count": 0, "batch_copy": False,
                "stream_mem_ops": False}, []
    devices = []
    attrs = getattr(core, "cuda_device_attributes", None)
    for i in range(int(info.get("device_count") or 0)):
        try:
            why = str(core.cuda_unavailable_reason(i))
        except Exception as e:  # noqa: BLE001
            why = f"cuda_unavailable_reason({i}) failed: {e}"
        a: dict[str, Any] = {}
        if attrs is not None:
            try:
                a = dict(attrs(i))
            except Exception as e:  # noqa: BLE001
                a = {"error": str(e)}
        devices.append({"ordinal": i, "usable": not why, "reason": why or "usable",
                        "attributes": a})
    cuda = {
        "available": bool(info.get("available")) and any(d["usable"] for d in devices),
        "reason": str(info.get("reason") or ""),
        "driver_version": int(info.get("driver_version") or 0),
        "device_count": int(info.get("device_count") or 0),
        "batch_copy": bool(info.get("batch_copy")),
        "stream_mem_ops": bool(info.get("stream_mem_ops")),
    }
    if not cuda["reason"]:
        if not devices:
            cuda["reason"] = "the driver reports no CUDA device"
        elif cuda["available"]:
            cuda["reason"] = "driver and device usable"
        else:
            cuda["reason"] = "; ".join(f"device {d['ordinal']}: {d['reason']}" for d in devices)
    return cuda, devices


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else int(value)


def _host_memory() -> dict[str, Any]:
    out: dict[str, Any] = {"memlock_soft": None, "memlock_hard": None, "pinned": False,
                           "pin_reason": "", "engine_host_memory": "n/a",
                           "engine_backend": "", "note": HOST_MEMORY_NOTE}
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        out["memlock_soft"], out["memlock_hard"] = _limit(soft), _limit(hard)
    except (OSError, ValueError, AttributeError) as e:
        out["memlock_error"] = str(e)
    try:
        import numpy as np

        from kvswitch.host_pool import HostKVPool
        from kvswitch.layout import KVLayout
        from kvswitch.swap import AsyncSwapEngine

        layout = KVLayout.from_tensors([np.zeros((2, 64), np.uint8)])
        pool = HostKVPool(layout, 2, pin=True)
        out["pinned"], out["pin_reason"] = bool(pool.pinned), str(pool.pin_reason)
        engine = AsyncSwapEngine(layout, pool, backend="auto", num_workers=0)
        try:
            out["engine_host_memory"] = str(engine.stats().get("host_memory", "n/a"))
            out["engine_backend"] = f"{engine.backend} ({engine.backend_reason})"
        finally:
            engine.close()
    except Exception as e:  # noqa: BLE001
        out["pin_reason"] = out["pin_reason"] or f"probe failed: {type(e).__name__}: {e}"
    return out


def _numa() -> list[dict[str, Any]]:
    nodes = []
    paths = glob.glob("/sys/devices/system/node/node[0-9]*")
    for path in sorted(paths, key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)))):
        node: dict[str, Any] = {"node": int(os.path.basename(path)[4:]), "cpus": None,
                                "mem_total_kib": None}
        try:
            with open(os.path.join(path, "cpulist")) as f:
                node["cpus"] = f.read().strip()
        except OSError:
            pass
        try:
            with open(os.path.join(path, "meminfo")) as f:
                for line in f:
                    if m := re.search(r"MemTotal:\s+(\d+)\s*kB", line):
                        node["mem_total_kib"] = int(m[1])
        except OSError:
            pass
        nodes.append(node)
    return nodes


def collect() -> dict[str, Any]:
    """Everything ``kvswitch info`` reports, as one JSON-ready dict (see the module doc)."""
    import kvswitch
    from kvswitch import _core

    cuda, devices = _cuda(_core)
    return {
        "version": kvswitch.__version__,
        "build": _build(_core),
        "backends": {"host": {"available": True, "reason": "always (memcpy in host memory)"},
                     "cuda": cuda},
        "devices": devices,
        "host_memory": _host_memory(),
        "numa": _numa(),
    }


def _bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def _yes(x: bool | None) -> str:
    return "unknown" if x is None else ("yes" if x else "no")


def format_info(info: dict[str, Any]) -> str:
    """Short aligned sections for a terminal."""
    b, cuda, hm = info["build"], info["backends"]["cuda"], info["host_memory"]
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("kvswitch", [("version", info["version"]),
                      ("python", f"{b['python']} ({b['platform']}, {b['machine']})")]),
        ("build", [("extension", b["extension"]),
                   ("compiler", b["compiler"] or "unknown"),
                   ("C++ standard", b["cxx_standard"] or "unknown"),
                   ("SSE2 streaming stores", _yes(b["streaming_stores"])),
                   ("optimized", _yes(b["optimized"])),
                   ("sanitizers", b["sanitize"] or "none")]),
        ("backends", [("host", "available: " + info["backends"]["host"]["reason"]),
                      ("cuda", ("available" if cuda["available"] else "unavailable")
                       + f": {cuda['reason']}")]),
    ]
    if cuda["driver_version"] or cuda["device_count"]:
        major, minor = divmod(cuda["driver_version"], 1000)
        sections[-1][1].extend([
            ("  driver", f"CUDA {major}.{minor // 10}, {cuda['device_count']} device(s)"),
            ("  batched copies", _yes(cuda["batch_copy"])),
            ("  stream memory ops", _yes(cuda["stream_mem_ops"]))])
    devs = [(f"cuda:{d['ordinal']}", ("usable" if d["usable"] else f"unusable: {d['reason']}")
             + (f" (cc {d['attributes']['compute_capability_major']}."
                f"{d['attributes']['compute_capability_minor']})"
                if "compute_capability_major" in d["attributes"] else ""))
            for d in info["devices"]]
    sections.append(("devices", devs or [("cuda", "none")]))
    sections.append(("host memory", [
        ("ulimit -l", f"{_bytes(hm['memlock_soft'])} (hard {_bytes(hm['memlock_hard'])})"),
        ("pinned pool", ("yes: " if hm["pinned"] else "no: ")
         + hm["pin_reason"].removeprefix("not pinned: ")),
        ("engine host memory", hm["engine_host_memory"]),
        ("", hm["note"])]))
    numa = [(f"node{n['node']}", f"cpus {n['cpus'] or '?'}, " + (
        _bytes(n["mem_total_kib"] * 1024) if n["mem_total_kib"] else "memory ?"))
        for n in info["numa"]]
    sections.append(("NUMA", numa or [("nodes", "none reported")]))
    width = max(len(k) for _, rows in sections for k, _ in rows)
    lines = []
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {k:<{width}}  {v}" for k, v in rows)
    return "\n".join(lines)

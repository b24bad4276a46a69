"""Python cost of the kvswitch SGLang host pool's transfer calls, on the CPU.

SGLang's own transfer kernels (``sgl_kernel.kvcacheio``) are CUDA-only, so on the CPU the
side-by-side reference is the same copy written in PyTorch the obvious way (advanced
indexing per layer and K/V, what a CPU fallback would do). For each host layout, with
SGLang's real ``MHATokenToKVPool(device="cpu")`` and kvswitch's
``KvswitchMHATokenToKVPoolHost`` (host backend, copies inline):

* ``backup`` (``backup_from_device_all_layer``) and ``load`` (``load_to_device_per_layer``,
  one layer; the first layer of a load coalesces the indices, later layers reuse them)
  wall time per call, median of ``--repeats``, for 1 page (the call's fixed cost: the bytes
  are a few KB) and for ``--pages`` pages of contiguous host slots;
* the extents and engine copies per backup (copies = extents x regions), against the
  page count.

Run: ``python benchmarks/sglang_transfer_cost.py`` (``--quick`` for CI, ``--json PATH``).
Needs sglang (``pip install '.[sglang]'``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvswitch.adapters.sglang.host_pool import KvswitchMHATokenToKVPoolHost

LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def median_us(fn, repeats: int) -> float:
    fn()  # warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return statistics.median(out) / 1e3


def torch_backup(host, device, host_slots, dev_slots):
    """The reference: every layer's K and V by advanced indexing into SGLang's buffer."""
    for layer in range(device.layer_num):
        for kv, buf in ((0, device.get_key_buffer(layer)), (1, device.get_value_buffer(layer))):
            if host.layout == "layer_first":
                host.kv_buffer[kv, layer, host_slots] = buf[dev_slots]
            elif host.layout == "page_first":
                host.kv_buffer[kv, host_slots, layer] = buf[dev_slots]
            else:
                ps = host.page_size
                pages = host_slots.view(-1, ps)[:, 0] // ps
                host.kv_buffer[kv, pages, layer] = buf[dev_slots].view(-1, ps, *buf.shape[1:])


def run(args) -> dict:
    rows = []
    for layout in LAYOUTS:
        for pages in (1, args.pages):
            ps = args.page_size
            device = MHATokenToKVPool(
                size=(2 * args.pages + 2) * ps, page_size=ps, dtype=torch.bfloat16,
                head_num=args.heads, head_dim=args.head_dim, layer_num=args.layers,
                device="cpu", enable_memory_saver=False, enable_alt_stream=False)
            info = device.get_device_pool_infos()[0].buffer_info
            host = KvswitchMHATokenToKVPoolHost(
                info, 1.0, 0, ps, layout, pin_memory=False, device="cpu",
                device_capacity_tokens=device.size, start_layer=0, end_layer=args.layers,
                host_token_capacity=(pages + 1) * ps)
            dev_slots = torch.arange(ps, (pages + 1) * ps)  # contiguous device pages
            host_slots = host.alloc(pages * ps)
            before = dict(host.kvswitch.counters)
            host.backup_from_device_all_layer(device, host_slots, dev_slots, "direct")
            extents = host.kvswitch.counters["backup_extents"] - before["backup_extents"]
            copies = host.kvswitch.counters["backup_copies"] - before["backup_copies"]
            backup = median_us(lambda h=host, p=device, s=host_slots, d=dev_slots:
                               h.backup_from_device_all_layer(p, s, d, "direct"),
                               args.repeats)

            def load_all(h=host, p=device, s=host_slots, d=dev_slots):
                for layer in range(args.layers):
                    h.load_to_device_per_layer(p, s, d, layer, "direct")

            load_layers = median_us(load_all, args.repeats) / args.layers
            ref = median_us(lambda h=host, p=device, s=host_slots, d=dev_slots:
                            torch_backup(h, p, s, d), args.repeats)
            rows.append({"layout": layout, "pages": pages, "page_size": ps,
                         "block_tokens": host.kvswitch.block_tokens, "extents": extents,
                         "copies": copies, "regions": 2 * args.layers,
                         "backup_us": round(backup, 1), "load_layer_us": round(load_layers, 1),
                         "torch_backup_us": round(ref, 1)})
            host.destroy()
    return {"machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "config": vars(args), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="small and short (CI)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.heads, args.head_dim, args.pages, args.repeats = 4, 2, 64, 16, 5
    torch.set_num_threads(1)
    out = run(args)
    hdr = (f"{'layout':18} {'pages':>5} {'blk_tok':>7} {'extents':>7} {'copies':>6} "
           f"{'backup_us':>10} {'load/layer_us':>13} {'torch_backup_us':>15}")
    print(hdr)
    for r in out["rows"]:
        print(f"{r['layout']:18} {r['pages']:5d} {r['block_tokens']:7d} {r['extents']:7d} "
              f"{r['copies']:6d} {r['backup_us']:10.1f} {r['load_layer_us']:13.1f} "
              f"{r['torch_backup_us']:15.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

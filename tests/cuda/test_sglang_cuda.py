"""kvswitch's SGLang host pool on CUDA: SGLang's ``MHATokenToKVPool(device="cuda")``, the
host pool pinned by SGLang (``cudaHostRegister``), kvswitch's CUDA backend.

Skipped without sglang or without a GPU. Not yet run on GPU hardware (no GPU was available
when it was written). Nothing here has a timed assertion.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # before importing SGLang (about a minute)
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("sglang.srt.mem_cache.pool_host.mha")

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

from kvswitch.adapters.sglang.host_pool import KvswitchMHATokenToKVPoolHost  # noqa: E402

pytestmark = pytest.mark.cuda

LAYERS, HEADS, HEAD_DIM, PAGES = 4, 2, 64, 32


def make_pools(layout: str, page_size: int):
    device = MHATokenToKVPool(
        size=PAGES * page_size, page_size=page_size, dtype=torch.bfloat16, head_num=HEADS,
        head_dim=HEAD_DIM, layer_num=LAYERS, device="cuda", enable_memory_saver=False,
        enable_alt_stream=False)
    for layer in range(LAYERS):
        for buf in (device.get_key_buffer(layer), device.get_value_buffer(layer)):
            raw = buf.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, device="cuda"))
    info = device.get_device_pool_infos()[0].buffer_info
    host = KvswitchMHATokenToKVPoolHost(
        info, 1.0, 0, page_size, layout, pin_memory=True, device="cpu",
        device_capacity_tokens=device.size, start_layer=0, end_layer=LAYERS,
        host_token_capacity=PAGES * page_size)
    assert host.kvswitch.backend == "cuda"
    return device, host


def slots_of(pages, page_size: int, device="cpu") -> torch.Tensor:
    offs = torch.arange(page_size, dtype=torch.int64)
    s = (torch.as_tensor(pages, dtype=torch.int64)[:, None] * page_size + offs).reshape(-1)
    return s.to(device)


def host_page(host, token: int) -> torch.Tensor:
    page = host.get_data_page(token, flat=False)
    if host.layout == "page_first":
        page = page.permute(0, 2, 1, 3, 4)
    elif host.layout == "page_first_direct":
        page = page[:, 0]
    return page


def device_tokens(device, slots) -> torch.Tensor:
    return torch.stack([
        torch.stack([device.get_key_buffer(i)[slots] for i in range(LAYERS)]),
        torch.stack([device.get_value_buffer(i)[slots] for i in range(LAYERS)]),
    ])


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_backup_and_per_layer_load_on_streams(layout, page_size):
    device, host = make_pools(layout, page_size)
    try:
        src, dst = [3, 9, 4, 5], [20, 21, 22, 30]
        src_slots = slots_of(src, page_size, "cuda")
        dst_slots = slots_of(dst, page_size, "cuda")
        host_slots = host.alloc(len(src_slots))
        expected = device_tokens(device, src_slots).cpu()
        write = torch.cuda.Stream()
        write.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(write):
            host.backup_from_device_all_layer(device, host_slots, src_slots, "kernel")
        # The backup is ordered before the write stream's later work (SGLang's backup-done
        # event): once that stream has passed the call, the bytes are on the host.
        write.synchronize()
        for i in range(len(src)):
            got = host_page(host, int(host_slots[i * page_size]))
            want = expected[:, :, i * page_size:(i + 1) * page_size]
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        load = torch.cuda.Stream()
        load.wait_stream(torch.cuda.current_stream())
        events = [torch.cuda.Event() for _ in range(LAYERS)]
        with torch.cuda.stream(load):  # as SGLang's L2TransferEngine does
            for layer in range(LAYERS):
                host.load_to_device_per_layer(device, host_slots, dst_slots, layer, "kernel")
                events[layer].record()
        compute = torch.cuda.current_stream()
        for layer in range(LAYERS):  # each layer's consumer waits for its own event only
            compute.wait_event(events[layer])
            k = device.get_key_buffer(layer)[dst_slots].cpu()
            v = device.get_value_buffer(layer)[dst_slots].cpu()
            assert torch.equal(k.view(torch.int16), expected[0, layer].view(torch.int16))
            assert torch.equal(v.view(torch.int16), expected[1, layer].view(torch.int16))
        host.kvswitch_synchronize()
    finally:
        host.destroy()

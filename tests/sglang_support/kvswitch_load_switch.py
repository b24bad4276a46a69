"""Test-only SGLang plugin: the negative control of ``tests/test_sglang_e2e.py``.

SGLang calls :func:`register` in every process it starts (entry-point group
``sglang.srt.plugins``; the test writes a ``.dist-info`` that names this module and puts it
on the path). After that, while the file named by ``KVSWITCH_TEST_SKIP_LOADS`` exists,
kvswitch's host-pool loads copy nothing: SGLang believes the prefix is back in the device
pool while its slots still hold whatever they held before. A test that compares served
tokens must then fail, which shows that its comparison can fail.
"""

from __future__ import annotations

import functools
import os


def register() -> None:
    from kvswitch.adapters.sglang.transfer import LayerTransfer

    if getattr(LayerTransfer.load, "kvswitch_test_switch", False):
        return
    original = LayerTransfer.load

    @functools.wraps(original)
    def load(self, host_indices, device_indices, layer, *, stream=None):
        marker = os.environ.get("KVSWITCH_TEST_SKIP_LOADS", "")
        if marker and os.path.exists(marker):
            return None  # the load is skipped: nothing copied
        return original(self, host_indices, device_indices, layer, stream=stream)

    load.kvswitch_test_switch = True
    LayerTransfer.load = load

"""Fetch a vLLM source distribution's tests from PyPI, for .ci/vllm_suite.sh.

Reads PyPI's simple index (PEP 503, what pip reads) for the sdist's link and sha256,
downloads it, checks the hash and extracts ``tests/`` and the build config files.
(``pip download --no-binary :all: vllm`` would also build vLLM's build requirements,
cmake and torch among them, from source to prepare its metadata.)

Usage: python tests/vllm_support/fetch_sdist.py VERSION OUT_DIR
"""

from __future__ import annotations

import hashlib
import re
import sys
import tarfile
import urllib.parse
import urllib.request


def main(version: str, out: str) -> None:
    index = "https://pypi.org/simple/vllm/"
    html = urllib.request.urlopen(index, timeout=120).read().decode()
    name = f"vllm-{version}.tar.gz"
    m = re.search(r'href="([^"]*/' + re.escape(name) + r'#sha256=([0-9a-f]{64})[^"]*)"', html)
    if m is None:
        sys.exit(f"{name} not found on {index}")
    url = urllib.parse.urljoin(index, m.group(1).replace("&amp;", "&")).split("#")[0]
    data = urllib.request.urlopen(url, timeout=600).read()
    if hashlib.sha256(data).hexdigest() != m.group(2):
        sys.exit(f"sha256 mismatch for {name}")
    path = f"{out}/{name}"
    with open(path, "wb") as f:
        f.write(data)
    with tarfile.open(path) as tar:
        members = [t for t in tar.getmembers()
                   if "/tests/" in t.name or t.name.endswith(("/pyproject.toml", "/setup.cfg"))]
        tar.extractall(out, members=members, filter="data")
    print("extracted", len(members), "files of", name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Fetch a vLLM source distribution's tests, for .ci/vllm_suite.sh.

Reads the package indexes pip itself would read for ``pip download`` (its configuration
files, ``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL``, ``--no-index``; pip's own default when
nothing is configured), finds the sdist's link and sha256 in their simple pages (PEP 503),
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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT = "vllm"


def pip_index_urls() -> list[str]:
    """The index URLs ``pip download`` would use here, in pip's order (index-url, then each
    extra-index-url); empty with ``no-index``.

    Parsed by pip's own option parser, so every place pip reads them counts, with pip's
    precedence (environment over command section over global section) and pip's default
    index when none is configured.
    """
    from pip._internal.commands import create_command  # pip has no public API for this

    options, _ = create_command("download").parse_args([])
    if options.no_index:
        return []
    return [options.index_url, *options.extra_index_urls]


def read_url(url: str, timeout: float) -> bytes:
    """The bytes at ``url``; a ``file:`` URL naming a directory reads its ``index.html``
    (how a local simple index is laid out)."""
    if urllib.parse.urlparse(url).scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        return (path / "index.html" if path.is_dir() else path).read_bytes()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def find_sdist(page: str, page_url: str, name: str) -> tuple[str, str] | None:
    """(absolute URL, sha256) of the link to ``name`` on a simple index page, or None."""
    m = re.search(r'href="([^"]*/' + re.escape(name) + r'#sha256=([0-9a-f]{64})[^"]*)"', page)
    if m is None:
        return None
    return urllib.parse.urljoin(page_url, m.group(1).replace("&amp;", "&")).split("#")[0], \
        m.group(2)


def locate(name: str, indexes: list[str]) -> tuple[str, str]:
    """The first index (in pip's order) whose project page links ``name`` with a sha256.

    Raises:
        SystemExit: no index lists it (each index's outcome is in the message).
    """
    tried = []
    for index in indexes:
        page_url = index.rstrip("/") + f"/{PROJECT}/"
        try:
            page = read_url(page_url, timeout=120).decode()
        except (OSError, urllib.error.URLError) as e:
            tried.append(f"{page_url}: {e}")
            continue
        if found := find_sdist(page, page_url, name):
            return found
        tried.append(f"{page_url}: no {name} with a sha256")
    if not indexes:
        sys.exit(f"{name}: pip is configured with no-index, so there is no index to read")
    sys.exit(f"{name} not found on pip's indexes:\n  " + "\n  ".join(tried))


def main(version: str, out: str) -> None:
    name = f"{PROJECT}-{version}.tar.gz"
    url, sha256 = locate(name, pip_index_urls())
    data = read_url(url, timeout=600)
    if hashlib.sha256(data).hexdigest() != sha256:
        sys.exit(f"sha256 mismatch for {name} from {url}")
    path = f"{out}/{name}"
    with open(path, "wb") as f:
        f.write(data)
    with tarfile.open(path) as tar:
        members = [t for t in tar.getmembers()
                   if "/tests/" in t.name or t.name.endswith(("/pyproject.toml", "/setup.cfg"))]
        tar.extractall(out, members=members, filter="data")
    print("extracted", len(members), "files of", name, "from", url)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

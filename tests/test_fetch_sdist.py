"""tests/vllm_support/fetch_sdist.py: the indexes come from pip's own configuration, in
pip's order, and the sdist is taken only with a matching sha256."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "vllm_support"
sys.path.insert(0, str(SUPPORT))
import fetch_sdist  # noqa: E402

# Every PIP_* variable of the caller is dropped: the child sees only what a test sets.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


def _pip_indexes(env: dict[str, str]) -> list[str]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import fetch_sdist; "
            "print(json.dumps(fetch_sdist.pip_index_urls()))")
    out = subprocess.run([sys.executable, "-c", code, str(SUPPORT)], env={**CLEAN_ENV, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_source_names_no_registry_address():
    text = (SUPPORT / "fetch_sdist.py").read_text()
    assert not re.search(r"https?://", text), "the index must come from pip's configuration"


def test_environment_overrides_config_file_and_extras_follow(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = file:///from-global/simple\n"
                    "[download]\nextra-index-url = file:///extra-a file:///extra-b\n")
    assert _pip_indexes({"PIP_CONFIG_FILE": str(conf)}) == [
        "file:///from-global/simple", "file:///extra-a", "file:///extra-b"]
    assert _pip_indexes({"PIP_CONFIG_FILE": str(conf),
                         "PIP_INDEX_URL": "file:///from-env/simple"})[0] == \
        "file:///from-env/simple"


def test_download_section_overrides_global(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = file:///g\n[download]\nindex-url = file:///d\n")
    assert _pip_indexes({"PIP_CONFIG_FILE": str(conf)}) == ["file:///d"]


def test_no_index_reads_nothing():
    assert _pip_indexes({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}) == []


def test_unconfigured_pip_uses_its_own_default():
    from pip._internal.models.index import PyPI

    assert _pip_indexes({"PIP_CONFIG_FILE": os.devnull}) == [PyPI.simple_url]


def _index(root: Path, version: str, *, corrupt: bool = False) -> tuple[str, bytes]:
    """A PEP 503 simple index on disk holding a tiny vllm sdist; returns its file: URL."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in ((f"vllm-{version}/tests/test_x.py", b"def test(): pass\n"),
                           (f"vllm-{version}/pyproject.toml", b"[project]\n"),
                           (f"vllm-{version}/vllm/engine.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()
    files = root / "files"
    files.mkdir(parents=True)
    (files / f"vllm-{version}.tar.gz").write_bytes(data)
    digest = hashlib.sha256(b"other" if corrupt else data).hexdigest()
    (root / "simple" / "vllm").mkdir(parents=True)
    (root / "simple" / "vllm" / "index.html").write_text(
        f'<a href="../../files/vllm-{version}.tar.gz#sha256={digest}">vllm-{version}.tar.gz</a>')
    return (root / "simple").as_uri(), data


def test_fetches_from_the_first_index_that_lists_it_and_checks_the_hash(tmp_path, monkeypatch):
    empty = tmp_path / "empty" / "simple" / "vllm"
    empty.mkdir(parents=True)
    (empty / "index.html").write_text('<a href="../x/vllm-0.0.1.tar.gz#sha256=' + "0" * 64 +
                                      '">old</a>')
    url, _ = _index(tmp_path / "idx", "9.9.9")
    monkeypatch.setattr(fetch_sdist, "pip_index_urls",
                        lambda: [(tmp_path / "empty" / "simple").as_uri(), url])
    out = tmp_path / "out"
    out.mkdir()
    fetch_sdist.main("9.9.9", str(out))
    assert (out / "vllm-9.9.9" / "tests" / "test_x.py").is_file()
    assert (out / "vllm-9.9.9" / "pyproject.toml").is_file()
    assert not (out / "vllm-9.9.9" / "vllm").exists()  # only tests/ and build config


def test_a_hash_mismatch_is_refused(tmp_path, monkeypatch):
    url, _ = _index(tmp_path / "idx", "9.9.9", corrupt=True)
    monkeypatch.setattr(fetch_sdist, "pip_index_urls", lambda: [url])
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        fetch_sdist.main("9.9.9", str(tmp_path))


def test_not_listed_anywhere_names_every_index_tried(tmp_path, monkeypatch):
    url, _ = _index(tmp_path / "idx", "9.9.9")
    missing = (tmp_path / "nowhere").as_uri()
    monkeypatch.setattr(fetch_sdist, "pip_index_urls", lambda: [missing, url])
    with pytest.raises(SystemExit, match=r"(?s)vllm-1\.2\.3\.tar\.gz not found.*nowhere.*idx"):
        fetch_sdist.main("1.2.3", str(tmp_path))

"""Shared helper of the CLI tests."""

from __future__ import annotations

from kvswitch.cli import main


def run_bench(capsys, *args: str) -> tuple[int, str, str]:
    """``kvswitch bench args``: (exit status, stdout, stderr)."""
    try:
        rc = main(["bench", *args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err

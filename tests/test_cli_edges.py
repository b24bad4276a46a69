"""Edges of the ``kvswitch`` command a new user meets first: output checks before the run,
a closed pipe, ``--version``, readable ``--help``, a progress bar that ends cleanly and
logs plainly, a summary that reads without arithmetic, and a plot that says what it shows.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from importlib.metadata import version

import pytest
import tqdm
from _cli import run_bench

from kvswitch import __version__, cli
from kvswitch.cli import LOG_REFRESH_S, RunProgress, build_parser, compare, main, progress_bar

TINY = ["--conversations", "3", "--model", "small", "--gpu-blocks", "800", "--host-blocks",
        "4000", "--think-s", "1", "--arrival-rate", "4", "--configs", "baseline,full"]
WALL = ["--clock", "wall", "--time-scale", "2000"]  # scaled real time that sleeps little


@pytest.fixture
def no_serve(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("serve() was called: the run started despite a bad option")
    monkeypatch.setattr(cli, "serve", fail)


# -- --plot: the format is checked before the run --------------------------------------------

def test_plot_to_a_suffix_matplotlib_cannot_write_fails_before_the_run(tmp_path, capsys,
                                                                      no_serve):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out.txt"
    rc, stdout, err = run_bench(capsys, *TINY, "--no-progress", "--plot", str(out))
    assert rc == 2 and stdout == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("kvswitch bench: error: argument --plot: ")
    assert ".txt" in errors[0] and ".png" in errors[0] and ".svg" in errors[0]
    assert not out.exists()


def _figures() -> dict[str, dict[str, float]]:
    base = {"ttft_p50_s": 0.5, "ttft_p95_s": 2.0, "ttft_p99_s": 5.0, "ttft_p999_s": 9.0,
            "tbt_p999_s": 0.6, "swap_out_blocks_copied": 240_000.0,
            "swap_out_blocks_reused": 0.0, "copies": 31e6, "throughput_tok_s": 1100.0}
    full = {**base, "ttft_p99_s": 5.0 / 496, "tbt_p999_s": 0.2,
            "swap_out_blocks_copied": 48_000.0, "swap_out_blocks_reused": 190_000.0,
            "copies": 31e6 / 87, "throughput_tok_s": 1144.0}
    return {"baseline": base, "full": full}


@pytest.mark.parametrize(("name", "magic"), [("fig.svg", b"<?xml"), ("fig", b"\x89PNG")])
def test_plot_writes_the_format_of_its_suffix_at_exactly_that_path(tmp_path, name, magic):
    pytest.importorskip("matplotlib")
    path = tmp_path / name
    cli.plot(_figures(), str(path))
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no "fig.png" beside "fig"


def test_plot_labels_every_series_keeps_legends_off_the_data_and_says_what_is_modelled():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = cli.plot_figure(_figures())
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend_texts = {t.get_text() for ax in fig.axes if ax.get_legend()
                        for t in ax.get_legend().get_texts()}
        data_axes = [ax for ax in fig.axes if ax.containers or ax.lines]
        for ax in data_axes:
            series = [*(c.get_label() for c in ax.containers),
                      *(line.get_label() for line in ax.lines)]
            for label in series:
                assert not label.startswith("_"), f"unlabelled series in {ax.get_title()!r}"
                assert label in legend_texts, f"{label!r} is in no legend"
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent(renderer)
            for other in data_axes:  # a legend inside an axes would cover bars or lines
                assert not box.overlaps(other.get_window_extent(renderer)), \
                    f"the legend of {ax.get_title()!r} lies over {other.get_title()!r}"
        captions = [t.get_text() for t in fig.texts]
        assert any("modelled" in c.lower() for c in captions), captions
        titles = " ".join(ax.get_title() for ax in fig.axes)
        assert "latency percentiles (modelled)" in titles
    finally:
        plt.close(fig)


# -- a closed pipe ----------------------------------------------------------------------------

# (argv, exit status): argparse's --help swallows the write error itself and exits 0.
@pytest.mark.parametrize(("argv", "status"), [(["info"], 141), (["info", "--json"], 141),
                                              (["bench", "--help"], 0)])
def test_a_reader_that_stops_early_ends_the_command_quietly(argv, status):
    read, write = os.pipe()
    os.close(read)  # like `| head` that has exited: every write gets EPIPE
    code = f"from kvswitch.cli import main; raise SystemExit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode == status


# -- --version and --help -----------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvswitch {__version__}"
    assert __version__ == version("kvswitch")


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["info", "--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    for markup in ("`", ":mod:", ":func:", ":class:", "]["):
        assert markup not in text, f"{markup!r} in `kvswitch {' '.join(argv)}`:\n{text}"


def test_every_bench_option_is_documented():
    bench = next(a for a in build_parser()._subparsers._group_actions).choices["bench"]
    undocumented = [a.option_strings for a in bench._actions if not a.help]
    assert not undocumented
    model = next(a for a in bench._actions if "--model" in a.option_strings)
    for preset in model.choices:
        assert preset in model.help


# -- the progress bar ---------------------------------------------------------------------------

def test_progress_total_never_falls_below_the_count():
    # Modelled times whose deltas, summed by the bar, exceed the last time by a rounding
    # error: the bar once ended above its total (negative ETA, tqdm's clamping warning).
    times = [0.728, 5.474, 12.478, 31.24, 37.779]
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tqdm.TqdmWarning)
        with tqdm.tqdm(total=1.0, file=out, mininterval=0, smoothing=0,
                       bar_format="{n}/{total} [{elapsed}<{remaining}]") as bar:
            progress = RunProgress(bar, [40.0])
            progress.start(0, "run")
            for t in times:
                progress.advance(t)
            progress.finish(times[-1])
            assert bar.n <= bar.total
    assert "<-" not in out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_in_place_on_a_terminal_and_rarely_in_a_log():
    on_tty = progress_bar(10.0, _Terminal())
    in_log = progress_bar(10.0, io.StringIO())
    try:
        assert on_tty.mininterval < 1 and in_log.mininterval == LOG_REFRESH_S >= 10
    finally:
        on_tty.close()
        in_log.close()


@pytest.mark.parametrize("clock", [[], WALL], ids=["virtual", "wall"])
def test_progress_in_a_log_is_plain_lines_and_ends_full(clock, capsys):
    # capsys' stderr is not a terminal: the bar writes whole lines, no carriage returns.
    with warnings.catch_warnings():
        warnings.simplefilter("error", tqdm.TqdmWarning)
        rc, _, err = run_bench(capsys, *TINY, *clock)
    assert rc == 0
    assert "\r" not in err
    bar_lines = [line for line in err.splitlines() if "%|" in line]  # the bar's lines
    assert 0 < len(bar_lines) <= 3 * 2 + 2  # start and end of each run, plus slack
    assert "100%" in bar_lines[-1] and "<-" not in err


# -- the summary line ---------------------------------------------------------------------------

def test_summary_says_how_many_times_lower_not_a_fraction_of_baseline():
    line = compare(_figures())
    assert "P99 TTFT 496x lower" in line
    assert "87x fewer copies issued" in line
    assert "80% fewer swap-out blocks copied" in line
    assert "P99.9 TBT 3.00x lower" in line
    assert "throughput 1.04x higher" in line
    assert "0.00x" not in line and "of baseline" not in line


def test_summary_says_more_and_the_same_where_they_apply():
    figures = _figures()
    figures["full"].update(copies=figures["baseline"]["copies"] * 2,
                           swap_out_blocks_copied=figures["baseline"]["swap_out_blocks_copied"]
                           * 1.05, throughput_tok_s=figures["baseline"]["throughput_tok_s"])
    line = compare(figures)
    assert "2.00x more copies issued" in line
    assert "5% more swap-out blocks copied" in line
    assert "throughput the same" in line

"""``kvswitch bench`` respects the user's time (issue 13): every option checked before the
run, the expected duration said up front, one progress bar for the whole run with a
truthful total, and ``--repeats N`` reporting median and range over seeds.

Fast: tiny runs at a high time scale; nothing asserts on timings.
"""

import json
import math

import pytest
import tqdm
from _cli import run_bench

from kvswitch import cli
from kvswitch.bench.serve import CONFIGURATIONS, ServeConfig, estimate_run, min_gpu_blocks
from kvswitch.cli import RunProgress, aggregate, format_table, main
from kvswitch.trace import load_trace, sample

TINY = ["--conversations", "3", "--model", "small", "--gpu-blocks", "800", "--host-blocks",
        "4000", "--think-s", "1", "--arrival-rate", "4",
        "--configs", "baseline,full"]


class Started(Exception):
    pass


run = run_bench


@pytest.fixture
def no_serve(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("serve() was called: the run started despite a bad option")
    monkeypatch.setattr(cli, "serve", fail)


def assert_option_error(rc, out, err, option):
    assert rc == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"kvswitch bench: error: argument {option}: "), err


# -- validation before the run ---------------------------------------------------------------

def test_a_configuration_given_twice_is_refused(capsys, no_serve):
    rc, out, err = run(capsys, "--configs", "full,baseline,full", "--no-progress")
    assert_option_error(rc, out, err, "--configs")
    assert "full given more than once" in err


def test_json_and_plot_on_the_same_file_are_refused(tmp_path, capsys, no_serve):
    path = str(tmp_path / "out")
    rc, out, err = run(capsys, "--json", path, "--plot", path, "--no-progress")
    assert_option_error(rc, out, err, "--plot")


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_on_the_trace_is_refused(option, tmp_path, capsys, no_serve):
    trace = tmp_path / "trace.csv"
    trace.write_text("conversation_id,turn,new_input_tokens,output_tokens\nc0,0,10,10\n")
    rc, out, err = run(capsys, "--trace", str(trace), option, str(trace), "--no-progress")
    assert_option_error(rc, out, err, option)
    assert "would overwrite the trace" in err
    assert trace.read_text().startswith("conversation_id")


def test_the_gpu_pool_check_covers_every_seed_of_the_repeats(monkeypatch, capsys, no_serve):
    trace = load_trace()
    need = {s: min_gpu_blocks(max(c.total_tokens for c in sample(trace, 5, s)), ServeConfig())
            for s in range(60)}
    seed = next(s for s in range(59) if need[s + 1] > need[s])
    rc, out, err = run(capsys, "--conversations", "5", "--seed", str(seed), "--repeats", "2",
                       "--gpu-blocks", str(need[seed]), "--no-progress")
    assert_option_error(rc, out, err, "--gpu-blocks")
    assert f"must be at least {need[seed + 1]:,}" in err


def test_the_expected_duration_is_said_before_the_run(monkeypatch, capsys):
    def started(*args, **kwargs):
        raise Started
    monkeypatch.setattr(cli, "serve", started)
    with pytest.raises(Started):
        main(["bench", *TINY, "--repeats", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert "2 configuration(s) x 3 seed(s) (0, 1, 2) = 6 run(s)" in err
    assert "expected duration about" in err and "an estimate" in err


# -- the estimate ----------------------------------------------------------------------------

def test_estimate_run_is_sane():
    convs = sample(load_trace(), 20, 0)
    assert estimate_run([], ServeConfig()).wall_s == 0
    e = estimate_run(convs, ServeConfig())
    assert e.makespan_s > 0 and e.iterations > 0 and e.wall_s > 0
    # Arrivals ten times sparser: the arrival bound dominates and the run gets longer.
    slow = estimate_run(convs, ServeConfig(arrival_rate=0.1))
    assert slow.makespan_s > e.makespan_s
    # Wall clock, half the time scale: about twice the wall time (modelled time unchanged).
    wall = estimate_run(convs, ServeConfig(clock="wall"))
    half = estimate_run(convs, ServeConfig(clock="wall", time_scale=20))
    assert half.makespan_s == wall.makespan_s and half.wall_s > wall.wall_s
    # Virtual clock: the tokens are exact; per-block copies cost more; a slower machine
    # takes longer.
    assert e.tokens == sum(t.output_tokens for c in convs for t in c.turns)
    base = estimate_run(convs, ServeConfig(), CONFIGURATIONS["baseline"])
    full = estimate_run(convs, ServeConfig(), CONFIGURATIONS["full"])
    assert base.copies > 10 * full.copies and base.wall_s > full.wall_s
    assert estimate_run(convs, ServeConfig(), CONFIGURATIONS["full"], speed=2.0).wall_s == \
        pytest.approx(2 * full.wall_s)


# -- one progress bar ------------------------------------------------------------------------

class FakeBar:
    def __init__(self, total=0.0, **kwargs):
        self.total, self.n, self.desc, self.kwargs = total, 0.0, "", kwargs
        self.max_total_seen = total
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True

    def update(self, n=1):
        self.n += n
        assert self.n <= self.total + 1e-6, "the bar went past its total"

    def set_description_str(self, desc):
        self.desc = desc

    def refresh(self):
        pass


def test_run_progress_total_is_corrected_and_ends_full():
    bar = FakeBar()
    p = RunProgress(bar, [10.0, 10.0, 10.0])
    assert bar.total == 30
    p.start(0, "a")
    for t in range(1, 16):  # runs past its estimate: the total grows, never overshot
        p.advance(float(t))
    assert bar.total >= 15 + 20
    p.finish(15.0)  # 1.5x the estimate: the remaining runs are expected 1.5x longer
    assert bar.total == pytest.approx(15 + 15 + 15)
    p.start(1, "b")
    p.advance(4.0)
    p.finish(12.0)
    p.start(2, "c")
    p.finish(9.0)
    assert bar.n == pytest.approx(bar.total) == pytest.approx(36.0)


def test_one_bar_covers_every_configuration_and_repeat(monkeypatch, capsys):
    bars = []

    def make(*args, **kwargs):
        bars.append(FakeBar(**kwargs))
        return bars[-1]
    monkeypatch.setattr(tqdm, "tqdm", make)
    assert main(["bench", *TINY, "--repeats", "2"]) == 0
    assert len(bars) == 1
    bar = bars[0]
    assert bar.closed and bar.n == pytest.approx(bar.total) and bar.n > 0
    assert bar.desc == "full seed 1 (4/4)"


def test_no_progress_makes_no_bar(monkeypatch, capsys):
    def fail(*args, **kwargs):
        pytest.fail("a progress bar was made with --no-progress")
    monkeypatch.setattr(tqdm, "tqdm", fail)
    assert main(["bench", *TINY, "--no-progress"]) == 0


# -- --repeats -------------------------------------------------------------------------------

def test_repeats_report_median_and_range(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc, text, err = run(capsys, *TINY, "--seed", "5", "--repeats", "3", "--json", str(out),
                        "--no-progress")
    assert rc == 0, err
    assert "median (min-max) over seeds 5, 6, 7" in text
    copies = next(line for line in text.splitlines() if line.startswith("copies issued"))
    assert copies.count("(") == 2 and copies.count("-") >= 2
    data = json.loads(out.read_text())
    assert data["repeats"]["seeds"] == [5, 6, 7]
    assert data["config"]["seed"] == 5
    for name in ("baseline", "full"):
        runs = data["repeats"]["configurations"][name]
        assert len(runs) == 3
        for key, median in data["configurations"][name].items():
            values = [r[key] for r in runs if not math.isnan(r[key])]
            if not values:
                continue
            lo, hi = data["range"][name][key]
            assert lo == min(values) and hi == max(values)
            assert lo <= median <= hi


def test_one_repeat_keeps_the_json_of_before(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc, text, err = run(capsys, *TINY, "--json", str(out), "--no-progress")
    assert rc == 0, err
    assert "median" not in text
    data = json.loads(out.read_text())
    assert set(data) == {"config", "trace", "conversations", "configurations", "repeats",
                         "granularity_histograms", "sources"}  # the last three are additions
    assert data["repeats"]["seeds"] == [0]
    for name, figures in data["configurations"].items():
        assert figures == data["repeats"]["configurations"][name][0]
        assert "copies" in figures and isinstance(figures["copies"], int)


def test_seeds_of_the_repeats_differ(monkeypatch, capsys):
    seen = []
    real = cli.serve

    def spy(convs, config, mechanisms, **kwargs):
        seen.append((config.seed, tuple(c.conversation_id for c in convs)))
        return real(convs, config, mechanisms, **kwargs)
    monkeypatch.setattr(cli, "serve", spy)
    assert main(["bench", *TINY, "--configs", "full", "--repeats", "2", "--no-progress"]) == 0
    assert [s for s, _ in seen] == [0, 1]
    assert seen[0][1] != seen[1][1]  # each seed samples its own conversations


def test_aggregate_and_table_with_nan():
    runs = [{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": float("nan")},
            {"a": 2.0, "b": float("nan")}]
    median, spread = aggregate(runs)
    assert median["a"] == 2.0 and spread["a"] == [1.0, 3.0]
    assert math.isnan(median["b"])
    figures = {n: dict.fromkeys(
        ["swap_outs", "swap_out_blocks", "swap_out_blocks_copied", "swap_out_blocks_reused",
         "swap_in_blocks", "copies", "blocks_per_copy", "preset_bytes_moved",
         "swap_job_s", "us_per_copy", "stall_s", "ttft_p50_s",
         "ttft_p95_s", "ttft_p99_s", "ttft_p999_s", "tbt_p999_s", "throughput_tok_s",
         "priority_preemptions", "pool_full_preemptions", "recomputed_tokens", "conflicts",
         "sync_swap_in_decisions", "async_swap_in_decisions", "wall_s",
         "gran_swap_out_blocks_per_copy", "gran_swap_in_blocks_per_copy", "gran_migrations",
         "gran_migrated_blocks", "gran_migrate_s"], 1.0)
        for n in CONFIGURATIONS}
    figures["full"]["tbt_p999_s"] = float("nan")
    spreads = {n: {k: [0.5, 2.0] for k in f} for n, f in figures.items()}
    table = format_table(figures, spreads)
    assert "1.000 (0.500-2.000)" in table and "n/a" in table and "nan" not in table

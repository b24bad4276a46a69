"""``kvswitch bench`` checks every option and output path before any work (red-team 15).

A bad value must end in one error line naming the option and exit status 2, with no
traceback and before serve() is called; a valid invocation must run as before.
"""

import json
import math
import os
import types

import pytest
from _cli import run_bench

from kvswitch import cli
from kvswitch.bench.serve import CONFIGURATIONS, ServeConfig, min_gpu_blocks, serve
from kvswitch.cli import build_parser, main
from kvswitch.trace import Conversation, Turn, load_trace, sample

# Sizes of tests/test_bench.py: small pools that still preempt (virtual clock: nothing slept).
FAST = ["--model", "small", "--gpu-blocks", "800", "--host-blocks", "4000", "--no-progress"]
# The wall clock at a time scale that sleeps little.
WALL = ["--clock", "wall", "--time-scale", "2000"]


class Started(Exception):
    """Raised by a stand-in serve(): the run started."""


@pytest.fixture
def no_serve(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("serve() was called: the run started despite a bad option")
    monkeypatch.setattr(cli, "serve", fail)


run = run_bench


def assert_option_error(rc, out, err, option):
    assert rc == 2
    assert "Traceback" not in err and out == ""
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"kvswitch bench: error: argument {option}: "), err


def write_trace(path, conversations):
    """A trace CSV: ``conversations`` is a list of [(new_input_tokens, output_tokens)]."""
    rows = ["conversation_id,turn,new_input_tokens,output_tokens"]
    rows += [f"c{i},{t},{n},{o}" for i, turns in enumerate(conversations)
             for t, (n, o) in enumerate(turns)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


BAD = [
    ("--conversations", "-3", "must be a positive integer, got -3"),
    ("--conversations", "0", "must be a positive integer, got 0"),
    ("--conversations", "2.5", "must be an integer"),
    ("--seed", "1.5", "invalid int value"),
    ("--arrival-rate", "0", "must be a finite number > 0, got 0"),
    ("--arrival-rate", "-1", "must be a finite number > 0"),
    ("--arrival-rate", "nan", "must be a finite number > 0"),
    ("--arrival-rate", "inf", "must be a finite number > 0"),
    ("--arrival-rate", "fast", "must be a number"),
    ("--arrival-rate", "1,,2", "separated by commas"),
    ("--load", "0", "must be a finite number > 0"),
    ("--load", "1,-2", "must be a finite number > 0"),
    ("--clock", "sundial", "invalid choice"),
    ("--think-s", "-1", "must be a finite number >= 0, got -1"),
    ("--think-s", "nan", "must be a finite number >= 0"),
    ("--think-s", "inf", "must be a finite number >= 0"),
    ("--update-every", "0", "must be a positive integer"),
    ("--update-every", "-50", "must be a positive integer"),
    ("--gpu-blocks", "0", "must be a positive integer, got 0"),
    ("--gpu-blocks", "-16", "must be a positive integer"),
    ("--gpu-blocks", str(2**31), "must be at most 2,147,483,647"),
    ("--host-blocks", "0", "must be a positive integer"),
    ("--host-blocks", str(2**31), "must be at most 2,147,483,647"),
    ("--time-scale", "0", "must be a finite number > 0"),
    ("--time-scale", "-40", "must be a finite number > 0"),
    ("--time-scale", "nan", "must be a finite number > 0"),
    ("--time-scale", "inf", "must be a finite number > 0"),
    ("--workers", "-1", "must be an integer >= 0, got -1"),
    ("--workers", "65", "must be at most 64, got 65"),
    ("--json", "", "must be a file path"),
    ("--pattern", "fifo", "invalid choice"),
    ("--repeats", "0", "must be a positive integer, got 0"),
    ("--repeats", "-2", "must be a positive integer"),
    ("--repeats", "1.5", "must be an integer"),
    ("--repeats", "101", "must be at most 100, got 101"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD)
def test_bad_option_is_one_line_exit_2_before_any_work(option, value, message, capsys,
                                                       no_serve):
    rc, out, err = run(capsys, option, value, "--no-progress")
    assert_option_error(rc, out, err, option)
    assert message in err
    assert "nan" not in out


ACCEPTED = [
    ("--conversations", "1", 1),
    ("--seed", "-7", -7),
    ("--arrival-rate", "1e-3", [1e-3]),
    ("--arrival-rate", "0.5, 1,2", [0.5, 1.0, 2.0]),
    ("--load", "0.5,1.2", [0.5, 1.2]),
    ("--think-s", "0", 0.0),
    ("--update-every", "1", 1),
    ("--gpu-blocks", str(2**31 - 1), 2**31 - 1),
    ("--host-blocks", "1", 1),
    ("--time-scale", "0.5", 0.5),
    ("--workers", "0", 0),
    ("--workers", "64", 64),
]


@pytest.mark.parametrize(("option", "value", "expected"), ACCEPTED)
def test_range_edges_are_accepted(option, value, expected):
    args = build_parser().parse_args(["bench", option, value])
    assert getattr(args, option[2:].replace("-", "_")) == expected


def test_defaults_are_unchanged():
    a, d = build_parser().parse_args(["bench"]), ServeConfig()
    assert (a.conversations, a.seed, a.arrival_rate, a.think_s, a.pattern, a.update_every,
            a.model, a.gpu, a.gpu_blocks, a.host_blocks, a.time_scale, a.workers) == (
        cli.DEFAULT_CONVERSATIONS, d.seed, [d.arrival_rate], d.think_s, d.pattern,
        d.update_every, d.model, d.gpu, d.gpu_blocks, d.host_blocks, d.time_scale, d.num_workers)
    assert a.json is None and a.plot is None
    assert a.clock is None and a.link_model is None and a.load is None  # virtual, --gpu's


def test_conversations_0_prints_no_table_of_nan(capsys, no_serve):
    rc, out, err = run(capsys, "--conversations", "0", "--no-progress")
    assert_option_error(rc, out, err, "--conversations")
    assert "nan" not in out + err and "baseline" not in out


# -- output paths ---------------------------------------------------------------------------

def _unwritable(kind, tmp_path, monkeypatch):
    if kind == "missing directory":
        return str(tmp_path / "no" / "such" / "out.file")
    if kind == "a directory":
        return str(tmp_path)
    if kind == "under a regular file":  # can never be created, root or not
        (tmp_path / "regular").write_text("x")
        return str(tmp_path / "regular" / "out.file")
    if kind == "probe refused":  # what a read-only mount answers, as any user
        def refuse(**kwargs):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(cli, "tempfile", types.SimpleNamespace(TemporaryFile=refuse))
        return str(tmp_path / "out.file")
    if os.geteuid() == 0:  # root may write into a 0o555 directory and to a 0o444 file
        pytest.skip("running as root: permission bits do not stop root")
    if kind == "read-only directory":
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        return str(ro / "out.file")
    assert kind == "read-only file"
    (tmp_path / "ro.file").write_text("old")
    (tmp_path / "ro.file").chmod(0o444)
    return str(tmp_path / "ro.file")


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("kind", ["missing directory", "a directory", "under a regular file",
                                  "probe refused", "read-only directory", "read-only file"])
def test_unwritable_output_fails_before_the_run(option, kind, tmp_path, monkeypatch, capsys,
                                                no_serve):
    path = _unwritable(kind, tmp_path, monkeypatch)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, out, err = run(capsys, option, path, "--conversations", "5", "--no-progress")
    assert_option_error(rc, out, err, option)
    assert path in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing left behind


def test_output_check_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    new, old = tmp_path / "new.json", tmp_path / "old.png"
    old.write_text("previous figures")
    args = build_parser().parse_args(["bench", "--json", str(new), "--plot", str(old)])
    assert (args.json, args.plot) == (str(new), str(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]  # no probe, no new.json
    assert old.read_text() == "previous figures"  # not truncated before the run


def test_a_failed_check_after_the_path_check_leaves_no_output(tmp_path, capsys, no_serve):
    out_json = tmp_path / "out.json"
    rc, out, err = run(capsys, "--json", str(out_json), "--gpu-blocks", "10",
                       "--conversations", "5", "--no-progress")
    assert_option_error(rc, out, err, "--gpu-blocks")
    assert list(tmp_path.iterdir()) == []


# -- GPU pool too small for a conversation ---------------------------------------------------

def test_too_small_gpu_pool_names_the_smallest_that_works(monkeypatch, capsys):
    convs = sample(load_trace(), 5, 0)
    need = min_gpu_blocks(max(c.total_tokens for c in convs), ServeConfig())

    def fail(*args, **kwargs):
        pytest.fail("serve() was called with a pool too small")
    monkeypatch.setattr(cli, "serve", fail)
    rc, out, err = run(capsys, "--conversations", "5", "--gpu-blocks", str(need - 1),
                       "--no-progress")
    assert_option_error(rc, out, err, "--gpu-blocks")
    assert f"must be at least {need:,}" in err

    def started(*args, **kwargs):
        raise Started
    monkeypatch.setattr(cli, "serve", started)
    with pytest.raises(Started):  # the smallest pool named is accepted
        main(["bench", "--conversations", "5", "--gpu-blocks", str(need), "--no-progress"])


def test_min_gpu_blocks_matches_the_admission_test():
    cfg = ServeConfig()

    def admits(tokens, gpu_blocks):  # serve()'s check: blocks <= pool - watermark - 1
        return -(-tokens // 16) <= gpu_blocks - math.ceil(cfg.watermark * gpu_blocks) - 1

    for tokens in [1, 16, 17, 694, 8106, 20_000, 160_001]:
        g = min_gpu_blocks(tokens, cfg)
        assert admits(tokens, g) and not admits(tokens, g - 1)


def test_serve_says_which_pool_size_would_do():
    big = [Conversation("big", (Turn(694, 0),))]
    need = min_gpu_blocks(694, ServeConfig())
    with pytest.raises(ValueError, match=f"gpu_blocks must be at least {need}") as e:
        serve(big, ServeConfig(gpu_blocks=1), CONFIGURATIONS["full"])
    assert "admits -" not in str(e.value) and "GPU pool admits 0" in str(e.value)


# -- valid runs ------------------------------------------------------------------------------

def test_tiny_run_at_the_range_edges(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    rc, out, err = run(capsys, *FAST, "--conversations", "3", "--configs", "baseline,full",
                       "--workers", "0", "--think-s", "0", "--update-every", "1",
                       "--seed", "-1", "--json", str(out_json))
    assert rc == 0, err
    assert "full vs baseline" in out and "nan" not in out
    data = json.loads(out_json.read_text())
    assert data["conversations"] == 3
    cfg = data["config"]
    assert (cfg["num_workers"], cfg["think_s"], cfg["update_every"], cfg["seed"]) == (0, 0, 1, -1)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no stray probe file


def test_more_conversations_than_the_trace_says_so_and_serves_all(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.csv", [[(30, 5), (20, 5)], [(40, 6)]])
    rc, out, err = run(capsys, *FAST, "--trace", trace, "--conversations", "5",
                       "--configs", "full", "--json", str(tmp_path / "o.json"))
    assert rc == 0, err
    assert "--conversations 5 exceeds the 2 conversations of the trace" in err
    assert json.loads((tmp_path / "o.json").read_text())["conversations"] == 2


def test_undefined_percentiles_print_as_n_a_not_nan(tmp_path, capsys):
    # Every turn generates one token: no time between tokens, TBT has no samples.
    trace = write_trace(tmp_path / "t.csv", [[(30, 1), (20, 1)], [(40, 1)]])
    rc, out, err = run(capsys, *FAST, "--trace", trace, "--configs", "baseline,full")
    assert rc == 0, err
    assert "nan" not in out
    assert "P99.9 TBT n/a;" in out
    tbt = [line for line in out.splitlines() if line.startswith("TBT P99.9")]
    assert tbt[0].split()[-3:-1] == ["n/a", "n/a"]


# -- --backend (host: today's behaviour; cuda: real GPU pools, checked before any work) ------

def test_backend_defaults_to_host_and_keeps_the_time_scale():
    a = build_parser().parse_args(["bench"])
    assert a.backend == "host" == ServeConfig().backend
    assert a.time_scale == ServeConfig().time_scale == 40
    assert not getattr(a, "time_scale_given", False)
    a = build_parser().parse_args(["bench", "--time-scale", "40"])
    assert a.time_scale == 40 and a.time_scale_given


def test_backend_host_runs_as_before(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    rc, out, err = run(capsys, *FAST, *WALL, "--conversations", "3", "--configs",
                       "baseline,full", "--backend", "host", "--json", str(out_json))
    assert rc == 0, err
    assert "host backend" in err and "full vs baseline" in out
    assert "each block carries 1/2000 of the preset's bytes" in out
    cfg = json.loads(out_json.read_text())["config"]
    assert cfg["backend"] == "host" and cfg["time_scale"] == 2000


def test_backend_cuda_without_a_gpu_is_one_clear_line(monkeypatch, capsys, no_serve):
    monkeypatch.setattr(cli, "cuda_unavailable_reason", lambda: "no CUDA device (test)")
    rc, out, err = run(capsys, "--backend", "cuda", "--conversations", "3", "--no-progress")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [
        "kvswitch bench: error: --backend cuda needs a CUDA GPU: no CUDA device (test)"]


def test_backend_cuda_on_this_machine_says_why_when_there_is_no_gpu(capsys, no_serve):
    if not cli.cuda_unavailable_reason():
        pytest.skip("this machine has a CUDA GPU")
    rc, out, err = run(capsys, "--backend", "cuda", "--no-progress")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "kvswitch bench: error: --backend cuda needs a CUDA GPU: "), err


@pytest.mark.parametrize("scale", ["40", "0.5", "2000"])
def test_backend_cuda_refuses_a_time_scale_other_than_1(scale, monkeypatch, capsys, no_serve):
    monkeypatch.setattr(cli, "cuda_unavailable_reason",
                        lambda: pytest.fail("the GPU was probed before the option check"))
    rc, out, err = run(capsys, "--backend", "cuda", "--time-scale", scale, "--no-progress")
    assert_option_error(rc, out, err, "--time-scale")
    assert "must be 1" in err


def test_backend_cuda_runs_at_time_scale_1(monkeypatch, capsys):
    seen = {}

    def started(convs, config, mechanisms, on_conversation_done=None, on_progress=None):
        seen["config"] = config
        raise Started
    monkeypatch.setattr(cli, "cuda_unavailable_reason", lambda: "")
    monkeypatch.setattr(cli, "serve", started)
    for extra in ([], ["--time-scale", "1"]):
        with pytest.raises(Started):
            main(["bench", "--backend", "cuda", "--conversations", "3", "--no-progress", *extra])
        assert seen["config"].backend == "cuda" and seen["config"].time_scale == 1
    assert "wall clock (time scale 1); cuda backend" in capsys.readouterr().err


def test_unknown_backend_is_an_option_error(capsys, no_serve):
    rc, out, err = run(capsys, "--backend", "tpu")
    assert_option_error(rc, out, err, "--backend")


# -- compaction ablations (issue 14): the same configuration without compaction, one run --

def test_nocompact_ablation_runs_beside_its_configuration_and_never_migrates(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    rc, out, err = run(capsys, *FAST, "--conversations", "40",
                       "--configs", "full-nocompact,full", "--json", str(out_json))
    assert rc == 0, err
    figures = json.loads(out_json.read_text())["configurations"]
    assert list(figures) == ["full-nocompact", "full"]
    assert figures["full-nocompact"]["gran_migrations"] == 0
    assert figures["full-nocompact"]["gran_migrated_blocks"] == 0
    # Same trace, same pools: both serve every token.
    assert figures["full-nocompact"]["tokens"] == figures["full"]["tokens"]


def test_noquantum_ablation_keeps_compaction_and_serves_every_token(tmp_path, capsys):
    from kvswitch.bench.serve import ABLATIONS, CONFIGURATIONS

    for name in ("groups", "groups+async", "full"):
        m = ABLATIONS[f"{name}-noquantum"]
        assert not m.growth_quantum and CONFIGURATIONS[name].growth_quantum
        assert (m.block_groups, m.async_swaps, m.reuse, m.compaction) == (
            CONFIGURATIONS[name].block_groups, CONFIGURATIONS[name].async_swaps,
            CONFIGURATIONS[name].reuse, CONFIGURATIONS[name].compaction)
    out_json = tmp_path / "out.json"
    rc, out, err = run(capsys, *FAST, "--conversations", "40",
                       "--configs", "groups-noquantum,groups", "--json", str(out_json))
    assert rc == 0, err
    figures = json.loads(out_json.read_text())["configurations"]
    assert list(figures) == ["groups-noquantum", "groups"]
    assert figures["groups-noquantum"]["tokens"] == figures["groups"]["tokens"]


def test_ablations_are_named_in_the_unknown_configuration_message(capsys, no_serve):
    rc, out, err = run(capsys, "--configs", "fast", "--no-progress")
    assert rc == 2
    assert "full-nocompact" in err and "groups+async-nocompact" in err
    assert "full-noquantum" in err

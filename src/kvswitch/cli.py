"""The ``kvswitch`` command line. ``kvswitch bench`` replays a multi-turn trace.

``kvswitch bench`` serves conversations of the bundled ShareGPT trace (or ``--trace``)
with a priority scheduler that preempts sequences (Markov or Random pattern, FastSwitch
section 4.2) and compares configurations of kvswitch's mechanisms against vLLM's swap
path (per-block allocation, one copy per block and region, blocking swaps, no reuse).
Swaps are real copies timed on this machine; model compute follows a stated cost model
([`kvswitch.bench.cost_model`][]); see [`kvswitch.bench.serve`][] for what is
measured, what is modelled and the time scale. ``--backend cuda`` puts the device pool on GPU 0
(PyTorch tensors) and the host pool in pinned memory, and copies the preset's real block
bytes in real time (time scale 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np

from kvswitch.bench.cost_model import GPU_PRESETS, MODEL_PRESETS
from kvswitch.bench.link_model import LINK_PRESETS, link_model_from_campaign
from kvswitch.bench.serve import (
    ABLATIONS,
    CONFIGURATIONS,
    ServeConfig,
    ServeResult,
    capacity_rate,
    cuda_unavailable_reason,
    estimate_run,
    machine_speed,
    min_gpu_blocks,
    serve,
)
from kvswitch.trace import TraceError, load_trace, sample

GIB = 1 << 30
INT32_MAX = (1 << 31) - 1  # block counts reach the C++ allocator as int32
MAX_WORKERS = 64  # what the C++ swap engine accepts
MAX_REPEATS = 100
#: Conversations of a plain ``kvswitch bench``: about 2 minutes for the four configurations
#: on a 2-core VM (2:01 measured, docs/benchmarks.md), at the bundled trace's pool capacity
#: (1/s is load 1.0: every configuration preempts); ``--conversations 1000`` is the paper's
#: size (about 3 minutes).
DEFAULT_CONVERSATIONS = 700


# -- option types: a bad value ends in argparse's one-line error (exit status 2) before any
# work starts, instead of a traceback or a run of nonsense figures minutes later.

def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[minimum, maximum]`` (no upper bound when None)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if n < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {n}")
        if maximum is not None and n > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:,}, got {n:,}")
        return n
    return parse


def _number(*, positive: bool) -> Callable[[str], float]:
    """argparse type: a finite float, > 0 (``positive``) or >= 0; nan and inf are refused."""
    what = "a finite number > 0" if positive else "a finite number >= 0"

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(x) or x < 0 or (positive and x == 0):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return x
    return parse


def _numbers(text: str) -> list[float]:
    """argparse type: a comma-separated list of finite numbers > 0 (e.g. ``0.5,1,2``)."""
    parse = _number(positive=True)
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be numbers > 0 separated by commas, got "
                                         f"{text!r}")
    return [parse(t) for t in items]


def _output_path(text: str) -> str:
    """argparse type: a file that can be written at the end of the run.

    The path itself is not created now: that would leave an empty file behind when the run
    fails or is interrupted, and truncate an existing one early. An existing file must pass
    os.access; for a new one, an anonymous temporary file in its directory (O_TMPFILE on
    Linux, else unlinked at once) tries the very operation the final write needs.
    """
    if not text:
        raise argparse.ArgumentTypeError("must be a file path, got ''")
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if os.path.isdir(path) or text.endswith(os.sep):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not os.path.isdir(parent):
        missing = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} {missing}")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
        return text
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"cannot write {text}: {parent}: {e.strerror or e}") from None
    return text


class _GivenNumber(argparse.Action):
    """Stores the value and notes that the option was given (``<dest>_given``), so that a
    default can depend on another option without changing the parser's default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


class _NoProgress:
    """Stands in for a tqdm bar with --no-progress (tqdm is then not imported)."""

    total: float = 0.0
    n: float = 0.0

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float = 1) -> None:
        pass

    def set_description_str(self, desc: str) -> None:
        pass

    def refresh(self) -> None:
        pass


#: Seconds between progress-bar redraws when stderr is not a terminal (a log file, CI):
#: each redraw appends a line there, so a 7-minute run writes about 14, not thousands.
LOG_REFRESH_S = 30.0


def progress_bar(total: float, file, unit: str = "modelled s"):
    """The tqdm bar of ``kvswitch bench`` on ``file``, counting ``total`` ``unit``: redrawn
    at tqdm's pace on a terminal, every [`LOG_REFRESH_S`][] seconds otherwise, ending each
    redraw with a newline (no carriage returns piling up in a log)."""
    from tqdm import tqdm

    is_tty = hasattr(file, "isatty") and file.isatty()
    # smoothing=0: the ETA uses the average rate of the whole run so far (pool setup
    # included), not the last few updates.
    return tqdm(total=total, unit="s", unit_scale=False, file=file if is_tty else _Lines(file),
                smoothing=0, mininterval=0.1 if is_tty else LOG_REFRESH_S,
                maxinterval=10.0 if is_tty else LOG_REFRESH_S, dynamic_ncols=is_tty,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:,.0f}/{total:,.0f} "
                           f"{unit} [{{elapsed}}<{{remaining}}]")


class _Lines:
    """A text stream for tqdm that turns its carriage-return redraws into plain lines
    (for a log file: one line per redraw that changed something, none empty)."""

    def __init__(self, file) -> None:
        self.file = file
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.file.write(line + "\n")
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.file.flush()


class RunProgress:
    """One progress measure for a whole ``kvswitch bench``: modelled seconds, summed over
    every configuration and repeat.

    The modelled clock advances at about ``time scale`` modelled seconds per wall second
    while the loop runs, so a rate measured on it gives a truthful ETA. Each run's length is
    only estimated before it starts ([`estimate_run`][]); the total is corrected as
    runs finish (remaining runs' estimates are scaled by finished runs' actual / estimated)
    and grows when a run goes past its estimate, so the bar never claims to be done early.
    """

    def __init__(self, bar, estimates: list[float]) -> None:
        self.bar = bar
        self.estimates = [max(e, 1e-9) for e in estimates]
        self.actual: list[float] = []
        self.run = 0
        self.done = 0.0  # modelled seconds of finished runs
        self.now = 0.0  # modelled seconds into the current run
        self._set_total()

    def _scale(self) -> float:
        finished = self.estimates[:len(self.actual)]
        return sum(self.actual) / sum(finished) if self.actual and sum(finished) else 1.0

    def _set_total(self) -> None:
        scale = self._scale()
        self.expected = max(self.estimates[self.run] * scale, self.now) \
            if self.run < len(self.estimates) else 0.0
        rest = sum(self.estimates[self.run + 1:]) * scale
        # Never below what the bar has counted: its updates sum the same seconds in
        # another order, and a total a rounding error below n shows a negative ETA (and
        # makes tqdm warn about clamping).
        self.bar.total = max(self.done + self.expected + rest, self.bar.n)

    def start(self, index: int, desc: str) -> None:
        self.run, self.now = index, 0.0
        self.bar.set_description_str(desc)
        self._set_total()
        self.bar.refresh()

    def advance(self, modelled_s: float) -> None:
        if modelled_s > self.now:
            delta, self.now = modelled_s - self.now, modelled_s
            if self.now > self.expected:  # this run goes past its estimate
                self._set_total()
            self.bar.update(delta)

    def finish(self, makespan_s: float) -> None:
        self.advance(makespan_s)
        self.actual.append(self.now)
        self.done += self.now
        self.run, self.now = self.run + 1, 0.0
        self._set_total()
        self.bar.refresh()


def summarize(result: ServeResult) -> dict[str, float]:
    """The figures ``kvswitch bench`` prints for one configuration (JSON-ready); where
    each comes from: [`sources`][]."""
    m = result.manager
    moved = m["copied_blocks"] + m["swap_in_blocks"]
    extents = m["swap_out_extents"] + m["swap_in_extents"]
    virtual = result.clock == "virtual"
    # Swap job time: the link model's, or the engine's measured job time (wall clock).
    job_s = result.engine.get("link_s" if virtual else "seconds", 0.0)

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    figures = {
        "swap_outs": m["swap_outs"],
        "swap_out_blocks": m["swap_out_blocks"],
        "swap_out_blocks_copied": m["copied_blocks"],
        "swap_out_blocks_reused": m["reused_blocks"],
        "swap_in_blocks": m["swap_in_blocks"],
        "copies": m["copies"],
        "blocks_per_copy": moved / extents if extents else 0.0,
        "preset_bytes_moved": moved * result.preset_block_bytes,
        "executed_bytes_moved": m["bytes_copied"],
        "swap_job_s": job_s,
        "us_per_copy": 1e6 * job_s / m["copies"] if m["copies"] else 0.0,
        "stall_s": result.stall_s,
        "ttft_p50_s": pct(result.ttft_s, 50),
        "ttft_p95_s": pct(result.ttft_s, 95),
        "ttft_p99_s": pct(result.ttft_s, 99),
        "ttft_p999_s": pct(result.ttft_s, 99.9),
        "tbt_p999_s": pct(result.tbt_s, 99.9),
        "throughput_tok_s": result.tokens / result.makespan_s if result.makespan_s else 0.0,
        "tokens": result.tokens,
        "makespan_s": result.makespan_s,
        "iterations": result.iterations,
        "priority_preemptions": result.priority_preemptions,
        "pool_full_preemptions": result.pool_full_preemptions,
        "recomputed_tokens": result.recomputed_tokens,
        "conflicts": m["conflicts"],
        "sync_swap_in_decisions": m["sync_decisions"],
        "async_swap_in_decisions": m["async_decisions"],
        "wall_s": result.wall_s,
        # Where blocks per copy are lost (issue 14): per-direction copies and blocks, table
        # extents at swap-out, swap-in extents, reserved-tail splits, free groups over time.
        **{f"gran_{k}": v for k, v in result.granularity.items() if k != "histograms"},
    }
    if not virtual:
        figures["stall_s_measured"] = result.stall_measured_s
    return figures


#: Where a figure comes from, per clock: "counted" (events of the run: copies, blocks,
#: preemptions; the same on a GPU), "link-modelled" (the link model), "cost-modelled" (the
#: cost model), "cost+link-modelled" (the virtual clock: both), "measured" (this machine's
#: wall clock), "modelled clock" (the wall clock's: cost model + measured stalls x scale).
_TIMED = {"swap_job_s": ("link-modelled", "measured"),
          "us_per_copy": ("link-modelled", "measured"),
          "stall_s": ("link-modelled", "measured x time scale"),
          "stall_s_measured": ("measured", "measured"),
          "gran_migrate_s": ("link-modelled", "cost-modelled"),
          "gran_migrate_wait_s_measured": ("measured", "measured"),
          "wall_s": ("measured", "measured")}
_CLOCKED = ("ttft_", "tbt_", "throughput_tok_s", "makespan_s")


def source(key: str, clock: str) -> str:
    """Where the figure ``key`` of [`summarize`][] comes from on ``clock``."""
    virtual = clock == "virtual"
    if key in _TIMED:
        return _TIMED[key][0 if virtual else 1]
    if key.startswith(_CLOCKED):
        return "cost+link-modelled" if virtual else "modelled clock"
    return "counted"


def sources(figures: dict[str, float], clock: str) -> dict[str, str]:
    """``{key: source}`` for every figure (see [`source`][])."""
    return {k: source(k, clock) for k in figures}


# (label, key, format); the table adds each row's source (see [`source`][]).
ROWS = [
    ("swap-outs (preemptions + turn ends)", "swap_outs", "{:,.0f}"),
    ("swap-out blocks", "swap_out_blocks", "{:,.0f}"),
    ("  copied", "swap_out_blocks_copied", "{:,.0f}"),
    ("  reused (valid CPU copy)", "swap_out_blocks_reused", "{:,.0f}"),
    ("swap-in blocks", "swap_in_blocks", "{:,.0f}"),
    ("copies issued", "copies", "{:,.0f}"),
    ("mean blocks per copy", "blocks_per_copy", "{:,.1f}"),
    ("  swap-out / swap-in", "gran_swap_out_blocks_per_copy", "bpc"),
    ("migrations (GPU-pool compaction)", "gran_migrations", "{:,.0f}"),
    ("  blocks moved device to device", "gran_migrated_blocks", "{:,.0f}"),
    ("  their time (s, on the clock)", "gran_migrate_s", "{:,.2f}"),
    ("KV moved, preset bytes (GiB)", "preset_bytes_moved", "gib"),
    ("swap job time (s)", "swap_job_s", "{:,.2f}"),
    ("  per copy (us)", "us_per_copy", "{:,.2f}"),
    ("stall on swaps (s)", "stall_s", "{:,.2f}"),
    ("TTFT P50 (s)", "ttft_p50_s", "{:,.3f}"),
    ("TTFT P95 (s)", "ttft_p95_s", "{:,.3f}"),
    ("TTFT P99 (s)", "ttft_p99_s", "{:,.3f}"),
    ("TTFT P99.9 (s)", "ttft_p999_s", "{:,.3f}"),
    ("TBT P99.9 (s)", "tbt_p999_s", "{:,.3f}"),
    ("throughput (tokens/s)", "throughput_tok_s", "{:,.0f}"),
    ("preemptions (priority / pool full)", "preemptions", "pp"),
    ("recomputed tokens (host pool full)", "recomputed_tokens", "{:,.0f}"),
    ("conflicts waited for", "conflicts", "{:,.0f}"),
    ("swap-in decisions (sync / async)", "decisions", "dec"),
    ("wall time (s)", "wall_s", "{:,.1f}"),
]


def aggregate(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Figures of several seeds: (median of each, [min, max] of each). NaN where every seed
    is NaN (a percentile of no samples); NaNs of some seeds are left out."""
    median: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    for key in runs[0]:
        values = [float(r[key]) for r in runs if not math.isnan(float(r[key]))]
        if not values:
            median[key], spread[key] = float("nan"), [float("nan"), float("nan")]
            continue
        median[key] = float(np.median(values))
        spread[key] = [min(values), max(values)]
    return median, spread


def _number_text(x: float, fmt: str) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"  # a percentile of no samples (e.g. no turn generated a second token)
    if fmt == "gib":
        return f"{x / GIB:,.1f}"
    return fmt.format(x)


_PAIRS = {"pp": ("priority_preemptions", "pool_full_preemptions"),
          "dec": ("sync_swap_in_decisions", "async_swap_in_decisions"),
          "bpc": ("gran_swap_out_blocks_per_copy", "gran_swap_in_blocks_per_copy")}
_PAIR_FORMATS = {"bpc": "{:,.1f}"}


def _cell(f: dict[str, float], key: str, fmt: str,
          spread: dict[str, list[float]] | None = None) -> str:
    """One table cell; with ``spread`` (several seeds) ``median (min-max)``."""
    keys, fmt = ((_PAIRS[fmt], _PAIR_FORMATS.get(fmt, "{:,.0f}")) if fmt in _PAIRS
                 else ((key,), fmt))
    text = " / ".join(_number_text(f[k], fmt) for k in keys)
    if spread is None or all(math.isnan(f[k]) for k in keys):
        return text
    ranges = " / ".join(f"{_number_text(spread[k][0], fmt)}-{_number_text(spread[k][1], fmt)}"
                        for k in keys)
    return f"{text} ({ranges})"


def format_table(figures: dict[str, dict[str, float]],
                 spreads: dict[str, dict[str, list[float]]] | None = None,
                 clock: str = "virtual") -> str:
    """The table of ``kvswitch bench``, each row labelled with its source on ``clock``
    ([`source`][]); with ``spreads`` (several seeds) every cell reads
    ``median (min-max)``."""
    width = max(len(r[0]) for r in ROWS)
    cells = {n: [_cell(f, key, fmt, spreads[n] if spreads else None) for _, key, fmt in ROWS]
             for n, f in figures.items()}
    cols = max(14, *(len(n) for n in figures), *(len(c) for col in cells.values() for c in col))
    keys = [_PAIRS[fmt][0] if fmt in _PAIRS else key for _, key, fmt in ROWS]
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{cols}}" for n in figures) + "  source"]
    for i, (label, _, _) in enumerate(ROWS):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{cells[n][i]:>{cols}}" for n in figures)
                     + f"  {source(keys[i], clock)}")
    return "\n".join(lines)


def _factor(x: float, y: float, up: str, down: str) -> str:
    """``x`` against ``y`` as a factor that reads without arithmetic: "496x lower",
    "1.04x higher", "the same" ("n/a" when either is 0, NaN or infinite)."""
    if not (x and y and math.isfinite(x) and math.isfinite(y)):
        return "n/a"
    r = x / y
    if round(r, 2) == 1.0:
        return "the same"
    word, r = (up, r) if r > 1 else (down, 1 / r)
    return f"{r:,.0f}x {word}" if r >= 10 else f"{r:.2f}x {word}"


def _percent(x: float, y: float, up: str, down: str) -> str:
    """``x`` against ``y`` as a change in percent: "80% fewer", "5% more"."""
    if not y:
        return "n/a"
    change = x / y - 1
    return f"{abs(change):.0%} {up if change > 0 else down}"


def compare(figures: dict[str, dict[str, float]], name: str = "full",
            base: str = "baseline") -> str:
    """One line per target of the main job: ``name`` against ``base``, each figure as a
    factor or a percentage with its direction ("P99 TTFT 6.2x lower")."""
    if name not in figures or base not in figures:
        return ""
    f, b = figures[name], figures[base]
    return (
        f"{name} vs {base}: {_factor(f['copies'], b['copies'], 'more', 'fewer')} copies "
        f"issued; "
        f"{_percent(f['swap_out_blocks_copied'], b['swap_out_blocks_copied'], 'more', 'fewer')}"
        f" swap-out blocks copied; "
        f"P99 TTFT {_factor(f['ttft_p99_s'], b['ttft_p99_s'], 'higher', 'lower')}; "
        f"P99.9 TBT {_factor(f['tbt_p999_s'], b['tbt_p999_s'], 'higher', 'lower')}; "
        f"throughput "
        f"{_factor(f['throughput_tok_s'], b['throughput_tok_s'], 'higher', 'lower')}."
    )


PLOT_CAPTION = ("Latencies are modelled: the cost model's compute plus the measured swap "
                "stalls times the time scale. Blocks and copies are counted from real copies.")


def plot_figure(figures: dict[str, dict[str, float]]):
    """The ``--plot`` figure: TTFT/TBT percentiles and swap volume per configuration, every
    bar and line labelled, legends outside the axes, a caption saying what is modelled.
    Returns a matplotlib ``Figure`` (the Agg backend; needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    fig, (lat, vol) = plt.subplots(1, 2, figsize=(13, 5.5))
    keys = [("TTFT P50", "ttft_p50_s"), ("TTFT P95", "ttft_p95_s"), ("TTFT P99", "ttft_p99_s"),
            ("TTFT P99.9", "ttft_p999_s"), ("TBT P99.9", "tbt_p999_s")]
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        lat.bar(x + i * width, [figures[n][k] for _, k in keys], width, label=n)
    lat.set_xticks(x + width * (len(names) - 1) / 2, [k for k, _ in keys])
    lat.set_yscale("log")
    lat.set_ylabel("seconds (modelled clock)")
    lat.set_title("latency percentiles (modelled)")
    # Legends sit below the axes, so no legend covers a bar.
    lat.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(names), 4),
               title="configuration")
    copied = [figures[n]["swap_out_blocks_copied"] for n in names]
    reused = [figures[n]["swap_out_blocks_reused"] for n in names]
    vol.bar(names, copied, label="swap-out blocks copied")
    vol.bar(names, reused, bottom=copied, label="swap-out blocks reused")
    twin = vol.twinx()
    twin.plot(names, [figures[n]["copies"] for n in names], "ko-",
              label="copies issued (right axis)")
    twin.set_yscale("log")
    twin.set_ylabel("copies issued")
    vol.set_ylabel("blocks")
    vol.set_title("swap volume (measured)")
    handles = [h for ax in (vol, twin) for h in ax.get_legend_handles_labels()[0]]
    vol.legend(handles, [h.get_label() for h in handles], loc="upper center",
               bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.text(0.5, 0.01, PLOT_CAPTION, ha="center", va="bottom", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot(figures: dict[str, dict[str, float]], path: str) -> None:
    """Write [`plot_figure`][] to ``path``, in the format its suffix names (PNG when it has
    none; [`plot_format`][] checks it before the run)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(figures)
    try:
        fig.savefig(path, dpi=120, format=plot_format(path))
    finally:
        plt.close(fig)


def plot_format(path: str) -> str:
    """The image format matplotlib writes for ``path``: its suffix, or ``png`` without one.

    Raises:
        ValueError: a suffix matplotlib cannot write (``out.txt``); the message lists the
            formats it can.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(path)[1][1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise ValueError(f"matplotlib cannot write .{suffix} files; give one of "
                         f"{', '.join('.' + k for k in sorted(supported))} (or no suffix "
                         f"for PNG)")
    return suffix or "png"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _option_error(option: str, message: str) -> int:
    print(f"kvswitch bench: error: argument {option}: {message}", file=sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    known = {**CONFIGURATIONS, **ABLATIONS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        print(f"kvswitch bench: unknown configuration(s) {unknown}; choose from "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        return _option_error("--configs", f"{', '.join(twice)} given more than once")
    outputs = [(o, getattr(args, o[2:])) for o in ("--json", "--plot")]
    if args.json and args.plot and _same_file(args.json, args.plot):
        return _option_error("--plot", f"the same file as --json ({args.plot})")
    for option, path in outputs:
        if path and args.trace and _same_file(path, args.trace):
            return _option_error(option, f"would overwrite the trace {args.trace}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("kvswitch bench: --plot needs matplotlib (pip install 'matplotlib>=3.7')",
                  file=sys.stderr)
            return 2
        try:
            plot_format(args.plot)
        except ValueError as e:
            return _option_error("--plot", str(e))
    clock = args.clock or ("wall" if args.backend == "cuda" else "virtual")
    time_scale_given = getattr(args, "time_scale_given", False)
    if args.backend == "cuda" and clock != "wall":
        return _option_error("--clock", "--backend cuda runs on the wall clock only (its "
                                        "copies are timed on the GPU): use --clock wall")
    if clock == "virtual" and time_scale_given:
        return _option_error("--time-scale", "applies to --clock wall only (the virtual "
                                             "clock sleeps nothing)")
    if clock == "wall" and args.link_model:
        return _option_error("--link-model", "applies to the virtual clock only (--clock "
                                             "wall measures its copies)")
    link = None
    if args.link_model:
        if args.link_model in LINK_PRESETS:
            link = LINK_PRESETS[args.link_model]
        else:
            try:
                link = link_model_from_campaign(
                    args.link_model, d2d_bytes_per_s=LINK_PRESETS[args.gpu].d2d_bytes_per_s)
            except (OSError, ValueError) as e:
                return _option_error("--link-model", f"neither a preset ("
                                     f"{', '.join(LINK_PRESETS)}) nor a usable GPU campaign "
                                     f"file: {e}")
    time_scale = args.time_scale if clock == "wall" else ServeConfig().time_scale
    if args.backend == "cuda":
        # Real block bytes over the real link: only real time makes sense (checked before
        # the GPU so that the option error is the same on every machine).
        if time_scale_given and time_scale != 1:
            print(f"kvswitch bench: error: argument --time-scale: --backend cuda copies the "
                  f"preset's real block bytes in real time, so it must be 1, got "
                  f"{time_scale:g}", file=sys.stderr)
            return 2
        time_scale = 1.0
        if why := cuda_unavailable_reason():
            print(f"kvswitch bench: error: --backend cuda needs a CUDA GPU: {why}",
                  file=sys.stderr)
            return 2
    try:
        trace = load_trace(args.trace)
    except (TraceError, OSError) as e:
        print(f"kvswitch bench: {e}", file=sys.stderr)
        return 2
    if args.conversations > len(trace):
        print(f"kvswitch bench: --conversations {args.conversations:,} exceeds the "
              f"{len(trace):,} conversations of the trace; serving all of them", file=sys.stderr)
    seeds = [args.seed + k for k in range(args.repeats)]
    samples = {seed: sample(trace, args.conversations, seed) for seed in seeds}
    conversations = samples[args.seed]
    config = ServeConfig(
        model=args.model, gpu=args.gpu, gpu_blocks=args.gpu_blocks,
        host_blocks=args.host_blocks, arrival_rate=args.arrival_rate[0], think_s=args.think_s,
        pattern=args.pattern, update_every=args.update_every, clock=clock, link=link,
        time_scale=time_scale, num_workers=args.workers, seed=args.seed, backend=args.backend)
    # serve() refuses a pool too small for a conversation; say it here, before any run
    # (every seed samples its own conversations).
    big = max((c for convs in samples.values() for c in convs), key=lambda c: c.total_tokens)
    need = min_gpu_blocks(big.total_tokens, config)
    if args.gpu_blocks < need:
        print(f"kvswitch bench: error: argument --gpu-blocks: must be at least {need:,} for "
              f"these conversations (the largest, {big.conversation_id!r}, holds "
              f"{big.total_tokens:,} tokens of KV), got {args.gpu_blocks:,}", file=sys.stderr)
        return 2
    # Load points: arrival rates given, or fractions of the pool's capacity (the first
    # seed's sample sets the rate, the same for every seed).
    capacity = capacity_rate(conversations, config)
    if args.load:
        points = [(f * capacity, f) for f in args.load]
    else:
        points = [(rate, rate / capacity) for rate in args.arrival_rate]
    timed = [c.arrival_s is not None for c in conversations]
    if any(timed) and len(points) > 1:
        print("kvswitch bench: the trace gives arrival times (arrival_s): the load points "
              "change only conversations without one", file=sys.stderr)
    model = MODEL_PRESETS[args.model]
    link_text = (f"link model {(link or LINK_PRESETS[args.gpu]).name}" if clock == "virtual"
                 else f"time scale {time_scale:g}")
    rates = ", ".join(f"{r:.3g}/s (load {f:.2g})" for r, f in points)
    print(
        f"kvswitch bench: {len(conversations)} conversations from "
        f"{args.trace or 'the bundled ShareGPT trace'}, Poisson {rates}, "
        f"think time {args.think_s:g} s; {args.model} on {args.gpu} (cost model); GPU pool "
        f"{args.gpu_blocks:,} blocks ({args.gpu_blocks * model.kv_bytes_per_token * 16 / GIB:.1f}"
        f" GiB of preset KV), host pool {args.host_blocks:,} blocks; {args.pattern} priorities "
        f"every {args.update_every} iterations; {clock} clock ({link_text}); {args.backend} "
        f"backend", file=sys.stderr)
    configs = {(p, seed): replace(config, seed=seed, arrival_rate=rate)
               for p, (rate, _) in enumerate(points) for seed in seeds}
    runs = [(p, seed, name) for p in range(len(points)) for seed in seeds for name in names]
    speed = machine_speed() if clock == "virtual" else 1.0
    guesses = {(p, seed, name): estimate_run(samples[seed], configs[p, seed], known[name],
                                             speed=speed) for p, seed, name in runs}
    wall = sum(g.wall_s for g in guesses.values())
    where = (f"{wall:.0f} s: an estimate from the work the trace implies (tokens, batch, "
             f"queueing) at this machine's speed now ({speed:.2f}x the reference's time)"
             if clock == "virtual" else
             f"an estimate from the cost model: about "
             f"{_duration(sum(g.makespan_s for g in guesses.values()) / len(runs))} of "
             f"modelled time per run at time scale {time_scale:g}, plus loop overhead and "
             f"pool setup; swap stalls come on top")
    point_text = f" x {len(points)} load points" if len(points) > 1 else ""
    print(f"kvswitch bench: {len(names)} configuration(s) x {len(seeds)} seed(s) "
          f"({', '.join(map(str, seeds))}){point_text} = {len(runs)} run(s); expected "
          f"duration about {_duration(wall)} ({where})", file=sys.stderr)

    # Progress: on the virtual clock in tokens (known exactly in advance; wall time goes
    # with them), on the wall clock in modelled seconds (they advance at about the time
    # scale per wall second).
    virtual = clock == "virtual"
    sizes = [float(guesses[run].tokens if virtual else guesses[run].makespan_s) for run in runs]
    unit = "tokens" if virtual else "modelled s"
    bar = _NoProgress() if args.no_progress else progress_bar(sum(sizes), sys.stderr, unit)
    results: list[dict] = []  # one per load point
    per_seed: dict[str, list[dict[str, float]]] = {}
    histograms: dict[str, list[dict]] = {}
    with bar:
        progress = RunProgress(bar, sizes)
        for i, (p, seed, name) in enumerate(runs):
            if i == 0 or runs[i - 1][0] != p:
                per_seed = {n: [] for n in names}
                histograms = {n: [] for n in names}  # per seed (issue 14)
                results.append({"arrival_rate": points[p][0], "load": points[p][1],
                                "per_seed": per_seed, "histograms": histograms})
            at = f" load {points[p][1]:.2g}" if len(points) > 1 else ""
            progress.start(i, f"{name} seed {seed}{at} ({i + 1}/{len(runs)})")
            callbacks = ({"on_tokens": progress.advance} if virtual
                         else {"on_progress": progress.advance})
            try:
                result = serve(samples[seed], configs[p, seed], known[name], **callbacks)
            except ValueError as e:
                print(f"kvswitch bench: {e}", file=sys.stderr)
                return 2
            except RuntimeError as e:  # the cuda backend: no device, no pinned memory
                print(f"kvswitch bench: {e}", file=sys.stderr)
                return 1
            progress.finish(result.tokens if virtual else result.makespan_s)
            per_seed[name].append(summarize(result))
            histograms[name].append(result.granularity.get("histograms", {}))
    figures: dict[str, dict[str, float]] = {}
    for k, point in enumerate(results):
        if len(seeds) == 1:
            figures = {name: runs_[0] for name, runs_ in point["per_seed"].items()}
            spreads = None
        else:
            both = {name: aggregate(runs_) for name, runs_ in point["per_seed"].items()}
            figures = {name: m for name, (m, _) in both.items()}
            spreads = {name: r for name, (_, r) in both.items()}
        point["figures"], point["spreads"] = figures, spreads
        if len(points) > 1:
            print(f"{'' if k == 0 else chr(10)}== load {point['load']:.2g} of the pool's "
                  f"capacity: {point['arrival_rate']:.3g} conversations/s ==")
        if spreads:
            print(f"Each cell: median (min-max) over seeds {', '.join(map(str, seeds))}.")
        print(format_table(figures, spreads, clock))
        print()
        if line := compare(figures):
            print(line + (" (medians)" if spreads else ""))
    if len(points) > 1:
        print()
        print(format_sweep(results, names))
    copies = ("cuda backend: GPU 0 <-> pinned host memory, the preset's real block bytes"
              if args.backend == "cuda" else
              "host backend, one 16-byte stamp per block, every swap-in's bytes checked"
              if virtual else
              f"host backend; each block carries 1/{time_scale:g} of the preset's bytes")
    if virtual:
        used = link or LINK_PRESETS[args.gpu]
        print(f"Copies are real ({copies}); their time is the link model's ({used.name}: "
              f"{used.dispatch_s * 1e6:.1f} us dispatch per copy call, "
              f"{used.h2d_bytes_per_s / 1e9:.0f} GB/s per direction), model compute the cost "
              f"model's: TTFT, TBT and throughput are on that virtual clock, the same on any "
              f"machine. See docs/benchmarks.md.")
    else:
        print(
            f"Copies are real ({copies}); model compute is "
            f"modelled and slept; TTFT, TBT and throughput are on the modelled clock (modelled "
            f"compute + measured swap stalls x {time_scale:g} + modelled HBM time of "
            f"migrations). See docs/benchmarks.md.")
    try:  # checked before the run, but the directory may have changed since
        if args.json:
            doc = {"config": asdict(config), "trace": args.trace or "bundled",
                   "conversations": len(conversations)}
            if len(points) == 1:
                doc.update(_point_json(results[0], seeds))
            else:
                doc["capacity_rate"] = capacity
                doc["sweep"] = [{"arrival_rate": r["arrival_rate"], "load": r["load"],
                                 **_point_json(r, seeds)} for r in results]
            doc["sources"] = sources(next(iter(figures.values())), clock)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
        if args.plot:
            plot(figures, args.plot)
    except OSError as e:
        print(f"kvswitch bench: cannot write {e.filename or 'output'}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    return 0


def _point_json(point: dict, seeds: list[int]) -> dict:
    """The JSON of one load point: figures, each seed's, histograms, and the range."""
    doc = {"configurations": point["figures"],
           "repeats": {"seeds": seeds, "configurations": point["per_seed"]},
           # log2 bins: entry k counts values in [2**k, 2**(k+1)); one per seed
           "granularity_histograms": point["histograms"]}
    if point["spreads"]:
        doc["range"] = point["spreads"]
    return doc


def preemptions_start(results: list[dict]) -> str:
    """Where priority preemptions start along a load sweep, per configuration."""
    parts = []
    for name in results[0]["figures"]:
        loads = [r["load"] for r in results if r["figures"][name]["priority_preemptions"] > 0]
        parts.append(f"{name} at load {min(loads):.2g}" if loads else f"{name}: none")
    return "priority preemptions start: " + "; ".join(parts)


def format_sweep(results: list[dict], names: list[str]) -> str:
    """The load sweep in one table: per load point, priority preemptions and P99 TTFT per
    configuration, and full vs baseline P99 TTFT; then where preemptions start."""
    head = ["load", "conv/s", *(f"preempt {n}" for n in names),
            *(f"P99 TTFT {n} (s)" for n in names)]
    ratio = "full" in names and "baseline" in names
    if ratio:
        head.append("full/baseline P99 TTFT")
    rows = []
    for r in results:
        f = r["figures"]
        row = [f"{r['load']:.2g}", f"{r['arrival_rate']:.3g}",
               *(f"{f[n]['priority_preemptions']:,.0f}" for n in names),
               *(_number_text(f[n]["ttft_p99_s"], "{:,.3f}") for n in names)]
        if ratio:
            b = f["baseline"]["ttft_p99_s"]
            row.append(f"{f['full']['ttft_p99_s'] / b:.2f}x" if b else "n/a")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*lines, preemptions_start(results)])


def _info(args: argparse.Namespace) -> int:
    from kvswitch.info import collect, format_info

    info = collect()
    if not args.json:
        print(format_info(info))
        return 0
    try:
        if args.json == "-":
            json.dump(info, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            with open(args.json, "w") as f:
                json.dump(info, f, indent=2)
                f.write("\n")
    except BrokenPipeError:
        raise  # a reader that stopped early: main() ends quietly
    except (OSError, TypeError, ValueError) as e:
        print(f"kvswitch info: cannot write the JSON: {e}", file=sys.stderr)
        return 1
    return 0


#: ``kvswitch --help``'s description: plain text (the module docstring is Markdown for the
#: docs site).
DESCRIPTION = """\
kvswitch: KV-cache context switching for LLM serving (FastSwitch's mechanisms).

  kvswitch bench   serve a multi-turn trace (the bundled ShareGPT one by default) with a
                   preempting priority scheduler and compare kvswitch's mechanisms with
                   vLLM's swap path; copies are real, model compute is modelled
  kvswitch info    version, build, copy backends, GPUs, pinned memory, NUMA nodes

Run 'kvswitch bench --help' for the benchmark's options; the documentation is in docs/
of the source tree.
"""


def _model_help() -> str:
    presets = "; ".join(
        f"{name}: {m.num_params / 1e9:.1f} B parameters, {m.num_layers} layers, "
        f"{m.num_kv_heads} KV heads x {m.head_dim}"
        for name, m in sorted(MODEL_PRESETS.items()))
    return (f"model preset of the cost model: its sizes set the compute time, the KV bytes "
            f"per token and so the bytes per block ({presets})")


def build_parser() -> argparse.ArgumentParser:
    from kvswitch import __version__

    parser = argparse.ArgumentParser(prog="kvswitch", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvswitch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="serve a multi-turn trace and compare configurations",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServeConfig()
    b.add_argument("--trace", default=None,
                   help="CSV with conversation_id, turn, new_input_tokens, output_tokens and "
                        "optional arrival_s (default: the bundled ShareGPT trace)")
    b.add_argument("--conversations", type=_integer(1), default=DEFAULT_CONVERSATIONS,
                   help="conversations sampled from the trace (>= 1; all of them when it "
                        "holds fewer)")
    b.add_argument("--seed", type=int, default=d.seed, help="random seed (any integer)")
    load = b.add_mutually_exclusive_group()
    load.add_argument("--arrival-rate", type=_numbers, default=[d.arrival_rate],
                      metavar="RATE[,RATE...]",
                      help="Poisson conversation arrivals per second (> 0; ignored where the "
                           "trace has arrival_s); several, comma-separated, sweep the load")
    load.add_argument("--load", type=_numbers, default=None, metavar="F[,F...]",
                      help="arrivals as fractions of the GPU pool's capacity (the decode rate "
                           "of the batch the pool holds, over the output tokens per "
                           "conversation; above 1 queues grow and priority updates preempt); "
                           "several, comma-separated, sweep the load and report where "
                           "priority preemptions start")
    b.add_argument("--think-s", type=_number(positive=False), default=d.think_s,
                   help="mean think time between a turn's end and the next turn, seconds "
                        "(exponential; >= 0, 0 = none)")
    b.add_argument("--pattern", choices=("markov", "random"), default=d.pattern,
                   help="priority pattern")
    b.add_argument("--update-every", type=_integer(1), default=d.update_every,
                   help="iterations between priority updates (>= 1; 50 = frequency 0.02)")
    b.add_argument("--model", choices=sorted(MODEL_PRESETS), default=d.model,
                   help=_model_help())
    b.add_argument("--gpu", choices=sorted(GPU_PRESETS), default=d.gpu,
                   help="GPU preset of the cost model")
    b.add_argument("--gpu-blocks", type=_integer(1, INT32_MAX), default=d.gpu_blocks,
                   help="GPU pool size, blocks of 16 tokens (1 to 2^31-1, and enough for the "
                        "largest sampled conversation: checked before the run)")
    b.add_argument("--host-blocks", type=_integer(1, INT32_MAX), default=d.host_blocks,
                   help="host pool size, blocks of 16 tokens (1 to 2^31-1)")
    b.add_argument("--clock", choices=("virtual", "wall"), default=None,
                   help="virtual (default): model steps from the cost model, copies' time "
                        "from the link model; the same figures on any machine. wall: scaled "
                        "real time, measured copies and stalls (the only clock of --backend "
                        "cuda, its default there)")
    b.add_argument("--link-model", default=None, metavar="PRESET|CAMPAIGN.json",
                   help=f"the virtual clock's link model: a preset ({', '.join(LINK_PRESETS)})"
                        f" or a GPU campaign's campaign.json (benchmarks/gpu_campaign.py); "
                        f"default: the preset of --gpu")
    b.add_argument("--time-scale", type=_number(positive=True), default=d.time_scale,
                   action=_GivenNumber,
                   help="--clock wall: run this many times faster than the modelled system "
                        "(> 0; 1 = real time; --backend cuda always runs at 1)")
    b.add_argument("--backend", choices=("host", "cuda"), default=d.backend,
                   help="host: both pools in host memory, copies with memcpy (scaled by "
                        "--time-scale); cuda: device pool on GPU 0 (PyTorch tensors), "
                        "pinned host pool, the preset's real block bytes in real time (the "
                        "default pools of llama-3-8b take 20 GiB of GPU memory and 60 GiB "
                        "of pinned host memory: size them with --gpu-blocks/--host-blocks)")
    b.add_argument("--workers", type=_integer(0, MAX_WORKERS), default=d.num_workers,
                   help=f"swap engine worker threads (0 to {MAX_WORKERS}; 0 = copy inline; "
                        f"the virtual clock models as many copy streams)")
    b.add_argument("--configs", default=",".join(CONFIGURATIONS),
                   help="comma-separated configurations to compare (default: all four); "
                        "also groups-nocompact, groups+async-nocompact, full-nocompact: the "
                        "same without GPU-pool compaction; groups-noquantum, "
                        "groups+async-noquantum, full-noquantum: the same with a growth "
                        "quantum of 1 block")
    b.add_argument("--json", type=_output_path, default=None,
                   help="also write the figures to this JSON file (its directory must exist "
                        "and be writable; checked before the run)")
    b.add_argument("--plot", type=_output_path, default=None,
                   help="also write a figure of latency and swap volume: PNG, or the format "
                        "its suffix names (.svg, .pdf, ...); path and format are checked "
                        "before the run")
    b.add_argument("--repeats", type=_integer(1, MAX_REPEATS), default=1,
                   help=f"runs per configuration with seeds --seed, --seed+1, ... (1 to "
                        f"{MAX_REPEATS}); above 1 every figure is the median over seeds with "
                        f"its range (min-max), and --json adds each seed's figures")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress bar (one bar covers every configuration and repeat)")
    b.set_defaults(func=_bench)
    i = sub.add_parser("info", help="version, build, backends, devices, pinned memory, NUMA")
    i.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print one JSON object instead (to PATH when given)")
    i.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kvswitch`` with ``argv``; returns the exit status.

    A reader that stops early (``kvswitch info | head -3``) ends the command quietly with
    status 141 (128 + SIGPIPE, what a shell reports for a command killed by a closed pipe),
    instead of a BrokenPipeError traceback.
    """
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # Python's recommended handling: point stdout at devnull so that the flush at
        # exit does not raise again (docs.python.org/3/library/signal.html, "Note on
        # SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13


if __name__ == "__main__":
    raise SystemExit(main())

"""Summaries, the rich table, the verdict, the JSON file and the plot of ``bgapi compare``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bgapi.compare.child import BASELINE
from bgapi.compare.stats import Spread, describe, sign_test, spread
from bgapi.config import MODES

__all__ = ["METRICS", "count_text", "print_table", "share_text", "summarize", "verdict", "write_json", "write_plot"]

JSON_FORMAT_VERSION = 1

Figures = dict[str, Any]
Extractor = Callable[[Figures], float | None]


def _nested(*keys: str) -> Extractor:
    def extract(figures: Figures) -> float | None:
        value: Any = figures
        for key in keys:
            if value is None:
                return None
            value = value.get(key)
        return value  # type: ignore[no-any-return]

    return extract


def _error_total(figures: Figures) -> float:
    return float(sum(figures.get("poll_errors", {}).values()))


# (key in the summary, label in the table, how to read it from one run's figures)
METRICS: tuple[tuple[str, str, Extractor], ...] = (
    ("lateness_p50_ms", "run lateness p50 (ms)", _nested("lateness_ms", "p50")),
    ("lateness_p99_ms", "run lateness p99 (ms)", _nested("lateness_ms", "p99")),
    ("lateness_max_ms", "run lateness max (ms)", _nested("lateness_ms", "max")),
    ("drift_ms", "drift at the end (ms)", _nested("drift_ms")),
    ("drift_per_run_ms", "drift per run (ms)", _nested("drift_per_run_ms")),
    ("runs_done", "runs done", _nested("runs_done")),
    ("runs_scheduled", "runs scheduled", _nested("runs_scheduled")),
    ("runs_done_ratio", "done / scheduled", _nested("runs_done_ratio")),
    ("missed", "missed slots", _nested("missed")),
    ("poll_errors", "failed polls", _error_total),
    ("server_p50_ms", "server latency p50 (ms)", _nested("server", "latency_ms", "p50")),
    ("server_p99_ms", "server latency p99 (ms)", _nested("server", "latency_ms", "p99")),
    ("server_max_ms", "server latency max (ms)", _nested("server", "latency_ms", "max")),
    ("requests_per_s", "server requests/s", _nested("server", "requests_per_s")),
    ("mean_body_bytes", "response body (bytes)", _nested("server", "mean_body_bytes")),
    ("cpu_s_per_1000_polls", "CPU s per 1000 polls", _nested("cpu_s_per_1000_polls")),
    ("cpu_s", "CPU s in the window", _nested("cpu_s")),
    ("peak_rss_mb", "peak RSS (MB)", _nested("peak_rss_mb")),
    ("ready_s", "launch to API ready (s)", _nested("ready_s")),
    ("first_poll_s", "launch to first poll (s)", _nested("first_poll_s")),
    ("stop_s", "SIGTERM to exit (s)", _nested("stop_s")),
)

# Ratios to the baseline run of the same repetition: (key, label, metric, higher is worse).
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("server_p50_ratio", "server p50 / baseline", "server_p50_ms"),
    ("server_p99_ratio", "server p99 / baseline", "server_p99_ms"),
    ("requests_per_s_ratio", "requests/s / baseline", "requests_per_s"),
)

# The CPU a mode used beyond the baseline run of the same repetition, per
# 1000 polls: what the polls cost, the server's own requests taken out.
EXTRA_CPU = "extra_cpu_s_per_1000_polls"

# Figures that the verdict compares repetition by repetition, with their names
# in its sentences. Modes in one repetition ran minutes apart at most, so a
# paired comparison is less exposed to the machine's drift than min-max ranges.
PAIRED: dict[str, str] = {"server_p99_ms": "server p99", "lateness_p99_ms": "p99 lateness"}
# A mode that completed a smaller share of its scheduled runs ranks after every mode that did not.
COMPLETE_SHARE = 0.9
# Below this sign-test p-value the verdict calls a ranking unlikely to be noise.
SIGNIFICANCE = 0.05

# Share of the paced requests that the load generator sent over 1 ms late: a
# server that cannot keep up with --rate turns the run into saturation.
LATE_SHARE = "late_send_share"
# Above this late share the verdict reports that the rate was not kept.
MAX_LATE_SHARE = 0.1

_LABELS = (
    {key: label for key, label, _ in METRICS}
    | {key: label for key, label, _ in RATIOS}
    | {EXTRA_CPU: "CPU s per 1000 polls above baseline"}
)


def summarize(runs: Sequence[Figures], modes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Reduce the runs of each mode to median, min and max per metric.

    Ratios to the baseline pair each run with the baseline run of the same
    repetition, then take the median, min and max of those ratios.
    """
    summary: dict[str, dict[str, Any]] = {}
    baseline_by_rep = {run["repetition"]: run for run in runs if run["mode"] == BASELINE and run.get("ok")}
    for mode in modes:
        mode_runs = [run for run in runs if run["mode"] == mode and run.get("ok")]
        entry: dict[str, Any] = {
            key: spread(extract(run) for run in mode_runs) for key, _, extract in METRICS
        }
        by_key = {key: extract for key, _, extract in METRICS}
        for ratio_key, _, metric in RATIOS:
            ratios = []
            for run in mode_runs:
                base = baseline_by_rep.get(run["repetition"])
                value = by_key[metric](run)
                reference = by_key[metric](base) if base else None
                if value is not None and reference:
                    ratios.append(value / reference)
            entry[ratio_key] = spread(ratios)
        entry[EXTRA_CPU] = spread(_extra_cpu(run, baseline_by_rep.get(run["repetition"])) for run in mode_runs)
        entry[LATE_SHARE] = spread(_late_share(run) for run in mode_runs)
        entry["by_repetition"] = {
            key: {run["repetition"]: by_key[key](run) for run in mode_runs} for key in PAIRED
        }
        entry["exit_codes"] = [run.get("exit_code") for run in mode_runs]
        entry["runs_measured"] = len(mode_runs)
        entry["runs_failed"] = sum(1 for run in runs if run["mode"] == mode and not run.get("ok"))
        summary[mode] = entry
    return summary


def _extra_cpu(run: Figures, base: Figures | None) -> float | None:
    if base is None or not run.get("runs_done"):
        return None
    if run.get("cpu_s") is None or base.get("cpu_s") is None:
        return None
    return (run["cpu_s"] - base["cpu_s"]) / run["runs_done"] * 1000


def _late_share(run: Figures) -> float | None:
    server = run.get("server")
    if not server or not server.get("completed"):
        return None
    return float(server.get("late_sends", 0)) / server["completed"]


def _rows(summary: dict[str, dict[str, Any]], modes: Sequence[str], has_load: bool) -> list[tuple[str, list[str]]]:
    keys = [key for key, _, _ in METRICS]
    if has_load:
        position = keys.index("requests_per_s") + 1
        keys[position:position] = [key for key, _, _ in RATIOS]
    else:
        keys = [key for key in keys if not key.startswith(("server_", "requests_per_s"))]
    keys.insert(keys.index("cpu_s") + 1, EXTRA_CPU)
    rows = []
    for key in keys:
        # .get: a JSON file written by an older bgapi may lack a newer figure.
        cells = [describe(summary[mode].get(key, {})) for mode in modes]
        if all(cell == "-" for cell in cells):
            continue
        rows.append((_LABELS[key], cells))
    codes = [",".join(str(code) for code in summary[mode]["exit_codes"]) or "-" for mode in modes]
    rows.append(("exit codes", codes))
    return rows


def print_table(console: Any, summary: dict[str, dict[str, Any]], modes: Sequence[str], has_load: bool, title: str) -> None:
    """Print the modes side by side: one row per metric, ``median (min–max)`` per cell."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold", no_wrap=True)
    for mode in modes:
        table.add_column(mode, justify="right")
    for label, cells in _rows(summary, modes, has_load):
        table.add_row(label, *cells)
    console.print(table)


def markdown_table(summary: dict[str, dict[str, Any]], modes: Sequence[str], has_load: bool) -> str:
    """Return the same table as Markdown, for BENCHMARKS.md."""
    lines = ["| metric | " + " | ".join(modes) + " |", "| --- |" + " ---: |" * len(modes)]
    for label, cells in _rows(summary, modes, has_load):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median(summary: dict[str, dict[str, Any]], mode: str, key: str) -> float | None:
    value: Spread = summary.get(mode, {}).get(key, {})
    return value.get("median")


def _fmt_ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def verdict(summary: dict[str, dict[str, Any]], modes: Sequence[str], settings: dict[str, Any]) -> str:
    """Write one paragraph that states what the medians show, derived from the numbers only."""
    measured = [mode for mode in modes if mode != BASELINE and summary[mode]["runs_measured"]]
    products = [mode for mode in measured if not mode.startswith("bare-")]
    if not products:
        return "No poller mode produced a measurement, so there is nothing to compare."
    sentences: list[str] = []
    has_load = bool(settings.get("load"))
    condition = (
        f"with {count_text(settings['load'], 'concurrent API client')}"
        + (f" at {count_text(settings['rate'], 'request')}/s" if settings.get("rate") else "")
        + (f" ({share_text(settings['rate_share'])} of capacity)" if settings.get("rate_share") else "")
        if has_load
        else "with an idle API"
    )

    lateness = {mode: _median(summary, mode, "lateness_p99_ms") for mode in products}
    ranked = sorted((value, mode) for mode, value in lateness.items() if value is not None)
    if ranked:
        best_value, best = ranked[0]
        worst_value, worst = ranked[-1]
        text = (
            f"{condition[0].upper()}{condition[1:]}, {count_text(settings['targets'], 'target')} every "
            f"{settings['interval_s']:g} s{_blocking_phrase(settings)}: {best} started its runs "
            f"closest to their slots (p99 lateness {_fmt_ms(best_value)})"
        )
        if worst != best:
            text += f" and {worst} the latest ({_fmt_ms(worst_value)})"
        sentences.append(text + ".")

    for kind in ("thread", "asyncio"):
        bare = f"bare-{kind}"
        own, floor = lateness.get(kind), _median(summary, bare, "lateness_p99_ms")
        if own is not None and floor is not None:
            sentences.append(
                f"bgapi's {kind} mode was {_fmt_ms(abs(own - floor))} "
                f"{'above' if own >= floor else 'below'} the bare {kind} loop's p99 "
                f"({_fmt_ms(floor)})."
            )

    interval_ms = settings["interval_s"] * 1000
    drifting = [
        (mode, value)
        for mode in products
        if (value := _median(summary, mode, "drift_ms")) is not None and value > interval_ms
    ]
    for mode, value in drifting:
        per_run = _median(summary, mode, "drift_per_run_ms")
        detail = f", {per_run:.2f} ms per run" if per_run is not None else ""
        sentences.append(
            f"{mode} drifted {_fmt_ms(value)} behind the fixed-rate slots by the end{detail}."
        )
    steady = [mode for mode in products if mode not in dict(drifting) and _median(summary, mode, "drift_ms") is not None]
    if drifting and steady:
        sentences.append(f"{_join(steady)} stayed within one interval of their slots.")

    short = [
        (mode, ratio)
        for mode in products
        if (ratio := _median(summary, mode, "runs_done_ratio")) is not None and ratio < 0.95
    ]
    for mode, ratio in short:
        sentences.append(f"{mode} completed only {ratio:.0%} of its scheduled runs.")

    if has_load:
        ratios = {mode: _median(summary, mode, "server_p99_ratio") for mode in products}
        ranked_ratios = sorted((value, mode) for mode, value in ratios.items() if value is not None)
        if ranked_ratios:
            parts = ", ".join(f"{value:.2f}× with {mode}" for value, mode in ranked_ratios)
            sentences.append(
                f"Relative to the no-poller baseline, the server's p99 latency was {parts}."
            )

    if has_load and settings.get("rate"):
        late = {mode: share for mode in modes if (share := _median(summary, mode, LATE_SHARE)) is not None}
        behind = sorted(mode for mode, share in late.items() if share > MAX_LATE_SHARE)
        if behind:
            highest = max(late[mode] for mode in behind)
            sentences.append(
                f"The server did not keep up with {count_text(settings['rate'], 'request')}/s in "
                f"{', '.join(behind)} (up to {highest:.0%} of the requests went out late), so those "
                "runs measured saturation, not a paced load; lower --rate or use a share such as 50%."
            )

    # With API load the child's CPU is mostly spent serving requests: what the
    # polls cost is then the CPU above the baseline's.
    cpu_key, cpu_qualifier = (EXTRA_CPU, " above the baseline") if has_load else ("cpu_s_per_1000_polls", "")
    cpu = sorted(
        (value, mode) for mode in products if (value := _median(summary, mode, cpu_key)) is not None
    )
    if len(cpu) > 1 and f"{cpu[0][0]:.2f}" == f"{cpu[-1][0]:.2f}":
        sentences.append(
            f"{_join([mode for _, mode in cpu])} used the same CPU per 1000 polls{cpu_qualifier} "
            f"({cpu[0][0]:.2f} s)."
        )
    elif len(cpu) > 1:
        sentences.append(
            f"{cpu[0][1]} used the least CPU per 1000 polls{cpu_qualifier} ({cpu[0][0]:.2f} s), "
            f"{cpu[-1][1]} the most ({cpu[-1][0]:.2f} s)."
        )

    primary, reason = _ranking(summary, products, has_load)
    favoured = _best_mode(summary, products, primary)
    candidates = [mode for mode in products if mode in MODES]
    if favoured is not None and len(candidates) > 1:
        values = [value for mode in candidates if (value := _median(summary, mode, primary)) is not None]
        if values and _median(summary, favoured, primary) != min(values):
            reason += f" of the modes that completed at least {COMPLETE_SHARE:.0%} of their runs"
        sentences.append(f"On this machine and workload, {favoured} gave {reason}.")
    single = [mode for mode in products if summary[mode]["runs_measured"] < 2]
    if single and len(single) == len(products):
        sentences.append("With one repetition per mode, these figures carry no estimate of their noise.")
    elif single:
        sentences.append(
            f"With one measured repetition of {_join(single)}, its figures carry no estimate of their noise."
        )
    if favoured is not None and len(single) < len(products):
        others = [mode for mode in products if mode != favoured]
        paired_key = "server_p99_ms" if has_load else "lateness_p99_ms"
        sentences.append(_paired_comparison(summary, favoured, others, paired_key))
    return " ".join(sentence for sentence in sentences if sentence)


def count_text(number: float, noun: str) -> str:
    """Format a count with its noun, singular for 1: ``1 target``, ``50 targets``, ``763 requests``."""
    shown = f"{number:g}" if isinstance(number, float) else str(number)
    return f"{shown} {noun}" if number == 1 else f"{shown} {noun}s"


def share_text(share: float) -> str:
    """Format a share of 1 as the percentage a user would type: 0.5 is ``50%``, 0.0001 ``0.01%``."""
    return f"{share * 100:.4g}%"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _blocking_phrase(settings: dict[str, Any]) -> str:
    blocking = settings.get("blocking_ms") or 0
    return f" and a {blocking:g} ms blocking call in every poll" if blocking else ""


def _paired_comparison(summary: dict[str, dict[str, Any]], best: str, others: Sequence[str], key: str) -> str:
    """Count the repetitions in which ``best`` had the lower figure, against each of ``others``."""
    mine = summary[best]["by_repetition"][key]
    parts = []
    uncertain = False
    max_pairs = 0
    for other in others:
        theirs = summary[other]["by_repetition"][key]
        pairs = [
            (mine[repetition], theirs[repetition])
            for repetition in mine
            if mine[repetition] is not None
            and theirs.get(repetition) is not None
            and mine[repetition] != theirs[repetition]
        ]
        if len(pairs) < 2:
            continue
        max_pairs = max(max_pairs, len(pairs))
        wins = sum(1 for own, their in pairs if own < their)
        chance = sign_test(wins, len(pairs))
        uncertain = uncertain or chance >= SIGNIFICANCE
        parts.append(f"in {wins} of {len(pairs)} against {other} (sign test p = {chance:.2g})")
    if not parts:
        return ""
    text = f"Repetition by repetition, {best} had the lower {PAIRED[key]} {_join(parts)}."
    if uncertain:
        text += f" At p = {SIGNIFICANCE:g} or above, noise alone could explain the split,"
        needed = _pairs_for_significance()
        if max_pairs < needed:
            text += (
                f" and with fewer than {needed} repetitions that differ no split can reach p < {SIGNIFICANCE:g}:"
                f" rerun with --repeat {needed} or more to rank those modes."
            )
        else:
            text += " so more --repeat is needed to rank those modes."
    return text


def _pairs_for_significance() -> int:
    """Return the fewest repetitions in which a clean sweep reaches p < SIGNIFICANCE."""
    pairs = 1
    while sign_test(pairs, pairs) >= SIGNIFICANCE:
        pairs += 1
    return pairs


def _ranking(summary: dict[str, dict[str, Any]], modes: Sequence[str], has_load: bool) -> tuple[str, str]:
    """Return the summary key that ranks the modes, and the phrase for the best of them."""
    if not has_load:
        return "lateness_p99_ms", "the lowest p99 lateness"
    if any(_median(summary, mode, "server_p99_ratio") is not None for mode in modes):
        return "server_p99_ratio", "the lowest server p99 relative to the baseline"
    # Without a baseline run (--no-baseline) there are no ratios to rank by.
    return "server_p99_ms", "the lowest server p99"


def _best_mode(summary: dict[str, dict[str, Any]], modes: Sequence[str], primary: str) -> str | None:
    """Pick the bgapi mode the figures favour: most of its runs done, then the lowest ``primary``."""
    candidates = [mode for mode in modes if mode in MODES]
    if not candidates:
        return None

    def score(mode: str) -> tuple[float, float, float]:
        done = _median(summary, mode, "runs_done_ratio") or 0.0
        first = _median(summary, mode, primary)
        second = _median(summary, mode, "lateness_p99_ms")
        # Missing a tenth of the schedule outweighs any latency gain.
        incomplete = 0.0 if done >= COMPLETE_SHARE else 1.0
        return (incomplete, first if first is not None else float("inf"), second or 0.0)

    return min(candidates, key=score)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write the comparison document as indented JSON."""
    path.write_text(json.dumps({"format_version": JSON_FORMAT_VERSION, **document}, indent=1), encoding="utf-8")


def write_plot(path: Path, runs: Sequence[Figures], modes: Sequence[str], title: str) -> None:
    """Draw, per mode, the share of runs later than x and of requests slower than x (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_load = any(run.get("server") for run in runs)
    panels = 2 if has_load else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    _plot_ccdf(axes[0][0], runs, modes, lambda run: run.get("lateness_histogram"))
    axes[0][0].set_title("Run lateness")
    axes[0][0].set_xlabel("lateness (ms)")
    if has_load:
        _plot_ccdf(
            axes[0][1], runs, modes, lambda run: (run.get("server") or {}).get("latency_histogram")
        )
        axes[0][1].set_title("Server request latency under load")
        axes[0][1].set_xlabel("latency (ms)")
    axes[0][0].set_ylabel("share of samples above x")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_ccdf(axis: Any, runs: Sequence[Figures], modes: Sequence[str], histogram_of: Callable[[Figures], Any]) -> None:
    plotted = False
    for mode in modes:
        counts: dict[float, int] = {}
        for run in runs:
            if run["mode"] != mode or not run.get("ok"):
                continue
            histogram = histogram_of(run)
            if not histogram:
                continue
            for edge, count in zip(histogram["edges_ms"], histogram["counts"], strict=True):
                counts[edge] = counts.get(edge, 0) + count
        total = sum(counts.values())
        if not total:
            continue
        edges = sorted(counts)
        xs, ys = [], []
        above = total
        for index, edge in enumerate(edges):
            above -= counts[edge]
            # Samples in this bucket are at most the next edge.
            upper = edges[index + 1] if index + 1 < len(edges) else edge * 10 ** 0.1
            if upper > 0:
                xs.append(upper)
                ys.append(max(above / total, 0.5 / total))
        axis.step(xs, ys, where="post", label=mode)
        plotted = True
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    if plotted:
        axis.legend(fontsize=8)

"""``bgapi compare``: measure the poller's strategies side by side on this machine.

Each mode runs in a fresh process (:mod:`bgapi.compare.child`), in turn and
interleaved over the repetitions, against the built-in upstream
(:mod:`bgapi.compare.upstream`), with the load generator
(:mod:`bgapi.compare.load`) in a process of its own. A ``baseline`` run of the
same server without a poller comes first in every repetition, so the poller's
cost on the server is a ratio. :mod:`bgapi.compare.report` prints the table
and the verdict and writes the JSON and the plot.

This package is imported only by the ``compare`` command.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["BGAPI_MODES", "run_compare"]

BGAPI_MODES = ("thread", "asyncio", "apscheduler", "process")
# First polls are spread over at most this many seconds (see bgapi.schedule),
# so the window starts once every target has run at least once.
MAX_WARMUP_SPREAD_S = 10.0
# The lowest --rate other than 0: every run sends at least one request a second.
MIN_RATE = 1.0
# A poll of the built-in upstream that takes this long has failed anyway.
MAX_POLL_TIMEOUT_S = 10.0


def _known_modes() -> tuple[str, ...]:
    from bgapi.compare.peers import PEER_MODES

    return BGAPI_MODES + PEER_MODES


def parse_rate(text: str) -> tuple[float, float | None]:
    """Parse ``--rate``: requests per second (``1000``) or a share of capacity (``50%``).

    Returns:
        (requests per second, None) or (0.0, the share as a fraction of 1).

    Raises:
        ValueError: the text is neither, or out of range; the message shows a valid value.
    """
    value = text.strip()
    is_share = value.endswith("%")
    try:
        number = float(value.removesuffix("%"))
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(
            f"--rate {text!r} is invalid: give requests per second, e.g. 1000, "
            "or a share of capacity, e.g. 50%"
        )
    if is_share:
        if not 0 < number <= 100:
            raise ValueError(f"--rate {text!r} is invalid: a share must be above 0% and at most 100%, e.g. 50%")
        return 0.0, number / 100
    # A positive rate below the minimum, even one that float() rounds to 0.0
    # (1e-400), must not turn into "as fast as they can".
    if (number != 0 and number < MIN_RATE) or (number == 0 and _nonzero_decimal(value)):
        raise ValueError(
            f"--rate {text!r} is invalid: give 0 (as fast as the clients can) "
            f"or at least {MIN_RATE:g} request/s"
        )
    return abs(number), None


def _nonzero_decimal(text: str) -> bool:
    try:
        return decimal.Decimal(text) != 0
    except decimal.InvalidOperation:
        return False


def _check_output_paths(json_path: Path | None, plot_path: Path | None) -> str | None:
    """Return an error message when ``--json`` or ``--plot`` names a path that cannot be written."""
    for option, path, example in (("--json", json_path, "compare.json"), ("--plot", plot_path, "compare.png")):
        if path is None:
            continue
        if path.is_dir():
            return f"{option} {str(path)!r} is a directory; give a file path, e.g. {path / example}"
        parent = path.parent
        if not parent.is_dir():
            return f"{option}: the directory {str(parent)!r} does not exist; create it or give another path"
        if not os.access(parent, os.W_OK):
            return f"{option}: the directory {str(parent)!r} is not writable; give another path"
    return None


def _check_requirements(modes: list[str], plot_path: Path | None) -> str | None:
    """Return an error message when a mode or an optional package is missing."""
    known = _known_modes()
    unknown = [mode for mode in modes if mode not in known]
    if unknown:
        return f"unknown mode(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}"
    if len(set(modes)) != len(modes):
        return f"--modes lists a mode twice: {','.join(modes)}"
    try:
        import psutil  # noqa: F401
    except ImportError:
        return "bgapi compare needs psutil to measure CPU and memory; install it with: pip install 'bgapi[compare]'"
    if "apscheduler" in modes:
        try:
            import apscheduler  # noqa: F401

            import bgapi.runners.apscheduler  # noqa: F401
        except ImportError as exc:
            return f"mode 'apscheduler' is not available ({exc}); install it with: pip install 'bgapi[apscheduler]'"
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib; install it with: pip install 'bgapi[plot]'"
    return None


def run_compare(
    *,
    modes: list[str],
    targets: int,
    interval: float,
    duration: float,
    load: int,
    blocking_ms: float,
    repeat: int,
    json_path: Path | None,
    plot_path: Path | None,
    rate: float | str = 0.0,
    warmup: float | None = None,
    http_client: str = "auto",
    baseline: bool = True,
) -> int:
    """Run the comparison, print the table and verdict, write the files; return the exit code.

    Returns:
        0 when every run was measured, 1 when any run failed (the others are
        still reported), 2 for invalid options or a missing optional package,
        130 when interrupted.
    """
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: an error is one line in a log or a pipe, not cut at 80 columns.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    error = _check_requirements(modes, plot_path) or _check_output_paths(json_path, plot_path)
    rate_per_s: float = 0.0
    rate_share: float | None = None
    if isinstance(rate, str):
        try:
            rate_per_s, rate_share = parse_rate(rate)
        except ValueError as exc:
            error = error or str(exc)
    else:
        rate_per_s = rate
    if error is None and not modes:
        error = "--modes is empty; give at least one mode, e.g. --modes thread,asyncio"
    if error is None and (rate_per_s or rate_share) and not load:
        error = "--rate needs --load: give the number of concurrent clients that share the rate"
    if error is not None:
        console.print(f"[bold red]error:[/] {escape(error)}")
        return 2

    from bgapi.compare.harness import CompareError, RunSettings

    warmup_s = warmup if warmup is not None else min(interval, MAX_WARMUP_SPREAD_S) + 0.5
    settings = RunSettings(
        targets=targets,
        interval_s=interval,
        duration_s=duration,
        warmup_s=warmup_s,
        load=load,
        rate=rate_per_s,
        blocking_ms=blocking_ms,
        timeout_s=min(max(interval, 1.0), MAX_POLL_TIMEOUT_S),
        http_client=http_client,
    )
    try:
        return _run(console, modes, settings, repeat, json_path, plot_path, baseline, rate_share)
    except CompareError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; every process it started has been stopped")
        return 130


def _run(
    console: Any,
    modes: list[str],
    settings: Any,
    repeat: int,
    json_path: Path | None,
    plot_path: Path | None,
    baseline: bool,
    rate_share: float | None = None,
) -> int:
    from rich.console import Console

    from bgapi.compare import harness, report
    from bgapi.compare.child import BASELINE

    all_modes = [BASELINE, *modes] if baseline else list(modes)
    machine = harness.machine_info()
    started_at = time.time()
    runs: list[dict[str, Any]] = []
    group = harness.ProcessGroup()
    per_run_s = settings.warmup_s + settings.duration_s + 3
    run_count = len(all_modes) * repeat + (1 if rate_share else 0)
    upstream_life_s = (per_run_s + harness.STARTUP_TIMEOUT_S) * run_count + 60
    capacity = None
    try:
        upstream_port = harness.start_upstream(group, upstream_life_s)
        with tempfile.TemporaryDirectory(prefix="bgapi-compare-") as tmp:
            if rate_share:
                capacity = _measure_capacity(console, settings, upstream_port, Path(tmp))
                # A rate of 0 would mean as fast as they can, so never below MIN_RATE.
                settings = dataclasses.replace(settings, rate=max(MIN_RATE, round(rate_share * capacity)))
            runs = _run_all(console, all_modes, settings, repeat, upstream_port, Path(tmp))
    finally:
        group.close()

    summary = report.summarize(runs, all_modes)
    settings_dict = {
        **settings.__dict__,
        "modes": modes,
        "repeat": repeat,
        "baseline": baseline,
        "rate_share": rate_share,
        "capacity_requests_per_s": capacity,
    }
    title = _title(settings, repeat, rate_share)
    out = Console()
    if not out.is_terminal:
        # A pipe or file gets 80 columns by default, too narrow for the modes side by side.
        out = Console(width=max(out.width, 160))
    report.print_table(out, summary, all_modes, bool(settings.load), title)
    text = report.verdict(summary, all_modes, settings_dict)
    out.print(text, markup=False)
    failed = [run for run in runs if not run.get("ok")]
    document = {
        "command": sys.argv,
        "settings": settings_dict,
        "machine": {**machine, "load_average_after": harness.machine_info()["load_average"]},
        "started_at": started_at,
        "ended_at": time.time(),
        "runs": runs,
        "summary": summary,
        "verdict": text,
    }
    if json_path is not None:
        report.write_json(json_path, document)
        console.print(f"wrote {json_path}", markup=False)
    if plot_path is not None:
        report.write_plot(plot_path, runs, all_modes, title)
        console.print(f"wrote {plot_path}", markup=False)
    if failed:
        console.print(f"[bold red]{len(failed)} run(s) failed[/]; see the errors above")
    return 1 if failed else 0


def _measure_capacity(console: Any, settings: Any, upstream_port: int, workdir: Path) -> float:
    """Return the requests/s the server without a poller serves to ``settings.load`` clients at full speed.

    Raises:
        CompareError: the probe could not be measured, or served nothing.
    """
    from bgapi.compare import harness
    from bgapi.compare.child import BASELINE

    probe = dataclasses.replace(settings, rate=0.0)
    run_dir = workdir / "capacity"
    run_dir.mkdir()
    group = harness.ProcessGroup()
    with console.status(f"measuring the server's capacity with {settings.load} clients, no poller"):
        try:
            figures = harness.measure_run(BASELINE, probe, upstream_port, run_dir, group, lambda *_: None)
        finally:
            group.close()
    capacity = (figures.get("server") or {}).get("requests_per_s") or 0.0
    if capacity <= 0:
        raise harness.CompareError(
            f"the server without a poller served no request to {settings.load} clients in the capacity probe"
        )
    console.print(f"capacity without a poller: {capacity:,.0f} requests/s", markup=False)
    return float(capacity)


def _run_all(
    console: Any,
    all_modes: list[str],
    settings: Any,
    repeat: int,
    upstream_port: int,
    workdir: Path,
) -> list[dict[str, Any]]:
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bgapi.compare import harness

    runs: list[dict[str, Any]] = []
    total = len(all_modes) * repeat
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.1f}/{task.total} runs"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=total)
        for repetition in range(repeat):
            # Rotate the order each repetition, so no mode always runs first.
            shift = repetition % len(all_modes)
            order = all_modes[shift:] + all_modes[:shift]
            for mode in order:
                done = len(runs)
                label = f"{mode} ({repetition + 1}/{repeat})"

                def on_progress(phase: str, fraction: float, label: str = label, done: int = done) -> None:
                    progress.update(task, description=f"{label}: {phase}", completed=done + 0.9 * fraction)

                run_dir = workdir / f"{repetition}-{mode}"
                run_dir.mkdir()
                run_group = harness.ProcessGroup()
                try:
                    figures = harness.measure_run(mode, settings, upstream_port, run_dir, run_group, on_progress)
                    figures.update(ok=True)
                except harness.CompareError as exc:
                    progress.console.print(f"[bold red]error:[/] {escape(f'{label}: {exc}')}")
                    figures = {"mode": mode, "ok": False, "error": str(exc)}
                finally:
                    run_group.close()
                figures["repetition"] = repetition
                runs.append(figures)
                progress.update(task, completed=len(runs))
    return runs


def _title(settings: Any, repeat: int, rate_share: float | None = None) -> str:
    from bgapi.compare.report import count_text, share_text

    parts = [
        f"{count_text(settings.targets, 'target')} every {settings.interval_s:g} s",
        f"{settings.duration_s:g} s window",
    ]
    if settings.load:
        rate = f" at {settings.rate:g} req/s" if settings.rate else ""
        if rate_share:
            rate += f" ({share_text(rate_share)} of capacity)"
        parts.append(f"load {count_text(settings.load, 'client')}{rate}")
    else:
        parts.append("no API load")
    if settings.blocking_ms:
        parts.append(f"{settings.blocking_ms:g} ms blocking per poll")
    parts.append(f"median (min–max) of {repeat} repetition(s)")
    return "bgapi compare: " + ", ".join(parts)

"""Process management for ``bgapi compare``: the upstream, the measured child, the load.

One measured run is :func:`measure_run`. It launches a child server with a
fresh config and store, waits until it responds and lets it warm up. Then it
measures a window of ``duration`` seconds (with the load generator running),
sends SIGTERM, and collects what the child, the load generator and the store
recorded.

Every process started here is registered with a :class:`ProcessGroup`, which
ends them all on exit, on an error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bgapi.compare.child import BASELINE, EXIT_FILE, SAMPLES_FILE, read_samples
from bgapi.compare.stats import histogram, percentiles
from bgapi.config import DEFAULT_RETENTION

__all__ = ["CompareError", "ProcessGroup", "RunSettings", "measure_run", "start_upstream"]

# Seconds a child may take from launch until /healthz responds (imports, store, 10k targets).
STARTUP_TIMEOUT_S = 60.0
# Seconds a stopped child may take to exit before it is killed and the run marked.
STOP_TIMEOUT_S = 10.0
# Seconds that `bgapi poll-once` may take to fill the baseline's store.
SEED_TIMEOUT_S = 120.0
# How often the harness samples the child's RSS during the window.
RSS_SAMPLE_S = 0.25
HOST = "127.0.0.1"


class CompareError(Exception):
    """A run could not be measured: a process did not start, respond or stop."""


@dataclass(frozen=True)
class RunSettings:
    """The settings that every run of one ``bgapi compare`` invocation shares."""

    targets: int
    interval_s: float
    duration_s: float
    warmup_s: float
    load: int
    rate: float
    blocking_ms: float
    timeout_s: float
    http_client: str = "auto"


class ProcessGroup:
    """The processes one comparison started; :meth:`close` ends every one still running."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], *, stdout: int | IO[bytes], stderr: int | IO[bytes]) -> subprocess.Popen[bytes]:
        """Start ``args`` as a process and register it."""
        process = subprocess.Popen(args, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        self._processes.append(process)
        return process

    def close(self) -> None:
        """Send SIGTERM to every running process, then SIGKILL to those still running after 2 s."""
        running = [process for process in self._processes if process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + 2.0
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)
        self._processes.clear()


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_upstream(group: ProcessGroup, max_seconds: float) -> int:
    """Start the built-in upstream in its own process and return its port."""
    process = group.start(
        _python_module("bgapi.compare.upstream", "--max-seconds", f"{max_seconds:.0f}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    line = _read_line(process, "built-in upstream", 30.0)
    if not line.strip().isdigit():
        raise CompareError(f"the built-in upstream did not start (it printed {line!r})")
    return int(line)


def _read_line(process: subprocess.Popen[bytes], name: str, timeout_s: float) -> str:
    """Read one line of the process's stdout, or raise after ``timeout_s``."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise CompareError(f"the {name} printed nothing within {timeout_s:g} s")
    return process.stdout.readline().decode(errors="replace")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def write_config(path: Path, settings: RunSettings, upstream_port: int, store_path: Path) -> None:
    """Write the generated configuration: ``settings.targets`` targets on the upstream."""
    # Keep every result of the run, and never prune more often than with the
    # default retention, so that the store costs what it costs in production.
    expected_runs = (settings.warmup_s + settings.duration_s + 5) / settings.interval_s
    retention = max(DEFAULT_RETENTION, math.ceil(expected_runs * 1.2))
    lines = [
        "[poller]",
        f"interval = {settings.interval_s!r}",
        f"timeout = {settings.timeout_s!r}",
        f"blocking_ms = {settings.blocking_ms!r}",
        f'http_client = "{settings.http_client}"',
        "",
        "[store]",
        f"path = {json.dumps(str(store_path))}",
        f"retention = {retention}",
        "",
    ]
    for index in range(settings.targets):
        lines += [
            "[[targets]]",
            f'name = "{_target_name(index)}"',
            f'url = "http://{HOST}:{upstream_port}/status/{index}"',
            'conditions = ["status == 200", \'json.status == "ok"\']',
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _target_name(index: int) -> str:
    return f"t{index:05d}"


def _get_json(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        connection.close()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def measure_run(
    mode: str,
    settings: RunSettings,
    upstream_port: int,
    workdir: Path,
    group: ProcessGroup,
    on_progress: Callable[[str, float], None],
) -> dict[str, Any]:
    """Launch one child server in ``mode``, measure it for one window and stop it.

    Args:
        mode: A bgapi mode, a peer mode or ``baseline``.
        settings: The shared settings of the comparison.
        upstream_port: Port of the built-in upstream.
        workdir: An empty directory for this run's config, store, logs and output.
        group: Registry of the processes to end on exit.
        on_progress: Called with a phase name and the fraction of the window done.

    Returns:
        Every figure of the run; see :func:`_figures`.

    Raises:
        CompareError: the child did not start, did not respond or crashed.
    """
    import psutil

    config_path = workdir / "config.toml"
    store_path = workdir / "bgapi.db"
    write_config(config_path, settings, upstream_port, store_path)
    port = free_port()
    max_seconds = STARTUP_TIMEOUT_S + settings.warmup_s + settings.duration_s + 60
    log_path = workdir / "child.log"
    with open(log_path, "wb") as log:
        if mode == BASELINE and settings.load:
            on_progress("seeding the store", 0.0)
            _seed_store(config_path, log, log_path)
        on_progress("starting", 0.0)
        launched_at = time.time()
        child = group.start(
            _python_module(
                "bgapi.compare.child",
                "--config", str(config_path),
                "--mode", mode,
                "--port", str(port),
                "--out", str(workdir),
                "--max-seconds", f"{max_seconds:.0f}",
            ),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    process = psutil.Process(child.pid)
    ready_at = _wait_ready(child, port, log_path)

    load_process = None
    load_out = workdir / "load.json"
    window_start = ready_at + settings.warmup_s
    if settings.load:
        load_process = _start_load(group, settings, port, window_start, load_out)

    on_progress("warming up", 0.0)
    _sleep_until(window_start, child, log_path)
    cpu_start = _cpu_seconds(process)
    api_start = _poller_counts(port)
    window_start = time.time()
    window_end = window_start + settings.duration_s
    peak_rss = 0
    while (now := time.time()) < window_end:
        _check_alive(child, log_path)
        with contextlib.suppress(psutil.Error):
            peak_rss = max(peak_rss, _tree_rss(process))
        on_progress("measuring", (now - window_start) / settings.duration_s)
        time.sleep(min(RSS_SAMPLE_S, max(0.0, window_end - now)))
    # The window ends before the API call, because a saturated server may respond late.
    window_end = time.time()
    cpu_end = _cpu_seconds(process)
    api_end = _poller_counts(port)

    load_result = None
    if load_process is not None:
        on_progress("collecting load", 1.0)
        load_result = _finish_load(load_process, load_out, settings)

    on_progress("stopping", 1.0)
    stop_s, exit_code = _stop(child)
    return _figures(
        mode=mode,
        settings=settings,
        workdir=workdir,
        launched_at=launched_at,
        ready_at=ready_at,
        window=(window_start, window_end),
        cpu_s=cpu_end - cpu_start,
        api=(api_start, api_end),
        sampled_peak_rss=peak_rss,
        load_result=load_result,
        stop_s=stop_s,
        exit_code=exit_code,
    )


def _seed_store(config_path: Path, log: IO[bytes], log_path: Path) -> None:
    """Poll every target once into the store that the baseline server reads at startup.

    A polling server's API returns each target's last result. Without one, the
    baseline would serialize smaller responses, and every mode's latency
    ratio would include that difference.
    """
    try:
        completed = subprocess.run(
            _python_module("bgapi", "poll-once", "--config", str(config_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            timeout=SEED_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise CompareError(
            f"seeding the baseline's store timed out after {SEED_TIMEOUT_S:g} s; see {log_path}"
        ) from error
    # Exit code 1 means that a target was down, and its result is stored all the same.
    if completed.returncode not in (0, 1):
        raise CompareError(
            f"seeding the baseline's store failed with exit code {completed.returncode}; see {log_path}"
        )


def _wait_ready(child: subprocess.Popen[bytes], port: int, log_path: Path) -> float:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        _check_alive(child, log_path)
        try:
            status, _ = _get_json(port, "/healthz", timeout_s=1.0)
        except (OSError, http.client.HTTPException, ValueError):
            status = 0
        if status == 200:
            return time.time()
        time.sleep(0.02)
    raise CompareError(
        f"the child server did not respond to /healthz within {STARTUP_TIMEOUT_S:g} s "
        "(retry with fewer --targets); its log ends with:\n" + _log_tail(log_path)
    )


def _check_alive(child: subprocess.Popen[bytes], log_path: Path) -> None:
    if child.poll() is not None:
        raise CompareError(
            f"the child server exited with code {child.returncode}; its log ends with:\n"
            + _log_tail(log_path)
        )


def _sleep_until(wall_time: float, child: subprocess.Popen[bytes], log_path: Path) -> None:
    while (remaining := wall_time - time.time()) > 0:
        _check_alive(child, log_path)
        time.sleep(min(0.1, remaining))


def _tree(process: Any) -> list[Any]:
    """Return the measured process and its children (the process mode polls in a child)."""
    import psutil

    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _tree_total(process: Any, measure: Callable[[Any], float]) -> float:
    """Add up ``measure`` over the process tree, skipping members that exited meanwhile."""
    import psutil

    total = 0.0
    for member in _tree(process):
        with contextlib.suppress(psutil.Error):
            total += measure(member)
    return total


def _cpu_seconds(process: Any) -> float:
    def user_and_system(member: Any) -> float:
        times = member.cpu_times()
        return float(times.user + times.system)

    return _tree_total(process, user_and_system)


def _tree_rss(process: Any) -> int:
    return int(_tree_total(process, lambda member: member.memory_info().rss))


def _poller_counts(port: int) -> dict[str, int]:
    _, body = _get_json(port, "/api/poller")
    return {"runs": int(body["runs"]), "missed": int(body["missed"])}


def _start_load(
    group: ProcessGroup, settings: RunSettings, port: int, start_at: float, out: Path
) -> subprocess.Popen[bytes]:
    paths = [f"/api/targets/{_target_name(index)}" for index in range(min(settings.targets, 100))]
    args = [
        "--port", str(port),
        "--concurrency", str(settings.load),
        "--duration", repr(settings.duration_s),
        "--start-at", repr(start_at),
        "--rate", repr(settings.rate),
        "--out", str(out),
    ]
    for path in paths:
        args += ["--path", path]
    process = group.start(
        _python_module("bgapi.compare.load", *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    line = _read_line(process, "load generator", 30.0)
    if line.strip() != "ready":
        raise CompareError(f"the load generator did not start (it printed {line!r})")
    return process


def _finish_load(process: subprocess.Popen[bytes], out: Path, settings: RunSettings) -> dict[str, Any]:
    try:
        process.wait(settings.duration_s + 20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise CompareError("the load generator did not finish in time") from None
    if process.returncode != 0 or not out.exists():
        raise CompareError(f"the load generator failed with exit code {process.returncode}")
    return json.loads(out.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _stop(child: subprocess.Popen[bytes]) -> tuple[float | None, int | None]:
    sent = time.perf_counter()
    child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5.0)
        return None, None
    return time.perf_counter() - sent, code


def _figures(
    *,
    mode: str,
    settings: RunSettings,
    workdir: Path,
    launched_at: float,
    ready_at: float,
    window: tuple[float, float],
    cpu_s: float,
    api: tuple[dict[str, int], dict[str, int]],
    sampled_peak_rss: int,
    load_result: dict[str, Any] | None,
    stop_s: float | None,
    exit_code: int | None,
) -> dict[str, Any]:
    exit_info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        exit_info = json.loads((workdir / EXIT_FILE).read_text(encoding="utf-8"))
    lateness: list[float] = []
    samples_path = workdir / SAMPLES_FILE
    if samples_path.exists():
        times, values = read_samples(samples_path)
        start, end = window
        lateness = [value for at, value in zip(times, values, strict=True) if start <= at < end]

    polling = mode != BASELINE
    elapsed = window[1] - window[0]
    runs_done = len(lateness)
    scheduled = settings.targets * elapsed / settings.interval_s if polling else 0.0
    drift = exit_info.get("drift_ms") or []
    drift_per_run = exit_info.get("drift_per_run_ms") or []
    peak_rss_kb = exit_info.get("peak_rss_kb")
    first_run_at = exit_info.get("first_run_at")
    figures: dict[str, Any] = {
        "mode": mode,
        "window_s": elapsed,
        "lateness_ms": percentiles(lateness) if polling else percentiles([]),
        "lateness_histogram": histogram(lateness),
        "drift_ms": max(drift) if drift else None,
        "drift_per_run_ms": max(drift_per_run) if drift_per_run else None,
        "runs_done": runs_done,
        "runs_scheduled": round(scheduled, 1),
        "runs_done_ratio": runs_done / scheduled if scheduled else None,
        "missed": api[1]["missed"] - api[0]["missed"],
        "poll_errors": _poll_errors(workdir / "bgapi.db", window) if polling else {},
        "cpu_s": cpu_s,
        "cpu_s_per_1000_polls": cpu_s / runs_done * 1000 if runs_done else None,
        "peak_rss_mb": (peak_rss_kb / 1024) if peak_rss_kb else sampled_peak_rss / 2**20,
        "ready_s": ready_at - launched_at,
        "first_poll_s": (first_run_at - launched_at) if first_run_at else None,
        "stop_s": stop_s,
        "exit_code": exit_code,
        "runner_state": exit_info.get("runner_state"),
        "runner_error": exit_info.get("runner_error"),
    }
    figures["server"] = _server_figures(load_result)
    return figures


def _server_figures(load_result: dict[str, Any] | None) -> dict[str, Any] | None:
    if load_result is None:
        return None
    latencies = load_result.pop("latencies_ms")
    return {
        "latency_ms": percentiles(latencies),
        "latency_histogram": histogram(latencies),
        "requests_per_s": load_result["requests_per_s"],
        "completed": load_result["completed"],
        "errors": load_result["errors"],
        "late_sends": load_result["late_sends"],
        "mean_body_bytes": load_result.get("mean_body_bytes"),
    }


def _poll_errors(store_path: Path, window: tuple[float, float]) -> dict[str, int]:
    """Count the window's failed polls by error kind, from the child's store."""
    if not store_path.exists():
        return {}
    try:
        connection = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return {}
    try:
        rows = connection.execute(
            "SELECT coalesce(error_kind, 'unknown'), count(*) FROM results "
            "WHERE ok = 0 AND started_at >= ? AND started_at < ? GROUP BY 1",
            window,
        ).fetchall()
    except sqlite3.Error:
        return {}
    finally:
        connection.close()
    return {kind: count for kind, count in rows}


def machine_info() -> dict[str, Any]:
    """Describe the machine and the versions of the packages that affect the figures."""
    import platform
    from importlib import metadata

    packages = {}
    for name in (
        "bgapi", "fastapi", "starlette", "uvicorn", "httpx", "httpcore", "h11", "httptools",
        "uvloop", "aiohttp", "httpx-aiohttp", "pydantic", "apscheduler", "psutil",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": packages,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }

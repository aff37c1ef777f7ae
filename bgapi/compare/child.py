"""The measured process of ``bgapi compare``: one bgapi server with one strategy.

``python -m bgapi.compare.child --config FILE --mode MODE --port P --out DIR``
serves the app from :func:`bgapi.server.create_app` with
:func:`bgapi.server.run_server`, the code path of ``bgapi run-all``. Modes are
bgapi's own (``thread``, ``asyncio``, ``apscheduler``), the peers of
:mod:`bgapi.compare.peers`, or ``baseline``: the same server with a runner
that polls nothing.

Two additions serve the measurement, and cost the same in every mode:

- Every scheduled run's wall-clock time and lateness are appended to an
  in-memory array (a wrapper around :meth:`LatenessStats.record_run`, one
  array append per run), because the API keeps only the recent runs.
- A watchdog thread sends the process SIGTERM when its parent dies or after
  ``--max-seconds``, so no child outlives the benchmark.

After the server stops, the child writes ``samples.bin`` (pairs of float64:
wall time, lateness in ms) and ``exit.json`` (peak RSS, run counts, the drift
of each target's last run) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

__all__ = ["BASELINE", "EXIT_FILE", "SAMPLES_FILE", "read_samples"]

BASELINE = "baseline"
SAMPLES_FILE = "samples.bin"
EXIT_FILE = "exit.json"
# Enough for 3,000 runs/s for over five minutes; beyond it runs are not sampled.
MAX_SAMPLES = 1_000_000

_samples = array("d")


def _record_samples() -> None:
    """Wrap :meth:`LatenessStats.record_run` so that every run is also sampled here."""
    from bgapi.state import LatenessStats

    original = LatenessStats.record_run

    def record_run(self: LatenessStats, lateness_ms: float) -> None:
        if len(_samples) < 2 * MAX_SAMPLES:
            # One extend call, so a pair from one thread is never split by another.
            _samples.extend((time.time(), lateness_ms))
        original(self, lateness_ms)

    LatenessStats.record_run = record_run  # type: ignore[method-assign]


def read_samples(path: Path) -> tuple[array[float], array[float]]:
    """Read a ``samples.bin`` file into (wall times, lateness in ms)."""
    data = array("d")
    data.frombytes(path.read_bytes())
    return data[0::2], data[1::2]


def _watchdog(max_seconds: float) -> None:
    parent = os.getppid()
    deadline = time.monotonic() + max_seconds

    def watch() -> None:
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bgapi-compare-watchdog", daemon=True).start()


def _peak_rss_kb() -> int | None:
    # On Linux, ru_maxrss survives fork and exec, so a child reports at least
    # its parent's RSS at fork time; VmHWM belongs to this process's own memory.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, the others kilobytes.
    return peak // 1024 if sys.platform == "darwin" else peak


def _summary(app: Any, started: bool) -> dict[str, Any]:
    poller = getattr(app.state, "poller", None)
    runner = getattr(app.state, "runner", None)
    drift_ms = []
    drift_per_run_ms = []
    runs = missed = 0
    first_run_at = None
    if poller is not None:
        stats = poller.stats
        runs, missed, first_run_at = stats.runs, stats.missed, stats.first_run_at
        for status in poller.statuses():
            result = status.last_result
            if result is not None and result.lateness_ms is not None:
                drift = (result.started_at - result.scheduled_at) * 1000
                drift_ms.append(drift)
                drift_per_run_ms.append(drift / max(1, status.runs))
    peak_rss_kb = _peak_rss_kb()
    # The process mode polls in a child process; its memory counts too.
    child_rss_kb = getattr(getattr(runner, "inner", runner), "child_peak_rss_kb", None)
    if peak_rss_kb is not None and child_rss_kb:
        peak_rss_kb += child_rss_kb
    return {
        "started": started,
        "stopped_at": time.time(),
        "peak_rss_kb": peak_rss_kb,
        "runs": runs,
        "missed": missed,
        "first_run_at": first_run_at,
        "drift_ms": drift_ms,
        "drift_per_run_ms": drift_per_run_ms,
        "runner_state": str(runner.state) if runner is not None else None,
        "runner_error": runner.error if runner is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Serve one measured bgapi server until SIGTERM, then write what it recorded."""
    parser = argparse.ArgumentParser(prog="python -m bgapi.compare.child", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    _watchdog(args.max_seconds)
    _record_samples()

    from bgapi.compare.peers import NoScheduleRunner, peer_factory
    from bgapi.config import load_config
    from bgapi.logs import setup_logging
    from bgapi.server import create_app, run_server

    config = load_config(args.config)
    setup_logging(args.log_level, config.redact)
    factory = NoScheduleRunner if args.mode == BASELINE else peer_factory(args.mode)
    app = create_app(config, mode=args.mode, runner_factory=factory)
    started = run_server(app, host="127.0.0.1", port=args.port, log_level=args.log_level)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / SAMPLES_FILE).write_bytes(_samples.tobytes())
    summary = _summary(app, started)
    (args.out / EXIT_FILE).write_text(json.dumps(summary), encoding="utf-8")
    sys.exit(0 if started else 1)


if __name__ == "__main__":
    main()

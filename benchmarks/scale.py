"""Find how many targets at a 1 s interval each mode sustains with p99 lateness under 50 ms.

    python benchmarks/scale.py [--modes thread,asyncio,apscheduler] [--duration 10] [--out DIR]

For each mode it runs ``bgapi compare --modes MODE --targets N --no-baseline``
with N doubling from ``--start`` until a run fails, then bisects between the
last passing and the first failing N down to ``--resolution`` (a fraction of
N). A run passes when its p99 lateness is under ``--max-p99-ms``, it did at
least ``--min-done`` of its scheduled runs and no poll failed. Every probe's
JSON is kept in ``--out``; the last lines print the result per mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def probe(mode: str, targets: int, args: argparse.Namespace) -> tuple[bool, dict]:
    """Run one comparison of ``mode`` with ``targets`` targets and judge it."""
    out = args.out / f"{mode}-{targets}.json"
    command = [
        sys.executable, "-m", "bgapi", "compare",
        "--modes", mode,
        "--targets", str(targets),
        "--interval", "1",
        "--duration", str(args.duration),
        "--repeat", "1",
        "--no-baseline",
        "--json", str(out),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=args.duration * 10 + 300, check=False)
    if completed.returncode != 0 or not out.exists():
        return False, {"error": completed.stderr[-500:]}
    run = json.loads(out.read_text())["runs"][0]
    p99 = run["lateness_ms"]["p99"]
    done = run["runs_done_ratio"] or 0.0
    failed = sum(run["poll_errors"].values())
    passed = p99 is not None and p99 < args.max_p99_ms and done >= args.min_done and failed == 0
    summary = {
        "targets": targets,
        "p99_ms": p99,
        "done_ratio": done,
        "failed_polls": failed,
        "cpu_s_per_1000_polls": run["cpu_s_per_1000_polls"],
        "peak_rss_mb": run["peak_rss_mb"],
    }
    return passed, summary


def search(mode: str, args: argparse.Namespace) -> int:
    """Return the largest target count that passed for ``mode`` (0 if none did)."""
    passed_at, failed_at = 0, None
    targets = args.start
    while failed_at is None and targets <= args.max_targets:
        passed, summary = probe(mode, targets, args)
        print(f"{mode:<12} {'pass' if passed else 'FAIL'} {summary}", flush=True)
        if passed:
            passed_at, targets = targets, targets * 2
        else:
            failed_at = targets
    while failed_at is not None and failed_at - passed_at > max(1, passed_at * args.resolution):
        middle = (passed_at + failed_at) // 2
        passed, summary = probe(mode, middle, args)
        print(f"{mode:<12} {'pass' if passed else 'FAIL'} {summary}", flush=True)
        if passed:
            passed_at = middle
        else:
            failed_at = middle
    return passed_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="thread,asyncio,apscheduler")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--start", type=int, default=250)
    parser.add_argument("--max-targets", type=int, default=16000)
    parser.add_argument("--resolution", type=float, default=0.1)
    parser.add_argument("--max-p99-ms", type=float, default=50.0)
    parser.add_argument("--min-done", type=float, default=0.99)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {mode: search(mode, args) for mode in args.modes.split(",")}
    for mode, targets in results.items():
        print(f"RESULT {mode}: {targets} targets at 1 s ({targets} polls/s) with p99 lateness < {args.max_p99_ms:g} ms")


if __name__ == "__main__":
    main()

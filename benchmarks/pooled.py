"""Pool the per-repetition server ratios of several ``bgapi compare --json`` files.

    python benchmarks/pooled.py --target 1.5 half-a.json half-b.json ...

One run's median moves with the machine's speed from minute to minute. So
this script takes every repetition of every file and divides each mode's
server p99 (and requests/s) by the baseline of the same repetition. Per
mode, it prints the median over all of them, the quartiles, and the share
of repetitions at or below ``--target``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bgapi.compare.child import BASELINE


def repetition_ratios(document: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Return, per mode, (p99 ratio, requests/s ratio) for each repetition that has a baseline."""
    baselines = {
        run["repetition"]: run["server"]
        for run in document["runs"]
        if run["mode"] == BASELINE and run.get("ok") and run.get("server")
    }
    ratios: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in document["runs"]:
        base = baselines.get(run["repetition"])
        server = run.get("server")
        if run["mode"] == BASELINE or not run.get("ok") or not server or base is None:
            continue
        p99 = server["latency_ms"]["p99"] / base["latency_ms"]["p99"]
        throughput = server["requests_per_s"] / base["requests_per_s"]
        ratios[run["mode"]].append((p99, throughput))
    return ratios


def main(argv: list[str] | None = None) -> None:
    """Print the pooled ratios of the files named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by bgapi compare --json.")
    parser.add_argument("--target", type=float, default=1.5, help="p99 ratio to count repetitions against.")
    args = parser.parse_args(argv)

    pooled: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for path in args.files:
        for mode, values in repetition_ratios(json.loads(path.read_text(encoding="utf-8"))).items():
            pooled[mode].extend(values)

    print("| mode | repetitions | p99 / baseline, median (quartiles) | at or below target | requests/s / baseline |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, values in sorted(pooled.items()):
        p99 = [value for value, _ in values]
        throughput = [value for _, value in values]
        quartiles = statistics.quantiles(p99, n=4) if len(p99) > 1 else [p99[0]] * 3
        share = sum(value <= args.target for value in p99) / len(p99)
        print(
            f"| {mode} | {len(p99)} | {statistics.median(p99):.2f}× ({quartiles[0]:.2f}–{quartiles[2]:.2f}×) "
            f"| {share:.0%} | {statistics.median(throughput):.2f} |"
        )


if __name__ == "__main__":
    main()

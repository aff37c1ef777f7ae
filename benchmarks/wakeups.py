"""Measure the CPU that the process mode's schedule uses per poll, with and without fewer wake-ups.

    python benchmarks/wakeups.py [--targets 50] [--interval 1] [--seconds 8] [--rounds 3]

A server that polls 50 targets a second spreads them over the second, so
each poll wakes an idle process. On a virtual machine a wake-up costs CPU of
its own, and at this rate that cost is larger than the poll's Python work.
The process mode's child therefore wakes less often: its targets start in
groups (``run_schedule(..., group_step_s)``) and its store commits the
results of ``commit_delay_s`` in one transaction.

Each row runs the child's poller (the real schedule, ``Poller.check`` and
the SQLite store) against the built-in upstream in this process. It prints
the CPU milliseconds per poll and per second, the store's writer thread
included, as the median over ``--rounds`` rounds. The rounds interleave the
rows, so a change in the machine's speed hits every row alike. Two rows of
bare ``aiohttp`` requests, one or five per wake-up, show the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bgapi.compare.harness import ProcessGroup, start_upstream
from bgapi.config import config_from_dict
from bgapi.poller import LoopResources
from bgapi.runners.process import COMMIT_DELAY_S, GROUP_STEP_S, _ReportingPoller
from bgapi.runners.thread import new_loop
from bgapi.schedule import run_schedule
from bgapi.store import Store

WARMUP_S = 2.0


async def _cpu_per_poll(run: Callable[[], Awaitable[None]], count_polls: Callable[[], int], seconds: float) -> tuple[float, float]:
    """Run ``run`` as a task, and return the CPU ms per poll and per second over ``seconds``."""
    task = asyncio.create_task(run())
    try:
        await asyncio.sleep(WARMUP_S)
        cpu, polls = time.process_time(), count_polls()
        await asyncio.sleep(seconds)
        used_ms = (time.process_time() - cpu) * 1000
        done = count_polls() - polls
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return used_ms / max(done, 1), used_ms / seconds


async def _schedule(port: int, args: argparse.Namespace, workdir: Path, group_step_s: float, commit_delay_s: float) -> tuple[float, float]:
    config = config_from_dict(
        {
            "poller": {"timeout": 5},
            "store": {"path": str(workdir / f"bgapi-{group_step_s}-{commit_delay_s}.db")},
            "targets": [
                {
                    "name": f"t{index}",
                    "url": f"http://127.0.0.1:{port}/status/{index}",
                    "interval": args.interval,
                    "conditions": ["status == 200", 'json.status == "ok"'],
                }
                for index in range(args.targets)
            ],
        }
    )
    store = Store(config.store.path, config.store.retention, commit_delay_s=commit_delay_s)
    store.open()
    poller = _ReportingPoller(config, store, mode="process")
    resources = LoopResources(config)

    async def run() -> None:
        await run_schedule(poller, resources, group_step_s)

    try:
        return await _cpu_per_poll(run, lambda: poller.stats.runs, args.seconds)
    finally:
        await resources.aclose()
        store.close()


async def _bare(port: int, args: argparse.Namespace, per_wakeup: int) -> tuple[float, float]:
    sent = 0

    async def run() -> None:
        nonlocal sent
        async with aiohttp.ClientSession() as session:

            async def one(index: int) -> None:
                async with session.get(f"http://127.0.0.1:{port}/status/{index}") as response:
                    await response.read()

            start = time.monotonic()
            step = per_wakeup * args.interval / args.targets
            wakeup = 0
            while True:
                wakeup += 1
                await asyncio.sleep(max(0.0, start + wakeup * step - time.monotonic()))
                await asyncio.gather(*(one(sent + index) for index in range(per_wakeup)))
                sent += per_wakeup

    return await _cpu_per_poll(run, lambda: sent, args.seconds)


async def _measure(port: int, args: argparse.Namespace, workdir: Path) -> None:
    rows: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
        "aiohttp, 1 request per wake-up": lambda: _bare(port, args, 1),
        "aiohttp, 5 requests per wake-up": lambda: _bare(port, args, 5),
        "schedule, spread, commit per poll": lambda: _schedule(port, args, workdir, 0.0, 0.0),
        f"schedule, spread, commit every {COMMIT_DELAY_S:g} s": lambda: _schedule(port, args, workdir, 0.0, COMMIT_DELAY_S),
        f"schedule, groups {GROUP_STEP_S:g} s apart, commit every {COMMIT_DELAY_S:g} s": lambda: _schedule(
            port, args, workdir, GROUP_STEP_S, COMMIT_DELAY_S
        ),
    }
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for round_index in range(args.rounds):
        for name, measure in rows.items():
            figures[name].append(await measure())
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr)
    polls_per_s = args.targets / args.interval
    print(f"{args.targets} targets every {args.interval:g} s ({polls_per_s:g} polls/s), median of {args.rounds} rounds of {args.seconds:g} s")
    print(f"{'row':<52} {'CPU ms/poll':>11} {'CPU ms/s':>9}")
    for name, values in figures.items():
        per_poll = statistics.median(value[0] for value in values)
        per_second = statistics.median(value[1] for value in values)
        print(f"{name:<52} {per_poll:11.3f} {per_second:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two polls of a target")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured window")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    group = ProcessGroup()
    try:
        port = start_upstream(group, max_seconds=3600)
        with (
            tempfile.TemporaryDirectory(prefix="bgapi-wakeups-") as workdir,
            asyncio.Runner(loop_factory=new_loop) as runner,
        ):
            runner.run(_measure(port, args, Path(workdir)))
    finally:
        group.close()


if __name__ == "__main__":
    main()

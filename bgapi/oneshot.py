"""``bgapi poll-once``: poll every target once, store the results and print them."""

from __future__ import annotations

import asyncio
import json
import sys

from rich.console import Console
from rich.progress import Progress
from rich.markup import escape
from rich.table import Table

from bgapi.config import Config
from bgapi.poller import LoopResources, Poller
from bgapi.state import TargetStatus
from bgapi.store import Store

__all__ = ["poll_all", "print_json", "print_table"]

# A progress bar is shown on a terminal from this many targets on.
PROGRESS_MIN_TARGETS = 10

_STATE_STYLES = {"up": "green", "down": "red", "unknown": "yellow"}


def poll_all(config: Config, only: str | None = None, *, progress: bool = True) -> list[TargetStatus]:
    """Poll the enabled targets (or only the one named ``only``) concurrently, once.

    The state each target had in the store is the starting point, so the
    thresholds count across runs. Returns the statuses after the polls.

    Raises:
        StoreError: the store cannot be opened.
    """
    return asyncio.run(_poll_all(config, only, progress=progress))


async def _poll_all(config: Config, only: str | None, *, progress: bool) -> list[TargetStatus]:
    if only is not None:
        target = config.target(only)
        assert target is not None, "the CLI checks the name first"
        targets = [target]
    else:
        targets = config.enabled_targets
    store = Store(config.store.path, config.store.retention)
    await asyncio.to_thread(store.open)
    poller = Poller(config, store, mode=None)
    await asyncio.to_thread(poller.restore)
    resources = LoopResources(config)
    limit = asyncio.Semaphore(config.poller.max_concurrency)
    show_progress = progress and sys.stderr.isatty() and len(targets) >= PROGRESS_MIN_TARGETS
    try:
        with Progress(console=Console(stderr=True), transient=True, disable=not show_progress) as bar:
            task = bar.add_task("Polling", total=len(targets))

            async def check(target_index: int) -> None:
                async with limit:
                    await poller.check(targets[target_index], resources)
                bar.advance(task)

            await asyncio.gather(*(check(index) for index in range(len(targets))))
    finally:
        await resources.aclose()
        await asyncio.to_thread(store.close)
    polled = {target.name for target in targets}
    return [status for status in poller.statuses() if status.name in polled]


def print_table(statuses: list[TargetStatus]) -> None:
    """Print one row per target: state, status code, time and what failed."""
    table = Table(title=None, show_edge=False)
    table.add_column("target")
    table.add_column("state")
    table.add_column("status", justify="right")
    table.add_column("time", justify="right")
    table.add_column("failed conditions or error", overflow="fold")
    for status in statuses:
        result = status.last_result
        state = str(status.state)
        detail = ""
        if result is not None and not result.ok:
            reasons = result.failed_conditions or [f"{result.error_kind}: {result.error}"]
            # Upstream text may contain brackets that rich would read as markup.
            detail = escape("; ".join(reasons))
        table.add_row(
            status.name,
            f"[{_STATE_STYLES[state]}]{state}[/]",
            str(result.status_code) if result and result.status_code else "-",
            f"{result.elapsed_ms:.0f} ms" if result else "-",
            detail,
        )
    Console(highlight=False).print(table)


def print_json(config: Config, statuses: list[TargetStatus]) -> None:
    """Print the targets and their last results as a JSON array."""
    documents = []
    for status in statuses:
        document = status.to_dict()
        target = config.target(status.name)
        if target is not None:
            document["url"] = config.redact(target.url)
        documents.append(document)
    sys.stdout.write(json.dumps(documents, indent=2) + "\n")

"""Measure the CPU cost of each layer of one poll against the built-in upstream.

    python benchmarks/poll_layers.py [--polls 5000] [--concurrency 10] [--gap-ms 0] [--http-client auto]

Each layer adds to the one before: a bare ``aiohttp`` request, the same
request as an ``httpx.Request`` built once and sent to the client's
transport (what ``poll_http`` does), bgapi's ``poll_http`` (deadline, body
cap, conditions), ``Poller.check`` without a store (state, statistics) and
``Poller.check`` with the SQLite store. The difference between two rows is
the cost of a layer. For comparison, one row sends the same request the
usual way, with ``AsyncClient.stream``, which builds the request each time. Each row is the lowest
of ``--rounds`` rounds of CPU milliseconds per poll of this process (the
store's writer thread included), so the noise of a busy machine only adds.

``--gap-ms`` pauses each concurrent slot that long between its polls. Polls
back to back find the CPU's caches warm. A server that polls 50 targets a
second spreads them, so each poll runs alone after an idle pause, and
``--concurrency 1 --gap-ms 20`` measures that case.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable

from bgapi.compare.harness import ProcessGroup, start_upstream
from bgapi.conditions import parse_conditions
from bgapi.config import config_from_dict
from bgapi.poll import poll_http
from bgapi.poller import LoopResources, Poller
from bgapi.store import Store

TARGETS = 10


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(
    name: str, poll: Callable[[int], Awaitable[object]], args: argparse.Namespace
) -> None:
    gate = asyncio.Semaphore(args.concurrency)

    gap_s = args.gap_ms / 1000

    async def one(index: int) -> None:
        async with gate:
            await poll(index)
            if gap_s:
                await asyncio.sleep(gap_s)

    await asyncio.gather(*(one(index) for index in range(200)))  # warm-up
    best = float("inf")
    for _ in range(args.rounds):
        cpu = _cpu_s()
        start = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(args.polls)))
        elapsed = time.perf_counter() - start
        best = min(best, (_cpu_s() - cpu) / args.polls * 1000)
    print(f"{name:<26} {best:6.3f} CPU ms/poll   {args.polls / elapsed:7,.0f} polls/s (last round)")


async def _run(port: int, args: argparse.Namespace, workdir: str) -> None:
    config = config_from_dict(
        {
            "poller": {"timeout": 5, "http_client": args.http_client},
            "store": {"path": f"{workdir}/bgapi.db"},
            "targets": [
                {
                    "name": f"t{index}",
                    "url": f"http://127.0.0.1:{port}/status/{index}",
                    "conditions": ["status == 200", 'json.status == "ok"'],
                }
                for index in range(TARGETS)
            ],
        }
    )
    targets = config.targets
    conditions = parse_conditions(targets[0].conditions)
    resources = LoopResources(config)
    client = resources.clients.for_target(targets[0])
    try:
        session_of = getattr(client._transport, "_get_session", None)
        if session_of is not None:
            session = session_of()

            async def bare(index: int) -> None:
                async with session.get(targets[index % TARGETS].url) as response:
                    await response.read()

            await _measure("aiohttp request", bare, args)

        transport = client.direct_transport
        requests = [client.prepared(target) for target in targets]

        async def through_transport(index: int) -> None:
            response = await transport.handle_async_request(requests[index % TARGETS])
            async for _ in response.aiter_raw():
                pass
            await response.aclose()

        await _measure("httpx transport, prepared", through_transport, args)

        async def poll_core(index: int) -> None:
            await poll_http(client, targets[index % TARGETS], conditions, max_body_bytes=1 << 20)

        await _measure("poll_http", poll_core, args)

        memory_only = Poller(config, None)

        async def check(index: int) -> None:
            await memory_only.check(targets[index % TARGETS], resources)

        await _measure("Poller.check, no store", check, args)

        store = Store(config.store.path, config.store.retention)
        store.open()
        stored = Poller(config, store)

        async def check_stored(index: int) -> None:
            await stored.check(targets[index % TARGETS], resources)

        try:
            await _measure("Poller.check, SQLite", check_stored, args)
        finally:
            store.close()

        async def through_httpx(index: int) -> None:
            async with client.stream("GET", targets[index % TARGETS].url) as response:
                async for _ in response.aiter_bytes():
                    pass

        await _measure("(AsyncClient.stream)", through_httpx, args)
    finally:
        await resources.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--polls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="milliseconds each slot pauses between its polls")
    parser.add_argument("--http-client", default="auto", choices=("auto", "httpx", "aiohttp"))
    args = parser.parse_args()
    group = ProcessGroup()
    try:
        port = start_upstream(group, max_seconds=600)
        with tempfile.TemporaryDirectory(prefix="bgapi-layers-") as workdir:
            asyncio.run(_run(port, args, workdir))
    finally:
        group.close()


if __name__ == "__main__":
    main()

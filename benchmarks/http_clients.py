"""Measure HTTP client throughput against bgapi's built-in upstream, one variant per process.

    python benchmarks/http_clients.py [--seconds S] [--concurrency 1,10,100] [--clients a,b]

Each variant sends GET requests from C concurrent tasks on one event loop for
S seconds and reports requests per second and CPU milliseconds per request of
the client process. The upstream runs in a process of its own. Variants:

- ``httpx``: ``httpx.AsyncClient`` with bgapi's default pool (100 connections).
- ``httpx-pool10``: the same with a pool of 10 connections.
- ``bgapi-aiohttp``: ``httpx.AsyncClient`` over bgapi's ``AiohttpTransport``, the default.
- ``bgapi-prepared``: what a bgapi poll does: an ``httpx.Request`` built once and
  sent straight to bgapi's ``AiohttpTransport``, without ``AsyncClient.send``.
- ``httpx-aiohttp``: ``httpx.AsyncClient`` over the ``httpx-aiohttp`` package's transport.
- ``aiohttp``: ``aiohttp.ClientSession`` alone, the floor.

Add ``+uvloop`` to a name (``httpx+uvloop``) to run it on uvloop. A variant
whose package is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time

POOL = 100


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(get, concurrency: int, seconds: float) -> tuple[int, int]:
    done = errors = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < end:
            try:
                await get()
                done += 1
            except Exception:  # noqa: BLE001 - counted, the benchmark goes on
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, errors


async def _variant(name: str, url: str, concurrency: int, seconds: float) -> dict[str, object]:
    import httpx

    client_kind = name.split("+")[0]
    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    if client_kind == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=POOL)) as session:

            async def get() -> None:
                async with session.get(url) as response:
                    await response.read()

            return await _measure(get, concurrency, seconds)
    if client_kind == "bgapi-prepared":
        from bgapi.aiohttp_transport import AiohttpTransport as BgapiTransport

        transport = BgapiTransport(limits=limits)
        request = httpx.Request("GET", url)

        async def send() -> None:
            response = await transport.handle_async_request(request)
            async for _ in response.aiter_raw():
                pass
            await response.aclose()

        try:
            return await _measure(send, concurrency, seconds)
        finally:
            await transport.aclose()
    if client_kind == "bgapi-aiohttp":
        from bgapi.aiohttp_transport import AiohttpTransport as BgapiTransport

        client = httpx.AsyncClient(transport=BgapiTransport(limits=limits))
    elif client_kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), limits=limits)
    elif client_kind == "httpx-pool10":
        small = httpx.Limits(max_connections=10, max_keepalive_connections=10)
        client = httpx.AsyncClient(limits=small)
    elif client_kind == "httpx":
        client = httpx.AsyncClient(limits=limits)
    else:
        raise SystemExit(f"unknown client {client_kind!r}")
    async with client:

        async def get() -> None:
            async with client.stream("GET", url) as response:
                async for _ in response.aiter_bytes():
                    pass

        return await _measure(get, concurrency, seconds)


async def _measure(get, concurrency: int, seconds: float) -> dict[str, object]:
    # A short warm-up opens the connections before the clock starts.
    await _drive(get, concurrency, min(0.5, seconds / 4))
    cpu = _cpu()
    start = time.perf_counter()
    done, errors = await _drive(get, concurrency, seconds)
    elapsed = time.perf_counter() - start
    cpu_used = _cpu() - cpu
    return {
        "requests_per_s": done / elapsed,
        "cpu_ms_per_request": cpu_used / done * 1000 if done else None,
        "errors": errors,
    }


def _child(args: argparse.Namespace) -> None:
    name = args.child
    factory = None
    if name.endswith("+uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(_variant(name, args.url, args.concurrency_one, args.seconds))
    except ImportError as exc:
        result = {"skipped": str(exc)}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,10,100")
    parser.add_argument("--clients", default="httpx,httpx-pool10,bgapi-aiohttp,bgapi-prepared,httpx-aiohttp,aiohttp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    upstream = subprocess.Popen(
        [sys.executable, "-m", "bgapi.compare.upstream", "--max-seconds", "1800"],
        stdout=subprocess.PIPE,
    )
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())
        url = f"http://127.0.0.1:{port}/status/1"
        print(f"# cpu_count={os.cpu_count()} python={sys.version.split()[0]} seconds={args.seconds}")
        print(f"{'client':<22} {'C':>4} {'req/s':>9} {'cpu ms/req':>11} errors")
        for name in args.clients.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                output = subprocess.run(
                    [sys.executable, __file__, "--child", name, "--url", url,
                     "--concurrency-one", str(concurrency), "--seconds", str(args.seconds)],
                    capture_output=True, text=True, timeout=args.seconds * 3 + 30, check=False,
                )
                try:
                    result = json.loads(output.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    print(f"{name:<22} {concurrency:>4} failed: {output.stderr.strip()[-300:]}")
                    continue
                if "skipped" in result:
                    print(f"{name:<22} {concurrency:>4} skipped: {result['skipped']}")
                    continue
                cpu = result["cpu_ms_per_request"]
                print(
                    f"{name:<22} {concurrency:>4} {result['requests_per_s'] or 0:>9,.0f} "
                    f"{cpu if cpu is None else round(cpu, 3):>11} {result['errors']}"
                )
    finally:
        upstream.terminate()
        upstream.wait(5)


if __name__ == "__main__":
    main()

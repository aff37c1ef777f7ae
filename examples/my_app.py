"""bgapi inside your own FastAPI app: HTTP targets, custom jobs and your lifespan.

Run it from the repository root with either command, then open
http://127.0.0.1:8001/summary and http://127.0.0.1:8001/bgapi/api/targets::

    uvicorn examples.my_app:app --port 8001
    python examples/my_app.py
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from bgapi import BackgroundPoller, combine_lifespans, get_poller

# Built from Python objects; BackgroundPoller.from_file("bgapi.toml") reads a file instead.
poller = BackgroundPoller(
    {
        "store": {"path": "my_app.db"},
        "targets": [
            {
                "name": "python-status",
                "url": "https://status.python.org/api/v2/status.json",
                "interval": 60,
                "conditions": ["status == 200", 'json.status.indicator == "none"'],
            }
        ],
    },
    mode="asyncio",
)

# State that the app's lifespan creates and the jobs update.
cache: dict[str, Any] = {}


@poller.job(interval=10)
async def warm_cache() -> None:
    """Record when the cache was warmed; an async job runs on the poller's event loop."""
    cache["warmed_at"] = time.time()


@poller.job(interval=30, timeout=20)
def compact_files() -> bool:
    """Compact files in a worker thread, where blocking calls are fine.

    Returning False (or raising) marks the run as failed.
    """
    time.sleep(0.1)  # stands for blocking work
    return True


@asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
    cache["ready"] = True  # starts before the poller ...
    yield
    cache.clear()  # ... and stops after it


app = FastAPI(lifespan=combine_lifespans(app_lifespan, poller.lifespan))
poller.add_api_routes(app, prefix="/bgapi")


@app.get("/summary")
def summary(bg: Annotated[BackgroundPoller, Depends(get_poller)]) -> dict[str, Any]:
    """Read the poller's state from an endpoint of your own."""
    return {
        "states": {status.name: status.state for status in bg.statuses()},
        "cache": cache,
    }


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, port=8001)

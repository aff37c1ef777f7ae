"""The FastAPI application: targets, results, poller statistics and health.

:func:`create_app` builds the app, and nothing starts until uvicorn runs its
lifespan. The lifespan opens the store and starts the runner. On shutdown it
stops scheduling, ends the poll in flight, closes the HTTP clients and then
closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from bgapi import __version__
from bgapi.config import Config
from bgapi.metrics import create_registry
from bgapi.poll import format_timestamp
from bgapi.poller import LoopResources, Poller
from bgapi.runners import Runner, create_runner
from bgapi.state import TargetStatus
from bgapi.store import Store

__all__ = ["Server", "create_app", "run_server"]

logger = logging.getLogger(__name__)

MAX_RESULTS_LIMIT = 1000
TargetName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")]


class ResultModel(BaseModel):
    """One poll of one target."""

    target: str
    ok: bool
    status_code: int | None
    elapsed_ms: float
    error_kind: str | None
    error: str | None
    failed_conditions: list[str]
    scheduled_at: str
    started_at: str
    lateness_ms: float | None


class TargetModel(BaseModel):
    """A target's configuration summary and live state."""

    name: str
    url: str
    method: str
    enabled: bool
    interval_s: float
    timeout_s: float
    state: Literal["up", "down", "unknown"]
    last_result: ResultModel | None
    consecutive_successes: int
    consecutive_failures: int
    last_success_at: str | None
    last_change_at: str | None
    next_run_at: str | None
    runs: int
    missed: int


class LatenessModel(BaseModel):
    """Start lateness of scheduled runs in milliseconds, over the recent runs."""

    p50: float | None
    p99: float | None
    max: float | None
    samples: int


class PollerModel(BaseModel):
    """The runner and its totals over all targets."""

    mode: str | None
    state: str
    uptime_s: float
    runs: int
    missed: int
    lateness_ms: LatenessModel
    targets: int
    first_run_at: str | None
    error: str | None


class HealthModel(BaseModel):
    """Whether the server and its poller work."""

    status: Literal["ok", "unhealthy"]
    poller: str
    reason: str | None = None


class ErrorModel(BaseModel):
    """An error response."""

    detail: str


_NOT_FOUND = {404: {"model": ErrorModel, "description": "No target has this name."}}


def create_app(config: Config, *, mode: str | None = None, poll: bool = True) -> FastAPI:
    """Build the API app for ``config``.

    Args:
        config: A validated configuration.
        mode: The strategy to run the poller with; the config's default when None.
        poll: Run the schedule. False serves stored results and polls only on request.
    """
    chosen_mode = mode or config.poller.mode

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(config.store.path, config.store.retention)
        await asyncio.to_thread(store.open)
        poller = Poller(config, store, chosen_mode if poll else None)
        await asyncio.to_thread(poller.restore)
        resources = LoopResources(config)
        runner = create_runner(chosen_mode, poller) if poll else None
        app.state.poller = poller
        app.state.runner = runner
        app.state.resources = resources
        app.state.metrics = create_registry(poller)
        for warning in config.startup_warnings():
            logger.warning("%s", warning)
        if runner is not None:
            await runner.start()
        try:
            yield
        finally:
            if runner is not None:
                await runner.stop()
            await resources.aclose()
            await asyncio.to_thread(store.close)

    app = FastAPI(
        title="bgapi",
        version=__version__,
        summary="Background HTTP poller: target states, results and poller statistics.",
        lifespan=lifespan,
    )
    _add_routes(app, config)
    return app


def _add_routes(app: FastAPI, config: Config) -> None:
    def poller_of(request: Request) -> Poller:
        return request.app.state.poller  # type: ignore[no-any-return]

    def runner_of(request: Request) -> Runner | None:
        return request.app.state.runner  # type: ignore[no-any-return]

    def status_or_404(request: Request, name: str) -> TargetStatus:
        status = poller_of(request).status(name)
        if status is None:
            raise HTTPException(404, f"target {name!r} not found")
        return status

    @app.get("/healthz", response_model=HealthModel, responses={503: {"model": HealthModel}})
    def healthz(request: Request) -> Any:
        """Report 200 while the poller starts or runs (or none is configured), 503 once it died."""
        runner = runner_of(request)
        poller = poller_of(request)
        if runner is None:
            return HealthModel(status="ok", poller="disabled")
        if runner.alive and poller.store_error is None:
            return HealthModel(status="ok", poller=str(runner.state))
        reason = runner.error or poller.store_error or f"the poller is {runner.state}"
        body = HealthModel(status="unhealthy", poller=str(runner.state), reason=reason)
        return JSONResponse(body.model_dump(), status_code=503)

    @app.get("/api/targets", response_model=list[TargetModel])
    def list_targets(request: Request) -> list[dict[str, Any]]:
        """List every configured target with its state and last result."""
        return [_target_json(config, status) for status in poller_of(request).statuses()]

    @app.get("/api/targets/{name}", response_model=TargetModel, responses=_NOT_FOUND)
    def get_target(request: Request, name: TargetName) -> dict[str, Any]:
        """Show one target: state, last result, counters and next run."""
        return _target_json(config, status_or_404(request, name))

    @app.get("/api/targets/{name}/results", response_model=list[ResultModel], responses=_NOT_FOUND)
    def list_results(
        request: Request,
        name: TargetName,
        limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_LIMIT, description="How many results.")] = 100,
    ) -> list[dict[str, Any]]:
        """List the target's stored results, newest first."""
        status_or_404(request, name)
        poller = poller_of(request)
        assert poller.store is not None
        return poller.store.results(name, limit)

    @app.post("/api/targets/{name}/poll", response_model=ResultModel, responses=_NOT_FOUND)
    async def poll_target(request: Request, name: TargetName) -> dict[str, Any]:
        """Poll the target now, store the result and return it."""
        status_or_404(request, name)
        target = config.target(name)
        assert target is not None
        result = await poller_of(request).check(target, request.app.state.resources)
        return result.to_dict()

    @app.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> str:
        """Show every target's state as an HTML page that reloads itself."""
        from bgapi.page import render_status_page

        runner = runner_of(request)
        stats = poller_of(request).stats.snapshot()
        summary = f"{stats['runs']} run(s), {stats['missed']} missed slot(s)."
        return render_status_page(poller_of(request).statuses(), runner.mode if runner else None, summary)

    @app.get("/metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        """Expose target states, response times and poller lateness to Prometheus."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = request.app.state.metrics
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/poller", response_model=PollerModel)
    def poller_stats(request: Request) -> dict[str, Any]:
        """Show the strategy, its uptime, runs, missed slots and lateness percentiles."""
        poller = poller_of(request)
        runner = runner_of(request)
        stats = poller.stats.snapshot()
        return {
            **stats,
            "mode": runner.mode if runner else None,
            "state": str(runner.state) if runner else "disabled",
            "targets": len(config.enabled_targets),
            "first_run_at": _iso(poller.stats.first_run_at),
            "error": (runner.error if runner else None) or poller.store_error,
        }


def _target_json(config: Config, status: TargetStatus) -> dict[str, Any]:
    target = config.target(status.name)
    assert target is not None
    return {
        "name": status.name,
        "url": config.redact(target.url),
        "method": target.method,
        "enabled": target.enabled,
        "interval_s": target.interval_s,
        "timeout_s": target.timeout_s,
        "state": str(status.state),
        "last_result": status.last_result.to_dict() if status.last_result else None,
        "consecutive_successes": status.consecutive_successes,
        "consecutive_failures": status.consecutive_failures,
        "last_success_at": _iso(status.last_success_at),
        "last_change_at": _iso(status.last_change_at),
        "next_run_at": _iso(status.next_run_at),
        "runs": status.runs,
        "missed": status.missed,
    }


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else format_timestamp(timestamp)


class Server(uvicorn.Server):
    """A uvicorn server that ends with exit code 0 on SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal once it has shut down, which ends the
        # process with -15 (SIGTERM) or a KeyboardInterrupt traceback (SIGINT).
        # bgapi's own shutdown is complete by then, so a signal is a normal
        # stop: restore the previous handlers and return instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(
    app: FastAPI, *, host: str, port: int, log_level: str = "info", access_log: bool = False
) -> bool:
    """Serve ``app`` until SIGINT or SIGTERM; return False if it never started."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # Connections still open at shutdown get this long before they are cut.
        timeout_graceful_shutdown=1,
    )
    server = Server(config)
    server.run()
    return server.started
